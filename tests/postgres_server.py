"""A real PostgreSQL server for the tests: the Debian `postgresql` package's binaries, a cluster in
a temporary folder, listening on a free loopback port (and a socket in that folder), stopped after.

As root the server runs as the package's `postgres` user (initdb refuses root); otherwise as the
caller. Trust authentication on loopback only: the URL still carries a password, as a user's
would, so the tests can check that no log line shows it.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server could be started here; the message says why."""


def _bin_dir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        raise PostgresUnavailable("PostgreSQL is not installed (apt-get install -y postgresql)")
    return Path(found[-1]).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_server_user(cmd: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return cmd
    try:
        pwd.getpwnam("postgres")
    except KeyError as exc:
        raise PostgresUnavailable("running as root and there is no postgres user") from exc
    return ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", *cmd]


@contextmanager
def postgres_server() -> Iterator[str]:
    """Start a server; yield a SQLAlchemy URL (postgresql+psycopg2://...) of an empty database."""
    bin_dir = _bin_dir()
    root = Path(tempfile.mkdtemp(prefix="ct-pg-"))
    data, port = root / "data", _free_port()
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    os.chmod(root, 0o755)
    try:
        subprocess.run(_as_server_user([str(bin_dir / "initdb"), "-D", str(data), "-U", "ct",
                                        "--auth=trust", "--no-sync", "-E", "UTF8"]),
                       check=True, capture_output=True, text=True)
        options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
        started = subprocess.run(_as_server_user([str(bin_dir / "pg_ctl"), "-D", str(data), "-o",
                                                  options, "-l", str(root / "server.log"), "-w",
                                                  "-t", "60", "start"]),
                                 capture_output=True, text=True)
        if started.returncode != 0:
            log = (root / "server.log").read_text() if (root / "server.log").exists() else ""
            raise PostgresUnavailable(f"pg_ctl start failed: {started.stderr} {log[-500:]}")
        try:
            yield f"postgresql+psycopg2://ct:not-a-real-secret@127.0.0.1:{port}/postgres"
        finally:
            subprocess.run(_as_server_user([str(bin_dir / "pg_ctl"), "-D", str(data), "-m",
                                            "immediate", "stop"]), capture_output=True)
    except subprocess.CalledProcessError as exc:
        raise PostgresUnavailable(f"{exc.cmd[0]} failed: {exc.stderr}") from exc
    finally:
        shutil.rmtree(root, ignore_errors=True)
