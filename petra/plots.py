"""Front plots: an interactive HTML (plotly, self-contained) and a PNG (matplotlib).

Both render a :class:`petra.pareto.FrontSnapshot` plus every evaluated record; nothing here
computes fronts.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

_AXES = (("size_ratio", "size ratio (artifact bytes / dense)"),
         ("latency_ratio", "latency ratio (vs dense, same runtime)"))


def _points(records: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [r for r in records if r.get("status") == "complete"
            and all(k in r["metrics"] for k in ("val_accuracy", "size_ratio", "latency_ratio"))]


def front_png(snap: Any, records: Sequence[Mapping[str, Any]], baseline: Mapping[str, float],
              path: str | Path) -> None:
    """Accuracy against size ratio and against latency ratio; the front highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = _points(records)
    front = set(snap.ids)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, (metric, label) in zip(axes, _AXES, strict=True):
        rest = [p for p in points if p["id"] not in front]
        top = sorted((p for p in points if p["id"] in front), key=lambda p: p["metrics"][metric])
        ax.scatter([p["metrics"][metric] for p in rest],
                   [p["metrics"]["val_accuracy"] for p in rest],
                   s=18, c="0.7", label="evaluated")
        ax.scatter([p["metrics"][metric] for p in top],
                   [p["metrics"]["val_accuracy"] for p in top],
                   s=36, c="tab:red", label="Pareto front (3 objectives)")
        ax.axhline(baseline.get("val_accuracy", float("nan")), ls="--", c="tab:blue", lw=1,
                   label="dense baseline")
        ax.scatter([1.0], [baseline.get("val_accuracy", float("nan"))], marker="*", s=120,
                   c="tab:blue")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation accuracy")
    axes[0].legend(loc="lower right", fontsize=8)
    fig.suptitle(f"petra front — generation {snap.generation}, "
                 f"hypervolume {snap.hypervolume:.4f}, {len(snap.members)} on front")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def front_html(snap: Any, records: Sequence[Mapping[str, Any]],
               baseline: Mapping[str, float]) -> str:
    """A self-contained page: the 3-D front and its 2-D projections, hover showing genomes."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    points = _points(records)
    front = set(snap.ids)
    fig = make_subplots(
        rows=1, cols=3, specs=[[{"type": "scene"}, {"type": "xy"}, {"type": "xy"}]],
        subplot_titles=("accuracy × size × latency", *(label for _, label in _AXES)),
    )
    for on_front, color, name in ((False, "lightgray", "evaluated"), (True, "crimson", "front")):
        group = [p for p in points if (p["id"] in front) == on_front]
        hover = [_hover(p) for p in group]
        acc = [p["metrics"]["val_accuracy"] for p in group]
        size = [p["metrics"]["size_ratio"] for p in group]
        lat = [p["metrics"]["latency_ratio"] for p in group]
        marker = {"color": color, "size": 5 if on_front else 3}
        fig.add_trace(go.Scatter3d(x=size, y=lat, z=acc, mode="markers", marker=marker,
                                   name=name, text=hover, hoverinfo="text"), row=1, col=1)
        for col, xs in ((2, size), (3, lat)):
            fig.add_trace(go.Scatter(x=xs, y=acc, mode="markers", marker=marker, name=name,
                                     text=hover, hoverinfo="text", showlegend=False),
                          row=1, col=col)
    fig.update_layout(
        title=f"petra front, generation {snap.generation}: hypervolume {snap.hypervolume:.4f}; "
              f"dense baseline val accuracy {baseline.get('val_accuracy', float('nan')):.4f}",
        scene={"xaxis_title": "size ratio", "yaxis_title": "latency ratio",
               "zaxis_title": "val accuracy"},
        height=520, width=1500,
    )
    return fig.to_html(include_plotlyjs=True, full_html=True)


def _hover(point: Mapping[str, Any]) -> str:
    m = point["metrics"]
    genes = {k: v for k, v in point.get("genome", {}).items()
             if not (k.endswith(".method") and v == "none")}
    head = (f"{point['id'][:8]} acc={m['val_accuracy']:.4f} size={m['size_ratio']:.3f} "
            f"lat={m['latency_ratio']:.3f}")
    return head + "<br>" + json.dumps(genes)[:600].replace(", ", "<br>")
