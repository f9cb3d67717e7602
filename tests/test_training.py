"""The trainer: it learns known sparse structure, counts dead latents, and resumes exactly."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from saepipe.config import replace_values
from saepipe.model.hooks import HookSpec
from saepipe.sae import SAEOutput, SparseAutoencoder, build_sae, sae_config
from saepipe.sae.provenance import RunRecord
from saepipe.training.checkpoints import load_checkpoint, newest_checkpoint
from saepipe.training.data import ActivationData, epoch_order, geometric_median
from saepipe.training.metrics import EpochMetrics, lr_factor
from saepipe.training.trainer import Trainer


def synthetic(n: int, d: int = 32, m: int = 48, active: int = 3, seed: int = 0):
    """Rows that are non-negative combinations of `active` of `m` unit directions, plus a common offset.

    The directions depend only on (d, m); `seed` draws the rows.
    """
    directions = torch.randn(m, d, generator=torch.Generator().manual_seed(1234))
    directions /= directions.norm(dim=1, keepdim=True)
    g = torch.Generator().manual_seed(seed)
    codes = torch.zeros(n, m)
    which = torch.stack([torch.randperm(m, generator=g)[:active] for _ in range(n)])
    codes.scatter_(1, which, torch.rand(n, active, generator=g) * 2 + 0.5)
    return codes @ directions + 0.3, directions


def make_data(rows: torch.Tensor, val_rows: torch.Tensor) -> ActivationData:
    return ActivationData(train=rows, validation=val_rows, scale=1.0,
                          attrs={"model_name": "synthetic", "hook": "blocks.0.hook_resid_post"},
                          dropped_outliers={"train": 0, "validation": 0})


RECORD = RunRecord(run_name="run", model_name="tiny", hook=HookSpec(1, "hook_resid_post"), d_in=32,
                   activation_scale=1.0, normalize_activations=False, prepend_bos=False, context_size=64,
                   train_config={"lr": 3e-3}, data={}, code={})


def train_config(repo_params, **changes):
    return replace_values(repo_params.train, **{"num_epochs": 3, "batch_size": 256, "lr": 3e-3,
                                                "lr_warmup_steps": 5, "topk": 3, "topk_aux": 16,
                                                "log_freq": 5, "device": "cpu", **changes})


def test_learns_known_sparse_dictionary(repo_params, tmp_path) -> None:
    rows, directions = synthetic(6144)
    val, _ = synthetic(512, seed=1)
    cfg = train_config(repo_params, num_epochs=12)
    torch.manual_seed(0)
    sae = build_sae(sae_config("batch_topk", d_in=32, d_sae=96, k=3, k_aux=16))
    result = Trainer(sae, make_data(rows, val), cfg, tmp_path / "run", None, torch.device("cpu"),
                     progress=False).fit()
    losses = [r["loss"] for r in result.history]
    assert losses[-1] < 0.5 * losses[0]
    assert result.history[-1]["val_fvu"] < 0.2
    decoder = sae.W_dec.detach() / sae.W_dec.detach().norm(dim=1, keepdim=True)
    best_cos = (directions @ decoder.t()).max(dim=1).values
    assert (best_cos > 0.9).float().mean() >= 0.95, best_cos.sort().values[:5]


def test_resume_after_a_kill_matches_an_uninterrupted_run(repo_params, tmp_path) -> None:
    rows, _ = synthetic(2048)
    val, _ = synthetic(256, seed=1)
    cfg = train_config(repo_params, num_epochs=3, checkpoint_freq=1)

    def fresh():
        torch.manual_seed(0)
        return build_sae(sae_config("batch_topk", d_in=32, d_sae=64, k=3, k_aux=16))

    full = fresh()
    Trainer(full, make_data(rows, val), cfg, tmp_path / "full", None, torch.device("cpu"), progress=False).fit()

    class Kill:
        def log_epoch(self, epoch, metrics, step=None):
            if epoch == 1:
                raise KeyboardInterrupt

        def log_validation(self, step, metrics):
            pass

    with pytest.raises(KeyboardInterrupt):
        Trainer(fresh(), make_data(rows, val), cfg, tmp_path / "killed", None, torch.device("cpu"),
                logger=Kill(), progress=False).fit()
    assert newest_checkpoint(tmp_path / "killed").name == "checkpoint_epoch1.pt"
    resumed = build_sae(sae_config("batch_topk", d_in=32, d_sae=64, k=3, k_aux=16))  # other init
    result = Trainer(resumed, make_data(rows, val), replace_values(cfg, resume=True), tmp_path / "killed", None,
                     torch.device("cpu"), progress=False).fit()
    assert [int(r["epoch"]) for r in result.history] == [1, 2, 3]
    for name, value in full.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name


def test_resume_of_a_finished_run_says_so_and_changes_nothing(repo_params, tmp_path, capsys) -> None:
    rows, _ = synthetic(1024)
    cfg = train_config(repo_params, num_epochs=3)
    Trainer(build_sae(sae_config("topk", d_in=32, d_sae=64, k=3)), make_data(rows, rows[:128]), cfg,
            tmp_path / "run", None, torch.device("cpu"), progress=False).fit()
    before = (tmp_path / "run" / "checkpoint_epoch3.pt" / "sae.safetensors").read_bytes()
    capsys.readouterr()
    again = build_sae(sae_config("topk", d_in=32, d_sae=64, k=3))
    result = Trainer(again, make_data(rows, rows[:128]), replace_values(cfg, resume=True, num_epochs=2),
                     tmp_path / "run", None, torch.device("cpu"), progress=False).fit()
    out = capsys.readouterr().out
    assert "run is complete at epoch 3 (train.num_epochs=2)" in out
    assert "--resume --num-epochs 4" in out
    assert len(result.history) == 3 and sorted(p.name for p in (tmp_path / "run").iterdir())[-1] == "history.json"
    assert (tmp_path / "run" / "checkpoint_epoch3.pt" / "sae.safetensors").read_bytes() == before


def test_checkpoint_layout_and_safe_loading(repo_params, tmp_path) -> None:
    rows, _ = synthetic(1024)
    cfg = train_config(repo_params, num_epochs=2, checkpoint_freq=5)
    sae = build_sae(sae_config("topk", d_in=32, d_sae=64, k=3, k_aux=16))
    run = tmp_path / "run"
    Trainer(sae, make_data(rows, rows[:128]), cfg, run, RECORD, torch.device("cpu"), progress=False).fit()
    names = sorted(p.name for p in run.iterdir())
    assert names == ["best_model.pt", "checkpoint_epoch2.pt", "history.json"]  # freq 5: only the last epoch
    checkpoint = load_checkpoint(run / "checkpoint_epoch2.pt")
    assert checkpoint.state["epoch"] == 2 and checkpoint.run_record() == RECORD
    assert set(checkpoint.tensors) == {"optimizer", "last_fired", "torch_rng"}
    torch.load(run / "best_model.pt" / "optimizer.pt", weights_only=True)
    history = json.loads((run / "history.json").read_text())
    expected = {"loss", "recon_loss", "l1_loss", "sparsity", "recon_contribution", "l1_contribution", "aux_loss",
                "dead_features", "dead_feature_percentage", "l0", "fvu", "explained_variance", "cos_sim"}
    assert expected <= set(history[-1])
    assert {f"val_{name}" for name in expected} <= set(history[-1])


def test_dead_latents_counted_over_the_token_window(repo_params, tmp_path) -> None:
    rows, _ = synthetic(1024)
    sae = build_sae(sae_config("topk", d_in=32, d_sae=64, k=3, k_aux=0))
    with torch.no_grad():
        sae.b_enc[:10] = -1e4  # these ten can never win a top-k slot
    cfg = train_config(repo_params, num_epochs=1, topk_aux=0, dead_window_tokens=512, lr=1e-6)
    result = Trainer(sae, make_data(rows, rows[:64]), cfg, tmp_path / "run", None, torch.device("cpu"),
                     progress=False).fit()
    assert result.history[-1]["dead_features"] >= 10
    cfg = train_config(repo_params, num_epochs=1, topk_aux=0, dead_window_tokens=10**9, lr=1e-6)
    result = Trainer(sae, make_data(rows, rows[:64]), cfg, tmp_path / "run2", None, torch.device("cpu"),
                     progress=False).fit()
    assert result.history[-1]["dead_features"] == 0  # the window has not passed yet


def test_epoch_metrics_fvu_is_global_not_per_batch() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 8, generator=g) * torch.linspace(0.1, 3, 8) + 5
    x_hat = x + 0.3 * torch.randn(300, 8, generator=g)
    metrics = EpochMetrics(d_sae=16)
    for start in range(0, 300, 64):
        batch = slice(start, start + 64)
        metrics.add(x[batch], x_hat[batch], nnz=2 * len(x[batch]), terms={"loss": 1.0})
    fvu = ((x - x_hat).double().pow(2).sum() / (x.double() - x.double().mean(0)).pow(2).sum()).item()
    summary = metrics.summary()
    assert summary["fvu"] == pytest.approx(fvu, rel=1e-6)  # float32 row sums, float64 totals
    assert summary["explained_variance"] == pytest.approx(1 - fvu, rel=1e-6)
    assert summary["l0"] == pytest.approx(2.0)
    assert summary["sparsity"] == pytest.approx(2.0 / 16)


def test_lr_schedule_and_shuffle() -> None:
    factors = [lr_factor(s, 100, 10, 0.2) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == 1.0 and factors[50] == 1.0
    assert factors[80] == pytest.approx(1.0) and factors[99] == pytest.approx(0.05)
    assert all(a >= b for a, b in itertools.pairwise(factors[80:]))
    assert torch.equal(epoch_order(100, 0, 1), epoch_order(100, 0, 1))
    assert not torch.equal(epoch_order(100, 0, 1), epoch_order(100, 0, 2))


def test_geometric_median_resists_outliers() -> None:
    points = torch.cat([torch.randn(200, 4) * 0.1, torch.full((20, 4), 100.0)])
    assert geometric_median(points).abs().max() < 0.5
    assert points.mean(0).abs().max() > 5


def auxk_reference(sae: SparseAutoencoder, x: Tensor, out: SAEOutput, dead: Tensor) -> Tensor:
    """AuxK written the straightforward way, for autograd: dead latents' top-k_aux (by the forward's
    pre-activations) reconstruct the residual; normalised by its variance, scaled by min(1, dead / k_aux)."""
    dead_ids = dead.nonzero().squeeze(1)
    pre = torch.addmm(sae.b_enc[dead_ids], x - sae.b_dec, sae.W_enc[:, dead_ids])
    if len(dead_ids) > sae.cfg.k_aux:
        keep = torch.topk(out.pre[:, dead_ids], sae.cfg.k_aux, dim=1, sorted=False).indices
        pre = pre * torch.zeros_like(pre, dtype=torch.bool).scatter_(1, keep, True)
    residual = (x - out.x_hat).detach()
    residual_hat = F.relu(pre) @ sae.W_dec[dead_ids]
    variance = (residual - residual.mean(0)).pow(2).sum().clamp_min(1e-12)
    return (residual_hat - residual).pow(2).sum() / variance * min(1.0, len(dead_ids) / sae.cfg.k_aux)


@pytest.mark.parametrize("n_dead", [5, 40])  # fewer and more dead latents than k_aux
def test_auxk_term_matches_autograd(n_dead: int) -> None:
    torch.manual_seed(0)
    sae = build_sae(sae_config("batch_topk", d_in=16, d_sae=64, k=4, k_aux=12))
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(std=0.1)
    x = torch.randn(50, 16)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[torch.randperm(64)[:n_dead]] = True
    out = sae(x)
    reference = auxk_reference(sae, x, out, dead)
    grads = torch.autograd.grad(0.25 * reference, [sae.W_enc, sae.W_dec, sae.b_enc, sae.b_dec])
    term = sae.auxk_term(x, out, dead)
    assert float(term.loss) == pytest.approx(float(reference), rel=1e-5)
    for param in sae.parameters():
        param.grad = None
    term.add_grads_(0.25)
    for param, expected in zip([sae.W_enc, sae.W_dec, sae.b_enc, sae.b_dec], grads, strict=True):
        assert torch.allclose(param.grad, expected, atol=1e-6, rtol=1e-4)
    assert sae.auxk_term(x, out, torch.zeros(64, dtype=torch.bool)) is None


# ---- BatchTopK's inference threshold is calibrated, not estimated ---------------------------------------------
def calibrated_run(repo_params, tmp_path, arch: str, k: int, **changes):
    rows, _ = synthetic(4096, m=96, active=6)
    val, _ = synthetic(1024, m=96, active=6, seed=1)
    extra = {"matryoshka_prefixes": [24, 48]} if arch == "matryoshka" else {}
    torch.manual_seed(0)
    sae = build_sae(sae_config(arch, d_in=32, d_sae=128, k=k, k_aux=16, **extra))
    cfg = train_config(repo_params, num_epochs=2, topk=k, **changes)  # 32 steps: a running estimate still lags
    result = Trainer(sae, make_data(rows, val), cfg, tmp_path / arch / str(k), None, torch.device("cpu"),
                     progress=False).fit()
    return sae, rows, result.history


@pytest.mark.parametrize("arch", ["batch_topk", "matryoshka"])
def test_inference_keeps_k_latents_on_the_training_rows(repo_params, tmp_path, arch) -> None:
    sae, rows, history = calibrated_run(repo_params, tmp_path, arch, k=6)
    with torch.no_grad():
        l0 = float((sae.encode(rows) != 0).sum(1).float().mean())
    record = history[-1]
    assert l0 == pytest.approx(6, rel=0.01)
    assert record["calibration_rows"] == 4096 and record["calibration_l0"] == pytest.approx(6, rel=0.01)
    assert record["inference_threshold"] == pytest.approx(float(sae.threshold))
    assert record["val_l0"] == pytest.approx(6, rel=0.2)  # held-out rows: close to k, not pinned to it


def test_calibration_uses_a_seeded_sample_when_the_split_is_larger(repo_params, tmp_path) -> None:
    sae, rows, history = calibrated_run(repo_params, tmp_path, "batch_topk", k=6, calibration_rows=1000)
    assert history[-1]["calibration_rows"] == 1000
    with torch.no_grad():
        l0 = float((sae.encode(rows) != 0).sum(1).float().mean())
    assert l0 == pytest.approx(6, rel=0.1)  # the whole split: a 1,000-row sample (per-row sd ~4) generalises


def test_validated_l0_grows_with_k(repo_params, tmp_path) -> None:
    """The sweep that exposed the lagging estimate: evaluated L0 stayed flat whatever k was."""
    l0s = [calibrated_run(repo_params, tmp_path, "batch_topk", k=k)[2][-1]["val_l0"] for k in (3, 6, 12)]
    assert l0s == sorted(l0s)
    for k, l0 in zip((3, 6, 12), l0s, strict=True):
        assert 0.8 * k <= l0 <= 1.25 * k, (k, l0)


def test_both_exports_carry_the_calibrated_threshold(repo_params, tmp_path) -> None:
    """Ours and SAELens's loader encode with the calibrated threshold: k latents per training token."""
    from saepipe.sae.formats import CONFIG, export_sae, load_sae

    _, rows, history = calibrated_run(repo_params, tmp_path, "batch_topk", k=6)
    checkpoint = load_checkpoint(tmp_path / "batch_topk" / "6" / "best_model.pt")
    record = RunRecord(**{**RECORD.__dict__, "d_in": 32})
    out = tmp_path / "export"
    export_sae(checkpoint.sae, record, checkpoint.history, out, checkpoint.identity())
    written = json.loads((out / CONFIG).read_text())["calibration"]
    best = history[checkpoint.state["epoch"] - 1]
    assert written == {"threshold": best["inference_threshold"], "rows": 4096, "train_l0": best["calibration_l0"],
                       "val_l0": best["val_l0"]}
    with torch.no_grad():
        ours = load_sae(out).encode(rows)
    assert float((ours != 0).sum(1).float().mean()) == pytest.approx(6, rel=0.01)
    sae_lens = pytest.importorskip("sae_lens")
    with torch.no_grad():
        theirs = sae_lens.SAE.load_from_disk(str(out)).encode(rows)
    torch.testing.assert_close(theirs, ours)


def test_only_the_newest_epoch_checkpoints_are_kept(repo_params, tmp_path) -> None:
    rows, _ = synthetic(512)
    cfg = train_config(repo_params, num_epochs=4, keep_checkpoints=2, checkpoint_freq=1)
    sae = build_sae(sae_config("topk", d_in=32, d_sae=64, k=3, k_aux=16))
    Trainer(sae, make_data(rows, rows[:128]), cfg, tmp_path / "run", None, torch.device("cpu"), progress=False).fit()
    names = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert names == ["best_model.pt", "checkpoint_epoch3.pt", "checkpoint_epoch4.pt", "history.json"]


def test_a_token_budget_sets_the_epochs(repo_params, tmp_path) -> None:
    rows, _ = synthetic(512)
    cfg = train_config(repo_params, num_epochs=None, training_tokens=1300, batch_size=128)
    assert cfg.epochs(512) == 3 and replace_values(cfg, num_epochs=5).epochs(512) == 5
    sae = build_sae(sae_config("topk", d_in=32, d_sae=64, k=3, k_aux=16))
    result = Trainer(sae, make_data(rows, rows[:128]), cfg, tmp_path / "run", None, torch.device("cpu"),
                     progress=False).fit()
    assert len(result.history) == 3
    assert load_checkpoint(tmp_path / "run" / "checkpoint_epoch3.pt").state["num_epochs"] == 3


def test_validation_between_epochs_changes_nothing_but_the_curves(repo_params, tmp_path) -> None:
    """`train.val_every_steps` adds curve points between epoch ends; the weights, every buffer (BatchTopK's
    threshold), the history, the best epoch and the RNG state a checkpoint saves are bit for bit those of a
    run without them."""
    rows, _ = synthetic(2048)
    val, _ = synthetic(256, seed=1)

    class Points:
        def __init__(self):
            self.epochs, self.between = [], []

        def log_epoch(self, epoch, metrics, step=None):
            self.epochs.append((epoch, step))

        def log_validation(self, step, metrics):
            self.between.append((step, metrics))

    def train(every: int, logger=None):
        torch.manual_seed(0)
        sae = build_sae(sae_config("batch_topk", d_in=32, d_sae=64, k=3, k_aux=16))
        cfg = train_config(repo_params, val_every_steps=every)  # 3 epochs x 8 steps of 256 rows
        result = Trainer(sae, make_data(rows, val), cfg, tmp_path / f"every{every}", None, torch.device("cpu"),
                         logger=logger, progress=False).fit()
        return sae, result, load_checkpoint(newest_checkpoint(tmp_path / f"every{every}")).tensors["torch_rng"]

    points = Points()
    plain, plain_result, plain_rng = train(0)
    sae, result, rng = train(3, points)
    for name, value in plain.state_dict().items():
        assert torch.equal(value, sae.state_dict()[name]), name
    timing = ("seconds", "activations_per_second")
    assert [{k: v for k, v in r.items() if k not in timing} for r in result.history] == \
        [{k: v for k, v in r.items() if k not in timing} for r in plain_result.history]
    assert result.best_epoch == plain_result.best_epoch and torch.equal(rng, plain_rng)
    assert points.epochs == [(1, 8), (2, 16), (3, 24)]  # the epochs' points at the step each ended on
    assert [step for step, _ in points.between] == [3, 6, 9, 12, 15, 18, 21]  # 24 ends epoch 3: validated there
    for step, figures in points.between:
        assert figures["epoch"] == step / 8 and 0 <= figures["val_fvu"] < 1.5
        assert 1.5 <= figures["val_l0"] <= 6  # calibrated to k = 3 on the subsample, not the running estimate


def test_interval_steps_default_to_about_sixteen_points_a_run() -> None:
    from saepipe.training.trainer import INTERVAL_POINTS, interval_steps

    steps = 1012  # the default run: 23 epochs of 44 steps
    assert steps // interval_steps(None, steps) == INTERVAL_POINTS
    assert interval_steps(None, 5) == 1 and interval_steps(0, 1012) == 0 and interval_steps(50, 1012) == 50
