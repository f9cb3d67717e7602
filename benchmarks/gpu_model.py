"""A random-init model of SmolLM2-135M's shape, as a Hugging Face directory, for gpu_check.sh where no model is carried.

Its weights are random, so only throughput means anything on it (FVU, L0 and CE recovered describe a random
network); the shape (30 layers, d_model 576, 9 heads / 3 KV heads, MLP 1536, vocab 49152, tied embeddings)
is the default model's, so the cost per token is. The tokenizer is a byte-level BPE trained on the repo's
corpus (the real one comes from the hub, which that machine cannot reach).

    python benchmarks/gpu_model.py OUT_DIR [--corpus data/raw] [--layers 30]
"""

from __future__ import annotations

import argparse
from pathlib import Path

SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, head_dim=64, vocab_size=49152, max_position_embeddings=8192,
                    rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True, hidden_act="silu")


def build(out: Path, corpus: Path, layers: int) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = [p.read_text(encoding="utf-8") for p in sorted(corpus.rglob("*.md"))]
    if not texts:
        raise SystemExit(f"gpu_model: no .md files under {corpus}")
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=8192, special_tokens=["<|endoftext|>", "<|im_start|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|im_start|>", eos_token="<|endoftext|>")

    torch.manual_seed(0)
    config = LlamaConfig(**{**SMOLLM2_135M, "num_hidden_layers": layers}, bos_token_id=fast.bos_token_id,
                         eos_token_id=fast.eos_token_id)
    model = LlamaForCausalLM(config).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(out)
    fast.save_pretrained(out)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"gpu_model: random {layers}-layer SmolLM2-135M-shaped model ({n_params / 1e6:.1f}M params, bf16) -> {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the model directory to write (keep 'llama' out of its name)")
    parser.add_argument("--corpus", type=Path, default=Path("data/raw"), help="Markdown to train the tokenizer on")
    parser.add_argument("--layers", type=int, default=30, help="number of layers (30: SmolLM2-135M)")
    args = parser.parse_args()
    build(args.out, args.corpus, args.layers)


if __name__ == "__main__":
    main()
