"""TLS to the broker: a certificate the bike trusts connects; one it does not is refused."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import bike_config, wait_until


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(where: Path, name: str) -> tuple[Path, Path]:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.pem", cwd=where)
    return where / f"{name}.pem", where / f"{name}.key"


@pytest.fixture
def tls_broker(make_broker, tmp_path):
    """A broker whose certificate (for 127.0.0.1) is signed by a test CA."""
    ca, ca_key = make_ca(tmp_path, "test-ca")
    (tmp_path / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
             "-keyout", "server.key", "-out", "server.csr", cwd=tmp_path)
    _openssl("x509", "-req", "-in", "server.csr", "-CA", str(ca), "-CAkey", str(ca_key),
             "-CAcreateserial", "-days", "2", "-extfile", "san.ext", "-out", "server.pem",
             cwd=tmp_path)
    broker = make_broker(extra=[f"cafile {ca}", f"certfile {tmp_path / 'server.pem'}",
                                f"keyfile {tmp_path / 'server.key'}"])
    return broker, ca


def tls_config(broker, ca: Path) -> str:
    return bike_config(broker, '[fan]\ndriver = "gpio_pwm"\npin = 12\n').replace(
        "keepalive = 5", f'keepalive = 5\ntls = true\nca_file = "{ca}"')


def test_daemon_connects_over_tls_to_a_trusted_broker(tls_broker, run_daemon, tmp_path):
    broker, ca = tls_broker
    daemon = run_daemon(tls_config(broker, ca))
    daemon.notify.wait_for("STATUS=connected to 127.0.0.1*", timeout=20)


def test_an_untrusted_certificate_is_refused_and_retried_not_fatal(tls_broker, run_daemon,
                                                                  tmp_path):
    broker, _ = tls_broker
    other = tmp_path / "other"
    other.mkdir()
    stranger, _ = make_ca(other, "stranger-ca")
    daemon = run_daemon(tls_config(broker, stranger))
    daemon.notify.wait_for("READY=1")
    wait_until(lambda: "cannot reach broker" in daemon.output(), 15, "a failed TLS attempt")
    assert "certificate verify failed" in daemon.output()  # the journal says why
    assert daemon.proc.poll() is None  # still running, still retrying
    assert "STATUS=connected" not in " ".join(daemon.notify.lines)


def test_the_client_key_can_come_from_a_systemd_credential(tmp_path):
    """LoadCredential=mqtt-client-key: certfile in the config, the key as a credential."""
    from smartbiked import config as configuration

    client_cert, client_key = make_ca(tmp_path, "bike-client")
    creds = tmp_path / "credentials"
    creds.mkdir()
    text = bike_config(None, "").replace(
        "keepalive = 5", f'keepalive = 5\ntls = true\ncertfile = "{client_cert}"')
    path = tmp_path / "bike.toml"
    path.write_text(text)
    with pytest.raises(configuration.ConfigError, match="certificate and key do not load"):
        configuration.load(path, environ={"CREDENTIALS_DIRECTORY": str(creds)})
    (creds / "mqtt-client-key").write_text("\n")  # the unit's fallback: no key
    with pytest.raises(configuration.ConfigError, match="certificate and key do not load"):
        configuration.load(path, environ={"CREDENTIALS_DIRECTORY": str(creds)})
    (creds / "mqtt-client-key").write_bytes(client_key.read_bytes())
    cfg = configuration.load(path, environ={"CREDENTIALS_DIRECTORY": str(creds)})
    assert cfg.broker.keyfile == str(creds / "mqtt-client-key")


def test_a_credentials_directory_that_cannot_be_looked_into_is_no_crash(tmp_path):
    """systemd 252 hides /run/credentials from ExecReload (EACCES): the check must not
    crash. Root ignores modes, so another error that exists() raises stands in for it."""
    from smartbiked import config as configuration

    path = tmp_path / "bike.toml"
    path.write_text(bike_config(None, ""))
    environ = {"CREDENTIALS_DIRECTORY": str(tmp_path / ("x" * 300))}  # ENAMETOOLONG
    with pytest.raises(OSError):
        (Path(environ["CREDENTIALS_DIRECTORY"]) / "mqtt-password").exists()
    cfg = configuration.load(path, environ=environ)
    assert cfg.broker.password == ""
