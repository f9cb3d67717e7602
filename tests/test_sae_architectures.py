"""SAE architectures: selection, loss terms and gradients against dense re-implementations, inference rules,
input-scale folding, export round trips, AuxK, and a quick check that training recovers sparse structure."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from saepipe.kernels import sparse
from saepipe.sae import REGISTRY, SparseAutoencoder, build_sae, config_class, sae_config
from saepipe.sae.batch_topk import BatchTopKSAE
from saepipe.training.optimizer import ConstrainedAdam

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")

ALL = sorted(REGISTRY)
SPARSE = [arch for arch in ALL if REGISTRY[arch].sparse_training]
D_IN, D_SAE, K, BATCH = 16, 64, 6, 128
PREFIXES = [8, 24]
PARAMS = ("W_enc", "W_dec", "b_enc", "b_dec")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: extra threads only add synchronisation (and contend on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make(arch: str, seed: int = 0, **changes) -> SparseAutoencoder:
    """A small SAE with non-trivial biases, non-unit decoder rows and (where it has one) a positive threshold."""
    torch.manual_seed(seed)
    fields = dict(d_in=D_IN, d_sae=D_SAE, k=K, k_aux=8, jumprelu_bandwidth=0.1, matryoshka_prefixes=PREFIXES)
    sae = build_sae(config_class(arch).from_dict({**fields, **changes}))
    with torch.no_grad():
        sae.W_enc.add_(0.1 * torch.randn_like(sae.W_enc))
        sae.W_dec.mul_(torch.empty(sae.d_sae, 1).uniform_(0.5, 2.0))
        sae.b_enc.normal_(0.0, 0.1)
        sae.b_dec.normal_(0.0, 0.1)
        if arch == "jumprelu":
            sae.log_threshold.copy_(torch.empty(sae.d_sae).uniform_(0.05, 0.6).log())
        if isinstance(sae, BatchTopKSAE):
            sae.threshold.fill_(0.5)
            sae.threshold_steps.fill_(1)
    return sae


def inputs(n: int = BATCH, seed: int = 1) -> Tensor:
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed))


def reference_features(sae: SparseAutoencoder, pre: Tensor) -> Tensor:
    """Training-time features from the dense pre-activations, written out from each paper's definition."""
    cfg = sae.cfg
    if sae.arch == "topk":
        mask = torch.zeros_like(pre, dtype=torch.bool).scatter(1, pre.detach().topk(cfg.k, dim=1).indices, True)
    elif sae.arch in ("batch_topk", "matryoshka"):
        flat = pre.detach().reshape(-1)
        mask = torch.zeros_like(flat, dtype=torch.bool)
        mask[flat.topk(cfg.k * pre.shape[0]).indices] = True
        mask = mask.reshape(pre.shape)
    elif sae.arch == "standard":
        mask = torch.ones_like(pre, dtype=torch.bool)
    else:
        mask = pre.detach() > sae.log_threshold.detach().exp()
    return F.relu(pre) * mask


def reference_inference(sae: SparseAutoencoder, pre: Tensor) -> Tensor:
    """Inference features: per-token rules only (BatchTopK's batch rule becomes its running threshold)."""
    if sae.arch == "topk":
        return reference_features(sae, pre)
    if sae.arch == "standard":
        return F.relu(pre)
    threshold = sae.log_threshold.exp() if sae.arch == "jumprelu" else sae.threshold
    return pre * (pre > threshold.detach())


def reference_losses(sae: SparseAutoencoder, x: Tensor, params: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(recon_loss, sparsity_loss) of a dense autograd re-implementation with the given parameters."""
    pre = (x - params["b_dec"]) @ params["W_enc"] + params["b_enc"]
    f = reference_features(sae, pre)
    if sae.arch == "matryoshka":
        recon = sum(F.mse_loss(f[:, :m] @ params["W_dec"][:m] + params["b_dec"], x) for m in [*PREFIXES, D_SAE])
    else:
        recon = F.mse_loss(f @ params["W_dec"] + params["b_dec"], x)
    if sae.arch == "standard":
        sparsity = (f * params["W_dec"].norm(dim=1)).sum(1).mean()
    elif sae.arch == "jumprelu":
        sparsity = (f != 0).sum(1).float().mean()
    else:
        sparsity = torch.zeros(())
    return recon, sparsity


def train_steps(sae: SparseAutoencoder, x: Tensor, steps: int = 5) -> None:
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    for _ in range(steps):
        out = sae(x)
        (out.recon_loss + 1e-3 * out.sparsity_loss).backward()
        opt.step()
        opt.zero_grad()
        sae.after_step(out)


@pytest.mark.parametrize("arch", ALL)
def test_forward_shapes_selection_and_losses(arch):
    sae, x = make(arch), inputs()
    out = sae(x)
    pre = sae.pre_activations(x).detach()
    assert out.x_hat.shape == x.shape and out.pre.shape == (BATCH, D_SAE)
    assert out.recon_loss.shape == () and out.sparsity_loss.shape == ()
    assert torch.allclose(out.pre, pre)
    flat = out.codes.rows * D_SAE + out.codes.cols
    assert bool((flat[1:] > flat[:-1]).all()), "codes must be sorted by row, then latent"

    expected = reference_features(sae, pre)
    features = out.codes.to_dense().detach()
    assert torch.equal(features != 0, expected != 0)
    torch.testing.assert_close(features, expected)
    torch.testing.assert_close(out.x_hat.detach(), expected @ sae.W_dec.detach() + sae.b_dec.detach())

    per_row = (features != 0).sum(1)
    if arch == "topk":
        assert bool((per_row <= K).all()) and bool((per_row == K).all())  # plenty of positives per row
    if arch in ("batch_topk", "matryoshka"):
        assert out.codes.nnz == K * BATCH
        assert bool((per_row != K).any()), "BatchTopK lets tokens use more or fewer than k latents"
    if arch == "jumprelu":
        assert torch.equal(features != 0, pre > sae.threshold.detach())
        assert bool(((pre > 0) & (pre <= sae.threshold.detach())).any()), "thresholds must cut positive z"
    if arch == "matryoshka":
        for m in PREFIXES:  # an off-by-one at a band edge would show in the loss
            assert bool((out.codes.cols == m).any()) and bool((out.codes.cols == m - 1).any())

    params = {name: getattr(sae, name).detach() for name in PARAMS}
    recon, sparsity = reference_losses(sae, x, params)
    torch.testing.assert_close(out.recon_loss.detach(), recon, rtol=1e-5, atol=0)
    torch.testing.assert_close(out.sparsity_loss.detach(), sparsity, rtol=1e-5, atol=0)
    if arch == "jumprelu":
        assert out.sparsity_loss.item() == (pre > sae.threshold.detach()).sum().item() / BATCH
    if arch == "standard":  # non-unit decoder rows: plain L1 would differ
        assert not torch.isclose(out.sparsity_loss.detach(), features.sum(1).mean(), rtol=1e-2)


def test_matryoshka_recon_is_sum_of_prefix_losses_not_just_the_last():
    sae, x = make("matryoshka"), inputs()
    out = sae(x)
    full = F.mse_loss(out.x_hat, x)
    assert out.recon_loss.item() > 1.5 * full.item()
    torch.testing.assert_close(full, F.mse_loss(out.codes.to_dense() @ sae.W_dec + sae.b_dec, x))


@pytest.mark.parametrize("prefixes", [[8, 8], [0, 8], [24, 8], [8, D_SAE]])
def test_matryoshka_rejects_prefixes_that_do_not_nest(prefixes):
    with pytest.raises(ValueError, match="matryoshka_prefixes"):
        make("matryoshka", matryoshka_prefixes=prefixes)


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "torch-ops"])
@pytest.mark.parametrize("arch", [*SPARSE, "standard"])
def test_training_gradients_match_dense_autograd(arch, compiled, monkeypatch):
    if not compiled:  # the sparse kernels as a GPU runs them: torch operators only
        monkeypatch.setattr(sparse, "compiled", lambda *tensors: False)
    sae, x = make(arch), inputs()
    out = sae(x)
    (out.recon_loss + out.sparsity_loss).backward()
    params = {name: getattr(sae, name).detach().clone().requires_grad_() for name in PARAMS}
    recon, sparsity = reference_losses(sae, x, params)
    expected = torch.autograd.grad(recon + sparsity, [params[name] for name in PARAMS])
    for name, grad in zip(PARAMS, expected, strict=True):
        actual = getattr(sae, name).grad
        assert actual is not None, name
        torch.testing.assert_close(actual, grad, rtol=1e-5, atol=1e-5 * float(grad.abs().max()), msg=name)


def _jumprelu_near_threshold() -> tuple[SparseAutoencoder, Tensor, Tensor, Tensor]:
    """A JumpReLU SAE whose thresholds sit among its pre-activations: many z fall within ε/2 of θ."""
    sae, x = make("jumprelu"), inputs()
    pre = sae.pre_activations(x).detach()
    with torch.no_grad():
        sae.log_threshold.copy_(pre.quantile(0.7, dim=0).clamp_min(0.05).log())
    theta = sae.threshold.detach()
    window = ((pre - theta) / sae.cfg.jumprelu_bandwidth).abs() < 0.5
    assert int(window.sum()) > D_SAE
    return sae, x, pre, window


def test_jumprelu_l0_trains_threshold_only():
    sae, x, _, window = _jumprelu_near_threshold()
    theta, eps = sae.threshold.detach(), sae.cfg.jumprelu_bandwidth
    out = sae(x)
    out.sparsity_loss.backward()
    # dL0/dθ := -(1/ε) Σ_tokens K((z-θ)/ε) / batch, and log θ adds a factor θ.
    expected = theta * -(window.sum(0).float() / eps) / BATCH
    torch.testing.assert_close(sae.log_threshold.grad, expected)
    assert bool((sae.log_threshold.grad <= 0).all()) and bool((sae.log_threshold.grad < 0).any())
    for name in PARAMS:
        grad = getattr(sae, name).grad
        assert grad is None or not bool(grad.any()), f"L0 must not train {name}"
    z = sae.pre_activations(x)  # even handed a differentiable z, L0 sends it nothing
    (grad_z,) = torch.autograd.grad(sae.sparsity_loss(out.codes, z), [z], allow_unused=True)
    assert grad_z is None or not bool(grad_z.any())


def test_jumprelu_reconstruction_gradients_follow_the_straight_through_estimator():
    sae, x, pre, window = _jumprelu_near_threshold()
    theta, eps = sae.threshold.detach(), sae.cfg.jumprelu_bandwidth
    out = sae(x)
    out.recon_loss.backward()
    f = out.codes.to_dense().detach().requires_grad_()
    (grad_f,) = torch.autograd.grad(F.mse_loss(f @ sae.W_dec.detach() + sae.b_dec.detach(), x), [f])
    # df/dθ := -(θ/ε) K((z-θ)/ε); df/dz = H(z-θ).
    expected_theta = theta * (grad_f * window * -(theta / eps)).sum(0)
    assert float(expected_theta.abs().sum()) > 0
    torch.testing.assert_close(sae.log_threshold.grad, expected_theta, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(sae.b_enc.grad, (grad_f * (pre > theta)).sum(0), rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("arch", ALL)
def test_inference_encodes_each_token_on_its_own(arch):
    sae, x = make(arch), inputs()
    enc = sae.encode(x)
    assert enc.shape == (BATCH, D_SAE)
    expected = reference_inference(sae, sae.pre_activations(x).detach())
    assert torch.equal(enc != 0, expected != 0)
    torch.testing.assert_close(enc, expected)
    for i in range(0, BATCH, 31):
        alone = sae.encode(x[i : i + 1])[0]
        assert torch.equal(alone != 0, enc[i] != 0)
        torch.testing.assert_close(alone, enc[i])
    codes = sae.inference_codes(sae.pre_activations(x).detach())  # the sparse form validation uses
    assert torch.equal(codes.to_dense(), enc.detach())


@pytest.mark.parametrize("arch", ["batch_topk", "matryoshka"])
def test_batch_topk_threshold_is_learned_and_used_at_inference(arch):
    sae = make(arch)
    with torch.no_grad():
        sae.threshold.zero_()
        sae.threshold_steps.zero_()
    x = inputs(256)
    first = sae(x)
    smallest = float(first.codes.values.detach().min())
    sae.after_step(first)
    assert float(sae.threshold) == pytest.approx(smallest)
    train_steps(sae, x, steps=4)
    threshold = float(sae.threshold)
    assert threshold > 0

    enc, pre = sae.encode(x), sae.pre_activations(x).detach()
    assert torch.equal(enc != 0, pre > threshold)
    assert bool(((pre > 0) & (pre <= threshold)).any()), "inference must drop positives below the threshold"
    for i in range(0, 256, 51):
        torch.testing.assert_close(sae.encode(x[i : i + 1])[0], enc[i])

    # Training selection is a batch rule: a token alone gets exactly k, in the batch it may get more or fewer.
    per_row = torch.bincount(sae(x).codes.rows, minlength=256)
    i = int((per_row != K).nonzero()[0])
    assert sae(x[i : i + 1]).codes.nnz == K != int(per_row[i])


@pytest.mark.parametrize("arch", ALL)
def test_fold_input_scale(arch):
    sae, x, scale = make(arch), inputs(64), 2.5
    before = sae.encode(scale * x).detach()
    decoded = sae.decode(before).detach()
    sae.fold_input_scale_(scale)
    after = sae.encode(x).detach()
    assert torch.equal(after != 0, before != 0)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.decode(before).detach(), decoded / scale, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ALL)
def test_export_round_trip(arch):
    sae, x = make(arch), inputs()
    tensors = sae.export_tensors()
    has_threshold = arch in ("batch_topk", "jumprelu", "matryoshka")
    assert set(tensors) == {*PARAMS, *(["threshold"] if has_threshold else [])}
    assert tensors["W_enc"].shape == (D_IN, D_SAE) and tensors["W_dec"].shape == (D_SAE, D_IN)
    if has_threshold:
        assert tensors["threshold"].shape == (D_SAE,) and bool((tensors["threshold"] > 0).all())
    fresh = make(arch, seed=7)
    if isinstance(fresh, BatchTopKSAE):
        fresh.threshold.zero_()
    assert not torch.equal(fresh.encode(x), sae.encode(x))
    fresh.load_export_tensors(tensors)
    assert torch.equal(fresh.encode(x), sae.encode(x))


@pytest.mark.parametrize("arch", ALL)
def test_auxk_trains_only_dead_latents(arch):
    sae, x = make(arch), inputs()
    out = sae(x)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    assert sae.auxk_term(x, out, dead) is None
    dead[torch.randperm(D_SAE, generator=torch.Generator().manual_seed(3))[:16]] = True
    term = sae.auxk_term(x, out, dead)
    assert term.loss.item() > 0
    sae.zero_grad()
    term.add_grads_(1.0)
    for grad in (sae.W_enc.grad.abs().sum(0), sae.W_dec.grad.abs().sum(1), sae.b_enc.grad.abs()):
        assert not bool(grad[~dead].any()) and bool(grad[dead].any())


def test_topk_learns_sparse_structure():
    torch.manual_seed(0)
    directions = F.normalize(torch.randn(32, D_IN), dim=1)

    def sample(n: int) -> Tensor:
        active = torch.rand(n, 32).argsort(dim=1)[:, :3]
        coefficients = torch.rand(n, 3) + 0.5
        return (coefficients.unsqueeze(2) * directions[active]).sum(1)

    sae = build_sae(sae_config("topk", d_in=D_IN, d_sae=64, k=3))
    others = [param for param in sae.parameters() if param is not sae.W_dec]
    opt = ConstrainedAdam([{"params": [sae.W_dec], "unit_rows": True}, {"params": others}], lr=1e-2)
    for _ in range(300):
        out = sae(sample(256))
        out.recon_loss.backward()
        opt.step()
        opt.zero_grad()
    x = sample(1024)
    with torch.no_grad():
        x_hat = sae.decode(sae.encode(x))
    fvu = float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert fvu < 0.2
