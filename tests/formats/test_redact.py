"""Redaction: realistic leaks are removed, SQL and Python executions agree, benign text is untouched,
and what the store holds after an ingest is the redacted text."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import duckdb
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshlens.errors import ConfigError
from meshlens.ingest import ingest_files
from meshlens.redact import DEFAULT, RedactConfig, ip_sql, luhn_ok, redact_ip, redact_sql, redact_text
from meshlens.store import open_store

JWT = ("eyJhbGciOiJSUzI1NiIsImtpZCI6IjEyMyJ9.eyJzdWIiOiJhbGljZUBleGFtcGxlLmNvbSIsImV4cCI6MTcwMDAwMDAwMH0."
       "c2lnbmF0dXJlLWJ5dGVzLWhlcmUtMTIzNDU2Nzg5MA")
CARD = "4111111111111111"        # Visa test number (Luhn-valid)
CARD_GROUPED = "5500 0000 0000 0004"  # Mastercard test number in groups
AMEX = "3782-822463-10005"
# Every (text, secret that must disappear) pair is a leak seen in real access/audit logs.
LEAKS: list[tuple[str, str]] = [
    ('[2024-05-01T10:00:00.000Z] "GET /api/v1/login?user=bob&password=hunter2 HTTP/1.1" 200 - via_upstream - '
     '"-" 0 12 3 2 "-" "curl/8.0" "req-1" "shop:8080" "10.0.0.5:8080" outbound|8080||shop.default.svc.'
     'cluster.local 10.0.0.4:5000 10.0.0.5:8080 10.0.0.4:4000 - default', "hunter2"),
    ("GET /oauth/callback?code=abc&access_token=ya29.a0AfH6SMBx-secret-token HTTP/2", "ya29.a0AfH6SMBx-secret-token"),
    ("/v1/objects?X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20240501&X-Amz-Signature=deadbeefcafe1234", "deadbeefcafe1234"),
    ("/v1/objects?X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20240501", "AKIAIOSFODNN7EXAMPLE"),
    (f"authorization: Bearer {JWT}", JWT),
    (f"Authorization: Bearer {JWT}", "c2lnbmF0dXJlLWJ5dGVzLWhlcmUtMTIzNDU2Nzg5MA"),
    ("Authorization: Bearer s3cr3t-opaque-token-value", "s3cr3t-opaque-token-value"),
    ("proxy-authorization: Basic dXNlcjpwYXNzd29yZA==", "dXNlcjpwYXNzd29yZA=="),
    ("headers: ':authority', 'shop', 'authorization', 'Basic YWxpY2U6czNjcmV0', 'x-request-id', 'r1'",
     "YWxpY2U6czNjcmV0"),
    ('{"authority":"shop","path":"/pay","x-api-key":"sk_live_51H8abcdefghijklmnop","code":200}',
     "sk_live_51H8abcdefghijklmnop"),
    ('{"kind":"Event","requestObject":{"password":"p@ss\\"word!","user":"alice"}}', "p@ss"),
    ("cookie: session=abc123def456; theme=dark", "abc123def456"),
    ("/app;jsessionid=0123456789ABCDEF0123456789ABCDEF?page=2", "0123456789ABCDEF0123456789ABCDEF"),
    ("GET https://admin:Winter2024!@registry.internal/v2/ HTTP/1.1", "Winter2024!"),
    ("clone https://x:ghp_aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789@github.com/o/r", "ghp_aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789"),
    ("token ghp_aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789 used", "ghp_aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789"),
    ("slack hook xoxb-123456789012-abcdefABCDEF", "xoxb-123456789012-abcdefABCDEF"),
    ("maps?key=AIzaSyA1234567890abcdefghijklmnopqrstuv", "AIzaSyA1234567890abcdefghijklmnopqrstuv"),
    ("GET /users/alice.smith@example.com/profile HTTP/1.1", "alice.smith@example.com"),
    ("GET /reset?email=bob.jones%40corp.example.io HTTP/1.1", "bob.jones%40corp.example.io"),
    (f"POST /checkout?card={CARD}&cvv=123", CARD),
    (f"payment card {CARD_GROUPED} declined", CARD_GROUPED),
    (f"amex {AMEX} ok", AMEX),
    ("GET /api?api_key=0123456789abcdef&x=1", "0123456789abcdef"),
    ("x-auth-token: 9f8e7d6c5b4a", "9f8e7d6c5b4a"),
    ("client_secret=Zm9vYmFyYmF6&grant_type=client_credentials", "Zm9vYmFyYmF6"),
    ("rbac debug: token=abc.def.ghi user=alice", "abc.def.ghi"),
]
# Benign text that must come out unchanged (no false positives on what the analyses rely on).
BENIGN = [
    '[2020-11-25T21:26:18.409Z] "GET /status/418 HTTP/1.1" 418 - via_upstream - "-" 0 135 4 4 "-" '
    '"curl/7.73.0-DEV" "84961386-6d84-929d-98bd-c5aee93b5c88" "httpbin:8000" "10.44.1.27:80" '
    "outbound|8000||httpbin.foo.svc.cluster.local 10.44.1.23:37652 10.0.45.184:8000 10.44.1.23:46520 - default",
    '{"start_time":"2024-01-01T00:00:00Z","ts_ns":1700000000123456789,"trace_id":"4bf92f3577b34da6a3ce929d0e0e4736"}',
    "spiffe://cluster.local/ns/default/sa/bookinfo-productpage",
    "GET /api/v1/orders/4111111111111112 HTTP/1.1",  # fails Luhn: an order id, not a card
    "span 5000000000000000000 id 1700000000000 duration 63",
    "user-agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/120.0.0.0 Safari/537.36",
    "the bearer of bad news; basic auth disabled; tokens: 3",
]


def _sql_all(texts: list[str | None], cfg: RedactConfig = DEFAULT) -> list[str | None]:
    con = duckdb.connect()
    con.execute("CREATE TABLE t (i INTEGER, raw VARCHAR)")
    con.executemany("INSERT INTO t VALUES (?, ?)", list(enumerate(texts)))
    return [r[0] for r in con.execute(f"SELECT {redact_sql('raw', cfg)} FROM t ORDER BY i").fetchall()]


@pytest.mark.parametrize(("text", "secret"), LEAKS, ids=[f"leak{i}" for i in range(len(LEAKS))])
def test_leak_removed_by_python_and_sql(text: str, secret: str) -> None:
    py = redact_text(text)
    assert secret not in py, py
    assert "REDACTED" in py
    assert _sql_all([text]) == [py]


def test_sql_and_python_agree_on_whole_corpus_every_config() -> None:
    texts: list[str | None] = [t for t, _ in LEAKS] + BENIGN + [None, "", "10.0.0.1 to 10.0.0.12 and 110.0.0.1"]
    for cfg in (DEFAULT, RedactConfig(rules=frozenset({"cards"})), RedactConfig(client_ip="truncate"),
                RedactConfig(client_ip="hash", ip_salt="pepper'; DROP TABLE t; --")):
        assert _sql_all(texts, cfg) == [redact_text(t, cfg) for t in texts], cfg


def test_benign_text_untouched() -> None:
    assert [redact_text(t) for t in BENIGN] == BENIGN
    assert _sql_all(list(BENIGN)) == BENIGN


def test_luhn() -> None:
    assert luhn_ok(CARD) and luhn_ok(CARD_GROUPED) and luhn_ok(AMEX)
    assert not luhn_ok("4111111111111112")


def test_disabled_and_rule_subsets() -> None:
    text = f"password=x1y2z3 mail a@b.example card {CARD}"
    assert redact_text(text, RedactConfig.disabled()) == text
    assert redact_sql("raw", RedactConfig.disabled()) == "raw"
    only_cards = redact_text(text, RedactConfig(rules=frozenset({"cards"})))
    assert "x1y2z3" in only_cards and "a@b.example" in only_cards and CARD not in only_cards


def test_from_env() -> None:
    assert RedactConfig.from_env({}) == DEFAULT
    assert not RedactConfig.from_env({"MESHLENS_REDACT": "off"}).enabled
    cfg = RedactConfig.from_env({"MESHLENS_REDACT_RULES": "secrets", "MESHLENS_REDACT_CLIENT_IP": "hash",
                                 "MESHLENS_REDACT_IP_SALT": "s"})
    assert cfg.rules == frozenset({"secrets"}) and cfg.client_ip == "hash"
    assert "s" not in repr(cfg).split("client_ip")[1].replace("'hash'", "")  # salt not in repr
    with pytest.raises(ConfigError, match="salt"):
        RedactConfig(client_ip="hash")
    with pytest.raises(ConfigError, match="unknown redaction rule"):
        RedactConfig.from_env({"MESHLENS_REDACT_RULES": "secrets,ssn"})
    with pytest.raises(ConfigError, match="MESHLENS_REDACT"):
        RedactConfig.from_env({"MESHLENS_REDACT": "maybe"})


def test_ip_column_modes_agree() -> None:
    ips = ["10.44.1.23", "2001:db8:85a3:8d3:1319:8a2e:370:7348", "", None]
    con = duckdb.connect()
    for cfg in (DEFAULT, RedactConfig(client_ip="truncate"), RedactConfig(client_ip="hash", ip_salt="k")):
        got = [con.execute(f"SELECT {ip_sql('x', cfg)} FROM (SELECT ?::VARCHAR AS x)", [ip]).fetchone()[0]
               for ip in ips]
        assert got == [redact_ip(ip, cfg) for ip in ips]
    assert redact_ip("10.44.1.23", RedactConfig(client_ip="truncate")) == "10.44.1.0"
    assert redact_ip("2001:db8:85a3:8d3::1", RedactConfig(client_ip="truncate")) == "2001:db8:85a3::"
    h1 = redact_ip("10.44.1.23", RedactConfig(client_ip="hash", ip_salt="a"))
    h2 = redact_ip("10.44.1.23", RedactConfig(client_ip="hash", ip_salt="b"))
    assert h1 != h2 and h1.startswith("ip-") and "10.44" not in h1


_FRAGMENTS = [t for t, _ in LEAKS] + BENIGN + [" ", "&", "?", "=", ": ", '"', "'", "\\", "\n", "é", "%40", "@"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(st.sampled_from(_FRAGMENTS), st.text(max_size=12)), max_size=6))
def test_sql_and_python_agree_on_mixtures(parts: list[str]) -> None:
    text = "".join(parts)
    assert _sql_all([text]) == [redact_text(text)]


def test_ingested_store_holds_redacted_text_and_ids_are_stable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """End to end: events.raw/path/user_agent and rejects.raw/reason carry no secret; event ids do not
    depend on the redaction setting (re-ingesting with it switched off adds no duplicates)."""
    lines = [
        f'[2024-05-01T10:00:0{i}.000Z] "GET /login?user=a&password=hunter{i}&mail=eve{i}@example.com HTTP/1.1" '
        f'200 - via_upstream - "-" 0 12 3 2 "-" "curl/8 token={JWT}" "req-{i}" "shop:8080" "10.0.0.5:8080" '
        "outbound|8080||shop.default.svc.cluster.local 10.0.0.4:5000 10.0.0.5:8080 10.0.0.4:4000 - default"
        for i in range(5)
    ] + [f"garbage line with password=hunter9 and card {CARD}",
         json.dumps({"apiVersion": "audit.k8s.io/v1", "kind": "Event", "level": "Request", "auditID": "x",
                     "stage": "ResponseComplete", "requestURI": f"/api/v1/secrets?token={JWT}", "verb": "get",
                     "user": {"username": "alice"}, "requestReceivedTimestamp": "2024-05-01T10:00:00Z",
                     "stageTimestamp": "2024-05-01T10:00:00Z", "objectRef": {"resource": "secrets"},
                     "userAgent": "kubectl Authorization: Bearer opaque-tok-123456789"})]
    f = tmp_path / "leaky.log.gz"
    f.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    db = tmp_path / "s.duckdb"
    counts = ingest_files(db, [f], progress=False)
    assert counts.read == len(lines) and counts.stored + counts.rejects == len(lines) and counts.rejects >= 1
    with open_store(db) as s:
        dump = s.query("SELECT * FROM events").to_json(date_format="iso") + s.query("SELECT * FROM rejects").to_json(date_format="iso")
        ids = set(s.query("SELECT event_id FROM events")["event_id"])
    for secret in ["hunter", "@example.com", JWT[:40], CARD, "opaque-tok-123456789"]:
        assert secret not in dump, secret
    monkeypatch.setenv("MESHLENS_REDACT", "off")
    again = ingest_files(db, [f], progress=False)
    assert again.stored == 0 and again.duplicates == counts.stored
    with open_store(db) as s:
        assert set(s.query("SELECT event_id FROM events")["event_id"]) == ids


def test_report_built_from_leaky_logs_carries_no_secret_or_pii(tmp_path: Path) -> None:
    """Secrets and PII that were in the logs (not configured anywhere, so the report's own secret scan
    cannot know them) never reach the executed notebook or the HTML: redaction happened on ingest."""
    from meshlens import reports

    secret, mail, jwt_sig = "Zx9-leaked-api-key-77", "carol.danvers@example.org", JWT.rsplit(".", 1)[1]
    lines = [
        f'[2024-05-01T10:00:{i:02d}.000Z] "GET /admin/export?api_key={secret}&owner={mail} HTTP/1.1" '
        f'{403 if i % 2 else 200} - {"rbac_access_denied_matched_policy[none]" if i % 2 else "via_upstream"} - '
        f'"-" 0 12 3 2 "-" "curl/8 Authorization: Bearer {JWT}" "req-{i}" "shop:8080" "10.0.0.5:8080" '
        "outbound|8080||shop.default.svc.cluster.local 10.0.0.4:5000 10.0.0.5:8080 10.0.0.4:4000 - default"
        for i in range(40)]
    f = tmp_path / "leaky.log"
    f.write_text("\n".join(lines) + "\n")
    db = tmp_path / "s.duckdb"
    ingest_files(db, [f], progress=False)
    r = reports.run_report("mesh_audit", db, {}, tmp_path / "out", timeout_s=300)
    assert r.status == "ok", r.error
    text = "\n".join(p.read_text(errors="replace") for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert "/admin/export" in text, "the leaky requests are not in the report; the scan proved nothing"
    for leaked in (secret, mail, "carol.danvers", jwt_sig, JWT[:30]):
        assert leaked not in text, leaked


def test_request_ids_are_never_mistaken_for_cards() -> None:
    """A UUID's digit groups can pass the Luhn check; they must not be redacted (found on Loki ids)."""
    import duckdb

    from meshlens.redact import RedactConfig, redact_sql, redact_text

    line = '"f0b0ba2a-4592-4427-5980-1d98c5aee93b" card 4111 1111 1111 1111 end'
    want = '"f0b0ba2a-4592-4427-5980-1d98c5aee93b" card [REDACTED-CARD] end'
    assert redact_text(line, RedactConfig()) == want
    con = duckdb.connect()
    sql = f"SELECT {redact_sql('x', RedactConfig())} FROM (SELECT ?::VARCHAR AS x)"
    assert con.execute(sql, [line]).fetchall()[0][0] == want


def _ungated(text: str) -> str:
    """``redact_text`` with a trigger that matches everything: every rule runs on every text."""
    import re
    from unittest import mock

    with mock.patch("meshlens.redact._trigger_rx", lambda cfg: re.compile("")):
        return redact_text(text)  # type: ignore[return-value]


_NAME_FRAGMENTS = ["token", "Token", "key", "sig", "password", "authorization", "cookie", "secret", "bearer",
                   "/oauth/token", "/v1/keys/", '"', "'", " ", ":", "=", ",", "  ", "abcdefgh12345678", "x-"]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(st.sampled_from(_NAME_FRAGMENTS + _FRAGMENTS), st.text(max_size=8)), max_size=8))
def test_trigger_never_hides_a_match(parts: list[str]) -> None:
    """The one-pass trigger skips the regexp chain for most lines; it must be a superset of every rule's
    matches (secret names count only with a separator after them: ``/oauth/token`` is not a secret)."""
    text = "".join(parts)
    assert redact_text(text) == _ungated(text)
    assert _sql_all([text]) == [redact_text(text)]


def test_secret_names_in_paths_do_not_run_the_chain() -> None:
    import re

    from meshlens.redact import prefilter_pattern

    pf = re.compile(prefilter_pattern(DEFAULT))
    for benign in ('"POST /v1/token/verify HTTP/1.1"', "/api/v1/keys/42", "GET /signature-pad.js", "secretariat"):
        assert not pf.search(benign), benign
    for leak, secret in LEAKS:
        assert pf.search(leak), leak
        assert secret not in redact_text(leak)
