"""Scheduled reports: a config file of cron-timed notebooks, run by ``run-due`` (cron, CronJob) or ``serve``.

Config (TOML or YAML; relative paths are relative to the config file)::

    db = "/data/meshlens.duckdb"        # default store for every report (opened read-only)
    out_dir = "/reports"                # runs go to <out_dir>/<report>/<UTC time>/, plus index.html
    # state_dir = "/reports/.schedule"  # default <out_dir>/.schedule: last runs + locks
    # timezone = "UTC"                  # zone of the cron expressions
    # timeout_s = 600                   # per-cell execution timeout
    # secret_env = ["MY_TOKEN"]         # more env vars whose values must never appear in a report

    [[reports]]
    name = "daily-audit"                # directory name and lock name
    notebook = "mesh_audit"             # a report name (notebooks/) or a path to a .ipynb
    cron = "0 6 * * *"
    params = { start = "-24h", end = "now", namespace = "shop" }
    keep_runs = 30                      # retention: newest N runs ...
    keep_days = 14                      # ... and none older than N days (either may be omitted)
    # db, out_dir, hide_code, timeout_s, enabled may be set per report

Semantics, chosen so that ``run-due`` can be called from cron every minute, or by a Kubernetes CronJob,
or by several machines sharing a volume:

* **Due**: a report is due when its most recent cron slot at ``now`` (inclusive) is later than the
  slot of its last run recorded in ``<state_dir>/state.json``. Missed slots are not back-filled: after
  downtime a report runs once. A report never run before is due at once. A failed run still counts as
  its slot's run -- it is retried at the next slot (or with ``--force``), not every minute.
* **Relative times** (``-24h``, ``now``) resolve against the *slot* time, so a daily 06:00 report always
  covers 06:00-06:00 however late it starts.
* **No overlap**: each report runs under an exclusive ``flock`` on ``<state_dir>/locks/<name>.lock``.
  A second ``run-due`` finds it held and skips that report (reported, not a failure). The kernel
  releases a flock when its holder dies, so a crashed run can never leave a stale lock behind; the
  lock file's content (pid, host, start time) is informational and overwritten by the next holder.
* **Failures**: a report that fails (notebook error, secret refused, unknown notebook or parameter) is
  recorded as a run (``run.json`` and the index) and the others still run; the exit status is 1 if any
  report failed, 0 otherwise.
* **Retention** runs after each report: runs beyond ``keep_runs`` or older than ``keep_days`` are
  deleted -- only directories that are meshlens runs, and never the newest one.
* ``index.html`` in each output directory lists every run with time, parameters, status and links.

All time comes from an injectable ``clock`` so tests can drive due/overlap/retention deterministically.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import threading
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from croniter import croniter

from meshlens import reports
from meshlens.errors import ConfigError, MeshlensError

Clock = Callable[[], datetime]
STATE_FILE = "state.json"
_TOP_KEYS = {"db", "out_dir", "state_dir", "timezone", "timeout_s", "secret_env", "hide_code", "reports"}
_REPORT_KEYS = {"name", "notebook", "cron", "params", "db", "out_dir", "keep_runs", "keep_days", "hide_code",
                "timeout_s", "enabled"}


def utc_now() -> datetime:
    return datetime.now(UTC)


# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------


@dataclass
class ReportSpec:
    """One scheduled report."""

    name: str
    notebook: str
    cron: str
    params: dict[str, Any]
    db: str | None
    out_dir: Path
    keep_runs: int | None = None
    keep_days: float | None = None
    hide_code: bool = True
    timeout_s: float | None = 600
    enabled: bool = True


@dataclass
class ScheduleConfig:
    """A loaded schedule: reports plus where state lives."""

    reports: list[ReportSpec]
    state_dir: Path
    timezone: str = "UTC"
    secret_env: tuple[str, ...] = ()
    path: Path | None = None

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def out_dirs(self) -> list[Path]:
        return list(dict.fromkeys(r.out_dir for r in self.reports))


def _read(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read schedule config {str(path)!r}: {exc}") from exc
    try:
        if path.suffix.lower() == ".toml":
            data = tomllib.loads(text)
        elif path.suffix.lower() in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        else:
            raise ConfigError(f"schedule config {str(path)!r} must end in .toml, .yaml or .yml")
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"schedule config {str(path)!r} is not valid {path.suffix[1:].upper()}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"schedule config {str(path)!r} must be a mapping at the top level")
    return data


def _positive(value: Any, what: str, kind: type) -> Any:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigError(f"{what} must be a positive number, not {value!r}")
    return kind(value)


def parse_config(data: dict[str, Any], base_dir: Path, path: Path | None = None) -> ScheduleConfig:
    """Validate a schedule mapping (already parsed from TOML/YAML). Paths resolve against ``base_dir``."""
    where = str(path) if path else "schedule config"
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown top-level key(s) {sorted(unknown)}; allowed: {sorted(_TOP_KEYS)}")

    def resolve(p: Any) -> Path:
        q = Path(str(p)).expanduser()
        return q if q.is_absolute() else (base_dir / q).resolve()

    tz = str(data.get("timezone", "UTC"))
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"{where}: unknown timezone {tz!r} (use an IANA name such as UTC or Europe/Paris)") from None
    default_out = data.get("out_dir")
    specs: list[ReportSpec] = []
    items = data.get("reports") or []
    if not isinstance(items, list) or not items:
        raise ConfigError(f"{where}: needs a non-empty list of reports ([[reports]] in TOML, reports: in YAML)")
    for i, item in enumerate(items):
        label = f"{where}: reports[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{label} must be a mapping")
        bad = set(item) - _REPORT_KEYS
        if bad:
            raise ConfigError(f"{label}: unknown key(s) {sorted(bad)}; allowed: {sorted(_REPORT_KEYS)}")
        for key in ("name", "notebook", "cron"):
            if not item.get(key):
                raise ConfigError(f"{label}: `{key}` is required")
        name = str(item["name"])
        if not reports.SAFE_NAME_RE.fullmatch(name):
            raise ConfigError(f"{label}: name {name!r} must be letters, digits, '.', '_' or '-'")
        cron = str(item["cron"])
        if not croniter.is_valid(cron):
            raise ConfigError(f"{label} ({name}): invalid cron expression {cron!r} (e.g. '0 6 * * *')")
        params = item.get("params") or {}
        if not isinstance(params, dict):
            raise ConfigError(f"{label} ({name}): params must be a mapping")
        reports.check_parameter_names(params)
        out = item.get("out_dir", default_out)
        if not out:
            raise ConfigError(f"{label} ({name}): no out_dir (set it at the top level or on the report)")
        db = item.get("db", data.get("db"))
        notebook = str(item["notebook"])
        if notebook.endswith(".ipynb") and not Path(notebook).is_absolute():
            notebook = str(resolve(notebook))
        specs.append(ReportSpec(
            name=name, notebook=notebook, cron=cron, params=dict(params),
            db=str(resolve(db)) if db else None, out_dir=resolve(out),
            keep_runs=_positive(item.get("keep_runs"), f"{label}: keep_runs", int),
            keep_days=_positive(item.get("keep_days"), f"{label}: keep_days", float),
            hide_code=bool(item.get("hide_code", data.get("hide_code", True))),
            timeout_s=_positive(item.get("timeout_s", data.get("timeout_s", 600)), f"{label}: timeout_s", float),
            enabled=bool(item.get("enabled", True)),
        ))
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"{where}: report names must be unique; repeated: {dupes}")
    state_dir = data.get("state_dir")
    state = resolve(state_dir) if state_dir else (specs[0].out_dir / ".schedule")
    secret_env = data.get("secret_env") or []
    if not isinstance(secret_env, list) or not all(isinstance(x, str) for x in secret_env):
        raise ConfigError(f"{where}: secret_env must be a list of environment variable names")
    return ScheduleConfig(reports=specs, state_dir=state, timezone=tz, secret_env=tuple(secret_env), path=path)


def load_config(path: str | os.PathLike[str]) -> ScheduleConfig:
    """Read and validate a TOML or YAML schedule file."""
    p = Path(path).expanduser().resolve()
    return parse_config(_read(p), p.parent, p)


# ------------------------------------------------------------------------------------------------
# State and locks
# ------------------------------------------------------------------------------------------------


@contextmanager
def _flocked(path: Path, *, blocking: bool) -> Iterator[Any]:
    """Hold an exclusive flock on ``path``; yields the open file, or None if not blocking and held."""
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - closed in finally; O_CLOEXEC: kernels don't inherit it
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield None
            return
        yield f
    finally:
        f.close()  # closing releases the lock


@contextmanager
def report_lock(state_dir: Path, name: str, clock: Clock = utc_now) -> Iterator[bool]:
    """Try to take the report's run lock; yields False if another run of it holds the lock."""
    with _flocked(state_dir / "locks" / f"{name}.lock", blocking=False) as f:
        if f is None:
            yield False
            return
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": clock().isoformat()}))
        f.flush()
        yield True


def lock_holder(state_dir: Path, name: str) -> dict[str, Any] | None:
    """What the lock file says about its last holder (pid, host, since), for messages."""
    try:
        return json.loads((state_dir / "locks" / f"{name}.lock").read_text(encoding="utf-8") or "null")
    except (OSError, ValueError):
        return None


def read_state(state_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads((state_dir / STATE_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {"reports": {}}
    except (OSError, ValueError) as exc:
        raise MeshlensError(
            f"schedule state {state_dir / STATE_FILE} is unreadable ({exc}); move it away to start afresh "
            "(every report will then be due once)"
        ) from exc
    return data if isinstance(data.get("reports"), dict) else {"reports": {}}


def _record_state(state_dir: Path, name: str, entry: dict[str, Any]) -> None:
    """Update one report's entry under the state lock (several run-due processes may finish at once)."""
    with _flocked(state_dir / "state.lock", blocking=True):
        state = read_state(state_dir)
        state["reports"][name] = entry
        tmp = state_dir / f".{STATE_FILE}.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(state, indent=2, sort_keys=True), encoding="utf-8")
        os.replace(tmp, state_dir / STATE_FILE)


# ------------------------------------------------------------------------------------------------
# Due computation and retention
# ------------------------------------------------------------------------------------------------


def latest_slot(cron: str, now: datetime, tz: ZoneInfo) -> datetime:
    """The most recent cron time at or before ``now`` (in UTC)."""
    local = now.astimezone(tz) + timedelta(seconds=1)  # croniter's get_prev is strict; include `now`
    return croniter(cron, local).get_prev(datetime).astimezone(UTC)


def next_slot(cron: str, now: datetime, tz: ZoneInfo) -> datetime:
    """The first cron time strictly after ``now`` (in UTC)."""
    return croniter(cron, now.astimezone(tz)).get_next(datetime).astimezone(UTC)


def is_due(spec: ReportSpec, state: dict[str, Any], now: datetime, tz: ZoneInfo) -> tuple[bool, datetime]:
    slot = latest_slot(spec.cron, now, tz)
    last = (state.get("reports", {}).get(spec.name) or {}).get("last_slot")
    return (last is None or datetime.fromisoformat(last) < slot), slot


def apply_retention(report_dir: Path, keep_runs: int | None, keep_days: float | None, now: datetime) -> list[Path]:
    """Delete runs of one report beyond ``keep_runs`` or older than ``keep_days``; never the newest."""
    if keep_runs is None and keep_days is None:
        return []
    runs = sorted((d for d in report_dir.iterdir() if reports.RUN_DIR_RE.match(d.name)
                   and (d / reports.RUN_FILE).is_file()), key=lambda d: d.name, reverse=True) \
        if report_dir.is_dir() else []
    removed = []
    for i, d in enumerate(runs):
        if i == 0:
            continue
        started = datetime.strptime(d.name[:16], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
        too_many = keep_runs is not None and i >= keep_runs
        too_old = keep_days is not None and now - started > timedelta(days=keep_days)
        if too_many or too_old:
            reports.remove_run(d)
            removed.append(d)
    return removed


# ------------------------------------------------------------------------------------------------
# Running
# ------------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What ``run_due`` did with one report: ``action`` is ran / not-due / running / disabled."""

    name: str
    action: str
    slot: str | None = None
    status: str | None = None
    run_dir: str | None = None
    html: str | None = None
    error: str | None = None
    removed: list[str] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)
    duration_s: float | None = None

    @property
    def failed(self) -> bool:
        """A run that did not do its job; ``empty`` (no events in the window) is not a failure."""
        return self.action == "ran" and self.status not in reports.OK_STATUSES


@dataclass
class DueResult:
    """Everything one ``run_due`` call did; ``exit_code`` is 1 if any report failed."""

    now: str
    outcomes: list[Outcome]
    index: list[str]

    @property
    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.failed]

    @property
    def exit_code(self) -> int:
        return 1 if self.failures else 0

    def as_dict(self) -> dict[str, Any]:
        return {"now": self.now, "exit_code": self.exit_code, "index": self.index,
                "outcomes": [asdict(o) for o in self.outcomes]}


def _run_one(config: ScheduleConfig, spec: ReportSpec, slot: datetime, clock: Clock) -> Outcome:
    try:
        result = reports.run_report(
            spec.notebook, spec.db, spec.params, spec.out_dir, hide_code=spec.hide_code, report_name=spec.name,
            now=slot, clock=clock, timeout_s=spec.timeout_s, secret_env=config.secret_env, update_index=False,
        )
    except MeshlensError as exc:  # bad notebook/parameters: record it like any failed run
        result = reports.record_failure(spec.out_dir, spec.name, spec.notebook, spec.params, str(exc),
                                        started=clock(), update_index=False)
    return Outcome(name=spec.name, action="ran", slot=slot.isoformat(), status=result.status,
                   run_dir=result.run_dir, html=result.html, error=result.error, findings=list(result.findings),
                   duration_s=result.duration_s)


def run_due(
    config: ScheduleConfig | str | os.PathLike[str], *, now: datetime | None = None, clock: Clock | None = None,
    force: bool = False, only: list[str] | None = None, on_outcome: Callable[[Outcome], None] | None = None,
) -> DueResult:
    """Run every report that is due at ``now`` once (see the module docstring), then refresh the indexes.

    ``force`` runs every enabled report regardless of its schedule (``make demo``); ``only`` limits the
    run to the named reports. ``clock`` is the wall clock for run directories and locks. ``on_outcome``
    is called with each report's outcome as soon as it is known (``make demo`` prints it then).
    """
    cfg = config if isinstance(config, ScheduleConfig) else load_config(config)
    clock = clock or utc_now
    now = (now or clock()).astimezone(UTC)
    if only:
        unknown = sorted(set(only) - {r.name for r in cfg.reports})
        if unknown:
            raise ConfigError(f"unknown report(s) {unknown}; the schedule has: {[r.name for r in cfg.reports]}")
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    outcomes = []
    for spec in cfg.reports:
        if only and spec.name not in only:
            continue
        if not spec.enabled:
            outcomes.append(Outcome(spec.name, "disabled"))
            continue
        due, slot = is_due(spec, read_state(cfg.state_dir), now, cfg.tz)
        if force:
            due, slot = True, now
        if not due:
            outcomes.append(Outcome(spec.name, "not-due", slot=slot.isoformat()))
            continue
        with report_lock(cfg.state_dir, spec.name, clock) as acquired:
            if not acquired:
                holder = lock_holder(cfg.state_dir, spec.name) or {}
                outcomes.append(Outcome(spec.name, "running", slot=slot.isoformat(),
                                        error=f"another run holds the lock since {holder.get('since', '?')} "
                                              f"(pid {holder.get('pid', '?')} on {holder.get('host', '?')})"))
                continue
            # Re-check under the lock: a concurrent run-due may have just run this slot.
            if not force and not is_due(spec, read_state(cfg.state_dir), now, cfg.tz)[0]:
                outcomes.append(Outcome(spec.name, "not-due", slot=slot.isoformat()))
                continue
            outcome = _run_one(cfg, spec, slot, clock)
            _record_state(cfg.state_dir, spec.name, {
                "last_slot": slot.isoformat(), "last_status": outcome.status, "last_run_dir": outcome.run_dir,
            })
            outcome.removed = [str(p) for p in apply_retention(spec.out_dir / spec.name, spec.keep_runs,
                                                               spec.keep_days, clock().astimezone(UTC))]
            outcomes.append(outcome)
            if on_outcome is not None:
                on_outcome(outcome)
    index = [str(reports.write_index(d)) for d in cfg.out_dirs()]
    return DueResult(now=now.isoformat(), outcomes=outcomes, index=index)


def next_wakeup(cfg: ScheduleConfig, now: datetime) -> datetime:
    """When the next enabled report becomes due."""
    slots = [next_slot(r.cron, now, cfg.tz) for r in cfg.reports if r.enabled]
    if not slots:
        raise ConfigError("no enabled report in the schedule; nothing to serve")
    return min(slots)


def serve(
    config: ScheduleConfig | str | os.PathLike[str], *, clock: Clock | None = None,
    sleep: Callable[[float], None] | None = None, stop: threading.Event | None = None,
    max_cycles: int | None = None, on_cycle: Callable[[DueResult], None] | None = None,
    max_sleep_s: float = 60.0,
) -> int:
    """Run due reports, sleep until the next slot, repeat -- until ``stop`` is set, SIGTERM/SIGINT, or
    ``max_cycles`` cycles. A config given as a path is re-read each cycle (edits apply without a
    restart). Returns 1 if any cycle had a failed report, else 0.
    """
    clock = clock or utc_now
    stop = stop or threading.Event()
    sleep = sleep or (lambda s: stop.wait(s))
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, lambda *_: stop.set())
    failed = False
    cycles = 0
    try:
        while not stop.is_set() and (max_cycles is None or cycles < max_cycles):
            cfg = config if isinstance(config, ScheduleConfig) else load_config(config)
            result = run_due(cfg, clock=clock)
            failed = failed or result.exit_code != 0
            cycles += 1
            if on_cycle:
                on_cycle(result)
            if max_cycles is not None and cycles >= max_cycles:
                break
            wake = next_wakeup(cfg, clock())
            while not stop.is_set() and (remaining := (wake - clock()).total_seconds()) > 0:
                sleep(min(remaining, max_sleep_s))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 1 if failed else 0
