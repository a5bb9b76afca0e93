"""Neuron-state figure of an entropy report: per site, the fraction of neurons always in each state
(stacked bars) and the layer entropy (line, second axis), as in the papers' figure; a dashed line
gives the mean over mixed neurons only (EGP's measure). With a ``margin``, one-state neurons inside it
(not certified, see ``certify``) get their own hatched bar; above each bar, the 95 % upper bound on
the per-element flip probability given the site's observations (rule of three).

matplotlib is imported only when a figure is drawn (no pyplot, no global backend: Agg canvas).
"""
from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from nepenthe_compress.certify import exclude, flip_bound, inside_margin
from nepenthe_compress.entropy import EntropyReport, SiteStats
from nepenthe_compress.errors import UserError
from nepenthe_compress.io import atomic_path

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# stacked-bar category -> (states counted in it, colour); "mixed" is every non-constant neuron
CATEGORIES: dict[str, tuple[tuple[str, ...], str]] = {
    "always OFF": (("OFF",), "#3f3f3f"),
    "always ON / LINEAR": (("ON", "LINEAR"), "#4daf4a"),
    "always SATURATED": (("SATURATED",), "#ff7f00"),
    "inside margin": ((), "#d9d9d9"),
    "mixed": ((), "#a6cee3"),
}
INSIDE = "inside margin"
ZERO_ENTROPY_COLOUR = "#d7301f"


def site_labels(sites: Sequence[SiteStats]) -> list[str]:
    """Each site's target (module path, ``#k`` for reuse); its fx name where targets repeat."""
    repeats = Counter(s.target for s in sites)
    return [s.target if repeats[s.target] == 1 else s.name for s in sites]


def neuron_fractions(site: SiteStats, margin: float | None = None) -> dict[str, float]:
    """Fraction of the site's neurons in each ``CATEGORIES`` entry (sums to 1); ``inside margin``
    only with a ``margin`` (one-state neurons that are not certified, counted there instead)."""
    n = max(site.neurons, 1)
    inside = None if margin is None else inside_margin(site, margin)
    if inside is not None:
        site = exclude(site, inside)
    always = site.always()
    out = {name: sum(always.get(s, 0) for s in states) / n for name, (states, _) in CATEGORIES.items()
           if name != INSIDE or inside is not None}
    if inside is not None:
        out[INSIDE] = float(inside.sum()) / n
    out["mixed"] = (site.mixed - (0 if inside is None else int(inside.sum()))) / n
    return out


def entropy_figure(report: EntropyReport, margin: float | None = None) -> Figure:
    """The stacked-bar + entropy-line figure (not saved); ``margin`` splits off the one-state neurons
    inside it."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    sites = report.sites
    x = np.arange(len(sites))
    fig = Figure(figsize=(max(6.0, 0.32 * len(sites) + 2.5), 4.8), layout="constrained")
    ax = fig.add_subplot()
    fractions = [neuron_fractions(s, margin) for s in sites]
    present = {st for s in sites for st in s.states}
    bottom = np.zeros(len(sites))
    for name, (states, colour) in CATEGORIES.items():
        shown = [st for st in states if st in present]
        if (states and not shown) or not fractions or name not in fractions[0]:
            continue  # e.g. no three-state site: no SATURATED bar; no margin: no inside-margin bar
        height = np.array([f[name] for f in fractions])
        label = f"always {' / '.join(shown)}" if states else f"one state, {name} ({margin:g} std)" if name == INSIDE else name
        ax.bar(x, height, 0.8, bottom=bottom, color=colour, label=label, edgecolor="white", linewidth=0.3,
               hatch="///" if name == INSIDE else None)
        bottom += height
    for i, s in enumerate(sites):
        ax.text(i, 1.01, f"{flip_bound(s.elements):.0e}", rotation=90, ha="center", va="bottom", fontsize=6,
                clip_on=False)
    zero = [i for i, s in enumerate(sites) if s.zero_entropy]
    ax.bar(x[zero], 1.0, 0.8, fill=False, edgecolor=ZERO_ENTROPY_COLOUR, linewidth=1.8, clip_on=False)
    ax.set_xlim(-0.6, len(sites) - 0.4)
    ax.set_ylim(0, 1)
    ax.set_ylabel("fraction of neurons")
    ax.set_xticks(x, site_labels(sites), rotation=90, fontsize=7)
    for i in zero:
        ax.get_xticklabels()[i].set(color=ZERO_ENTROPY_COLOUR, fontweight="bold")

    ent = np.array([s.entropy for s in sites])
    ax2 = ax.twinx()
    ax2.plot(x, ent, color="black", marker="o", markersize=3, linewidth=1.2, label="layer entropy (all neurons)")
    ax2.plot(x, [s.entropy_mixed for s in sites], color="black", linestyle="--", linewidth=0.8,
             label="entropy of mixed neurons (EGP)")
    ax2.plot(x[zero], ent[zero], linestyle="none", marker="o", markersize=5, color=ZERO_ENTROPY_COLOUR)
    top = max(1.0, float(np.log2(max((len(s.states) for s in sites), default=2))))
    ax2.set_ylim(0, top * 1.05)
    ax2.set_ylabel("layer entropy (bits)")

    handles = [*ax.get_legend_handles_labels()[0], *ax2.get_legend_handles_labels()[0],
               Patch(fill=False, edgecolor=ZERO_ENTROPY_COLOUR, linewidth=1.8, label="zero-entropy site")]
    fig.legend(handles=handles, loc="outside lower center", ncols=3, fontsize=8, frameon=False)
    fig.suptitle(f"Neuron states per site: {len(zero)}/{len(sites)} zero-entropy sites "
                 f"({report.samples} samples); above the bars: 95% bound on the per-element flip "
                 "probability (rule of three, n = samples x positions)", fontsize=9)
    return fig


def plot_format(path: str | os.PathLike) -> str:
    """The image format ``path``'s suffix names (png when none); ``UserError`` if matplotlib lacks it."""
    from matplotlib.backend_bases import FigureCanvasBase

    path = Path(path)
    fmt = path.suffix.lower().lstrip(".") or "png"
    supported = FigureCanvasBase.get_supported_filetypes()
    if fmt not in supported:
        raise UserError(f"cannot write plot '{path}': unsupported image format '.{fmt}' "
                        f"(use one of {', '.join('.' + f for f in sorted(supported))})")
    return fmt


def plot_entropy(report: EntropyReport, path: str | os.PathLike, margin: float | None = None) -> Path:
    """Draw ``entropy_figure(report, margin)`` to ``path`` atomically; the format follows the suffix."""
    path = Path(path)
    fmt = plot_format(path)
    fig = entropy_figure(report, margin)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, dpi=150)
    return path
