"""The ipywidgets explorer behind ``notebooks/explore.ipynb``.

Controls (time range, namespace, service, event types, row limit) drive three linked views that always
show the same slice of the store: events over time by type, the busiest edges with their errors and
denials, and a drill-down table of the raw events; picking a row of the table shows its original log
record. Changing any control refreshes every view.

Why it is built this way: the widget only wires controls to :mod:`meshlens.analysis.audit` functions and
:mod:`meshlens.viz` builders -- it holds no SQL -- so what an SRE sees interactively is exactly what the
tested analysis functions return. The data step (:meth:`Explorer.refresh`) is separate from drawing, so
the explorer can be driven and checked headlessly (tests set control values and read
:attr:`Explorer.events`).
"""

from __future__ import annotations

import html
from typing import Any

import ipywidgets as w
import pandas as pd

from meshlens import viz
from meshlens.analysis import audit
from meshlens.errors import MeshlensError
from meshlens.notebook import parse_time, table_html
from meshlens.store import Store

ALL = ""
DRILL_COLUMNS = ("ts", "event_type", "src_workload", "src_principal", "dst_service", "method", "path", "status",
                 "response_flags", "authz_decision", "authz_policy", "mtls", "actor", "verb", "resource_kind",
                 "resource_name")


class Explorer:
    """Interactive slice-and-drill over one store. Display it (``explorer`` as a cell's last line)."""

    def __init__(self, store: Store, *, start: str = "", end: str = "", namespace: str = "", service: str = "",
                 event_types: tuple[str, ...] = (), limit: int = 200, buckets: int = 60) -> None:
        self.store = store
        self.buckets = buckets
        opts = audit.filter_options(store)
        self.start = w.Text(value=start, description="from", placeholder="e.g. latest-6h, -24h, 2024-05-01T10:00:00Z",
                            continuous_update=False)
        self.end = w.Text(value=end, description="to", placeholder="empty = last event", continuous_update=False)
        self.namespace = w.Dropdown(options=[("(all)", ALL)] + [(n, n) for n in opts["namespaces"]],
                                    value=namespace if namespace in opts["namespaces"] else ALL,
                                    description="namespace")
        self.service = w.Dropdown(options=self._service_options(self.namespace.value), description="service")
        if service in [v for _, v in self.service.options]:
            self.service.value = service
        self.event_types = w.SelectMultiple(options=opts["event_types"],
                                            value=tuple(t for t in event_types if t in opts["event_types"]),
                                            description="types", rows=min(5, max(2, len(opts["event_types"]))))
        self.limit = w.BoundedIntText(value=limit, min=1, max=100_000, description="rows")
        self.row = w.Dropdown(options=[], description="record")
        self.status = w.HTML()
        self.timeline_out, self.edges_out = w.Output(), w.Output()
        self.table_out, self.detail_out = w.Output(), w.Output()
        self.timeline = pd.DataFrame()
        self.edges = pd.DataFrame()
        self.events = pd.DataFrame()
        self.total = 0
        self.error: str | None = None

        self.namespace.observe(self._on_namespace, names="value")
        self._updating = False
        for control in (self.start, self.end, self.service, self.event_types, self.limit):
            control.observe(self._on_change, names="value")
        self.row.observe(lambda _change: self._draw_detail(), names="value")
        self.ui = w.VBox([
            w.HBox([self.start, self.end]),
            w.HBox([self.namespace, self.service, self.limit]),
            self.event_types,
            self.status,
            w.HBox([self.timeline_out, self.edges_out]),
            self.table_out,
            self.row,
            self.detail_out,
        ])
        self.update()

    # -- data ------------------------------------------------------------------------------------
    def _service_options(self, namespace: str) -> list[tuple[str, str]]:
        return [("(all)", ALL)] + [(s, s) for s in audit.filter_options(self.store, namespace or None)["services"]]

    def filters(self) -> dict[str, Any]:
        """The current control values as keyword arguments for the audit functions."""
        return {
            "start": parse_time(self.start.value, store=self.store),
            "end": parse_time(self.end.value, store=self.store),
            "namespace": self.namespace.value or None,
            "service": self.service.value or None,
        }

    def refresh(self) -> None:
        """Recompute every view's data from the controls (no drawing). Bad input sets :attr:`error`."""
        try:
            f = self.filters()
            types = list(self.event_types.value) or None
            self.timeline = audit.event_timeline(self.store, **f, event_types=types, buckets=self.buckets)
            self.edges = audit.top_edges(self.store, **f, limit=15)
            self.total = audit.count_events(self.store, **f, event_types=types)
            self.events = audit.events(self.store, **f, event_types=types, limit=int(self.limit.value))
            self.error = None
        except MeshlensError as exc:
            self.error = str(exc)

    def update(self) -> None:
        """Refresh the data and redraw (what every control change triggers)."""
        self.refresh()
        self._draw()

    def _on_change(self, _change: Any) -> None:
        if not self._updating:
            self.update()

    def _on_namespace(self, _change: Any) -> None:
        current = self.service.value
        options = self._service_options(self.namespace.value)
        self._updating = True  # one refresh for the whole namespace change, not one per service change
        try:
            self.service.options = options
            self.service.value = current if current in [v for _, v in options] else ALL
        finally:
            self._updating = False
        self.update()

    # -- drawing ---------------------------------------------------------------------------------
    def _draw(self) -> None:
        if self.error:
            self.status.value = f'<span style="color:#b00">{html.escape(self.error)}</span>'
            return
        shown = len(self.events)
        self.status.value = f"{self.total:,} matching events; the table shows the newest {shown:,}."
        labels = [(f"{i}: {r.ts} {r.event_type} {r.dst_service or r.resource_name or ''}", i)
                  for i, r in enumerate(self.events.itertuples())]
        self.row.options = labels
        self.row.value = labels[0][1] if labels else None  # the newest record; redraws the detail
        if not _in_kernel():
            return  # headless (tests, scripts): the data is on the object, there is nowhere to draw
        self.timeline_out.clear_output(wait=True)
        with self.timeline_out:
            _show(viz.time_series(self.timeline, y="events", color="event_type", mark="bar",
                                  title="events over time", width=420, height=200))
        self.edges_out.clear_output(wait=True)
        with self.edges_out:
            if self.edges.empty:
                _show(w.HTML("<em>no proxied requests in this slice</em>"))
            else:
                edges = self.edges.assign(edge=self.edges.src + " -> " + self.edges.dst)
                _show(viz.bar_chart(edges, label="edge", value="requests", title="busiest edges",
                                    tooltip=("errors_5xx", "denied", "plaintext", "error_ratio"), max_bars=15))
        self.table_out.clear_output(wait=True)
        with self.table_out:
            cols = [c for c in DRILL_COLUMNS if c in self.events.columns]
            from IPython.display import HTML

            _show(HTML(table_html(self.events[cols], title="raw events (newest first)", max_rows=len(self.events),
                                  empty="no events match")))
        self._draw_detail()

    def _draw_detail(self) -> None:
        i = self.row.value
        if not _in_kernel():
            return
        self.detail_out.clear_output(wait=True)
        if i is None or self.events.empty or i >= len(self.events):
            return
        rec = self.events.iloc[i]
        with self.detail_out:
            _show(w.HTML(f"<b>{html.escape(str(rec.get('source', '')))} {html.escape(str(rec.get('position', '')))}"
                         f"</b><pre style='white-space:pre-wrap'>{html.escape(str(rec.get('raw', '')))}</pre>"))

    def _ipython_display_(self) -> None:
        _show(self.ui)


def _in_kernel() -> bool:
    from IPython import get_ipython

    return get_ipython() is not None


def _show(obj: Any) -> None:
    from IPython.display import display

    display(obj)


def explore(store: Store, **kwargs: Any) -> Explorer:
    """Build an :class:`Explorer` (keyword arguments: start, end, namespace, service, event_types, limit)."""
    return Explorer(store, **kwargs)
