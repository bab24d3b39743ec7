"""Credentials from the OS keyring or files, resolved once in the shared HTTP config."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshlens.errors import ConfigError
from meshlens.secrets import resolve_secret
from meshlens.sources.http import HttpConfig

keyring = pytest.importorskip("keyring")
from keyring.backend import KeyringBackend  # noqa: E402


class MemoryKeyring(KeyringBackend):
    """An in-process keyring backend (the OS keyring is not available in CI)."""

    priority = 1

    def __init__(self) -> None:
        self.store: dict[tuple[str, str], str] = {}

    def get_password(self, service: str, username: str) -> str | None:
        return self.store.get((service, username))

    def set_password(self, service: str, username: str, password: str) -> None:
        self.store[(service, username)] = password

    def delete_password(self, service: str, username: str) -> None:
        self.store.pop((service, username), None)


@pytest.fixture
def memory_keyring():
    previous = keyring.get_keyring()
    kr = MemoryKeyring()
    keyring.set_keyring(kr)
    try:
        yield kr
    finally:
        keyring.set_keyring(previous)


def test_keyring_reference_resolves_in_http_config(memory_keyring: MemoryKeyring) -> None:
    memory_keyring.set_password("loki-prod", "sre", "s3cr3t-from-keyring")
    cfg = HttpConfig(url="https://loki:3100", username="sre", password="keyring:loki-prod/sre")
    assert cfg.password == "s3cr3t-from-keyring"
    assert "s3cr3t" not in repr(cfg) and "s3cr3t" not in str(cfg.redacted())
    memory_keyring.set_password("es", "bot", "tok-abc")
    assert HttpConfig(url="https://es:9200", bearer_token="keyring:es/bot").bearer_token == "tok-abc"


def test_missing_keyring_entry_is_a_clear_error(memory_keyring: MemoryKeyring) -> None:
    with pytest.raises(ConfigError, match="no entry for service 'es' and user 'bot'.*keyring set es bot"):
        HttpConfig(url="https://es:9200", bearer_token="keyring:es/bot")
    memory_keyring.set_password("es", "other", "x")
    with pytest.raises(ConfigError, match="keyring:<service>/<username>"):
        resolve_secret("keyring:nouser", "password")


def test_file_reference(tmp_path: Path) -> None:
    f = tmp_path / "token"
    f.write_text("tok-123\n")
    assert HttpConfig(url="https://es:9200", api_key=f"file:{f}").api_key == "tok-123"
    with pytest.raises(ConfigError, match="cannot read secret file"):
        resolve_secret(f"file:{tmp_path / 'nope'}", "API key")
    assert resolve_secret("plain-value") == "plain-value" and resolve_secret(None) is None


def test_env_reference_resolves_and_names_a_missing_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    from meshlens.secrets import resolve_secret, secret_option

    monkeypatch.setenv("ML_SECRET_X", "s3cr3t")
    assert resolve_secret("env:ML_SECRET_X") == "s3cr3t"
    monkeypatch.delenv("ML_SECRET_X")
    with pytest.raises(ConfigError, match="'ML_SECRET_X'.*not set"):
        resolve_secret("env:ML_SECRET_X", "password")
    assert secret_option("env:X", "--password") == "env:X"
    assert secret_option("file:/run/secrets/p", "--password") == "file:/run/secrets/p"
    assert secret_option(None, "--password") is None
    with pytest.raises(ConfigError, match="--password: secrets are not accepted"):
        secret_option("plain", "--password")
