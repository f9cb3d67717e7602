"""A saepipe project in a temp directory (chapters, params.yaml) on the tiny model, for tests that run the CLI.

A plain function rather than a fixture: the fault tests build projects of different sizes in subprocess runs,
and the bad-input table builds one per module.
"""

from __future__ import annotations

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SUBJECTS = ("physics", "chemistry", "biology")
CHAPTER = """# Chapter {n}: {subject} basics

{intro}

## {n}.1 First ideas

{body}

## {n}.2 More ideas

{body2}
"""


def make_project(root: Path, model_dir: Path, sentences: list[str], *, chapters: int = 2, repeat: int = 3,
                 train: dict | None = None) -> Path:
    """Write `root/data/raw/<subject>_chapters/*.md` and a params.yaml for the tiny model; return `root`."""
    root.mkdir(parents=True, exist_ok=True)
    for s, subject in enumerate(SUBJECTS):
        folder = root / "data" / "raw" / f"{subject}_chapters"
        folder.mkdir(parents=True, exist_ok=True)
        for c in range(chapters):
            shift = s + c
            rotated = sentences[shift % len(sentences):] + sentences[:shift % len(sentences)]
            body = " ".join(rotated * repeat)
            (folder / f"{subject}_ch{c + 1:02d}.md").write_text(CHAPTER.format(
                n=c + 1, subject=subject, intro=" ".join(rotated[:2] * 2), body=body,
                body2=" ".join(reversed(rotated * repeat))))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["base_model"].update(source="local", local_path=str(model_dir), output_dir=str(model_dir),
                                model_name="tiny-random-llama")
    params["tokenize"]["val_fraction"] = 0.25
    params["activations"].update(max_text_length=32, device="cpu", hook_layer=1)
    params["train"].update({"sae_expansion": 2, "topk": 4, "topk_aux": 8, "batch_size": 64, "num_epochs": 1,
                            "lr_warmup_steps": 2, "device": "cpu", **(train or {})})
    params["evaluate"].update(ablation_max_tokens=64, batch_size=256, device="cpu")
    params["activation_db"].update(device="cpu", batch_size=128)
    params["summarize"].update(top_k=5)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root
