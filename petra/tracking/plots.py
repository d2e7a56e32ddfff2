"""Front plots: a self-contained interactive HTML page and a PNG (matplotlib).

Both render fronts that :mod:`petra.engine.pareto` computed; nothing here computes a front. The page
is plotly's: the 3-D front (accuracy, size ratio, latency ratio; drag to turn it) and its three 2-D
projections, a candidate's recipe and genes on hover, each series hidden by a click on its legend
entry, and a table of the front members below in plain HTML. plotly.js is inlined, so the page
fetches nothing and opens offline and in MLflow's artifact preview; that makes it about 5 MB, so
only the final front and comparisons get one, and each generation keeps its JSON, CSV and PNG.

One page serves one search (its evaluated candidates and its front) and a comparison of
several searches (one series per search) alike: :func:`front_html` and :func:`compare_html`
build :class:`Series` and hand them to the same renderer.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from petra.errors import COMPLETE
from petra.space import summarize

if TYPE_CHECKING:
    from petra.engine.pareto import FrontSnapshot


#: (metric, axis label) of the plots.
AXES = {"acc": ("val_accuracy", "validation accuracy"),
        "size": ("size_ratio", "size ratio (artifact bytes / dense)"),
        "lat": ("latency_ratio", "latency ratio (vs dense, same runtime)")}
#: Series colours, in order (matplotlib's tab10).
PALETTE = ("#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf")
EVALUATED = "#b0b0b0"


@dataclass
class Series:
    """Points drawn in one colour: ``{"id", "acc", "size", "lat", "front", "label"}`` each."""

    name: str
    color: str
    points: list[dict[str, Any]] = field(default_factory=list)


def plottable(records: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The complete records (front members need no status) with the plotted metrics, finite."""
    out = []
    for r in records:
        m = r.get("metrics") or {}
        values = [m.get(metric) for metric, _ in AXES.values()]
        if r.get("status", COMPLETE) == COMPLETE and all(
                v is not None and math.isfinite(float(v)) for v in values):
            out.append(r)
    return out


def point(record: Mapping[str, Any], *, front: bool, search: str = "") -> dict[str, Any]:
    """A record as a plotted point, its hover label holding its recipe and metrics."""

    m = record["metrics"]
    lines = [f"{search + ' · ' if search else ''}{str(record['id'])[:8]}"
             f"{' (front)' if front else ''}",
             f"val {m['val_accuracy']:.4f}"
             + (f", test {m['test_accuracy']:.4f}" if m.get("test_accuracy") is not None else "")
             + f", size {m['size_ratio']:.3f}, latency {m['latency_ratio']:.3f}",
             summarize(record.get("genome") or {}, record.get("metrics"))]
    genes = {k: v for k, v in (record.get("genome") or {}).items()
             if not (k.endswith(".method") and v == "none")}
    lines += [f"{k} = {v}" for k, v in list(genes.items())[:24]]
    return {"id": str(record["id"]), "acc": float(m["val_accuracy"]),
            "size": float(m["size_ratio"]), "lat": float(m["latency_ratio"]),
            "front": bool(front), "label": "\n".join(lines)}


def front_series(snap: FrontSnapshot, records: Sequence[Mapping[str, Any]], *, name: str = "front",
                 color: str = PALETTE[0], with_rest: bool = True) -> list[Series]:
    """The front of ``snap`` as one series, and (``with_rest``) the other evaluated points."""
    on_front = set(snap.ids)
    members = [point(m, front=True, search=name if not with_rest else "")
               for m in plottable(snap.members)]
    out = []
    if with_rest:
        rest = [point(r, front=False) for r in plottable(records) if r["id"] not in on_front]
        out.append(Series("evaluated", EVALUATED, rest))
    out.append(Series(name, color, members))
    return out


def front_html(snap: FrontSnapshot, records: Sequence[Mapping[str, Any]],
               baseline: Mapping[str, float]) -> str:
    """One search's page: its front (and every other evaluated candidate) after a generation."""
    title = (f"petra front, generation {snap.generation}: hypervolume {snap.hypervolume:.4f}, "
             f"{len(snap.members)} on the front of {snap.evaluated} evaluated")
    subtitle = (f"dense baseline: val accuracy {baseline.get('val_accuracy', float('nan')):.4f}"
                f", size ratio 1, latency ratio 1 (the blue star)")
    rows = [_row("", m) for m in snap.members]
    return render_page(title, subtitle, front_series(snap, records), baseline, rows)


def compare_html(fronts: Sequence[tuple[str, Any]], baseline: Mapping[str, float],
                 summary_html: str = "") -> str:
    """Several searches' fronts overlaid, one colour each: ``fronts`` holds (name, snapshot)."""
    series, rows = [], []
    for i, (name, snap) in enumerate(fronts):
        series += front_series(snap, [], name=name, color=PALETTE[i % len(PALETTE)],
                               with_rest=False)
        rows += [_row(name, m) for m in snap.members]
    title = "petra compare: " + ", ".join(
        f"{name} (hypervolume {snap.hypervolume:.4f})" for name, snap in fronts)
    subtitle = (f"dense baseline: val accuracy {baseline.get('val_accuracy', float('nan')):.4f}"
                f", size ratio 1, latency ratio 1 (the blue star)")
    return render_page(title, subtitle, series, baseline, rows, summary_html)


def _row(search: str, member: Mapping[str, Any]) -> list[str]:
    m = member["metrics"]

    def f(key: str, fmt: str) -> str:
        v = m.get(key)
        return "-" if v is None else format(float(v), fmt)

    return [search, str(member["id"])[:8], f("val_accuracy", ".4f"), f("test_accuracy", ".4f"),
            f("size_ratio", ".3f"), f("latency_ratio", ".3f"), f("artifact_bytes", ".0f"),
            summarize(member.get("genome") or {}, member.get("metrics"))]


def render_page(title: str, subtitle: str, series: Sequence[Series],
                baseline: Mapping[str, float], rows: Sequence[Sequence[str]],
                summary_html: str = "") -> str:
    """The HTML page: :func:`front_figure_3d` with plotly.js inlined, and the table of ``rows``."""
    fig = front_figure_3d(series, baseline)
    plot = fig.to_html(full_html=False, include_plotlyjs=True, default_width="100%",
                       config={"displaylogo": False, "responsive": True})
    head = ["search", "run", "val acc", "test acc", "size", "latency", "bytes", "recipe"]
    keep = [i for i, h in enumerate(head) if h != "search" or any(r[0] for r in rows)]
    table = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(r[i]))}</td>" for i in keep) + "</tr>"
        for r in rows)
    header = "".join(f"<th>{head[i]}</th>" for i in keep)
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>"
            f"<h1>{html.escape(title)}</h1><div class=\"sub\">{html.escape(subtitle)} · drag the "
            f"3-D view to turn it; hover a point for its recipe; click a legend entry to hide "
            f"its series</div>{plot}{summary_html}"
            f"<table><thead><tr>{header}</tr></thead><tbody>{table}</tbody></table>"
            f"</body></html>\n")


_STYLE = ("body{font:13px/1.4 system-ui,sans-serif;margin:16px;color:#222}"
          "h1{font-size:16px;margin:0 0 2px}.sub{color:#666;margin-bottom:8px}"
          "table{border-collapse:collapse;margin-top:12px}"
          "td,th{border:1px solid #ddd;padding:2px 6px;text-align:right}"
          "td:last-child,th:last-child{text-align:left}")

#: The three 2-D projections beside the 3-D view: (x, y) point keys.
PROJECTIONS = (("size", "acc"), ("lat", "acc"), ("size", "lat"))


def front_figure_3d(series: Sequence[Series], baseline: Mapping[str, float]) -> Any:
    """A plotly figure: the 3-D front (size ratio, latency ratio, validation accuracy) and its
    three 2-D projections, one legend group per series (so a click hides it everywhere), each
    point's recipe and genes on hover, the dense baseline as a blue diamond or star."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(
        rows=3, cols=2, column_widths=[0.62, 0.38], horizontal_spacing=0.08,
        vertical_spacing=0.09,
        specs=[[{"type": "scene", "rowspan": 3}, {"type": "xy"}], [None, {"type": "xy"}],
               [None, {"type": "xy"}]])
    for s in series:
        front = s.color != EVALUATED
        pts = s.points
        marker = {"color": s.color, "size": 5 if front else 3,
                  "line": {"color": "#222", "width": 0.6 if front else 0}}
        labels = [p["label"].replace("\n", "<br>") for p in pts]
        common = {"name": f"{s.name} ({len(pts)})", "legendgroup": s.name, "mode": "markers",
                  "text": labels, "customdata": [p["id"] for p in pts],
                  "hovertemplate": "%{text}<extra></extra>"}
        fig.add_trace(go.Scatter3d(x=[p["size"] for p in pts], y=[p["lat"] for p in pts],
                                   z=[p["acc"] for p in pts], marker=marker, **common),
                      row=1, col=1)
        for row, (kx, ky) in enumerate(PROJECTIONS, start=1):
            fig.add_trace(go.Scatter(x=[p[kx] for p in pts], y=[p[ky] for p in pts],
                                     marker={**marker, "size": 8 if front else 5},
                                     showlegend=False, **common), row=row, col=2)
    acc = baseline.get("val_accuracy")
    if acc is not None:
        dense = {"size": 1.0, "lat": 1.0, "acc": float(acc)}
        common = {"name": "dense baseline", "legendgroup": "dense", "mode": "markers",
                  "hovertemplate": f"dense baseline<br>val {float(acc):.4f}, size 1, latency 1"
                                   "<extra></extra>"}
        fig.add_trace(go.Scatter3d(x=[1.0], y=[1.0], z=[dense["acc"]], marker={
            "symbol": "diamond", "size": 7, "color": PALETTE[1]}, **common), row=1, col=1)
        for row, (kx, ky) in enumerate(PROJECTIONS, start=1):
            fig.add_trace(go.Scatter(x=[dense[kx]], y=[dense[ky]], showlegend=False, marker={
                "symbol": "star", "size": 14, "color": PALETTE[1]}, **common), row=row, col=2)
    short = {k: label.split(" (")[0] for k, (_, label) in AXES.items()}
    for row, (kx, ky) in enumerate(PROJECTIONS, start=1):
        fig.update_xaxes(title_text=short[kx], row=row, col=2)
        fig.update_yaxes(title_text=short[ky], row=row, col=2)
    fig.update_layout(
        height=820, margin={"l": 10, "r": 10, "t": 30, "b": 40}, hovermode="closest",
        legend={"orientation": "h", "y": 1.06, "x": 0},
        scene={"xaxis_title": short["size"], "yaxis_title": short["lat"],
               "zaxis_title": short["acc"]})
    return fig


def front_png(snap: FrontSnapshot, records: Sequence[Mapping[str, Any]], baseline: Mapping[str, float],
              path: str | Path) -> None:
    """Accuracy against size ratio and against latency ratio; the front highlighted."""
    title = (f"petra front — generation {snap.generation}, "
             f"hypervolume {snap.hypervolume:.4f}, {len(snap.members)} on front")
    _png(front_series(snap, records, name="Pareto front"), baseline, title, path)


def compare_png(fronts: Sequence[tuple[str, Any]], baseline: Mapping[str, float],
                path: str | Path) -> None:
    """Several searches' fronts overlaid, one colour each."""
    series = []
    for i, (name, snap) in enumerate(fronts):
        series += front_series(snap, [], name=f"{name} (HV {snap.hypervolume:.4f})",
                               color=PALETTE[i % len(PALETTE)], with_rest=False)
    _png(series, baseline, "petra compare — Pareto fronts", path)


def _png(series: Sequence[Series], baseline: Mapping[str, float], title: str,
         path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, key in zip(axes, ("size", "lat"), strict=True):
        for s in series:
            pts = sorted(s.points, key=lambda p: p[key])
            front = s.color != EVALUATED
            ax.scatter([p[key] for p in pts], [p["acc"] for p in pts], s=36 if front else 18,
                       c=s.color, label=s.name, edgecolors="0.2" if front else "none",
                       linewidths=0.5, zorder=3 if front else 2)
        acc = baseline.get("val_accuracy", float("nan"))
        ax.axhline(acc, ls="--", c="tab:blue", lw=1, label="dense baseline")
        ax.scatter([1.0], [acc], marker="*", s=120, c="tab:blue", zorder=4)
        ax.set_xlabel(AXES[key][1])
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(AXES["acc"][1])
    axes[0].legend(loc="lower right", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def front_figure(front: Any, baseline: Mapping[str, float]) -> Any:
    """A plotly figure of a front DataFrame (:attr:`petra.notebook.Result.front`): validation
    accuracy against size ratio and against latency ratio, the knee as a star, the dense
    baseline as a dashed line, each point's recipe on hover."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, shared_yaxes=True,
                        subplot_titles=(AXES["size"][1], AXES["lat"][1]))
    hover = ("%{customdata[0]}<br>val %{y:.4f}, size %{customdata[1]:.3f}, "
             "latency %{customdata[2]:.3f}<br>%{customdata[3]}<extra></extra>")
    for col, key in enumerate(("size_ratio", "latency_ratio"), start=1):
        for knee in (False, True):
            part = front[front["knee"] == knee]
            fig.add_trace(go.Scatter(
                x=part[key], y=part["val_accuracy"], mode="markers",
                name="knee" if knee else "front", showlegend=col == 1,
                marker={"size": 14 if knee else 9, "symbol": "star" if knee else "circle",
                        "color": PALETTE[1] if knee else PALETTE[0]},
                customdata=part[["id", "size_ratio", "latency_ratio", "recipe"]].to_numpy(),
                hovertemplate=hover), row=1, col=col)
        if baseline.get("val_accuracy") is not None:
            fig.add_hline(y=float(baseline["val_accuracy"]), line_dash="dash", row=1, col=col,
                          annotation_text="dense baseline" if col == 1 else None)
    fig.update_yaxes(title_text=AXES["acc"][1], row=1, col=1)
    fig.update_layout(title="petra front", height=420, width=960)
    return fig
