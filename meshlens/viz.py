"""Altair chart builders for notebooks and reports: DataFrames in, ``alt.Chart`` (or layered chart) out.

Why a module of builders: every notebook draws the same few pictures (a metric over time with the
incident onset and config changes marked, errors by edge, the service graph with the failing path, top-N
bars) and they must look the same in every report. Builders take plain DataFrames produced by
:mod:`meshlens.analysis` -- viz never touches DuckDB -- so they are easy to test and reuse.

Rendering is not decided here: :func:`meshlens.notebook.configure_altair` makes charts render offline
(static SVG, upgraded in the HTML report by an inlined vega-embed). Times are drawn on UTC scales so a
chart reads the same in every browser time zone.

Adding a chart: write a function ``name(df, *, column names..., title="") -> alt.Chart | alt.LayerChart``
that aggregates nothing heavy (do that in SQL in the analysis layer) and keeps tooltips on the marks.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import altair as alt
import pandas as pd

ChartLike = alt.Chart | alt.LayerChart | alt.VConcatChart | alt.HConcatChart

ONSET_COLOR = "#d62728"
CHANGE_COLOR = "#ff7f0e"
HIGHLIGHT_COLOR = "#d62728"
BASE_COLOR = "#4c78a8"
MUTED_COLOR = "#bbbbbb"

_UTC = alt.Scale(type="utc")


def _tooltip(df: pd.DataFrame, cols: Iterable[str]) -> list[str]:
    return [c for c in cols if c in df.columns]


def _as_frame(values: Any, column: str) -> pd.DataFrame:
    """Onset/change markers may be given as one time, a list of times, or a DataFrame."""
    if values is None:
        return pd.DataFrame({column: pd.Series([], dtype="datetime64[ns, UTC]")})
    if isinstance(values, pd.DataFrame):
        return values
    if isinstance(values, str | pd.Timestamp) or not isinstance(values, Iterable):
        values = [values]
    return pd.DataFrame({column: pd.to_datetime(list(values), utc=True)})


def time_series(
    df: pd.DataFrame,
    *,
    x: str = "ts",
    y: str = "value",
    color: str | None = None,
    title: str = "",
    y_title: str | None = None,
    onset: Any = None,
    changes: pd.DataFrame | None = None,
    change_label: str = "label",
    mark: str = "line",
    width: int = 640,
    height: int = 220,
) -> alt.LayerChart:
    """A metric over time, with the detected onset (red rule) and config changes (orange dashed rules).

    ``df``: one row per (time, series); ``color`` names the series column. ``onset``: a time (or list of
    times). ``changes``: a DataFrame with ``x`` and ``change_label`` columns (e.g. ``Kind/ns/name by
    actor``), shown as rules with the label in the tooltip. ``mark``: ``line``, ``bar`` (stacked by
    ``color``) or ``area``.
    """
    tooltip = _tooltip(df, [x, y] + ([color] if color else []))
    base = alt.Chart(df)
    marker = {"line": base.mark_line(point=len(df) <= 60), "bar": base.mark_bar(), "area": base.mark_area(opacity=0.7)}
    if mark not in marker:
        raise ValueError(f"mark must be one of {sorted(marker)}, not {mark!r}")
    enc: dict[str, Any] = {
        "x": alt.X(f"{x}:T", title="time (UTC)", scale=_UTC),
        "y": alt.Y(f"{y}:Q", title=y_title or y, stack="zero" if mark in ("bar", "area") else None),
        "tooltip": tooltip,
    }
    if color:
        enc["color"] = alt.Color(f"{color}:N", title=color)
    layers: list[alt.Chart] = [marker[mark].encode(**enc)]

    onset_df = _as_frame(onset, x)
    if not onset_df.empty:
        onset_df = onset_df.assign(marker="onset")
        layers.append(
            alt.Chart(onset_df).mark_rule(color=ONSET_COLOR, strokeWidth=2)
            .encode(x=alt.X(f"{x}:T", scale=_UTC), tooltip=[alt.Tooltip(f"{x}:T", title="onset")])
        )
    if changes is not None and not changes.empty:
        layers.append(
            alt.Chart(changes).mark_rule(color=CHANGE_COLOR, strokeDash=[4, 3], strokeWidth=1.5)
            .encode(x=alt.X(f"{x}:T", scale=_UTC), tooltip=_tooltip(changes, [x, change_label, "actor"]))
        )
    return alt.layer(*layers).properties(title=title, width=width, height=height)


def error_heatmap(
    df: pd.DataFrame,
    *,
    src: str = "src",
    dst: str = "dst",
    value: str = "error_ratio",
    count: str | None = "requests",
    title: str = "",
    value_title: str | None = None,
) -> alt.Chart:
    """Errors (or any ratio/count) by edge: callers down, callees across, colour = ``value``."""
    tooltip = _tooltip(df, [src, dst, value] + ([count] if count else []))
    return (
        alt.Chart(df)
        .mark_rect()
        .encode(
            x=alt.X(f"{dst}:N", title="called service", sort="ascending"),
            y=alt.Y(f"{src}:N", title="caller", sort="ascending"),
            color=alt.Color(f"{value}:Q", title=value_title or value, scale=alt.Scale(scheme="reds")),
            tooltip=tooltip,
        )
        .properties(title=title)
    )


def bar_chart(
    df: pd.DataFrame,
    *,
    label: str,
    value: str,
    color: str | None = None,
    title: str = "",
    value_title: str | None = None,
    tooltip: Sequence[str] = (),
    max_bars: int = 25,
) -> alt.Chart:
    """Horizontal bars, largest first (top talkers, denials by policy, ranked candidates).

    ``tooltip`` adds columns such as ``evidence`` so a ranked candidate shows why it ranks.
    """
    data = df.nlargest(max_bars, value) if len(df) > max_bars else df
    enc: dict[str, Any] = {
        "y": alt.Y(f"{label}:N", sort="-x", title=label),
        "x": alt.X(f"{value}:Q", title=value_title or value),
        "tooltip": _tooltip(data, [label, value, *([color] if color else []), *tooltip]),
    }
    if color:
        enc["color"] = alt.Color(f"{color}:N", title=color)
    return alt.Chart(data).mark_bar(color=BASE_COLOR).encode(**enc).properties(title=title)


# ------------------------------------------------------------------------------------------------
# Service graph
# ------------------------------------------------------------------------------------------------


def _acyclic_successors(nodes: list[str], succ: dict[str, list[str]]) -> dict[str, list[str]]:
    """Drop back edges (found by DFS in name order) so the graph can be layered; cycles are real in meshes."""
    state: dict[str, int] = {}  # 1 = on stack, 2 = done
    keep: dict[str, list[str]] = defaultdict(list)
    for root in nodes:
        if root in state:
            continue
        stack: list[tuple[str, Iterable[str]]] = [(root, iter(succ.get(root, ())))]
        state[root] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                state[node] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                continue  # back edge: ignore for layering
            else:
                keep[node].append(nxt)
                if nxt not in state:
                    state[nxt] = 1
                    stack.append((nxt, iter(succ.get(nxt, ()))))
    return keep


def layered_layout(edges: pd.DataFrame, *, src: str = "src", dst: str = "dst", sweeps: int = 4) -> pd.DataFrame:
    """Positions for a left-to-right layered drawing of a call graph (a small Sugiyama-style layout).

    Layers are longest-path depths from the entry points (cycles broken by ignoring DFS back edges);
    within a layer, nodes are ordered by the barycentre of their neighbours over a few down/up sweeps,
    which removes most crossings in the shallow graphs meshes have. Returns one row per node:
    ``node, layer, order, x, y``.
    """
    pairs = [(str(a), str(b)) for a, b in zip(edges[src], edges[dst], strict=True) if a != b]
    nodes = sorted({str(n) for n in pd.concat([edges[src], edges[dst]]).dropna()})
    succ: dict[str, list[str]] = defaultdict(list)
    for a, b in sorted(set(pairs)):
        succ[a].append(b)
    dag = _acyclic_successors(nodes, succ)
    indeg = {n: 0 for n in nodes}
    for a in dag:
        for b in dag[a]:
            indeg[b] += 1
    layer = {n: 0 for n in nodes}
    ready = [n for n in nodes if indeg[n] == 0]
    while ready:
        n = ready.pop()
        for b in dag.get(n, ()):
            layer[b] = max(layer[b], layer[n] + 1)
            indeg[b] -= 1
            if indeg[b] == 0:
                ready.append(b)
    by_layer: dict[int, list[str]] = defaultdict(list)
    for n in nodes:
        by_layer[layer[n]].append(n)
    neighbours: dict[str, set[str]] = defaultdict(set)
    for a, b in pairs:
        neighbours[a].add(b)
        neighbours[b].add(a)
    order = {n: i for lst in by_layer.values() for i, n in enumerate(lst)}
    layers = sorted(by_layer)
    for sweep in range(sweeps):
        seq = layers[1:] if sweep % 2 == 0 else list(reversed(layers[:-1]))
        for lyr in seq:
            ref = lyr - 1 if sweep % 2 == 0 else lyr + 1

            def bary(n: str, ref: int = ref) -> float:
                ns = [order[m] for m in neighbours[n] if layer[m] == ref]
                return sum(ns) / len(ns) if ns else order[n]

            by_layer[lyr].sort(key=lambda n: (bary(n), n))
            for i, n in enumerate(by_layer[lyr]):
                order[n] = i
    rows = []
    for lyr, lst in by_layer.items():
        for i, n in enumerate(lst):
            rows.append({"node": n, "layer": lyr, "order": i, "x": float(lyr), "y": i - (len(lst) - 1) / 2})
    return pd.DataFrame(rows, columns=["node", "layer", "order", "x", "y"])


def _path_edges(path: Sequence[str] | None) -> set[tuple[str, str]]:
    return set(zip(path[:-1], path[1:], strict=True)) if path and len(path) > 1 else set()


def service_graph(
    edges: pd.DataFrame,
    *,
    src: str = "src",
    dst: str = "dst",
    weight: str | None = "requests",
    error: str | None = "error_ratio",
    highlight: Sequence[str] | None = None,
    title: str = "",
    width: int = 640,
    height: int | None = None,
) -> alt.LayerChart:
    """The call graph, callers on the left, with ``highlight`` (a node path, e.g. the failing path) in red.

    ``edges``: one row per edge with ``src``, ``dst`` and optionally ``weight`` (line width) and
    ``error`` (shown in the tooltips; nodes carry the worst error ratio of their inbound edges).
    ``height`` defaults to what the most crowded layer needs. Positions come from :func:`layered_layout`, computed here in Python so the picture is
    deterministic and needs no graph library in the browser.
    """
    pos = layered_layout(edges, src=src, dst=dst).set_index("node")
    if height is None:  # room for the labels of the most crowded layer
        crowd = int(pos.groupby("layer").size().max()) if len(pos) else 0
        height = max(200, 36 * crowd)
    hl_nodes = set(highlight or ())
    hl_edges = _path_edges(highlight)
    e = edges.copy()
    e["_s"], e["_d"] = e[src].astype(str), e[dst].astype(str)
    e = e[e["_s"] != e["_d"]]
    e["x"], e["y"] = e["_s"].map(pos["x"]), e["_s"].map(pos["y"])
    e["x2"], e["y2"] = e["_d"].map(pos["x"]), e["_d"].map(pos["y"])
    e["highlighted"] = [(a, b) in hl_edges for a, b in zip(e["_s"], e["_d"], strict=True)]
    e["edge"] = e["_s"] + " -> " + e["_d"]
    edge_tip = ["edge"] + [c for c in (weight, error) if c and c in e.columns]
    edge_enc: dict[str, Any] = {
        "x": alt.X("x:Q", axis=None, scale=alt.Scale(padding=40)),
        "y": alt.Y("y:Q", axis=None, scale=alt.Scale(padding=20)),
        "x2": "x2:Q",
        "y2": "y2:Q",
        "color": alt.condition("datum.highlighted", alt.value(HIGHLIGHT_COLOR), alt.value(MUTED_COLOR)),
        "tooltip": edge_tip,
    }
    if weight and weight in e.columns:
        edge_enc["strokeWidth"] = alt.StrokeWidth(f"{weight}:Q", scale=alt.Scale(range=[1, 6]), legend=None)
    edge_layer = alt.Chart(e.drop(columns=["_s", "_d"])).mark_rule(opacity=0.8).encode(**edge_enc)

    nodes = pos.reset_index()
    nodes["highlighted"] = nodes["node"].isin(hl_nodes)
    if error and error in e.columns:
        worst = e.groupby("_d")[error].max()
        nodes["worst_inbound_error"] = nodes["node"].map(worst).fillna(0.0)
    node_tip = _tooltip(nodes, ["node", "worst_inbound_error"])
    node_layer = (
        alt.Chart(nodes)
        .mark_circle(size=400, opacity=1, stroke="white", strokeWidth=1.5)
        .encode(
            x="x:Q",
            y="y:Q",
            color=alt.condition("datum.highlighted", alt.value(HIGHLIGHT_COLOR), alt.value(BASE_COLOR)),
            tooltip=node_tip,
        )
    )
    label_layer = alt.Chart(nodes).mark_text(dy=-18, fontSize=11).encode(x="x:Q", y="y:Q", text="node:N")
    return alt.layer(edge_layer, node_layer, label_layer).properties(title=title, width=width, height=height)
