"""Headless chromium driven over the DevTools protocol, for the tests that look at a page in a
real browser (the report under Jenkins' Content-Security-Policy, the service's page); the
`devtools` fixture (tests/conftest.py) opens one per test."""

from __future__ import annotations

import base64
import io
import json
import os
import select
import subprocess
import time
from pathlib import Path
from typing import Any

from PIL import Image

VIEWPORT = (1200, 1600)


class DevTools:
    """Headless chromium driven over the DevTools protocol on a pipe (--remote-debugging-pipe:
    chromium reads requests on fd 3 and writes answers and events on fd 4, each one JSON text
    ended by a NUL byte). No port, no websocket, no script in the page."""

    def __init__(self, chromium: str, folder: Path) -> None:
        to_browser_r, to_browser_w = os.pipe()
        from_browser_r, from_browser_w = os.pipe()
        self.log = folder / "chromium.log"
        args = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", "--remote-debugging-pipe",
                f"--user-data-dir={folder / 'profile'}", "about:blank"]
        # The flag fixes fds 3 and 4; bash moves this process's pipe ends there (dash cannot
        # redirect file descriptors above 9).
        redirect = f'exec "$@" 3<&{to_browser_r} 4>&{from_browser_w}'
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(["bash", "-c", redirect, "bash", *args],
                                         pass_fds=(to_browser_r, from_browser_w),
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self.writer, self.reader = to_browser_w, from_browser_r
        self.buffer = b""
        self.next_id = 0
        self.events: list[dict[str, Any]] = []
        self.session = ""

    def close(self) -> None:
        os.close(self.writer)  # chromium exits when its pipe closes
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self.reader)

    def call(self, method: str, timeout: float = 30, **params: Any) -> dict[str, Any]:
        """Send one command (to the attached page, once there is one) and return its result."""
        self.next_id += 1
        message: dict[str, Any] = {"id": self.next_id, "method": method, "params": params}
        if self.session:
            message["sessionId"] = self.session
        os.write(self.writer, json.dumps(message).encode() + b"\0")
        reply = self.wait(lambda m: m.get("id") == self.next_id, timeout)
        assert "error" not in reply, f"{method}: {reply['error']}"
        return reply["result"]

    def wait(self, wanted: Any, timeout: float = 30) -> dict[str, Any]:
        """The next message for which wanted(message) is true; events on the way are kept."""
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self.buffer:
                raw, self.buffer = self.buffer.split(b"\0", 1)
                message = json.loads(raw)
                if "method" in message:
                    self.events.append(message)
                if wanted(message):
                    return message
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.reader], [], [], max(left, 0))
            if not ready:
                raise AssertionError(f"chromium did not answer in {timeout} s; see {self.log}")
            chunk = os.read(self.reader, 1 << 20)
            if not chunk:
                raise AssertionError(f"chromium closed its pipe; see {self.log}")
            self.buffer += chunk

    def open_page(self) -> None:
        """A fresh page of VIEWPORT size, with the DOM, CSS, Page and Log domains on."""
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target,
                                 flatten=True)["sessionId"]
        for domain in ("Page", "DOM", "CSS", "Log"):
            self.call(f"{domain}.enable")
        width, height = VIEWPORT
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                  deviceScaleFactor=1, mobile=False)

    def load(self, url: str) -> None:
        self.events.clear()
        result = self.call("Page.navigate", url=url)
        assert not result.get("errorText"), result
        self.wait(lambda m: m.get("method") == "Page.loadEventFired", 60)

    def node(self, selector: str) -> int:
        root = self.call("DOM.getDocument", depth=0)["root"]["nodeId"]
        found = self.call("DOM.querySelector", nodeId=root, selector=selector)["nodeId"]
        assert found, f"no element matches {selector!r}"
        return found

    def style(self, selector: str) -> dict[str, str]:
        """The computed style of the first element that matches, as the browser resolved it."""
        computed = self.call("CSS.getComputedStyleForNode", nodeId=self.node(selector))
        return {p["name"]: p["value"] for p in computed["computedStyle"]}

    def box(self, selector: str) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of the element's border box, in viewport pixels."""
        quad = self.call("DOM.getBoxModel", nodeId=self.node(selector))["model"]["border"]
        xs, ys = quad[0::2], quad[1::2]
        return round(min(xs)), round(min(ys)), round(max(xs)), round(max(ys))

    def screenshot(self, path: Path) -> Image.Image:
        data = base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])
        path.write_bytes(data)
        return Image.open(io.BytesIO(data)).convert("RGB")

    def policy_messages(self) -> list[str]:
        """What the browser logged about the Content-Security-Policy since the last load."""
        texts = [e["params"]["entry"].get("text", "") for e in self.events
                 if e["method"] == "Log.entryAdded"]
        return [t for t in texts if "Content Security Policy" in t]
