"""The service's web page: HTML, a script and a style sheet of its own origin only (the
Content-Security-Policy default-src 'self' allows nothing inline), and in a real headless
chromium, driven over the DevTools protocol (tests/devtools.py): an image chosen
or dropped shows the top 3 classes with their probabilities and the model that answered."""

from __future__ import annotations

import html
import re
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest

from tests import served_model
from tests.devtools import DevTools
from tests.served_model import Champion, RunningService
from tests.test_predict import picture

Served = tuple[RunningService, Champion]


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    ws = tmp_path_factory.mktemp("page") / "ws"
    champion = served_model.write_champion(ws, 2)
    served_model.want(ws, champion)
    with served_model.running_service(ws) as running:
        yield running, champion


class Inline(HTMLParser):
    """What a strict policy would block: inline scripts and styles, handlers, style attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []
        self.sources: list[str] = []
        self.open: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        names = dict(attrs)
        self.found += [f"{tag} {n}=" for n in names if n.startswith("on") or n == "style"]
        if tag == "style":
            self.found.append("<style>")
        if tag == "script":
            if names.get("src"):
                self.sources.append(str(names["src"]))
            self.open = tag
        if tag == "link" and names.get("rel") == "stylesheet":
            self.sources.append(str(names["href"]))

    def handle_data(self, data: str) -> None:
        if self.open == "script" and data.strip():
            self.found.append("inline <script>")

    def handle_endtag(self, tag: str) -> None:
        self.open = None


def test_the_page_and_its_files_carry_no_inline_code(service: Served) -> None:
    running, _ = service
    page = httpx.get(f"{running.url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert policy.startswith("default-src 'self';") and "unsafe" not in policy
    parsed = Inline()
    parsed.feed(page.text)
    assert parsed.found == []
    assert sorted(parsed.sources) == ["/static/page.css", "/static/page.js"]
    for source, kind in (("/static/page.css", "text/css"), ("/static/page.js",
                                                              "text/javascript")):
        reply = httpx.get(f"{running.url}{source}")
        assert reply.status_code == 200 and reply.headers["content-type"].startswith(kind)
        assert reply.headers["x-content-type-options"] == "nosniff"
    script = httpx.get(f"{running.url}/static/page.js").text
    assert "innerHTML" not in script and "eval(" not in script, "text only, no markup built"


# ---------------------------------------------------------------- in chromium


def text(devtools: DevTools, selector: str) -> str:
    """The element's text as the page shows it (tags dropped, entities decoded)."""
    outer = devtools.call("DOM.getOuterHTML", nodeId=devtools.node(selector))["outerHTML"]
    return html.unescape(" ".join(re.sub(r"<[^>]+>", " ", outer).split()))


def hidden(devtools: DevTools, selector: str) -> bool:
    attributes = devtools.call("DOM.getAttributes", nodeId=devtools.node(selector))
    return "hidden" in attributes["attributes"][0::2]


def wait_until(check: callable, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"the page never showed {what}"
        time.sleep(0.1)


def image_file(folder: Path, name: str = "bird.png") -> Path:
    path = folder / name
    picture("RGB", (120, 90), 7).save(path, "PNG")
    return path


def served_answer(running: RunningService, path: Path) -> dict:
    return httpx.post(f"{running.url}/predict", content=path.read_bytes(),
                      headers={"content-type": "image/png"}).json()


def assert_shows(devtools: DevTools, answer: dict, champion: Champion) -> None:
    wait_until(lambda: not hidden(devtools, "#result"), "a result")
    first = answer["predictions"][0]
    assert text(devtools, "#answer") == f"{first['class']} ({first['probability'] * 100:.1f}%)"
    shown = text(devtools, "#top3")
    expected = " ".join(f"{t['class']} {t['probability'] * 100:.1f}%" for t in first["top3"])
    assert shown == expected
    assert text(devtools, "#answered-by") == champion.id


def test_an_image_chosen_shows_the_top_3_and_the_model(
        service: Served, devtools: DevTools, tmp_path: Path) -> None:
    running, champion = service
    devtools.load(f"{running.url}/")
    assert devtools.policy_messages() == []
    wait_until(lambda: text(devtools, "#model-id") == champion.id, "the serving model")
    assert devtools.style("#drop")["border-top-style"] == "dashed", "the style sheet applies"
    assert hidden(devtools, "#result")

    path = image_file(tmp_path)
    devtools.call("DOM.setFileInputFiles", files=[str(path)], nodeId=devtools.node("#file"))
    assert_shows(devtools, served_answer(running, path), champion)
    assert hidden(devtools, "#error") and devtools.policy_messages() == []
    shot = devtools.screenshot(tmp_path / "page-answer.png")
    preview = shot.crop(devtools.box("#preview"))
    assert len(preview.getcolors(1 << 16) or []) > 4, "the preview of the image is drawn"


def test_an_image_dropped_shows_its_answer_and_a_bad_file_its_error(
        service: Served, devtools: DevTools, tmp_path: Path) -> None:
    running, champion = service
    devtools.load(f"{running.url}/")
    path = image_file(tmp_path, "dropped.png")
    left, top, right, bottom = devtools.box("#drop")
    x, y = (left + right) / 2, (top + bottom) / 2
    data = {"items": [], "files": [str(path)], "dragOperationsMask": 1}
    for kind in ("dragEnter", "dragOver", "drop"):
        devtools.call("Input.dispatchDragEvent", type=kind, x=x, y=y, data=data)
    assert_shows(devtools, served_answer(running, path), champion)

    bad = tmp_path / "notes.png"
    bad.write_text("not a picture")
    devtools.call("DOM.setFileInputFiles", files=[str(bad)], nodeId=devtools.node("#file"))
    wait_until(lambda: not hidden(devtools, "#error"), "an error")
    assert text(devtools, "#error").startswith("not an image")
    assert hidden(devtools, "#result")
    devtools.screenshot(tmp_path / "page-error.png")
