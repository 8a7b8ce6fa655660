"""The report's figures: matplotlib (Agg backend) drawn to PNG and returned as data URIs.

Each function takes the plain data collect.py read and returns a `data:image/png;base64,...` string,
or None when there is nothing to draw (the page then says what is missing).
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # no display: figures are only ever written to PNG bytes
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator  # noqa: E402

from unicap.report.images import data_uri  # noqa: E402
from unicap.report.run_folder import length_unit  # noqa: E402

# one colour per series, the same everywhere on the page (the CSS uses the same values)
PALETTE = {
    "scored pool": "#9aa5b1",
    "stage1": "#4c78a8",
    "stage2": "#f58518",
    "stage3": "#54a24b",
    "captions": "#4c78a8",
    "answer key": "#a39a8c",
    "removed": "#e45756",
}
KEY_STEPS = ("input rows", "scored rows", "stage1", "stage2", "stage3")  # always in the funnel chart
Lengths = Mapping[str, Sequence[int]]  # caption column -> caption lengths
POINTS = 400  # points drawn per box (a random sample of larger series)
STYLE = {
    "font.size": 9,
    "font.family": "DejaVu Sans",
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.edgecolor": "#8a8f98",
    "axes.titlesize": 10,
    "axes.titleweight": "bold",
    "axes.grid": True,
    "grid.color": "#e6e8eb",
    "grid.linewidth": 0.8,
    "axes.axisbelow": True,
    "legend.frameon": False,
}
# a box from the 5th to the 95th percentile around the quartiles, no outliers: the points are drawn over it
BOX = {
    "vert": False,
    "widths": 0.55,
    "whis": (5, 95),
    "showfliers": False,
    "patch_artist": True,
    "boxprops": {"facecolor": "none", "linewidth": 1.4},
    "medianprops": {"color": "#1f2933", "linewidth": 2},
}


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    return data_uri(buf.getvalue(), "image/png")


def _thousands(x, _pos=None) -> str:
    return f"{x:,.0f}"


def _say(ax, text: str) -> None:
    """An empty panel that says why it is empty."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#888")


def _moving_mean(values: Sequence[float], window: int) -> list[float]:
    """The mean of each value and the (up to) window - 1 values before it."""
    out = []
    for i in range(len(values)):
        last = values[max(0, i - window + 1) : i + 1]
        out.append(sum(last) / len(last))
    return out


def funnel_chart(steps: Sequence[Mapping]) -> str | None:
    """Horizontal bars: what remains after each step, what it removed in red beside it. Steps that removed
    nothing are left out (the table beside the chart lists them), the stages always shown."""
    steps = [s for s in steps if s.get("remaining") is not None and (s.get("removed") or s["name"] in KEY_STEPS)]
    if not steps:
        return None
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(8.6, 0.36 * len(steps) + 0.9))
        names = [s["name"] for s in steps]
        kept = [s["remaining"] for s in steps]
        removed = [s.get("removed") or 0 for s in steps]
        top = max(kept[0], max(k + r for k, r in zip(kept, removed, strict=True)), 1)
        log = top / max(min(k for k in kept if k > 0) if any(kept) else 1, 1) > 200
        y = range(len(steps))
        ax.barh(y, kept, color=[PALETTE.get(n, "#7f8fa6") for n in names], height=0.62)
        ax.barh(y, removed, left=kept, color=PALETTE["removed"], alpha=0.35, height=0.62)
        for i, (k, r) in enumerate(zip(kept, removed, strict=True)):
            label = f"{k:,}" + (f"   -{r:,}" if r else "")
            ax.text(k + r, i, "  " + label, va="center", fontsize=8, color="#333")
        ax.set_yticks(list(y), names)
        ax.invert_yaxis()
        ax.grid(axis="y", visible=False)
        if log:
            ax.set_xscale("log")
            ax.set_xlim(0.8, top * 8)
        else:
            ax.set_xlim(0, top * 1.28)
            ax.xaxis.set_major_formatter(FuncFormatter(_thousands))
        ax.set_xlabel("images remaining (red: removed at this step)")
        return _png(fig)


def _length_panel(ax, ours: list[int], key: list[int]) -> None:
    """One level x language: the captions' lengths, the answer key's as an outline over them (filled when
    there are no captions)."""
    both = ours + key
    if not both:
        _say(ax, "no captions")
        return
    lo, hi = min(both), max(both)
    bins = range(lo, hi + 2, max(1, math.ceil((hi - lo + 1) / 30)))
    if ours:
        ax.hist(ours, bins=bins, color=PALETTE["captions"], alpha=0.75, label=f"captions ({len(ours):,})")
    if key:
        outline = {"histtype": "step", "alpha": 1.0} if ours else {"histtype": "stepfilled", "alpha": 0.8}
        label = f"answer key ({len(key):,})"
        ax.hist(key, bins=bins, color=PALETTE["answer key"], linewidth=1.6, label=label, **outline)
    ax.legend(fontsize=7, loc="upper right")


def length_histograms(lengths: Lengths, truth: Lengths, levels: Sequence[str], languages: Sequence[str]) -> str | None:
    """A grid of histograms, one per level (rows) x language (columns): the captions' lengths, and the
    answer key's lengths in grey behind them when there is one."""
    if not levels or not languages or not any(list(lengths.values()) + list(truth.values())):
        return None
    with plt.rc_context(STYLE):
        size = (4.3 * len(languages), 1.9 * len(levels))
        fig, axes = plt.subplots(len(levels), len(languages), figsize=size, squeeze=False)
        for i, lv in enumerate(levels):
            for j, lang in enumerate(languages):
                ax, col = axes[i][j], f"caption_{lv}_{lang}"
                _length_panel(ax, list(lengths.get(col) or []), list(truth.get(col) or []))
                ax.set_title(f"{lv} · {lang}", loc="left")
                ax.set_xlabel(length_unit(lang), fontsize=8)
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
                ax.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=4))
        fig.tight_layout()
        return _png(fig)


def score_distributions(series: Mapping[str, Mapping[str, Sequence[float]]], clip_label: str) -> str | None:
    """Two panels, CLIP and aesthetic: per series (the scored pool, then each stage) a box (quartiles,
    whiskers at the 5th and 95th percentiles) over its points (up to POINTS of them, jittered)."""
    names = [n for n, s in series.items() if s.get("clip") or s.get("aesthetic")]
    if not names:
        return None
    rng = random.Random(0)
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, 2, figsize=(10, 0.55 * len(names) + 1.2))
        for ax, metric, title in ((axes[0], "clip", clip_label), (axes[1], "aesthetic", "aesthetic score")):
            rows = [(i, n, list(series[n].get(metric) or [])) for i, n in enumerate(names)]
            rows = [(i, n, v) for i, n, v in rows if v]
            if rows:
                ax.boxplot([v for _, _, v in rows], positions=[i for i, _, _ in rows], **BOX)
                for i, name, v in rows:
                    pts = v if len(v) <= POINTS else rng.sample(v, POINTS)
                    jittered = [i + rng.uniform(-0.2, 0.2) for _ in pts]
                    ax.scatter(pts, jittered, s=9, alpha=0.55, color=PALETTE.get(name, "#555"), linewidths=0, zorder=3)
            else:
                _say(ax, "no scores")
            ax.set_yticks(range(len(names)), [f"{n} ({len(series[n].get(metric) or []):,})" for n in names])
            ax.set_ylim(len(names) - 0.5, -0.5)
            ax.grid(axis="y", visible=False)
            ax.set_title(title, loc="left")
        fig.tight_layout()
        return _png(fig)


def loss_curves(stages: Mapping[str, Mapping]) -> str | None:
    """One panel per stage: the loss at every logged step and its moving average."""
    shown = {k: v for k, v in stages.items() if v.get("steps")}
    if not shown:
        return None
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(shown), figsize=(3.6 * len(shown) + 0.6, 2.9), squeeze=False)
        for ax, (stage, info) in zip(axes[0], shown.items(), strict=True):
            steps, loss = info["steps"], info["loss"]
            colour = PALETTE.get(stage, "#4c78a8")
            ax.plot(steps, loss, color=colour, alpha=0.3, linewidth=1, label="loss")
            window = max(1, len(loss) // 15)
            smooth = _moving_mean(loss, window)
            ax.plot(steps, smooth, color=colour, linewidth=2, label=f"mean of {window}" if window > 1 else "_")
            ax.set_title(stage, loc="left")
            ax.set_xlabel("step")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=5))
            if window > 1:
                ax.legend(fontsize=7)
        axes[0][0].set_ylabel("training loss")
        fig.tight_layout()
        return _png(fig)
