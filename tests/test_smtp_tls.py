"""The mail over TLS (README, settings SMTP_STARTTLS and SMTP_PORT): STARTTLS before the login,
implicit TLS on port 465, and the server's certificate verified against the trusted CAs (here a
CA made for the test, named by SSL_CERT_FILE, which OpenSSL's default verify paths read) and its
host name, so that the password never goes to a server that is not the one configured. A real SMTP
server (aiosmtpd) on a loopback address of its own, with certificates made by openssl."""

from __future__ import annotations

import random
import shutil
import socket
import ssl
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword

from ct.pipeline import gate, mail_delivery, notify, promote
from tests.conftest import required_tool
from tests.gate_workspace import make_workspace

USER, PASSWORD = "ci-bot", "tls-only-pw"
SETTINGS = ("SMTP_HOST", "SMTP_PORT", "SMTP_STARTTLS", "SMTP_USER", "SMTP_PASSWORD",
            "NOTIFY_FROM", "NOTIFY_TO", "CT_WORKSPACE", "SSL_CERT_FILE", "SSL_CERT_DIR")


@dataclass(frozen=True)
class Certificates:
    host: str  # the loopback address the server listens on, the only name its certificate has
    folder: Path

    def path(self, name: str) -> Path:
        return self.folder / name


def openssl(folder: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, timeout=60)


def make_ca(folder: Path, name: str) -> None:
    openssl(folder, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
            "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")


def make_server_cert(folder: Path, name: str, ca: str, ip: str) -> None:
    (folder / f"{name}.ext").write_text(
        f"subjectAltName=IP:{ip}\nbasicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n")
    openssl(folder, "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={ip}")
    openssl(folder, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey",
            f"{ca}.key", "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext",
            "-out", f"{name}.pem")


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    """The trusted CA and the server's certificate it signed for the server's address; another
    CA, which signed nothing the server shows; a certificate of the trusted CA for another host."""
    required_tool(shutil.which("openssl"), "openssl", "apt-get install openssl",
                  "CT_REQUIRE_OPENSSL")
    folder = tmp_path_factory.mktemp("tls")
    # an address of its own in 127/8, so that port 465 is free whatever else runs on this host
    host = "127.{}.{}.{}".format(*random.SystemRandom().choices(range(1, 255), k=3))
    make_ca(folder, "trusted-ca")
    make_ca(folder, "other-ca")
    make_server_cert(folder, "server", "trusted-ca", host)
    make_server_cert(folder, "elsewhere", "trusted-ca", "127.0.0.1")
    return Certificates(host, folder)


@dataclass
class Mailbox:
    """What the server saw: (whether the connection was TLS, envelope), and AUTH attempts."""

    mails: list[tuple[bool, Envelope]] = field(default_factory=list)
    logins: list[tuple[str, bool, bool]] = field(default_factory=list)

    async def handle_DATA(self, server: Any, session: Any, envelope: Envelope) -> str:
        self.mails.append((tls(server), envelope))
        return "250 OK"

    def authenticate(self, server: Any, session: Any, envelope: Any, mechanism: str, data: Any
                     ) -> AuthResult:
        ok = isinstance(data, LoginPassword) and (data.login, data.password) == (
            USER.encode(), PASSWORD.encode())
        self.logins.append((data.login.decode(), ok, tls(server)))
        return AuthResult(success=ok, handled=False)


def tls(server: Any) -> bool:
    return server.transport.get_extra_info("ssl_object") is not None


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def implicit_tls_port(host: str, monkeypatch: pytest.MonkeyPatch) -> int:
    """465 where this user may listen on it (root, as in CI); elsewhere a free port, which
    ct.pipeline.mail_delivery is told is its implicit-TLS port."""
    try:
        with socket.socket() as sock:
            sock.bind((host, mail_delivery.SMTP_SSL_PORT))
        return mail_delivery.SMTP_SSL_PORT
    except PermissionError:
        port = free_port(host)
        monkeypatch.setattr(mail_delivery, "SMTP_SSL_PORT", port)
        return port


@contextmanager
def tls_server(certs: Certificates, cert: str, implicit: bool, port: int) -> Iterator[Mailbox]:
    """STARTTLS required before anything else and AUTH offered only over TLS; or TLS from the
    first byte (implicit)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs.path(f"{cert}.pem"), certs.path(f"{cert}.key"))
    box = Mailbox()
    tls_kwargs: dict[str, Any] = (
        {"ssl_context": context, "auth_require_tls": False} if implicit
        else {"tls_context": context, "require_starttls": True, "auth_require_tls": True})
    controller = Controller(box, hostname=certs.host, port=port, authenticator=box.authenticate,
                            server_hostname="ct-test-smtp", **tls_kwargs)
    controller.start()
    try:
        yield box
    finally:
        controller.stop()


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in SETTINGS:
        monkeypatch.delenv(name, raising=False)
    ws = make_workspace(tmp_path / "ws", 81.27)
    assert gate.main(["--workspace", str(ws), "--threshold", "80"]) == 0
    assert promote.main(["--workspace", str(ws)]) == 0
    return ws


def mail_settings(monkeypatch: pytest.MonkeyPatch, certs: Certificates, port: int, ca: str,
                  starttls: bool, tmp_path: Path) -> None:
    no_system_cas = tmp_path / "no-cas"
    no_system_cas.mkdir(exist_ok=True)
    for name, value in {
        "SMTP_HOST": certs.host, "SMTP_PORT": str(port), "SMTP_STARTTLS": str(starttls).lower(),
        "SMTP_USER": USER, "SMTP_PASSWORD": PASSWORD, "NOTIFY_FROM": "ct@example.com",
        "NOTIFY_TO": "ops@example.com", "SSL_CERT_FILE": str(certs.path(f"{ca}.pem")),
        "SSL_CERT_DIR": str(no_system_cas),
    }.items():
        monkeypatch.setenv(name, value)


@pytest.mark.parametrize("implicit", [False, True], ids=["STARTTLS", "implicit TLS on 465"])
def test_the_mail_goes_over_verified_tls_and_the_login_only_after_it(
        workspace, certificates, monkeypatch, capsys, tmp_path, implicit):
    port = implicit_tls_port(certificates.host, monkeypatch) if implicit \
        else free_port(certificates.host)
    mail_settings(monkeypatch, certificates, port, "trusted-ca", not implicit, tmp_path)
    with tls_server(certificates, "server", implicit, port) as box:
        code = notify.main(["--workspace", str(workspace)])

    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.startswith(f"ct.notify: mailed ops@example.com via {certificates.host}:{port}")
    assert box.logins == [(USER, True, True)]  # logged in, over TLS
    ((over_tls, envelope),) = box.mails
    assert over_tls and envelope.rcpt_tos == ["ops@example.com"]
    assert b"81.27%" in envelope.original_content
    assert not (workspace / "outbox").exists()
    assert PASSWORD not in out + err


@pytest.mark.parametrize("implicit", [False, True], ids=["STARTTLS", "implicit TLS on 465"])
@pytest.mark.parametrize(("cert", "why"), [("server", "signed by a CA not trusted here"),
                                           ("elsewhere", "made for another host")])
def test_a_server_whose_certificate_fails_verification_gets_no_password_and_no_mail(
        workspace, certificates, monkeypatch, capsys, tmp_path, implicit, cert, why):
    port = implicit_tls_port(certificates.host, monkeypatch) if implicit \
        else free_port(certificates.host)
    ca = "other-ca" if cert == "server" else "trusted-ca"
    mail_settings(monkeypatch, certificates, port, ca, not implicit, tmp_path)
    with tls_server(certificates, cert, implicit, port) as box:
        code = notify.main(["--workspace", str(workspace)])

    out, err = capsys.readouterr()
    assert code == 1, why
    assert box.logins == [] and box.mails == [], why
    assert "CERTIFICATE_VERIFY_FAILED" in err and len(err.splitlines()) == 1, err
    assert len(list((workspace / "outbox").glob("*.eml"))) == 1  # kept for a resend
    assert PASSWORD not in out + err
