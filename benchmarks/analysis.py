"""The activation DB's build rate against the SAE's own encoder, on synthetic activations shaped like the cache.

ratio = build_activation_db's tokens/s (encode + CSR writes + the sorted reverse index + stats + rename)
        ÷ the bare encode's tokens/s (the same cache reads and the same inference encode, nothing kept),
        both over the same tokens in this process. Goal: >= 0.67.
Also printed (JSON lines): the growth from 250k to 1M tokens (time per token, peak RSS above the start),
`top_examples` latency cold (open + first query) and warm, and the matrices' time at d_sae 4,608 and
16,384 (decoder similarity over all features; co-occurrence over --cooc-rows DB rows).

Synthetic data: d_in 576 (SmolLM2's residual), a TopK SAE (k 32, so L0 = 32) with random weights,
documents of 512 tokens; the tokenizer is a stand-in that spells token ids (decoding is not measured).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import scipy.sparse
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from saepipe.activations.cache import ActivationCache, ActivationCacheWriter  # noqa: E402
from saepipe.analysis import matrices  # noqa: E402
from saepipe.analysis.activation_db import ActivationDB  # noqa: E402
from saepipe.analysis.db_build import build_activation_db, encode_rows  # noqa: E402
from saepipe.corpus.tokens import write_token_cache  # noqa: E402
from saepipe.sae import build_sae, sae_config  # noqa: E402

D_IN, K, DOC = 576, 32, 512


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every 10 ms."""

    def __enter__(self) -> PeakRSS:
        self.process, self.start, self.peak, self.done = psutil.Process(), 0, 0, False
        self.start = self.peak = self.process.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.done:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.01)

    def __exit__(self, *exc: object) -> None:
        self.done = True
        self.thread.join()

    @property
    def mib(self) -> float:
        return (self.peak - self.start) / 2**20


class SpelledTokenizer:
    def decode(self, ids: list[int]) -> str:
        return f" t{ids[0]}"


def synthetic_cache(path: Path, n_rows: int, seed: int = 0) -> None:
    """Low-rank-plus-noise rows (features then fire unevenly, as in a real cache), docs of DOC tokens."""
    rng = np.random.default_rng(seed)
    basis = torch.from_numpy(rng.standard_normal((64, D_IN)).astype(np.float32))
    writer = ActivationCacheWriter(path, D_IN, "float16", 10.0, {"model_name": "synthetic", "hook": "blocks.0.x"})
    per_doc = DOC - 1
    for start in range(0, n_rows, 65536):
        n = min(65536, n_rows - start)
        rows = np.arange(start, start + n)
        acts = torch.from_numpy(rng.standard_normal((n, 64)).astype(np.float32)) @ basis
        acts += 0.3 * torch.randn(n, D_IN)
        writer.append("train", acts, (rows % 50_000).astype(np.int32), (rows // per_doc).astype(np.int32),
                      (rows % per_doc + 1).astype(np.int32))
    writer.close()


def encode_rate(sae, cache: ActivationCache, batch: int) -> float:
    started = time.perf_counter()
    n = cache.n_rows("train")
    for start in range(0, n, batch):
        encode_rows(sae, cache.read("train", start, min(start + batch, n)))
    return n / (time.perf_counter() - started)


def build(sae, cache_path: Path, out: Path, n_docs: int, batch: int, memory_mb: int) -> tuple[float, float, object]:
    with ActivationCache(cache_path) as cache, PeakRSS() as rss:
        started = time.perf_counter()
        result = build_activation_db(out, sae, cache, ["train"], n_documents=n_docs, values_dtype="float16",
                                     quantiles=[0.5, 0.9, 0.99], batch_size=batch, max_memory_mb=memory_mb,
                                     attrs={"texts_sha256": "synthetic"}, progress=False)
        seconds = time.perf_counter() - started
    return result.n_rows / seconds, rss.mib, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", type=int, default=250_000, help="tokens of the smaller run")
    parser.add_argument("--large", type=int, default=1_000_000, help="tokens of the larger run (the ratio's)")
    parser.add_argument("--d-sae", type=int, default=4608)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--max-memory-mb", type=int, default=1024)
    parser.add_argument("--cooc-rows", type=int, default=100_000, help="DB rows the co-occurrence timing uses")
    args = parser.parse_args()
    torch.manual_seed(0)
    sae = build_sae(sae_config("topk", d_in=D_IN, d_sae=args.d_sae, k=K, k_aux=256)).eval()
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        runs = {}
        for n in (args.small, args.large):
            cache_path = work / f"cache_{n}.h5"
            synthetic_cache(cache_path, n)
            n_docs = n // (DOC - 1) + 1
            with ActivationCache(cache_path) as cache:
                encode_rows(sae, cache.read("train", 0, 256))  # warm the kernels
                baseline = encode_rate(sae, cache, args.batch)
            rate, rss, result = build(sae, cache_path, work / f"db_{n}.h5", n_docs, args.batch, args.max_memory_mb)
            runs[n] = {"tokens": n, "build_tokens_per_second": rate, "encode_tokens_per_second": baseline,
                       "peak_rss_mib": rss, "nnz": result.nnz, "reverse_index_blocks": result.blocks,
                       "db_mib": (work / f"db_{n}.h5").stat().st_size / 2**20}
            lines.append({"benchmark": "activation_db_build", **runs[n]})
        small, large = runs[args.small], runs[args.large]
        lines.append({"benchmark": "activation_db_growth", "tokens": [args.small, args.large],
                      "seconds_per_million_tokens": [1e6 / small["build_tokens_per_second"],
                                                     1e6 / large["build_tokens_per_second"]],
                      "peak_rss_mib": [small["peak_rss_mib"], large["peak_rss_mib"]]})

        db_path = work / f"db_{args.large}.h5"
        tokens = write_token_cache(work / "tokens.h5", [np.arange(DOC, dtype=np.int32) % 50_000
                                                        for _ in range(args.large // (DOC - 1) + 1)],
                                   np.zeros(args.large // (DOC - 1) + 1, np.int8), {"texts_sha256": "synthetic"})
        started = time.perf_counter()
        with ActivationDB(db_path, tokens=tokens, tokenizer=SpelledTokenizer()) as db:
            feature = int(np.argmax(db.counts))
            db.top_examples(feature, 20)
            cold = time.perf_counter() - started
            started = time.perf_counter()
            for f in range(feature + 1, feature + 21):
                db.top_examples(f % db.d_sae, 20)
            warm = (time.perf_counter() - started) / 20
        lines.append({"benchmark": "top_examples_latency", "cold_open_and_query_ms": 1e3 * cold,
                      "warm_query_ms": 1e3 * warm, "k": 20, "tokens": args.large})

        for d_sae in (4608, 16384):
            W = torch.randn(d_sae, D_IN)
            with PeakRSS() as rss:
                started = time.perf_counter()
                matrices.decoder_similarity(W, 20, 1024, 0.9)
                similarity_seconds = time.perf_counter() - started
            codes = build_sae(sae_config("topk", d_in=D_IN, d_sae=d_sae, k=K, k_aux=256))
            parts = []
            with ActivationCache(work / f"cache_{args.small}.h5") as cache:
                stop = min(args.cooc_rows, cache.n_rows("train"))
                for start in range(0, stop, args.batch):
                    per_row, cols, vals = encode_rows(codes, cache.read("train", start, min(start + args.batch, stop)))
                    parts.append(scipy.sparse.csr_matrix(
                        (vals, cols, np.concatenate([[0], np.cumsum(per_row)])), shape=(len(per_row), d_sae)))
            codes_csr = scipy.sparse.vstack(parts).tocsr()
            chunks = [codes_csr[s : s + 65536] for s in range(0, codes_csr.shape[0], 65536)]  # matrices.chunk_rows
            counts = np.lib.format.open_memmap(work / "counts.npy", "w+", np.int64, (d_sae, d_sae))  # as the stage
            with PeakRSS() as cooc_rss:
                started = time.perf_counter()
                matrices.cooccurrence(chunks, d_sae, 20, dense_out=counts)
                cooc_seconds = time.perf_counter() - started
            del counts
            lines.append({"benchmark": "matrices", "d_sae": d_sae, "similarity_seconds": similarity_seconds,
                          "similarity_peak_rss_mib": rss.mib, "cooccurrence_rows": codes_csr.shape[0],
                          "cooccurrence_seconds": cooc_seconds, "cooccurrence_peak_rss_mib": cooc_rss.mib})
    for line in lines:
        print(json.dumps(line))
    ratio = large["build_tokens_per_second"] / large["encode_tokens_per_second"]
    print(json.dumps({"benchmark": "activation_db_build_rate", "value": large["build_tokens_per_second"],
                      "unit": "tokens/s", "baseline": "the SAE's inference encode over the same cached tokens",
                      "baseline_value": large["encode_tokens_per_second"], "ratio": ratio, "goal": ">= 0.67",
                      "tokens": args.large, "d_sae": args.d_sae}))


if __name__ == "__main__":
    main()
