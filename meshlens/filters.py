"""Ingest filters and success sampling: keep what matters, thin out the noise, count what was dropped.

Why at ingest: health checks and repetitive successful traffic are most of a mesh's access-log volume
and carry little signal. Dropping them before they reach the store keeps stores small, but a dropped
record must never be *silently* lost, so every filtered record is counted per rule, and the ingest
conservation count becomes ``read = stored + duplicates + rejects + filtered``.

Two mechanisms, both applied as SQL over the parser's ``_ml_events`` view (no per-record Python):

* **rules**: drop events matching all of a rule's criteria (event type, namespace, workload, path glob,
  status class, user-agent glob). The first matching rule gets the count. Defaults drop health-check
  noise (``kube-probe/*`` user agents; ``/healthz``, ``/ready``, ``/readyz``, ``/livez``, ``/metrics``).
* **success sampling** (``sample_success = r``): keep a fraction ``r`` of *successful* requests and
  store ``sample_weight = 1/r`` on each kept one, so ``sum(sample_weight)`` estimates the original count
  without bias. The decision hashes the ``x-request-id`` (else the event id), so the client and server
  records of one request are kept or dropped together, and re-ingesting makes the same decision.

Protected events -- denials, errors (status >= 400 or any Envoy response flag), TLS/authn failures,
config changes and every non-request event -- are never sampled, and rules skip them unless a rule sets
``keep_failures: false`` explicitly.

Config file (YAML or TOML)::

    default_filters: true          # the two health-check rules (false: none)
    sample_success: 0.1            # optional, 0 < r <= 1
    rules:
      - name: drop-load-tests
        namespace: [loadtest]      # src or dst namespace; globs allowed
        workload: ["k6-*"]         # src workload, dst workload or dst service
        path: ["/internal/*"]      # query string ignored
        status_class: [2xx, 3xx]   # 1xx..5xx, or 0 (TCP / no response)
        user_agent: ["k6/*"]
        event_type: [request]
        keep_failures: true        # default: never drop protected events
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meshlens import schema
from meshlens.errors import ConfigError

if TYPE_CHECKING:  # the CLI imports this module for its options: keep that import light
    import duckdb

SAMPLE_RULE = "sample_success"
HEALTH_PATHS = ("/healthz", "/healthz/*", "/ready", "/readyz", "/readyz/*", "/livez", "/livez/*", "/metrics")
PROBE_USER_AGENTS = ("kube-probe/*",)
STATUS_CLASSES = ("0", "1xx", "2xx", "3xx", "4xx", "5xx")
_RULE_KEYS = ("name", "event_type", "namespace", "workload", "path", "status_class", "user_agent",
              "keep_failures")
_CONFIG_KEYS = ("default_filters", "sample_success", "rules")

# Never sampled, and skipped by rules unless keep_failures is false.
PROTECTED_SQL = (
    "(event_type IS DISTINCT FROM 'request' OR coalesce(status, 0) >= 400 OR response_flags IS NOT NULL "
    "OR authz_decision IS NOT NULL OR tls_failure_reason IS NOT NULL OR authn_reason IS NOT NULL)"
)
# 32 bits of md5(request id or event id): uniform, stable across DuckDB versions and re-ingests.
_SAMPLE_HASH_SQL = "CAST(('0x' || left(md5(coalesce(request_id, event_id)), 8)) AS BIGINT)"


@dataclass(frozen=True)
class Rule:
    """Drop events matching *all* given criteria (each criterion matches *any* of its values)."""

    name: str
    event_type: tuple[str, ...] = ()
    namespace: tuple[str, ...] = ()
    workload: tuple[str, ...] = ()
    path: tuple[str, ...] = ()
    status_class: tuple[str, ...] = ()
    user_agent: tuple[str, ...] = ()
    keep_failures: bool = True

    def where_sql(self) -> str:
        """SQL predicate over ``_ml_events`` columns (values quoted as literals, never executed as SQL)."""
        parts: list[str] = []
        if self.event_type:
            parts.append(f"event_type IN ({', '.join(_lit(v) for v in self.event_type)})")
        if self.namespace:
            rx = _lit(globs_to_regex(self.namespace))
            parts.append(f"(regexp_full_match(coalesce(dst_namespace, ''), {rx}) "
                         f"OR regexp_full_match(coalesce(src_namespace, ''), {rx}))")
        if self.workload:
            rx = _lit(globs_to_regex(self.workload))
            parts.append(f"(regexp_full_match(coalesce(dst_service, ''), {rx}) "
                         f"OR regexp_full_match(coalesce(dst_workload, ''), {rx}) "
                         f"OR regexp_full_match(coalesce(src_workload, ''), {rx}))")
        if self.path:
            parts.append(f"regexp_full_match(split_part(coalesce(path, ''), '?', 1), "
                         f"{_lit(globs_to_regex(self.path))})")
        if self.status_class:
            classes = ", ".join("0" if c == "0" else c[0] for c in self.status_class)
            parts.append(f"(CASE WHEN coalesce(status, 0) = 0 THEN 0 ELSE status // 100 END) IN ({classes})")
        if self.user_agent:
            parts.append(f"regexp_full_match(coalesce(user_agent, ''), {_lit(globs_to_regex(self.user_agent))})")
        if self.keep_failures:
            parts.append(f"NOT {PROTECTED_SQL}")
        return " AND ".join(parts) if parts else "TRUE"


DEFAULT_RULES: tuple[Rule, ...] = (
    Rule("health_probe_user_agent", user_agent=PROBE_USER_AGENTS),
    Rule("health_check_path", path=HEALTH_PATHS),
)


@dataclass(frozen=True)
class FilterConfig:
    """What ingest drops and samples. ``FilterConfig()`` keeps everything; :meth:`default` is the default."""

    rules: tuple[Rule, ...] = ()
    sample_success: float | None = None

    @classmethod
    def default(cls) -> FilterConfig:
        return cls(rules=DEFAULT_RULES)

    @property
    def active(self) -> bool:
        return bool(self.rules) or self.sample_success is not None

    def rule_names(self) -> list[str]:
        return [r.name for r in self.rules] + ([SAMPLE_RULE] if self.sample_success is not None else [])


@dataclass
class FilterResult:
    """One batch through the filters: the view to insert from and what was dropped, per rule."""

    view: str
    kept: int
    filtered: int
    by_rule: dict[str, int] = field(default_factory=dict)


def globs_to_regex(patterns: Iterable[str]) -> str:
    """Shell-style globs (``*``, ``?``) -> one RE2 alternation matched against the whole value."""
    alts = []
    for p in patterns:
        alts.append("".join(".*" if ch == "*" else "." if ch == "?" else re.escape(ch) for ch in p))
    return "|".join(f"(?:{a})" for a in alts)


def _lit(s: str) -> str:
    """A SQL string literal. Standard SQL strings have no backslash escapes: doubling ``'`` is complete."""
    return "'" + s.replace("'", "''") + "'"


# -- applying ------------------------------------------------------------------------------------
KEPT_VIEW = "_ml_kept"
_DROPPED = "_ml_dropped"
SEQ = "_ml_seq"  # the parser's row number, exposed by ``_ml_events`` for this join


def apply_filters(con: duckdb.DuckDBPyConnection, events: str, cfg: FilterConfig,
                  n_events: int | None = None) -> FilterResult:
    """Classify ``events`` (a view/table on ``con``) and leave :data:`KEPT_VIEW` with the events to store.

    Only the *dropped* rows are materialized (``seq`` + rule, a narrow temp table, usually tiny), and the
    classification reads only the columns the rules name -- so the wide rows (``raw``, the event id,
    redaction) are computed once, by the insert that reads :data:`KEPT_VIEW`. ``sample_weight`` is set
    there: ``1/rate`` for sampled-in successes, else the parser's value or 1. Call :func:`drop_results`
    after inserting. ``n_events``: the row count of ``events`` when known (saves a pass).
    """
    cols = ", ".join(f'"{c}"' for c in schema.EVENT_COLUMN_NAMES if c != "sample_weight")
    if n_events is None:
        n_events = int(con.execute(f"SELECT count(*) FROM {events}").fetchall()[0][0])
    if not cfg.active:
        con.execute(f"CREATE OR REPLACE TEMP VIEW {KEPT_VIEW} AS SELECT {cols}, "
                    f"coalesce(sample_weight, 1.0) AS sample_weight FROM {events}")
        return FilterResult(KEPT_VIEW, n_events, 0, {})
    whens = [f"WHEN {r.where_sql()} THEN {_lit(r.name)}" for r in cfg.rules]
    weight = "coalesce(sample_weight, 1.0)"
    if cfg.sample_success is not None:
        rate = float(cfg.sample_success)
        threshold = int(rate * 2**32)
        sampleable = f"NOT {PROTECTED_SQL}"
        whens.append(f"WHEN {sampleable} AND {_SAMPLE_HASH_SQL} >= {threshold} THEN {_lit(SAMPLE_RULE)}")
        weight = f"CASE WHEN {sampleable} THEN {1.0 / rate!r} ELSE {weight} END"
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE {_DROPPED} AS
        SELECT * FROM (SELECT {SEQ}, CASE {' '.join(whens)} END AS _ml_rule FROM {events})
        WHERE _ml_rule IS NOT NULL""")
    counts = dict(con.execute(f"SELECT _ml_rule, count(*) FROM {_DROPPED} GROUP BY 1").fetchall())
    by_rule = {name: int(counts.get(name, 0)) for name in cfg.rule_names()}
    filtered = sum(by_rule.values())
    keep = f"WHERE {SEQ} NOT IN (SELECT {SEQ} FROM {_DROPPED})" if filtered else ""
    con.execute(f"CREATE OR REPLACE TEMP VIEW {KEPT_VIEW} AS SELECT {cols}, {weight} AS sample_weight "
                f"FROM {events} {keep}")
    return FilterResult(KEPT_VIEW, n_events - filtered, filtered, by_rule)


def drop_results(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(f"DROP VIEW IF EXISTS {KEPT_VIEW}")
    con.execute(f"DROP TABLE IF EXISTS {_DROPPED}")


# -- configuration -------------------------------------------------------------------------------
def _strings(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str | int) and not isinstance(v, bool) for v in value):
        raise ConfigError(f"{where}: expected a string or a list of strings, got {value!r}")
    return tuple(str(v) for v in value)


def parse_rule(raw: Any, where: str) -> Rule:
    """A rule from its config mapping; errors name the file, the rule and the key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: a rule must be a mapping with keys {', '.join(_RULE_KEYS)}")
    unknown = set(raw) - set(_RULE_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {', '.join(_RULE_KEYS)}")
    name = raw.get("name")
    if not isinstance(name, str) or not name or name == SAMPLE_RULE:
        raise ConfigError(f"{where}: 'name' must be a non-empty string other than {SAMPLE_RULE!r}")
    kw: dict[str, Any] = {}
    for key in ("event_type", "namespace", "workload", "path", "status_class", "user_agent"):
        if key in raw:
            kw[key] = _strings(raw[key], f"{where}.{key}")
    bad = set(kw.get("event_type", ())) - set(schema.EVENT_TYPES)
    if bad:
        raise ConfigError(f"{where}.event_type: unknown {sorted(bad)}; known: {', '.join(schema.EVENT_TYPES)}")
    bad = set(kw.get("status_class", ())) - set(STATUS_CLASSES)
    if bad:
        raise ConfigError(f"{where}.status_class: unknown {sorted(bad)}; use {', '.join(STATUS_CLASSES)}")
    keep = raw.get("keep_failures", True)
    if not isinstance(keep, bool):
        raise ConfigError(f"{where}.keep_failures: expected true or false, got {keep!r}")
    if not kw:
        raise ConfigError(f"{where}: rule {name!r} has no criteria and would drop everything; add at least one "
                          "of event_type, namespace, workload, path, status_class, user_agent")
    return Rule(name=name, keep_failures=keep, **kw)


def _check_rate(rate: Any, where: str) -> float:
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 < float(rate) <= 1:
        raise ConfigError(f"{where}: sample_success must be a number with 0 < rate <= 1, got {rate!r}")
    return float(rate)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (``.yaml``/``.yml``/anything else) or TOML (``.toml``) mapping."""
    import yaml

    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read ({exc.strerror or exc})") from exc
    try:
        data = tomllib.loads(text) if p.suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{p}: not valid {'TOML' if p.suffix == '.toml' else 'YAML'}: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level")
    return data


def config_from_dict(data: dict[str, Any], where: str = "filter config") -> FilterConfig:
    unknown = set(data) - set(_CONFIG_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {', '.join(_CONFIG_KEYS)}")
    defaults = data.get("default_filters", True)
    if not isinstance(defaults, bool):
        raise ConfigError(f"{where}: default_filters must be true or false, got {defaults!r}")
    raw_rules = data.get("rules") or []
    if not isinstance(raw_rules, list):
        raise ConfigError(f"{where}: 'rules' must be a list of rule mappings")
    rules = [parse_rule(r, f"{where}: rules[{i}]") for i, r in enumerate(raw_rules)]
    all_rules = (list(DEFAULT_RULES) if defaults else []) + rules
    names = [r.name for r in all_rules]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"{where}: rule names must be unique (counts are per rule); repeated: {dup}")
    rate = data.get("sample_success")
    return FilterConfig(rules=tuple(all_rules),
                        sample_success=_check_rate(rate, where) if rate is not None else None)


def load_filter_config(path: str | Path) -> FilterConfig:
    return config_from_dict(read_config_file(path), where=str(path))


def build_filter_config(filter_config: Path | None = None, no_default_filters: bool = False,
                        sample_success: float | None = None) -> FilterConfig:
    """The CLI options -> a :class:`FilterConfig` (the options override the file)."""
    data = read_config_file(filter_config) if filter_config else {}
    if no_default_filters:
        data["default_filters"] = False
    if sample_success is not None:
        data["sample_success"] = sample_success
    return config_from_dict(data, where=str(filter_config) if filter_config else "command line")

