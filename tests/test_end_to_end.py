"""End-to-end losses on the tiny random Llama, and the training-time window sampler."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import identity_sae
from saepipe.corpus.tokens import TokenCache
from saepipe.model.hooks import HookSpec
from saepipe.sae import build_sae, sae_config
from saepipe.training.end_to_end import end_to_end_losses, make_end_to_end_loss, sample_windows

HOOK = HookSpec(layer=0, name="hook_resid_post")
SCALE = 3.0


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))




def hook_count(model) -> int:
    modules = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
                  for m in model.modules())
    points = sum(len(hp.fwd_hooks) + len(hp.bwd_hooks) for hp in model.hook_dict.values())
    return modules + points


@pytest.mark.parametrize("hook_name", ["hook_resid_post", "hook_resid_mid"])
def test_identity_sae_changes_nothing(model, tokens, hook_name):
    out = end_to_end_losses(model, HookSpec(0, hook_name), identity_sae(), SCALE, tokens,
                            logit_kl=True, block_mse=True)
    assert set(out.metrics) == {"logit_kl", "block_mse", "total_post_layer_mse", "block_mse_layer1"}
    assert all(v < 1e-6 for v in out.metrics.values())


def test_zero_decoder_moves_the_model_and_only_the_sae_learns(model, tokens):
    sae = identity_sae()
    with torch.no_grad():
        sae.W_dec.zero_()
    out = end_to_end_losses(model, HOOK, sae, SCALE, tokens, logit_kl=True, block_mse=True)
    assert out.metrics["logit_kl"] > 1e-3
    assert 0.1 < out.metrics["block_mse_layer1"] == out.metrics["total_post_layer_mse"]
    out.weighted(1.0, 1.0).backward()
    assert sae.W_dec.grad is not None and sae.W_dec.grad.abs().sum() > 0
    params = list(model.parameters())
    assert params and all(not p.requires_grad and p.grad is None for p in params)


def test_random_sae_gets_gradients_from_each_loss(model, tokens):
    torch.manual_seed(0)
    for kl, mse in [(True, False), (False, True)]:
        sae = build_sae(sae_config("topk", d_in=64, d_sae=128, k=8))
        out = end_to_end_losses(model, HOOK, sae, SCALE, tokens, logit_kl=kl, block_mse=mse)
        (out.logit_kl + out.block_mse).backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (sae.W_enc, sae.W_dec, sae.b_dec))
        assert ("logit_kl" in out.metrics) == kl and ("block_mse" in out.metrics) == mse


def test_block_mse_alone_stops_before_the_unembedding(model, tokens):
    calls = []
    handle = model.unembed.register_forward_hook(lambda *args: calls.append(1))
    try:
        end_to_end_losses(model, HOOK, identity_sae(), SCALE, tokens, logit_kl=False, block_mse=True)
        assert calls == []
        end_to_end_losses(model, HOOK, identity_sae(), SCALE, tokens, logit_kl=True, block_mse=False)
        assert len(calls) == 2  # clean and spliced
    finally:
        handle.remove()


def test_hook_in_the_last_block_has_no_block_mse(model, tokens):
    out = end_to_end_losses(model, HookSpec(1, "hook_resid_post"), identity_sae(), SCALE, tokens,
                            logit_kl=False, block_mse=True)
    assert out.metrics == {"block_mse": 0.0, "total_post_layer_mse": 0.0} and float(out.block_mse) == 0.0
    with pytest.raises(ValueError):
        end_to_end_losses(model, HOOK, identity_sae(), SCALE, tokens, logit_kl=False, block_mse=False)


class ExplodingSAE(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        raise RuntimeError("sae exploded")


@pytest.mark.parametrize("logit_kl", [True, False])
def test_hooks_removed_even_when_the_sae_raises(model, tokens, logit_kl):
    before = hook_count(model)
    with pytest.raises(RuntimeError, match="sae exploded"):
        end_to_end_losses(model, HOOK, ExplodingSAE(), SCALE, tokens, logit_kl=logit_kl, block_mse=True)
    assert hook_count(model) == before
    out = end_to_end_losses(model, HOOK, identity_sae(), SCALE, tokens, logit_kl=True, block_mse=True)
    assert hook_count(model) == before and out.metrics["logit_kl"] < 1e-6


# ---- windows --------------------------------------------------------------------------------------------
def toy_cache(lengths, split):
    """Document d holds tokens 1000*d, 1000*d + 1, ...: a window's tokens tell where it came from."""
    docs = [1000 * d + np.arange(n) for d, n in enumerate(lengths)]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return TokenCache(tokens=np.concatenate(docs).astype(np.int32), offsets=offsets,
                      split=np.asarray(split, dtype=np.int8), attrs={})


def test_sample_windows_deterministic_and_inside_documents():
    cache = toy_cache([5, 40, 3, 25, 60], [0, 0, 0, 1, 0])
    windows = sample_windows(cache, "train", 64, 10, np.random.default_rng(7))
    again = sample_windows(cache, "train", 64, 10, np.random.default_rng(7))
    assert windows.dtype == torch.int64 and windows.shape == (64, 10)
    assert torch.equal(windows, again)
    assert not torch.equal(windows, sample_windows(cache, "train", 64, 10, np.random.default_rng(8)))
    w = windows.numpy()
    assert (np.diff(w, axis=1) == 1).all()  # consecutive tokens of one document
    assert set((w[:, 0] // 1000).tolist()) == {1, 4}  # only long-enough training documents
    assert ((w[:, -1] % 1000) < np.array([0, 40, 0, 0, 60])[w[:, 0] // 1000]).all()

    val = sample_windows(cache, "validation", 3, 10, np.random.default_rng(0), bos_id=511).numpy()
    assert (val[:, 0] == 511).all() and (val[:, 1:] // 1000 == 3).all() and val.shape == (3, 10)


def test_sample_windows_falls_back_to_the_longest_document():
    cache = toy_cache([4, 7, 2], [0, 0, 0])
    w = sample_windows(cache, "train", 5, 32, np.random.default_rng(0)).numpy()
    assert w.shape == (5, 7) and (w == 1000 + np.arange(7)).all()


def test_make_end_to_end_loss_for_the_trainer(model):
    cache = toy_cache([30, 50], [0, 0])
    cache = TokenCache(tokens=cache.tokens % 500, offsets=cache.offsets, split=cache.split, attrs={})
    loss_fn = make_end_to_end_loss(model, HOOK, cache, n_windows=2, window=8, logit_kl=True, block_mse=True,
                                   logit_kl_weight=2.0, block_mse_weight=0.5, seed=0, bos_id=1)
    sae = identity_sae()
    with torch.no_grad():
        sae.W_dec.mul_(0.5)
    loss, figures = loss_fn(sae, SCALE, 0)
    assert loss.requires_grad
    assert figures["kl_contribution"] == pytest.approx(2.0 * figures["logit_kl"])
    assert figures["block_mse_contribution"] == pytest.approx(0.5 * figures["block_mse"])
    expected = figures["kl_contribution"] + figures["block_mse_contribution"]
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)
