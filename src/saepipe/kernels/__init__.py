"""The SAE's sparse training ops: select the active latents, then encode, decode and sum only those.

    sparse   SparseCodes and their CSR Pattern; the autograd ops `encode_selected` / `decode_sparse`; the
             CSR products, `batch_sums` and `gather_columns` they and AuxK are built from
    select   `row_top_k`, `batch_top_k` (exact, without a full top-k), `codes_above` and `exact_cut`
    cpu      the compiled (numba) loops both run on CPU float tensors; numpy in, numpy out

Everything here takes tensors and knows nothing of an SAE's parameters or of language models; torch
operators take over wherever the compiled loops do not apply (a GPU, other dtypes).
"""

from saepipe.kernels.select import batch_top_k, codes_above, exact_cut, row_top_k, sharded_batch_top_k
from saepipe.kernels.sparse import (
    BatchSums,
    SparseCodes,
    batch_sums,
    csr_matmul,
    decode_sparse,
    encode_selected,
    gather_columns,
    sampled_dots,
)

__all__ = [
    "BatchSums",
    "SparseCodes",
    "batch_sums",
    "batch_top_k",
    "codes_above",
    "csr_matmul",
    "decode_sparse",
    "encode_selected",
    "exact_cut",
    "gather_columns",
    "row_top_k",
    "sampled_dots",
    "sharded_batch_top_k",
]
