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

__all__ = ["fig_to_svg", "new_figure", "render"]

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


def fig_to_svg(fig: Figure) -> str:
    """Inline SVG markup of `fig` (closes the figure)."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None})  # reproducible output
    plt.close(fig)
    svg = buf.getvalue()
    return svg[svg.index("<svg"):]
