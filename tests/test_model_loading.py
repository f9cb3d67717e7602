"""Loading a local HF directory into TransformerLens, and choosing the hook."""

from __future__ import annotations

import pytest
import torch

from saepipe.errors import UserError
from saepipe.model.hooks import block_hook_names, middle_layer, resolve_hook
from saepipe.model.loading import check_4bit, load_hooked_model, resolve_device
from saepipe.model.tokenizer import load_tokenizer, tokenizer_fingerprint

# fp32 on CPU: the bridge runs HF's own modules (eager attention), so agreement is to rounding.
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def bridge(tiny_model_dir):
    return load_hooked_model(tiny_model_dir, device=torch.device("cpu"))


def test_resid_post_equals_hf_hidden_states(bridge, tiny_model_dir) -> None:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager").eval()
    tokens = torch.randint(3, 500, (3, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hidden = hf(tokens, output_hidden_states=True).hidden_states
        _, cache = bridge.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_resid_post"))
    for layer in range(bridge.cfg.n_layers - 1):  # HF's last hidden state has the final norm applied
        ours = cache[f"blocks.{layer}.hook_resid_post"]
        assert ours.shape == (3, 24, 64)
        assert (ours - hidden[layer + 1]).abs().max().item() < TOLERANCE
    # and the residual stream before block 0 is the embedding
    with torch.no_grad():
        _, cache = bridge.run_with_cache(tokens, names_filter="blocks.0.hook_resid_pre")
    assert (cache["blocks.0.hook_resid_pre"] - hidden[0]).abs().max().item() < TOLERANCE


def test_stop_at_layer_gives_the_same_activation(bridge) -> None:
    tokens = torch.randint(3, 500, (2, 16))
    with torch.no_grad():
        _, full = bridge.run_with_cache(tokens, names_filter="blocks.0.hook_resid_post")
        _, early = bridge.run_with_cache(tokens, names_filter="blocks.0.hook_resid_post", stop_at_layer=1)
    assert torch.equal(full["blocks.0.hook_resid_post"], early["blocks.0.hook_resid_post"])


def test_hook_names_and_resolution(bridge) -> None:
    names = block_hook_names(bridge.hook_dict)
    assert {"hook_resid_post", "hook_resid_pre", "hook_resid_mid", "hook_mlp_out", "hook_attn_out"} <= set(names)
    spec = resolve_hook(None, "hook_resid_post", "upper", bridge.cfg.n_layers, names)
    assert spec.full_name == "blocks.1.hook_resid_post"
    assert spec.stop_at_layer == 2
    with pytest.raises(UserError, match=r"activations\.hook_layer=2: expected an integer in \[0, 1\]"):
        resolve_hook(2, "hook_resid_post", "upper", bridge.cfg.n_layers, names)
    with pytest.raises(UserError, match=r"activations\.hook_name='hook_resid_psot'"):
        resolve_hook(0, "hook_resid_psot", "upper", bridge.cfg.n_layers, names)


@pytest.mark.parametrize(("n", "lower", "upper"), [(30, 14, 15), (31, 15, 15), (2, 0, 1), (1, 0, 0), (24, 11, 12)])
def test_middle_layer(n: int, lower: int, upper: int) -> None:
    assert middle_layer(n, "lower") == lower
    assert middle_layer(n, "upper") == upper


def test_4bit_and_cuda_requests_are_user_errors_on_cpu() -> None:
    with pytest.raises(UserError, match=r"activations\.load_in_4bit=True: expected false on cpu"):
        check_4bit(torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match=r"activations\.device='cuda'"):
            resolve_device("cuda")
        assert resolve_device("auto").type == "cpu"


def test_missing_model_directory_is_a_user_error(tmp_path) -> None:
    with pytest.raises(UserError, match="run `saepipe base-model` first"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"no config\.json"):
        load_hooked_model(tmp_path / "empty", device=torch.device("cpu"))


def test_tokenizer_fingerprint_tracks_vocabulary(tiny_model_dir, tmp_path) -> None:
    tokenizer = load_tokenizer(tiny_model_dir)
    assert tokenizer_fingerprint(tokenizer) == tokenizer_fingerprint(load_tokenizer(tiny_model_dir))
    tokenizer.add_tokens(["<new_token>"])
    assert tokenizer_fingerprint(tokenizer) != tokenizer_fingerprint(load_tokenizer(tiny_model_dir))


def test_hub_names_load_offline_from_the_local_cache(tiny_model_dir, tmp_path, monkeypatch) -> None:
    """A named hub model already in the Hugging Face cache loads with the network off."""
    import shutil

    snapshot = tmp_path / "hub" / "models--saepipe-test--tiny-llama" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_model_dir, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    bridge = load_hooked_model("saepipe-test/tiny-llama", device=torch.device("cpu"))
    local = load_hooked_model(tiny_model_dir, device=torch.device("cpu"))
    tokens = torch.randint(3, 500, (1, 12))
    with torch.no_grad():
        assert torch.allclose(bridge(tokens), local(tokens), atol=1e-6)
