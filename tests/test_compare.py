"""`saepipe compare`: the table's rules (Pareto front, seed groups, the noise rule), the feature matcher, and the
command on tiny finished runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import with_section, write_params
from saepipe.cli import main
from saepipe.compare import table
from saepipe.compare.match import activation_correlation, match_features, unit_rows


def test_pareto_front_is_exactly_the_non_dominated_points() -> None:
    l0 = [10, 20, 30, 20, 40, 15]
    fvu = [0.5, 0.3, 0.2, 0.35, 0.2, 0.5]
    # 3 is beaten by 1 (same L0, lower FVU); 4 by 2 (same FVU, lower L0); 5 by 0 (same FVU, lower L0)
    assert table.pareto_front(l0, fvu, higher_is_better=False) == [0, 1, 2]
    ce = [0.8, 0.9, 0.95, 0.97, 0.9, 0.7]
    assert table.pareto_front(l0, ce, higher_is_better=True) == [0, 3]  # 3 beats 1 and 2 at lower L0
    assert table.pareto_front([5, 5], [0.1, 0.1], False) == [0, 1]  # equal points dominate neither
    assert table.pareto_front([5, None], [0.1, 0.05], False) == [0]  # a run without L0 is not placed
    assert table.pareto_front([5, 6], [0.1, None], True) == [0]  # nor one without the figure


def test_seed_groups_and_the_noise_rule() -> None:
    names = ["a0", "a1", "b0", "b1", "c0"]
    params = [{"train.topk": 16, "train.seed": 0}, {"train.topk": 16, "train.seed": 1},
              {"train.topk": 32, "train.seed": 0}, {"train.topk": 32, "train.seed": 1},
              {"train.topk": 64, "train.seed": 0}]
    fvu = [0.30, 0.32, 0.305, 0.315, 0.20]
    groups = table.seed_groups(names, params, [{"fvu": v} for v in fvu])
    by_label = {g.label: g for g in groups}
    assert sorted(by_label) == ["topk=16", "topk=32", "topk=64"]
    a, b, c = by_label["topk=16"], by_label["topk=32"], by_label["topk=64"]
    assert a.members == ["a0", "a1"] and a.mean["fvu"] == pytest.approx(0.31)
    assert a.sd["fvu"] == pytest.approx(np.std([0.30, 0.32], ddof=1))
    assert table.within_noise(a, b, "fvu") is True  # 0.31 vs 0.31: no difference at all
    far = table.Group(config={}, members=["x", "y"], mean={"fvu": 0.40}, sd={"fvu": 0.005})
    assert table.within_noise(a, far, "fvu") is False  # 0.09 apart, 2 sd = 0.028
    assert table.within_noise(a, c, "fvu") is None  # c has one seed: no noise estimate
    assert table.differing_params(params) == ["train.seed", "train.topk"]


def test_winners_follow_each_figures_direction() -> None:
    metrics = [{"fvu": 0.3, "ce_recovered": 0.9, "l0": 10}, {"fvu": 0.2, "ce_recovered": 0.8, "l0": 40}]
    assert table.winners(["a", "b"], metrics) == {"fvu": "b", "ce_recovered": "a"}


def _dictionary(n: int, d: int, seed: int) -> torch.Tensor:
    return unit_rows(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)))


def test_a_run_matches_itself_and_a_permuted_copy_exactly() -> None:
    a = _dictionary(300, 32, 0)
    same = match_features(a, a.clone(), block=64)
    assert (same.match == np.arange(300)).all() and np.allclose(same.cosine, 1, atol=1e-5)
    assert same.share(0.9) == 1.0
    perm = torch.randperm(300, generator=torch.Generator().manual_seed(1))
    shuffled = match_features(a, a[perm], block=64)
    inverse = torch.argsort(perm).numpy()
    assert (shuffled.match == inverse).all() and (shuffled.best == inverse).all()
    assert shuffled.share(0.9) == 1.0 and shuffled.share(0.9, among=np.array([0, 5])) == 1.0


def test_independent_random_dictionaries_match_near_chance() -> None:
    a, b = _dictionary(200, 64, 0), _dictionary(200, 64, 1)
    found = match_features(a, b, block=50)
    assert found.share(0.7) == 0.0
    # the best of 200 random cosines in 64 dimensions sits near 0.3: far from a real match
    assert 0.15 < float(found.best_cosine.mean()) < 0.45
    assert len(set(found.match[found.match >= 0].tolist())) == (found.match >= 0).sum()  # one to one


def test_splits_list_the_wider_dictionarys_latents_that_share_a_direction() -> None:
    a = torch.eye(4, 16)
    children = unit_rows(torch.stack([a[0] + 0.5 * torch.eye(16)[8], a[0] + 0.5 * torch.eye(16)[9]]))
    b = torch.cat([children, torch.eye(16)[1:4], torch.eye(16)[10:15]])
    found = match_features(a, b, split_cosine=0.6, block=2)
    assert [j for j, _ in found.splits[0]] == [0, 1] and all(c > 0.85 for _, c in found.splits[0])
    assert [len(s) for s in found.splits[1:]] == [1, 1, 1]
    assert found.match[0] in (0, 1) and list(found.match[1:]) == [2, 3, 4]


def test_activation_correlation_is_pearsons_r_over_every_token() -> None:
    rng = np.random.default_rng(0)
    n = 500
    x = np.where(rng.random(n) < 0.1, rng.random(n), 0.0)
    y = np.where(rng.random(n) < 0.5, x * 2 + rng.random(n) * 0.1, 0.0)
    z = np.zeros(n)

    def sparse(v):
        rows = np.flatnonzero(v)[::-1].copy()  # any order, as the DB keeps them by activation
        return rows, v[rows].astype(np.float32)

    r = activation_correlation([sparse(x), sparse(x)], [sparse(y), sparse(z)], n)
    assert r[0] == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-5)
    assert np.isnan(r[1])  # a latent that never fires has no correlation


# --- the command on tiny finished runs ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished(trained_pipeline, tmp_path_factory):
    """Four tiny runs through evaluate (k 4 and 6, seeds 0 and 1) in their own analysis folder, the two k 4
    runs with activation DBs; returns the params file every command reads and the root."""
    from saepipe.stages import activation_db, evaluate, export, train

    root = tmp_path_factory.mktemp("compare")
    base = with_section(trained_pipeline, "train", output_dir=str(root / "ckpts"))
    base = with_section(base, "export", output_dir=str(root / "sae"))
    base = with_section(base, "evaluate", output_dir=str(root / "analysis"), ablation_max_tokens=64)
    base = with_section(base, "compare", output_dir=str(root / "analysis" / "compare"))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        for topk in (4, 6):
            for seed in (0, 1):
                params = with_section(base, "train", run_name=f"k{topk}s{seed}", topk=topk, seed=seed)
                for stage in (train, export, evaluate):
                    stage.run(params)
                if topk == 4:
                    activation_db.run(params)
    return write_params(base, root / "params.yaml"), root


def compare(root: Path, *args: str) -> int:
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)  # not a DVC project: no experiments
        return main(["compare", "--params", str(root / "params.yaml"), *args])


def test_compare_tables_every_finished_run_with_groups_and_a_frontier(finished, capsys) -> None:
    _, root = finished
    assert compare(root) == 0
    out = root / "analysis" / "compare"
    result = json.loads((out / "compare.json").read_text())
    assert sorted(r["name"] for r in result["runs"]) == ["k4s0", "k4s1", "k6s0", "k6s1"]
    assert result["differing_params"] == ["train.seed", "train.topk"]  # not the run names or their folders
    assert sorted(g["label"] for g in result["groups"]) == ["topk=4", "topk=6"]
    group = next(g for g in result["groups"] if g["label"] == "topk=4")
    fvu = [r["metrics"]["fvu"] for r in result["runs"] if r["name"] in ("k4s0", "k4s1")]
    assert group["mean"]["fvu"] == pytest.approx(np.mean(fvu)) and group["sd"]["fvu"] == pytest.approx(
        np.std(fvu, ddof=1))
    assert {n["metric"] for n in result["noise"]} == {"fvu", "ce_recovered", "kl"}
    best = min(result["runs"], key=lambda r: r["metrics"]["fvu"])
    assert result["winners"]["fvu"] == best["name"] and best["pareto_fvu"]
    readme = (out / "README.md").read_text()
    assert "## Seed noise" in readme and "| topk=4 | 2 |" in readme and "frontier.png" in readme
    assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "compare: 4 runs" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--runs", "k4s0"], "only one finished run (k4s0)"),
    (["--runs", "k4s0", "nope"], "--runs: no workspace runs in"),
    (["--runs", "broken", "k4s0"], "no workspace runs"),
    (["--experiments"], "no finished run to compare"),
    (["--features", "k4s0", "nope"], "--features: no finished run named nope"),
])
def test_bad_selections_are_one_line_and_exit_2(finished, capsys, args, message) -> None:
    _, root = finished
    (root / "analysis" / "broken" / "quick").mkdir(parents=True, exist_ok=True)  # evaluate never finished
    assert compare(root, *args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_features_of_a_run_against_itself_and_another_seed(finished, capsys) -> None:
    _, root = finished
    assert compare(root, "--features", "k4s0", "k4s0") == 0
    same = json.loads((root / "analysis/compare/features/k4s0--k4s0/summary.json").read_text())
    assert same["matched_0.9"] == 1.0 and same["mean_correlation"] == pytest.approx(1.0, abs=1e-5)
    records = [json.loads(line) for line in
               (root / "analysis/compare/features/k4s0--k4s0/features.jsonl").read_text().splitlines()]
    assert [r["match"] for r in records] == list(range(len(records)))
    assert compare(root, "--features", "k4s0", "k4s1") == 0
    other = json.loads((root / "analysis/compare/features/k4s0--k4s1/summary.json").read_text())
    assert other["matched_0.7"] <= 1.0 and other["alive_a"] <= other["d_a"] and "greedy" in other["method"]
    script = (root / "analysis/k4s0/matches/index.js").read_text()
    known = json.loads(script[script.index("{"):script.rindex("}") + 1])
    assert set(known) == {"k4s0", "k4s1"} and known["k4s1"]["browser"] is None  # k4s1 has no report here
    assert "matched at cosine >= 0.9" in capsys.readouterr().out


def test_experiments_keep_only_the_figures_their_own_stages_wrote() -> None:
    """`dvc exp show --json` records: an experiment run up to evaluate inherits its baseline's interp files
    (dropped), one whose SAE is the baseline's keeps them, an unfinished one (no headline) is skipped."""
    from saepipe.compare.runs import experiment_runs

    quick, interp, sae = "analysis/default/quick", "analysis/default/interp", "models/sae/default"

    def record(name, sae_hash, density_hash, interp_hash, headline):
        metrics = {f"{quick}/headline.json": {"data": headline},
                   f"{interp}/probing.json": {"data": {"subject_k1": 0.7}},
                   f"{interp}/autointerp.json": {"data": {"detection": 0.6}}}
        outs = {sae: {"hash": sae_hash}, f"{quick}/feature_density.npy": {"hash": density_hash},
                f"{interp}/probing_features.json": {"hash": interp_hash}}
        train = {"run_name": "default", "topk": 4}
        params = {"params.yaml": {"data": {"train": train, "export": {"output_dir": "models/sae"}}}}
        return {"rev": name * 8, "name": name, "data": {"params": params, "metrics": metrics, "outs": outs}}

    baseline = record("base", "s0", "d0", "i0", {"fvu": 0.2, "l0": 30.0})
    baseline["experiments"] = [
        {"name": "k8", "revs": [record("k8", "s1", "d1", "i0", {"fvu": 0.15, "l0": 60.0})]},     # up to evaluate
        {"name": "same", "revs": [record("same", "s0", "d0", "i0", {"fvu": 0.2, "l0": 30.0})]},  # the baseline's SAE
        {"name": "running", "revs": [record("running", "s2", "d0", "i0", {"fvu": 0.2, "l0": 30.0})]},  # no evaluate
    ]
    runs = {r.name: r for r in experiment_runs([baseline])}
    assert sorted(runs) == ["k8", "same"]
    assert runs["k8"].metrics["fvu"] == 0.15 and runs["k8"].metrics["subject_k1"] is None
    assert runs["k8"].metrics["detection"] is None and runs["k8"].sae.rev == "k8" * 8
    assert runs["same"].metrics["subject_k1"] == 0.7 and runs["same"].metrics["detection"] == 0.6


def test_labels_of_near_identical_runs_go_apart() -> None:
    from saepipe.compare.plots import label_offsets

    offsets = dict(label_offsets([20.0, 20.1, 40.0, 73.0], [0.97, 0.98, 0.98, 0.99], [10, 11, 12, 13]))
    assert offsets[11] == 4 and offsets[10] == -10  # the cluster at L0 20: the higher above, the lower below
    assert offsets[12] == 4 and offsets[13] == 4  # alone: above
