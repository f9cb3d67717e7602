"""Publishing an export to the Hugging Face Hub (the hub's HTTP API mocked: it is out of reach here)."""

from __future__ import annotations

import logging
import traceback
from pathlib import Path

import pytest

from helpers import with_section, write_params
from saepipe.errors import UserError
from saepipe.paths import checkpoints_dir, export_dir
from saepipe.publish import hf
from saepipe.stages import export as export_stage
from saepipe.stages import upload as upload_stage
from saepipe.training.checkpoints import BEST
from saved_saes import D_IN, D_SAE, HOOK_SPEC, MODEL, K, export, make_checkpoint

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


def test_upload_stage(tmp_path, export_params, hub, capsys) -> None:
    with pytest.raises(UserError, match="run `saepipe export` first"):
        upload_stage.run(with_section(export_params, "export", hf_repo_id="me/saes"))
    make_checkpoint(checkpoints_dir(export_params) / BEST, "batch_topk")
    params = with_section(export_params, "export", upload_to_hf=True, hf_repo_id="me/saes", hf_private=True)
    export_stage.run(params)
    assert hub["create_repo"]["private"] is True and hub["upload_folder"]["path_in_repo"] == "r1"
    hub.clear()
    hub["error"] = None
    upload_stage.run(params)
    assert hub["upload_folder"]["repo_id"] == "me/saes"
    assert FAKE_TOKEN not in capsys.readouterr().out
    with pytest.raises(UserError, match=r"export\.hf_repo_id"):
        upload_stage.run(with_section(params, "export", hf_repo_id=None))




@pytest.fixture
def no_token(hub, monkeypatch, tmp_path):
    """No token anywhere huggingface_hub looks: not in the environment, no stored `hf auth login` file."""
    import huggingface_hub.constants

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-here"))
    return hub


def test_upload_without_a_token_stops_before_the_network(tmp_path, export_params, no_token, capsys) -> None:
    """`saepipe upload` (and export's upload) with no token: exit 2, one line naming both remedies, no hub call
    (the old code reached the network and reported `Name or service not known`), and export writes nothing."""
    from saepipe.cli import main

    make_checkpoint(checkpoints_dir(export_params) / BEST, "batch_topk")
    export_stage.run(export_params)
    exported = {p: p.stat().st_mtime_ns for p in export_dir(export_params).iterdir()}
    params_yaml = write_params(with_section(export_params, "export", hf_repo_id="me/saes"), tmp_path / "p.yaml")
    capsys.readouterr()
    for argv in (["upload"], ["export", "--upload-to-hf"]):
        code = main([*argv, "--params", params_yaml])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1, (argv, err)
        assert "no Hugging Face token" in err[0] and "HF_TOKEN" in err[0] and "hf auth login" in err[0]
        assert "create_repo" not in no_token and "upload_folder" not in no_token
    assert {p: p.stat().st_mtime_ns for p in export_dir(export_params).iterdir()} == exported


def test_a_stored_login_token_is_enough(tmp_path, no_token, monkeypatch) -> None:
    """The token `hf auth login` stored counts, and is what the upload uses."""
    import huggingface_hub.constants

    stored = tmp_path / "token"
    stored.write_text(FAKE_TOKEN)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(stored))
    assert hf.resolve_token(None) == FAKE_TOKEN
    assert hf.resolve_token("hf_explicit") == "hf_explicit"
