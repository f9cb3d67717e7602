"""Params of `interp`: sparse probing on the corpus's labels and auto-interpretation of a sample of features."""

from __future__ import annotations

from dataclasses import dataclass

from saepipe.config.fields import bounded, check_device
from saepipe.errors import field_error


@dataclass(frozen=True)
class InterpConfig:
    """Interpretability scores: sparse probes on subject/chapter labels, feature explanations scored by
    detection and fuzzing -> <analysis>/interp/."""

    probe_k: list[int]
    """Sizes of the sparse probes: each is fitted on the k features whose class means differ most."""
    probe_window: int | None
    """Tokens of a document mean-pooled into one probe sample (more samples from few documents; splits stay
    by document); null: one sample per document."""
    probe_c: float
    """Inverse L2 regularisation strength of the logistic-regression probes (scikit-learn's C)."""
    top_tokens: int = bounded(1, 100)
    """Tokens listed per feature a probe chose (the tokens it fires on most often), and the most tokens in a
    token-baseline explanation (each holding at least 5 per cent of the feature's firings)."""
    features: int = bounded(0, 100_000)
    """Features an LLM explainer (explainer_model or explainer_url) explains and scores, a seeded sample of those
    that fire often enough; fewer (with a note) when fewer fire often enough. 0 skips it.
    The token baseline scores every alive feature either way."""
    seed: int
    """Seed of the feature sample, of the held-out and non-activating examples, and of the probes' bootstrap."""
    explain_examples: int = bounded(1, 100)
    """Top-activating examples in each explanation prompt (the summary's quantile-band examples follow them)."""
    score_examples: int = bounded(1, 100)
    """Held-out activating windows per feature for detection and fuzzing, and as many non-activating ones (the
    token baseline's too)."""
    explainer_model: str | None
    """A local directory or hub id of an instruct model to explain and judge with (e.g. models/base; a small
    model judges near chance); null: no LLM explainer, the token baseline alone."""
    explainer_url: str | None
    """An OpenAI-compatible endpoint (e.g. http://127.0.0.1:8000/v1) to use instead of a local model;
    explainer_model names the model it serves."""
    explainer_api_key_env: str | None
    """Environment variable holding the endpoint's API key (sent as a bearer token, never printed); null: none."""
    max_new_tokens: int = bounded(1, 2048)
    """Longest explanation generated, in tokens (greedy decoding; kept whole)."""
    batch_size: int = bounded(1, 1024)
    """Prompts per forward pass (explanations are generated, detection and fuzzing prompts scored, in batches)."""
    device: str
    """auto (CUDA when available), cpu, cuda or cuda:N, for a local explainer model."""

    def validate(self) -> None:
        if not self.probe_k or any(k < 1 for k in self.probe_k) or len(set(self.probe_k)) != len(self.probe_k):
            raise field_error("interp.probe_k", self.probe_k, "a non-empty list of distinct integers >= 1")
        if self.probe_window is not None and self.probe_window < 1:
            raise field_error("interp.probe_window", self.probe_window, "an integer >= 1 or null")
        if self.probe_c <= 0:
            raise field_error("interp.probe_c", self.probe_c, "a number > 0")
        if self.explainer_url is not None and not self.explainer_url.startswith(("http://", "https://")):
            raise field_error("interp.explainer_url", self.explainer_url, "an http:// or https:// URL or null")
        if self.explainer_api_key_env is not None and not self.explainer_api_key_env.strip():
            raise field_error("interp.explainer_api_key_env", self.explainer_api_key_env,
                              "the name of an environment variable or null")
        check_device("interp.device", self.device)
