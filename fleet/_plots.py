"""The fleet report's plots: matplotlib figures, rendered to PNG and carried as data URIs.

edgepack.fleet._report decides what the page shows and asks this module for each figure:

* :func:`versions_chart`: devices per active version of the model;
* :func:`histogram`: a feature's reference distribution next to the latest window of up to a
  few devices;
* :func:`time_lines`: stacked time plots sharing one axis, one line per device (the drift
  statistic, the latency percentiles).

Each returns an :class:`Image` whose ``src`` is a ``data:image/png;base64,...`` URI, so the page
stays one self-contained file. Text from devices (device and feature names, categories) is drawn
as plain text, never as matplotlib mathtext. matplotlib is imported inside the functions only:
importing this module (and so the report or the CLI) stays cheap and works without it.
"""

from __future__ import annotations

import base64
import io
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from edgepack.fleet._views import feature_ratio, number

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["COLORS", "Image", "Series", "histogram", "time_lines", "versions_chart"]

COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")
"""One color per device, in the order the report lists them; beyond these, devices repeat."""

Series = dict[str, list[tuple[datetime, float]]]
"""Device -> (time, value) points, oldest first."""


@dataclass(frozen=True)
class Image:
    """A rendered figure: its alternative text and a ``data:image/png;base64,...`` URI."""

    alt: str
    src: str


def _figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _image(figure: Figure, alt: str) -> Image:
    buffer = io.BytesIO()
    # no "Software" text chunk: it would carry matplotlib's URL into the file
    figure.savefig(buffer, format="png", metadata={"Software": None})
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return Image(alt=alt, src=f"data:image/png;base64,{data}")


def _plain(text: Any) -> str:
    """Text for matplotlib as it is: no mathtext between "$", no legend entry hidden by "_"."""
    text = str(text).replace("$", r"\$")
    return f" {text}" if text.startswith("_") else text


def _bin_labels(feature: Mapping[str, Any], bins: int) -> list[str]:
    categories, edges = feature.get("categories"), feature.get("edges")
    if isinstance(categories, list) and len(categories) == bins:
        return [str(c) for c in categories]
    numbers = [number(x) for x in edges] if isinstance(edges, list) else []
    if numbers and len(numbers) == bins - 1 and None not in numbers:
        e = [f"{x:.3g}" for x in numbers]
        return [f"< {e[0]}", *(f"{a} – {b}" for a, b in itertools.pairwise(e)), f"≥ {e[-1]}"]
    return [f"bin {i}" for i in range(bins)]


def histogram(
    name: str,
    version: Any,
    shown: Sequence[tuple[str, Mapping[str, Any]]],
    colors: Mapping[str, str],
) -> Image:
    """A feature's reference histogram with the latest window of each device in ``shown``.

    Args:
        name: the feature.
        version: the model version whose reference this is.
        shown: (device, the feature's entry in its latest drift report); the first one's
            ``reference``, ``edges`` and ``categories`` draw the reference.
        colors: device -> bar color.

    Returns:
        The figure; its legend gives each device's KS statistic and its ratio to the threshold.
    """
    reference = [number(x) or 0.0 for x in shown[0][1].get("reference") or []]
    labels = _bin_labels(shown[0][1], len(reference))
    figure = _figure(max(6.0, 0.9 * len(labels) + 2), 3.4)
    ax = figure.add_subplot()
    width = 0.8 / (1 + len(shown))
    x = range(len(reference))
    ax.bar([i - 0.4 + width / 2 for i in x], reference, width, color="#9e9e9e", label="reference")
    for k, (device, feature) in enumerate(shown, start=1):
        live = [number(v) or 0.0 for v in feature.get("live") or []][: len(reference)]
        ratio, ks = feature_ratio(feature), number(feature.get("ks"))
        label = _plain(device) + (f" (KS {ks:.3g}" if ks is not None else " (")
        label += f", {ratio:.1f}× threshold)" if ratio is not None else ")"
        left = [i - 0.4 + width * (k + 0.5) for i in range(len(live))]
        ax.bar(left, live, width, color=colors.get(device, "#555"), label=label)
    rotation = 30 if len(labels) > 5 else 0
    ha = "right" if rotation else "center"
    ax.set_xticks(list(x), [_plain(b) for b in labels], rotation=rotation, ha=ha)
    ax.set_ylabel("share of rows")
    ax.set_title(_plain(f"{name} (v{version}): reference vs latest window"))
    ax.legend(fontsize="small", frameon=False)
    return _image(figure, f"{name}: reference vs live histogram")


def time_lines(
    panels: list[tuple[str, Series]],
    colors: Mapping[str, str],
    title: str,
    alt: str,
    *,
    threshold: bool = False,
) -> Image | None:
    """Stacked time plots sharing the x axis, one line per device.

    Args:
        panels: (y axis label, series) per panel, top first.
        colors: device -> line color.
        title: above the top panel.
        alt: the image's alternative text.
        threshold: draw a dashed line at 1.0 (the alarm level of KS / threshold).

    Returns:
        The figure, or None when no panel has a single point.
    """
    if not any(points for _label, series in panels for points in series.values()):
        return None
    from matplotlib.dates import AutoDateLocator, ConciseDateFormatter

    figure = _figure(10, 0.6 + 2.6 * len(panels))
    axes = figure.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (ylabel, series) in zip(axes, panels, strict=True):
        for device, points in series.items():
            if points:
                xs, ys = zip(*points, strict=True)
                color, label = colors.get(device), _plain(device)
                ax.plot(xs, ys, marker="o", markersize=3, color=color, label=label)
        if threshold:
            ax.axhline(1.0, color="#c62828", linestyle="--", linewidth=1, label="threshold")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    locator = AutoDateLocator()
    axes[-1].xaxis.set_major_locator(locator)
    axes[-1].xaxis.set_major_formatter(ConciseDateFormatter(locator))
    axes[0].set_title(title)
    if len(panels[0][1]) <= len(COLORS):
        axes[0].legend(fontsize="small", frameon=False, loc="upper left", bbox_to_anchor=(1, 1))
    return _image(figure, alt)


def versions_chart(counts: Mapping[str, int]) -> Image:
    """Bars of devices per active version.

    Args:
        counts: version label (``"v2"``, ``"none"``) -> devices, in the order to draw; not empty.

    Returns:
        The figure.
    """
    figure = _figure(max(4.0, 1.2 * len(counts) + 2), 2.8)
    ax = figure.add_subplot()
    bars = ax.bar(list(counts), list(counts.values()), color=COLORS[0])
    ax.bar_label(bars)
    ax.set_ylabel("devices")
    ax.set_title("active version")
    ax.set_ylim(0, max(counts.values()) * 1.2)
    ax.yaxis.get_major_locator().set_params(integer=True)  # type: ignore[call-arg]
    return _image(figure, "devices per active version")
