"""The one HTTP helper shared by the Loki and Elasticsearch sources: session, TLS, auth, retries.

Why one module: retry, backoff and credential handling are easy to get subtly wrong (retrying a 401
forever, logging a token, hammering a server that asked for ``Retry-After``), so they live in one place
that both sources use and one test suite pins.

Behaviour of :meth:`HttpClient.request`:

* an address that cannot work is named in one line at once, never retried (retrying a wrong address
  only makes the user wait): connection refused (``cannot connect to http://h:p (connection refused): is
  Loki running there?``), an unknown host, a port that answers gRPC/HTTP2 instead of HTTP/1 (Loki's
  ``grpc_listen_port``), ``https://`` on a plain-HTTP port and ``http://`` on an HTTPS port -- the last
  three are told apart by :func:`probe_endpoint`, a sub-second raw-socket look at what the port says;
* timeouts, connections reset or dropped by a server that does speak HTTP, bodies cut off mid-transfer
  (``ChunkedEncodingError``) and the ``retry_statuses`` (default 429/500/502/503/504) are retried up to
  ``max_retries`` times with
  exponential backoff and *full jitter* (a random delay in ``[0, min(max, base * 2**attempt)]``, so
  parallel workers do not retry in lock-step); a ``Retry-After`` header (seconds or HTTP date) is
  honoured instead of the computed delay;
* 401/403 raise :class:`~meshlens.errors.AuthError` at once -- retrying bad credentials only gets
  accounts locked -- with the product, URL, status and the server's own message;
* a TLS verification failure raises :class:`~meshlens.errors.SourceError` at once (it is configuration,
  not a transient fault) with a hint about ``--ca-cert``/``--insecure``;
* a caller-supplied ``permanent(status, body)`` marks answers that are configuration, not load (Loki's
  500 "multiple org IDs present"): they are returned at once, not retried;
* any other 4xx is *returned* for the caller to classify (Loki's 400 "query too large" means "split the
  query", not "give up");
* when retries are exhausted, :class:`~meshlens.errors.SourceError` with ``resumable=True`` is raised
  (one line, the last error summarised): whatever the caller already committed is kept and a re-run with
  ``--resume`` continues.

Thread safety: ``requests.Session`` is not documented as thread-safe, so the client keeps **one session
per thread** (``threading.local``), each with its own connection pool. Worker threads can share one
:class:`HttpClient`; :meth:`HttpClient.close` closes every session it created.

Speed: JSON answers are decoded with orjson (5-7x faster than the standard library on a 5000-line Loki
page, and it holds the GIL that the parsing writer also needs), falling back to :func:`json.loads` for
what orjson refuses but JSON allows (integers beyond 64 bits). Answers from a loopback address (a
``kubectl port-forward``, a local Loki) are asked for uncompressed (``Accept-Encoding: identity``): on
loopback gzip only costs CPU on both sides (about 3 s of Loki's and 0.6 s of ours per 1M lines);
over a network they stay compressed. ``HttpConfig.compress`` overrides the choice.

Secrets (password, bearer token, API key, sensitive headers) are never logged, never part of
``repr()``, :meth:`HttpConfig.redacted` or :meth:`HttpConfig.identity`.
"""

from __future__ import annotations

import email.utils
import errno
import ipaddress
import logging
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import requests
from requests.adapters import HTTPAdapter

from meshlens.errors import AuthError, ConfigError, SourceError
from meshlens.jsonutil import loads_json
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
    # ask for gzip-compressed answers: None = yes unless the server is on a loopback address
    compress: bool | None = None

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


# ------------------------------------------------------------------------------------------------
# What a failed connection means
# ------------------------------------------------------------------------------------------------
def _chain(exc: BaseException) -> Iterable[BaseException]:
    """``exc`` and everything it wraps (``__cause__``/``__context__``, urllib3's ``reason``, args)."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        nxt = [e.__cause__, e.__context__, getattr(e, "reason", None), *getattr(e, "args", ())]
        todo.extend(x for x in nxt if isinstance(x, BaseException))


def _errno_in(exc: BaseException, codes: Iterable[int]) -> bool:
    wanted = set(codes)
    return any(isinstance(e, OSError) and e.errno in wanted for e in _chain(exc))


def _is_refused(exc: BaseException) -> bool:
    return any(isinstance(e, ConnectionRefusedError) for e in _chain(exc)) or _errno_in(exc, (errno.ECONNREFUSED,))


def _is_unresolvable(exc: BaseException) -> bool:
    return any(isinstance(e, socket.gaierror) or type(e).__name__ == "NameResolutionError" for e in _chain(exc))


def _is_cert_problem(exc: BaseException) -> bool:
    """A TLS failure about trust (CA, hostname, client certificate), as opposed to a wrong protocol."""
    if any(isinstance(e, ssl.SSLCertVerificationError) for e in _chain(exc)):
        return True
    text = " ".join(str(e) for e in _chain(exc)).upper()
    return any(k in text for k in ("CERTIFICATE", "HOSTNAME", "SELF_SIGNED", "UNKNOWN_CA", "KEY_VALUES_MISMATCH",
                                   "PEM", "NO_CERTIFICATES"))


def _conn_summary(exc: BaseException) -> str:
    """A short reason for a transient failure ("ConnectionError: connection reset by peer")."""
    why = None
    for e in _chain(exc):
        if isinstance(e, ConnectionResetError):
            why = "connection reset by peer"
        elif isinstance(e, BrokenPipeError):
            why = "broken pipe"
        elif type(e).__name__ == "RemoteDisconnected":
            why = "server closed the connection without an answer"
        elif type(e).__name__ == "IncompleteRead":
            why = "connection closed mid-body"
        if why:
            break
    if why is None:
        if isinstance(exc, requests.exceptions.ConnectTimeout):
            why = "connect timed out"
        elif isinstance(exc, requests.Timeout):
            why = "read timed out"
        elif isinstance(exc, requests.exceptions.ChunkedEncodingError):
            why = "connection closed mid-body"
        else:
            why = _short(exc, 160)
    return f"{exc.__class__.__name__}: {why}"


def _looks_http2(data: bytes) -> bool:
    """An HTTP/2 frame header for a SETTINGS frame on stream 0: what a gRPC server sends first."""
    return len(data) >= 9 and data[3] == 0x04 and data[5:9] == b"\x00\x00\x00\x00" and (data[4] & ~0x01) == 0


def probe_endpoint(host: str, port: int, *, timeout_s: float = 1.0) -> str | None:
    """What protocol a port speaks, read from its first bytes: ``"http2"``, ``"tls"``, ``"http"`` or None.

    Used only after a connection failed in a way that could mean "wrong port" (reset before any answer,
    TLS handshake not even started), so the user is told which address to use instead of watching
    retries. A gRPC server (HTTP/2) sends its SETTINGS frame as soon as a client connects; an HTTP/1
    server answers a request line with ``HTTP/1.x``; a TLS server answers a ClientHello.
    """
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sk:
            sk.settimeout(min(0.3, timeout_s))
            try:
                first = sk.recv(64)
            except TimeoutError:
                first = b""
            if _looks_http2(first):
                return "http2"
            if not first:
                sk.settimeout(timeout_s)
                sk.sendall(f"HEAD / HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
                first = sk.recv(64)
            if _looks_http2(first):
                return "http2"
            if first.startswith(b"HTTP/1.") or first.startswith(b"HTTP/2"):
                body = first + sk.recv(512)
                if b"HTTPS server" in body or b"HTTPS port" in body:
                    return "tls"  # Go and nginx answer plain HTTP on a TLS port with a 400 saying so
                return "http"
            if first[:1] == b"\x15":  # a TLS alert record
                return "tls"
    except OSError:
        pass
    try:  # nothing readable: does it complete a TLS handshake?
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        with socket.create_connection((host, port), timeout=timeout_s) as raw, \
                ctx.wrap_socket(raw, server_hostname=host):
            return "tls"
    except (OSError, ssl.SSLError, ValueError):
        return None



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
        self._answered = False  # the server answered HTTP at least once (a later reset is transient)
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
        if not (cfg.compress if cfg.compress is not None else not is_loopback(cfg.url)):
            s.headers["Accept-Encoding"] = "identity"
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

    def base(self) -> str:
        """``scheme://host:port`` of the server (no path, no credentials): what a user types to fix it."""
        parts = urlsplit(self.cfg.url)
        return f"{parts.scheme}://{self._hostport()}"

    def _hostport(self) -> str:
        parts = urlsplit(self.cfg.url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return f"{host}:{port}"

    def _probe(self) -> str | None:
        parts = urlsplit(self.cfg.url)
        return probe_endpoint(parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80),
                              timeout_s=min(2.0, max(0.2, float(self.cfg.timeout_s))))

    def _wrong_protocol(self, spoke: str | None) -> SourceError | None:
        """The one-line error for "this port speaks another protocol", or None when it speaks ours."""
        scheme = urlsplit(self.cfg.url).scheme
        hp = self._hostport()
        rest = self.cfg.url.split("://", 1)[1]
        if spoke == "http2":
            return SourceError(
                f"{hp} is not {self.product}'s HTTP API (it answered gRPC/HTTP2): --url must name the HTTP "
                f"port{' (3100 by default)' if self.product == 'Loki' else ''}."
            )
        if spoke == "http" and scheme == "https":
            return SourceError(f"{hp} speaks plain HTTP, not HTTPS: use http://{rest}")
        if spoke == "tls" and scheme == "http":
            return SourceError(f"{hp} speaks HTTPS, not plain HTTP: use https://{rest}")
        return None

    def _connect_error(self, exc: requests.ConnectionError) -> SourceError | None:
        """A failure that no retry can fix (refused, unknown host, wrong protocol), else None."""
        if isinstance(exc, requests.Timeout):
            return None
        if _is_refused(exc):
            return SourceError(
                f"cannot connect to {self.base()} (connection refused): is {self.product} running there?"
            )
        if _is_unresolvable(exc):
            host = urlsplit(self.cfg.url).hostname
            return SourceError(f"cannot connect to {self.base()}: unknown host {host!r}; check --url.")
        if self._answered:
            return None  # it spoke HTTP before: a reset now is the server's trouble, worth a retry
        return self._wrong_protocol(self._probe())

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
        permanent: Callable[[int, str], bool] | None = None,
    ) -> requests.Response:
        """Send a request with retries; see the module docstring for what is retried and raised.

        With ``stream=True`` the body is read by the caller, so a connection dropped mid-body then
        surfaces in the caller (not retried here). ``permanent(status, body)`` returning true for a
        retryable status returns the answer at once: a configuration error does not go away on retry.
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
                if not _is_cert_problem(exc):
                    wrong = self._wrong_protocol(self._probe())
                    if wrong is not None:
                        raise wrong from None
                raise SourceError(
                    f"TLS error talking to {self.product} at {where}: {exc.__class__.__name__}: "
                    f"{_short(exc, 200)}. Check --ca-cert (CA bundle), --cert/--key (client certificate) or, "
                    "only for testing, --insecure."
                ) from None
            except (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema,
                    requests.exceptions.InvalidSchema) as exc:
                raise ConfigError(f"invalid {self.product} URL {where!r}: {exc}") from exc
            except _TRANSIENT_ERRORS as exc:
                if isinstance(exc, requests.ConnectionError):
                    fatal = self._connect_error(exc)
                    if fatal is not None:
                        raise fatal from None
                last = _conn_summary(exc)
                last_status = None
            else:
                self._answered = True
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
                if status == 400 and not stream and _plain_http_to_tls(resp):
                    raise self._wrong_protocol("tls") or SourceError(  # pragma: no branch
                        f"{self._hostport()} speaks HTTPS: use https://")
                if status not in retry_on:
                    return resp
                if permanent is not None and permanent(status, resp.text):
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
            f"{self.product} at {self.base()} kept failing ({attempts} attempt(s), last: {last}). "
            "What was stored before is kept; re-run with --resume to continue.",
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
        permanent: Callable[[int, str], bool] | None = None,
    ) -> tuple[requests.Response, Any]:
        """Like :meth:`request`, then decode a 2xx body as JSON, retrying a truncated/garbled body.

        A 200 whose body is not valid JSON almost always means a proxy cut the transfer, so it is treated
        as transient. Non-2xx responses are returned with ``None`` as the decoded value.
        """
        dec = decode or loads_json
        for attempt in range(self.cfg.max_retries + 1):
            resp = self.request(
                method, path, params=params, json=json, data=data, headers=headers,
                retry_statuses=retry_statuses, permanent=permanent,
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


def is_loopback(url: str) -> bool:
    """True when ``url``'s host is this machine (localhost, 127.0.0.0/8, ::1): a port-forward or a local
    server, where compressing answers costs CPU and saves nothing."""
    host = (urlsplit(url).hostname or "").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _plain_http_to_tls(resp: requests.Response) -> bool:
    """A 400 that says "you sent plain HTTP to my TLS port" (Go's and nginx's wording)."""
    try:
        text = resp.text[:300]
    except Exception:  # noqa: BLE001
        return False
    return "HTTP request to an HTTPS server" in text or "plain HTTP request was sent to HTTPS port" in text


def _short(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit] + "..."
