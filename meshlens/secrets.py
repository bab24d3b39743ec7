"""Where credentials come from: environment variables, files, or the OS keyring -- never parameters.

Any credential value (a Loki/Elasticsearch password, bearer token or API key, whether given as an
option, an environment variable or a config-file entry) may be a reference instead of the secret:

* ``keyring:<service>/<username>`` -- read from the OS keyring (macOS Keychain, Windows Credential
  Locker, Secret Service / KWallet on Linux) through the ``keyring`` package; store it once with
  ``keyring set <service> <username>``;
* ``file:<path>`` -- the first line of a file (e.g. a Kubernetes Secret mounted as a volume);
* ``env:<NAME>`` -- the environment variable NAME.

On the command line a secret is only ever such a reference (:func:`secret_option`): a plain value
would be kept in shell history, in ``ps`` output and in a scheduler's job definition.

Why references: scheduled reports and CronJobs can then carry configuration without carrying secrets,
and nothing secret ever needs to appear in a notebook parameter, a shell history or a report.
"""

from __future__ import annotations

from pathlib import Path

from meshlens.errors import ConfigError

KEYRING_PREFIX = "keyring:"
FILE_PREFIX = "file:"
ENV_PREFIX = "env:"
REFERENCE_FORMS = "env:VAR, file:PATH or keyring:SERVICE/USER"


def is_reference(value: str) -> bool:
    """True for ``env:``, ``file:`` and ``keyring:`` references."""
    return value.startswith((KEYRING_PREFIX, FILE_PREFIX, ENV_PREFIX))


def secret_option(value: str | None, option: str, env_hint: str | None = None) -> str | None:
    """A command-line option that carries a secret: accept only a reference, refuse a plain secret.

    The one secrets policy of every command (``--password``, ``--bearer-token``...)."""
    if value is None or is_reference(value):
        return value
    alt = f", or set ${env_hint}" if env_hint else ""
    raise ConfigError(f"{option}: secrets are not accepted as plain arguments (they would stay in shell "
                      f"history, ps output and scheduler logs); pass a reference: {REFERENCE_FORMS}{alt}")


def resolve_secret(value: str | None, what: str = "credential") -> str | None:
    """Return the secret a value stands for (itself when it is not a reference)."""
    if value is None:
        return None
    if value.startswith(KEYRING_PREFIX):
        ref = value[len(KEYRING_PREFIX):]
        service, sep, user = ref.rpartition("/")
        if not sep or not service or not user:
            raise ConfigError(f"{what}: keyring reference must be keyring:<service>/<username>, got {value!r}")
        try:
            import keyring
            from keyring.errors import KeyringError
        except ImportError:
            raise ConfigError(f"{what} refers to the OS keyring but the 'keyring' package is not installed "
                              "(pip install keyring)") from None
        try:
            secret = keyring.get_password(service, user)
        except KeyringError as exc:
            raise ConfigError(f"{what}: the OS keyring could not be read ({exc})") from exc
        if secret is None:
            raise ConfigError(f"{what}: no entry for service {service!r} and user {user!r} in the OS keyring "
                              f"(add it with: keyring set {service} {user})")
        return secret
    if value.startswith(ENV_PREFIX):
        import os

        name = value[len(ENV_PREFIX):]
        secret = os.environ.get(name)
        if not name or not secret:
            raise ConfigError(f"{what}: environment variable {name!r} (from {value!r}) is not set or empty")
        return secret
    if value.startswith(FILE_PREFIX):
        path = Path(value[len(FILE_PREFIX):]).expanduser()
        try:
            lines = path.read_text().splitlines()
        except OSError as exc:
            raise ConfigError(f"{what}: cannot read secret file {str(path)!r} ({exc.strerror})") from exc
        if not lines or not lines[0].strip():
            raise ConfigError(f"{what}: secret file {str(path)!r} is empty")
        return lines[0].strip()
    return value
