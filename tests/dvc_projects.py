"""A tiny saepipe project in a temp git + DVC repo: the repo's pipeline files over tiny random models.

Plain functions (not fixtures) so that module-scoped fixtures can build one project and several tests copy
it. The shape matches tests/test_pipeline_dvc.py's `project`: three one-chapter subjects, the tiny model,
32-position windows, a 2x SAE; `models` puts tiny models in pipelines/models/'s list.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

BIN = Path(sys.executable).parent

CHAPTER = """# Chapter {n}: {subject} basics

An opening paragraph about {subject} that introduces the chapter with enough words to be kept.

## {n}.1 First ideas

{body}

![a figure that must be dropped](images/figure.png)

## {n}.2 Empty section

## {n}.3 More ideas

{body} The equation $E = m c^2$ stays as written.

| quantity | unit |
|---|---|
| energy | joule |
"""

# The single pipeline's small settings; the models pipeline's tiny entries take the memory ones per model.
TINY = {
    "tokenize": {"val_fraction": 0.3},
    "activations": {"max_text_length": 32, "device": "cpu", "hook_layer": 1},
    "train": {"sae_expansion": 2, "topk": 4, "topk_aux": 8, "batch_size": 64, "num_epochs": 2,
              "lr_warmup_steps": 2, "device": "cpu"},
    "evaluate": {"ablation_max_tokens": 128, "batch_size": 256, "device": "cpu"},
    "activation_db": {"device": "cpu"},
    "summarize": {"top_k": 5},
    "interp": {"features": 2, "score_examples": 2, "explain_examples": 3, "max_new_tokens": 4, "batch_size": 4,
               "device": "cpu"},  # the tiny random model explains and judges, in seconds
}


def run(cmd: list[str] | str, cwd: Path, env: dict[str, str] | None = None, check: bool = True) -> str:
    """Run a command (a list, or a bash script) with the venv's dvc and saepipe first on PATH, offline."""
    full_env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    args = ["bash", "-euo", "pipefail", "-c", cmd] if isinstance(cmd, str) else cmd
    result = subprocess.run(args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=900)
    if check:
        assert result.returncode == 0, f"{cmd} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def ran_stages(output: str) -> list[str]:
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")]


def git_commit(root: Path, message: str) -> None:
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", message], root)


def make_project(root: Path, repo_dir: Path, tiny_model_dir: Path, texts: list[str],
                 models: dict[str, Path] | None = None) -> Path:
    """The repo's dvc.yaml, params.yaml (tiny settings), .dvc/config, pipelines/ and src/ in a committed git repo
    at `root`; with `models` (key -> tiny model directory), pipelines/models/ lists those models instead."""
    root.mkdir(parents=True)
    for name in ("dvc.yaml", "params.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(repo_dir / name, root / name)
    shutil.copytree(repo_dir / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for n, subject in enumerate(["physics", "chemistry", "biology"], start=1):
        folder = root / "data" / "raw" / f"{subject}_chapters"
        folder.mkdir(parents=True)
        body = " ".join(texts[n - 1:] * 3)
        (folder / f"{subject}_ch01.md").write_text(CHAPTER.format(n=n, subject=subject, body=body))
    params = yaml.safe_load((repo_dir / "params.yaml").read_text())
    params["base_model"].update(source="local", local_path=str(tiny_model_dir), model_name="tiny-random-llama")
    for section, values in TINY.items():
        params[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copytree(repo_dir / "pipelines", root / "pipelines", ignore=shutil.ignore_patterns("dvc.lock", "params"))
    if models:
        listing = yaml.safe_load((root / "pipelines/models/params.yaml").read_text())
        listing["models"] = {
            key: {"base_model": {"source": "local", "local_path": str(path), "model_name": f"tiny/{key}"},
                  "activations": {"activation_batch_size": 4 + i, "max_text_length": 32, "forward_dtype": "float32",
                                  "hook_layer": None}}
            for i, (key, path) in enumerate(models.items())}
        (root / "pipelines/models/params.yaml").write_text(yaml.safe_dump(listing, sort_keys=False))
    run(["git", "init", "-q", "-b", "main"], root)
    run(["git", "config", "user.email", "test@example.com"], root)
    run(["git", "config", "user.name", "test"], root)
    run(["dvc", "init", "-q"], root)
    shutil.copy(repo_dir / ".dvc/config", root / ".dvc/config")  # the remote `storage` as the repo ships it
    git_commit(root, "init")
    return root


def file_hashes(root: Path, under: list[str]) -> dict[str, str]:
    """sha256 of every file below the `under` paths (relative to `root`), keyed by relative path."""
    hashes = {}
    for top in under:
        base = root / top
        for path in sorted([base] if base.is_file() else base.rglob("*")):
            if path.is_file():
                hashes[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return hashes


# A recipe: the fenced bash block right after `<!-- recipe: NAME -->`, in the README or a page of docs/.
RECIPE = re.compile(r"<!-- recipe: ([\w-]+) -->\s*```bash\n(.*?)```", re.DOTALL)


def doc_pages(repo_dir: Path) -> list[Path]:
    """The documentation: README.md, then docs/*.md by name."""
    return [repo_dir / "README.md", *sorted((repo_dir / "docs").glob("*.md"))]


def recipes(repo_dir: Path) -> dict[str, str]:
    """Every recipe of the documentation, name -> block as users type it (bash skips the comments), in page
    order and, within a page, in reading order. A name may be used once."""
    found: dict[str, str] = {}
    for page in doc_pages(repo_dir):
        for name, block in RECIPE.findall(page.read_text(encoding="utf-8")):
            assert name not in found, f"recipe {name!r} appears twice (again in {page.relative_to(repo_dir)})"
            found[name] = block
    return found


def recipe(repo_dir: Path, name: str) -> str:
    """The recipe called `name`, wherever in the documentation it lives."""
    every = recipes(repo_dir)
    assert name in every, f"no recipe {name!r} in README.md or docs/*.md"
    return every[name]
