"""Bad input, as a table: each row runs one `saepipe` command on a tiny project and expects exit code 2, exactly
one line on stderr that holds the expected text, no traceback, and not one file of the project written or changed.

The project (chapters -> process -> tokenize -> activations -> train -> export) is built once per module with the
CLI itself; each case only adds its own input files (under cases/) before the project is snapshotted.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from saepipe.cli import main
from tiny_project import make_project

Setup = Callable[[Path], None]


@dataclass(frozen=True)
class Case:
    name: str
    argv: list[str]
    expected: str
    setup: Setup | None = None


def write(relative: str, content: str | bytes) -> Setup:
    def setup(root: Path) -> None:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    return setup


def chapters(relative: str, files: dict[str, str | bytes]) -> Setup:
    """A raw_dir at `relative` whose three subject folders hold `files` (name -> content); {} leaves them empty."""
    def setup(root: Path) -> None:
        for subject in ("physics", "chemistry", "biology"):
            folder = root / relative / f"{subject}_chapters"
            folder.mkdir(parents=True, exist_ok=True)
            for name, content in files.items():
                write(str(folder.relative_to(root) / name), content)(root)
    return setup


def texts_dir(relative: str, texts: list[str]) -> Setup:
    return write(f"{relative}/texts.json", json.dumps(texts))


def edited_export(relative: str, **changes: object) -> Setup:
    """A copy of the project's export whose config.json says something else (model, hook)."""
    def setup(root: Path) -> None:
        target = root / relative
        shutil.copytree(root / "models" / "sae" / "default", target)
        config = json.loads((target / "config.json").read_text())
        config.update(changes)
        (target / "config.json").write_text(json.dumps(config))
    return setup


def small_sae(relative: str) -> Setup:
    """An exported SAE on 16-dimensional activations (the tiny model's are 64)."""
    def setup(root: Path) -> None:
        from saved_saes import export, make_checkpoint

        export(make_checkpoint(root / "cases" / "ckpt16", "topk"), root / relative)
    return setup


def params_file(relative: str, yaml_text: str) -> Setup:
    return write(relative, yaml_text)


def activation_db_of(name: str, stale: bool = False) -> Setup:
    """cases/<name>.yaml naming an activation DB under cases/<name>_analysis, built once from a copy of the
    export at cases/<name>_sae; `stale`: that export's weights replaced after the DB was built."""
    def setup(root: Path) -> None:
        params = f"cases/{name}.yaml"
        if (root / params).is_file():
            return
        shutil.copytree(root / "models" / "sae" / "default", root / f"cases/{name}_sae")
        write(params, f"evaluate:\n  sae_path: cases/{name}_sae\n  output_dir: cases/{name}_analysis\n")(root)
        assert main(["activation-db", "--params", params]) == 0
        if stale:
            import torch

            weights = root / f"cases/{name}_sae/weights.pt"
            tensors = torch.load(weights, weights_only=True)
            tensors["W_dec"] += 0.1
            torch.save(tensors, weights)
    return setup


def over_bounds() -> list[Case]:
    """One case per bounded size param of the analysis stages: one above its bound, read from the field (the
    bound's one home), each refused with the field and the bound."""
    from saepipe.config import SECTIONS
    from saepipe.config.fields import flat_fields

    cases = []
    for section, stage in SIZED_SECTIONS.items():
        for field in flat_fields(SECTIONS[section]):
            low, high = field.field.metadata.get("bounds", (None, None))
            if high is not None:
                over = high + 1
                cases.append(Case(f"{section}.{field.name} over its bound", [stage, "--" + field.name.replace("_", "-"),
                                  str(over)], f"{section}.{field.name}={over}: expected an integer in [{low}, {high}]"))
    return cases


SIZED_SECTIONS = {"evaluate": "evaluate", "activation_db": "activation-db", "matrices": "matrices",
                  "summarize": "summarize", "interp": "interp", "report": "report"}
BINARY = bytes(range(256)) * 4
LONG_TEXT = "Energy is stored as ATP in the cell and used by every part of it. " * 3

CASES = [
    # ---- corpus -------------------------------------------------------------------------------------------------
    Case("empty corpus directory", ["process", "--raw-dir", "cases/raw_empty"], "holds no .md chapters",
         chapters("cases/raw_empty", {})),
    Case("missing raw_dir", ["process", "--raw-dir", "cases/nowhere"], "no folder cases/nowhere/physics_chapters"),
    Case("chapters that are empty", ["process", "--raw-dir", "cases/raw_blank"],
         "process.min_words=8: no document of cases/raw_blank", chapters("cases/raw_blank", {"ch01.md": ""})),
    Case("a binary chapter", ["process", "--raw-dir", "cases/raw_binary"], "not UTF-8 text",
         chapters("cases/raw_binary", {"ch01.md": BINARY})),
    Case("JSON that is an object", ["process", "--data-path", "cases/object.json"],
         "holds a JSON object; expected a JSON list of strings", write("cases/object.json", '{"a": "b"}')),
    Case("JSON list holding a number", ["process", "--data-path", "cases/numbers.json"],
         "item 1 is a JSON number", write("cases/numbers.json", '["text here", 3]')),
    Case("JSON that does not parse", ["process", "--data-path", "cases/broken.json"], "not valid JSON",
         write("cases/broken.json", '["unterminated')),
    Case("empty JSON list", ["process", "--data-path", "cases/empty.json"], "the list is empty",
         write("cases/empty.json", "[]")),
    Case("binary data_path", ["process", "--data-path", "cases/binary.json"], "not UTF-8 text",
         write("cases/binary.json", BINARY)),
    Case("texts shorter than two tokens", ["tokenize", "--params", "cases/short.yaml"],
         "no document has two tokens",
         lambda root: (texts_dir("cases/short", ["a", "b", "c", ""])(root),
                       params_file("cases/short.yaml", "process:\n  output_dir: cases/short\n"
                                   "tokenize:\n  output: cases/short/tokens.h5\n")(root))),
    Case("one document: empty validation split", ["tokenize", "--params", "cases/one.yaml"],
         "leaves the validation split empty",
         lambda root: (texts_dir("cases/one", [LONG_TEXT])(root),
                       params_file("cases/one.yaml", "process:\n  output_dir: cases/one\n"
                                   "tokenize:\n  output: cases/one/tokens.h5\n")(root))),
    # ---- params -------------------------------------------------------------------------------------------------
    Case("wrong type in params file", ["train", "--params", "cases/type.yaml"],
         "train.topk='many': expected an integer", params_file("cases/type.yaml", "train:\n  topk: many\n")),
    Case("wrong type on the command line", ["train", "--batch-size", "1.5"],
         "train.batch_size=1.5: expected an integer"),
    Case("list where a number belongs", ["train", "--params", "cases/list.yaml"], "train.lr=[0.1]: expected a number",
         params_file("cases/list.yaml", "train:\n  lr: [0.1]\n")),
    Case("unknown key", ["train", "--params", "cases/key.yaml"], "unknown key train.topk_ax; did you mean 'topk_aux'?",
         params_file("cases/key.yaml", "train:\n  topk_ax: 3\n")),
    Case("unknown section", ["train", "--params", "cases/section.yaml"],
         "unknown section 'trian'; did you mean 'train'?",
         params_file("cases/section.yaml", "trian:\n  topk: 3\n")),
    Case("params file that is not YAML", ["train", "--params", "cases/bad.yaml"], "not valid YAML",
         params_file("cases/bad.yaml", "train: [\n")),
    Case("params file missing", ["train", "--params", "cases/none.yaml"], "params file not found: cases/none.yaml"),
    Case("section that is not a mapping", ["train", "--params", "cases/flat.yaml"], "section 'train' is not a mapping",
         params_file("cases/flat.yaml", "train: 3\n")),
    Case("out-of-range layer", ["activations", "--hook-layer", "40", "--output-dir", "cases/acts"],
         "activations.hook_layer=40: expected an integer in [0, 1]"),
    Case("negative layer", ["activations", "--hook-layer", "-1", "--output-dir", "cases/acts"],
         "activations.hook_layer=-1"),
    Case("unknown hook name", ["activations", "--hook-name", "hook_resid_middle", "--output-dir", "cases/acts"],
         "activations.hook_name='hook_resid_middle'"),
    Case("topk 0", ["train", "--topk", "0"], "train.topk=0: expected an integer >= 1"),
    Case("topk negative", ["train", "--topk", "-3"], "train.topk=-3: expected an integer >= 1"),
    Case("topk >= d_sae", ["train", "--topk", "128"], "train.topk=128: expected an integer below d_sae = 128"),
    Case("expansion 0", ["train", "--sae-expansion", "0"], "train.sae_expansion=0: expected an integer >= 1"),
    Case("expansion negative", ["train", "--sae-expansion", "-2"], "train.sae_expansion=-2: expected an integer >= 1"),
    Case("end-to-end with both sub-losses off", ["train", "--use-end-to-end", "--no-use-logit-kl",
                                                  "--no-use-block-mse"],
         "train.use_end_to_end=True: expected false, or at least one of train.use_logit_kl"),
    Case("run name with a slash", ["train", "--run-name", "a/b"], "train.run_name='a/b': expected a folder name"),
    Case("run name '..'", ["train", "--run-name", ".."], "train.run_name='..': expected a folder name"),
    Case("run name escaping upwards", ["train", "--run-name", "../x"], "train.run_name='../x': expected a folder name"),
    Case("run name with a backslash", ["export", "--params", "cases/bs.yaml"], "train.run_name='a\\\\b'",
         params_file("cases/bs.yaml", "train:\n  run_name: a\\b\n")),
    Case("unknown device", ["train", "--device", "gpu"], "train.device='gpu': expected auto, cpu, cuda or cuda:N"),
    Case("zero epochs", ["train", "--num-epochs", "0"], "train.num_epochs=0: expected an integer >= 1"),
    Case("val_fraction out of range", ["tokenize", "--val-fraction", "1.5"], "tokenize.val_fraction=1.5"),
    Case("unknown storage dtype", ["activations", "--storage-dtype", "int8"], "invalid choice: 'int8'"),
    # ---- an SAE that does not fit the cache or the model -------------------------------------------------------
    Case("SAE d_in differs from the cache", ["evaluate", "--sae-path", "cases/sae16"],
         "takes 16-dimensional activations, but the model's d_model is 64", small_sae("cases/sae16")),
    Case("SAE of another model", ["evaluate", "--sae-path", "cases/sae_model"],
         "was trained on model other/model, not tiny-random-llama",
         edited_export("cases/sae_model", model_name="other/model")),
    Case("SAE of another hook", ["evaluate", "--sae-path", "cases/sae_hook"],
         "was trained on blocks.0.hook_resid_post, not blocks.1.hook_resid_post",
         edited_export("cases/sae_hook", hook="blocks.0.hook_resid_post")),
    Case("SAE of another hook, activation-db", ["activation-db", "--params", "cases/db_hook.yaml"],
         "was trained on blocks.0.hook_resid_post",
         lambda root: (edited_export("cases/sae_hook2", hook="blocks.0.hook_resid_post")(root),
                       params_file("cases/db_hook.yaml", "evaluate:\n  sae_path: cases/sae_hook2\n")(root))),
    # ---- missing inputs, one per stage -------------------------------------------------------------------------
    Case("tokenize without texts.json", ["tokenize", "--params", "cases/no_texts.yaml"],
         "cases/none/texts.json: file not found",
         params_file("cases/no_texts.yaml", "process:\n  output_dir: cases/none\n")),
    Case("activations without a token cache", ["activations", "--params", "cases/no_tokens.yaml"],
         "token cache: file not found: cases/none.h5",
         params_file("cases/no_tokens.yaml", "tokenize:\n  output: cases/none.h5\n")),
    Case("activations without the model", ["activations", "--params", "cases/no_model.yaml"], "cases/no_model",
         params_file("cases/no_model.yaml", "base_model:\n  output_dir: cases/no_model\n")),
    Case("train without an activation cache", ["train", "--params", "cases/no_acts.yaml"],
         "activation cache: file not found: cases/none/activations.h5",
         params_file("cases/no_acts.yaml", "activations:\n  output_dir: cases/none\n")),
    Case("export without checkpoints", ["export", "--params", "cases/never.yaml"],
         "no best_model.pt in models/runs/never/checkpoints",
         params_file("cases/never.yaml", "train:\n  run_name: never\n")),
    Case("evaluate without an export", ["evaluate", "--sae-path", "cases/no_sae"],
         "SAE not found: cases/no_sae is not a directory"),
    Case("activation-db without an export", ["activation-db", "--params", "cases/db_none.yaml"],
         "SAE not found: cases/no_sae",
         params_file("cases/db_none.yaml", "evaluate:\n  sae_path: cases/no_sae\n")),
    Case("matrices without an activation DB", ["matrices"], "analysis/default/activation_db.h5"),
    Case("summarize without an activation DB", ["summarize"], "run `saepipe activation-db` first"),
    # ---- show-feature: refused before the tokenizer is loaded, a stale DB like the other stages -------------
    Case("show-feature id beyond d_sae", ["show-feature", "128", "--params", "cases/show.yaml"],
         "feature 128: expected an id in [0, 127]", activation_db_of("show")),
    Case("show-feature context beyond its bound", ["show-feature", "3", "--context-before", "1000000000"],
         "summarize.context_before=1000000000: expected an integer in [0, 256]"),
    Case("show-feature context after beyond its bound", ["show-feature", "3", "--context-after", "257"],
         "summarize.context_after=257: expected an integer in [0, 256]"),
    Case("show-feature --index-tokens", ["show-feature", "3", "--index-tokens", "3"],
         "unrecognized arguments: --index-tokens 3"),
    Case("show-feature empty search", ["show-feature", "--search", ""], "--search='': expected a token's text"),
    Case("show-feature zero results", ["show-feature", "--search", "the", "--results", "0"], "--results=0"),
    Case("show-feature on a stale DB", ["show-feature", "3", "--params", "cases/stale.yaml"],
         "is stale: built from another SAE than the one now at cases/stale_sae (weights sha256 ",
         activation_db_of("stale", stale=True)),
    Case("matrices on a stale DB", ["matrices", "--params", "cases/stale.yaml"],
         "rebuild it with `saepipe activation-db` (or `dvc repro activation_db`)",
         activation_db_of("stale", stale=True)),
    Case("base-model from a missing local dir", ["base-model", "--source", "local", "--local-path", "cases/nothing",
                                                 "--output-dir", "cases/base"], "cases/nothing"),
    # ---- interp: bounds on its sizes, its inputs checked first (issue 22) ----------------------------------------
    Case("interp holding out no windows", ["interp", "--score-examples", "0"],
         "interp.score_examples=0: expected an integer >= 1"),
    Case("interp without feature summaries", ["interp"], "run `saepipe summarize` first"),
    # ---- issue 22 §6: interval validation, labels ---------------------------------------------------------------
    Case("negative val_every_steps", ["train", "--val-every-steps", "-1"], "train.val_every_steps=-1"),
    Case("interp without labels.json", ["interp", "--params", "cases/no_labels.yaml"], "run `saepipe process`",
         params_file("cases/no_labels.yaml", "process:\n  output_dir: cases/no_labels\n")),
    # ---- readers and size bounds (issue 22): missing inputs, the sizes from the issue, every bound --------------
    Case("evaluate without an activation cache", ["evaluate", "--params", "cases/ev_none.yaml"],
         "cases/none/activations.h5", params_file("cases/ev_none.yaml", "activations:\n  output_dir: cases/none\n")),
    Case("matrices for a run without an SAE", ["matrices", "--params", "cases/mx_none.yaml"],
         "analysis/no_sae/activation_db.h5 (run `saepipe activation-db` first)",
         params_file("cases/mx_none.yaml", "evaluate:\n  sae_path: cases/no_sae\n")),
    Case("report without evaluate's figures", ["report"],
         "analysis/default/quick/metrics.json (run `saepipe evaluate` first)"),
    Case("report.heatmap_features 10**9", ["report", "--heatmap-features", "1000000000"],
         "report.heatmap_features=1000000000: expected an integer in [1, "),
    Case("summarize.top_k 10**9", ["summarize", "--top-k", "1000000000"],
         "summarize.top_k=1000000000: expected an integer in [1, "),
    Case("activation_db.batch_size 10**9", ["activation-db", "--batch-size", "1000000000"],
         "activation_db.batch_size=1000000000: expected an integer in [1, "),
    Case("activation_db.batch_size beyond max_memory_mb", ["activation-db", "--max-memory-mb", "16",
                                                            "--batch-size", "60000"],
         "activation_db.batch_size=60000: expected a batch that fits activation_db.max_memory_mb=16: at most"),
    Case("summarize.quantile_bands: too many",
         ["summarize", "--quantile-bands", *(f"{q / 20:g}" for q in range(1, 19))],
         "0.85, 0.9]: expected at most 16 bands"),
    *over_bounds(),
]


def run_cli(argv: list[str]) -> int:
    """`saepipe.cli.main`'s exit code, also when argparse itself stops (a bad choice exits through SystemExit)."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file with its size and mtime, every folder by name (a temporary folder made and removed is fine)."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else None
            for p in root.rglob("*")}


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir, tiny_training_text) -> Path:
    root = make_project(tmp_path_factory.mktemp("bad_input") / "project", tiny_model_dir, tiny_training_text)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        for stage in ("process", "tokenize", "activations", "train", "export"):
            assert main([stage]) == 0, stage
    return root


def test_every_size_param_of_the_analysis_stages_has_a_bound_stated_in_help() -> None:
    from saepipe.cli import build_parser
    from saepipe.config import SECTIONS
    from saepipe.config.fields import flat_fields

    sizes = {"evaluate": {"batch_size"}, "activation_db": {"batch_size", "max_memory_mb"},
             "matrices": {"top_k", "dense_max_features", "block_size", "chunk_rows", "histogram_bins"},
             "summarize": {"top_k", "context_before", "context_after", "quantile_examples", "logit_tokens",
                           "top_tokens", "neighbours", "index_tokens"},
             "report": {"table_features", "table_examples", "heatmap_features", "features_per_token", "dpi"}}
    for section, names in sizes.items():
        bounded = {f.name: f for f in flat_fields(SECTIONS[section]) if f.field.metadata.get("bounds", (0, None))[1]}
        assert names <= set(bounded), (section, names - set(bounded))
        help_text = " ".join(build_parser(SIZED_SECTIONS[section]).format_help().split())
        for name in names:
            low, high = bounded[name].field.metadata["bounds"]
            assert f"Allowed: {low} to {high}." in bounded[name].doc
        usage = build_parser(SIZED_SECTIONS[section])._subparsers._group_actions[0].choices[SIZED_SECTIONS[section]]
        assert all(f"Allowed: {bounded[n].field.metadata['bounds'][0]} to" in " ".join(usage.format_help().split())
                   for n in names), help_text[:200]


def test_the_heatmap_at_its_bound_and_the_highest_dpi_stays_under_8000_pixels(tmp_path: Path, monkeypatch) -> None:
    """The figure's size in pixels as it would be saved (not rendered: that takes a minute here)."""
    from saepipe.config import SECTIONS
    from saepipe.config.fields import flat_fields
    from saepipe.report import plots

    bounds = {f.name: f.field.metadata["bounds"][1] for f in flat_fields(SECTIONS["report"])
              if f.name in ("heatmap_features", "dpi")}
    saved = []
    monkeypatch.setattr(plots, "save", lambda fig, path, dpi: saved.append(fig.get_size_inches() * dpi))
    n = bounds["heatmap_features"]
    block = np.random.default_rng(0).random((n, n)).astype(np.float32)
    plots.cooccurrence_heatmap(block, [f"#{i} 'token'" for i in range(n)], "t", tmp_path / "h.png", bounds["dpi"])
    assert max(saved[0]) < 8000


def test_an_encode_batch_at_its_limit_stays_within_max_memory_mb() -> None:
    """Peak memory of one encode at the largest batch activation-db allows, measured in a fresh process (the
    default SAE's architecture and sparsity, a width in its range)."""
    from saepipe.analysis.db_build import encode_batch_limit

    budget_mb, d_in, d_sae = 64, 128, 4096
    rows = encode_batch_limit(d_in, d_sae, budget_mb)
    assert encode_batch_limit(d_in, 2 * d_sae, budget_mb) < rows  # a wider SAE fits fewer rows
    assert abs(encode_batch_limit(d_in, d_sae, 2 * budget_mb) - 2 * rows) <= 1
    code = f"""
import torch
from saepipe.analysis.db_build import encode_rows
from saepipe.sae import build_sae, config_class
torch.set_num_threads(1)
sae = build_sae(config_class("batch_topk").from_dict(dict(d_in={d_in}, d_sae={d_sae}, k=32, k_aux=256)))
x = torch.randn({rows}, {d_in})
with torch.no_grad():  # a trained SAE's threshold: about k features a token (an untrained one fires them all)
    sae.threshold.fill_(torch.quantile(sae.pre_activations(x[:256]).flatten(), 1 - 32 / {d_sae}))
encode_rows(sae, x[:16])
def kib(key):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key))
before = kib("VmRSS:")
with open("/proc/self/clear_refs", "w") as f:  # the peak (VmHWM) starts again from here
    f.write("5")
encode_rows(sae, x)
print((kib("VmHWM:") - before) / 1024)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    peak_mb = float(result.stdout.split()[-1])
    assert budget_mb / 8 < peak_mb <= budget_mb, peak_mb


def test_the_table_is_large_enough() -> None:
    assert len(CASES) >= 30 and len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_line_and_writes_nothing(case: Case, project: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(project)
    if case.setup is not None:
        case.setup(project)
    before = snapshot(project)
    capsys.readouterr()
    code = run_cli(case.argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.split("\n") if line.strip() and "%|" not in line]  # progress bars may precede
    assert len(lines) == 1 and err.endswith("\n"), err
    assert "Traceback" not in err
    assert case.expected in err, err
    assert snapshot(project) == before
    assert not [p for p in project.rglob("*.tmp")], "a temporary output was left behind"
    assert os.getcwd() == str(project)
