"""Exported SAEs: both on-disk formats, scale folding, loading, compatibility checks, the export/upload stages."""

from __future__ import annotations

import json
import logging
import shutil
import traceback
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import saepipe
from helpers import with_section
from saepipe.cli import main
from saepipe.errors import UserError
from saepipe.publish import hf
from saepipe.sae import REGISTRY, build_sae, config_class, formats
from saepipe.sae.formats import check_compatible, export_sae, load_sae
from saepipe.stages import export as export_stage
from saepipe.stages import upload as upload_stage
from saepipe.training.checkpoints import BEST, epoch_dir, load_checkpoint, save_checkpoint

SCALE = 0.37
D_IN, D_SAE, K = 16, 64, 4
LAYER, HOOK = 1, "hook_resid_post"
HOOK_SPEC = f"blocks.{LAYER}.{HOOK}"
MODEL = "tiny/model"
ARCHS = sorted(REGISTRY)
HISTORY = [
    {"epoch": 1, "loss": 0.5, "fvu": 0.4, "l0": 5.0, "val_loss": 0.45, "val_fvu": 0.31234, "val_l0": 4.5},
    {"epoch": 2, "loss": 0.3, "fvu": 0.2, "l0": 4.2, "val_loss": 0.25, "val_fvu": 0.12345, "val_l0": 3.875},
]


def trained_sae(sae_type: str, seed: int = 0):
    """An SAE after two real optimizer steps on scaled inputs, then perturbed so nothing is at its init."""
    torch.manual_seed(seed)
    cfg = config_class(sae_type).from_dict(dict(d_in=D_IN, d_sae=D_SAE, k=K, k_aux=8, matryoshka_prefixes=[D_SAE // 4]))
    sae = build_sae(cfg)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for _ in range(2):
        x = SCALE * torch.randn(64, D_IN) * 3
        out = sae(x)
        (out.recon_loss + 0.01 * out.sparsity_loss).backward()
        opt.step()
        opt.zero_grad()
        sae.after_step(out)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.05 * torch.randn_like(p))
        if "threshold" in dict(sae.named_buffers()):  # BatchTopK's running threshold, as after_step would set it
            sae.threshold.copy_(0.05 + 0.2 * torch.rand_like(sae.threshold))
    return sae


def run_state(epoch: int = 2, run_name: str = "r1") -> dict:
    return {
        "epoch": epoch, "step": 10 * epoch, "tokens_seen": 640 * epoch, "best_val_loss": 0.25, "best_epoch": epoch,
        "run": {
            "run_name": run_name, "model_name": MODEL, "hook_layer": LAYER, "hook_name": HOOK, "hook_spec": HOOK_SPEC,
            "d_in": D_IN, "activation_scale": SCALE, "normalize_activations": True, "dtype": "float32",
            "prepend_bos": True, "context_size": 128,
            "train_config": {"run_name": run_name, "num_epochs": 2, "lr": 5e-4},
            "data": {"activation_cache": "data/activations/activations.h5", "train_rows": 1000},
            "code": {"saepipe": "0.1.0", "git_commit": None},
        },
    }


def make_checkpoint(path: Path, sae_type: str, epoch: int = 2, run_name: str = "r1"):
    save_checkpoint(path, trained_sae(sae_type), run_state(epoch, run_name), HISTORY[:epoch],
                    {"last_fired": torch.zeros(D_SAE)})
    return load_checkpoint(path)


def export(ckpt, out: Path) -> None:
    export_sae(ckpt.sae, ckpt.run_record(), ckpt.history, out, ckpt.identity())


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
    assert config["hook_spec"] == HOOK_SPEC and config["model_name"] == MODEL and config["run_name"] == "r1"
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
    check_compatible(sae, d_model=D_IN, hook_spec=HOOK_SPEC, model_name=MODEL)
    with pytest.raises(UserError, match=rf"was trained on {HOOK_SPEC}, not blocks\.3\.hook_resid_post$"):
        check_compatible(sae, hook_spec="blocks.3.hook_resid_post")
    with pytest.raises(UserError, match="d_model is 32"):
        check_compatible(sae, d_model=32)
    with pytest.raises(UserError, match="trained on model tiny/model, not other/model"):
        check_compatible(sae, model_name="other/model")
    with pytest.raises(UserError) as err:
        check_compatible(sae, hook_spec="blocks.3.hook_resid_post")
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


# ---- Hugging Face ---------------------------------------------------------------------------------------------
FAKE_TOKEN = "hf_FAKEtoken0123456789abcdefSECRET"


@pytest.fixture
def hub(monkeypatch):
    """Mock HfApi.create_repo / upload_folder; records calls and the uploaded folder's files."""
    import huggingface_hub

    calls: dict = {"error": None}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = {"repo_id": repo_id, **kwargs}

    def upload_folder(self, **kwargs):
        folder = Path(kwargs["folder_path"])
        calls["upload_folder"] = kwargs
        calls["files"] = {p.name: p.read_bytes() for p in folder.iterdir()}
        if calls["error"] is not None:
            raise calls["error"]

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.delenv("SAE_HF_REPO_ID", raising=False)
    return calls


def test_upload_sends_the_export_with_a_model_card(tmp_path, hub) -> None:
    ckpt = make_checkpoint(tmp_path / "ckpt", "batch_topk")
    out = tmp_path / "sae" / "r1"
    export(ckpt, out)
    url = hf.upload_sae(out, "me/saes", private=True)
    assert hub["create_repo"] == {"repo_id": "me/saes", "private": True, "exist_ok": True, "repo_type": "model"}
    assert hub["upload_folder"]["repo_id"] == "me/saes" and hub["upload_folder"]["path_in_repo"] == "r1"
    assert set(hub["files"]) == {"README.md", "weights.pt", "config.json", "history.json", "cfg.json",
                                 "sae_weights.safetensors"}
    card = hub["files"]["README.md"].decode()
    for text in (MODEL, HOOK_SPEC, "batch_topk", "jumprelu", f"{D_IN} -> {D_SAE}", "| val_fvu | 0.1235 |",
                 "| val_l0 | 3.875 |", "saepipe.load_sae", "SAE.from_pretrained", "SAE.load_from_disk",
                 f"| k (active latents per token, batch average) | {K} |"):
        assert text in card, text
    assert not (out / "README.md").exists()  # the export itself is untouched
    assert url.endswith("me/saes/tree/main/r1")


def test_upload_errors_never_show_the_token(tmp_path, hub, capsys, caplog) -> None:
    import httpx
    from huggingface_hub.errors import HfHubHTTPError

    caplog.set_level(logging.DEBUG)
    ckpt = make_checkpoint(tmp_path / "ckpt", "topk")
    out = tmp_path / "sae" / "r1"
    export(ckpt, out)
    request = httpx.Request("POST", "https://huggingface.co/api/repos/create")
    hub["error"] = HfHubHTTPError(f"401 Client Error: bad token {FAKE_TOKEN}\nmore detail {FAKE_TOKEN}",
                                  response=httpx.Response(401, request=request))
    with pytest.raises(UserError) as err:
        hf.upload_sae(out, "me/saes", private=False)
    message = str(err.value)
    assert "me/saes" in message and "401" in message and "\n" not in message
    everything = [message, "".join(traceback.format_exception(err.value)), *capsys.readouterr(),
                  *(r.getMessage() for r in caplog.records)]
    assert not any(FAKE_TOKEN in text for text in everything)
    hub["error"] = RuntimeError(f"connection reset while sending Authorization: Bearer {FAKE_TOKEN}")
    with pytest.raises(UserError) as err:
        hf.upload_sae(out, "me/saes", private=False, token=FAKE_TOKEN)
    assert FAKE_TOKEN not in str(err.value) and "***" in str(err.value)


def test_upload_needs_a_repo_id(tmp_path, hub, monkeypatch) -> None:
    with pytest.raises(UserError, match=r"export\.hf_repo_id"):
        hf.upload_sae(tmp_path, None, private=False)
    monkeypatch.setenv("SAE_HF_REPO_ID", "env/repo")
    assert hf.resolve_repo_id(None) == "env/repo"
    with pytest.raises(UserError, match="expected 'user/name'"):
        hf.resolve_repo_id("no-slash")


# ---- stages and CLI ---------------------------------------------------------------------------------------------
@pytest.fixture
def stage_params(tmp_path, repo_params):
    params = with_section(repo_params, "train", run_name="r1", output_dir=str(tmp_path / "ckpts"))
    return with_section(params, "export", output_dir=str(tmp_path / "sae"), checkpoint="best", upload_to_hf=False,
                        hf_repo_id=None, hf_private=False)


def test_export_stage_best_and_last(tmp_path, stage_params, capsys) -> None:
    run_dir = tmp_path / "ckpts" / "r1"
    with pytest.raises(UserError, match="run `saepipe train` first"):
        export_stage.run(stage_params)
    make_checkpoint(epoch_dir(run_dir, 1), "topk", epoch=1)
    make_checkpoint(run_dir / BEST, "topk", epoch=1)
    make_checkpoint(epoch_dir(run_dir, 2), "topk", epoch=2)
    export_stage.run(stage_params)
    line = capsys.readouterr().out.strip()
    assert line == (f"exported topk SAE {D_IN}->{D_SAE} on {HOOK_SPEC} (epoch 1, val FVU 0.3123, val L0 4.5) "
                    f"to {tmp_path / 'sae' / 'r1'}")
    export_stage.run(with_section(stage_params, "export", checkpoint="last"))
    assert "(epoch 2, val FVU 0.1235, val L0 3.875)" in capsys.readouterr().out
    assert json.loads((tmp_path / "sae" / "r1" / "config.json").read_text())["checkpoint"]["epoch"] == 2


def test_upload_stage(tmp_path, stage_params, hub, capsys) -> None:
    with pytest.raises(UserError, match="run `saepipe export` first"):
        upload_stage.run(with_section(stage_params, "export", hf_repo_id="me/saes"))
    make_checkpoint(tmp_path / "ckpts" / "r1" / BEST, "batch_topk")
    params = with_section(stage_params, "export", upload_to_hf=True, hf_repo_id="me/saes", hf_private=True)
    export_stage.run(params)
    assert hub["create_repo"]["private"] is True and hub["upload_folder"]["path_in_repo"] == "r1"
    hub.clear()
    hub["error"] = None
    upload_stage.run(params)
    assert hub["upload_folder"]["repo_id"] == "me/saes"
    assert FAKE_TOKEN not in capsys.readouterr().out
    with pytest.raises(UserError, match=r"export\.hf_repo_id"):
        upload_stage.run(with_section(params, "export", hf_repo_id=None))


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
