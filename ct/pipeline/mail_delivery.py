"""Where the pipeline's mail goes (ct.pipeline.notify's transport; standard library only): the
SMTP settings from the environment (SMTP_HOST, SMTP_PORT, SMTP_STARTTLS, SMTP_USER,
SMTP_PASSWORD, NOTIFY_FROM, NOTIFY_TO), sending, and W/outbox/ when there is no server or
sending fails. What a message says is ct.pipeline.notify's.
"""

from __future__ import annotations

import os
import re
import smtplib
import ssl
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.message import EmailMessage
from pathlib import Path

from ct import atomic, untrusted
from ct import workspace as names
from ct.pipeline.errors import PipelineError

SMTP_TIMEOUT_S = 30
SMTP_SSL_PORT = 465
# The defaults of SMTP_PORT and NOTIFY_FROM: written here only.
DEFAULT_PORT = "25"
DEFAULT_FROM = "ct-pipeline@localhost"
OUTBOX = names.OUTBOX_DIR
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


class NotifyError(PipelineError):
    """Bad settings or input; its text is the one line printed on stderr (exit 2)."""


@dataclass(frozen=True)
class SmtpSettings:
    """The SMTP configuration, read once from the environment."""

    host: str
    port: int
    starttls: bool
    user: str
    password: str = field(repr=False)
    sender: str
    recipients: tuple[str, ...]

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> SmtpSettings:
        host = env.get("SMTP_HOST", "").strip()
        recipients = tuple(a.strip() for a in env.get("NOTIFY_TO", "").split(",") if a.strip())
        if host and not recipients:
            raise NotifyError("SMTP_HOST is set but NOTIFY_TO is empty; set NOTIFY_TO=a@b[,c@d]")
        return cls(
            host=host,
            port=_port(env.get("SMTP_PORT", "").strip() or DEFAULT_PORT),
            starttls=_flag("SMTP_STARTTLS", env.get("SMTP_STARTTLS", "")),
            user=env.get("SMTP_USER", ""),
            password=env.get("SMTP_PASSWORD", ""),
            sender=env.get("NOTIFY_FROM", "").strip() or DEFAULT_FROM,
            recipients=recipients,
        )

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def _port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise NotifyError(f"SMTP_PORT {text!r} is not a port number; set it to e.g. 25, 587, 465")
    return int(text)


def _flag(name: str, text: str) -> bool:
    value = text.strip().lower()
    if value not in _TRUE + _FALSE:
        raise NotifyError(f"{name} {text!r} is not true or false; set {name}=true or {name}=false")
    return value in _TRUE


def short_commit(commit: str) -> str:
    """The commit's first 7 hex digits (the commit may come from metrics.json: in a file name
    and a subject, nothing else of it is used)."""
    return commit[:7] if re.fullmatch(r"[0-9a-f]{7,64}", commit or "") else "nocommit"


def keep_in_outbox(workspace: Path, msg: EmailMessage, commit: str) -> Path:
    """Write the message to W/outbox/<UTC time>-<commit7>.eml, never over an older one."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    stem = f"{stamp}-{short_commit(commit)}"
    try:  # outbox/ a link would put the message (and its attachments) outside the workspace
        outbox = untrusted.real_folder(workspace, OUTBOX, create=True)
    except untrusted.UntrustedFile as err:
        raise NotifyError(f"cannot keep the message in {err.path} ({err.cause}); nothing "
                          f"written; move {err.path} away, then rerun") from None
    path = outbox / f"{stem}.eml"
    count = 1
    while os.path.lexists(path):
        count += 1
        path = outbox / f"{stem}-{count}.eml"
    try:
        atomic.write_files({path: msg.as_bytes()})
    except atomic.WriteError as err:
        raise NotifyError(
            f"cannot keep the message in {err.target} ({err.reason}); nothing written; make "
            f"{workspace / OUTBOX} writable for this user (or move what is in the way), then rerun"
        ) from None
    return path


def send(msg: EmailMessage, settings: SmtpSettings) -> None:
    """Deliver through the configured server; raises OSError or smtplib.SMTPException."""
    client: smtplib.SMTP
    if settings.port == SMTP_SSL_PORT:
        context = ssl.create_default_context()
        client = smtplib.SMTP_SSL(
            settings.host, settings.port, timeout=SMTP_TIMEOUT_S, context=context
        )
    else:
        client = smtplib.SMTP(settings.host, settings.port, timeout=SMTP_TIMEOUT_S)
    with client:
        if settings.starttls and settings.port != SMTP_SSL_PORT:
            client.starttls(context=ssl.create_default_context())
        if settings.user:
            client.login(settings.user, settings.password)
        client.send_message(msg, from_addr=settings.sender, to_addrs=list(settings.recipients))


def describe_failure(err: Exception, settings: SmtpSettings) -> str:
    text = f"{type(err).__name__}: {err}".replace("\n", " ")
    return text.replace(settings.password, "***") if settings.password else text


def deliver(workspace: Path, msg: EmailMessage, commit: str, settings: SmtpSettings,
            outbox_only: bool = False) -> int:
    if outbox_only or not settings.host:
        path = keep_in_outbox(workspace, msg, commit)
        why = "--outbox-only (Jenkins mails this one)" if outbox_only else "no SMTP_HOST set"
        print(f"ct.notify: {why}; message kept in {path}")
        return 0
    try:
        send(msg, settings)
    except (OSError, smtplib.SMTPException) as err:
        reason = describe_failure(err, settings)
        try:
            path = keep_in_outbox(workspace, msg, commit)
        except NotifyError as keep_err:
            failed = f"mailing via {settings.address} failed ({reason})"
            raise NotifyError(f"{failed}, and {keep_err}") from None
        print(
            f"ct.notify: mailing via {settings.address} failed ({reason}); message kept in {path}",
            file=sys.stderr,
        )
        return 1
    recipients = ", ".join(settings.recipients)
    print(f"ct.notify: mailed {recipients} via {settings.address}: {msg['Subject']}")
    return 0
