"""Shared fixtures: a tiny random Llama model saved as a real HF directory, the repo's params and paths.

Test modules take these as fixtures and never import this file; pure helpers live in `helpers.py`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import with_section

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_CORPUS = REPO.parent / "shared" / "corpus"

TINY_TRAINING_TEXT = [
    "The mitochondria is the powerhouse of the cell. Energy is stored as ATP.",
    "Force equals mass times acceleration. Velocity is the rate of change of position.",
    "Acids donate protons and bases accept them. The pH scale is logarithmic.",
    "Waves carry energy without carrying matter. Sound is a longitudinal wave.",
]


def _make_tiny_model_dir(path: Path, *, n_layers: int = 2, d_model: int = 64, seed: int = 0) -> Path:
    """Save a random 2-layer Llama (vocab 512) with a trained byte-level BPE tokenizer to `path`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<|endoftext|>", "<|bos|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TINY_TRAINING_TEXT * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|bos|>", eos_token="<|endoftext|>")

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=d_model,
        intermediate_size=2 * d_model,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def repo_dir() -> Path:
    """The checkout's root (params.yaml, dvc.yaml, src/, data/)."""
    return REPO


@pytest.fixture
def shared_corpus() -> Path:
    """The shared markdown corpus beside the checkout; the test is skipped where it is absent."""
    if not SHARED_CORPUS.is_dir():
        pytest.skip("shared corpus not present")
    return SHARED_CORPUS


@pytest.fixture(scope="session")
def tiny_training_text() -> list[str]:
    """The sentences the tiny model's tokenizer was trained on (so they tokenize into few, real tokens)."""
    return list(TINY_TRAINING_TEXT)


@pytest.fixture(scope="session")
def make_tiny_model_dir():
    """`make_tiny_model_dir(path, *, n_layers=2, d_model=64, seed=0)`: build another tiny model directory."""
    return _make_tiny_model_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random model directory, built once per test session (read-only for tests)."""
    return _make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "tiny_model")


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    """The tiny model loaded as saepipe loads base models (once per test module)."""
    import torch

    from saepipe.model.loading import load_hooked_model

    return load_hooked_model(tiny_model_dir, device=torch.device("cpu"))


@pytest.fixture
def repo_params():
    """The repo's params.yaml, loaded and validated."""
    from saepipe.config import load_params

    return load_params(REPO / "params.yaml")


@pytest.fixture(scope="session")
def tiny_documents() -> list[str]:
    """Documents of varied length (a few tokens to several windows) from the tiny training text."""
    docs = []
    for i in range(12):
        sentences = [TINY_TRAINING_TEXT[(i + j) % len(TINY_TRAINING_TEXT)] for j in range(1 + (i * 5) % 17)]
        docs.append(" ".join(sentences))
    docs.append("Short.")
    return docs


@pytest.fixture
def tiny_params(tmp_path, tiny_model_dir, repo_params, tiny_documents, monkeypatch):
    """Params for running stages in tmp_path (also the working directory) on the tiny model, texts processed."""
    import json

    monkeypatch.chdir(tmp_path)  # stages that write relative paths stay out of the repo

    processed = tmp_path / "processed"
    processed.mkdir()
    (processed / "texts.json").write_text(json.dumps(tiny_documents))
    params = with_section(repo_params, "process", output_dir=str(processed))
    params = with_section(params, "base_model", output_dir=str(tiny_model_dir))
    params = with_section(params, "tokenize", output=str(tmp_path / "tokens.h5"), val_fraction=0.25)
    return with_section(params, "activations", output_dir=str(tmp_path / "activations"), max_text_length=32,
                        hook_layer=0, device="cpu")


@pytest.fixture
def export_params(tmp_path, repo_params):
    """Params whose train run `r1` checkpoints under tmp_path/ckpts and exports to tmp_path/sae (no upload)."""
    params = with_section(repo_params, "train", run_name="r1", output_dir=str(tmp_path / "ckpts"))
    return with_section(params, "export", output_dir=str(tmp_path / "sae"), checkpoint="best", upload_to_hf=False,
                        hf_repo_id=None, hf_private=False)


@pytest.fixture(scope="session")
def trained_pipeline(tmp_path_factory, tiny_model_dir, tiny_documents):
    """Params of a tiny-model run through export (token cache, activation cache, a trained and exported
    SAE in a temp dir), built once per session: the analysis stages' tests share it and write beside it."""
    import json

    from saepipe.config import load_params
    from saepipe.stages import activations, export, tokenize, train

    root = tmp_path_factory.mktemp("pipeline")
    processed = root / "processed"
    processed.mkdir()
    (processed / "texts.json").write_text(json.dumps(tiny_documents))
    params = load_params(REPO / "params.yaml")
    params = with_section(params, "process", output_dir=str(processed))
    params = with_section(params, "base_model", output_dir=str(tiny_model_dir))
    params = with_section(params, "tokenize", output=str(root / "tokens.h5"), val_fraction=0.25)
    params = with_section(params, "activations", output_dir=str(root / "activations"), max_text_length=32,
                          hook_layer=0, device="cpu")
    params = with_section(params, "train", sae_expansion=2, topk=4, topk_aux=8, batch_size=64, num_epochs=1,
                          lr_warmup_steps=2, device="cpu", output_dir=str(root / "checkpoints"))
    params = with_section(params, "export", output_dir=str(root / "sae"))
    params = with_section(params, "evaluate", output_dir=str(root / "analysis"), device="cpu", batch_size=50,
                          ablation_max_tokens=200)
    params = with_section(params, "activation_db", device="cpu", batch_size=100, values_dtype="float32")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)  # relative paths (wandb/) stay beside the pipeline
        tokenize.run(params)
        activations.run(params)
        train.run(params)
        export.run(params)
    return params
