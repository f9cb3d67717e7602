"""params.yaml loading and the CLI: every bad value is exit code 2 and one line naming the field."""

from __future__ import annotations

import importlib

import pytest
import yaml

from saepipe.cli import STAGES, build_parser, main
from saepipe.config import SECTIONS, flat_fields, flat_values, load_params
from saepipe.errors import UserError


def write(repo_dir, tmp_path, mutate) -> str:
    params = yaml.safe_load((repo_dir / "params.yaml").read_text())
    mutate(params)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return str(path)


def test_repo_params_are_valid_and_complete(repo_dir) -> None:
    params = load_params(repo_dir / "params.yaml")
    raw = yaml.safe_load((repo_dir / "params.yaml").read_text())
    assert set(raw) == set(SECTIONS)
    for name, cls in SECTIONS.items():
        hints = {f.name: f.hint for f in flat_fields(cls)}
        assert set(raw[name]) == set(hints)
        assert flat_values(getattr(params, name)) == {
            k: (float(v) if isinstance(v, int) and hints[k] is float else v) for k, v in raw[name].items()
        }


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda p: p["tokenize"].update(val_fractoin=0.2), "unknown key tokenize.val_fractoin"),
        (lambda p: p["tokenize"].pop("seed"), "tokenize.seed is missing"),
        (lambda p: p["tokenize"].update(seed="zero"), "tokenize.seed='zero': expected an integer"),
        (lambda p: p["tokenize"].update(seed=True), "tokenize.seed=True: expected an integer"),
        (lambda p: p["tokenize"].update(val_fraction=0.0), "tokenize.val_fraction=0.0: expected a number strictly"),
        (lambda p: p["tokenize"].update(val_fraction=1.5), "tokenize.val_fraction=1.5"),
        (lambda p: p["activations"].update(middle_layer_strategy="middle"),
         "activations.middle_layer_strategy='middle': expected one of lower, upper"),
        (lambda p: p["activations"].update(prepend_bos="yes"), "activations.prepend_bos='yes': expected true or false"),
        (lambda p: p["activations"].update(device="tpu"), "activations.device='tpu': expected auto, cpu, cuda"),
        (lambda p: p["process"].update(subjects="physics"), "process.subjects='physics': expected a list of str"),
        (lambda p: p["base_model"].update(source="ftp"), "base_model.source='ftp': expected one of gguf, hub, local"),
        (lambda p: p["train"].update(sae_type="gated"), "train.sae_type='gated': expected one of batch_topk"),
        (lambda p: p["train"].update(use_end_to_end=True, use_logit_kl=False, use_block_mse=False),
         "train.use_end_to_end=True: expected false, or at least one of"),
        (lambda p: p["train"].update(adam_betas=[0.9]), "train.adam_betas=[0.9]: expected two numbers"),
        (lambda p: p["train"].update(matryoshka_prefix_fractions=[0.5, 0.25]),
         "train.matryoshka_prefix_fractions=[0.5, 0.25]: expected increasing"),
        (lambda p: p["export"].update(hf_repo_id="no-slash"), "export.hf_repo_id='no-slash'"),
        (lambda p: p["train"].update(run_name="my run"), "train.run_name='my run': expected a folder name"),
        (lambda p: p["train"].update(run_name="../up"), "train.run_name='../up': expected a folder name"),
        (lambda p: p["interp"].update(probe_k=[1, 1]), "interp.probe_k=[1, 1]: expected a non-empty list of distinct"),
        (lambda p: p["interp"].update(explainer_url="ftp://host"), "interp.explainer_url='ftp://host': expected an"),
        (lambda p: p["interp"].update(features=-1), "interp.features=-1: expected an integer >= 0"),
        (lambda p: p.update(trian={"lr": 1.0}), "unknown section 'trian'; did you mean 'train'?"),
        (lambda p: p["train"].update(toppk=3), "unknown key train.toppk; did you mean 'topk'?"),
        (lambda p: p.pop("train"), "section 'train' is missing"),
    ],
)
def test_invalid_params_name_the_field(repo_dir, tmp_path, capsys, monkeypatch, mutate, message) -> None:
    path = write(repo_dir, tmp_path, mutate)
    monkeypatch.chdir(tmp_path)  # the file is the project's params.yaml: nothing to fall back on
    with pytest.raises(UserError) as info:
        load_params(path)
    assert message in str(info.value)
    section = next((name for name in SECTIONS if message.startswith(f"{name}.") or f" {name}." in message), "train")
    stage = next(name for name, spec in STAGES.items() if spec.section == section)
    assert main([stage, "--params", path]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_partial_params_file_falls_back_key_by_key(repo_dir, tmp_path, monkeypatch) -> None:
    (tmp_path / "mine.yaml").write_text("train:\n  topk: 7\nevaluate:\n  split: train\n")
    monkeypatch.chdir(repo_dir)  # the project's params.yaml supplies everything mine.yaml leaves out
    params = load_params(tmp_path / "mine.yaml")
    repo = load_params(repo_dir / "params.yaml")
    assert params.train.sae.topk == 7 and params.evaluate.split == "train"
    assert flat_values(params.train) == {**flat_values(repo.train), "topk": 7}
    assert params.activations == repo.activations


def test_a_fault_stops_only_a_stage_that_reads_the_section(repo_dir, tmp_path, monkeypatch, capsys) -> None:
    raw = yaml.safe_load((repo_dir / "params.yaml").read_text())
    raw["train"]["topk"] = "many"  # broken, but process never reads train
    del raw["evaluate"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    params = load_params("params.yaml", strict=["process"])
    assert params.process.min_words == raw["process"]["min_words"]
    with pytest.raises(UserError, match=r"train\.topk='many'"):  # the section's own error, when it is read
        _ = params.train.sae
    with pytest.raises(UserError, match="section 'evaluate' is missing"):
        _ = params.evaluate.output_dir
    assert "train" not in params.to_dict() and "process" in params.to_dict()
    with pytest.raises(UserError, match=r"train\.topk='many'"):  # the strict sections fail up front
        load_params("params.yaml", strict=["export", "train"])
    with pytest.raises(UserError, match=r"train\.topk='many'"):  # and by default every section is strict
        load_params("params.yaml")
    # through the CLI: export reads train.run_name, so it stops with train's one line; flags of its own section
    # are checked before any work
    assert main(["export"]) == 2
    assert "train.topk='many'" in capsys.readouterr().err


def test_missing_and_malformed_params_files(tmp_path) -> None:
    with pytest.raises(UserError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("process: [unclosed\n")
    with pytest.raises(UserError, match=r"not valid YAML at line \d"):
        load_params(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(UserError, match="expected a mapping of sections"):
        load_params(tmp_path / "list.yaml")


def test_flags_override_one_value_with_the_same_checks(repo_dir) -> None:
    from saepipe.cli import overrides_from_args

    parser = build_parser()
    args = parser.parse_args(["activations", "--hook-layer", "12", "--context-overlap", "null", "--no-prepend-bos",
                              "--max-tokens", "1000", "--device", "cpu"])
    assert overrides_from_args(args) == {"activations": {"hook_layer": 12, "context_overlap": None,
                                                         "prepend_bos": False, "max_tokens": 1000, "device": "cpu"}}
    args = parser.parse_args(["process", "--subjects", "physics", "biology", "--data-path", "x.json"])
    assert overrides_from_args(args) == {"process": {"subjects": ["physics", "biology"], "data_path": "x.json"}}
    args = parser.parse_args(["train", "--lr", "1e-3", "--wandb-tags", "a", "b", "--sae-type", "topk"])
    assert overrides_from_args(args) == {"train": {"lr": 1e-3, "wandb_tags": ["a", "b"], "sae_type": "topk"}}
    params = load_params(repo_dir / "params.yaml", overrides_from_args(args))
    assert params.train.lr == 1e-3 and params.train.sae.sae_type == "topk"
    args = parser.parse_args(["activations", "--hook-layer", "twelve"])
    with pytest.raises(UserError, match=r"activations\.hook_layer='twelve': expected an integer"):
        overrides_from_args(args)


def test_every_option_has_help(capsys) -> None:
    for stage, spec in STAGES.items():
        with pytest.raises(SystemExit):
            main([stage, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        if spec.section is None:  # no params section: its own arguments only (tests/test_many_models.py)
            continue
        # A stage that borrows another's section leaves out the fields it cannot use (show-feature: index_tokens).
        unused = getattr(importlib.import_module(spec.module), "UNUSED_FIELDS", ()) if spec.arguments else ()
        for field in flat_fields(SECTIONS[spec.section]):
            assert field.doc, f"{spec.section}.{field.name} has no docstring"
            if field.name in unused:
                assert "--" + field.name.replace("_", "-") + " " not in text
                continue
            assert "--" + field.name.replace("_", "-") in text
            assert " ".join(field.doc.split()[:4]) in text


def test_unknown_flag_is_one_line_exit_2(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["tokenize", "--val-fractoin", "0.2"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --val-fractoin" in err and err.count("\n") == 1
