"""The charts of report.md (`lrem.evaluate_report`): grouped bars per metric or slice and
quality against cost, as PNG files written atomically (matplotlib, no display)."""
from __future__ import annotations

import math
from pathlib import Path

from lrem._io import atomic_write
from lrem.evaluate_metrics import PRIMARY_METRIC


def _figure(width_in: float, height_in: float = 4.5):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> None:
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", bbox_inches="tight")


def bar_chart(path: Path, groups: list[str], series: dict[str, list[float]], title: str) -> None:
    """Grouped bar chart (one bar per series inside each group) saved as PNG, atomically.

    Each bar carries its value (a zero bar shows "0.00" and an outline, so it reads as zero,
    not as missing); group labels wrap at "=" and ", " and the figure widens with the bars
    and the longest label line, so neighbouring labels do not run into each other."""
    import textwrap

    labels = ["\n".join(w for line in g.split("\n") for w in textwrap.wrap(line.replace("=", "= "), 14))
              .replace("= ", "=") for g in groups]
    widest = max((len(line) for lab in labels for line in lab.splitlines()), default=1)
    per_group = max(0.35 * max(len(series), 1) + 0.3, 0.095 * widest)  # inches
    fig = _figure(min(max(6.0, 2.5 + per_group * len(groups)), 40.0))
    ax = fig.add_subplot()
    width = 0.8 / max(len(series), 1)
    colors = [f"C{j % 10}" for j in range(len(series))]
    for j, (name, values) in enumerate(series.items()):
        xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(groups))]
        bars = ax.bar(xs, values, width, label=name, color=colors[j], edgecolor=colors[j], linewidth=1.2)
        ax.bar_label(bars, fmt="%.2f", fontsize=7 if len(series) < 5 else 6, padding=1,
                     rotation=90 if len(series) > 3 else 0)
    ax.set_xticks(range(len(groups)), labels, fontsize=8)
    ax.set_ylim(0, 1.12)  # room for the value labels above a bar at 1.0
    ax.axhline(0, color="black", linewidth=0.8)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title)
    if series:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    _save(fig, path)


def quality_cost_chart(path: Path, systems: dict, title: str) -> None:
    """Quality (hitrate@10, ndcg@10) against ms/query per system, ms on a log axis."""
    fig = _figure(7.0)
    ax = fig.add_subplot()
    names = list(systems)
    ms = [max(systems[n]["ms_per_query"], 1e-3) for n in names]
    for j, (metric, marker) in enumerate(((PRIMARY_METRIC, "o"), ("ndcg@10", "s"))):
        ax.scatter(ms, [systems[n]["overall"][metric] for n in names], marker=marker, label=metric, color=f"C{j}")
    # names next to the hitrate@10 points, alternately above and below; systems at the same spot
    # (on the plot's scale) share one label instead of printing over each other
    spots: dict[tuple, list[int]] = {}
    for j, n in enumerate(names):
        spots.setdefault((round(math.log10(ms[j]), 1), round(systems[n]["overall"][PRIMARY_METRIC], 2)), []).append(j)
    for i, js in enumerate(spots.values()):
        ax.annotate(", ".join(names[j] for j in js), (ms[js[0]], systems[names[js[0]]]["overall"][PRIMARY_METRIC]),
                    textcoords="offset points", xytext=(6, 8 if i % 2 == 0 else -12), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("ms per query (search only, log scale)")
    ax.set_ylabel("metric (fraction)")
    ax.set_ylim(-0.02, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(frameon=False)
    ax.set_title(title)
    _save(fig, path)

