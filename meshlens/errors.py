"""The meshlens exception hierarchy, documented in one place.

Every error a user can hit derives from :class:`MeshlensError`, so scripts and notebooks can catch one
type; the CLI turns them into a one-line message and a non-zero exit code. Messages say what was wrong,
where, and what to do next -- never a bare traceback for expected failures.
"""

from __future__ import annotations


class MeshlensError(Exception):
    """Base class for every error meshlens raises on purpose."""


class ConfigError(MeshlensError):
    """Bad options, parameters or config files (wrong value, missing setting, unknown format)."""


class SourceError(MeshlensError):
    """A log source (file, Loki, Elasticsearch) could not be read: unreachable, auth failure, bad answer.

    ``resumable`` tells the caller that everything before the failure is stored and a re-run with
    ``--resume`` continues from the stored watermark.
    """

    def __init__(self, message: str, *, status: int | None = None, resumable: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.resumable = resumable


class AuthError(SourceError):
    """The server rejected our credentials (401/403). Retrying will not help."""


class QueryError(SourceError):
    """The server rejected the query itself (syntax error, unknown index). Retrying will not help."""


class StoreError(MeshlensError):
    """The DuckDB store cannot be opened, migrated or written."""


class SchemaVersionError(StoreError):
    """The store was written by a newer meshlens, or migration from its version is impossible."""
