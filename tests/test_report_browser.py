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

import functools
import re
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from ct.pipeline import report, report_chart
from ct.trainer.run import CIFAR10_CLASSES
from tests.devtools import VIEWPORT, DevTools
from tests.test_per_class import CONFUSION_COLOUR, per_class_workspace
from tests.test_report import Dom, build_workspace

REPO = Path(__file__).resolve().parent.parent
CSP_CORE = "sandbox allow-same-origin; default-src 'none'; img-src 'self'; style-src 'self';"
CSP_SANDBOX = "sandbox; default-src 'none'; img-src 'self'; style-src 'self';"
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
