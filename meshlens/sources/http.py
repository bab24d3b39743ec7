"""The one HTTP helper shared by the Loki and Elasticsearch sources: session, TLS, auth, retries.

Why one module: retry, backoff and credential handling are easy to get subtly wrong (retrying a 401
forever, logging a token, hammering a server that asked for ``Retry-After``), so they live in one place
that both sources use and one test suite pins.

Behaviour of :meth:`HttpClient.request`:

* connection errors, timeouts and bodies cut off mid-transfer (``ChunkedEncodingError``) and the
  ``retry_statuses`` (default 429/500/502/503/504) are retried up to ``max_retries`` times with
  exponential backoff and *full jitter* (a random delay in ``[0, min(max, base * 2**attempt)]``, so
  parallel workers do not retry in lock-step); a ``Retry-After`` header (seconds or HTTP date) is
  honoured instead of the computed delay;
* 401/403 raise :class:`~meshlens.errors.AuthError` at once -- retrying bad credentials only gets
  accounts locked -- with the product, URL, status and the server's own message;
* a TLS verification failure raises :class:`~meshlens.errors.SourceError` at once (it is configuration,
  not a transient fault) with a hint about ``--ca-cert``/``--insecure``;
* any other 4xx is *returned* for the caller to classify (Loki's 400 "query too large" means "split the
  query", not "give up");
* when retries are exhausted, :class:`~meshlens.errors.SourceError` with ``resumable=True`` is raised:
  whatever the caller already committed is kept and a re-run with ``--resume`` continues.

Thread safety: ``requests.Session`` is not documented as thread-safe, so the client keeps **one session
per thread** (``threading.local``), each with its own connection pool. Worker threads can share one
:class:`HttpClient`; :meth:`HttpClient.close` closes every session it created.

Secrets (password, bearer token, API key, sensitive headers) are never logged, never part of
``repr()``, :meth:`HttpConfig.redacted` or :meth:`HttpConfig.identity`.
"""

from __future__ import annotations

import email.utils
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import requests
from requests.adapters import HTTPAdapter

from meshlens.errors import AuthError, ConfigError, SourceError
from meshlens.secrets import resolve_secret

log = logging.getLogger("meshlens.http")

DEFAULT_RETRY_STATUSES: tuple[int, ...] = (429, 500, 502, 503, 504)
USER_AGENT = "meshlens (+https://github.com/meshlens)"
_SENSITIVE_HEADER_PARTS = ("auth", "token", "key", "secret", "password", "cookie", "session")
_MAX_RETRY_AFTER_S = 600.0
_TRANSIENT_ERRORS: tuple[type[Exception], ...] = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
    requests.exceptions.ContentDecodingError,
)


def _is_sensitive_header(name: str) -> bool:
    low = name.lower()
    return any(part in low for part in _SENSITIVE_HEADER_PARTS)


def _strip_userinfo(url: str) -> tuple[str, str | None, str | None]:
    """Split ``https://user:pass@host/x`` into (``https://host/x``, user, pass)."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url, None, None
    host = parts.hostname or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    clean = urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    return clean, user, password


@dataclass
class HttpConfig:
    """Where a backend is and how to authenticate to it.

    Secrets are excluded from ``repr()`` so a config printed in a notebook or a traceback leaks nothing.
    Credentials embedded in the URL (``https://user:pass@host``) are moved into ``username``/``password``
    so the URL itself is safe to show.
    """

    url: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    bearer_token: str | None = field(default=None, repr=False)
    api_key: str | None = field(default=None, repr=False)  # sent as "Authorization: ApiKey <key>" (ES)
    headers: dict[str, str] = field(default_factory=dict, repr=False)
    ca_cert: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    verify: bool = True
    timeout_s: float = 60
    max_retries: int = 8
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30

    def __post_init__(self) -> None:
        if not self.url:
            raise ConfigError("no server URL given; pass --url (e.g. http://loki:3100 or https://es:9200)")
        url = self.url.strip()
        if "://" not in url:
            raise ConfigError(f"server URL {url!r} has no scheme; use e.g. http://{url} or https://{url}")
        clean, user, password = _strip_userinfo(url)
        if user is not None and self.username is None:
            self.username = user
        if password is not None and self.password is None:
            self.password = password
        # keyring:/file: references resolve here, so every source gets the OS keyring the same way
        self.password = resolve_secret(self.password, "password")
        self.bearer_token = resolve_secret(self.bearer_token, "bearer token")
        self.api_key = resolve_secret(self.api_key, "API key")
        self.url = clean.rstrip("/")
        methods = [
            name
            for name, on in (
                ("basic auth (username/password)", self.username is not None or self.password is not None),
                ("bearer token", bool(self.bearer_token)),
                ("API key", bool(self.api_key)),
            )
            if on
        ]
        if len(methods) > 1:
            raise ConfigError(
                f"more than one authentication method configured ({', '.join(methods)}); use only one"
            )
        if self.client_key and not self.client_cert:
            raise ConfigError("--key (client key) given without --cert (client certificate)")
        if self.max_retries < 0:
            raise ConfigError(f"max_retries must be >= 0, got {self.max_retries}")

    def identity(self) -> str:
        """The URL without userinfo, query or fragment: safe for source ids, logs and reports."""
        parts = urlsplit(self.url)
        return urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))

    def auth_method(self) -> str:
        if self.bearer_token:
            return "bearer"
        if self.api_key:
            return "api_key"
        if self.username is not None or self.password is not None:
            return "basic"
        return "none"

    def redacted(self) -> dict[str, Any]:
        """A JSON-able description of the config with every secret replaced by ``"***"``."""
        return {
            "url": self.identity(),
            "auth": self.auth_method(),
            "username": self.username,
            "password": "***" if self.password else None,
            "bearer_token": "***" if self.bearer_token else None,
            "api_key": "***" if self.api_key else None,
            "headers": {k: ("***" if _is_sensitive_header(k) else v) for k, v in self.headers.items()},
            "ca_cert": self.ca_cert,
            "client_cert": self.client_cert,
            "client_key": self.client_key,
            "verify": self.verify,
            "timeout_s": self.timeout_s,
            "max_retries": self.max_retries,
        }


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date), or None."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        dt = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if dt is None:
        return None
    return max(0.0, dt.timestamp() - (time.time() if now is None else now))


def _server_message(resp: requests.Response, limit: int = 500) -> str:
    """The server's error text (plain text or JSON), shortened for a one-line message."""
    try:
        text = resp.text
    except Exception:  # noqa: BLE001 - a broken body must not hide the status
        text = ""
    text = " ".join(text.split())
    if len(text) > limit:
        text = text[:limit] + "..."
    return text or resp.reason or ""


class HttpClient:
    """Retrying HTTP client for one backend (see the module docstring for the rules).

    Args:
        cfg: where and how to connect.
        product: human name used in messages (``"Loki"``, ``"Elasticsearch"``).
        sleep: injected for tests (``lambda s: None`` makes retries instant).
        on_retry: called as ``on_retry(attempt, reason, delay_s)`` before each retry sleep
            (progress bars, metrics, tests).
        rng: source of jitter in ``[0, 1)``; injectable for deterministic tests.
    """

    def __init__(
        self,
        cfg: HttpConfig,
        product: str,
        *,
        sleep: Callable[[float], None] = time.sleep,
        on_retry: Callable[[int, str, float], None] | None = None,
        rng: Callable[[], float] = random.random,
        pool_maxsize: int = 4,
    ) -> None:
        self.cfg = cfg
        self.product = product
        self._sleep = sleep
        self._on_retry = on_retry
        self._rng = rng
        self._pool_maxsize = pool_maxsize
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._lock = threading.Lock()
        self.retries = 0  # total retries performed (all threads), for reporting
        # TLS settings go on every request, not on the session: requests lets REQUESTS_CA_BUNDLE /
        # CURL_CA_BUNDLE override a session's ``verify`` (psf/requests#3829), which would silently
        # ignore --ca-cert on machines that set those variables.
        self._verify: bool | str = False if not cfg.verify else (cfg.ca_cert or True)
        self._cert: str | tuple[str, str] | None = (
            (cfg.client_cert, cfg.client_key) if cfg.client_cert and cfg.client_key else cfg.client_cert
        )

    # -- sessions ------------------------------------------------------------------------------
    def _new_session(self) -> requests.Session:
        cfg = self.cfg
        s = requests.Session()
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=self._pool_maxsize, max_retries=0)
        s.mount("http://", adapter)
        s.mount("https://", adapter)
        s.headers["User-Agent"] = USER_AGENT
        s.headers.update(cfg.headers)
        if cfg.bearer_token:
            s.headers["Authorization"] = f"Bearer {cfg.bearer_token}"
        elif cfg.api_key:
            s.headers["Authorization"] = f"ApiKey {cfg.api_key}"
        elif cfg.username is not None or cfg.password is not None:
            s.auth = (cfg.username or "", cfg.password or "")
        return s

    @property
    def session(self) -> requests.Session:
        """This thread's session (created on first use)."""
        s = getattr(self._local, "session", None)
        if s is None:
            s = self._new_session()
            self._local.session = s
            with self._lock:
                self._sessions.append(s)
        return s

    def close(self) -> None:
        with self._lock:
            sessions, self._sessions = self._sessions, []
        for s in sessions:
            s.close()
        self._local = threading.local()

    def __enter__(self) -> HttpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- requests ------------------------------------------------------------------------------
    def url_for(self, path: str) -> str:
        if path.startswith(("http://", "https://")):
            return path
        return self.cfg.url + ("" if path.startswith("/") else "/") + path

    def where(self, path: str) -> str:
        """URL for messages: identity + path, never credentials."""
        return self.cfg.identity() + ("" if path.startswith("/") else "/") + path

    def backoff_delay(self, attempt: int) -> float:
        """Full-jitter exponential backoff for retry number ``attempt`` (0-based)."""
        cap = min(self.cfg.backoff_max_s, self.cfg.backoff_base_s * (2**attempt))
        return self._rng() * cap

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | Iterable[tuple[str, Any]] | None = None,
        json: Any = None,
        data: Any = None,
        headers: Mapping[str, str] | None = None,
        retry_statuses: Iterable[int] = DEFAULT_RETRY_STATUSES,
        stream: bool = False,
    ) -> requests.Response:
        """Send a request with retries; see the module docstring for what is retried and raised.

        With ``stream=True`` the body is read by the caller, so a connection dropped mid-body then
        surfaces in the caller (not retried here).
        """
        retry_on = frozenset(retry_statuses)
        url = self.url_for(path)
        where = self.where(path)
        attempts = self.cfg.max_retries + 1
        last: str = ""
        last_status: int | None = None
        for attempt in range(attempts):
            retry_after: float | None = None
            try:
                resp = self.session.request(
                    method, url, params=params, json=json, data=data, headers=dict(headers or {}),
                    timeout=self.cfg.timeout_s, stream=stream, verify=self._verify, cert=self._cert,
                )
            except requests.exceptions.SSLError as exc:
                raise SourceError(
                    f"TLS error talking to {self.product} at {where}: {exc.__class__.__name__}: "
                    f"{_short(exc)}. Check --ca-cert (CA bundle), --cert/--key (client certificate) or, "
                    "only for testing, --insecure."
                ) from exc
            except (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema,
                    requests.exceptions.InvalidSchema) as exc:
                raise ConfigError(f"invalid {self.product} URL {where!r}: {exc}") from exc
            except _TRANSIENT_ERRORS as exc:
                last = f"{exc.__class__.__name__}: {_short(exc)}"
                last_status = None
            else:
                status = resp.status_code
                if status in (401, 403):
                    msg = _server_message(resp)
                    resp.close()
                    raise AuthError(
                        f"{self.product} at {where} rejected the request: HTTP {status}"
                        f"{': ' + msg if msg else ''}. Check the credentials (auth: {self.cfg.auth_method()})"
                        f"{' and the tenant/permissions' if status == 403 else ''}; retrying will not help.",
                        status=status,
                    )
                if status not in retry_on:
                    return resp
                last_status = status
                last = f"HTTP {status}: {_server_message(resp, 200)}"
                retry_after = parse_retry_after(resp.headers.get("Retry-After"))
                resp.close()
            if attempt == attempts - 1:
                break
            delay = self.backoff_delay(attempt) if retry_after is None else min(retry_after, _MAX_RETRY_AFTER_S)
            with self._lock:
                self.retries += 1
            log.warning(
                "%s %s %s: %s (attempt %d/%d); retrying in %.2fs",
                self.product, method, where, last, attempt + 1, attempts, delay,
            )
            if self._on_retry is not None:
                self._on_retry(attempt + 1, last, delay)
            self._sleep(delay)
        raise SourceError(
            f"{self.product} {method} {where} failed after {attempts} attempt(s); last error: {last}. "
            "Everything fetched before this point is stored; re-run with --resume to continue.",
            status=last_status,
            resumable=True,
        )

    def request_json(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | Iterable[tuple[str, Any]] | None = None,
        json: Any = None,
        data: Any = None,
        headers: Mapping[str, str] | None = None,
        retry_statuses: Iterable[int] = DEFAULT_RETRY_STATUSES,
        decode: Callable[[bytes], Any] | None = None,
    ) -> tuple[requests.Response, Any]:
        """Like :meth:`request`, then decode a 2xx body as JSON, retrying a truncated/garbled body.

        A 200 whose body is not valid JSON almost always means a proxy cut the transfer, so it is treated
        as transient. Non-2xx responses are returned with ``None`` as the decoded value.
        """
        import json as _json

        dec = decode or _json.loads
        for attempt in range(self.cfg.max_retries + 1):
            resp = self.request(
                method, path, params=params, json=json, data=data, headers=headers,
                retry_statuses=retry_statuses,
            )
            if not 200 <= resp.status_code < 300:
                return resp, None
            try:
                return resp, dec(resp.content)
            except ValueError as exc:
                if attempt == self.cfg.max_retries:
                    raise SourceError(
                        f"{self.product} {method} {self.where(path)} returned an invalid JSON body "
                        f"({len(resp.content)} bytes): {_short(exc)}. Re-run with --resume to continue.",
                        status=resp.status_code,
                        resumable=True,
                    ) from exc
                delay = self.backoff_delay(attempt)
                with self._lock:
                    self.retries += 1
                log.warning("%s %s %s: invalid JSON body (%s); retrying in %.2fs", self.product, method,
                            self.where(path), _short(exc), delay)
                if self._on_retry is not None:
                    self._on_retry(attempt + 1, "invalid JSON body", delay)
                self._sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover


def _short(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit] + "..."
