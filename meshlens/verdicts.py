"""Verdict cards: the answer of a report in a few lines, shown before any chart.

Why a module: every analysis report must open with what it found -- the culprit, the failure signature,
the likely change with who made it and when -- and say so in words a scheduled report's e-mail can
carry (the run's ``findings``). The wording is built here from the analysis results, so it is tested
like any other function and the notebooks only call :func:`show`.

A :class:`Verdict` is a title, a few labelled rows (``dt``/``dd`` in the HTML) and the findings lines.
Builders never query the store: they read :mod:`meshlens.analysis` results (data flows one way).
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from meshlens.analysis.common import ts_text

SIGNATURE_NAMES = {"authz": "authorization denials", "tls": "TLS failures", "route": "no route/cluster",
                   "ratelimit": "rate limiting", "unavailable": "unreachable/unhealthy upstream",
                   "timeout": "timeouts", "app": "application errors", "latency": "slowness"}


@dataclass
class Verdict:
    """One answer: ``title`` (the headline), ``rows`` (label, text), ``findings`` (plain lines for the
    run record) and ``found`` (False: "nothing found", drawn in a calmer colour)."""

    title: str
    rows: list[tuple[str, str]] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)
    found: bool = True
    anchor: str | None = None

    def html(self) -> str:
        rows = "".join(f'<dt style="font-weight:bold;white-space:nowrap">{html.escape(k)}</dt>'
                       f'<dd style="margin:0">{html.escape(v)}</dd>' for k, v in self.rows if v)
        anchor = f' id="{html.escape(self.anchor)}"' if self.anchor else ""
        return (f'<section class="meshlens-verdict{"" if self.found else " none"}"{anchor} '
                f'style="border:1px solid #ccd;border-left:6px solid {"#d62728" if self.found else "#4c78a8"};'
                f'border-radius:4px;padding:.6em 1em;margin:.8em 0">'
                f'<h3 style="margin:0 0 .3em">{html.escape(self.title)}</h3>'
                f'<dl style="display:grid;grid-template-columns:max-content 1fr;gap:.15em 1em;margin:.3em 0">'
                f"{rows}</dl></section>")


def show(verdicts: Verdict | Iterable[Verdict]) -> None:
    """Display verdict cards and record their findings (see :func:`meshlens.notebook.finding`)."""
    from IPython.display import HTML, display

    from meshlens.notebook import META_KEY

    for v in [verdicts] if isinstance(verdicts, Verdict) else list(verdicts):
        display(HTML(v.html()), metadata={META_KEY: {"findings": list(v.findings)}})


# ------------------------------------------------------------------------------------------------
# Pieces
# ------------------------------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "n/a" if x is None or pd.isna(x) else f"{100 * float(x):.1f}%"


def _time(value: Any) -> str:
    """A time as ``2024-05-01 09:19:43 UTC`` (from a Timestamp, RFC 3339 text or Unix ns)."""
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return ""
    ts = pd.Timestamp(value, unit="ns", tz="UTC") if isinstance(value, int | float) else pd.Timestamp(value)
    ts = ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")
    return ts.strftime("%Y-%m-%d %H:%M:%S UTC")


def signature_text(signature: Mapping[str, float] | None, limit: int = 3) -> str:
    """The failure classes of an episode, largest first: ``95.6% authorization denials, 4.4% ...``."""
    top = sorted(((float(v), k) for k, v in (signature or {}).items() if v and float(v) >= 0.05), reverse=True)
    return ", ".join(f"{_pct(v)} {SIGNATURE_NAMES.get(k, k)}" for v, k in top[:limit])


def _evidence_part(evidence: Any, prefix: str) -> str:
    """The evidence item starting with ``prefix`` (``signature:``), without the prefix."""
    items = evidence if isinstance(evidence, list | tuple) else str(evidence or "").split("; ")
    for item in items:
        text = str(item).strip()
        if text.lower().startswith(prefix):
            return text[len(prefix):].strip()
    return ""


def _field(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    if isinstance(obj, pd.Series):
        return obj.get(name, default)
    return getattr(obj, name, default)


def change_text(change: Any) -> str:
    """``AuthorizationPolicy/checkout/deny-legacy created by alice@example.com at 2024-05-01 09:19:43
    UTC (score 0.98)`` from a change candidate (a table row or a JSON item)."""
    if change is None:
        return ""
    verb = str(_field(change, "verb") or "changed")
    verb = {"create": "created", "patch": "patched", "update": "updated", "delete": "deleted",
            "apply": "applied"}.get(verb, verb)
    actor = _field(change, "actor") or "an unknown actor"
    when = _time(_field(change, "ts"))
    score = _field(change, "score")
    tail = f" (score {float(score):.2f})" if score is not None and not pd.isna(score) else ""
    return f"{_field(change, 'target')} {verb} by {actor}" + (f" at {when}" if when else "") + tail


# ------------------------------------------------------------------------------------------------
# Root cause and changes
# ------------------------------------------------------------------------------------------------


def root_cause(rc: Any, changes: Any = None) -> Verdict:
    """The root-cause answer: culprit, failure signature, onset with before/after, likely change.

    ``rc``: a :class:`meshlens.analysis.rootcause.RootCauseReport`; ``changes``: the
    :class:`meshlens.analysis.changes.ChangeReport` scored against it (or None).
    """
    service = rc.service
    if rc.onset is None or rc.candidates.empty:
        msg = rc.message or f"no incident at {service} in the window"
        return Verdict(f"No incident found at {service}", [("finding", msg)],
                       [f"No incident at {service}: {msg}"], found=False)
    top = rc.candidates.iloc[0]
    onset = rc.onset
    culprit = f"{top['target']} ({top['kind']}" + (f", namespace {top['namespace']}" if _present(top.get("namespace"))
                                                  else "") + ")"
    share = f"explains {_pct(top['score'])} of the symptom's excess failures/slowness"
    sig_requests = _evidence_part(top.get("evidence"), "signature:")
    sig_classes = signature_text(getattr(rc, "signature", None))
    signature = "; ".join(x for x in (sig_classes, sig_requests) if x)
    rates = (f"bad requests {_pct(onset.bad_baseline)} before -> {_pct(onset.bad_incident)} after "
             f"(failed {_pct(onset.failed_baseline)} -> {_pct(onset.failed_incident)}, slow "
             f"{_pct(onset.slow_baseline)} -> {_pct(onset.slow_incident)})")
    until = "still ongoing" if onset.ongoing else f"until {_time(onset.end_ns)}"
    change_row, change_line = _likely_change(changes)
    example = rc.example_request() if hasattr(rc, "example_request") else None
    rows = [
        ("culprit", f"{culprit}: {share}"),
        ("failure signature", signature),
        ("onset", f"{onset.signal} at {service} from {_time(onset.onset_ns)}, {until}; {rates}"),
        ("likely change", change_row),
        ("example request", str(example) if example else ""),
    ]
    findings = [f"Root cause of {service}'s {onset.signal} since {ts_text(onset.onset_ns)}: {top['target']} "
                f"({share})" + (f"; signature: {signature}" if signature else "")]
    if change_line:
        findings.append(change_line)
    return Verdict(f"{top['target']} is the root cause of {service}'s {onset.signal}", rows, findings)


def _present(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and pd.isna(value)) and str(value) not in ("", "<NA>")


def _likely_change(changes: Any) -> tuple[str, str]:
    """(card text, finding line) for the best likely change of a ChangeReport, or the "none" wording."""
    if changes is None:
        return "", ""
    likely = changes.likely()
    if likely.empty:
        n = len(changes.candidates)
        text = (f"none: no change near the onset scores 0.5 or more ({n} candidate(s) examined)" if n
                else "none: no configuration change near the onset")
        return text, f"Likely change: {text}"
    text = change_text(likely.iloc[0])
    return text, f"Likely change: {text}"


def change_correlation(report: Any) -> Verdict:
    """The change-correlation answer: the likely change (who, what, when) or that none explains it."""
    rc = report.root_cause
    likely = report.likely()
    symptom = f"{rc.service}'s {rc.onset.signal}" if rc.onset is not None else rc.service
    if likely.empty:
        text, line = _likely_change(report)
        rows = [("symptom", rc.onset.describe() if rc.onset is not None else (rc.message or "no incident")),
                ("likely change", text)]
        return Verdict(f"No change explains {symptom}", rows, [line], found=False)
    best = likely.iloc[0]
    evidence = best.get("evidence")
    evidence = "; ".join(evidence) if isinstance(evidence, list | tuple) else str(evidence or "")
    rows = [("change", change_text(best)),
            ("symptom", rc.onset.describe() if rc.onset is not None else rc.service),
            ("why", evidence)]
    others = len(likely) - 1
    if others:
        rows.append(("also likely", "; ".join(change_text(r) for _, r in likely.iloc[1:4].iterrows())))
    return Verdict(f"Likely cause: {best['target']}", rows, [f"Likely cause of {symptom}: {change_text(best)}"])


# ------------------------------------------------------------------------------------------------
# Incidents (triage)
# ------------------------------------------------------------------------------------------------


def _rc_text(rc: Any) -> str:
    if not rc:
        return "not found"
    kind = _field(rc, "kind")
    score = _field(rc, "score")
    text = f"{_field(rc, 'target')}" + (f" ({kind})" if kind else "")
    if score is not None and not pd.isna(score):
        text += f", explains {_pct(score)} of the excess"
    sig = _field(rc, "signature") or _field(rc, "failure_signature")
    if isinstance(sig, Mapping):
        sig = ", ".join(f"{k} {v}" for k, v in sig.items() if _present(v) and k != "examples")
    if not sig:
        sig = _evidence_part(_field(rc, "evidence"), "signature:")
    return text + (f"; signature: {sig}" if sig else "")


def _confidence(item: Mapping[str, Any]) -> str:
    conf = item.get("confidence")
    if conf is None:
        return ""
    if isinstance(conf, int | float):
        return f"{float(conf):.2f}"
    return str(conf)


KIND_TEXT = {"errors": "Errors", "latency": "Slow requests", "errors and latency": "Errors and slow requests"}


def incident(item: Mapping[str, Any]) -> Verdict:
    """One incident of :func:`meshlens.analysis.incidents.find_incidents` as a verdict card: the summary,
    root cause, change (actor and time) and confidence first; the evidence goes below the card."""
    services = item.get("services") or []
    end = item.get("end")
    when = f"{_time(item.get('onset'))} to {_time(end)}" if end else f"since {_time(item.get('onset'))} (ongoing)"
    change = item.get("change")
    rc = item.get("root_cause")
    affected = item.get("requests_affected")
    impact = ""
    if _present(item.get("bad_before")) and _present(item.get("bad_during")):
        impact = f"bad requests {_pct(item['bad_before'])} -> {_pct(item['bad_during'])}"
    if _present(affected):
        impact += (", " if impact else "") + f"about {int(affected):,} user requests spoiled"
    rows = [
        ("summary", str(item.get("summary") or "")),
        ("root cause", _rc_text(rc)),
        ("change", change_text(change) if change else "none: no config change scores 0.5 or more"),
        ("confidence", _confidence(item) + (" (share of the symptom's excess explained by the root cause)"
                                            if _confidence(item) else "")),
        ("when", when),
        ("where", f"users see it at {item.get('symptom')}" + (f"; affected: {', '.join(map(str, services))}"
                                                              if services else "")),
        ("impact", impact),
    ]
    rank = item.get("rank")
    what = KIND_TEXT.get(str(item.get("kind")), str(item.get("kind") or "Incident").capitalize())
    title = f"#{rank} {what} at {item.get('symptom')}"
    if rc:
        title += f": caused by {_field(rc, 'target')}"
    if change:
        title += f" after {_field(change, 'target')} ({_field(change, 'actor')})"
    summary = str(item.get("summary") or title)
    return Verdict(title, rows, [f"Incident {rank}: {summary}"], anchor=f"incident-{rank}")


def incidents(items: Sequence[Mapping[str, Any]], window_text: str = "the window") -> list[Verdict]:
    """The triage page's cards: one per incident, most severe first, or one "no incident" card."""
    if not items:
        return [Verdict(f"No incident in {window_text}", [("finding", "no anomaly in the window reached users "
                                                           "(an entry/edge service of the mesh)")],
                        [f"No incident in {window_text}"], found=False)]
    return [incident(i) for i in items]


def background_findings(background: pd.DataFrame | Sequence[Mapping[str, Any]] | None, limit: int = 3) -> list[str]:
    """One finding line about the anomalies that never reached users (listed apart, not incidents)."""
    df = pd.DataFrame(background) if background is not None and not isinstance(background, pd.DataFrame) else background
    if df is None or df.empty:
        return []
    targets = list(dict.fromkeys(str(t) for t in df.get("target", pd.Series(dtype=str)).dropna()))[:limit]
    return [f"{len(df)} background anomal{'y' if len(df) == 1 else 'ies'} that never reached users"
            + (f" ({', '.join(targets)})" if targets else "")]


# ------------------------------------------------------------------------------------------------
# Headline lines of the other reports
# ------------------------------------------------------------------------------------------------


def anomaly_lines(found: pd.DataFrame, limit: int = 3) -> list[str]:
    """The anomalies report's findings: how many, and the most severe few with their onsets."""
    if found is None or found.empty:
        return ["No anomalies in the window"]
    lines = [f"{len(found)} anomalies in the window, most severe first"]
    for _, a in found.head(limit).iterrows():
        what = f"{a.get('scope')} {a.get('target')}".strip() if _present(a.get("target")) else str(a.get("scope"))
        since = f" since {_time(a.get('onset'))}" if _present(a.get("onset")) else ""
        lines.append(f"{what}: {a.get('metric')} {a.get('direction') or ''}{since}".replace("  ", " ").strip())
    return lines


def audit_lines(checks: pd.DataFrame) -> list[str]:
    """The audit report's findings: each non-zero compliance check with its count (from audit.summary)."""
    if checks is None or checks.empty:
        return []
    value_col = next((c for c in checks.columns if c not in ("check", "what")), None)
    if value_col is None:
        return []
    lines = []
    for _, r in checks.iterrows():
        if r["check"] in ("events", "requests"):
            continue
        try:
            n = int(r[value_col])
        except (TypeError, ValueError):
            continue
        if n:
            lines.append(f"{n:,} {r.get('what', r['check'])}")
    return lines or ["No audit findings: no denials, plaintext, sensitive access, policy changes or TLS/authn failures"]


def timeline_lines(timeline: pd.DataFrame) -> list[str]:
    """The explore report's one line: events in the window by type."""
    if timeline is None or timeline.empty:
        return ["No events in the window"]
    by = timeline.groupby("event_type")["events"].sum().sort_values(ascending=False)
    parts = ", ".join(f"{int(n):,} {t}" for t, n in by.items())
    return [f"{int(by.sum()):,} events in the window: {parts}"]


BACKGROUND_COLUMNS = ["rank", "scope", "target", "namespace", "metric", "direction", "onset", "score", "evidence"]


def background_table(background: Sequence[Mapping[str, Any]] | pd.DataFrame | None) -> pd.DataFrame:
    """The background anomalies as a table (evidence joined into one text column)."""
    df = pd.DataFrame(background) if not isinstance(background, pd.DataFrame) else background.copy()
    if df.empty:
        return pd.DataFrame(columns=BACKGROUND_COLUMNS)
    if "evidence" in df:
        df["evidence"] = ["; ".join(e) if isinstance(e, list | tuple) else e for e in df["evidence"]]
    return df[[c for c in BACKGROUND_COLUMNS if c in df.columns]]
