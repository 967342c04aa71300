"""ct.pipeline.notify against a real SMTP server (aiosmtpd on loopback) and the outbox fallback."""

from __future__ import annotations

import email
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.policy import default as default_policy
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword

from ct.pipeline import gate, notify, promote
from tests.gate_workspace import (
    COMMIT,
    REPO,
    assert_one_line_error,
    make_read_only,
    make_workspace,
    other_user,
    readonly_workspace,
    run_module,
    snapshot,
    write_run,
)

__all__ = ["other_user", "readonly_workspace"]  # fixtures, used by name

SUBJECT = "[CT] the best model is being created: 81.27% at a1b2c3d"
USER, PASSWORD = "ci-bot", "s3cret-pw"
SETTINGS_ENV = (
    "SMTP_HOST",
    "SMTP_PORT",
    "SMTP_STARTTLS",
    "SMTP_USER",
    "SMTP_PASSWORD",
    "NOTIFY_FROM",
    "NOTIFY_TO",
    "CT_WORKSPACE",
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Mailbox:
    """What the server saw: delivered envelopes and AUTH attempts."""

    port: int
    envelopes: list[Envelope] = field(default_factory=list)
    logins: list[tuple[str, str, bool]] = field(default_factory=list)

    async def handle_DATA(self, server: Any, session: Any, envelope: Envelope) -> str:
        self.envelopes.append(envelope)
        return "250 OK"

    def authenticate(
        self, server: Any, session: Any, envelope: Any, mechanism: str, data: Any
    ) -> AuthResult:
        ok = isinstance(data, LoginPassword) and (data.login, data.password) == (
            USER.encode(),
            PASSWORD.encode(),
        )
        self.logins.append((mechanism, data.login.decode(), ok))
        return AuthResult(success=ok, handled=False)  # the server answers 235 or 535

    def message(self, index: int = 0) -> EmailMessage:
        raw = self.envelopes[index].original_content or self.envelopes[index].content
        return email.message_from_bytes(raw, policy=default_policy)  # type: ignore[return-value]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in SETTINGS_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def mailbox() -> Iterator[Mailbox]:
    box = Mailbox(port=free_port())
    controller = Controller(
        box,
        hostname="127.0.0.1",
        port=box.port,
        auth_require_tls=False,
        authenticator=box.authenticate,
    )
    controller.start()
    try:
        yield box
    finally:
        controller.stop()


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """A workspace after a passing job4: gate checked, model promoted."""
    ws = make_workspace(tmp_path / "ws", 81.27)
    assert gate.main(["--workspace", str(ws), "--threshold", "80"]) == 0
    assert promote.main(["--workspace", str(ws)]) == 0
    return ws


def use_server(monkeypatch: pytest.MonkeyPatch, port: int, **extra: str) -> None:
    monkeypatch.setenv("SMTP_HOST", "127.0.0.1")
    monkeypatch.setenv("SMTP_PORT", str(port))
    monkeypatch.setenv("NOTIFY_TO", "ops@example.com, ml@example.com")
    monkeypatch.setenv("NOTIFY_FROM", "ct@example.com")
    for name, value in extra.items():
        monkeypatch.setenv(name, value)


def attachments(msg: EmailMessage) -> dict[str, Any]:
    return {
        part.get_filename(): json.loads(part.get_content())
        for part in msg.iter_attachments()
        if part.get_content_type() == "application/json"
    }


def outbox(ws: Path) -> list[Path]:
    return sorted((ws / "outbox").glob("*.eml")) if (ws / "outbox").exists() else []


# ---------------------------------------------------------------- a real server


def test_mail_is_delivered(
    workspace: Path, mailbox: Mailbox, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    use_server(monkeypatch, mailbox.port)

    assert notify.main(["--workspace", str(workspace)]) == 0

    assert capsys.readouterr().out.startswith("ct.notify: mailed ops@example.com, ml@example.com")
    assert len(mailbox.envelopes) == 1 and mailbox.logins == []
    envelope = mailbox.envelopes[0]
    assert envelope.mail_from == "ct@example.com"
    assert envelope.rcpt_tos == ["ops@example.com", "ml@example.com"]
    msg = mailbox.message()
    assert msg["Subject"] == SUBJECT
    text = msg.get_body(preferencelist=("plain",)).get_content()  # type: ignore[union-attr]
    for expected in (
        "accuracy:            81.27%",
        "lr = 0.05",
        "optimizer = sgd",
        "batch_size = 128",
        "epochs: 3",
        "images/s: 1834.2",
        "device: cpu",
        "torch: 2.13.0",
        "run dir: runs/r1",
        "80% -> passed",
        COMMIT,
    ):
        assert expected in text, expected
    files = attachments(msg)
    assert files["metrics.json"]["accuracy"] == 81.27
    assert files["best.json"]["run_id"] == "r1"
    assert outbox(workspace) == []


def test_login_when_user_is_set(
    workspace: Path, mailbox: Mailbox, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    use_server(monkeypatch, mailbox.port, SMTP_USER=USER, SMTP_PASSWORD=PASSWORD)

    assert notify.main(["--workspace", str(workspace)]) == 0

    assert [(user, ok) for _, user, ok in mailbox.logins] == [(USER, True)]
    assert len(mailbox.envelopes) == 1
    assert PASSWORD not in "".join(capsys.readouterr())


def test_rejected_login_keeps_message(
    workspace: Path, mailbox: Mailbox, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    use_server(monkeypatch, mailbox.port, SMTP_USER=USER, SMTP_PASSWORD="wrong-pw")

    assert notify.main(["--workspace", str(workspace)]) == 1

    out, err = capsys.readouterr()
    assert mailbox.envelopes == [] and mailbox.logins[0][2] is False
    assert len(err.splitlines()) == 1 and "SMTPAuthenticationError" in err
    assert "wrong-pw" not in out + err
    kept = outbox(workspace)
    assert len(kept) == 1 and str(kept[0]) in err


def test_starttls_against_plain_server_fails_cleanly(
    workspace: Path, mailbox: Mailbox, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    use_server(monkeypatch, mailbox.port, SMTP_STARTTLS="1")
    assert notify.main(["--workspace", str(workspace)]) == 1
    assert "STARTTLS" in capsys.readouterr().err
    assert mailbox.envelopes == [] and len(outbox(workspace)) == 1


def test_tune_run_reports_best_params(
    tmp_path: Path, mailbox: Mailbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    ws = make_workspace(tmp_path / "ws", 78.0)
    write_run(ws, 84.25, run_id="t1", mode="tune")
    use_server(monkeypatch, mailbox.port)

    assert notify.main(["--workspace", str(ws)]) == 0  # event inferred from mode

    msg = mailbox.message()
    assert msg["Subject"] == "[CT] tuning finished: 84.25% at a1b2c3d"
    text = msg.get_body(preferencelist=("plain",)).get_content()  # type: ignore[union-attr]
    assert "validation accuracy: 83.75%" in text
    assert "optimizer = adamw" in text and "weight_decay = 0.0005" in text
    assert "trials: 4 (3 finished, 1 pruned)" in text
    assert "study: cifar10-0123456789ab" in text
    assert "not checked" in text


# ---------------------------------------------------------------- no server, or no reaching it


def test_no_smtp_host_keeps_eml(workspace: Path, capsys: Any) -> None:
    assert notify.main(["--workspace", str(workspace)]) == 0

    kept = outbox(workspace)
    assert len(kept) == 1 and kept[0].name.endswith("-a1b2c3d.eml")
    assert capsys.readouterr().out == f"ct.notify: no SMTP_HOST set; message kept in {kept[0]}\n"
    msg = email.message_from_bytes(kept[0].read_bytes(), policy=default_policy)
    assert msg["Subject"] == SUBJECT
    assert set(attachments(msg)) == {"metrics.json", "best.json"}  # type: ignore[arg-type]


def test_outbox_only_keeps_the_mail_from_a_configured_server(
    workspace: Path, mailbox: Mailbox, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """Under Jenkins, job5's email-ext mails: the script must not send a second copy."""
    use_server(monkeypatch, mailbox.port)

    assert notify.main(["--workspace", str(workspace), "--outbox-only"]) == 0

    assert mailbox.envelopes == []
    (kept,) = outbox(workspace)
    assert "--outbox-only" in capsys.readouterr().out
    msg = email.message_from_bytes(kept.read_bytes(), policy=default_policy)
    assert msg["Subject"] == SUBJECT


def test_outbox_never_overwrites(workspace: Path) -> None:
    assert notify.main(["--workspace", str(workspace)]) == 0
    assert notify.main(["--workspace", str(workspace), "--event", "best-model"]) == 0
    assert len(outbox(workspace)) == 2


def test_unreachable_server_exit_1_kept(workspace: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS_ENV}
    env |= {
        "PYTHONPATH": str(REPO),
        "SMTP_HOST": "127.0.0.1",
        "SMTP_PORT": str(free_port()),  # nothing listens there
        "NOTIFY_TO": "ops@example.com",
    }
    result = subprocess.run(
        [sys.executable, "-m", "ct.pipeline.notify", "--workspace", str(workspace)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert len(result.stderr.splitlines()) == 1
    assert "ConnectionRefusedError" in result.stderr
    kept = outbox(workspace)
    assert len(kept) == 1 and str(kept[0]) in result.stderr
    msg = email.message_from_bytes(kept[0].read_bytes(), policy=default_policy)
    assert msg["Subject"] == SUBJECT and msg["To"] == "ops@example.com"


def test_failed_event_without_metrics(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path / "ws")
    (ws / "metrics.json").unlink()
    args = ["--workspace", str(ws), "--event", "failed", "--note", "job3: container OOM-killed"]
    assert notify.main(args) == 0
    msg = email.message_from_bytes(outbox(ws)[0].read_bytes(), policy=default_policy)
    assert msg["Subject"] == "[CT] the pipeline failed at a1b2c3d"
    text = msg.get_body(preferencelist=("plain",)).get_content()  # type: ignore[union-attr]
    assert "job3: container OOM-killed" in text and "metrics.json is missing" in text


def test_dry_run_writes_nothing(workspace: Path, capsys: Any) -> None:
    assert notify.main(["--workspace", str(workspace), "--dry-run"]) == 0
    assert f"Subject: {SUBJECT}" in capsys.readouterr().out
    assert outbox(workspace) == []


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("env", "complaint"),
    [
        ({"SMTP_HOST": "127.0.0.1"}, "NOTIFY_TO"),
        ({"SMTP_PORT": "smtp"}, "SMTP_PORT"),
        ({"SMTP_PORT": "70000"}, "SMTP_PORT"),
        ({"SMTP_STARTTLS": "maybe"}, "SMTP_STARTTLS"),
    ],
)
def test_bad_settings_exit_2(
    workspace: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: Any,
    env: dict[str, str],
    complaint: str,
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert notify.main(["--workspace", str(workspace)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and complaint in err
    assert outbox(workspace) == []


def test_garbled_metrics_exit_2(workspace: Path, capsys: Any) -> None:
    (workspace / "metrics.json").write_text("{oops")
    assert notify.main(["--workspace", str(workspace)]) == 2
    assert "metrics.json is not valid JSON" in capsys.readouterr().err
    assert outbox(workspace) == []


@pytest.mark.parametrize("args", [["--event", "party"], ["--bogus"], []])
def test_bad_flags_exit_2(workspace: Path, args: list[str]) -> None:
    if args:
        args = ["--workspace", str(workspace), *args]
    with pytest.raises(SystemExit) as stop:
        notify.main(args)
    assert stop.value.code == 2


# ---------------------------------------------------------------- I/O errors: one line


def notify_cli(ws: Path, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return run_module("ct.pipeline.notify", "--workspace", str(ws), *args, **kwargs)


def test_outbox_that_cannot_be_written_is_one_line(workspace: Path) -> None:
    (workspace / "outbox").write_text("a file where the folder must be\n")
    before = snapshot(workspace)

    result = notify_cli(workspace)

    assert_one_line_error(
        result, f"cannot keep the message in {workspace / 'outbox'}", "Not a directory"
    )
    assert result.stdout == "" and snapshot(workspace) == before


def test_failed_mail_and_unwritable_outbox_is_one_line(workspace: Path) -> None:
    (workspace / "outbox").write_text("a file where the folder must be\n")
    before = snapshot(workspace)
    env = {"SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(free_port()), "NOTIFY_TO": "ops@example.com"}

    result = notify_cli(workspace, env=env)  # nothing listens on that port

    assert_one_line_error(result, "mailing via 127.0.0.1", "ConnectionRefusedError",
                          "cannot keep the message", "Not a directory")  # fmt: skip
    assert snapshot(workspace) == before


def test_notify_on_a_read_only_workspace(
    readonly_workspace: Path, other_user: tuple[str, ...]
) -> None:
    ws = make_workspace(readonly_workspace, 81.27)
    assert promote.main(["--workspace", str(ws)]) == 0
    make_read_only(ws)
    before = snapshot(ws)

    result = notify_cli(ws, user=other_user)

    assert_one_line_error(result, "cannot keep the message", "Permission denied", "nothing written")
    assert snapshot(ws) == before


def test_unreadable_attachment_is_one_line(
    readonly_workspace: Path, other_user: tuple[str, ...]
) -> None:
    ws = make_workspace(readonly_workspace, 81.27)
    assert promote.main(["--workspace", str(ws)]) == 0
    (ws / "best.json").chmod(0o000)

    result = notify_cli(ws, "--dry-run", user=other_user)

    assert_one_line_error(result, f"cannot read {ws / 'best.json'}", "Permission denied")
    assert result.stdout == ""


def test_the_reported_runs_curves_are_attached_when_present(workspace: Path) -> None:
    from tests.test_report import tiny_png

    assert notify.main(["--workspace", str(workspace)]) == 0
    (first,) = outbox(workspace)
    msg = email.message_from_bytes(first.read_bytes(), policy=default_policy)
    assert [p.get_filename() for p in msg.iter_attachments()] == ["metrics.json", "best.json"]

    png = tiny_png()
    (workspace / "runs" / "r1" / "curves.png").write_bytes(png)  # r1: the run metrics.json names
    assert notify.main(["--workspace", str(workspace)]) == 0
    (second,) = [p for p in outbox(workspace) if p != first]
    msg = email.message_from_bytes(second.read_bytes(), policy=default_policy)
    parts = {p.get_filename(): p for p in msg.iter_attachments()}
    assert list(parts) == ["metrics.json", "best.json", "curves.png"]
    assert parts["curves.png"].get_content_type() == "image/png"
    assert parts["curves.png"].get_content() == png
