"""Which model serves, and changing it: the service polls WS/serving/wanted.json (the deploy
step writes {"request", "model", "sha256"}), loads a new request's model BESIDE the current one,
smoke-tests it, and only then swaps the reference; a failure keeps the current model. Either
way the outcome is GET /model's "swap" (request, ok, reason, smoke, at).

Loading and the smoke test run in a thread, so requests keep being answered meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ct.serving import files
from ct.serving.model import Model, ModelError, load_champion, smoke_test, utc_now
from ct.serving.settings import Settings

WANTED = Path("serving") / "wanted.json"
MAX_WANTED_BYTES = 64 << 10


@dataclass
class State:
    """The model serving now (one reference, replaced in one assignment), the one before it,
    and the last swap's outcome."""

    current: Model | None = None
    previous: dict[str, Any] | None = None
    swap: dict[str, Any] | None = None
    swaps: dict[str, int] = field(default_factory=lambda: {"ok": 0, "failed": 0})

    def install(self, model: Model) -> None:
        if self.current is not None:
            self.previous = self.current.info()
        self.current = model

    def record(self, request: str | None, ok: bool, reason: str, model: str | None,
               smoke: dict[str, Any] | None) -> None:
        self.swap = {"request": request, "ok": ok, "reason": reason, "model": model,
                     "smoke": smoke, "at": utc_now()}
        self.swaps["ok" if ok else "failed"] += 1
        print(f"ct.serving: swap {request}: {'ok' if ok else 'failed'}: {reason}",
              file=sys.stderr, flush=True)

    def describe(self) -> dict[str, Any]:
        """GET /model's answer."""
        current = None if self.current is None else self.current.info()
        return {"model": current, "previous": self.previous, "swap": self.swap}


class Watcher:
    """Polls wanted.json; a change of its content is a request to handle."""

    def __init__(self, workspace: Path, settings: Settings, state: State) -> None:
        self.workspace, self.settings, self.state = workspace, settings, state
        self.seen_content: bytes | None = None
        self.unreadable: str | None = None  # told once, not at every poll

    async def run(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.check)
            except Exception as exc:  # the watcher outlives any one bad look
                self._refuse_once(f"cannot handle {WANTED} ({type(exc).__name__}: {exc})")
            await asyncio.sleep(self.settings.poll_s)

    def check(self) -> None:
        """Handle wanted.json when its content changed since the last look (a rewrite of the
        same request is no new request). The content is compared, not the file's times: two
        writes within one tick of the file system's clock, of the same size, look alike to
        stat, and the file is small."""
        path = self.workspace / WANTED
        try:
            os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            return  # nothing asked yet: serve what serves
        except OSError as exc:
            return self._refuse_once(f"cannot read {path}: {exc.strerror}")
        try:
            content = files.read_plain(path, MAX_WANTED_BYTES)
        except files.UnsafeFile as exc:
            return self._refuse_once(str(exc))
        self.unreadable = None
        if content == self.seen_content:
            return
        self.seen_content = content
        self.handle(content)

    def _refuse_once(self, reason: str) -> None:
        """An unreadable wanted.json is told once, not at every poll."""
        if reason != self.unreadable:
            self.unreadable = reason
            self._refuse(None, reason)

    def handle(self, content: bytes) -> None:
        try:
            wanted = json.loads(content)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return self._refuse(None, f"{WANTED} is not JSON ({exc})")
        request = wanted.get("request") if isinstance(wanted, dict) else None
        request = request if isinstance(request, str) else None
        name = wanted.get("model") if isinstance(wanted, dict) else None
        sha = wanted.get("sha256") if isinstance(wanted, dict) else None
        if request is None or not isinstance(name, str) or not isinstance(sha, str):
            return self._refuse(request, f'{WANTED} is not {{"request", "model", "sha256"}} '
                                "strings")
        current = self.state.current
        if current is not None and current.sha256 == sha and name == current.name:
            smoke = current.smoke.record() if current.smoke else None
            return self.state.record(request, True, f"already serving {current.id}",
                                     current.id, smoke)
        self.try_candidate(request, name, sha)

    def try_candidate(self, request: str, name: str, sha: str) -> None:
        try:
            candidate = load_champion(self.workspace, name, sha, self.settings.onnx_threads)
            smoke = smoke_test(candidate, self.settings.smoke_p99_ms)
        except ModelError as exc:
            keeping = self._keeping()
            return self.state.record(request, False, f"{exc}{keeping}", sha[:16], None)
        candidate.smoke = smoke
        if not smoke.ok:
            return self.state.record(request, False, f"{smoke.reason}{self._keeping()}",
                                     candidate.id, smoke.record())
        self.state.install(candidate)
        self.state.record(request, True, smoke.reason, candidate.id, smoke.record())

    def _keeping(self) -> str:
        current = self.state.current
        return "; no model serves" if current is None else f"; {current.id} keeps serving"

    def _refuse(self, request: str | None, reason: str) -> None:
        self.state.record(request, False, f"{reason}{self._keeping()}", None, None)
