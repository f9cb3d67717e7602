"""A feature in the terminal: its stats, and examples with the activating tokens highlighted.

On a TTY each token the feature fires on gets a background shade by its activation (relative to the
feature's max) and the example's own token is bold; elsewhere (a pipe, a log) the same is plain text:
the example's token in «», other firing tokens in [], every value printed beside its example.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from saepipe.analysis.activation_db import Example, TokenFeature

_SHADES = (224, 217, 210, 203, 196)  # xterm-256 reds, light to strong
_RESET = "\x1b[0m"


def visible(piece: str) -> str:
    """A token as it should read on one line: newlines and tabs shown, not performed."""
    return piece.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")


def render_example(example: Example, peak: float, color: bool) -> str:
    parts = []
    for i, (piece, value) in enumerate(zip(example.tokens, example.activations, strict=True)):
        text = visible(piece)
        if color and value > 0:
            shade = _SHADES[min(len(_SHADES) - 1, int(len(_SHADES) * value / peak))] if peak > 0 else _SHADES[0]
            bold = "\x1b[1m" if i == example.marked else ""
            parts.append(f"\x1b[48;5;{shade}m\x1b[30m{bold}{text}{_RESET}")
        elif i == example.marked:
            parts.append(f"«{text}»")
        elif value > 0:
            parts.append(f"[{text}]")
        else:
            parts.append(text)
    return f"{example.activation:8.3f}  doc {example.doc:>5} pos {example.position:>5}  {''.join(parts)}"


def render_feature(stats: dict[str, Any], top: Sequence[Example], bands: dict[float, Sequence[Example]],
                   color: bool) -> str:
    quantiles = ", ".join(f"q{q} {v:.3g}" for q, v in stats["quantiles"].items())
    lines = [
        f"feature {stats['feature']}: " + (
            f"fires on {stats['count']:,} tokens (density {stats['density']:.3g}); mean {stats['mean']:.3g}, "
            f"max {stats['max']:.3g}; {quantiles}" if stats["alive"] else "dead (never fires in the activation DB)"),
    ]
    if top:
        lines.append(f"top {len(top)} examples (activation, document, position, context):")
        lines += [render_example(e, stats["max"], color) for e in top]
    for q, examples in bands.items():
        if examples:
            lines.append(f"around the {q:g} quantile:")
            lines += [render_example(e, stats["max"], color) for e in examples]
    return "\n".join(lines)


def _tokens_with_shares(tokens: Sequence[dict[str, Any]], count: int) -> str:
    return ", ".join(f"{visible(t['token'])!r} {t['count'] / max(count, 1):.0%}" for t in tokens)


def render_top_tokens(tokens: Sequence[dict[str, Any]], count: int) -> str:
    """The tokens a feature fires on most often, each with its share of the feature's firings."""
    return f"top tokens (share of its {count:,} firings): {_tokens_with_shares(tokens, count)}"


def render_neighbours(nearest: Sequence[tuple[int, float]] | None,
                      cooccurring: Sequence[tuple[int, float, int]] | None, source: str) -> str:
    if nearest is None:
        return f"nearest features: unavailable ({source})"
    lines = [f"nearest features by decoder cosine ({source}): "
             + (", ".join(f"{i} {c:.3f}" for i, c in nearest) or "none")]
    if cooccurring is not None:
        lines.append("co-occurring features (Jaccard, tokens both fire on): "
                     + (", ".join(f"{i} {j:.3f} ({n:,})" for i, j, n in cooccurring) or "none"))
    return "\n".join(lines)


def render_logit_lens(promoted: Sequence[dict[str, Any]] | None, suppressed: Sequence[dict[str, Any]] | None,
                      note: str) -> str:
    if promoted is None or suppressed is None:
        return f"logit lens: {note}"
    def listed(tokens: Sequence[dict[str, Any]]) -> str:
        return ", ".join(f"{visible(t['token'])!r} {t['logit']:+.2f}" for t in tokens) or "none"
    return f"logit lens ({note}):\n  promotes  {listed(promoted)}\n  suppresses {listed(suppressed)}"


def render_search(text: str, results: Sequence[TokenFeature], top_tokens: dict[int, Sequence[dict[str, Any]]],
                  counts: dict[int, int], case_sensitive: bool = False) -> str:
    """The features of a token, each described by how often it fires and on which tokens (`top_tokens` and
    `counts` by feature id)."""
    if not results:
        return f"no cached token spells {text!r}" + ("" if case_sensitive else " in any case")
    spelled = "as spelled" if case_sensitive else "any case"
    lines = [f"features most active on {text!r} ({spelled}; {results[0].occurrences:,} occurrences):",
             f"{'feature':>8}  {'mean act':>9}  {'fires on':>8}  {'firings':>8}  top tokens (share of its firings)"]
    lines += [f"{r.feature:>8}  {r.mean_activation:9.3f}  {r.fire_fraction:8.1%}  {counts[r.feature]:>8,}  "
              f"{_tokens_with_shares(top_tokens[r.feature], counts[r.feature])}" for r in results]
    return "\n".join(lines)
