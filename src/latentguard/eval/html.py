"""Self-contained HTML: Jinja templates shipped with the package, figures as inline SVG.

Reports open offline: no CDN, no external scripts, fonts or images.
"""

from __future__ import annotations

import io
from typing import Any

import jinja2
import matplotlib

matplotlib.use("Agg")  # headless; must precede pyplot
import matplotlib.pyplot as plt
from matplotlib.figure import Figure

__all__ = ["fig_to_svg", "new_figure", "new_figure_row", "render"]

_ENV = jinja2.Environment(
    loader=jinja2.PackageLoader("latentguard.eval", "templates"),
    autoescape=jinja2.select_autoescape(["html", "j2"]),
    undefined=jinja2.StrictUndefined,
)


def render(template: str, **context: Any) -> str:
    return _ENV.get_template(template).render(**context)


def new_figure(width: float = 7.0, height: float = 3.2) -> tuple[Figure, Any]:
    fig, ax = plt.subplots(figsize=(width, height), layout="constrained")
    return fig, ax


def new_figure_row(width: float, height: float, width_ratios: list[float]) -> tuple[Figure, list[Any]]:
    """One row of axes with the given relative widths."""
    fig, axes = plt.subplots(1, len(width_ratios), figsize=(width, height), width_ratios=width_ratios, layout="constrained")
    return fig, list(axes)


def fig_to_svg(fig: Figure) -> str:
    """Inline SVG markup of `fig` (closes the figure)."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None})  # reproducible output
    plt.close(fig)
    svg = buf.getvalue()
    return svg[svg.index("<svg"):]
