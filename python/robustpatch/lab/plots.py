"""The figures of the lab's experiments (:mod:`robustpatch.lab.experiments`): one style,
type never under :data:`MIN_FONT_PT`, legends outside the panels, one colour per corruption."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import corruptions as C
from . import outputs
from .corruptions import SEVERITIES

# Type sizes in points. The PNGs are saved at 100 dpi, so at 100% zoom nothing reads
# smaller than MIN_FONT_PT.
MIN_FONT_PT = 10
FIGURE_STYLE = {
    "font.size": 11,
    "axes.titlesize": 12,
    "axes.labelsize": 11,
    "xtick.labelsize": MIN_FONT_PT,
    "ytick.labelsize": MIN_FONT_PT,
    "legend.fontsize": MIN_FONT_PT,
    "legend.title_fontsize": MIN_FONT_PT,
    "figure.titlesize": 12,
}
_DPI = 100
# One colour per corruption of the catalogue (tab10, then nine more), so that a
# corruption looks the same in every figure of every run.
_COLOURS = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#b5cf6b",
    "#e7969c", "#9c9ede", "#000000",
)  # fmt: skip
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
_LINESTYLES = ("-", "--", "-.", ":")


def corruption_style(label: str) -> dict[str, Any]:
    """Colour, marker and line style of the corruption a label names.

    A label may carry a seed or a dataset (``fog/s1``, ``patterns:fog``); it is drawn as
    its corruption. Names outside the catalogue are grey.
    """
    name = label.removeprefix("patterns:").split("/")[0]
    if name not in C.CORRUPTIONS:
        return {"color": "0.4", "marker": "o", "linestyle": "-"}
    i = C.CORRUPTIONS.index(name)
    return {
        "color": _COLOURS[i],
        "marker": _MARKERS[i % len(_MARKERS)],
        "linestyle": _LINESTYLES[i % len(_LINESTYLES)],
    }


def _styled(plot: Any) -> Any:
    """Draw `plot` under FIGURE_STYLE (a context: other figures keep their settings)."""

    @functools.wraps(plot)
    def draw(*args: Any, **kwargs: Any) -> Any:
        import matplotlib

        with matplotlib.rc_context(FIGURE_STYLE):
            return plot(*args, **kwargs)

    return draw


def _figure(width: float, height: float, ncols: int = 1, nrows: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(nrows, ncols, i + 1) for i in range(nrows * ncols)]
    return fig, axes


def _legend_outside(fig: Any, title: str | None = None) -> None:
    """One legend for all panels, right of them, so it never covers data."""
    entries: dict[str, Any] = {}
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    if entries:
        fig.legend(
            list(entries.values()),
            list(entries),
            loc="upper left",
            bbox_to_anchor=(1.0, 1.0),
            frameon=False,
            title=title,
        )


def _colour_ticklabels(labels: Sequence[Any], names: Sequence[str]) -> None:
    """Tick labels in their corruption's colour."""
    for text, name in zip(labels, names):
        text.set_color(corruption_style(name)["color"])


def _save(fig: Any, path: str | Path) -> Path:
    with warnings.catch_warnings():  # a crowded figure keeps its default layout
        warnings.simplefilter("ignore", UserWarning)
        fig.tight_layout()
    # "tight" widens the image to take in the legend placed outside the panels.
    return outputs.save_figure(fig, path, dpi=_DPI, bbox_inches="tight", pad_inches=0.15)


def _short(name: str) -> str:
    return name.removeprefix("features.").removesuffix(".weight")


@_styled
def plot_layer_profile(profiles: Mapping[str, Mapping[str, Any]], path: str | Path) -> Path:
    """Relative difference and projection coefficient per layer, one line per corruption."""
    fig, (ax1, ax2) = _figure(11, 4, ncols=2)
    for name, p in profiles.items():
        x = range(len(p["layers"]))
        ax1.plot(x, p["relative_difference"], label=name, **corruption_style(name))
        ax2.plot(x, p["coefficient"], label=name, **corruption_style(name))
    first = next(iter(profiles.values()))
    for ax in (ax1, ax2):
        ax.set_xticks(range(len(first["layers"])))
        ax.set_xticklabels([_short(n) for n in first["layers"]], rotation=45, ha="right")
        ax.set_xlabel("layer (input → output)")
        ax.axvspan(-0.5, first["first_third"] - 0.5, color="0.9", zorder=0)
    ax1.set_ylabel("‖θrobust − θclean‖ / ‖θclean‖")
    ax2.set_ylabel("⟨Δr, d⟩ / ‖d‖²")
    ax1.set_title("relative difference (shaded: first third)")
    ax2.set_title("projection coefficient")
    _legend_outside(fig, "corruption")
    return _save(fig, path)


# Reference arms in greys; patched arms in the panel's corruption colour, told apart by
# line style and marker, the first listed (the pre-registered arm) drawn thicker.
_REFERENCE_ARMS = {
    "clean": {"color": "0.0", "linestyle": ":", "marker": "o"},
    "bn_reestimation_only": {"color": "0.6", "linestyle": "--", "marker": "s"},
    "robust": {"color": "0.3", "linestyle": "-", "marker": "D"},
}


def _arm_style(arm: str, patched: Sequence[str], colour: str) -> dict[str, Any]:
    if arm in _REFERENCE_ARMS:
        return {**_REFERENCE_ARMS[arm], "lw": 1.5}
    i = patched.index(arm)
    return {
        "color": colour,
        "linestyle": _LINESTYLES[i % len(_LINESTYLES)],
        "marker": _MARKERS[(i + 2) % len(_MARKERS)],
        "lw": 3.0 if i == 0 else 1.5,
    }


@_styled
def plot_patch_arms(
    results: Mapping[str, Mapping[str, Any]],
    path: str | Path,
    arms: Sequence[str],
    labels: Mapping[str, str] | None = None,
) -> Path:
    """Accuracy against severity, one panel per corruption, for the listed arms
    (`labels`: legend text per arm; the arm's name where absent)."""
    from matplotlib.lines import Line2D

    labels = labels or {}
    patched = [arm for arm in arms if arm not in _REFERENCE_ARMS]
    n = len(results)
    fig, axes = _figure(3.4 * n, 3.6, ncols=n)
    for ax, (name, r) in zip(axes, results.items()):
        colour = corruption_style(name)["color"]
        for arm in arms:
            if arm in r["arms"]:
                style = _arm_style(arm, patched, colour)
                ax.plot(SEVERITIES, r["arms"][arm]["severity"], label=arm, **style)
        ax.set_title(name, color=colour)
        ax.set_xlabel("severity")
        ax.set_xticks(SEVERITIES)
        ax.set_ylim(0, 100)
    axes[0].set_ylabel("accuracy on corrupted test (%)")
    # Patched arms change colour with the panel: the legend shows their style in grey.
    handles = [
        Line2D([], [], label=labels.get(arm, arm), **_arm_style(arm, patched, "0.45"))
        for arm in arms
    ]
    fig.legend(
        handles=handles,
        loc="upper left",
        bbox_to_anchor=(1.0, 1.0),
        frameon=False,
        title="patched arms in the panel's colour",
    )
    return _save(fig, path)


@_styled
def plot_depth_sweep(
    sweeps: Mapping[str, Mapping[str, Any]], path: str | Path, budget: float | None = None
) -> Path:
    """Gain against the share of parameters patched."""
    fig, (ax,) = _figure(6, 4)
    for name, s in sweeps.items():
        rows = s["rows"]
        ax.plot(
            [100 * r["param_fraction"] for r in rows],
            [r["gain"] for r in rows],
            label=name,
            **corruption_style(name),
        )
    if budget is not None:
        ax.axvline(100 * budget, color="0.5", ls="--", lw=1, label="parameter budget")
    ax.set_xlabel("parameters patched (%, first k layers)")
    ax.set_ylabel("gain over clean (points)")
    _legend_outside(fig)
    return _save(fig, path)


@_styled
def plot_alpha_sweep(sweeps: Mapping[str, Mapping[str, Any]], path: str | Path) -> Path:
    """Mean accuracy against α, per corruption (solid: re-estimated BN, dashed: shipped)."""
    fig, (ax,) = _figure(6, 4)
    for name, s in sweeps.items():
        style = corruption_style(name)
        for policy, ls in (("reestimate", "-"), ("signature", "--")):
            rows = s["policies"].get(policy)
            if rows:
                ax.plot(
                    [r["alpha"] for r in rows],
                    [r["mean"] for r in rows],
                    ls,
                    color=style["color"],
                    marker=style["marker"],
                    label=f"{name} ({policy})",
                )
    ax.axvline(1.0, color="0.5", lw=1)
    ax.set_xlabel("α")
    ax.set_ylabel("mean accuracy on corrupted test (%)")
    _legend_outside(fig, "corruption (BN policy)")
    return _save(fig, path)


@_styled
def plot_similarity(sim: Mapping[str, Any], path: str | Path) -> Path:
    """The cosine similarity matrix as a heatmap, labels in their corruption's colour."""
    labels, m = sim["labels"], np.asarray(sim["matrix"])
    size = 2.5 + 0.6 * len(labels)
    fig, (ax,) = _figure(size + 1, size)
    im = ax.imshow(m, vmin=-1, vmax=1, cmap="RdBu_r")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=90)
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels)
    _colour_ticklabels(ax.get_xticklabels(), labels)
    _colour_ticklabels(ax.get_yticklabels(), labels)
    for i in range(len(labels)):
        for j in range(len(labels)):
            ink = "white" if abs(m[i, j]) > 0.6 else "black"  # legible on dark cells
            ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", color=ink)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="cosine similarity")
    return _save(fig, path)


@_styled
def plot_composition(
    results: Sequence[Mapping[str, Any]], path: str | Path, policy: str = "reestimate"
) -> Path:
    """Gain of each signature alone and of the sum, per pair and corruption."""
    labels, evaluated, alone, summed = [], [], [], []
    for r in results:
        for c, row in r["policies"][policy].items():
            labels.append(f"{'+'.join(r['pair'])}\non {c}")
            evaluated.append(c)
            alone.append(row["alone_gain"])
            summed.append(row["sum_gain"])
    fig, (ax,) = _figure(max(6.0, 1.3 * len(labels)), 4.5)
    x = np.arange(len(labels))
    ax.bar(x - 0.2, alone, 0.4, label="signature alone", color="0.6")
    ax.bar(x + 0.2, summed, 0.4, label="sum of two", color="0.2")
    return _save_bars(fig, ax, labels, evaluated, 45, "gain over clean (points)", path)


@_styled
def plot_transfer(
    results: Mapping[str, Mapping[str, Any]], path: str | Path, policy: str = "reestimate"
) -> Path:
    """Gains on dataset B: BN alone, A's signature, B's own signature, B's robust model."""
    names = list(results)
    # Bars are arms, in greys: colour stands for a corruption in these figures.
    arms = [
        ("bn_reestimation_only", "BN re-estimation alone", "0.85"),
        (f"transfer|{policy}", "signature from A", "0.6"),
        (f"own|{policy}", "B's own signature", "0.35"),
        ("robust", "B's robust model", "0.1"),
    ]
    fig, (ax,) = _figure(max(6.0, 1.8 * len(names)), 4)
    x = np.arange(len(names))
    w = 0.8 / len(arms)
    for i, (arm, label, grey) in enumerate(arms):
        vals = [results[n]["arms"].get(arm, {}).get("gain", np.nan) for n in names]
        ax.bar(x + (i - 1.5) * w, vals, w, label=label, color=grey, edgecolor="black", lw=0.5)
    return _save_bars(fig, ax, names, names, 20, "gain over B's clean model (points)", path)


def _save_bars(
    fig: Any,
    ax: Any,
    labels: Sequence[str],
    corruptions: Sequence[str],
    rotation: float,
    ylabel: str,
    path: str | Path,
) -> Path:
    """Label a bar chart's groups (tick text in each group's corruption colour), legend
    outside, saved."""
    ax.set_xticks(np.arange(len(labels)))
    ax.set_xticklabels(labels, rotation=rotation, ha="right")
    _colour_ticklabels(ax.get_xticklabels(), corruptions)
    ax.set_ylabel(ylabel)
    _legend_outside(fig)
    return _save(fig, path)


SAME_SIZE_LABEL = "every corruption (same sizes)"


def same_sizes(results: Mapping[str, Mapping[str, Any]]) -> bool:
    """Whether every corruption's signature has the same size at every bit width (the
    same layers give the same shapes), so their size lines coincide."""
    sizes = {tuple((row["bits"], row["nbytes"]) for row in r["rows"]) for r in results.values()}
    return len(sizes) == 1


@_styled
def plot_compression(results: Mapping[str, Mapping[str, Any]], path: str | Path) -> Path:
    """Share of the unquantized gain kept, and size, against bits. Coinciding size lines
    (:func:`same_sizes`) are drawn as one line, labelled so, not hidden under each other."""
    fig, (ax1, ax2) = _figure(11, 4, ncols=2)
    for name, r in results.items():
        bits = [row["bits"] for row in r["rows"]]
        ax1.plot(
            bits, [100 * row["kept"] for row in r["rows"]], label=name, **corruption_style(name)
        )
    lines = {SAME_SIZE_LABEL: next(iter(results.values()))} if same_sizes(results) else results
    for name, r in lines.items():
        style = corruption_style(name) if name in results else {"color": "0.2", "marker": "o"}
        bits = [row["bits"] for row in r["rows"]]
        ax2.plot(bits, [row["nbytes"] / 1024 for row in r["rows"]], label=name, **style)
    first = next(iter(results.values()))
    if first.get("model_nbytes"):
        ax2.axhline(
            first["model_nbytes"] / 1024, color="0.5", ls="--", lw=1, label="fp32 robust model"
        )
    ax1.axhline(100, color="0.5", lw=1)
    ax1.set_ylabel("unquantized gain kept (%)")
    ax2.set_ylabel("size (KiB, log scale)")
    ax2.set_yscale("log")
    ax1.set_title("gain kept")
    ax2.set_title("signature size")
    for ax in (ax1, ax2):
        ax.set_xlabel("bits")
    _legend_outside(fig)
    return _save(fig, path)
