"""Analysis of an exported SAE: the numbers the field uses, with their formulas stated and tested.

Each module is a pure core that takes a loaded SAE (`saepipe.load_sae`, raw activations in) and tensors:

    sparsity        L0 per token (mean, median, p90), per-feature firing density and its log10 histogram,
                    dead features; `sparsity_metrics(sae, x)`, `mean_l0(sae, x)`
    reconstruction  MSE, FVU / explained variance, cosine similarity, L2 ratio, relative reconstruction
                    bias; `reconstruction_metrics(sae, x)`, `fvu(sae, x)`
    ablation        next-token CE and KL with the SAE spliced in, zero- and mean-ablated, and with the error
                    term added back; `ablation_metrics(model, hook, sae, tokens)`
    quick           the activation pass over a cache split, with massive-norm outlier rows set apart

Each also has a streaming accumulator (`add` per batch, `result` at the end) for corpus-sized runs, which
is what `saepipe evaluate` (`saepipe.stages.evaluate`) uses. Submodules are imported on demand, so
`import saepipe.analysis` stays cheap.
"""
