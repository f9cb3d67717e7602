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


def render_search(text: str, results: Sequence[TokenFeature]) -> str:
    if not results:
        return f"no cached token spells {text!r}"
    lines = [f"features most active on {text!r} ({results[0].occurrences:,} occurrences):",
             f"{'feature':>8}  {'mean act':>9}  {'fires on':>8}"]
    lines += [f"{r.feature:>8}  {r.mean_activation:9.3f}  {r.fire_fraction:8.1%}" for r in results]
    return "\n".join(lines)
