"""The SAE training loop: activations in, a trained SAE and its checkpoints out.

It knows the SAE only through the base class (forward -> SAEOutput, auxk_term, after_step, and for
validation the inference path: pre_activations, inference_codes, sparsity_loss), so every architecture
trains the same way; the decoder's unit-norm constraint is ConstrainedAdam's. It knows no language model:
end-to-end losses arrive as a callable that returns an extra loss term.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor
from tqdm import tqdm

from saepipe.config import TrainConfig
from saepipe.distributed import World
from saepipe.kernels import decode_sparse
from saepipe.sae import SAEOutput, SparseAutoencoder
from saepipe.sae.base import AuxKTerm, decoded_mse
from saepipe.sae.provenance import RunRecord
from saepipe.storage import write_json
from saepipe.training.allocator import keep_freed_memory
from saepipe.training.checkpoints import (
    BEST,
    EPOCH_RE,
    epoch_checkpoints,
    epoch_dir,
    load_checkpoint,
    newest_checkpoint,
    save_checkpoint,
)
from saepipe.training.data import ActivationData, epoch_order, geometric_median, iter_batches
from saepipe.training.guards import check_finite_loss
from saepipe.training.metrics import EpochMetrics, lr_factor, warmup_factor
from saepipe.training.optimizer import ConstrainedAdam
from saepipe.training.parallel import batch_bounds, gather_sample, rank_block, scale_gradients_, share_gradients_

DEFAULT_DEAD_WINDOW = 10_000_000
B_DEC_SAMPLE_ROWS = 32_768
INTERVAL_POINTS = 16
"""Validations per run between epoch ends when `train.val_every_steps` is null."""
INTERVAL_ROWS = 8_192
"""Rows of each split an interval validation reads: calibration and validation on fixed, evenly spread subsamples."""

# (sae, activation scale, step) -> (loss term to add, figures to log)
EndToEndLoss = Callable[[SparseAutoencoder, float, int], tuple[Tensor, dict[str, float]]]


class EpochLogger(Protocol):
    def log_epoch(self, epoch: int, metrics: dict[str, float], step: int | None = None) -> None: ...

    def log_validation(self, step: int, metrics: dict[str, float]) -> None: ...


@dataclass
class TrainResult:
    history: list[dict[str, float]]
    best_epoch: int
    run_dir: Path
    seconds: float


class DeadLatents:
    """A latent is dead when it has not fired in the last `window` training tokens."""

    def __init__(self, d_sae: int, window: int, device: torch.device):
        self.window = window
        self.last_fired = torch.zeros(d_sae, dtype=torch.long, device=device)

    def update(self, cols: Tensor, tokens_seen: int) -> None:
        self.last_fired[cols] = tokens_seen

    def mask(self, tokens_seen: int) -> Tensor:
        return (tokens_seen - self.last_fired) >= self.window


class Trainer:
    def __init__(self, sae: SparseAutoencoder, data: ActivationData, cfg: TrainConfig, run_dir: Path,
                 run: RunRecord | None, device: torch.device, logger: EpochLogger | None = None,
                 end_to_end: EndToEndLoss | None = None, progress: bool = True, world: World | None = None):
        self.world = world or World()
        if self.world.distributed and end_to_end is not None:
            raise ValueError("end-to-end losses are not supported in data-parallel training")
        self.sae = sae.to(device)
        if self.world.distributed:
            self.sae.shards = self.world
            for tensor in (*self.sae.parameters(), *self.sae.buffers()):  # one starting point for every rank
                self.world.broadcast_(tensor.data)
        self.data = data
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.run = run
        self.device = device
        self.logger = logger
        self.end_to_end = end_to_end
        self.progress = progress
        self.steps_per_epoch = len(batch_bounds(data.n_train, cfg.batch_size, self.world))
        self.num_epochs = cfg.epochs(data.n_train)
        self.total_steps = self.steps_per_epoch * self.num_epochs
        window = cfg.dead_window_tokens or min(DEFAULT_DEAD_WINDOW, data.n_train)
        self.dead = DeadLatents(sae.d_sae, window, device)
        # The decoder's rows stay unit-norm: the optimizer projects their gradients and renormalises them.
        others = [param for param in self.sae.parameters() if param is not self.sae.W_dec]
        self.optimizer = ConstrainedAdam([{"params": [self.sae.W_dec], "unit_rows": True}, {"params": others}],
                                         lr=cfg.lr, betas=tuple(cfg.adam_betas))
        self.step = 0
        self.tokens_seen = 0
        self.epoch = 0
        self.history: list[dict[str, float]] = []
        self.best_val_loss = math.inf
        self.best_epoch = 0
        generator = torch.Generator().manual_seed(cfg.seed + 1)
        self.calibration_ids = torch.randperm(data.n_train, generator=generator)[: cfg.calibration_rows].sort().values
        self._calibration_rows: Tensor | None = None  # under data parallelism: the sample, gathered once
        self.val_every = interval_steps(cfg.val_every_steps, self.total_steps)
        if self.world.distributed or data.validation.shape[0] == 0:  # only rank 0 holds the validation split
            self.val_every = 0

    # ---- setup -----------------------------------------------------------------------------------
    def initialise(self) -> None:
        """Decoder bias at the data's geometric median (or mean); encoder = decoder transpose (base init)."""
        if self.cfg.b_dec_init == "zeros":
            return
        generator = torch.Generator().manual_seed(self.cfg.seed)
        n = self.data.n_train
        sample = torch.randperm(n, generator=generator)[:B_DEC_SAMPLE_ROWS]
        if self.data.train_ids is not None:  # the same sample, each row from a rank that holds it
            rows = gather_sample(self.data.train, self.data.train_ids, sample, self.world, self.device)
            rows = rows * self.data.scale
        else:
            rows = self.data.train[sample].float() * self.data.scale
        centre = geometric_median(rows) if self.cfg.b_dec_init == "geometric_median" else rows.mean(0)
        with torch.no_grad():
            self.sae.b_dec.copy_(centre.to(self.device))

    def resume_or_start(self) -> None:
        latest = newest_checkpoint(self.run_dir) if self.cfg.resume else None
        if latest is None:
            self._clear_run_dir()
            self.initialise()
            return
        checkpoint = load_checkpoint(latest, map_location=self.device)
        self.sae.load_state_dict(checkpoint.sae.state_dict())
        self.optimizer.load_state_dict(checkpoint.tensors["optimizer"])
        self.dead.last_fired.copy_(checkpoint.tensors["last_fired"])
        torch.set_rng_state(checkpoint.tensors["torch_rng"])
        state = checkpoint.state
        self.epoch, self.step, self.tokens_seen = state["epoch"], state["step"], state["tokens_seen"]
        self.best_val_loss, self.best_epoch = state["best_val_loss"], state["best_epoch"]
        self.history = checkpoint.history
        print(f"train: resuming {self.run_dir} from {latest.name} (epoch {self.epoch}, step {self.step})")

    def _clear_run_dir(self) -> None:
        if not self.run_dir.is_dir() or not self.world.is_main:
            return
        for path in self.run_dir.iterdir():
            if EPOCH_RE.match(path.name) or path.name == BEST:
                shutil.rmtree(path)
            elif path.name == "history.json":
                path.unlink()

    # ---- the loop ----------------------------------------------------------------------------------
    def train_step(self, x: Tensor, metrics: EpochMetrics) -> None:
        cfg = self.cfg
        lr = cfg.lr * lr_factor(self.step, self.total_steps, cfg.lr_warmup_steps, cfg.lr_decay_fraction)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        out = self.sae(x)
        penalty = cfg.sparsity_penalty * warmup_factor(self.step, cfg.sparsity_warmup_steps)
        loss = out.recon_loss + penalty * out.sparsity_loss
        dead = self.dead.mask(self.tokens_seen)
        aux = self.sae.auxk_term(x, out, dead) if cfg.sae.topk_aux > 0 and cfg.aux_coefficient > 0 else None
        extra: dict[str, float] = {}
        if self.end_to_end is not None:
            e2e_loss, extra = self.end_to_end(self.sae, self.data.scale, self.step)
            loss = loss + e2e_loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.world.distributed:
            self._parallel_step(x, out, aux, penalty, metrics)
            return
        if aux is not None:
            aux.add_grads_(cfg.aux_coefficient)
        total = loss.detach() + cfg.aux_coefficient * aux.loss if aux is not None else loss.detach()
        self.optimizer.step()  # with the decoder-norm constraint
        self.sae.after_step(out)
        self.tokens_seen += x.shape[0]
        self.dead.update(out.codes.cols, self.tokens_seen)
        self.step += 1
        loss_value = total.item()
        check_finite_loss(loss_value, self.step, self.epoch + 1, lambda: newest_checkpoint(self.run_dir))
        metrics.add(x, out.x_hat, out.codes.nnz, {
            "loss": loss_value,
            "recon_loss": out.recon_loss.item(),
            "l1_loss": out.sparsity_loss.item(),
            "weighted_l1_loss": penalty * out.sparsity_loss.item(),
            "aux_loss": aux.loss.item() if aux is not None else 0.0,
            **extra,
        }, sums=out.sums)

    def _parallel_step(self, x: Tensor, out: SAEOutput, aux: AuxKTerm | None, penalty: float,
                       metrics: EpochMetrics) -> None:
        """The rest of a step when this rank holds one block of the global batch (`training.parallel`)."""
        cfg, rows = self.cfg, x.shape[0]
        global_rows = self.world.sum_int(rows, self.device)
        params = [param for param in self.sae.parameters() if param.requires_grad]
        scale_gradients_(params, rows / global_rows)  # the mean losses: this block's share of the batch
        if aux is not None:
            aux.add_grads_(cfg.aux_coefficient)  # already a sum over the batch with its global variance
        fired = torch.zeros(self.sae.d_sae, device=self.device)
        fired[out.codes.cols] = 1.0
        figures = torch.tensor([out.recon_loss.item() * rows, out.sparsity_loss.item() * rows,
                                float(aux.loss) if aux is not None else 0.0], device=self.device)
        shared = share_gradients_(params, self.world, torch.cat([fired, figures]))
        self.optimizer.step()  # the same summed gradients on every rank: the same step
        self.sae.after_step(out)
        self.tokens_seen += global_rows
        self.dead.update(shared[: self.sae.d_sae].nonzero().squeeze(1), self.tokens_seen)
        self.step += 1
        recon, sparsity, aux_loss = (float(v) for v in shared[self.sae.d_sae :].detach().double())
        recon, sparsity = recon / global_rows, sparsity / global_rows
        metrics.add(x, out.x_hat, out.codes.nnz, {
            "loss": recon + penalty * sparsity + cfg.aux_coefficient * aux_loss,
            "recon_loss": recon,
            "l1_loss": sparsity,
            "weighted_l1_loss": penalty * sparsity,
            "aux_loss": aux_loss,
        }, sums=out.sums)

    @torch.no_grad()
    def calibrate(self) -> dict[str, float]:
        """Fit the SAE's inference state (BatchTopK's threshold) on the seeded training sample, so that what
        validation measures, the best checkpoint is chosen by, and the export encodes with is exact."""
        n = int(self.calibration_ids.numel())
        if not self.world.distributed:
            batches = iter_batches(self.data.train, self.calibration_ids, self.cfg.batch_size, self.data.scale,
                                   self.device)
            return self.sae.calibrate_(batches, n) or {}
        if self._calibration_rows is None:  # every rank gets the same rows, each from a rank that holds it
            self._calibration_rows = gather_sample(self.data.train, self.data.train_ids, self.calibration_ids,
                                                   self.world, self.device)
        shards, self.sae.shards = self.sae.shards, None  # the sample is whole on every rank
        try:
            batches = (self._calibration_rows[start : start + self.cfg.batch_size] * self.data.scale
                       for start in range(0, n, self.cfg.batch_size))
            figures = self.sae.calibrate_(batches, n) or {}
        finally:
            self.sae.shards = shards
        for buffer in self.sae.buffers():  # rank 0's result, bit for bit, on every rank
            self.world.broadcast_(buffer)
        return figures

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Validation through the inference path: what an exported SAE does, token by token."""
        rows = self.data.validation
        if rows.shape[0] == 0:  # under data parallelism only rank 0 holds the validation split
            return {}
        shards, self.sae.shards = self.sae.shards, None  # every row on its own: nothing to share
        try:
            return self._validate(rows)
        finally:
            self.sae.shards = shards

    def _validate(self, rows: Tensor) -> dict[str, float]:
        self.sae.eval()
        metrics = EpochMetrics(self.sae.d_sae)
        dead = self.dead.mask(self.tokens_seen)
        for x in iter_batches(rows, None, self.cfg.batch_size, self.data.scale, self.device):
            pre = self.sae.pre_activations(x)
            codes = self.sae.inference_codes(pre)
            x_hat, recon, sums = decoded_mse(decode_sparse(codes, self.sae.W_dec), self.sae.b_dec, x)
            sparsity = self.sae.sparsity_loss(codes, pre)
            aux = self.sae.auxk_term(x, SAEOutput(x_hat, codes, pre, recon, sparsity, sums), dead)
            aux_loss = float(aux.loss) if aux is not None else 0.0
            loss = recon + self.cfg.sparsity_penalty * sparsity + self.cfg.aux_coefficient * aux_loss
            metrics.add(x, x_hat, codes.nnz, {"loss": loss.item(), "recon_loss": recon.item(),
                                               "l1_loss": sparsity.item(), "aux_loss": aux_loss,
                                               "weighted_l1_loss": self.cfg.sparsity_penalty * sparsity.item()},
                        sums=sums)
        self.sae.train()
        return metrics.summary("val_")

    @torch.no_grad()
    def validate_between_epochs(self) -> dict[str, float]:
        """A curve point between epoch ends: the inference state calibrated on a subsample of the calibration
        rows, validation on a subsample of the validation split. It reads the SAE and restores every buffer it
        touched (BatchTopK's threshold), draws no random numbers, and feeds nothing back: training and the
        choice of the best epoch go on exactly as without it."""
        saved = {name: buffer.clone() for name, buffer in self.sae.named_buffers()}
        try:
            ids = spread(self.calibration_ids, INTERVAL_ROWS)
            figures = self.sae.calibrate_(iter_batches(self.data.train, ids, self.cfg.batch_size, self.data.scale,
                                                       self.device), int(ids.numel())) or {}
            rows = self.data.validation
            figures.update(self._validate(rows[spread(torch.arange(rows.shape[0]), INTERVAL_ROWS)]))
        finally:
            for name, buffer in self.sae.named_buffers():
                buffer.copy_(saved[name])
        return {"epoch": self.step / self.steps_per_epoch, **figures}

    def fit(self) -> TrainResult:
        started = time.perf_counter()
        torch.manual_seed(self.cfg.seed)
        self.resume_or_start()
        if self.epoch >= self.num_epochs:
            print(f"train: {self.run_dir}: the run is complete at epoch {self.epoch} "
                  f"(train.num_epochs={self.num_epochs}); nothing to do. To train further, pass "
                  f"--resume --num-epochs {self.epoch + 1} (or more)")
            return TrainResult(self.history, self.best_epoch, self.run_dir, time.perf_counter() - started)
        # Only now: loading and initialising free their large temporaries back to the OS; the steps below
        # reuse the same blocks every time, which a heap that is never trimmed serves without page faults.
        keep_freed_memory()
        if self.world.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.sae.train()
        for epoch in range(self.epoch + 1, self.num_epochs + 1):
            epoch_started = time.perf_counter()
            metrics = EpochMetrics(self.sae.d_sae)
            batches = self._batches(epoch)
            with tqdm(batches, total=self.steps_per_epoch, desc=f"epoch {epoch}/{self.num_epochs}",
                      unit="step", disable=not self.progress or not self.world.is_main) as bar:
                for x in bar:
                    self.train_step(x, metrics)
                    if self.val_every and self.step % self.val_every == 0 and self.step % self.steps_per_epoch:
                        point = self.validate_between_epochs()  # an epoch's last step validates in full below
                        if self.logger is not None:
                            self.logger.log_validation(self.step, point)
                    if self.step % self.cfg.log_freq == 0:
                        last = metrics.summary()
                        bar.set_postfix(loss=f"{last['loss']:.4f}", l0=f"{last['l0']:.1f}",
                                        fvu=f"{last['fvu']:.3f}")
            train_seconds = time.perf_counter() - epoch_started
            metrics.reduce_(self.world, self.device)
            dead = self.dead.mask(self.tokens_seen)
            record = {"epoch": epoch, **metrics.summary(), "dead_features": int(dead.sum()),
                      "dead_feature_percentage": 100.0 * float(dead.float().mean())}
            record.update(self.calibrate())
            record.update(self.validate())
            if "val_loss" in record:
                record["val_dead_features"] = record["dead_features"]
                record["val_dead_feature_percentage"] = record["dead_feature_percentage"]
            record["lr"] = self.optimizer.param_groups[0]["lr"]
            record["seconds"] = time.perf_counter() - epoch_started  # validation included
            record["activations_per_second"] = metrics.rows / train_seconds  # training steps and data loading
            self.history.append(record)
            self.epoch = epoch
            if self.world.is_main:  # one writer; the others' records hold no validation figures
                self._checkpoint(record)
                if self.logger is not None:
                    self.logger.log_epoch(epoch, record, step=self.step)
                print(self._epoch_line(record))
        self.world.barrier()  # every checkpoint is written before any rank returns
        return TrainResult(self.history, self.best_epoch, self.run_dir, time.perf_counter() - started)

    def _batches(self, epoch: int) -> Iterator[Tensor]:
        """The epoch's batches; under data parallelism, this rank's block of each global batch."""
        order = epoch_order(self.data.n_train, self.cfg.seed, epoch)
        if not self.world.distributed:
            return iter_batches(self.data.train, order, self.cfg.batch_size, self.data.scale, self.device)
        blocks = (self.data.local_index(rank_block(order[start:stop], self.world))
                  for start, stop in batch_bounds(self.data.n_train, self.cfg.batch_size, self.world))
        return (self.data.train[index].to(device=self.device, dtype=torch.float32) * self.data.scale
                for index in blocks)

    # ---- checkpoints -------------------------------------------------------------------------------
    def _checkpoint(self, record: dict[str, float]) -> None:
        val_loss = record.get("val_loss", record["loss"])
        is_best = val_loss < self.best_val_loss
        if is_best:
            self.best_val_loss, self.best_epoch = val_loss, self.epoch
        state = {
            "epoch": self.epoch,
            "num_epochs": self.num_epochs,
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "best_val_loss": self.best_val_loss,
            "best_epoch": self.best_epoch,
            "run": self.run.to_dict() if self.run is not None else None,
        }
        tensors = {"optimizer": self.optimizer.state_dict(), "last_fired": self.dead.last_fired.cpu(),
                   "torch_rng": torch.get_rng_state()}
        last = self.epoch == self.num_epochs
        if last or self.epoch % self.cfg.checkpoint_freq == 0:
            save_checkpoint(epoch_dir(self.run_dir, self.epoch), self.sae, state, self.history, tensors)
            if self.cfg.keep_checkpoints is not None:
                for old in epoch_checkpoints(self.run_dir)[: -self.cfg.keep_checkpoints]:
                    shutil.rmtree(old)
        if is_best:
            save_checkpoint(self.run_dir / BEST, self.sae, state, self.history, tensors)
        write_json(self.run_dir / "history.json", self.history)

    @staticmethod
    def _epoch_line(r: dict[str, float]) -> str:
        val = (f" | val loss {r['val_loss']:.4f}, fvu {r['val_fvu']:.3f}, l0 {r['val_l0']:.1f}"
               if "val_loss" in r else "")
        return (f"epoch {int(r['epoch'])}: loss {r['loss']:.4f}, fvu {r['fvu']:.3f}, l0 {r['l0']:.1f}, "
                f"dead {int(r['dead_features'])} ({r['dead_feature_percentage']:.1f}%){val} "
                f"[{r['seconds']:.0f} s, training {r['activations_per_second']:,.0f} act/s]")


def interval_steps(val_every_steps: int | None, total_steps: int) -> int:
    """Steps between two validations for the curves: the param, or (null) about INTERVAL_POINTS per run; 0: off."""
    if val_every_steps is not None:
        return val_every_steps
    return max(1, round(total_steps / INTERVAL_POINTS))


def spread(ids: Tensor, at_most: int) -> Tensor:
    """At most `at_most` of `ids`, evenly spaced (no random draw): the same subsample at every point."""
    return ids[:: max(1, math.ceil(ids.numel() / at_most))]
