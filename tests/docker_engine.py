"""A real Docker engine for the tests, and a base image built without a registry.

There is no registry here, so the base image is made from scratch and cached between runs under
``${CT_TEST_CACHE:-/var/cache/ct-tests}`` (outside the clone):

1. ``debootstrap --variant=minbase bookworm`` into a rootfs, kept as a tarball;
2. ``docker import`` of that tarball;
3. ``docker build --network host`` on it: python3 + a venv with the local CPU torch wheel and numpy
   from PyPI (the host's CA bundle is copied into a temporary build context, never into the repo).

A second base, for Dockerfile.serve, is built on the same rootfs when a test asks for it
(``ensure_serve_base_image``): python3 + a venv with requirements-serve.txt's pins and no torch.
Both bases hold every pin their Dockerfiles install, so the builds the tests run need no network.

The engine itself is a ``dockerd`` started with its data root in the cache (so images survive the
run) and stopped by PID when the last pytest session using it ends. Run this module directly to
warm the cache: ``python -m tests.docker_engine [--serve] [--keep]``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

CACHE = Path(os.environ.get("CT_TEST_CACHE", "/var/cache/ct-tests"))
RUN_DIR = Path(os.environ.get("CT_TEST_RUN_DIR", "/run/ct-tests"))
MIRROR = os.environ.get("CT_TEST_DEBIAN_MIRROR", "http://deb.debian.org/debian")
WHEEL_DIR = Path(os.environ.get("CT_TEST_WHEEL_DIR", "/opt/wheels"))
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
ROOTFS_IMAGE = "ct-test-rootfs:bookworm"
# The same rootfs without apt's package cache and lists, documentation, manuals and locales, as
# the Debian "slim" images are: the serving image's size is asserted, and on the full rootfs it
# would count some 110 MB that python:3.11-slim-bookworm does not have.
SLIM_ROOTFS_IMAGE = "ct-test-rootfs:bookworm-slim"
SLIM_DROPS = ("./var/cache/apt/", "./var/lib/apt/lists/", "./usr/share/doc/", "./usr/share/man/",
              "./usr/share/locale/", "./usr/share/info/")

BASE_DOCKERFILE = """\
FROM {rootfs}
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \\
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates passwd \\
 && rm -rf /var/lib/apt/lists/*
COPY host-ca.crt {wheel} /tmp/build/
RUN python3 -m venv /opt/venv \\
 && PIP_CERT=/tmp/build/host-ca.crt /opt/venv/bin/pip install --no-cache-dir \\
      /tmp/build/{wheel} "numpy>=1.26" {trainer} {tune} \\
 && rm -rf /tmp/build
ENV PATH=/opt/venv/bin:$PATH
"""

# What python:3.11-slim-bookworm gives Dockerfile.serve (python, pip, useradd), plus the pins of
# requirements-serve.txt, which the image's own install then finds satisfied. dpkg leaves out
# documentation as the slim images' dpkg configuration does.
SERVE_BASE_DOCKERFILE = """\
FROM {rootfs}
ENV DEBIAN_FRONTEND=noninteractive
RUN printf 'path-exclude /usr/share/%s/*\\n' doc man locale info >/etc/dpkg/dpkg.cfg.d/slim \\
 && apt-get update \\
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates passwd \\
 && apt-get clean && rm -rf /var/lib/apt/lists/*
COPY host-ca.crt /tmp/build/
RUN python3 -m venv /opt/venv \\
 && PIP_CERT=/tmp/build/host-ca.crt /opt/venv/bin/pip install --no-cache-dir {serve} \\
 && rm -rf /tmp/build
ENV PATH=/opt/venv/bin:$PATH
"""


class EngineUnavailable(RuntimeError):
    """No Docker engine could be reached or started; the message says why."""


@dataclass
class Engine:
    host: str  # DOCKER_HOST value
    base_image: str  # a BASE_IMAGE for Dockerfile.train / Dockerfile.tune
    started_here: bool

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "DOCKER_HOST": self.host, "DOCKER_BUILDKIT": "0"}

    def docker(self, *args: str, check: bool = True, timeout: float = 600) -> str:
        proc = subprocess.run(
            ["docker", *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc.stdout


def _log(msg: str) -> None:
    print(f"[docker_engine] {msg}", file=sys.stderr, flush=True)


def _answers(host: str) -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        proc = subprocess.run(
            ["docker", "version", "--format", "{{.Server.Version}}"],
            env={**os.environ, "DOCKER_HOST": host},
            capture_output=True,
            timeout=10,
        )
    except subprocess.TimeoutExpired:
        return False
    return proc.returncode == 0


def _socket_host() -> str:
    return f"unix://{RUN_DIR / 'docker.sock'}"


def _start_dockerd() -> None:
    if shutil.which("dockerd") is None:
        raise EngineUnavailable(
            "no Docker engine answers and dockerd is not installed "
            "(apt-get install -y docker.io debootstrap)"
        )
    if os.geteuid() != 0:
        raise EngineUnavailable("no Docker engine answers and starting dockerd needs root")
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    (CACHE / "docker").mkdir(parents=True, exist_ok=True)
    log = open(CACHE / "dockerd.log", "ab")
    subprocess.Popen(
        [
            "dockerd",
            "--data-root",
            str(CACHE / "docker"),
            "--exec-root",
            str(RUN_DIR / "exec"),
            "--pidfile",
            str(RUN_DIR / "dockerd.pid"),
            "-H",
            _socket_host(),
            "--storage-driver=overlay2",
            "--iptables=false",
            "--ip6tables=false",
        ],
        stdout=log,
        stderr=log,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if _answers(_socket_host()):
            return
        time.sleep(0.3)
    raise EngineUnavailable(f"dockerd did not answer within 60 s; see {CACHE / 'dockerd.log'}")


def _exited(pid: int) -> bool:
    """True once the process is gone. A child of this process (dockerd when this process started
    it) stays a zombie, which still answers kill(pid, 0), until it is reaped: reap it here."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return True
    except ChildProcessError:
        pass  # not our child: its parent (or init) reaps it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _stop_dockerd() -> None:
    pidfile = RUN_DIR / "dockerd.pid"
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, 15)
    for _ in range(150):
        if _exited(pid):
            return
        time.sleep(0.2)


def _rootfs_tar() -> Path:
    tar = CACHE / "bookworm-minbase.tar"
    if tar.exists():
        return tar
    if shutil.which("debootstrap") is None:
        raise EngineUnavailable("debootstrap is not installed (apt-get install -y debootstrap)")
    _log(f"debootstrap bookworm from {MIRROR} (once; cached as {tar})")
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        rootfs = Path(tmp) / "rootfs"
        subprocess.run(
            ["debootstrap", "--variant=minbase", "bookworm", str(rootfs), MIRROR],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        part = CACHE / "bookworm-minbase.tar.part"
        subprocess.run(["tar", "-C", str(rootfs), "-cf", str(part), "."], check=True)
        part.replace(tar)
    return tar


def _wheel() -> Path:
    """The local CPU wheel of the torch requirements.txt pins: the test images then run the torch
    the venv runs and the training image installs."""
    version = torch_pin()
    wheels = sorted(WHEEL_DIR.glob(f"torch-{version}+cpu-cp311-*.whl"))
    if not wheels:
        raise EngineUnavailable(f"no CPU torch {version} wheel for cp311 in {WHEEL_DIR}")
    return wheels[-1]


def torch_pin() -> str:
    """The torch version requirements.txt pins, e.g. "2.13.0"."""
    return next(pin.split("==")[1] for pin in _pins("requirements.txt")
                if pin.startswith("torch=="))


def _pins(file: str) -> list[str]:
    """The project's pins in `file`, e.g. ["matplotlib==3.10.9", ...]."""
    requirements = Path(__file__).resolve().parent.parent / file
    return [spec for line in requirements.read_text().splitlines()
            if "==" in (spec := line.split("#", 1)[0].strip())]


def _has_image(engine: Engine, name: str) -> bool:
    out = engine.docker("images", "-q", name, check=False)
    return bool(out.strip())


def _quoted(pins: list[str]) -> str:
    return " ".join(f'"{pin}"' for pin in pins)


def ensure_base_image(engine: Engine) -> str:
    """Build (once) and return the name of a base image with python and every pin of
    requirements.txt (torch from the local CPU wheel of the pinned version) and
    requirements-tune.txt, which Dockerfile.train and Dockerfile.tune then find satisfied without
    a download: the test engine's builds have no network."""
    wheel = _wheel()
    trainer = [pin for pin in _pins("requirements.txt") if not pin.startswith("torch==")]
    recipe = BASE_DOCKERFILE.format(rootfs=ROOTFS_IMAGE, wheel=wheel.name,
                                    trainer=_quoted(trainer),
                                    tune=_quoted(_pins("requirements-tune.txt")))
    return _build_base(engine, "ct-test-base", recipe, f"python3 + {wheel.name} + numpy", wheel)


def ensure_serve_base_image(engine: Engine) -> str:
    """Build (once) and return a base image for Dockerfile.serve: python3 and a venv with the
    pins of requirements-serve.txt, no torch. Takes the engine's setup lock, as a session's
    start does, so that two sessions do not build it side by side."""
    recipe = SERVE_BASE_DOCKERFILE.format(rootfs=SLIM_ROOTFS_IMAGE,
                                          serve=_quoted(_pins("requirements-serve.txt")))
    with open(CACHE / "engine.setup.lock", "a+") as setup:
        fcntl.flock(setup, fcntl.LOCK_EX)
        try:
            _ensure_slim_rootfs(engine)
            return _build_base(engine, "ct-test-serve-base", recipe, "python3 + serving pins")
        finally:
            fcntl.flock(setup, fcntl.LOCK_UN)


def _build_base(engine: Engine, name: str, recipe: str, what: str,
                wheel: Path | None = None) -> str:
    """Build `recipe` on the rootfs image as NAME:<hash of the recipe> unless that image exists;
    the build context holds the host's CA bundle (and `wheel`), in a temporary folder."""
    tag = f"{name}:" + hashlib.sha256(recipe.encode()).hexdigest()[:12]
    if _has_image(engine, tag):
        return tag
    _ensure_rootfs(engine)
    _log(f"docker build {tag} ({what}; once)")
    with tempfile.TemporaryDirectory(dir=CACHE) as ctx:
        ctx_path = Path(ctx)
        (ctx_path / "Dockerfile").write_text(recipe)
        shutil.copyfile(HOST_CA, ctx_path / "host-ca.crt")
        if wheel is not None:
            try:
                os.link(wheel, ctx_path / wheel.name)
            except OSError:
                shutil.copyfile(wheel, ctx_path / wheel.name)
        proc = subprocess.run(
            ["docker", "build", "--network", "host", "-t", tag, str(ctx_path)],
            env=engine.env,
            capture_output=True,
            text=True,
        )
    if proc.returncode != 0:
        raise EngineUnavailable(f"{name} build failed:\n{proc.stdout[-3000:]}{proc.stderr}")
    return tag


def _ensure_rootfs(engine: Engine) -> None:
    if _has_image(engine, ROOTFS_IMAGE):
        return
    tar = _rootfs_tar()
    _log(f"docker import {tar.name} -> {ROOTFS_IMAGE}")
    with open(tar, "rb") as handle:
        subprocess.run(
            ["docker", "import", "-", ROOTFS_IMAGE],
            stdin=handle,
            env=engine.env,
            check=True,
            stdout=subprocess.DEVNULL,
        )


def _ensure_slim_rootfs(engine: Engine) -> None:
    """Import the cached rootfs tarball again, minus SLIM_DROPS's files (folders stay)."""
    if _has_image(engine, SLIM_ROOTFS_IMAGE):
        return
    tar = _rootfs_tar()
    _log(f"docker import {tar.name} without apt caches and docs -> {SLIM_ROOTFS_IMAGE}")
    proc = subprocess.Popen(["docker", "import", "-", SLIM_ROOTFS_IMAGE], stdin=subprocess.PIPE,
                            env=engine.env, stdout=subprocess.DEVNULL)
    assert proc.stdin is not None
    with proc.stdin, tarfile.open(tar) as source, \
            tarfile.open(fileobj=proc.stdin, mode="w|") as slim:
        for member in source:
            if member.isdir() or not member.name.startswith(SLIM_DROPS):
                slim.addfile(member, source.extractfile(member) if member.isfile() else None)
    if proc.wait() != 0:
        raise EngineUnavailable(f"docker import of {SLIM_ROOTFS_IMAGE} failed")


@contextlib.contextmanager
def engine_session() -> Engine:
    """Yield a running engine with the base image; stop dockerd if this was its last user.

    Several pytest sessions may share the daemon: each holds a shared lock on a file for its
    lifetime; whoever can take it exclusively at the end is the last one and stops the daemon.
    """
    CACHE.mkdir(parents=True, exist_ok=True)
    users = open(CACHE / "engine.users", "a+")
    setup = open(CACHE / "engine.setup.lock", "a+")
    started = False
    try:
        fcntl.flock(setup, fcntl.LOCK_EX)
        try:
            fcntl.flock(users, fcntl.LOCK_SH)
            host = os.environ.get("DOCKER_HOST") or _socket_host()
            if not _answers(host):
                host = _socket_host()
                if not _answers(host):
                    _start_dockerd()
                    started = True
            engine = Engine(host=host, base_image="", started_here=started)
            engine.base_image = ensure_base_image(engine)
        finally:
            fcntl.flock(setup, fcntl.LOCK_UN)
        yield engine
    finally:
        fcntl.flock(setup, fcntl.LOCK_EX)
        try:
            fcntl.flock(users, fcntl.LOCK_UN)
            try:
                fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)
                last = True
            except BlockingIOError:
                last = False
            if last and (RUN_DIR / "dockerd.pid").exists() and _answers(_socket_host()):
                _stop_dockerd()
            fcntl.flock(users, fcntl.LOCK_UN)
        finally:
            fcntl.flock(setup, fcntl.LOCK_UN)
            users.close()
            setup.close()


if __name__ == "__main__":
    t0 = time.monotonic()
    with engine_session() as eng:
        print(f"DOCKER_HOST={eng.host}")
        print(f"BASE_IMAGE={eng.base_image}")
        if "--serve" in sys.argv:
            print(f"SERVE_BASE_IMAGE={ensure_serve_base_image(eng)}")
        print(f"ready in {time.monotonic() - t0:.1f} s")
        if "--keep" in sys.argv:
            # leave the daemon running for interactive use: hold the user lock until stopped
            import signal

            def _interrupt(*_: object) -> None:
                raise KeyboardInterrupt

            signal.signal(signal.SIGTERM, _interrupt)
            print("holding the engine; Ctrl-C or SIGTERM stops it", flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                while True:
                    time.sleep(3600)
