"""SIGKILL at a seeded random point of a real `saepipe` process: nothing left that looks complete, and a rerun finishes.

Each test runs the CLI as a subprocess on a tiny project, kills it (SIGKILL: no handler, no cleanup) once its progress
bar or its output reaches a point drawn from a seeded generator, then checks that no final output appeared, that the
next stage refuses to start, and that a rerun (`--resume` for train) gives what an uninterrupted run gives.
"""

from __future__ import annotations

import os
import random
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from tiny_project import make_project

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
SEED = 11
PERCENT = re.compile(r"(\d+)%\|")


def env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1"}


def saepipe(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "saepipe"), *args], cwd=cwd, env=env(), capture_output=True, text=True,
                          timeout=600)


def run_and_kill(args: list[str], cwd: Path, reached, delay: float = 0.0) -> str:
    """Start `saepipe args`, SIGKILL it `delay` seconds after `reached(output so far)` is true; its output."""
    proc = subprocess.Popen([str(BIN / "saepipe"), *args], cwd=cwd, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    output = b""
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 0.05)
            if ready:
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                output += chunk
                if reached(output.decode(errors="replace")):
                    time.sleep(delay)
                    proc.send_signal(signal.SIGKILL)
                    break
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = output.decode(errors="replace")
    assert proc.returncode == -signal.SIGKILL, f"the stage ended before it was killed:\n{text}"
    return text


def at_percent(target: int):
    return lambda out: max((int(p) for p in PERCENT.findall(out)), default=0) >= target


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*.tmp")] if folder.is_dir() else []


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir, tiny_training_text) -> Path:
    root = make_project(tmp_path_factory.mktemp("kill") / "project", tiny_model_dir, tiny_training_text,
                        chapters=3, repeat=4, train={"batch_size": 32, "num_epochs": 4})
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["activations"]["activation_batch_size"] = 2  # many small batches: the bar moves in small steps
    params["activation_db"]["batch_size"] = 16
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for stage in ("process", "tokenize", "activations", "train", "export", "activation-db"):
        result = saepipe([stage], root)
        assert result.returncode == 0, result.stderr
    return root


def h5_datasets(path: Path) -> dict[str, np.ndarray]:
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


def assert_same_h5(a: Path, b: Path) -> None:
    first, second = h5_datasets(a), h5_datasets(b)
    assert first.keys() == second.keys()
    for name in first:
        assert np.array_equal(first[name], second[name]), name


def test_activations_killed_leaves_nothing_and_a_rerun_finishes(project: Path, tmp_path: Path) -> None:
    cache = project / "data/activations/activations.h5"
    reference = tmp_path / "reference.h5"
    shutil.copy(cache, reference)
    cache.unlink()
    (project / "data/activations/stats.json").unlink()
    percent = random.Random(SEED).randint(10, 80)
    run_and_kill(["activations"], project, at_percent(percent))
    assert not cache.exists() and not (project / "data/activations/stats.json").exists()
    result = saepipe(["train", "--run-name", "after-kill"], project)
    assert result.returncode == 2 and "activation cache: file not found" in result.stderr
    assert saepipe(["activations"], project).returncode == 0
    assert_same_h5(cache, reference)
    assert temporaries(project / "data/activations") == []  # the killed run's temporary was removed


def test_activations_killed_while_replacing_keeps_the_previous_cache(project: Path) -> None:
    cache = project / "data/activations/activations.h5"
    before = cache.read_bytes()
    percent = random.Random(SEED + 1).randint(10, 80)
    run_and_kill(["activations", "--storage-dtype", "float32"], project, at_percent(percent))
    assert cache.read_bytes() == before


def test_train_killed_then_resumed_equals_an_uninterrupted_run(project: Path) -> None:
    rng = random.Random(SEED)
    epoch, delay = rng.randint(1, 2), rng.uniform(0.0, 0.3)
    run_and_kill(["train", "--run-name", "killed"], project, lambda out: f"epoch {epoch}: loss" in out, delay)
    run_dir = project / "models/runs/killed/checkpoints"
    (project / "killed.yaml").write_text("train:\n  run_name: killed\nexport:\n  output_dir: models/sae\n")
    refused = saepipe(["export", "--params", "killed.yaml"], project)
    assert refused.returncode == 2 and "training stopped after epoch" in refused.stderr, refused.stderr
    assert not (project / "models/sae/killed").exists()
    resumed = saepipe(["train", "--run-name", "killed", "--resume"], project)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {run_dir.relative_to(project)} from checkpoint_epoch" in resumed.stdout
    assert temporaries(run_dir) == []
    reference = project / "models/runs/default/checkpoints"
    for checkpoint in ("checkpoint_epoch4.pt", "best_model.pt"):
        ours, theirs = load_file(run_dir / checkpoint / "sae.safetensors"), load_file(
            reference / checkpoint / "sae.safetensors")
        assert ours.keys() == theirs.keys()
        for name in ours:
            assert torch.equal(ours[name], theirs[name]), (checkpoint, name)
    assert saepipe(["export", "--params", "killed.yaml"], project).returncode == 0


def test_activation_db_killed_leaves_nothing_and_a_rerun_finishes(project: Path, tmp_path: Path) -> None:
    db = project / "analysis/default/activation_db.h5"
    reference = tmp_path / "reference.h5"
    shutil.copy(db, reference)
    db.unlink()
    percent = random.Random(SEED + 2).randint(10, 80)
    run_and_kill(["activation-db"], project, at_percent(percent))
    assert not db.exists()
    result = saepipe(["matrices"], project)
    assert result.returncode == 2 and "activation_db.h5" in result.stderr, result.stderr
    assert saepipe(["activation-db"], project).returncode == 0
    assert_same_h5(db, reference)
    assert temporaries(project / "analysis/default") == []
