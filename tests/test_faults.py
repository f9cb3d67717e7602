"""Faults injected into real runs: damaged files, NaN and Inf, a full disk, stale temporaries.

The stages run through `saepipe.cli.main` on a tiny project built once per module (chapters -> export ->
activation DB); each test damages its own copies under cases/ and points the stage at them with a params file.
A full disk is a real one: a 1-MiB tmpfs mounted over the output folder in a private mount namespace
(`unshare -rm`), skipped where the kernel does not allow that. Killing stages with SIGKILL is in
test_faults_kill.py (slow).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from saepipe.cli import main
from saepipe.errors import UserError
from saepipe.storage import atomic_dir, atomic_path, write_json
from saepipe.training.checkpoints import load_checkpoint, save_checkpoint
from tiny_project import make_project

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir, tiny_training_text) -> Path:
    root = make_project(tmp_path_factory.mktemp("faults") / "project", tiny_model_dir, tiny_training_text,
                        train={"num_epochs": 2})
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        for stage in ("process", "tokenize", "activations", "train", "export", "activation-db"):
            assert main([stage]) == 0, stage
    return root


def one_line_error(argv: list[str], capsys) -> str:
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.split("\n") if line.strip() and "%|" not in line]  # progress bars may precede
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree_digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): sha(p) for p in sorted(path.rglob("*")) if p.is_file()}


# ---- damaged files --------------------------------------------------------------------------------------------
def truncate_half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def truncate_head(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def zero_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[:512] = bytes(min(512, len(data)))
    path.write_bytes(bytes(data))


def empty(path: Path) -> None:
    path.write_bytes(b"")


DAMAGE = {"truncated to half": truncate_half, "truncated to 100 bytes": truncate_head,
          "header zeroed": zero_header, "empty": empty}
BINARY = bytes(range(256)) * 4


def foreign(path: Path) -> None:
    """Content of another kind: JSON of the wrong shape in a JSON file, bytes of no format in a binary one."""
    path.write_bytes(b'["not", "what", "was", "written"]\n' if path.suffix in (".json", ".jsonl") else BINARY)


READER_DAMAGE = {**DAMAGE, "foreign content": foreign}

# (what, stage argv, params file text, the file to copy from the project, where the copy goes)
TARGETS = {
    "token cache": (["activations", "--params", "cases/p.yaml"],
                    "tokenize:\n  output: cases/tokens.h5\nactivations:\n  output_dir: cases/acts\n",
                    "data/tokens.h5", "cases/tokens.h5"),
    "activation cache": (["train", "--params", "cases/p.yaml"],
                         "activations:\n  output_dir: cases/acts\ntrain:\n  output_dir: cases/ckpts\n",
                         "data/activations/activations.h5", "cases/acts/activations.h5"),
    "weights.pt": (["evaluate", "--sae-path", "cases/sae"], "", "models/sae/default", "cases/sae"),
    "sae_weights.safetensors": (["evaluate", "--sae-path", "cases/sae"], "", "models/sae/default", "cases/sae"),
    "checkpoint weights": (["export", "--params", "cases/p.yaml"],
                           "train:\n  output_dir: cases/ckpts\nexport:\n  output_dir: cases/sae_out\n",
                           "models/runs/default/checkpoints", "cases/ckpts/default/checkpoints"),
    "checkpoint optimizer state": (["train", "--params", "cases/p.yaml", "--resume", "--num-epochs", "3"],
                                   "train:\n  output_dir: cases/ckpts\n",
                                   "models/runs/default/checkpoints", "cases/ckpts/default/checkpoints"),
    "activation DB": (["matrices", "--params", "cases/p.yaml"], "evaluate:\n  output_dir: cases/analysis\n",
                      "analysis/default/activation_db.h5", "cases/analysis/default/activation_db.h5"),
}
DAMAGED_FILE = {"weights.pt": "weights.pt", "sae_weights.safetensors": "sae_weights.safetensors",
                "checkpoint weights": "best_model.pt/sae.safetensors",
                "checkpoint optimizer state": "checkpoint_epoch2.pt/optimizer.pt"}


@pytest.mark.parametrize("damage", list(READER_DAMAGE))
@pytest.mark.parametrize("target", list(TARGETS))
def test_a_damaged_file_is_one_line_naming_it(project: Path, target: str, damage: str, capsys,
                                              monkeypatch) -> None:
    monkeypatch.chdir(project)
    argv, params_text, source, copy = TARGETS[target]
    shutil.rmtree(project / "cases", ignore_errors=True)
    (project / copy).parent.mkdir(parents=True)
    if (project / source).is_dir():
        shutil.copytree(project / source, project / copy)
    else:
        shutil.copy(project / source, project / copy)
    if target == "sae_weights.safetensors":
        (project / copy / "weights.pt").unlink()  # so that the SAELens files are the ones read
    damaged = project / copy / DAMAGED_FILE[target] if target in DAMAGED_FILE else project / copy
    READER_DAMAGE[damage](damaged)
    (project / "cases" / "p.yaml").write_text(params_text or "{}\n")
    line = one_line_error(argv, capsys)
    assert str(damaged.relative_to(project)) in line and "`saepipe " in line, line


# ---- damaged inputs of the analysis stages ----------------------------------------------------------------------
WRITER = {".npz": "matrices", ".npy": "matrices", "matrices_metrics.json": "matrices",
          "decoder_similarity_histogram.json": "matrices", "activation_db.h5": "activation-db",
          "feature_summaries.jsonl": "summarize", "quick/": "evaluate", "sae/": "export"}
# stage -> the files it reads, under cases/ (a copy of the SAE at cases/sae/default, of its analyses at
# cases/analysis/default)
READERS = {
    "summarize": ["matrices/similarity_topk.npz", "matrices/cooccurrence_topk.npz", "activation_db.h5"],
    "report": ["matrices/similarity_topk.npz", "matrices/cooccurrence_topk.npz", "matrices/feature_similarity.npy",
               "matrices/feature_cooccurrence_jaccard.npy", "feature_summaries.jsonl", "quick/metrics.json",
               "quick/dead_features.json", "quick/density_histogram.json", "matrices_metrics.json",
               "decoder_similarity_histogram.json", "activation_db.h5", "sae/config.json", "sae/history.json"],
}
ANALYSED = "evaluate:\n  sae_path: cases/sae/default\n  output_dir: cases/analysis\n"


@pytest.fixture(scope="module")
def analysed(project: Path) -> Path:
    """The tiny project with every analysis the report reads (evaluate, matrices, summarize)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(project)
        for stage in ("evaluate", "matrices", "summarize"):
            assert main([stage]) == 0, stage
    return project


def copy_analyses(root: Path) -> None:
    shutil.rmtree(root / "cases", ignore_errors=True)
    shutil.copytree(root / "models/sae/default", root / "cases/sae/default")
    shutil.copytree(root / "analysis/default", root / "cases/analysis/default")
    (root / "cases/p.yaml").write_text(ANALYSED)


def case_path(file: str) -> str:
    return f"cases/sae/default/{file[4:]}" if file.startswith("sae/") else f"cases/analysis/default/{file}"


@pytest.mark.parametrize("damage", list(READER_DAMAGE))
@pytest.mark.parametrize(("stage", "file"), [(stage, file) for stage, files in READERS.items() for file in files])
def test_a_damaged_analysis_input_is_one_line_naming_it_and_its_stage(analysed: Path, stage: str, file: str,
                                                                     damage: str, capsys, monkeypatch) -> None:
    monkeypatch.chdir(analysed)
    copy_analyses(analysed)
    damaged = analysed / case_path(file)
    before = damaged.read_bytes()
    READER_DAMAGE[damage](damaged)
    if damaged.read_bytes() == before:
        pytest.skip(f"{file} is too small for this damage")
    line = one_line_error([stage, "--params", "cases/p.yaml"], capsys)
    assert case_path(file) in line, line
    writer = next(w for key, w in WRITER.items() if key in file or file.endswith(key))
    assert f"saepipe {writer}`" in line, line


@pytest.mark.parametrize(("stage", "file"), [(stage, file) for stage, files in READERS.items() for file in files])
def test_a_missing_analysis_input_is_refused_before_any_work(analysed: Path, stage: str, file: str, capsys,
                                                              monkeypatch) -> None:
    """Every input is checked when the stage starts: nothing is computed (no progress bar) before the line."""
    monkeypatch.chdir(analysed)
    copy_analyses(analysed)
    (analysed / case_path(file)).unlink()
    if file.endswith(".npy"):
        pytest.skip("the dense matrices are optional (the top-k files stand in)")
    capsys.readouterr()
    assert main([stage, "--params", "cases/p.yaml"]) == 2
    err = capsys.readouterr().err
    assert "%|" not in err and err.count("\n") == 1 and case_path(file) in err, err


def test_neighbours_beyond_the_matrices_top_k_are_refused(analysed: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(analysed)
    copy_analyses(analysed)
    k = np.load(analysed / "cases/analysis/default/matrices/similarity_topk.npz")["ids"].shape[1]
    line = one_line_error(["summarize", "--params", "cases/p.yaml", "--neighbours", str(k + 1)], capsys)
    assert f"summarize.neighbours={k + 1}: expected at most the {k} neighbours" in line, line


def test_a_corrupted_json_in_a_checkpoint_is_one_line(project: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(project)
    shutil.rmtree(project / "cases", ignore_errors=True)
    shutil.copytree(project / "models/runs/default/checkpoints", project / "cases/ckpts/default/checkpoints")
    (project / "cases/ckpts/default/checkpoints/best_model.pt/sae_config.json").write_text('{"sae_type": ')
    (project / "cases/p.yaml").write_text("train:\n  output_dir: cases/ckpts\nexport:\n  output_dir: cases/out\n")
    line = one_line_error(["export", "--params", "cases/p.yaml"], capsys)
    assert "cases/ckpts/default/checkpoints/best_model.pt/sae_config.json" in line and "not valid JSON" in line


# ---- NaN and Inf ----------------------------------------------------------------------------------------------
def test_nan_in_the_activation_cache_stops_training_before_it_starts(project: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(project)
    shutil.rmtree(project / "cases", ignore_errors=True)
    (project / "cases/acts").mkdir(parents=True)
    cache = project / "cases/acts/activations.h5"
    shutil.copy(project / "data/activations/activations.h5", cache)
    with h5py.File(cache, "r+") as f:
        outlier = f["train/outlier"][:]
        row = int(np.flatnonzero(~outlier)[7])
        values = f["train/activations"][row]
        values[3] = np.inf
        f["train/activations"][row] = values
    (project / "cases/p.yaml").write_text("activations:\n  output_dir: cases/acts\ntrain:\n  output_dir: cases/ckpts\n")
    line = one_line_error(["train", "--params", "cases/p.yaml"], capsys)
    assert f"cases/acts/activations.h5: train row {row} holds NaN or Inf" in line
    assert not (project / "cases/ckpts").exists()


@pytest.mark.parametrize(("value", "storage", "expected"), [
    (float("nan"), "float32", "the model produced NaN or Inf activations (document 5, position 2"),
    (1e5, "float16", "activations.storage_dtype='float16': expected a dtype that holds these activations"),
])
def test_the_cache_writer_refuses_what_it_cannot_store(tmp_path: Path, value: float, storage: str,
                                                      expected: str) -> None:
    from saepipe.activations.cache import ActivationCacheWriter

    writer = ActivationCacheWriter(tmp_path / "activations.h5", 4, storage, 10.0, {"forward_dtype": "bfloat16"})
    rows = torch.ones(3, 4)
    ids = np.array([4, 5, 6], np.int32)
    writer.append("train", rows, ids, ids, np.array([0, 1, 2], np.int32))
    rows[1, 2] = value
    try:
        with pytest.raises(UserError, match=re.escape(expected)):
            writer.append("train", rows, ids + 1, ids, np.array([1, 2, 3], np.int32))
    finally:
        writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_a_diverging_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(project: Path, capsys,
                                                                               monkeypatch) -> None:
    """lr 1e30 makes the weights overflow within a few steps of the resumed epoch: the loss turns Inf/NaN."""
    monkeypatch.chdir(project)
    shutil.rmtree(project / "cases", ignore_errors=True)
    shutil.copytree(project / "models/runs/default/checkpoints", project / "cases/ckpts/default/checkpoints")
    run_dir = project / "cases/ckpts/default/checkpoints"
    before = tree_digest(run_dir)
    (project / "cases/p.yaml").write_text("train:\n  output_dir: cases/ckpts\nexport:\n  output_dir: cases/sae\n")
    line = one_line_error(["train", "--params", "cases/p.yaml", "--resume", "--num-epochs", "3", "--lr", "1e30"],
                          capsys)
    assert "the loss became" in line and "(epoch 3)" in line
    step = int(line.split(" at step ")[1].split()[0])
    steps_per_epoch = json.loads((run_dir / "checkpoint_epoch2.pt/state.json").read_text())["step"] // 2
    assert 2 * steps_per_epoch < step <= 3 * steps_per_epoch
    assert "cases/ckpts/default/checkpoints/checkpoint_epoch2.pt, is kept" in line
    assert tree_digest(run_dir) == before  # nothing of epoch 3, not even history.json
    # the run is still the 2-epoch run it was: its export has finite weights
    assert main(["export", "--params", "cases/p.yaml"]) == 0
    weights = load_file(project / "cases/sae/default/sae_weights.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_non_finite_weights_are_never_checkpointed_nor_exported(project: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(project)
    shutil.rmtree(project / "cases", ignore_errors=True)
    shutil.copytree(project / "models/runs/default/checkpoints", project / "cases/ckpts/default/checkpoints")
    best = project / "cases/ckpts/default/checkpoints/best_model.pt"
    checkpoint = load_checkpoint(best)
    with torch.no_grad():
        checkpoint.sae.W_enc[0, 0] = float("nan")
    before = tree_digest(best)
    with pytest.raises(UserError, match=r"best_model\.pt \(epoch 2, step \d+\): W_enc holds NaN or Inf"):
        save_checkpoint(best, checkpoint.sae, checkpoint.state, checkpoint.history, checkpoint.tensors)
    assert tree_digest(best) == before
    # a checkpoint damaged on disk with a NaN: export refuses it and writes nothing
    tensors = load_file(best / "sae.safetensors")
    tensors["b_dec"][0] = float("inf")
    save_file(tensors, best / "sae.safetensors")
    (project / "cases/p.yaml").write_text("train:\n  output_dir: cases/ckpts\nexport:\n  output_dir: cases/sae\n")
    line = one_line_error(["export", "--params", "cases/p.yaml"], capsys)
    assert "b_dec hold NaN or Inf; refusing to export non-finite weights" in line
    assert not (project / "cases/sae").exists() or not any((project / "cases/sae").iterdir())


def test_export_refuses_a_run_that_stopped_early(project: Path, capsys, monkeypatch) -> None:
    """What a kill after epoch 1 of 2 leaves: epoch 1's checkpoints. Export must not take them for the result."""
    monkeypatch.chdir(project)
    shutil.rmtree(project / "cases", ignore_errors=True)
    shutil.copytree(project / "models/runs/default/checkpoints", project / "cases/ckpts/default/checkpoints")
    shutil.rmtree(project / "cases/ckpts/default/checkpoints/checkpoint_epoch2.pt")
    (project / "cases/p.yaml").write_text("train:\n  output_dir: cases/ckpts\nexport:\n  output_dir: cases/sae\n")
    line = one_line_error(["export", "--params", "cases/p.yaml"], capsys)
    assert "training stopped after epoch 1 of 2" in line and "saepipe train --resume" in line


# ---- temporaries ----------------------------------------------------------------------------------------------
def test_a_temporary_of_a_dead_process_is_removed_and_a_live_ones_kept(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale_file = tmp_path / f".out.json.{dead_pid}.abc123.tmp"
    stale_file.write_text("half")
    stale_dir = tmp_path / f".run.{dead_pid}.xyz.tmp"
    (stale_dir / "sub").mkdir(parents=True)
    live = tmp_path / f".out.json.{os.getppid()}.def456.tmp"  # our parent is alive
    live.write_text("being written")
    other = tmp_path / f".other.json.{dead_pid}.abc.tmp"
    other.write_text("not ours to judge")
    write_json(tmp_path / "out.json", {"a": 1})
    with atomic_dir(tmp_path / "run") as tmp:
        (tmp / "f").write_text("x")
    assert not stale_file.exists() and not stale_dir.exists()
    assert live.exists() and other.exists()
    assert json.loads((tmp_path / "out.json").read_text()) == {"a": 1} and (tmp_path / "run/f").is_file()


def test_dvc_ignores_temporaries(tmp_path: Path, repo_dir: Path) -> None:
    dvc = shutil.which("dvc", path=str(BIN))
    if dvc is None:
        pytest.skip("dvc is not installed")
    shutil.copy(repo_dir / ".dvcignore", tmp_path / ".dvcignore")
    subprocess.run([dvc, "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    paths = ["models/runs/default/checkpoints/.checkpoint_epoch2.pt.123.abc.tmp/sae.safetensors",
             "data/activations/.activations.h5.4567.k2j3.tmp", "models/runs/default/checkpoints/.best_model.pt.old"]
    for path in paths:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("partial")
    kept = tmp_path / "models/runs/default/checkpoints/checkpoint_epoch1.pt/sae.safetensors"
    kept.parent.mkdir(parents=True)
    kept.write_text("complete")
    result = subprocess.run([dvc, "check-ignore", *paths, str(kept.relative_to(tmp_path))], cwd=tmp_path,
                            capture_output=True, text=True)
    ignored = set(result.stdout.split())
    assert set(paths) <= ignored, result.stdout
    assert str(kept.relative_to(tmp_path)) not in ignored


# ---- a full disk ----------------------------------------------------------------------------------------------
def can_mount_tmpfs(tmp_path: Path) -> bool:
    probe = tmp_path / "probe"
    probe.mkdir()
    result = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {probe}"],
                            capture_output=True)
    return result.returncode == 0


def test_atomic_path_turns_enospc_into_one_line_and_keeps_the_old_file(tmp_path: Path) -> None:
    """The narrowest boundary, in-process: the write inside atomic_path's block fails as a full disk does."""
    final = tmp_path / "stats.json"
    final.write_text('{"old": true}\n')
    with pytest.raises(UserError, match=r"stats\.json: no space left on device"), atomic_path(final) as tmp:
        tmp.write_text("partial")
        raise OSError(28, "No space left on device")
    assert final.read_text() == '{"old": true}\n' and sorted(p.name for p in tmp_path.iterdir()) == ["stats.json"]


# (stage, output folder to fill, the artifact in it, flags that make the new artifact larger than the old one)
FULL_DISK = {
    "activations": ("data/activations", "activations.h5", ["--storage-dtype", "float32"]),
    "export": ("models/sae", "default/sae_weights.safetensors", []),
    # a fresh run starts by clearing its run folder; a resumed one must leave the earlier epochs as they were
    "train": ("models/runs/default/checkpoints", "best_model.pt/sae.safetensors",
              ["--resume", "--num-epochs", "3"]),
    "activation-db": ("analysis/default", "activation_db.h5", ["--values-dtype", "float32"]),
}


@pytest.mark.parametrize("stage", [stage if stage == "export" else pytest.param(stage, marks=pytest.mark.slow)
                                   for stage in FULL_DISK])
def test_a_full_disk_is_one_line_and_the_previous_artifact_stays(project: Path, stage: str, tmp_path: Path) -> None:
    if shutil.which("unshare") is None or not can_mount_tmpfs(tmp_path):
        pytest.skip("cannot mount a tmpfs in a user namespace here")
    folder, artifact, flags = FULL_DISK[stage]
    out = project / folder
    size_kib = sum(4 * -(-p.stat().st_size // 4096) for p in out.rglob("*") if p.is_file()) + 24  # in pages
    saved = tmp_path / "saved"
    shutil.copytree(out, saved)
    before = tree_digest(saved)
    # In a private mount namespace: a tmpfs just larger than the previous outputs over their folder, the previous
    # outputs copied back into it, the stage run, then what is left listed with checksums.
    script = (f"set -e; mount -t tmpfs -o size={size_kib}k tmpfs {out}; cp -a {saved}/. {out}/; "
              f"cd {project}; set +e; {BIN / 'saepipe'} {stage} {' '.join(flags)} 2>{tmp_path}/err; "
              f"echo $? > {tmp_path}/rc; cd {out}; find . -type f -exec sha256sum {{}} + > {tmp_path}/after")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1"}
    subprocess.run(["unshare", "-rm", "sh", "-c", script], env=env, check=True, timeout=300)
    err = (tmp_path / "err").read_text()
    lines = [line for line in err.split("\n") if line.strip() and "%|" not in line]
    assert (tmp_path / "rc").read_text().strip() == "2", err
    assert len(lines) == 1 and "no space left on device" in lines[0] and "Traceback" not in err, err
    assert f"saepipe {stage}: error: {folder}" in lines[0] or f"error: {out}" in lines[0], lines[0]
    after = {line.split("  ./", 1)[1]: line.split()[0] for line in (tmp_path / "after").read_text().splitlines()}
    assert after == before  # the previous artifacts, byte for byte, and no temporary left beside them
    assert artifact in after
