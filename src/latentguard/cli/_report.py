"""Self-contained HTML reports of `direction extract`, `drift` and `analyze lens`.

Each renders from its JSON output alone (figures as inline SVG, nothing loaded from the network).
The templates extend the package's `base.html.j2`.
"""

from __future__ import annotations

import math
from typing import Any

import jinja2
import numpy as np

from latentguard import __version__
from latentguard.eval.html import fig_to_svg, new_figure

__all__ = ["render_direction_report", "render_drift_report", "render_lens_report"]

_ENV = jinja2.Environment(
    loader=jinja2.PackageLoader("latentguard.eval", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
)

_DIRECTION = """{% extends "base.html.j2" %}
{% block title %}latentguard refusal direction · {{ s.model.model_id }}{% endblock %}
{% block body %}
<h1>Refusal direction: {{ s.model.model_id }}</h1>
<p class="sub">{{ s.model.architecture }} · {{ s.model.n_layers }} layers · fingerprint <code>{{ s.model.fingerprint }}</code> · system prompt: {{ s.system_prompt }}</p>
<div class="cards">
  <div class="card"><div class="v">pos {{ s.selected.position }}, layer {{ s.selected.layer }}</div><div class="k">selected candidate (argmin bypass among survivors)</div></div>
  <div class="card"><div class="v">{{ "%.2f"|format(s.selected.bypass) }}</div><div class="k">bypass (harmful val, ablated; baseline {{ "%.2f"|format(s.baseline.harmful_val_proxy_mean) }})</div></div>
  <div class="card"><div class="v">{{ "%.2f"|format(s.selected.induce) }}</div><div class="k">induce (harmless val, +r; baseline {{ "%.2f"|format(s.baseline.harmless_val_proxy_mean) }})</div></div>
  <div class="card"><div class="v">{{ "%.3f"|format(s.selected.kl) }}</div><div class="k">KL on harmless val (threshold {{ s.settings.kl_threshold }})</div></div>
</div>
{% for name, fig in figs %}<h2>{{ name }}</h2><figure>{{ fig|safe }}<figcaption>Rows: post-instruction positions {{ s.eoi_tokens }}; columns: layers. Grey: not scored; ×: failed a filter; ★: selected. Layer cut-off {{ s.layer_cutoff }}.</figcaption></figure>
{% endfor %}
<h2>Refusal tokens</h2>
<p>ids {{ s.refusal_tokens.ids }} ({{ s.refusal_tokens.tokens }}), source <b>{{ s.refusal_tokens.source }}</b>.</p>
<h2>Data</h2>
<table>{% for k, v in s.counts.items() %}<tr><th class="l">{{ k }}</th><td>{{ v }}</td></tr>{% endfor %}</table>
<h2>Conditional gate (for <code>conditional</code>)</h2>
<p>layer {{ s.condition.layer }}, threshold {{ "%.3f"|format(s.condition.threshold) }}, balanced accuracy {{ "%.2f"|format(s.condition.balanced_accuracy) }} on val ({{ s.condition.score }}).</p>
<h2>Candidates</h2>
<table><tr><th>position</th><th>layer</th><th>bypass</th><th>induce</th><th>kl</th><th class="l">failed</th></tr>
{% for c in s.candidates %}<tr><td>{{ c.position }}</td><td>{{ c.layer }}</td><td>{{ fmt(c.bypass) }}</td><td>{{ fmt(c.induce) }}</td><td>{{ fmt(c.kl) }}</td><td class="l">{{ c.failed|join(", ") }}</td></tr>
{% endfor %}</table>
{% endblock %}"""

_DRIFT = """{% extends "base.html.j2" %}
{% block title %}latentguard drift · {{ d.base.model_id }}{% endblock %}
{% block body %}
<h1>Direction drift from {{ d.base.model_id }}</h1>
<p class="sub">fingerprint <code>{{ d.base.fingerprint }}</code> · {{ d.tuned|length }} tuned checkpoint(s) · direction: {{ d.direction.source }}</p>
<h2>cos(r_base, r_tuned) per layer</h2><figure>{{ fig_cos|safe }}</figure>
<h2>Projection shift onto r̂_base</h2><figure>{{ fig_shift|safe }}<figcaption>mean projection (tuned − base) of harmful and harmless last-token activations.</figcaption></figure>
<h2>Summary at layer {{ d.direction.layer }}</h2>
<table><tr><th class="l">tuned</th><th>cos</th><th>cos to direction</th><th>harmful shift</th><th>harmless shift</th><th>proxy harmful base→tuned</th><th>proxy harmless base→tuned</th></tr>
{% for t in d.tuned %}<tr><td class="l">{{ t.model.model_id }}</td><td>{{ fmt(t.at_layer.cos) }}</td><td>{{ fmt(t.at_layer.cos_direction) }}</td><td>{{ "%.2f"|format(t.at_layer.shift_harmful) }}</td><td>{{ "%.2f"|format(t.at_layer.shift_harmless) }}</td><td>{{ "%.2f"|format(d.base_proxy.harmful) }} → {{ "%.2f"|format(t.proxy.harmful) }}</td><td>{{ "%.2f"|format(d.base_proxy.harmless) }} → {{ "%.2f"|format(t.proxy.harmless) }}</td></tr>
{% endfor %}</table>
{% endblock %}"""

_LENS = """{% extends "base.html.j2" %}
{% block title %}latentguard logit lens · {{ l.model.model_id }}{% endblock %}
{% block body %}
<h1>Logit lens: {{ l.model.model_id }}</h1>
<p class="sub">refusal tokens {{ l.refusal_tokens }} · {{ l.n_layers }} layers · last {{ l.tokens|length }} positions</p>
<pre>{{ l.text }}</pre>
<h2>P(refusal tokens) per layer and position</h2><figure>{{ fig|safe }}</figure>
<h2>Top-1 token per layer and position</h2>
<table><tr><th>layer</th>{% for t in l.tokens %}<th>{{ t }}</th>{% endfor %}</tr>
{% for row in l.layers|reverse %}<tr><td>{{ row.layer }}</td>{% for c in row.cells %}<td title="{{ c.top|join(' | ') }}">{{ c.top[0] }} <small>{{ "%.2f"|format(c.top_p[0]) }}</small></td>{% endfor %}</tr>
{% endfor %}</table>
{% endblock %}"""


def _fmt(v: float | None) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3g}"


def _render(template: str, **ctx: Any) -> str:
    return _ENV.from_string(template).render(fmt=_fmt, version=__version__, **ctx)


def _grid_figure(s: dict[str, Any], key: str) -> str:
    grid = np.array([[np.nan if v is None else v for v in row] for row in s["grids"][key]], dtype=float)
    fig, ax = new_figure(7.0, 0.9 + 0.35 * grid.shape[0])
    ax.set_facecolor("#dddddd")
    im = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap="coolwarm" if key != "kl" else "viridis")
    for c in s["candidates"]:
        if not c["passed"]:
            ax.text(c["layer"], s["positions"].index(c["position"]), "×", ha="center", va="center", fontsize=7)
    sel = s["selected"]
    ax.text(sel["layer"], s["positions"].index(sel["position"]), "★", ha="center", va="center", color="gold", fontsize=12)
    ax.set(xlabel="layer", ylabel="position", yticks=range(len(s["positions"])), yticklabels=s["positions"])
    fig.colorbar(im, ax=ax, label=key)
    return fig_to_svg(fig)


def render_direction_report(scores: dict[str, Any], created: str, commit: str | None) -> str:
    """Heat maps (layer × position) of bypass, induce and KL, rendered from scores.json."""
    figs = [(f"{k} score", _grid_figure(scores, k)) for k in ("bypass", "induce", "kl")]
    return _render(_DIRECTION, s=scores, figs=figs, created=created, commit=commit, source="scores.json")


def render_drift_report(drift: dict[str, Any], created: str, commit: str | None) -> str:
    """Per-layer cosine and projection-shift curves, rendered from drift.json."""
    fig, ax = new_figure()
    fig2, ax2 = new_figure()
    for t in drift["tuned"]:
        layers = [row["layer"] for row in t["layers"]]
        ax.plot(layers, [np.nan if row["cos"] is None else row["cos"] for row in t["layers"]], "o-", ms=3,
                label=t["model"]["model_id"])
        ax2.plot(layers, [row["shift_harmful"] for row in t["layers"]], "o-", ms=3, label=f"{t['model']['model_id']} harmful")
        ax2.plot(layers, [row["shift_harmless"] for row in t["layers"]], "s--", ms=3, label=f"{t['model']['model_id']} harmless")
    ax.axvline(drift["direction"]["layer"], color="grey", ls=":", lw=1)
    ax.set(xlabel="layer", ylabel="cos(r_base, r_tuned)", ylim=(-0.05, 1.05))
    ax2.set(xlabel="layer", ylabel="projection shift")
    ax.legend(fontsize=7)
    ax2.legend(fontsize=7)
    return _render(_DRIFT, d=drift, fig_cos=fig_to_svg(fig), fig_shift=fig_to_svg(fig2), created=created,
                   commit=commit, source="drift.json")


def render_lens_report(lens: dict[str, Any], created: str, commit: str | None) -> str:
    """Heat map of refusal-token probability (layer × position) and the top-1 token table, from lens.json."""
    grid = np.array([[c["p_refusal"] for c in row["cells"]] for row in lens["layers"]])
    fig, ax = new_figure(max(7.0, 0.45 * grid.shape[1]), 0.8 + 0.16 * grid.shape[0])
    im = ax.imshow(grid, aspect="auto", origin="lower", cmap="magma", vmin=0, vmax=max(1e-6, float(grid.max())))
    ax.set(xlabel="position", ylabel="layer", xticks=range(len(lens["tokens"])))
    ax.set_xticklabels(lens["tokens"], rotation=90, fontsize=7)
    fig.colorbar(im, ax=ax, label="P(refusal tokens)")
    return _render(_LENS, l=lens, fig=fig_to_svg(fig), created=created, commit=commit, source="lens.json")
