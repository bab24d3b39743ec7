"""The scheduler: config parsing, due computation, overlap, failure isolation, retention and serve,
driven by a fake clock (no test waits for real time)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from typer import Typer
from typer.testing import CliRunner

from meshlens import reports, schedule
from meshlens.cli.reports import register
from meshlens.errors import ConfigError, MeshlensError
from tests.support.notebooks import make_notebook

T0 = datetime(2024, 5, 1, 5, 0, tzinfo=UTC)


class FakeClock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kw: float) -> None:
        self.now += timedelta(**kw)


@pytest.fixture
def nbdir(tmp_path: Path) -> Path:
    d = tmp_path / "notebooks"
    make_notebook(d / "ok.ipynb", 'db = ""\nstart = ""\nend = ""\n', "print('window', start, end)")
    make_notebook(d / "boom.ipynb", 'db = ""\n', "raise RuntimeError('scheduled boom')")
    return d


def write_config(tmp_path: Path, body: str, name: str = "schedule.toml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(body))
    return p


def runs_of(out: Path, name: str) -> list[Path]:
    d = out / name
    return sorted(x for x in d.iterdir() if reports.RUN_DIR_RE.match(x.name)) if d.is_dir() else []


# -- config --------------------------------------------------------------------------------------


def test_toml_and_yaml_configs_are_equivalent(tmp_path: Path) -> None:
    toml = write_config(tmp_path, """
        db = "store.duckdb"
        out_dir = "out"
        timezone = "Europe/Paris"
        secret_env = ["MY_TOKEN"]

        [[reports]]
        name = "daily-audit"
        notebook = "mesh_audit"
        cron = "0 6 * * *"
        params = { start = "-24h", end = "now" }
        keep_runs = 5
        keep_days = 7
    """)
    yaml = write_config(tmp_path, """
        db: store.duckdb
        out_dir: out
        timezone: Europe/Paris
        secret_env: [MY_TOKEN]
        reports:
          - name: daily-audit
            notebook: mesh_audit
            cron: "0 6 * * *"
            params: {start: "-24h", end: now}
            keep_runs: 5
            keep_days: 7
    """, "schedule.yaml")
    a, b = schedule.load_config(toml), schedule.load_config(yaml)
    assert a.reports == b.reports and a.state_dir == b.state_dir and a.timezone == b.timezone
    spec = a.reports[0]
    assert spec.db == str(tmp_path / "store.duckdb") and spec.out_dir == tmp_path / "out"
    assert (spec.keep_runs, spec.keep_days, spec.params["start"]) == (5, 7.0, "-24h")
    assert a.state_dir == tmp_path / "out" / ".schedule" and a.secret_env == ("MY_TOKEN",)


@pytest.mark.parametrize(("body", "message"), [
    ('out_dir = "o"\nbogus = 1\n[[reports]]\nname="a"\nnotebook="n"\ncron="* * * * *"\n', "unknown top-level key"),
    ('out_dir = "o"\n[[reports]]\nname="a"\nnotebook="n"\ncron="61 * * * *"\n', "invalid cron expression"),
    ('out_dir = "o"\n[[reports]]\nname="a"\nnotebook="n"\n', "`cron` is required"),
    ('[[reports]]\nname="a"\nnotebook="n"\ncron="* * * * *"\n', "no out_dir"),
    ('out_dir = "o"\n[[reports]]\nname="a"\nnotebook="n"\ncron="* * * * *"\n[[reports]]\nname="a"\nnotebook="m"\n'
     'cron="* * * * *"\n', "must be unique"),
    ('out_dir = "o"\n[[reports]]\nname="a/../b"\nnotebook="n"\ncron="* * * * *"\n', "must be letters"),
    ('out_dir = "o"\n[[reports]]\nname="a"\nnotebook="n"\ncron="* * * * *"\nparams={es_password="x"}\n',
     "looks like a credential"),
    ('out_dir = "o"\ntimezone = "Mars/Olympus"\n[[reports]]\nname="a"\nnotebook="n"\ncron="* * * * *"\n',
     "unknown timezone"),
    ('out_dir = "o"\n[[reports]]\nname="a"\nnotebook="n"\ncron="* * * * *"\nkeep_runs=0\n', "positive number"),
    ('out_dir = "o"\nreports = []\n', "non-empty list of reports"),
])
def test_config_errors_are_clear(tmp_path: Path, body: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        schedule.load_config(write_config(tmp_path, body))


def test_not_toml_or_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"must end in \.toml, \.yaml or \.yml"):
        schedule.load_config(write_config(tmp_path, "x", "schedule.ini"))
    with pytest.raises(ConfigError, match="not valid TOML"):
        schedule.load_config(write_config(tmp_path, "x = [", "bad.toml"))


# -- due -----------------------------------------------------------------------------------------


def test_latest_slot_includes_now_and_respects_timezone() -> None:
    utc, paris = schedule.ZoneInfo("UTC"), schedule.ZoneInfo("Europe/Paris")
    six = datetime(2024, 5, 1, 6, 0, tzinfo=UTC)
    assert schedule.latest_slot("0 6 * * *", six, utc) == six
    assert schedule.latest_slot("0 6 * * *", six - timedelta(seconds=1), utc) == six - timedelta(days=1)
    assert schedule.next_slot("0 6 * * *", six, utc) == six + timedelta(days=1)
    assert schedule.latest_slot("0 6 * * *", six, paris) == datetime(2024, 5, 1, 4, 0, tzinfo=UTC)  # CEST


def test_run_due_runs_each_slot_once_with_times_relative_to_the_slot(tmp_path: Path, nbdir: Path) -> None:
    cfg = write_config(tmp_path, f"""
        out_dir = "out"
        [[reports]]
        name = "daily"
        notebook = "{nbdir / 'ok.ipynb'}"
        cron = "0 6 * * *"
        params = {{ start = "-24h", end = "now" }}
    """)
    clock = FakeClock(T0)  # 05:00, never run: the most recent slot (yesterday 06:00) is due at once
    first = schedule.run_due(cfg, clock=clock)
    assert [(o.action, o.status) for o in first.outcomes] == [("ran", "ok")]
    run = json.loads((Path(first.outcomes[0].run_dir) / "run.json").read_text())
    assert (run["parameters"]["start"], run["parameters"]["end"]) == ("2024-04-29T06:00:00Z", "2024-04-30T06:00:00Z")

    clock.advance(minutes=30)
    assert [o.action for o in schedule.run_due(cfg, clock=clock).outcomes] == ["not-due"]
    clock.now = datetime(2024, 5, 1, 6, 0, tzinfo=UTC)
    assert [o.action for o in schedule.run_due(cfg, clock=clock).outcomes] == ["ran"]
    clock.advance(minutes=5)
    assert [o.action for o in schedule.run_due(cfg, clock=clock).outcomes] == ["not-due"]
    clock.advance(days=3)  # downtime: three missed slots run once, not three times
    assert [o.action for o in schedule.run_due(cfg, clock=clock).outcomes] == ["ran"]
    assert [o.action for o in schedule.run_due(cfg, clock=clock).outcomes] == ["not-due"]
    assert len(runs_of(tmp_path / "out", "daily")) == 3
    state = json.loads((tmp_path / "out" / ".schedule" / "state.json").read_text())
    assert state["reports"]["daily"]["last_slot"] == "2024-05-04T06:00:00+00:00"
    index = (tmp_path / "out" / "index.html").read_text()
    assert index.count('<tr class="ok">') == 3 and "2024-05-03T06:00:00Z" in index


def test_one_failing_report_does_not_stop_the_others(tmp_path: Path, nbdir: Path) -> None:
    cfg = write_config(tmp_path, f"""
        out_dir = "out"
        [[reports]]
        name = "boom"
        notebook = "{nbdir / 'boom.ipynb'}"
        cron = "*/5 * * * *"
        [[reports]]
        name = "missing"
        notebook = "no_such_notebook"
        cron = "*/5 * * * *"
        [[reports]]
        name = "typo"
        notebook = "{nbdir / 'ok.ipynb'}"
        cron = "*/5 * * * *"
        params = {{ strat = "-1h" }}
        [[reports]]
        name = "fine"
        notebook = "{nbdir / 'ok.ipynb'}"
        cron = "*/5 * * * *"
        [[reports]]
        name = "off"
        notebook = "{nbdir / 'ok.ipynb'}"
        cron = "*/5 * * * *"
        enabled = false
    """)
    result = schedule.run_due(cfg, clock=FakeClock(T0))
    by = {o.name: o for o in result.outcomes}
    assert (by["boom"].status, by["missing"].status, by["typo"].status, by["fine"].status) == (
        "failed", "failed", "failed", "ok")
    assert by["off"].action == "disabled"
    assert result.exit_code == 1 and {o.name for o in result.failures} == {"boom", "missing", "typo"}
    assert "scheduled boom" in Path(by["boom"].html).read_text()  # the error cell is in the HTML
    assert "no report notebook named 'no_such_notebook'" in by["missing"].error
    assert "unknown parameter(s) ['strat']" in by["typo"].error
    index = (tmp_path / "out" / "index.html").read_text()
    assert index.count('<tr class="failed">') == 3 and index.count('<tr class="ok">') == 1
    # A failed slot is not retried every minute: the next run is at the next slot.
    again = schedule.run_due(cfg, clock=FakeClock(T0 + timedelta(minutes=1)))
    assert {o.action for o in again.outcomes} == {"not-due", "disabled"} and again.exit_code == 0


def test_runs_never_overlap_and_a_dead_holder_leaves_no_stale_lock(tmp_path: Path, nbdir: Path) -> None:
    cfg_path = write_config(tmp_path, f"""
        out_dir = "out"
        [[reports]]
        name = "busy"
        notebook = "{nbdir / 'ok.ipynb'}"
        cron = "* * * * *"
        [[reports]]
        name = "free"
        notebook = "{nbdir / 'ok.ipynb'}"
        cron = "* * * * *"
    """)
    cfg = schedule.load_config(cfg_path)
    lock = cfg.state_dir / "locks" / "busy.lock"
    lock.parent.mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import fcntl, sys, time
            f = open({str(lock)!r}, "a+")
            fcntl.flock(f, fcntl.LOCK_EX)
            f.write('{{"pid": 1, "host": "h", "since": "earlier"}}'); f.flush()
            print("locked", flush=True)
            time.sleep(120)
        """)], stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": ""},
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = schedule.run_due(cfg, clock=FakeClock(T0))
        by = {o.name: o for o in result.outcomes}
        assert by["busy"].action == "running" and "since earlier" in by["busy"].error
        assert by["free"].status == "ok" and result.exit_code == 0
        assert runs_of(tmp_path / "out", "busy") == []
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding the lock, like a crashed run
        holder.wait(timeout=30)
    assert lock.exists()  # the file stays, but the kernel released the lock with the process
    later = schedule.run_due(cfg, clock=FakeClock(T0 + timedelta(minutes=1)))
    assert {o.name: o.status for o in later.outcomes} == {"busy": "ok", "free": "ok"}


def test_concurrent_run_due_calls_run_a_slot_once(tmp_path: Path, nbdir: Path) -> None:
    cfg = schedule.load_config(write_config(tmp_path, f"""
        out_dir = "out"
        [[reports]]
        name = "once"
        notebook = "{nbdir / 'ok.ipynb'}"
        cron = "0 * * * *"
    """))
    results: list[schedule.DueResult] = []
    threads = [threading.Thread(target=lambda: results.append(schedule.run_due(cfg, clock=FakeClock(T0))))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    actions = sorted(o.action for r in results for o in r.outcomes)
    assert actions in (["not-due", "ran"], ["ran", "running"])
    assert len(runs_of(tmp_path / "out", "once")) == 1


# -- retention -----------------------------------------------------------------------------------


def _fake_run(report_dir: Path, when: datetime) -> Path:
    d = report_dir / when.strftime("%Y%m%dT%H%M%SZ")
    d.mkdir(parents=True)
    (d / "run.json").write_text(json.dumps({"name": report_dir.name, "status": "ok",
                                            "started_at": when.strftime("%Y-%m-%dT%H:%M:%SZ")}))
    return d


def test_retention_keeps_n_runs_and_n_days_and_never_the_newest(tmp_path: Path) -> None:
    rd = tmp_path / "rep"
    runs = [_fake_run(rd, T0 + timedelta(days=i)) for i in range(6)]  # days 0..5
    (rd / "notes").mkdir()  # not a run: never touched
    (rd / "20240101T000000Z").mkdir()  # looks like a run but has no run.json: never touched
    removed = schedule.apply_retention(rd, keep_runs=4, keep_days=None, now=T0 + timedelta(days=5))
    assert sorted(removed) == runs[:2]
    removed = schedule.apply_retention(rd, keep_runs=None, keep_days=2.5, now=T0 + timedelta(days=5))
    assert sorted(removed) == runs[2:3]  # day 2 is 3 days old; days 3..5 stay
    removed = schedule.apply_retention(rd, keep_runs=None, keep_days=1, now=T0 + timedelta(days=30))
    assert sorted(removed) == runs[3:5]  # everything is old, but the newest run stays
    assert sorted(p.name for p in rd.iterdir()) == sorted(["notes", "20240101T000000Z", runs[5].name])
    with pytest.raises(MeshlensError, match="not a meshlens report run"):
        reports.remove_run(rd / "notes")


def test_retention_applies_after_scheduled_runs(tmp_path: Path, nbdir: Path) -> None:
    cfg = write_config(tmp_path, f"""
        out_dir = "out"
        [[reports]]
        name = "hourly"
        notebook = "{nbdir / 'ok.ipynb'}"
        cron = "0 * * * *"
        keep_runs = 2
    """)
    clock = FakeClock(T0)
    for _ in range(3):
        schedule.run_due(cfg, clock=clock)
        clock.advance(hours=1)
    kept = runs_of(tmp_path / "out", "hourly")
    assert [p.name for p in kept] == ["20240501T060000Z", "20240501T070000Z"]
    assert (tmp_path / "out" / "index.html").read_text().count('<tr class="ok">') == 2


# -- serve and CLI -------------------------------------------------------------------------------


def test_serve_sleeps_until_the_next_slot_and_reports_failures(tmp_path: Path, nbdir: Path) -> None:
    cfg = write_config(tmp_path, f"""
        out_dir = "out"
        [[reports]]
        name = "tick"
        notebook = "{nbdir / 'ok.ipynb'}"
        cron = "*/10 * * * *"
        [[reports]]
        name = "boom"
        notebook = "{nbdir / 'boom.ipynb'}"
        cron = "0 0 1 1 *"
    """)
    clock = FakeClock(T0 + timedelta(minutes=3))
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock.advance(seconds=seconds)

    cycles: list[schedule.DueResult] = []
    code = schedule.serve(cfg, clock=clock, sleep=sleep, max_cycles=2, on_cycle=cycles.append)
    assert code == 1  # boom failed in the first cycle
    assert [[(o.name, o.action) for o in c.outcomes] for c in cycles] == [
        [("tick", "ran"), ("boom", "ran")], [("tick", "ran"), ("boom", "not-due")]]
    assert sum(slept) == 7 * 60 and max(slept) <= 60  # 05:03 -> 05:10, in steps of at most a minute
    assert cycles[1].outcomes[0].slot == "2024-05-01T05:10:00+00:00"


def test_cli_schedule_run_due_json_and_exit_code(tmp_path: Path, nbdir: Path) -> None:
    cfg = write_config(tmp_path, f"""
        out_dir = "out"
        [[reports]]
        name = "fine"
        notebook = "{nbdir / 'ok.ipynb'}"
        cron = "0 6 * * *"
        [[reports]]
        name = "boom"
        notebook = "{nbdir / 'boom.ipynb'}"
        cron = "0 6 * * *"
    """)
    app = Typer()

    @app.callback()
    def main() -> None:
        """meshlens (test harness)"""

    register(app)
    runner = CliRunner()
    res = runner.invoke(app, ["schedule", "run-due", "--config", str(cfg), "--only", "fine", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert [o["name"] for o in data["outcomes"]] == ["fine"] and data["index"] == [str(tmp_path / "out" / "index.html")]
    res = runner.invoke(app, ["schedule", "run-due", "--config", str(cfg), "--force"])
    assert res.exit_code == 1 and "boom: ran -> failed" in res.output and "fine: ran -> ok" in res.output
    res = runner.invoke(app, ["schedule", "run-due", "--config", str(cfg), "--only", "nope"])
    assert res.exit_code == 2 and "unknown report(s) ['nope']" in res.output


def test_config_examples_in_the_docs_are_valid(tmp_path: Path) -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "scheduling.md").read_text()
    blocks = [(k, b) for k, b in re.findall(r"```(toml|yaml)\n(.*?)```", doc, flags=re.S)
              if "apiVersion:" not in b]  # the Kubernetes manifests are not schedule files
    assert len(blocks) >= 3
    for kind, body in blocks:
        cfg = write_config(tmp_path, body, f"example.{kind}")
        loaded = schedule.load_config(cfg)
        assert loaded.reports and all(schedule.croniter.is_valid(r.cron) for r in loaded.reports)
    manifests = [b for k, b in re.findall(r"```(yaml)\n(.*?)```", doc, flags=re.S) if "kind: CronJob" in b]
    docs = list(schedule.yaml.safe_load_all(manifests[0]))
    config_map = next(d for d in docs if d["kind"] == "ConfigMap")
    cron_job = next(d for d in docs if d["kind"] == "CronJob")
    embedded = write_config(tmp_path, config_map["data"]["schedule.toml"], "embedded.toml")
    assert schedule.load_config(embedded).reports[0].notebook == "mesh_audit"
    command = cron_job["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:3] == ["meshlens", "schedule", "run-due"]


def test_outcomes_arrive_as_each_report_finishes_and_empty_is_not_a_failure(
    tmp_path: Path, nbdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    make_notebook(nbdir / "quiet.ipynb", 'db = ""\n', "from meshlens.notebook import NoEventsError\n"
                  "raise NoEventsError('no events in 2020-01-01 to 2020-01-02; the store holds 5 events from A to B')")
    make_notebook(nbdir / "said.ipynb", 'db = ""\n', "from meshlens import notebook as nb\nnb.finding('**3** denied')")
    from meshlens import demo

    monkeypatch.setattr(reports, "list_notebooks", lambda: {n: nbdir / f"{n}.ipynb" for n in ("said", "quiet", "ok")})
    lines: list[str] = []
    seen_dirs: list[bool] = []

    def echo(text: str) -> None:
        for line in text.splitlines():
            lines.append(line)
            seen_dirs.append((tmp_path / "out" / "quiet").exists())

    index = demo.run_all_reports(db=tmp_path / "none.duckdb", out=tmp_path / "out", echo=echo, progress=True)
    assert index == tmp_path / "out" / "index.html"
    ran = [ln for ln in lines if ln.startswith("  ")]
    assert [ln.split()[0] for ln in ran if not ln.startswith("      ")] == ["ok", "quiet", "said"]
    said = next(i for i, ln in enumerate(lines) if ln.startswith("  said"))
    assert lines[said + 1].strip() == "3 denied"  # its first finding, right under it
    assert "empty" in next(ln for ln in lines if ln.startswith("  quiet"))
    assert seen_dirs[lines.index(next(ln for ln in lines if ln.startswith("  ok")))] is False  # printed before the next ran
    assert "reports" in capsys.readouterr().err  # the tqdm bar

    cfg = write_config(tmp_path, f"""
        out_dir = "out2"
        [[reports]]
        name = "quiet"
        notebook = "{nbdir / 'quiet.ipynb'}"
        cron = "*/5 * * * *"
    """)
    got: list[schedule.Outcome] = []
    result = schedule.run_due(cfg, clock=FakeClock(T0), on_outcome=got.append)
    assert [o.status for o in got] == ["empty"] and result.exit_code == 0 and not result.failures
    assert got[0].findings[0].startswith("no events in 2020-01-01")
