"""The chart of `lfm2 bench`: prefill and decode tokens/s as grouped bars, decode against the memory-bandwidth limit.

A table gives the figures; the chart shows at a glance who leads at which format, and how far decode is
from the limit that memory bandwidth sets (a decode step reads every active weight once, so tokens/s
cannot exceed bandwidth / weight bytes per token: the dashed mark over each decode bar). Rows are
grouped by format (float32, int8, int4, or the one GGUF file), one bar colour per engine.
Written with matplotlib's Agg backend (no display needed), atomically.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from lfm2.files import atomic_path


@dataclass
class Bar:
    """One row of the bench table, as the chart draws it."""

    label: str  # "lfm2 int4 eager"
    engine: str  # the bar's colour: rows of one engine share it across formats
    group: str  # the format rows are compared within: "int4", "f32", or a GGUF file's type
    prefill: float  # tokens/s
    decode: float  # tokens/s
    decode_limit: float  # tokens/s the measured read bandwidth allows at this row's weight bytes per token


def write_chart(path: str | os.PathLike, bars: list[Bar], title: str) -> Path:
    """Draw `bars` into a PNG at `path` (two panels: prefill and decode tokens/s); returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    groups = list(dict.fromkeys(b.group for b in bars))
    engines = list(dict.fromkeys(b.engine for b in bars))
    colours = {e: plt.get_cmap("tab10")(i % 10) for i, e in enumerate(engines)}
    fig, axes = plt.subplots(1, 2, figsize=(5 + 2.2 * len(bars), 4.8), squeeze=False)
    for ax, metric in zip(axes[0], ("prefill", "decode"), strict=True):
        ticks = []
        x = 0.0
        for group in groups:
            members = [b for b in bars if b.group == group]
            start = x
            for b in members:
                value = getattr(b, metric)
                ax.bar(x, value, width=0.8, color=colours[b.engine], label=b.engine)
                ax.annotate(f"{value:.{1 if value >= 10 else 2}f}", (x, value), ha="center", va="bottom", fontsize=8)
                if metric == "decode" and b.decode_limit > 0:
                    ax.hlines(b.decode_limit, x - 0.45, x + 0.45, colors="black", linestyles="dashed",
                              label="memory-bandwidth limit")
                x += 1
            ticks.append(((start + x - 1) / 2, group))
            x += 0.8  # a gap between formats
        ax.set_xticks([t for t, _ in ticks], [g for _, g in ticks])
        ax.set_ylabel(f"{metric} tokens/s")
        ax.set_title(f"{metric} (higher is better)")
        ax.set_ylim(0, max(max(getattr(b, metric) for b in bars),
                           max((b.decode_limit for b in bars), default=0) if metric == "decode" else 0) * 1.15 or 1)
    handles, labels = axes[0][1].get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    fig.legend(unique.values(), unique.keys(), loc="lower center", ncol=min(len(unique), 5), fontsize=8,
               frameon=False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.08, 1, 0.95))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path
