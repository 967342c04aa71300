"""The CT report as Jenkins serves it: a real loopback HTTP server sends Jenkins' Content-Security-
Policy with every file, and a real headless chromium draws the page. The page may run no script
under that policy, so the test reads the browser's computed styles over the DevTools protocol
(DOM and CSS domains, which are not subject to the page's policy) and checks a screenshot's pixels.

Jenkins core jenkins-2.492.1, core/src/main/java/hudson/model/DirectoryBrowserSupport.java:
DEFAULT_CSP_VALUE is "sandbox allow-same-origin; default-src 'none'; img-src 'self'; style-src
'self';", sent (Content-Security-Policy, X-WebKit-CSP, X-Content-Security-Policy) with every file
served from the main domain unless the system property hudson.model.DirectoryBrowserSupport.CSP
overrides it. Cores before jenkins-2.417 sent the stricter "sandbox; default-src 'none'; ..."
(JENKINS-71366 added allow-same-origin); the page must draw right under both.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import os
import re
import select
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from ct.pipeline import report, report_chart
from ct.trainer.run import CIFAR10_CLASSES
from tests.test_per_class import CONFUSION_COLOUR, per_class_workspace
from tests.test_report import Dom, build_workspace

REPO = Path(__file__).resolve().parent.parent
CSP_CORE = "sandbox allow-same-origin; default-src 'none'; img-src 'self'; style-src 'self';"
CSP_SANDBOX = "sandbox; default-src 'none'; img-src 'self'; style-src 'self';"
VIEWPORT = (1200, 1600)
BLACK = (0, 0, 0)


def rgb(hex_colour: str) -> tuple[int, int, int]:
    """#abc or #aabbcc as an (r, g, b) triple."""
    digits = hex_colour.lstrip("#")
    if len(digits) == 3:
        digits = "".join(c * 2 for c in digits)
    return (int(digits[0:2], 16), int(digits[2:4], 16), int(digits[4:6], 16))


def css_rgb(hex_colour: str) -> str:
    """The colour as chromium's computed style writes it."""
    return "rgb({}, {}, {})".format(*rgb(hex_colour))


# ---------------------------------------------------------------- what Jenkins publishes


def publisher_includes() -> list[str]:
    """The ct-report publisher's <includes> patterns, from jenkins/jobs.yaml (HTML Publisher copies
    only the files they match, relative to reportDir, here the workspace)."""
    text = (REPO / "jenkins" / "jobs.yaml").read_text()
    section = text.split("name: ct-report", 1)[1]
    found = re.search(r"<includes>([^<]*)</includes>", section)
    assert found, "the ct-report publisher names no <includes>"
    return [p.strip() for p in found.group(1).split(",") if p.strip()]


def published_copy(workspace: Path, dest: Path) -> list[str]:
    """Copy what the publisher's patterns match (Ant globs: dir/** is everything below dir) from
    the workspace to dest, as HTML Publisher does; the files copied, relative."""
    copied = []
    for pattern in publisher_includes():
        if pattern.endswith("/**"):
            matches = [p for p in (workspace / pattern[:-3]).rglob("*") if p.is_file()]
        else:
            matches = [p for p in workspace.glob(pattern) if p.is_file()]
        for src in matches:
            rel = src.relative_to(workspace)
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest / rel)
            copied.append(rel.as_posix())
    return copied


class CspHandler(SimpleHTTPRequestHandler):
    """Serves a folder with the server's current policy on every response, and records requests."""

    server: CspServer

    def end_headers(self) -> None:
        for header in ("Content-Security-Policy", "X-WebKit-CSP", "X-Content-Security-Policy"):
            if self.server.csp:
                self.send_header(header, self.server.csp)
        self.send_header("Cache-Control", "no-store")  # each policy sees fresh responses
        super().end_headers()

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        self.server.requests.append((self.path, int(code) if isinstance(code, int) else 0))

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep the test's output clean; requests are recorded above


class CspServer(ThreadingHTTPServer):
    csp = CSP_CORE
    requests: list[tuple[str, int]]
    root: Path


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[CspServer, str]]:
    """The report of a small workspace, copied as HTML Publisher copies it, served on loopback;
    with a control page: the same report styled the old way (inline <style>, chart colours from
    CSS only). Yields the server and its base URL."""
    root = tmp_path_factory.mktemp("site")
    workspace = build_workspace(root / "ws")
    assert report.main(["--workspace", str(workspace)]) == 0
    served = root / "served"
    copied = published_copy(workspace, served)
    # The style sheet reaches Jenkins only because `report/**` matches it.
    assert {"report/index.html", f"report/{report.STYLESHEET}"} <= set(copied), copied
    assert any(c.endswith("/curves.png") for c in copied)
    (served / "report" / "inline-style.html").write_text(
        inline_style_variant((served / "report" / "index.html").read_text()))
    with serving(served) as found:
        yield found


@pytest.fixture(scope="module")
def per_class_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[CspServer, str]]:
    """The report of a workspace whose best model and latest run record the per-class view,
    copied as HTML Publisher copies it, served on loopback."""
    root = tmp_path_factory.mktemp("per-class-site")
    workspace = per_class_workspace(root / "ws")
    assert report.main(["--workspace", str(workspace)]) == 0
    copied = published_copy(workspace, root / "served")
    assert "report/confusion.png" in copied  # published with the page, unlike the runs' copy
    with serving(root / "served") as found:
        yield found


@contextmanager
def serving(folder: Path) -> Iterator[tuple[CspServer, str]]:
    """A CspServer on loopback serving `folder`: the server and its base URL."""
    server = CspServer(("127.0.0.1", 0), functools.partial(CspHandler, directory=str(folder)))
    server.requests, server.root = [], folder
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


# How the chart was styled before its colours moved onto the shapes: by CSS alone.
OLD_CHART_CSS = """svg .plot { fill: #fff; stroke: #bbb; } svg .grid { stroke: #eee; }
svg .accuracy { fill: none; stroke: #1f6feb; stroke-width: 2; }
svg .threshold { fill: none; stroke: #d1242f; stroke-width: 2; stroke-dasharray: 6 4; }
svg .pass { fill: #1a7f37; } svg .fail { fill: #d1242f; }"""
PRESENTATION = re.compile(r' (fill|stroke|stroke-width|stroke-dasharray)="[^"]*"')


def inline_style_variant(page: str) -> str:
    """The page with its style sheet inline and the chart's colours in that CSS only."""
    css = (REPO / "ct" / "pipeline" / report.STYLESHEET).read_text() + OLD_CHART_CSS
    link = f'<link rel="stylesheet" href="{report.STYLESHEET}">'
    assert link in page
    head, svg_and_rest = page.replace(link, f"<style>{css}</style>").split("<svg ", 1)
    svg, rest = svg_and_rest.split("</svg>", 1)
    return f"{head}<svg {PRESENTATION.sub('', svg)}</svg>{rest}"


# ---------------------------------------------------------------- chromium over DevTools


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


@pytest.fixture
def devtools(browser: str, tmp_path: Path) -> Iterator[DevTools]:
    tools = DevTools(browser, tmp_path)
    try:
        tools.open_page()
        yield tools
    finally:
        tools.close()


def share(image: Image.Image, colour: tuple[int, int, int], tolerance: int = 40) -> float:
    """The fraction of the image's pixels within `tolerance` (each channel) of `colour`."""
    near = sum(count for count, pixel in image.getcolors(image.width * image.height) or []
               if all(abs(a - b) <= tolerance for a, b in zip(pixel, colour, strict=True)))
    return near / (image.width * image.height)


# ---------------------------------------------------------------- the tests


@pytest.mark.parametrize("policy", [CSP_CORE, CSP_SANDBOX], ids=["core-2.492.1", "sandbox"])
def test_the_report_draws_right_under_jenkins_content_security_policy(
        site: tuple[CspServer, str], devtools: DevTools, tmp_path: Path, policy: str) -> None:
    server, base = site
    server.csp = policy
    server.requests.clear()
    devtools.load(f"{base}/report/index.html")

    assert devtools.policy_messages() == []
    seen = dict(server.requests)
    assert seen.get(f"/report/{report.STYLESHEET}") == 200, server.requests
    # every picture the page shows was fetched (img-src 'self' let it through) and served
    page = Dom((server.root / "report" / "index.html").read_text())
    pictures = {"/" + src.removeprefix("../") for src in page.imgs}
    assert len(pictures) == 6 and {p: seen.get(p) for p in pictures} == dict.fromkeys(
        pictures, 200), server.requests
    # The style sheet applied: values that only report.css sets.
    body = devtools.style("body")
    assert (body["font-size"], body["max-width"]) == ("14px", "1200px")
    assert devtools.style("#best")["background-color"] == css_rgb("#fafafa")
    assert devtools.style("#runs-table")["border-collapse"] == "collapse"
    # The chart: lines unfilled in their colours, the plot white, the dots by verdict.
    accuracy = devtools.style("#accuracy-chart polyline.accuracy")
    assert (accuracy["fill"], accuracy["stroke"], accuracy["stroke-width"]) == (
        "none", css_rgb(report_chart.ACCURACY_COLOUR), "2px")
    threshold = devtools.style("#threshold-line")
    assert (threshold["fill"], threshold["stroke"]) == (
        "none", css_rgb(report_chart.THRESHOLD_COLOUR))
    assert threshold["stroke-dasharray"] == "6px, 4px"
    assert devtools.style("#accuracy-chart rect.plot")["fill"] == css_rgb(report_chart.PLOT_FILL)
    assert devtools.style("#accuracy-chart circle.pass")["fill"] == css_rgb(
        report_chart.PASS_COLOUR)
    assert devtools.style("#accuracy-chart circle.fail")["fill"] == css_rgb(
        report_chart.FAIL_COLOUR)

    shot = devtools.screenshot(tmp_path / "report-under-csp.png")
    assert shot.size == VIEWPORT
    chart = shot.crop(devtools.box("#accuracy-chart"))
    assert chart.width > 800 and chart.height > 250, chart.size
    assert share(chart, BLACK) < 0.02, "the chart is drawn black"
    assert share(chart, rgb(report_chart.PLOT_FILL), 8) > 0.5
    assert share(chart, rgb(report_chart.ACCURACY_COLOUR)) > 0.002  # the line is there


def test_the_same_page_with_inline_styles_breaks_under_that_policy(
        site: tuple[CspServer, str], devtools: DevTools, tmp_path: Path) -> None:
    """The control: inline CSS is what the policy blocks, and the checks above would see it."""
    server, base = site
    server.csp = CSP_CORE
    devtools.load(f"{base}/report/inline-style.html")

    assert devtools.policy_messages(), "the browser reported no blocked inline style"
    assert devtools.style("body")["font-size"] == "16px"  # the browser's default
    assert devtools.style("#accuracy-chart polyline.accuracy")["fill"] == css_rgb("#000")
    assert devtools.style("#accuracy-chart rect.plot")["fill"] == css_rgb("#000")
    chart = devtools.screenshot(tmp_path / "inline-style-under-csp.png").crop(
        devtools.box("#accuracy-chart"))
    assert share(chart, BLACK) > 0.5, "the unstyled chart should be a black block"

    server.csp = ""  # no policy at all: the same inline page styles itself
    devtools.load(f"{base}/report/inline-style.html")
    assert devtools.style("body")["font-size"] == "14px"
    assert devtools.style("#accuracy-chart polyline.accuracy")["fill"] == "none"


def test_the_per_class_chart_draws_one_bar_per_class_and_model(
        per_class_site: tuple[CspServer, str], devtools: DevTools, tmp_path: Path) -> None:
    server, base = per_class_site
    server.csp = CSP_CORE
    server.requests.clear()
    devtools.load(f"{base}/report/index.html")

    assert devtools.policy_messages() == []
    assert dict(server.requests).get("/report/confusion.png") == 200, server.requests
    root = devtools.call("DOM.getDocument", depth=0)["root"]["nodeId"]
    heights: dict[str, list[int]] = {}
    for kind, colour in (("best", report.BEST_COLOUR), ("latest", report.LATEST_COLOUR)):
        bars = devtools.call("DOM.querySelectorAll", nodeId=root,
                             selector=f"#per-class-chart rect.bar.{kind}")["nodeIds"]
        assert len(bars) == 10, (kind, len(bars))  # one per class
        for bar in bars:
            style = devtools.call("CSS.getComputedStyleForNode", nodeId=bar)["computedStyle"]
            assert {p["name"]: p["value"] for p in style}["fill"] == css_rgb(colour)
        quads = [devtools.call("DOM.getBoxModel", nodeId=bar)["model"]["border"] for bar in bars]
        heights[kind] = [round(max(q[1::2]) - min(q[1::2])) for q in quads]
    # tests/test_per_class.per_class_workspace: cat 80% then 77%, dog 85% then 86%
    cat, dog = CIFAR10_CLASSES.index("cat"), CIFAR10_CLASSES.index("dog")
    assert heights["best"][cat] > heights["latest"][cat] > 0
    assert heights["latest"][dog] > heights["best"][dog] > 0

    devtools.call("DOM.scrollIntoViewIfNeeded", nodeId=devtools.node("#per-class-chart"))
    chart = devtools.screenshot(tmp_path / "per-class.png").crop(
        devtools.box("#per-class-chart"))
    assert chart.width > 800 and chart.height > 250, chart.size
    assert share(chart, BLACK) < 0.02, "the chart is drawn black"
    for colour in (report.BEST_COLOUR, report.LATEST_COLOUR):
        assert share(chart, rgb(colour), 8) > 0.05, colour  # the bars are there, in colour
    # the confusion matrix: the picture drawn (its solid colour), at report.css' size
    devtools.call("DOM.scrollIntoViewIfNeeded", nodeId=devtools.node("img.confusion"))
    picture = devtools.screenshot(tmp_path / "confusion.png").crop(devtools.box("img.confusion"))
    assert picture.height > 300 and share(picture, CONFUSION_COLOUR, 8) > 0.5
