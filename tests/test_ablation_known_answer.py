"""Known answers for evaluate's ablation figures, and the figures recomputed by code that shares nothing with them.

- The cached activation fed back through the splice (the narrowest seam: the replacement itself) changes
  nothing: CE recovered is exactly 1 and KL exactly 0.
- The zero-ablation baseline spliced in as "the SAE" recovers exactly nothing: CE recovered 0, KL score 0.
- For a random SAE, every figure (CE clean / SAE / zero / mean, KL, CE recovered, KL score) is recomputed here
  with plain `run_with_hooks`, a hand-written next-token shift and float64 log-softmaxes, one window at a time
  and over a token cache (with and without BOS); each test also asserts that the plausible bug it guards
  against (swapped clean/zero, reversed KL, a next-token shift off by one) would move the figure beyond its
  tolerance, so that a pass means something.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from saepipe.analysis import ablation
from saepipe.analysis.ablation import (
    AblationAccumulator,
    ablation_metrics,
    ablation_plan,
    evaluate_ablation,
    replacements,
)
from saepipe.corpus.tokens import TokenCache
from saepipe.model.hooks import HookSpec
from saepipe.model.loading import load_hooked_model
from saepipe.sae import build_sae, sae_config

D = 64
HOOK = HookSpec(0, "hook_resid_post")
SHARPEN = 10.0  # the random model's output is near uniform; a larger unembedding makes the figures tell apart


@pytest.fixture(scope="module")
def sharp_model(tiny_model_dir):
    """The tiny model with its unembedding scaled up, so that p_clean is far from uniform and KL(p||q)
    differs from KL(q||p) by much more than float32 rounding."""
    model = load_hooked_model(tiny_model_dir, device=torch.device("cpu"))
    with torch.no_grad():
        model.original_model.lm_head.weight.mul_(SHARPEN)
    return model


@pytest.fixture(scope="module")
def tokens() -> Tensor:
    return torch.randint(0, 512, (3, 24), generator=torch.Generator().manual_seed(1))


class FedBack(torch.nn.Module):
    """Stands where an SAE stands in the ablation, but its "reconstruction" is the activation the model itself
    produced at the hook (captured beforehand with `run_with_cache`), ignoring what it is handed."""

    def __init__(self, cached: Tensor):
        super().__init__()
        self.W_enc = torch.nn.Parameter(torch.zeros(1))  # the ablation only asks it for a device
        self.cached = cached  # [rows at positions >= 1, d_model], in the order the splice flattens them
        self.calls = 0

    def encode(self, x: Tensor) -> Tensor:
        assert x.shape == self.cached.shape
        self.calls += 1
        return self.cached.clone()

    def decode(self, features: Tensor) -> Tensor:
        return features


class Zero(FedBack):
    def encode(self, x: Tensor) -> Tensor:
        return torch.zeros_like(x)


def hook_rows(model, tokens: Tensor) -> Tensor:
    """The hook's activations at positions >= 1, flattened [batch * (seq - 1), d_model]."""
    _, cache = model.run_with_cache(tokens, names_filter=HOOK.full_name)
    return cache[HOOK.full_name][:, 1:].reshape(-1, D).float()


def random_sae(seed: int = 0, k: int = 6):
    torch.manual_seed(seed)
    sae = build_sae(sae_config("topk", d_in=D, d_sae=4 * D, k=k))
    with torch.no_grad():
        sae.b_enc.normal_(0.0, 0.1)
        sae.b_dec.normal_(0.0, 0.1)
    return sae.eval()


# ---- the independent computation ------------------------------------------------------------------------------
def independent(model, tokens: Tensor, sae, mean: Tensor | None = None) -> dict[str, float]:
    """CE and KL written out directly: clean and spliced runs through plain hooks, float64 throughout.

    The prediction at model position p (logits[:, p]) is scored against tokens[:, p + 1], for p = 1 .. seq - 2.
    """

    def spliced(new_rows) -> Tensor:
        def hook(activation: Tensor, hook) -> Tensor:
            out = activation.clone()
            rows = activation[:, 1:].reshape(-1, activation.shape[-1]).float()
            out[:, 1:] = new_rows(rows).reshape(out[:, 1:].shape).to(activation.dtype)
            return out

        with torch.no_grad():
            return model.run_with_hooks(tokens, fwd_hooks=[(HOOK.full_name, hook)]).double()

    with torch.no_grad():
        clean = model(tokens).double()
    runs = {
        "clean": clean,
        "sae": spliced(lambda x: sae.decode(sae.encode(x))),
        "zero": spliced(torch.zeros_like),
    }
    if mean is not None:
        runs["mean"] = spliced(lambda x: mean.to(x.dtype).expand_as(x))
    seq = tokens.shape[1]
    targets = tokens[:, 2:seq]  # the token after each scored position 1 .. seq - 2
    log_probs = {name: F.log_softmax(logits[:, 1 : seq - 1], dim=-1) for name, logits in runs.items()}
    ce = {name: float(-lp.gather(-1, targets.unsqueeze(-1)).mean()) for name, lp in log_probs.items()}
    p_clean = log_probs["clean"].exp()
    kl = {name: float((p_clean * (log_probs["clean"] - lp)).sum(-1).mean())
          for name, lp in log_probs.items() if name != "clean"}
    reverse_kl = {name: float((lp.exp() * (lp - log_probs["clean"])).sum(-1).mean())
                  for name, lp in log_probs.items() if name != "clean"}
    shifted = {name: float(-lp.gather(-1, tokens[:, 1 : seq - 1, None]).mean())  # the token at p: off by one
               for name, lp in log_probs.items()}
    out = {f"ce_{name}": value for name, value in ce.items()}
    out.update({f"kl_{name}": value for name, value in kl.items()})
    out.update({f"reverse_kl_{name}": value for name, value in reverse_kl.items()})
    out.update({f"shifted_ce_{name}": value for name, value in shifted.items()})
    out["ce_loss_recovered"] = (ce["zero"] - ce["sae"]) / (ce["zero"] - ce["clean"])
    out["kl_div_score"] = (kl["zero"] - kl["sae"]) / kl["zero"]
    if mean is not None:
        out["ce_loss_recovered_vs_mean"] = (ce["mean"] - ce["sae"]) / (ce["mean"] - ce["clean"])
    out["tokens"] = tokens.shape[0] * (seq - 2)
    return out


# ---- known answers --------------------------------------------------------------------------------------------
def test_the_cached_activation_fed_back_recovers_everything(sharp_model, tokens) -> None:
    fed_back = FedBack(hook_rows(sharp_model, tokens))
    out = ablation_metrics(sharp_model, HOOK, fed_back, tokens)
    assert fed_back.calls == 2  # the "sae" and "sae_with_error" splices both went through it
    assert abs(out["ce_zero"] - out["ce_clean"]) > 0.1  # zeroing the hook matters (random model: either way)
    assert out["ce_sae"] == pytest.approx(out["ce_clean"], abs=1e-6)
    assert abs(out["kl_sae"]) < 1e-6 and abs(out["kl_sae_with_error"]) < 1e-6
    assert out["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-6)
    assert out["kl_div_score"] == pytest.approx(1.0, abs=1e-6)


def test_the_zero_ablation_baseline_recovers_nothing(sharp_model, tokens) -> None:
    out = ablation_metrics(sharp_model, HOOK, Zero(hook_rows(sharp_model, tokens)), tokens,
                           mean=torch.zeros(D))
    assert abs(out["ce_zero"] - out["ce_clean"]) > 0.1 and out["kl_zero"] > 0.1
    assert out["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-6)
    assert out["ce_loss_recovered_vs_mean"] == pytest.approx(0.0, abs=1e-6)  # a zero mean is zero ablation
    assert out["kl_div_score"] == pytest.approx(0.0, abs=1e-6)
    assert out["kl_sae"] == pytest.approx(out["kl_zero"], rel=1e-6)


# ---- independent recomputation --------------------------------------------------------------------------------
FIGURES = ("ce_clean", "ce_sae", "ce_zero", "ce_mean", "kl_sae", "kl_zero", "kl_mean",
           "ce_loss_recovered", "ce_loss_recovered_vs_mean", "kl_div_score")
REL = 2e-5  # float32 model and log-softmax in the pipeline against float64 here


@pytest.mark.parametrize("seed", [0, 1])
def test_a_random_sae_matches_an_independent_computation(sharp_model, tokens, seed) -> None:
    sae = random_sae(seed)
    mean = torch.randn(D, generator=torch.Generator().manual_seed(seed + 7))
    got = ablation_metrics(sharp_model, HOOK, sae, tokens, mean=mean)
    want = independent(sharp_model, tokens, sae, mean=mean)
    assert got["tokens"] == want["tokens"]
    assert 0.05 < want["ce_loss_recovered"] < 0.98  # a partial recovery: neither known answer above
    for key in FIGURES:
        assert got[key] == pytest.approx(want[key], rel=REL, abs=1e-7), key
    # The plausible bugs move the figures well beyond that tolerance, so the comparison above catches them:
    for name in ("sae", "zero", "mean"):  # KL taken the other way round
        assert abs(want[f"reverse_kl_{name}"] - want[f"kl_{name}"]) > 100 * REL * want[f"kl_{name}"], name
    for name in ("clean", "sae", "zero"):  # targets shifted by one position
        assert abs(want[f"shifted_ce_{name}"] - want[f"ce_{name}"]) > 100 * REL * want[f"ce_{name}"], name
    swapped = (want["ce_clean"] - want["ce_sae"]) / (want["ce_clean"] - want["ce_zero"])  # clean and zero swapped
    assert abs(swapped - want["ce_loss_recovered"]) > 0.01


def toy_cache(lengths: list[int], seed: int = 3) -> TokenCache:
    rng = np.random.default_rng(seed)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return TokenCache(tokens=rng.integers(0, 500, offsets[-1]).astype(np.int32), offsets=offsets,
                      split=np.ones(len(lengths), dtype=np.int8), attrs={})


@pytest.mark.parametrize("bos_id", [None, 511])
def test_the_corpus_pass_matches_an_independent_computation(sharp_model, bos_id) -> None:
    """Over a token cache: documents that fit one window each, so the independent code scores each
    document's window (BOS prepended or not) at positions 1 .. seq - 2 and weights by predictions."""
    cache = toy_cache([12, 19, 7])
    plan = ablation_plan(cache, "validation", max_text_length=24, prepend_bos=bos_id is not None, overlap=6,
                         max_tokens=None)
    assert len(plan) == 3  # one window per document
    sae = random_sae(2)
    mean = torch.randn(D, generator=torch.Generator().manual_seed(11))
    got = evaluate_ablation(sharp_model, HOOK, sae, cache, plan, bos_id=bos_id, token_budget=64, mean=mean,
                            progress=False)
    per_doc = []
    for d in range(3):
        ids = torch.from_numpy(cache.document(d).astype(np.int64))
        if bos_id is not None:
            ids = torch.cat([torch.tensor([bos_id]), ids])
        per_doc.append(independent(sharp_model, ids[None], sae, mean=mean))
    n = np.array([r["tokens"] for r in per_doc])
    assert got["tokens"] == n.sum()
    for key in ("ce_clean", "ce_sae", "ce_zero", "ce_mean", "kl_sae", "kl_zero", "kl_mean"):
        want = float(sum(r[key] * k for r, k in zip(per_doc, n, strict=True)) / n.sum())
        assert got[key] == pytest.approx(want, rel=REL, abs=1e-7), key
    ce = {name: float(sum(r[f"ce_{name}"] * k for r, k in zip(per_doc, n, strict=True)) / n.sum())
          for name in ("clean", "sae", "zero")}
    assert got["ce_loss_recovered"] == pytest.approx((ce["zero"] - ce["sae"]) / (ce["zero"] - ce["clean"]),
                                                     rel=1e-4)


# ---- the split forward: the model below the hook once, the blocks above it per variant -----------------------
SPLIT_FIGURES = ("tokens", "ce_clean", "ce_sae", "ce_sae_with_error", "ce_zero", "ce_mean", "kl_sae",
                 "kl_sae_with_error", "kl_zero", "kl_mean", "ce_loss_recovered", "ce_loss_recovered_vs_mean",
                 "kl_div_score")


def both_paths(model, hook: HookSpec, tokens: Tensor, sae, mean: Tensor) -> tuple[AblationAccumulator, ...]:
    """The same batch through the split forward and through one full forward per variant (the old path)."""
    splices = replacements(sae, mean)
    positions = torch.arange(1, tokens.shape[1] - 1)
    sources = (torch.arange(tokens.shape[0]).repeat_interleave(len(positions)), positions.repeat(tokens.shape[0]))
    out = []
    for split in (True, False):
        acc = AblationAccumulator(splices, split=split)
        acc.add(model, hook, splices, tokens, sources)
        out.append(acc)
    return tuple(out)


def assert_same_figures(split: dict, full: dict) -> None:
    for key in SPLIT_FIGURES:
        assert split[key] == pytest.approx(full[key], rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize("hook", ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.0.hook_resid_pre",
                                  "blocks.1.hook_resid_pre", "blocks.0.hook_mlp_out", "blocks.1.hook_mlp_out"])
def test_the_split_forward_gives_the_full_forwards_figures(sharp_model, tokens, hook) -> None:
    """Layer 0 and the last layer (its continuation is only the final norm and the unembedding), each kind
    of hook that can be split; the clean and every spliced run continue from the one lower run."""
    split, full = both_paths(sharp_model, HookSpec.parse(hook), tokens, random_sae(3),
                             torch.randn(D, generator=torch.Generator().manual_seed(5)))
    assert (split.path, full.path) == ("split", "full")
    assert full.result()["kl_sae"] > 0.1 and full.result()["kl_zero"] > 1e-3  # the splices matter at all
    assert_same_figures(split.result(), full.result())


def test_the_split_forward_runs_the_model_below_the_hook_once(sharp_model, tokens) -> None:
    """Five runs (clean + four splices): block 0, below the hook, runs once on the batch; block 1 once on the
    five runs stacked (counted when a block completes: the lower run enters block 1 only to stop there)."""
    rows: list[list[int]] = [[], []]

    def count(i: int):
        def hook(module, args, output) -> None:
            rows[i].append((output[0] if isinstance(output, tuple) else output).shape[0])
        return hook

    splices = replacements(random_sae(0), torch.zeros(D))
    acc = AblationAccumulator(splices)
    sources = (torch.tensor([0, 1]), torch.tensor([1, 2]))
    acc.add(sharp_model, HOOK, splices, tokens, sources)  # the first batch may check the split once
    handles = [block.register_forward_hook(count(i)) for i, block in enumerate(sharp_model.blocks)]
    try:
        acc.add(sharp_model, HOOK, splices, tokens, sources)
    finally:
        for handle in handles:
            handle.remove()
    assert rows == [[len(tokens)], [5 * len(tokens)]]


@pytest.mark.parametrize("hook", ["blocks.0.hook_resid_mid", "blocks.1.hook_attn_out"])
def test_hooks_that_cannot_be_split_run_full_forwards(sharp_model, tokens, hook) -> None:
    split, full = both_paths(sharp_model, HookSpec.parse(hook), tokens, random_sae(4), torch.zeros(D))
    assert split.path == "full"
    assert_same_figures(split.result(), full.result())


def test_a_head_the_continuation_does_not_reproduce_falls_back(tiny_model_dir, tokens, capsys) -> None:
    """A model whose head does more than norm + unembedding (here: soft-capped logits, as Gemma 2's) must not
    be continued by norm + unembedding: the first window's check sends the whole pass down the full path."""
    model = load_hooked_model(tiny_model_dir, device=torch.device("cpu"))  # its own: the check is kept per model
    with torch.no_grad():
        model.original_model.lm_head.weight.mul_(SHARPEN)

    def soft_cap(module, args, output):
        output.logits = 3.0 * torch.tanh(output.logits / 3.0)
        return output

    handle = model.original_model.register_forward_hook(soft_cap)
    try:
        split, full = both_paths(model, HOOK, tokens, random_sae(5), torch.zeros(D))
    finally:
        handle.remove()
    assert split.path == "full"
    assert "running one full forward per variant" in capsys.readouterr().err
    assert_same_figures(split.result(), full.result())


@pytest.mark.parametrize("hook", ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"])
def test_the_split_corpus_pass_with_padding_gives_the_full_forwards_figures(sharp_model, hook) -> None:
    """Batches of windows of different lengths, padded after their ends, some windows overlapping."""
    cache = toy_cache([40, 9, 23, 5, 31], seed=8)
    plan = ablation_plan(cache, "validation", max_text_length=16, prepend_bos=False, overlap=4, max_tokens=None)
    figures = [evaluate_ablation(sharp_model, HookSpec.parse(hook), random_sae(6), cache, plan, bos_id=None,
                                 token_budget=48, mean=torch.ones(D), progress=False, split=split)
               for split in (True, False)]
    assert_same_figures(*figures)


@pytest.mark.parametrize("stack_positions", [1, 2 * 3 * 24])
def test_runs_stacked_in_chunks_give_the_same_figures(sharp_model, tokens, monkeypatch, stack_positions) -> None:
    """Large batches run above the hook one run at a time (or a few together): the same figures, in the
    same order of runs, as the old path."""
    monkeypatch.setattr(ablation, "STACK_POSITIONS", stack_positions)
    split, full = both_paths(sharp_model, HookSpec.parse("blocks.0.hook_mlp_out"), tokens, random_sae(7),
                             torch.randn(D, generator=torch.Generator().manual_seed(9)))
    assert split.path == "split"
    assert_same_figures(split.result(), full.result())
