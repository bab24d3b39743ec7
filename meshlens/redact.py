"""Redaction of secrets and PII before anything is stored: one rule set, two executions.

An audit store that keeps bearer tokens or customers' e-mail addresses becomes a liability, so the raw
text of every record (and the path/authority/user-agent columns cut from it) is redacted *on ingest*:
what ``events.raw`` holds is already clean. On by default; see :class:`RedactConfig` to configure.

Why two executions of the same rules:

* :func:`redact_sql` builds a DuckDB SQL expression (a chain of ``regexp_replace`` with RE2 patterns, plus
  a list/lambda pass for Luhn-checked card numbers and hashed IPs) so the bulk parsers redact whole
  batches vectorized, without a Python call per record;
* :func:`redact_text` applies the *same* patterns with Python's ``re`` for the record parsers and tests.

The patterns are written in the common subset of RE2 and Python ``re`` (no look-around, no
back-references, explicit ``[0-9]``/``[ \\t]`` instead of ``\\d``/``\\s``, whose Unicode meaning differs),
and ``tests/formats/test_redact.py`` checks that both executions agree on a corpus of realistic leaks.

What is redacted (each rule can be switched off):

* ``secrets``: JWTs; ``Bearer`` tokens anywhere; the value of credential-named parameters, headers and
  JSON fields (``password``, ``token``, ``api_key``, ``authorization``, ``cookie``, ``sig``...) in query
  strings, ``k=v``/``k: v`` text and ``"k": "v"`` / ``'k', 'v'`` pairs; ``user:password@`` in URLs;
  well-known API-key shapes (AWS, GitHub, GitLab, Slack, Google, Stripe);
* ``emails``: addresses, also URL-encoded (``%40``);
* ``cards``: 13-19 digit numbers starting 2-6 (plain or in 4-digit groups) that pass the Luhn check --
  the check keeps nanosecond timestamps and ids from being mistaken for cards;
* ``client_ip`` (off by default): ``truncate`` zeroes the last IPv4 octet (IPv6: keeps the /48) or
  ``hash`` replaces the address with ``ip-`` + 16 hex of a salted SHA-256 (the salt is required: an
  unsalted hash of a 32-bit address is trivially reversed).

Event ids are computed from the *unredacted* text, so switching a rule on or off never duplicates
events on re-ingest.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache

from meshlens.errors import ConfigError

RULE_SETS = ("secrets", "emails", "cards")
IP_MODES = ("keep", "truncate", "hash")

MASK = "[REDACTED]"
JWT_MASK = "[REDACTED-JWT]"
KEY_MASK = "[REDACTED-KEY]"
EMAIL_MASK = "[REDACTED-EMAIL]"
CARD_MASK = "[REDACTED-CARD]"

# Names whose value is a credential wherever they appear as key=value / key: value.
_NAMES = (
    "authorization|proxy-authorization|x-api-key|x-api-token|api-key|api_key|apikey|api-token|api_token|"
    "apitoken|x-auth-token|auth-token|auth_token|access_token|access-token|refresh_token|refresh-token|"
    "id_token|client_secret|client-secret|secret|secret_key|secret-key|password|passwd|pwd|passphrase|"
    "token|private_token|private-token|x-amz-security-token|x-amz-signature|x-amz-credential|"
    "x-goog-api-key|x-goog-signature|cookie|set-cookie|sessionid|session_id|session-id|jsessionid|"
    "phpsessid|sig|signature|key|code_verifier"
)
_VALUE_END = "[^ \\t\\r\\n\"',;&{}<>\\[\\]]"

# (RE2 pattern, RE2 replacement), applied in order. Keep each in the RE2 / Python ``re`` common subset.
_SECRET_RULES: tuple[tuple[str, str], ...] = (
    # JWT: three base64url parts, header and payload are JSON objects ("eyJ" = '{"')
    ("eyJ[A-Za-z0-9_-]{4,}\\.[A-Za-z0-9_-]{4,}\\.[A-Za-z0-9_-]*", JWT_MASK),
    # user:password@ in URLs
    ("([A-Za-z][A-Za-z0-9+.-]*://[^/ \\t\\r\\n:@\"']+:)[^/ \\t\\r\\n@\"']+@", "\\1" + MASK + "@"),
    # well-known API key shapes
    ("(AKIA|ASIA|ABIA|ACCA|A3T[A-Z0-9])[A-Z0-9]{16}", KEY_MASK),
    ("(gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{22,}|glpat-[A-Za-z0-9_-]{20,})", KEY_MASK),
    ("(xox[abprs]-[A-Za-z0-9-]{10,}|AIza[0-9A-Za-z_-]{35}|[rs]k_(live|test)_[0-9A-Za-z]{16,})", KEY_MASK),
    # Bearer <token> anywhere (also URL-encoded space)
    ("(?i)(^|[^A-Za-z0-9_])(bearer)( +|%20|\\+)[A-Za-z0-9._~+/=%-]{8,}", "\\1\\2\\3" + MASK),
    # "name": "value" (JSON) and 'name', 'value' (Envoy RBAC debug header dumps)
    ("(?i)([\"'](" + _NAMES + ")[\"'] *[:,=] *[\"'])([^\"'\\\\]|\\\\.)*", "\\1" + MASK),
    # name=value / name: value (query strings, headers, k=v logs); an auth scheme goes with the value
    ("(?i)(^|[^A-Za-z0-9_.-])(" + _NAMES + ")( *[:=] *)((bearer|basic|digest|negotiate|token) +)?"
     + _VALUE_END + "+", "\\1\\2\\3" + MASK),
)
_EMAIL_RULES: tuple[tuple[str, str], ...] = (
    ("[A-Za-z0-9._+-]+(@|%40)[A-Za-z0-9-]+(\\.[A-Za-z0-9-]+)*\\.[A-Za-z]{2,}", EMAIL_MASK),
)
# Card candidates (group 2): 13-19 digits, or 4-digit groups separated by one space/dash, or Amex 4-6-5.
# Every secret/e-mail rule's match contains one of these (case-insensitively): texts without any skip
# the whole regexp chain in one RE2 pass -- most access-log lines -- at no cost in what is found.
# A secret name only counts when a separator follows it, as both name rules require (``token=``,
# ``"password": ``, ``'authorization', ``): a bare word in a path (``/oauth/token``, ``/v1/keys/3``) does
# not run the chain -- on a simulated shop mesh 13 % of lines did so, for nothing, before this.
_TRIGGER_SECRETS = ("eyJ|@|AKIA|ASIA|ABIA|ACCA|A3T|gh[pousr]_|github_pat_|glpat-|xox[abprs]-|AIza|k_live_|"
                    "k_test_|bearer|(" + _NAMES + ")[\"']? *[:,=]")
_TRIGGER_EMAILS = "@|%40"
# Bounded on both sides by a non-word character other than '-' and '.', so digit groups inside
# UUIDs (x-request-id "f0b0ba2a-4592-4427-5980-1d98...") and dotted numbers are never candidates.
CARD_RE = ("(^|[^0-9A-Za-z_.-])([2-6]([0-9]{12,18}|[0-9]{3}[ -][0-9]{4}[ -][0-9]{4}[ -][0-9]{1,7}"
           "|[0-9]{3}[ -][0-9]{6}[ -][0-9]{5}))([^0-9A-Za-z_.-]|$)")
IPV4_RE = "(^|[^0-9.])([0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}\\.)([0-9]{1,3})"
IPV6_HEAD_RE = "^([0-9A-Fa-f]{0,4}:[0-9A-Fa-f]{0,4}:[0-9A-Fa-f]{0,4})(:.*)?$"


@dataclass(frozen=True)
class RedactConfig:
    """What to redact. ``RedactConfig()`` is the default (secrets, e-mails and cards; IPs kept).

    ``client_ip``: ``keep`` | ``truncate`` | ``hash`` (``hash`` needs ``ip_salt``). ``ip_salt`` never
    appears in ``repr`` (it is a secret: with it, hashed IPs can be reversed by enumeration).
    """

    enabled: bool = True
    rules: frozenset[str] = frozenset(RULE_SETS)
    client_ip: str = "keep"
    ip_salt: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        unknown = set(self.rules) - set(RULE_SETS)
        if unknown:
            raise ConfigError(f"unknown redaction rule(s) {sorted(unknown)}; choose from {', '.join(RULE_SETS)}")
        if self.client_ip not in IP_MODES:
            raise ConfigError(f"client_ip redaction {self.client_ip!r} is not one of {', '.join(IP_MODES)}")
        if self.client_ip == "hash" and not self.ip_salt:
            raise ConfigError("client_ip='hash' needs a salt (MESHLENS_REDACT_IP_SALT): an unsalted hash "
                              "of an IPv4 address is reversed by trying all 2^32 addresses")

    @classmethod
    def disabled(cls) -> RedactConfig:
        return cls(enabled=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> RedactConfig:
        """Read ``MESHLENS_REDACT`` (``on``/``off``), ``MESHLENS_REDACT_RULES`` (comma list of
        secrets,emails,cards), ``MESHLENS_REDACT_CLIENT_IP`` (keep/truncate/hash) and
        ``MESHLENS_REDACT_IP_SALT`` -- environment, not notebook parameters, so a salt is never shown."""
        env = os.environ if env is None else env
        onoff = env.get("MESHLENS_REDACT", "on").strip().lower()
        if onoff not in ("on", "off", "1", "0", "true", "false", "yes", "no"):
            raise ConfigError(f"MESHLENS_REDACT={onoff!r}: use on or off")
        rules_txt = env.get("MESHLENS_REDACT_RULES")
        rules = frozenset(r.strip() for r in rules_txt.split(",") if r.strip()) if rules_txt is not None \
            else frozenset(RULE_SETS)
        return cls(enabled=onoff in ("on", "1", "true", "yes"), rules=rules,
                   client_ip=env.get("MESHLENS_REDACT_CLIENT_IP", "keep").strip().lower(),
                   ip_salt=env.get("MESHLENS_REDACT_IP_SALT") or None)


DEFAULT = RedactConfig()


def _trigger(cfg: RedactConfig) -> str | None:
    parts = [t for rule, t in (("secrets", _TRIGGER_SECRETS), ("emails", _TRIGGER_EMAILS)) if rule in cfg.rules]
    return "(?i)(" + "|".join(parts) + ")" if parts else None


def _rules(cfg: RedactConfig) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    if "secrets" in cfg.rules:
        out.extend(_SECRET_RULES)
    if "emails" in cfg.rules:
        out.extend(_EMAIL_RULES)
    return out


# ---------------------------------------------------------------------------------------------- SQL
def _lit(s: str) -> str:
    """A SQL string literal (single quotes doubled; DuckDB keeps backslashes literally)."""
    return "'" + s.replace("'", "''") + "'"


def _luhn_sql(c: str) -> str:
    digits = f"regexp_replace({c}, '[^0-9]', '', 'g')"
    dig = "CAST(ml_d[length(ml_d) - ml_i] AS INTEGER)"
    return (f"list_transform([{digits}], lambda ml_d: list_sum(list_transform(range(length(ml_d)), "
            f"lambda ml_i: CASE WHEN ml_i % 2 = 0 THEN {dig} "
            f"ELSE [0, 2, 4, 6, 8, 1, 3, 5, 7, 9][{dig} + 1] END)) % 10 = 0)[1]")


def _replace_each_sql(s: str, cands: str, repl: str) -> str:
    """``s`` with every candidate (a list expression) replaced by ``repl(c)`` in list order."""
    return (f"list_reduce(list_prepend({s}, {cands}), "
            f"lambda ml_a, ml_c: replace(ml_a, ml_c, {repl}))")


def _ip_hash_sql(x: str, salt: str) -> str:
    return f"'ip-' || left(sha256({_lit(salt + '|')} || {x}), 16)"


def redact_sql(expr: str, cfg: RedactConfig | None = None) -> str:
    """A DuckDB expression: the free text ``expr`` (raw line, path, authority, user agent) redacted.

    Use it in a projection, e.g. ``f"{redact_sql('line')} AS raw"``. NULL stays NULL. The expression
    embeds only constant patterns (and the IP salt, quoted), never data.
    """
    cfg = cfg or DEFAULT
    if not cfg.enabled:
        return expr
    out = "ml_s"
    for pat, repl in _rules(cfg):
        out = f"regexp_replace({out}, {_lit(pat)}, {_lit(repl)}, 'g')"
    trigger = _trigger(cfg)
    if trigger:  # bind the input once (a one-element list lambda), run the chain only on candidates
        out = (f"list_transform([{expr}], lambda ml_s: CASE WHEN regexp_matches(ml_s, {_lit(trigger)}) "
               f"THEN {out} ELSE ml_s END)[1]")
    else:
        out = expr
    if "cards" in cfg.rules:
        cands = (f"list_filter(regexp_extract_all(ml_s, {_lit(CARD_RE)}, 2), "
                 f"lambda ml_c: {_luhn_sql('ml_c')})")
        out = (f"list_transform([{out}], lambda ml_s: CASE WHEN ml_s IS NULL OR NOT regexp_matches(ml_s, "
               f"{_lit(CARD_RE)}) THEN ml_s ELSE {_replace_each_sql('ml_s', cands, _lit(CARD_MASK))} END)[1]")
    if cfg.client_ip == "truncate":
        out = f"regexp_replace({out}, {_lit(IPV4_RE)}, '\\1\\20', 'g')"
    elif cfg.client_ip == "hash":
        assert cfg.ip_salt is not None
        # longest first, so 10.0.0.1 never rewrites part of 10.0.0.12
        ips = (f"list_transform(regexp_extract_all(ml_s, {_lit(IPV4_RE)}, 0), lambda ml_c: "
               "CASE WHEN regexp_matches(ml_c, '^[0-9]') THEN ml_c ELSE ml_c[2:] END)")
        keyed = f"list_transform({ips}, lambda ml_c: lpad(CAST(length(ml_c) AS VARCHAR), 2, '0') || ml_c)"
        cands = f"list_transform(list_sort({keyed}, 'DESC'), lambda ml_c: ml_c[3:])"
        out = (f"list_transform([{out}], lambda ml_s: CASE WHEN ml_s IS NULL OR NOT regexp_matches(ml_s, "
               f"{_lit(IPV4_RE)}) THEN ml_s ELSE "
               f"{_replace_each_sql('ml_s', cands, _ip_hash_sql('ml_c', cfg.ip_salt))} END)[1]")
    if cfg.client_ip == "keep":
        # Most records hold nothing to redact: one DFA scan of a combined pattern skips the per-row
        # list/lambda machinery above for them (several times faster on typical access logs).
        combined = prefilter_pattern(cfg)
        if combined:
            out = f"CASE WHEN NOT regexp_matches({expr}, {_lit(combined)}) THEN {expr} ELSE {out} END"
    return out


def prefilter_pattern(cfg: RedactConfig | None = None) -> str | None:
    """One RE2 pattern that every text needing redaction under ``cfg``'s secret/e-mail/card rules
    matches (None if those rules are off): a text it does not match is stored as it is."""
    cfg = cfg or DEFAULT
    pats = [p for p in (_trigger(cfg), CARD_RE if "cards" in cfg.rules else None) if p]
    if not pats:
        return None
    return "|".join(f"(?:{p})" if not p.startswith("(?i)") else f"(?i:{p[4:]})" for p in pats)


def ip_sql(expr: str, cfg: RedactConfig | None = None) -> str:
    """A DuckDB expression for an IP-only column (``src_ip``): kept, truncated or hashed whole."""
    cfg = cfg or DEFAULT
    if not cfg.enabled or cfg.client_ip == "keep":
        return expr
    if cfg.client_ip == "hash":
        assert cfg.ip_salt is not None
        return f"CASE WHEN {expr} IS NULL OR {expr} = '' THEN {expr} ELSE {_ip_hash_sql(expr, cfg.ip_salt)} END"
    return (f"CASE WHEN contains({expr}, ':') THEN regexp_replace({expr}, {_lit(IPV6_HEAD_RE)}, '\\1::') "
            f"ELSE regexp_replace({expr}, {_lit(IPV4_RE)}, '\\1\\20') END")


# ------------------------------------------------------------------------------------------- Python
def _py_repl(repl: str) -> str:
    # RE2 `\1` -> Python `\g<1>` so that `\20` means "group 2, then 0" in both
    return re.sub(r"\\(\d)", r"\\g<\1>", repl)


@lru_cache(maxsize=64)
def _compiled(cfg: RedactConfig) -> list[tuple[re.Pattern[str], str]]:
    return [(re.compile(p), _py_repl(r)) for p, r in _rules(cfg)]


@lru_cache(maxsize=64)
def _trigger_rx(cfg: RedactConfig) -> re.Pattern[str] | None:
    t = _trigger(cfg)
    return re.compile(t) if t else None


_CARD = re.compile(CARD_RE)
_IPV4 = re.compile(IPV4_RE)
_IPV6_HEAD = re.compile(IPV6_HEAD_RE)


def luhn_ok(number: str) -> bool:
    """The Luhn checksum over the digits of ``number``."""
    digits = [int(ch) for ch in number if "0" <= ch <= "9"]
    total = 0
    for i, d in enumerate(reversed(digits)):
        total += d if i % 2 == 0 else (d * 2) // 10 + (d * 2) % 10
    return total % 10 == 0


def _ip_hash(ip: str, salt: str) -> str:
    return "ip-" + hashlib.sha256((salt + "|" + ip).encode()).hexdigest()[:16]


def redact_text(text: str | None, cfg: RedactConfig | None = None) -> str | None:
    """``text`` redacted exactly as :func:`redact_sql` does it in DuckDB."""
    cfg = cfg or DEFAULT
    if text is None or not cfg.enabled:
        return text
    trigger = _trigger_rx(cfg)
    if trigger is not None and trigger.search(text):
        for rx, repl in _compiled(cfg):
            text = rx.sub(repl, text)
    if "cards" in cfg.rules:
        for m in [m.group(2) for m in _CARD.finditer(text)]:
            if luhn_ok(m):
                text = text.replace(m, CARD_MASK)
    if cfg.client_ip == "truncate":
        text = _IPV4.sub(r"\g<1>\g<2>0", text)
    elif cfg.client_ip == "hash":
        assert cfg.ip_salt is not None
        found = [m.group(2) + m.group(3) for m in _IPV4.finditer(text)]
        for ip in sorted(found, key=lambda s: f"{len(s):02d}{s}", reverse=True):
            text = text.replace(ip, _ip_hash(ip, cfg.ip_salt))
    return text


def redact_ip(ip: str | None, cfg: RedactConfig | None = None) -> str | None:
    """``ip`` (an address column value) as :func:`ip_sql` leaves it."""
    cfg = cfg or DEFAULT
    if ip is None or not cfg.enabled or cfg.client_ip == "keep":
        return ip
    if cfg.client_ip == "hash":
        assert cfg.ip_salt is not None
        return ip if ip == "" else _ip_hash(ip, cfg.ip_salt)
    if ":" in ip:
        return _IPV6_HEAD.sub(r"\g<1>::", ip)
    return _IPV4.sub(r"\g<1>\g<2>0", ip)
