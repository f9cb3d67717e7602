"""Stages `train` and `export` on the tiny model's activation cache, and the exported SAE against the model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import with_section
from saepipe.activations.cache import ActivationCache
from saepipe.cli import main
from saepipe.errors import UserError
from saepipe.model.loading import load_hooked_model
from saepipe.paths import checkpoints_dir
from saepipe.sae.formats import check_compatible, load_sae
from saepipe.stages import activations, export, tokenize, train


@pytest.fixture
def cached(tiny_params, tmp_path):
    params = with_section(tiny_params, "train", sae_expansion=2, topk=4, topk_aux=8, batch_size=64, num_epochs=2,
                          lr_warmup_steps=2, device="cpu", output_dir=str(tmp_path / "checkpoints"))
    params = with_section(params, "export", output_dir=str(tmp_path / "sae"))
    tokenize.run(params)
    activations.run(params)
    return params


def test_train_then_export_gives_an_sae_that_fits_the_model(cached, capsys) -> None:
    train.run(cached)
    out = capsys.readouterr().out
    assert "best epoch" in out
    run_dir = Path(cached.train.output_dir) / "default"
    assert {p.name for p in run_dir.iterdir()} == {"checkpoints", "live"}  # siblings: DVC out, dvclive (paths.py)
    assert {p.name for p in (run_dir / "checkpoints").iterdir()} >= {"checkpoint_epoch1.pt", "checkpoint_epoch2.pt",
                                                                      "best_model.pt"}
    state = json.loads((run_dir / "checkpoints" / "checkpoint_epoch2.pt" / "state.json").read_text())
    assert json.loads((run_dir / "live" / "metrics.json").read_text())["step"] == state["step"]  # training steps
    export.run(cached)
    sae_dir = Path(cached.export.output_dir) / "default"
    sae = load_sae(sae_dir)
    config = json.loads((sae_dir / "config.json").read_text())
    assert config["hook"] == "blocks.0.hook_resid_post" and config["d_sae"] == 128
    assert config["training"]["topk"] == 4
    assert config["data"]["activation_cache_sha256"]

    bridge = load_hooked_model(cached.base_model.output_dir, device=torch.device("cpu"))
    check_compatible(sae, d_model=bridge.cfg.d_model, hook="blocks.0.hook_resid_post")
    with pytest.raises(UserError, match=r"blocks\.0\.hook_resid_post"):
        check_compatible(sae, hook="blocks.1.hook_resid_post")
    with pytest.raises(UserError, match="d_model"):
        check_compatible(sae, d_model=32)

    # the export takes raw activations: its validation FVU matches the last epoch's val_fvu
    with ActivationCache(Path(cached.activations.output_dir) / "activations.h5") as cache:
        x = cache.read("validation")[torch.from_numpy(~cache.column("validation", "outlier"))]
    with torch.no_grad():
        x_hat = sae.decode(sae.encode(x)).double()
    fvu = ((x - x_hat).pow(2).sum() / (x.double() - x.double().mean(0)).pow(2).sum()).item()
    history = json.loads((sae_dir / "history.json").read_text())
    best = min(history, key=lambda r: r["val_loss"])
    assert fvu == pytest.approx(best["val_fvu"], rel=1e-3)


def test_end_to_end_losses_train_through_the_model(cached) -> None:
    params = with_section(cached, "train", use_end_to_end=True, use_logit_kl=True, use_block_mse=True,
                          end_to_end_windows=2, num_epochs=1)
    params = with_section(params, "activations", hook_layer=0)
    train.run(params)
    history = json.loads((checkpoints_dir(params) / "history.json").read_text())
    record = history[-1]
    assert record["logit_kl"] > 0 and record["block_mse"] > 0
    assert "block_mse_layer1" in record and "kl_contribution" in record


def test_train_user_errors(cached, tmp_path, capsys) -> None:

    import yaml

    def params_file(params) -> str:
        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump(params.to_dict()))
        return str(path)

    path = params_file(cached)
    assert main(["train", "--params", path, "--topk", "1000"]) == 2
    assert "train.topk=1000: expected an integer below d_sae = 128" in capsys.readouterr().err
    missing = with_section(cached, "activations", output_dir=str(tmp_path / "none"))
    assert main(["train", "--params", params_file(missing)]) == 2
    err = capsys.readouterr().err
    assert "run `saepipe activations` first" in err and err.count("\n") == 1
    assert main(["export", "--params", params_file(cached)]) == 2
    assert "saepipe train" in capsys.readouterr().err
