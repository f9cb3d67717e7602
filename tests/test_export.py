"""Exported SAEs: both on-disk formats, scale folding, loading, compatibility checks, the export stage."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import saepipe
from helpers import with_section
from saepipe.cli import main
from saepipe.errors import UserError
from saepipe.paths import checkpoints_dir
from saepipe.sae import formats
from saepipe.sae.formats import check_compatible, load_sae
from saepipe.stages import export as export_stage
from saepipe.training.checkpoints import BEST, epoch_dir
from saved_saes import ARCHS, D_IN, D_SAE, HISTORY, HOOK, HOOK_SPEC, LAYER, MODEL, SCALE, K, export, make_checkpoint


@pytest.fixture(params=ARCHS)
def exported(request, tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt" / BEST, request.param)
    out = tmp_path / "sae" / "r1"
    export(ckpt, out)
    return ckpt, out


def saelens_only(out: Path, dest: Path) -> Path:
    dest.mkdir()
    for name in ("cfg.json", "sae_weights.safetensors"):
        shutil.copy(out / name, dest / name)
    return dest


def assert_equivalent(original, loaded) -> None:
    """loaded takes raw x; original was trained on SCALE * x."""
    torch.manual_seed(1)
    x = 3 * torch.randn(32, D_IN)
    with torch.no_grad():
        f = loaded.encode(x)
        torch.testing.assert_close(f, original.encode(SCALE * x), atol=1e-5, rtol=1e-5)
        assert (f != 0).any()
        torch.testing.assert_close(loaded.decode(f), original.decode(f) / SCALE, atol=1e-5, rtol=1e-5)


# ---- formats ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["ours", "saelens"])
def test_round_trip_folds_the_scale(exported, layout, tmp_path) -> None:
    ckpt, out = exported
    path = out if layout == "ours" else saelens_only(out, tmp_path / "only_saelens")
    sae = load_sae(path)
    assert not sae.training
    assert type(sae) is type(ckpt.sae)
    origin = sae.provenance
    assert (origin.model_name, origin.hook.layer, origin.hook.name, origin.hook.full_name) == (
        MODEL, LAYER, HOOK, HOOK_SPEC)
    assert_equivalent(ckpt.sae.eval(), sae)


def test_files_follow_the_contract(exported) -> None:
    ckpt, out = exported
    assert sorted(p.name for p in out.iterdir()) == ["cfg.json", "config.json", "history.json",
                                                      "sae_weights.safetensors", "weights.pt"]
    weights = torch.load(out / "weights.pt", weights_only=True)
    assert isinstance(weights, dict) and all(isinstance(v, torch.Tensor) for v in weights.values())
    assert set(weights) == set(ckpt.sae.export_tensors())
    config = json.loads((out / "config.json").read_text())
    assert config["sae_type"] == ckpt.sae.cfg.sae_type and (config["d_in"], config["d_sae"]) == (D_IN, D_SAE)
    assert config["normalization"] == {"folded": True, "activation_scale": SCALE, "normalize_activations": True}
    assert config["hook"] == HOOK_SPEC and config["model_name"] == MODEL and config["run_name"] == "r1"
    assert config["checkpoint"]["epoch"] == 2 and config["checkpoint"]["name"] == BEST
    assert config["training"]["lr"] == 5e-4 and config["data"]["train_rows"] == 1000
    assert json.loads((out / "history.json").read_text()) == HISTORY

    cfg = json.loads((out / "cfg.json").read_text())
    arch = ckpt.sae.cfg.saelens_architecture
    assert cfg["architecture"] == arch
    assert (cfg["d_in"], cfg["d_sae"], cfg["dtype"]) == (D_IN, D_SAE, "float32")
    assert cfg["apply_b_dec_to_input"] is True and cfg["normalize_activations"] == "none"
    meta = cfg["metadata"]
    assert meta["hook_name"] == HOOK_SPEC and meta["model_name"] == MODEL and meta["hook_head_index"] is None
    assert meta["sae_lens_version"].startswith("6.") and meta["context_size"] == 128 and meta["prepend_bos"] is True
    if arch == "topk":
        assert cfg["k"] == K
    tensors = load_file(out / "sae_weights.safetensors")
    shapes = {"W_enc": [D_IN, D_SAE], "W_dec": [D_SAE, D_IN], "b_enc": [D_SAE], "b_dec": [D_IN]}
    if arch == "jumprelu":
        shapes["threshold"] = [D_SAE]
    assert {k: list(v.shape) for k, v in tensors.items()} == shapes
    assert all(v.dtype == torch.float32 for v in tensors.values())


def test_saelens_loads_our_export_identically(exported) -> None:
    sae_lens = pytest.importorskip("sae_lens")
    _, out = exported
    theirs = sae_lens.SAE.load_from_disk(str(out))
    ours = load_sae(out)
    assert theirs.cfg.metadata.hook_name == HOOK_SPEC
    torch.manual_seed(2)
    x = 3 * torch.randn(32, D_IN)
    with torch.no_grad():
        f = ours.encode(x)
        torch.testing.assert_close(theirs.encode(x), f, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(theirs.decode(f), ours.decode(f), atol=1e-5, rtol=1e-5)


def test_foreign_saelens_jumprelu_without_our_metadata(tmp_path) -> None:
    ckpt = make_checkpoint(tmp_path / "ckpt", "batch_topk")
    export(ckpt, tmp_path / "out")
    path = saelens_only(tmp_path / "out", tmp_path / "foreign")
    cfg = json.loads((path / "cfg.json").read_text())
    del cfg["metadata"]["saepipe_sae_config"]
    (path / "cfg.json").write_text(json.dumps(cfg))
    assert_equivalent(ckpt.sae.eval(), load_sae(path))


def test_prefers_our_layout_when_both_exist(exported) -> None:
    _, out = exported
    cfg = json.loads((out / "cfg.json").read_text())
    cfg["metadata"]["hook_name"] = "blocks.9.hook_mlp_out"
    (out / "cfg.json").write_text(json.dumps(cfg))
    assert load_sae(out).provenance.hook.full_name == HOOK_SPEC


def test_load_sae_is_exposed_at_top_level() -> None:
    assert saepipe.load_sae is load_sae


def test_check_compatible(exported) -> None:
    _, out = exported
    sae = load_sae(out)
    check_compatible(sae, d_model=D_IN, hook=HOOK_SPEC, model_name=MODEL)
    with pytest.raises(UserError, match=rf"was trained on {HOOK_SPEC}, not blocks\.3\.hook_resid_post$"):
        check_compatible(sae, hook="blocks.3.hook_resid_post")
    with pytest.raises(UserError, match="d_model is 32"):
        check_compatible(sae, d_model=32)
    with pytest.raises(UserError, match="trained on model tiny/model, not other/model"):
        check_compatible(sae, model_name="other/model")
    with pytest.raises(UserError) as err:
        check_compatible(sae, hook="blocks.3.hook_resid_post")
    assert str(out) in str(err.value) and "\n" not in str(err.value)


def test_malformed_exports_are_user_errors(tmp_path) -> None:
    ckpt = make_checkpoint(tmp_path / "ckpt", "topk")
    good = tmp_path / "good"
    export(ckpt, good)

    def variant(name: str) -> Path:
        path = tmp_path / name
        shutil.copytree(good, path)
        return path

    with pytest.raises(UserError, match="run `saepipe export` first"):
        load_sae(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not an exported SAE"):
        load_sae(tmp_path / "empty")
    bad_json = variant("bad_json")
    (bad_json / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_sae(bad_json)
    bad_type = variant("bad_type")
    (bad_type / "config.json").write_text(json.dumps({**json.loads((good / "config.json").read_text()),
                                                      "sae_type": "mystery"}))
    with pytest.raises(UserError, match="sae_type='mystery'"):
        load_sae(bad_type)
    bad_shape = variant("bad_shape")
    weights = torch.load(good / "weights.pt", weights_only=True)
    torch.save({**weights, "W_enc": torch.zeros(D_IN + 1, D_SAE)}, bad_shape / "weights.pt")
    with pytest.raises(UserError, match=r"W_enc has shape \[17, 64\], expected \[16, 64\]"):
        load_sae(bad_shape)
    missing_key = variant("missing_key")
    torch.save({k: v for k, v in weights.items() if k != "b_dec"}, missing_key / "weights.pt")
    with pytest.raises(UserError, match="missing: b_dec"):
        load_sae(missing_key)
    not_tensors = variant("not_tensors")
    torch.save({**weights, "W_enc": [1, 2]}, not_tensors / "weights.pt")
    with pytest.raises(UserError, match="other than tensors"):
        load_sae(not_tensors)
    truncated = variant("truncated")
    (truncated / "weights.pt").write_bytes((good / "weights.pt").read_bytes()[:100])
    with pytest.raises(UserError, match="not a readable weights file"):
        load_sae(truncated)
    sl = saelens_only(good, tmp_path / "sl_bad")
    save_file({"W_enc": torch.zeros(D_SAE, D_IN)}, sl / "sae_weights.safetensors")
    with pytest.raises(UserError, match="missing: W_dec, b_dec, b_enc"):
        load_sae(sl)
    (sl / "sae_weights.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError, match="not a readable safetensors file"):
        load_sae(sl)


@pytest.mark.parametrize("target", ["torch", "safetensors"])
def test_interrupted_export_leaves_nothing(tmp_path, monkeypatch, target) -> None:
    ckpt = make_checkpoint(tmp_path / "ckpt", "batch_topk")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    if target == "torch":
        monkeypatch.setattr(formats.torch, "save", boom)
    else:
        monkeypatch.setattr(formats, "save_file", boom)
    parent = tmp_path / "sae"
    with pytest.raises(OSError, match="disk full"):
        export(ckpt, parent / "r1")
    assert not (parent / "r1").exists()
    assert list(parent.iterdir()) == []


def test_interrupted_reexport_keeps_the_previous_one(tmp_path, monkeypatch) -> None:
    ckpt = make_checkpoint(tmp_path / "ckpt", "topk")
    out = tmp_path / "sae" / "r1"
    export(ckpt, out)
    before = (out / "weights.pt").read_bytes()
    monkeypatch.setattr(formats, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        export(ckpt, out)
    assert (out / "weights.pt").read_bytes() == before
    assert [p.name for p in out.parent.iterdir()] == ["r1"]
    load_sae(out)


# ---- stages and CLI ---------------------------------------------------------------------------------------------
def test_export_stage_best_and_last(tmp_path, export_params, capsys) -> None:
    run_dir = checkpoints_dir(export_params)
    assert run_dir == tmp_path / "ckpts" / "r1" / "checkpoints"
    with pytest.raises(UserError, match="run `saepipe train` first"):
        export_stage.run(export_params)
    make_checkpoint(epoch_dir(run_dir, 1), "topk", epoch=1)
    make_checkpoint(run_dir / BEST, "topk", epoch=1)
    make_checkpoint(epoch_dir(run_dir, 2), "topk", epoch=2)
    export_stage.run(export_params)
    line, seconds = re.fullmatch(r"(.*) \[(\d+\.\d) s\]", capsys.readouterr().out.strip()).groups()
    assert line == (f"exported topk SAE {D_IN}->{D_SAE} on {HOOK_SPEC} (epoch 1, val FVU 0.3123, val L0 4.5) "
                    f"to {tmp_path / 'sae' / 'r1'}")
    assert 0 <= float(seconds) < 60
    export_stage.run(with_section(export_params, "export", checkpoint="last"))
    assert "(epoch 2, val FVU 0.1235, val L0 3.875)" in capsys.readouterr().out
    assert json.loads((tmp_path / "sae" / "r1" / "config.json").read_text())["checkpoint"]["epoch"] == 2


def test_cli_export(repo_dir, tmp_path, monkeypatch, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["export", "--help"])
    assert exit_.value.code == 0
    assert "--checkpoint" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        main(["upload", "--help"])
    assert "--hf-repo-id" in capsys.readouterr().out
    monkeypatch.chdir(tmp_path)
    assert main(["export", "--params", str(repo_dir / "params.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "run `saepipe train` first" in err
