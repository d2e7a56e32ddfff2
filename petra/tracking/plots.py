"""Front plots: a self-contained interactive HTML page and a PNG (matplotlib).

Both render fronts that :mod:`petra.engine.pareto` computed; nothing here computes a front. The page
needs no network and no plotting library: a small inline script draws the 3-D front (accuracy,
size ratio, latency ratio; drag to turn it) and its three 2-D projections on canvases, shows a
candidate's recipe and metrics on hover, and lets each series be hidden. A table of the front
members sits below, in plain HTML. A page is tens of kilobytes, so every generation can keep its
own.

One page serves one search (its evaluated candidates and its front) and a comparison of
several searches (one series per search) alike: :func:`front_html` and :func:`compare_html`
build :class:`Series` and hand them to the same renderer.
"""

from __future__ import annotations

import html
import json
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
             summarize(record.get("genome") or {})]
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
                f", size ratio 1, latency ratio 1 (the star)")
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
                f", size ratio 1, latency ratio 1 (the star)")
    return render_page(title, subtitle, series, baseline, rows, summary_html)


def _row(search: str, member: Mapping[str, Any]) -> list[str]:
    m = member["metrics"]

    def f(key: str, fmt: str) -> str:
        v = m.get(key)
        return "-" if v is None else format(float(v), fmt)

    return [search, str(member["id"])[:8], f("val_accuracy", ".4f"), f("test_accuracy", ".4f"),
            f("size_ratio", ".3f"), f("latency_ratio", ".3f"), f("artifact_bytes", ".0f"),
            summarize(member.get("genome") or {})]


def render_page(title: str, subtitle: str, series: Sequence[Series],
                baseline: Mapping[str, float], rows: Sequence[Sequence[str]],
                summary_html: str = "") -> str:
    """The HTML page: the canvases, the inline script, and the table of ``rows``."""
    data = {
        "series": [{"name": s.name, "color": s.color, "points": s.points} for s in series],
        "baseline": {"acc": baseline.get("val_accuracy"), "size": 1.0, "lat": 1.0},
        "axes": {k: label for k, (_, label) in AXES.items()},
    }
    head = ["search", "run", "val acc", "test acc", "size", "latency", "bytes", "recipe"]
    keep = [i for i, h in enumerate(head) if h != "search" or any(r[0] for r in rows)]
    table = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(r[i]))}</td>" for i in keep) + "</tr>"
        for r in rows)
    header = "".join(f"<th>{head[i]}</th>" for i in keep)
    payload = json.dumps(data, allow_nan=False).replace("</", "<\\/")
    return (_TEMPLATE.replace("%TITLE%", html.escape(title))
            .replace("%SUBTITLE%", html.escape(subtitle))
            .replace("%SUMMARY%", summary_html)
            .replace("%HEADER%", header).replace("%ROWS%", table)
            .replace("%DATA%", payload))


_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>%TITLE%</title>
<style>
body{font:13px/1.4 system-ui,sans-serif;margin:16px;color:#222}
h1{font-size:16px;margin:0 0 2px} .sub{color:#666;margin-bottom:8px}
.plots{display:flex;flex-wrap:wrap;gap:8px} canvas{border:1px solid #ddd;background:#fff}
#legend label{margin-right:14px;cursor:pointer} #legend span{display:inline-block;width:10px;
height:10px;border-radius:5px;margin-right:4px}
#tip{position:fixed;pointer-events:none;background:#fffff0;border:1px solid #999;padding:4px 6px;
white-space:pre;font:12px monospace;display:none;max-width:640px;overflow:hidden;z-index:9}
table{border-collapse:collapse;margin-top:12px} td,th{border:1px solid #ddd;padding:2px 6px;
text-align:right} td:last-child,th:last-child{text-align:left}
</style></head><body>
<h1>%TITLE%</h1><div class="sub">%SUBTITLE% · drag the 3-D view to turn it;
hover a point for its recipe</div>
<div id="legend"></div>
<div class="plots"><canvas id="c3" width="560" height="440"></canvas>
<div><canvas id="p0" width="380" height="215"></canvas><br>
<canvas id="p1" width="380" height="215"></canvas></div>
<canvas id="p2" width="380" height="440"></canvas></div>
%SUMMARY%
<table><thead><tr>%HEADER%</tr></thead><tbody>%ROWS%</tbody></table>
<div id="tip"></div>
<script>
const D = %DATA%;
const hidden = new Set(); let az = -0.7, el = 0.45, drag = null; let hits = [];
const tip = document.getElementById("tip");
function visible() { const out = [];
  D.series.forEach((s, i) => { if (!hidden.has(i)) s.points.forEach(p => out.push([p, s])); });
  return out; }
function range(key, pts) { let lo = Infinity, hi = -Infinity;
  pts.forEach(([p]) => { lo = Math.min(lo, p[key]); hi = Math.max(hi, p[key]); });
  const b = D.baseline[key]; if (b != null) { lo = Math.min(lo, b); hi = Math.max(hi, b); }
  if (!isFinite(lo)) { lo = 0; hi = 1; } if (hi - lo < 1e-9) { lo -= 0.5; hi += 0.5; }
  const pad = (hi - lo) * 0.05; return [lo >= 0 ? Math.max(0, lo - pad) : lo - pad, hi + pad]; }
function ticks(lo, hi, n) { const step0 = (hi - lo) / n, mag = Math.pow(10, Math.floor(Math.log10(step0)));
  const step = [1, 2, 5, 10].map(m => m * mag).find(s => s >= step0);
  const out = []; for (let v = Math.ceil(lo / step) * step; v <= hi + 1e-12; v += step) out.push(v);
  return out; }
function fmt(v) { return Math.abs(v) >= 100 ? v.toFixed(0) : Number(v.toPrecision(3)).toString(); }
function dot(g, x, y, color, front) { g.beginPath(); g.arc(x, y, front ? 4 : 2.5, 0, 7);
  g.fillStyle = color; g.fill(); if (front) { g.strokeStyle = "#222"; g.lineWidth = 0.6; g.stroke(); } }
function star(g, x, y) { g.fillStyle = "#1f77b4"; g.font = "16px sans-serif"; g.fillText("\\u2605", x - 6, y + 6); }
function draw2d(id, kx, ky, pts) {
  const c = document.getElementById(id), g = c.getContext("2d"); g.clearRect(0, 0, c.width, c.height);
  const L = 58, R = 10, T = 10, B = 36, W = c.width - L - R, H = c.height - T - B;
  const [x0, x1] = range(kx, pts), [y0, y1] = range(ky, pts);
  const X = v => L + (v - x0) / (x1 - x0) * W, Y = v => T + H - (v - y0) / (y1 - y0) * H;
  g.strokeStyle = "#eee"; g.fillStyle = "#555"; g.font = "10px sans-serif";
  ticks(x0, x1, 5).forEach(v => { g.beginPath(); g.moveTo(X(v), T); g.lineTo(X(v), T + H); g.stroke();
    g.fillText(fmt(v), X(v) - 10, T + H + 12); });
  g.textAlign = "right";
  ticks(y0, y1, 5).forEach(v => { g.beginPath(); g.moveTo(L, Y(v)); g.lineTo(L + W, Y(v)); g.stroke();
    g.fillText(fmt(v), L - 4, Y(v) + 3); });
  g.textAlign = "left";
  g.strokeStyle = "#999"; g.strokeRect(L, T, W, H);
  g.fillStyle = "#333"; g.textAlign = "center"; g.fillText(D.axes[kx], L + W / 2, c.height - 6);
  g.textAlign = "left";
  g.save(); g.translate(12, T + H / 2); g.rotate(-Math.PI / 2); g.textAlign = "center";
  g.fillText(D.axes[ky].split(" (")[0], 0, 0); g.restore();
  const b = D.baseline; if (b[kx] != null && b[ky] != null) star(g, X(b[kx]), Y(b[ky]));
  pts.forEach(([p, s]) => { const x = X(p[kx]), y = Y(p[ky]); dot(g, x, y, s.color, p.front);
    hits.push({c: id, x, y, p}); });
}
function draw3d(pts) {
  const c = document.getElementById("c3"), g = c.getContext("2d"); g.clearRect(0, 0, c.width, c.height);
  const r = {size: range("size", pts), lat: range("lat", pts), acc: range("acc", pts)};
  const n = (k, v) => (v - r[k][0]) / (r[k][1] - r[k][0]) * 2 - 1;
  const s = 128, cx = c.width / 2, cy = c.height / 2;
  const P = (u, v, w) => { const x1 = u * Math.cos(az) - v * Math.sin(az), d = u * Math.sin(az) + v * Math.cos(az);
    return [cx + s * x1, cy - s * (w * Math.cos(el) - d * Math.sin(el)), d * Math.cos(el) + w * Math.sin(el)]; };
  g.strokeStyle = "#ccc"; g.lineWidth = 1;
  const C = [-1, 1];
  C.forEach(a => C.forEach(b => { [[[-1, a, b], [1, a, b]], [[a, -1, b], [a, 1, b]], [[a, b, -1], [a, b, 1]]]
    .forEach(([p, q]) => { const A = P(...p), B2 = P(...q); g.beginPath(); g.moveTo(A[0], A[1]); g.lineTo(B2[0], B2[1]); g.stroke(); }); }));
  g.fillStyle = "#333"; g.font = "11px sans-serif";
  const lab = (txt, u, v, w) => { const q = P(u, v, w); g.fillText(txt, q[0] - 30, q[1]); };
  const span = k => `${fmt(r[k][0])}\u2013${fmt(r[k][1])}`;
  lab(`size ratio ${span("size")}`, 0, -1.3, -1.1); lab(`latency ${span("lat")}`, 1.3, 0, -1.1);
  lab(`val acc ${span("acc")}`, -1.15, -1.15, 1.15);
  const items = pts.map(([p, sr]) => [P(n("size", p.size), n("lat", p.lat), n("acc", p.acc)), p, sr]);
  items.sort((a, b) => a[0][2] - b[0][2]);
  items.forEach(([q, p, sr]) => { dot(g, q[0], q[1], sr.color, p.front); hits.push({c: "c3", x: q[0], y: q[1], p}); });
  const b = D.baseline; if (b.acc != null) { const q = P(n("size", b.size), n("lat", b.lat), n("acc", b.acc)); star(g, q[0], q[1]); }
}
function draw() { hits = []; const pts = visible();
  draw3d(pts); draw2d("p0", "size", "acc", pts); draw2d("p1", "lat", "acc", pts); draw2d("p2", "size", "lat", pts); }
function legend() { const el2 = document.getElementById("legend");
  D.series.forEach((s, i) => { const l = document.createElement("label");
    l.innerHTML = `<input type="checkbox" checked><span style="background:${s.color}"></span>${s.name} (${s.points.length})`;
    l.querySelector("input").onchange = e => { e.target.checked ? hidden.delete(i) : hidden.add(i); draw(); };
    el2.appendChild(l); }); }
document.querySelectorAll("canvas").forEach(c => {
  c.addEventListener("mousemove", e => { const b = c.getBoundingClientRect(), x = e.clientX - b.left, y = e.clientY - b.top;
    if (drag && c.id === "c3") { az += (e.clientX - drag[0]) * 0.01; el = Math.max(-1.5, Math.min(1.5, el + (e.clientY - drag[1]) * 0.01));
      drag = [e.clientX, e.clientY]; draw(); return; }
    let best = null, bd = 64; hits.forEach(h => { if (h.c !== c.id) return; const d = (h.x - x) ** 2 + (h.y - y) ** 2; if (d < bd) { bd = d; best = h; } });
    if (best) { tip.textContent = best.p.label; tip.style.display = "block";
      tip.style.left = (e.clientX + 14) + "px"; tip.style.top = (e.clientY + 10) + "px"; } else tip.style.display = "none"; });
  c.addEventListener("mouseleave", () => { tip.style.display = "none"; drag = null; });
});
const c3 = document.getElementById("c3");
c3.addEventListener("mousedown", e => { drag = [e.clientX, e.clientY]; });
window.addEventListener("mouseup", () => { drag = null; });
legend(); draw();
</script></body></html>
"""


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
