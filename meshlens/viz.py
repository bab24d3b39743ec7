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

ONSET_COLOR = "#222222"  # not red: the "failed" series and the failing path are red
CHANGE_COLOR = "#ff7f0e"
HIGHLIGHT_COLOR = "#d62728"
BASE_COLOR = "#4c78a8"
MUTED_COLOR = "#bbbbbb"

EVENT_TYPE_COLORS = {"request": "#4c78a8", "authz": "#e45756", "authn": "#b279a2", "tls": "#f58518",
                     "config_change": "#54a24b", "access": "#9d755d"}
"""One colour per event type, the same in every chart (the explorer's, the audit's, the overview's)."""
SERIES_COLORS = {"requests": "#4c78a8", "failed": "#e45756", "slow": "#f58518"}
"""The symptom's series in the root-cause and change charts."""
OTHER_COLORS = ("#72b7b2", "#eeca3b", "#ff9da6", "#bab0ac", "#17becf", "#8c564b", "#bcbd22", "#7f7f7f")
MARKER_ONSET, MARKER_CHANGE = "onset", "config change"
PATH_CALL, OTHER_CALL, PATH_NODE, OTHER_NODE = "on the failing path", "other calls", "on the failing path", "service"

_UTC = alt.Scale(type="utc")
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
# One time-axis format everywhere: HH:MM in UTC, with the date under the first tick and under each tick
# where the day changes (midnight).
_TIME_LABEL = ("[utcFormat(datum.value, '%H:%M'), (datum.index == 0 || (utchours(datum.value) == 0 && "
               "utcminutes(datum.value) == 0)) ? utcFormat(datum.value, '%Y-%m-%d') : '']")

RATIO_METRICS = ("errors_5xx", "errors_4xx", "denials", "tls_failures", "authn_failures")
METRIC_TITLES = {"errors_5xx": "5xx ratio", "errors_4xx": "4xx ratio", "denials": "authorization denials",
                 "tls_failures": "TLS failures", "authn_failures": "authentication failures",
                 "requests": "requests", "p50_ms": "p50 latency (ms)", "p99_ms": "p99 latency (ms)"}


def is_ratio_metric(metric: str) -> bool:
    """Anomaly metrics drawn as ratios (share of requests), i.e. with a percent axis."""
    return metric in RATIO_METRICS or str(metric).startswith("flag_")


def metric_title(metric: str) -> str:
    """A readable axis title for an anomaly metric (``p99 latency (ms)``, ``response flag UH``)."""
    return METRIC_TITLES.get(metric, str(metric).replace("flag_", "response flag "))


def time_axis(title: str = "time (UTC)") -> alt.Axis:
    """The one time axis of every chart (see ``_TIME_LABEL``)."""
    return alt.Axis(title=title, labelExpr=_TIME_LABEL, labelAlign="center", labelOverlap=True)


def time_tooltip(field: str, title: str = "time (UTC)") -> alt.Tooltip:
    """A tooltip showing the full time of day in UTC (not just the date)."""
    # A utc time unit makes Vega-Lite format with utcFormat (formatType="utc" would call Vega's utc()
    # date constructor instead and show NaN).
    return alt.Tooltip(f"{field}:T", title=title, format=TIME_FORMAT, timeUnit="utcyearmonthdatehoursminutesseconds")


def _tooltip(df: pd.DataFrame, cols: Iterable[str], *, times: Iterable[str] = ()) -> list[Any]:
    times = set(times)
    out: list[Any] = []
    for c in cols:
        if c not in df.columns:
            continue
        if c in times or pd.api.types.is_datetime64_any_dtype(df[c]):
            out.append(time_tooltip(c, "time (UTC)" if c in ("ts", "onset") else f"{c} (UTC)"))
        else:
            out.append(c)
    return out


def _as_frame(values: Any, column: str) -> pd.DataFrame:
    """Onset/change markers may be given as one time, a list of times, or a DataFrame."""
    if values is None:
        return pd.DataFrame({column: pd.Series([], dtype="datetime64[ns, UTC]")})
    if isinstance(values, pd.DataFrame):
        return values
    if isinstance(values, str | pd.Timestamp) or not isinstance(values, Iterable):
        values = [values]
    return pd.DataFrame({column: pd.to_datetime(list(values), utc=True)})


def bucket_text(df: pd.DataFrame, x: str = "ts") -> str | None:
    """The bucket width of a time series (``5 min``, ``1 h``, ``30 s``), from its distinct times."""
    if x not in df.columns or df.empty:
        return None
    ts = pd.Series(pd.to_datetime(df[x], utc=True).dropna().unique()).sort_values()
    diffs = ts.diff().dropna()
    diffs = diffs[diffs > pd.Timedelta(0)]
    if diffs.empty:
        return None
    sec = int(round(diffs.min().total_seconds()))
    if sec <= 0:
        return None
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if sec >= size and sec % size == 0:
            return f"{sec // size} {unit}"
    return f"{sec} s"


def color_scale(column: str, values: Iterable[Any]) -> alt.Scale:
    """Stable colours: fixed ones for event types and the symptom series, the rest in sorted order."""
    fixed = EVENT_TYPE_COLORS if column == "event_type" else SERIES_COLORS if column == "series" else {}
    seen = sorted({str(v) for v in values if v is not None and not (isinstance(v, float) and pd.isna(v))})
    domain = [k for k in fixed if k in seen] + [v for v in seen if v not in fixed]
    others = iter(OTHER_COLORS * (1 + len(domain) // len(OTHER_COLORS)))
    return alt.Scale(domain=domain, range=[fixed.get(v) or next(others) for v in domain])


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
    percent: bool = False,
    width: int = 640,
    height: int = 220,
) -> alt.LayerChart:
    """A metric over time, with the detected onset (black rule) and config changes (orange dashed rules).

    ``df``: one row per (time, series); ``color`` names the series column (event types and the
    symptom's series get fixed colours). ``onset``: a time (or list of times). ``changes``: a DataFrame
    with ``x`` and ``change_label`` columns (e.g. ``Kind/ns/name by actor``), shown as rules with the
    label in the tooltip. The markers have their own legend. ``mark``: ``line``, ``bar`` (stacked by
    ``color``) or ``area``. The y title says the bucket width (``requests per 5 min``); ``percent``
    draws a ratio on a percent axis.
    """
    base = alt.Chart(df)
    marker = {"line": base.mark_line(point=len(df) <= 60), "bar": base.mark_bar(), "area": base.mark_area(opacity=0.7)}
    if mark not in marker:
        raise ValueError(f"mark must be one of {sorted(marker)}, not {mark!r}")
    bucket = bucket_text(df, x)
    label = y_title or y
    if percent:
        label = f"{label} (%" + (f", {bucket} buckets)" if bucket else ")")
    elif bucket:
        label = f"{label} per {bucket}"
    y_axis = alt.Axis(title=label, format=".0%" if percent else alt.Undefined)
    tooltip = [time_tooltip(x), alt.Tooltip(f"{y}:Q", title=label, format=".1%" if percent else ",")]
    if color:
        tooltip.append(color)
    enc: dict[str, Any] = {
        "x": alt.X(f"{x}:T", axis=time_axis(), scale=_UTC),
        "y": alt.Y(f"{y}:Q", axis=y_axis, stack="zero" if mark in ("bar", "area") else None),
        "tooltip": tooltip,
    }
    if color:
        values = df[color].unique() if color in df.columns else []
        enc["color"] = alt.Color(f"{color}:N", title=color.replace("_", " "), scale=color_scale(color, values))
    layers: list[alt.Chart] = [marker[mark].encode(**enc)]

    onset_df = _as_frame(onset, x)
    has_changes = changes is not None and not changes.empty
    present = [m for m, on in ((MARKER_ONSET, not onset_df.empty), (MARKER_CHANGE, has_changes)) if on]
    marker_color = alt.Color("marker:N", title="markers", scale=alt.Scale(
        domain=present, range=[ONSET_COLOR if m == MARKER_ONSET else CHANGE_COLOR for m in present]))
    rules: list[alt.Chart] = []
    if not onset_df.empty:
        rules.append(
            alt.Chart(onset_df.assign(marker=MARKER_ONSET)).mark_rule(color=ONSET_COLOR, strokeWidth=2)
            .encode(x=alt.X(f"{x}:T", scale=_UTC, axis=time_axis()), color=marker_color,
                    tooltip=[time_tooltip(x, "onset (UTC)")])
        )
    if has_changes:
        assert changes is not None
        rules.append(
            alt.Chart(changes.assign(marker=MARKER_CHANGE)).mark_rule(color=CHANGE_COLOR, strokeDash=[4, 3],
                                                                      strokeWidth=1.5)
            .encode(x=alt.X(f"{x}:T", scale=_UTC, axis=time_axis()), color=marker_color,
                    tooltip=_tooltip(changes, [x, change_label, "actor"], times=[x]))
        )
    if color and rules:  # the series and the markers each get their own legend
        chart = alt.layer(layers[0], alt.layer(*rules)).resolve_scale(color="independent")
    else:
        chart = alt.layer(*layers, *rules)
    return chart.properties(title=title, width=width, height=height)


def error_heatmap(
    df: pd.DataFrame,
    *,
    src: str = "src",
    dst: str = "dst",
    value: str = "error_ratio",
    count: str | None = "requests",
    title: str = "",
    value_title: str | None = None,
    percent: bool = False,
) -> alt.Chart:
    """Errors (or any ratio/count) by edge: callers down, callees across, colour = ``value``
    (``percent``: a ratio, shown as a percent in the legend and tooltips)."""
    label = (value_title or value) + (" (%)" if percent else "")
    tooltip = [src, dst, alt.Tooltip(f"{value}:Q", title=label, format=".1%" if percent else ",")]
    tooltip += [count] if count and count in df.columns else []
    return (
        alt.Chart(df)
        .mark_rect()
        .encode(
            x=alt.X(f"{dst}:N", title="called service", sort="ascending"),
            y=alt.Y(f"{src}:N", title="caller", sort="ascending"),
            color=alt.Color(f"{value}:Q", title=label, scale=alt.Scale(scheme="reds"),
                            legend=alt.Legend(format=".0%" if percent else alt.Undefined)),
            tooltip=tooltip,
        )
        .properties(title=title)
    )


def unique_labels(df: pd.DataFrame, label: str, *, time: str = "ts") -> pd.Series:
    """``label`` made unique per row: a target changed twice becomes two bars (``... @ 09:19:43``),
    never one bar stacking two scores."""
    labels = df[label].astype(str)
    dup = labels.duplicated(keep=False)
    if not dup.any():
        return labels
    if time in df.columns:
        when = pd.to_datetime(df[time], utc=True).dt.strftime("%m-%d %H:%M:%S")
        labels = labels.where(~dup, labels + " @ " + when)
    dup = labels.duplicated(keep=False)
    if dup.any():  # still equal (same second): number them
        labels = labels.where(~dup, labels + " #" + (labels.groupby(labels).cumcount() + 1).astype(str))
    return labels


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
    percent: bool = False,
    max_value: float | None = None,
) -> alt.Chart:
    """Horizontal bars, largest first (top talkers, denials by policy, ranked candidates).

    One bar per row: repeated labels are made unique (:func:`unique_labels`), so two changes to one
    target never stack into a score above 1. ``tooltip`` adds columns such as ``evidence``.
    ``percent``: the value is a share (percent axis); ``max_value`` fixes the axis end (a score's 1).
    """
    data = df.nlargest(max_bars, value) if len(df) > max_bars else df
    data = data.assign(**{label: unique_labels(data, label)})
    axis_title = (value_title or value) + (" (%)" if percent else "")
    scale = alt.Scale(domain=[0, max_value]) if max_value is not None else alt.Undefined
    enc: dict[str, Any] = {
        "y": alt.Y(f"{label}:N", sort="-x", title=label, axis=alt.Axis(labelLimit=360)),
        "x": alt.X(f"{value}:Q", title=axis_title, axis=alt.Axis(format=".0%" if percent else alt.Undefined), scale=scale,
                   stack=None),
        "tooltip": [label, alt.Tooltip(f"{value}:Q", title=axis_title, format=".1%" if percent else ",")]
        + _tooltip(data, [*([color] if color else []), *tooltip]),
    }
    if color:
        enc["color"] = alt.Color(f"{color}:N", title=color, scale=color_scale(color, data[color].unique()))
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
    e["call"] = e["highlighted"].map({True: PATH_CALL, False: OTHER_CALL})
    edge_domain = [d for d in (PATH_CALL, OTHER_CALL) if d in set(e["call"])]
    edge_tip = ["edge"] + [c for c in (weight, error) if c and c in e.columns]
    edge_enc: dict[str, Any] = {
        "x": alt.X("x:Q", axis=None, scale=alt.Scale(padding=40)),
        "y": alt.Y("y:Q", axis=None, scale=alt.Scale(padding=20)),
        "x2": "x2:Q",
        "y2": "y2:Q",
        "color": alt.Color("call:N", title="calls", scale=alt.Scale(
            domain=edge_domain, range=[HIGHLIGHT_COLOR if d == PATH_CALL else MUTED_COLOR for d in edge_domain])),
        "tooltip": edge_tip,
    }
    if weight and weight in e.columns:
        edge_enc["strokeWidth"] = alt.StrokeWidth(f"{weight}:Q", scale=alt.Scale(range=[1, 6]), legend=None)
    edge_layer = alt.Chart(e.drop(columns=["_s", "_d"])).mark_rule(opacity=0.8).encode(**edge_enc)

    nodes = pos.reset_index()
    nodes["highlighted"] = nodes["node"].isin(hl_nodes)
    nodes["role"] = nodes["highlighted"].map({True: PATH_NODE, False: OTHER_NODE})
    node_domain = [d for d in (PATH_NODE, OTHER_NODE) if d in set(nodes["role"])]
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
            color=alt.Color("role:N", title="services", scale=alt.Scale(
                domain=node_domain, range=[HIGHLIGHT_COLOR if d == PATH_NODE else BASE_COLOR for d in node_domain])),
            tooltip=node_tip,
        )
    )
    label_layer = alt.Chart(nodes).mark_text(dy=-18, fontSize=11).encode(x="x:Q", y="y:Q", text="node:N")
    return (alt.layer(edge_layer, node_layer, label_layer).resolve_scale(color="independent")
            .properties(title=title, width=width, height=height))
