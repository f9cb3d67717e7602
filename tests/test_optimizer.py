"""ConstrainedAdam: torch's Adam plus the decoder-norm constraint, compiled on the CPU and in tensor ops."""

from __future__ import annotations

import pytest
import torch

from saepipe.training.optimizer import ConstrainedAdam, _adam_in_torch


def reference_run(decoder: torch.Tensor, encoder: torch.Tensor, grads: list[tuple[torch.Tensor, torch.Tensor]],
                  lr: float) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.optim.Adam with the constraint as separate steps: project the decoder's gradient, step, renormalise."""
    dec, enc = torch.nn.Parameter(decoder.clone()), torch.nn.Parameter(encoder.clone())
    adam = torch.optim.Adam([dec, enc], lr=lr, betas=(0.9, 0.99))
    for g_dec, g_enc in grads:
        with torch.no_grad():
            along = (g_dec * dec).sum(1, keepdim=True) / (dec * dec).sum(1, keepdim=True)
            dec.grad, enc.grad = g_dec - along * dec, g_enc.clone()
        adam.step()
        with torch.no_grad():
            dec /= dec.norm(dim=1, keepdim=True)
    return dec.detach(), enc.detach()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_torch_adam_with_the_decoder_constraint(dtype):
    generator = torch.Generator().manual_seed(0)
    decoder = torch.randn(48, 20, generator=generator, dtype=dtype)
    decoder /= decoder.norm(dim=1, keepdim=True)
    encoder = torch.randn(20, 48, generator=generator, dtype=dtype)
    grads = [(torch.randn(48, 20, generator=generator, dtype=dtype), torch.randn(20, 48, generator=generator,
                                                                                    dtype=dtype)) for _ in range(5)]
    want_dec, want_enc = reference_run(decoder, encoder, grads, lr=1e-2)

    dec, enc = torch.nn.Parameter(decoder.clone()), torch.nn.Parameter(encoder.clone())
    optimizer = ConstrainedAdam([{"params": [dec], "unit_rows": True}, {"params": [enc]}], lr=1e-2, betas=(0.9, 0.99))
    for g_dec, g_enc in grads:
        dec.grad, enc.grad = g_dec.clone(), g_enc.clone()
        optimizer.step()
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(dec.detach(), want_dec, atol=tol, rtol=tol)
    torch.testing.assert_close(enc.detach(), want_enc, atol=tol, rtol=tol)
    assert torch.allclose(dec.detach().norm(dim=1), torch.ones(48, dtype=dtype))
    state = optimizer.state_dict()["state"][0]
    assert float(state["step"]) == 5 and set(state) == {"step", "exp_avg", "exp_avg_sq"}


def test_the_tensor_path_matches_the_compiled_one():
    generator = torch.Generator().manual_seed(1)
    param = torch.randn(32, 16, generator=generator)
    param /= param.norm(dim=1, keepdim=True)
    grad = torch.randn(32, 16, generator=generator)
    compiled = torch.nn.Parameter(param.clone())
    compiled.grad = grad.clone()
    ConstrainedAdam([{"params": [compiled], "unit_rows": True}], lr=0.05).step()
    plain = param.clone()
    _adam_in_torch(plain, grad.clone(), torch.zeros_like(plain), torch.zeros_like(plain), lr=0.05, beta1=0.9,
                   beta2=0.999, eps=1e-8, step=1, unit_rows=True)
    torch.testing.assert_close(compiled.detach(), plain, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("grad_layout", ["same", "other"])
def test_column_major_parameters_and_biases_are_updated(grad_layout):
    weight = torch.nn.Parameter(torch.randn(16, 8).t())  # column-major, as the encoder is stored
    bias = torch.nn.Parameter(torch.zeros(8))
    # a gradient in the parameter's own layout takes the compiled path; another layout the tensor path
    weight.grad = torch.ones_like(weight) if grad_layout == "same" else torch.ones(8, 16)
    bias.grad = torch.ones_like(bias)
    before = weight.detach().clone()
    ConstrainedAdam([weight, bias], lr=0.1).step()
    # Adam's first step moves every entry by lr against the sign of its gradient
    torch.testing.assert_close(weight.detach(), before - 0.1, atol=1e-6, rtol=0)
    torch.testing.assert_close(bias.detach(), torch.full((8,), -0.1), atol=1e-6, rtol=0)
