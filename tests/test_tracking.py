"""Tracker: dvclive files for DVC, and a real offline W&B run read back from its local transaction log."""

from __future__ import annotations

import csv
import json
import struct
import sys
import time
from pathlib import Path

import pytest

from helpers import with_section
from saepipe.training.tracking import Tracker, wandb_name

FAKE_KEY = "fakefakefake0123456789abcdefabcdef012345"  # 40 characters, like a real key
EPOCHS = [{"loss": 3.0, "recon_loss": 2.5, "val_loss": 3.5}, {"loss": 2.0, "recon_loss": 1.5, "val_loss": 2.25},
          {"loss": 1.0, "recon_loss": 0.75, "val_loss": 1.5}]


def train_config(repo_params, **changes):
    return with_section(repo_params, "train", run_name="tiny-run", **changes).train


def test_wandb_names():
    assert wandb_name("loss") == "train/loss"
    assert wandb_name("val_loss") == "val/loss"
    assert wandb_name("val_dead_features") == "val/dead_features"
    assert wandb_name("block_mse_layer3") == "train/block_mse_layer3"


@pytest.mark.parametrize("changes", [{"wandb": False}, {"wandb": True, "wandb_mode": "disabled"}])
def test_dvclive_files_without_wandb(tmp_path, monkeypatch, repo_params, changes):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "wandb", None)  # any `import wandb` would now raise ImportError
    with Tracker(train_config(repo_params, **changes), tmp_path / "run", {"model": "tiny"}) as tracker:
        for epoch, metrics in enumerate(EPOCHS, start=1):
            tracker.log_epoch(epoch, metrics)
        tracker.log_final_artifact(tmp_path / "export")

    live = tmp_path / "run" / "live"  # inside the run's own folder, never ./dvclive
    summary = json.loads((live / "metrics.json").read_text())
    assert summary == {"train": {"loss": 1.0, "recon_loss": 0.75}, "val": {"loss": 1.5}, "step": len(EPOCHS)}
    for name in EPOCHS[0]:
        tracked = wandb_name(name)  # train/loss, val/loss: the file's column is the last part
        with open(live / "plots" / "metrics" / f"{tracked}.tsv") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        assert [int(r["step"]) for r in rows] == [1, 2, 3]
        assert [float(r[tracked.split("/")[1]]) for r in rows] == [m[name] for m in EPOCHS]
    assert not (tmp_path / "dvc.yaml").exists() and not (live / "dvc.yaml").exists()
    assert not (tmp_path / "dvclive").exists()
    assert not (tmp_path / "run" / "wandb").exists()


# ---- W&B offline ------------------------------------------------------------------------------------------
def wandb_records(run_dir: Path) -> list:
    """The records of an offline run's `run-<id>.wandb` log.

    wandb 0.31 writes no `files/wandb-summary.json` offline (summary, history and artifacts live only in
    this log) and no longer ships a Python reader, so this decodes the LevelDB-style framing: a 7-byte
    header (":W&B", 0xBEE1, version 0), then 32 KiB blocks of chunks, each `<crc32 u32, length u16, type u8>`
    + data (type 1 = full, 2/3/4 = first/middle/last), whose payloads are wandb's own protobuf Records.
    """
    from wandb.proto import wandb_internal_pb2

    (log,) = run_dir.glob("run-*.wandb")
    data = log.read_bytes()
    assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0)
    records, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        room = 32768 - pos % 32768
        if room < 7:  # block trailer padding
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if pos + 7 + length > len(data):  # still being written
            break
        if kind == 0:  # zero padding up to the end of the block
            pos += room
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def of_type(records: list, kind: str) -> list:
    return [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]


def final_summary(records: list) -> dict:
    summary = {}
    for record in of_type(records, "summary"):
        for item in record.update:
            summary[item.key or ".".join(item.nested_key)] = json.loads(item.value_json)
    return summary


@pytest.fixture
def offline_env(tmp_path, monkeypatch):
    wandb_dir = tmp_path / "wandb_home"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_DIR", str(wandb_dir))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    for var, folder in [("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data")]:
        monkeypatch.setenv(var, str(tmp_path / "wandb_state" / folder))  # artifact staging, core logs
    monkeypatch.delenv("WANDB_MODE", raising=False)
    return wandb_dir


def finished_run_records(wandb_dir: Path, timeout: float = 20.0) -> list:
    """The records of the one offline run under `wandb_dir`, once its log holds the exit record.

    `run.finish()` returns before wandb-core has flushed the log (it buffers, then writes at the end),
    so a reader straight after `finish()` can find an empty or partial file.
    """
    (run_dir,) = (wandb_dir / "wandb").glob("offline-run-*")
    deadline = time.monotonic() + timeout
    while True:
        records = wandb_records(run_dir)
        if of_type(records, "exit") or time.monotonic() > deadline:
            return records
        time.sleep(0.1)


def test_wandb_offline_run(tmp_path, repo_params, offline_env, capfd):
    cfg = train_config(repo_params, wandb=True, wandb_mode="offline", wandb_project="saepipe-test",
                       wandb_group="g1", wandb_tags=["tiny", "test"], wandb_notes="offline check",
                       wandb_log_final_artifact=True)
    run_dir = tmp_path / "runs" / "tiny-run"
    checkpoint = run_dir / "checkpoints" / "checkpoint_epoch1.pt"
    checkpoint.mkdir(parents=True)
    (checkpoint / "optimizer.pt").write_bytes(b"never uploaded")
    export = tmp_path / "sae" / "tiny-run"
    export.mkdir(parents=True)
    (export / "sae.safetensors").write_bytes(b"weights")
    (export / "cfg.json").write_text("{}")

    with Tracker(cfg, run_dir, {"model": "tiny", "hook": "blocks.0.hook_resid_post", "api_key": FAKE_KEY}) as t:
        for epoch, metrics in enumerate(EPOCHS, start=1):
            t.log_epoch(epoch, metrics)
        with pytest.raises(ValueError, match="checkpoint"):
            t.log_final_artifact(checkpoint)
        t.log_final_artifact(export)
        t.close({"status": "finished", "best_epoch": 3, "model_path": export})

    records = finished_run_records(offline_env)
    (info,) = of_type(records, "run")
    assert (info.project, info.run_group, info.notes, list(info.tags)) == ("saepipe-test", "g1", "offline check",
                                                                          ["tiny", "test"])
    config = {item.key: json.loads(item.value_json) for item in info.config.update}
    assert config["model"] == "tiny" and config["train"]["wandb_project"] == "saepipe-test"
    assert "api_key" not in config

    summary = final_summary(records)
    assert summary["train/loss"] == EPOCHS[-1]["loss"] and summary["val/loss"] == EPOCHS[-1]["val_loss"]
    assert summary["train/recon_loss"] == EPOCHS[-1]["recon_loss"]
    assert summary["status"] == "finished" and summary["best_epoch"] == 3
    assert summary["model_path"] == str(export)
    assert summary["local_model_path"] == str(export.resolve())
    history = [{i.key or ".".join(i.nested_key): json.loads(i.value_json) for i in h.item}
               for h in of_type(records, "history")]
    assert [h["_step"] for h in history] == [1, 2, 3]
    assert [h["val/loss"] for h in history] == [m["val_loss"] for m in EPOCHS]

    (artifact,) = of_type(records, "artifact")  # the export, and nothing else
    assert artifact.type == "model" and artifact.name == "sae-tiny-run"
    assert sorted(c.path for c in artifact.manifest.contents) == ["cfg.json", "sae.safetensors"]
    assert not any(f.path.endswith(".pt") or "checkpoint" in f.path
                   for r in of_type(records, "files") for f in r.files)
    assert of_type(records, "exit")[0].exit_code == 0

    out, err = capfd.readouterr()
    assert FAKE_KEY not in out + err
    for path in tmp_path.rglob("*"):
        assert not path.is_file() or FAKE_KEY.encode() not in path.read_bytes(), path
    assert json.loads((run_dir / "live" / "metrics.json").read_text())["val"]["loss"] == EPOCHS[-1]["val_loss"]


def test_wandb_failed_run_and_no_artifact_unless_asked(tmp_path, repo_params, offline_env):
    cfg = train_config(repo_params, wandb=True, wandb_mode="offline", wandb_log_final_artifact=False)
    export = tmp_path / "export"
    export.mkdir()
    (export / "sae.safetensors").write_bytes(b"weights")
    with pytest.raises(RuntimeError, match="boom"), Tracker(cfg, tmp_path / "run", {}) as tracker:
        tracker.log_epoch(1, EPOCHS[0])
        tracker.log_final_artifact(export)
        raise RuntimeError("boom")

    records = finished_run_records(offline_env)
    assert of_type(records, "artifact") == []
    summary = final_summary(records)
    assert summary["status"] == "failed" and summary["error"] == "RuntimeError"
    assert summary["train/loss"] == EPOCHS[0]["loss"]
    assert of_type(records, "exit")[0].exit_code == 1


def test_wandb_init_failure_is_a_user_error_without_the_key(tmp_path, repo_params, offline_env, monkeypatch, capfd):
    import wandb

    from saepipe.errors import UserError

    def no_server(**kwargs):  # what an online run without a usable login ends in, minus the network
        raise wandb.errors.UsageError(f"api key {FAKE_KEY} rejected\ndetails")

    monkeypatch.setattr(wandb, "init", no_server)
    cfg = train_config(repo_params, wandb=True, wandb_mode="online")
    with pytest.raises(UserError, match="wandb login") as info:
        Tracker(cfg, tmp_path / "run", {})
    assert FAKE_KEY not in str(info.value) and "UsageError" in str(info.value)
    out, err = capfd.readouterr()
    assert FAKE_KEY not in out + err


def test_dvclive_resume_continues_and_a_fresh_run_starts_over(tmp_path, repo_params) -> None:
    run_dir = tmp_path / "runs" / "r"
    with Tracker(train_config(repo_params), run_dir, {}) as tracker:
        for epoch, metrics in enumerate(EPOCHS[:2], start=1):
            tracker.log_epoch(epoch, metrics)
    with Tracker(train_config(repo_params, resume=True), run_dir, {}) as tracker:  # `saepipe train --resume`
        tracker.log_epoch(3, EPOCHS[2])
    loss = run_dir / "live" / "plots" / "metrics" / "train" / "loss.tsv"
    with open(loss) as f:
        assert [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f, delimiter="\t")] == [
            (1, 3.0), (2, 2.0), (3, 1.0)]
    with Tracker(train_config(repo_params), run_dir, {}) as tracker:  # a fresh run replaces the old curves
        tracker.log_epoch(1, EPOCHS[0])
    with open(loss) as f:
        assert [int(r["step"]) for r in csv.DictReader(f, delimiter="\t")] == [1]


def test_wandb_is_off_by_default(repo_params) -> None:
    assert repo_params.train.tracking.wandb is False and not repo_params.train.tracking.enabled


def test_train_stage_with_wandb_offline_keeps_its_files_in_the_run_folder(trained_pipeline, offline_env,
                                                                          monkeypatch, tmp_path) -> None:
    from helpers import with_section
    from saepipe.paths import run_dir
    from saepipe.stages import train

    monkeypatch.delenv("WANDB_DIR")  # the default: W&B writes beside the run's checkpoints and live metrics
    params = with_section(trained_pipeline, "train", run_name="wandb-run", wandb=True, wandb_mode="offline",
                          wandb_project="saepipe-test", wandb_log_final_artifact=True)
    train.run(params)
    folder = run_dir(params)
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoints", "live", "wandb"]
    records = finished_run_records(folder)
    (info,) = of_type(records, "run")
    assert info.project == "saepipe-test" and info.display_name == "wandb-run"
    (artifact,) = of_type(records, "artifact")  # the final export only
    assert {"cfg.json", "sae_weights.safetensors", "weights.pt", "config.json"} <= {
        c.path for c in artifact.manifest.contents}
    assert final_summary(records)["status"] == "finished"
    assert not (tmp_path / "wandb").exists() and not (Path.cwd() / "wandb").exists()


def test_validations_between_epochs_join_the_val_curves_on_the_training_step_axis(tmp_path, repo_params) -> None:
    """The trainer logs each epoch at the step it ended on and validations between epoch ends at theirs: one
    val/<name>.tsv with both, in step order; train/ curves and metrics.json's summary hold the epochs' values."""
    with Tracker(train_config(repo_params), tmp_path / "run", {}) as tracker:
        tracker.log_validation(4, {"epoch": 0.5, "val_loss": 2.5, "inference_threshold": 0.1})
        tracker.log_epoch(1, EPOCHS[0], step=8)
        tracker.log_validation(12, {"epoch": 1.5, "val_loss": 1.8})
        tracker.log_epoch(2, EPOCHS[1], step=16)
    plots = tmp_path / "run" / "live" / "plots" / "metrics"
    with open(plots / "val" / "loss.tsv") as f:
        assert [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f, delimiter="\t")] == [
            (4, 2.5), (8, EPOCHS[0]["val_loss"]), (12, 1.8), (16, EPOCHS[1]["val_loss"])]
    with open(plots / "train" / "loss.tsv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f, delimiter="\t")] == [8, 16]
    assert not (plots / "train" / "epoch.tsv").exists() and not (plots / "train" / "inference_threshold.tsv").exists()
    summary = json.loads((tmp_path / "run" / "live" / "metrics.json").read_text())
    assert summary["val"]["loss"] == EPOCHS[1]["val_loss"] and summary["step"] == 16
