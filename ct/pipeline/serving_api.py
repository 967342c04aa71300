"""The host's view of the model service (ct.serving, `python -m ct.serving`): its URL, and its
GET /healthz and GET /model answers, read as untrusted input. Standard library only; used by
ct.pipeline.deploy.

Whatever answers on the port is checked before anything is believed: the body's size, JSON, the
type and length of every field used. A service that answers something else is a one-line reason,
never a traceback, and nothing it says reaches a file or a shell unchecked.
"""

from __future__ import annotations

import json
import math
import os
import re
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ct import untrusted

DEFAULT_PORT = "8500"  # CT_SERVE_PORT's default when this module runs outside the job scripts
MAX_ANSWER = 256 * 1024  # a /model answer is a few hundred bytes; more is not ct.serving
REQUEST_TIMEOUT_S = 3.0  # one GET; the deploy's total wait is --timeout
SHA256 = re.compile(r"[0-9a-f]{64}")
_URL_PATH = re.compile(r"[A-Za-z0-9._~/-]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
SMOKE_FIELDS = ("images", "accuracy", "expected", "p50_ms", "p99_ms")

# Loopback calls must not go through an http_proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ServiceDown(Exception):
    """Nothing answers at the URL (refused, timed out); the text says what happened."""


class BadAnswer(Exception):
    """Something answered, but not as ct.serving does; the text says what was wrong."""


def one_line(value: Any, limit: int = 300) -> str:
    """Untrusted text made safe to print and mail: no control characters, one line, bounded."""
    text = " ".join(_CONTROL.sub(" ", str(value)).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def service_url(given: str | None, env: Mapping[str, str] = os.environ) -> str:
    """The service's base URL: --url, else CT_SERVE_URL, else http://127.0.0.1:CT_SERVE_PORT.
    ValueError (one line) for anything but a plain http(s) URL."""
    url = (given or env.get("CT_SERVE_URL") or "").strip()
    if not url:
        port = env.get("CT_SERVE_PORT", "").strip() or DEFAULT_PORT
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"CT_SERVE_PORT {port!r} is not a port number; set it to e.g. 8500")
        url = f"http://127.0.0.1:{port}"
    if not _plain_url(url):
        raise ValueError(f"service URL {one_line(url, 100)!r} is not a plain http(s)://host:port "
                         "URL; set CT_SERVE_URL (or --url) to e.g. http://127.0.0.1:8500")
    return url.rstrip("/")


def _plain_url(url: str) -> bool:
    parts = urlsplit(url)
    try:
        port_ok = parts.port is not None or ":" not in parts.netloc.rsplit("]", 1)[-1]
    except ValueError:  # a port that is no number, or out of range
        return False
    return (parts.scheme in ("http", "https") and bool(parts.hostname) and port_ok
            and "@" not in parts.netloc and "?" not in url and "#" not in url
            and _URL_PATH.fullmatch(parts.path) is not None
            and re.search(r"[\s\x00-\x1f]", url) is None)


def get_json(url: str, path: str, timeout: float = REQUEST_TIMEOUT_S) -> tuple[int, Any]:
    """GET url+path: (HTTP status, the JSON body). ServiceDown when nothing answers, BadAnswer
    when the body is too large or not JSON."""
    try:
        with _OPENER.open(url + path, timeout=timeout) as response:
            status, body = response.status, response.read(MAX_ANSWER + 1)
    except urllib.error.HTTPError as err:  # 4xx/5xx still carry ct.serving's JSON
        status, body = err.code, err.read(MAX_ANSWER + 1)
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise ServiceDown(f"nothing answers at {url} ({one_line(reason, 120)})") from None
    if len(body) > MAX_ANSWER:
        raise BadAnswer(f"{url}{path} answered more than {MAX_ANSWER} bytes")
    try:
        return status, json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise BadAnswer(f"{url}{path} answered HTTP {status} without JSON") from None


def answers(url: str) -> bool:
    """Something speaking HTTP with JSON answers GET /healthz (200 with a model, 503 without)."""
    try:
        get_json(url, "/healthz")
    except (ServiceDown, BadAnswer):
        return False
    return True


# ---------------------------------------------------------------- GET /model


@dataclass(frozen=True)
class Swap:
    """The service's last answer to a wanted.json request."""

    request: str
    ok: bool
    reason: str
    smoke: dict[str, float]
    at: str


@dataclass(frozen=True)
class Served:
    """What the service serves now (sha256 None: no model loaded) and its last swap."""

    sha256: str | None
    commit: str
    accuracy: float | None
    swap: Swap | None


def _text(obj: Mapping[str, Any], key: str, limit: int, what: str) -> str:
    value = obj.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadAnswer(f"{what}.{key} is a {type(value).__name__}, not text")
    return one_line(value, limit)


def number(value: Any) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def _model(obj: Any) -> tuple[str | None, str, float | None]:
    if obj is None:
        return None, "", None
    if not isinstance(obj, dict):
        raise BadAnswer(f"model is a {type(obj).__name__}, not an object or null")
    sha = obj.get("sha256")
    if not isinstance(sha, str) or not SHA256.fullmatch(sha):
        raise BadAnswer("model.sha256 is not a sha256 (64 lowercase hex digits)")
    return sha, _text(obj, "commit", 64, "model"), number(obj.get("accuracy"))


def _swap(obj: Any) -> Swap | None:
    if obj is None:
        return None
    if not isinstance(obj, dict):
        raise BadAnswer(f"swap is a {type(obj).__name__}, not an object or null")
    request, ok = obj.get("request"), obj.get("ok")
    if request is None:  # a wanted.json the service could not read names no request
        request = ""
    elif not isinstance(request, str) or not 0 < len(request) <= 128:
        raise BadAnswer("swap.request is not a request id (text, 1 to 128 characters, or null)")
    if not isinstance(ok, bool):
        raise BadAnswer(f"swap.ok is {type(ok).__name__}, not true or false")
    smoke_obj = obj.get("smoke")
    smoke: dict[str, float] = {}
    if isinstance(smoke_obj, dict):
        smoke = {key: value for key in SMOKE_FIELDS
                 if (value := number(smoke_obj.get(key))) is not None}
    elif smoke_obj is not None:
        raise BadAnswer("swap.smoke is neither an object nor null")
    return Swap(request=request, ok=ok, reason=_text(obj, "reason", 300, "swap"), smoke=smoke,
                at=_text(obj, "at", 40, "swap"))


def parse_model_answer(status: int, body: Any) -> Served:
    """GET /model's answer, checked: {"model": {...}|null, "previous": ..., "swap": {...}|null}."""
    if status not in (200, 503):
        raise BadAnswer(f"GET /model answered HTTP {status}")
    if not isinstance(body, dict) or "model" not in body or "swap" not in body:
        raise BadAnswer("GET /model's answer has no \"model\" and \"swap\": not ct.serving")
    sha, commit, accuracy = _model(body["model"])
    return Served(sha256=sha, commit=commit, accuracy=accuracy, swap=_swap(body["swap"]))


def served(url: str) -> Served:
    """GET url/model, checked. ServiceDown or BadAnswer otherwise."""
    try:
        return parse_model_answer(*get_json(url, "/model"))
    except BadAnswer as err:
        raise BadAnswer(f"the service at {url} does not answer as ct.serving does: {err}"
                        ) from None


def smoke_text(smoke: Mapping[str, float]) -> str:
    """'smoke 80.4% on 500 images (expected 80.4%), p99 3.1 ms' from what the service said."""
    if not smoke:
        return "no smoke test figures"
    parts = []
    if "accuracy" in smoke:
        images = f" on {smoke['images']:g} images" if "images" in smoke else ""
        expected = f" (expected {smoke['expected']:g}%)" if "expected" in smoke else ""
        parts.append(f"smoke {smoke['accuracy']:g}%{images}{expected}")
    if "p99_ms" in smoke:
        parts.append(f"p99 {smoke['p99_ms']:g} ms")
    return ", ".join(parts) or "no smoke test figures"


# ---------------------------------------------------------------- the local runtime's process


def local_pid(pid_file: str | os.PathLike[str], workspace: str | os.PathLike[str]) -> int | None:
    """The pid the pid file names when that process is alive and is `python -m ct.serving` for
    this workspace (its command line says so), else None: a stale file, or a pid the system
    gave to another process since, is never taken for the service."""
    try:  # a plain file of a few digits, never a link or a FIFO (ct.untrusted)
        text = untrusted.read_bytes(Path(pid_file), 32).decode("ascii").strip()
    except (untrusted.UntrustedFile, UnicodeDecodeError):
        return None
    if not text.isdigit() or int(text) <= 1:
        return None
    try:
        with open(f"/proc/{int(text)}/cmdline", "rb") as handle:
            argv = handle.read(1 << 16).split(b"\0")
    except OSError:
        return None
    wanted = os.fsencode(os.path.realpath(workspace))
    ours = b"ct.serving" in argv and any(os.path.realpath(a) == wanted for a in argv if a)
    return int(text) if ours else None
