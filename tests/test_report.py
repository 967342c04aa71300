"""ct.pipeline.report: the static HTML report, built from a real (small) workspace on disk and
opened by a real headless browser (Debian chromium) from file://, without a server."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from ct.pipeline import gate, promote, report
from tests.gate_workspace import COMMIT, make_workspace, run_module, write_run

DATASET_SHA = "d" * 64


def tiny_png(width: int = 48, height: int = 24,
             rgb: tuple[int, int, int] = (30, 110, 230)) -> bytes:
    """A valid PNG (8-bit RGB), a diagonal stripe on a solid colour, written with the stdlib."""
    rows = []
    for y in range(height):
        row = bytearray([0])  # filter: none
        for x in range(width):
            row += bytes((250, 250, 250)) if abs(x - 2 * y) < 3 else bytes(rgb)
        rows.append(bytes(row))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b""))


def lineage_of(model: bytes, commit: str = COMMIT) -> dict[str, Any]:
    import hashlib

    return {"dataset_sha256": DATASET_SHA, "dataset_form": "archive", "seed": 1,
            "commit": commit, "image": "ct-cifar-train:0123456789ab", "image_id": "sha256:abc",
            "torch": "2.13.0", "device": "cpu (bfloat16, 2 threads)", "threads": 2,
            "model_sha256": hashlib.sha256(model).hexdigest()}


def add_run(ws: Path, run_id: str, accuracy: float, *, mode: str = "train",
            curves: bool = True, lineage: bool = True, finished: bool = True) -> dict[str, Any]:
    """A finished run folder, as the trainer leaves it: model.pt, metrics.json (also at the top
    level, like publish), epochs.jsonl, curves.png (and trials.png for a tuning run)."""
    model = f"model-{run_id}".encode()
    metrics = write_run(ws, accuracy, run_id=run_id, mode=mode, model_bytes=model)
    run_dir = ws / "runs" / run_id
    metrics |= {"finished_at": "2025-05-01T12:00:00+00:00", "resumes": 0}
    if lineage:
        metrics["lineage"] = lineage_of(model)
    if mode == "tune":
        metrics["trials_planned"] = 8
        (run_dir / "trials.png").write_bytes(tiny_png(rgb=(200, 120, 30)))
    (run_dir / "epochs.jsonl").write_text('{"epoch": 1, "loss": 1.2}\n')
    if curves:
        (run_dir / "curves.png").write_bytes(tiny_png())
    if finished:
        (run_dir / "metrics.json").write_text(json.dumps(metrics))
        (ws / "metrics.json").write_text(json.dumps(metrics))
        (ws / "accuracy.txt").write_text(f"{accuracy}\n")
    return metrics


def build_workspace(root: Path, n_runs: int = 4) -> Path:
    """A workspace after a few judged runs: history, a promoted best with lineage, a tuning
    round, job6's status files, and two broken runs (metrics.json missing / corrupt)."""
    ws = make_workspace(root, 70.0, run_id="train-20250101-000000-aaaa")  # before lineage
    first = ws / "runs" / "train-20250101-000000-aaaa"
    (first / "curves.png").write_bytes(tiny_png())
    shutil.copyfile(ws / "metrics.json", first / "metrics.json")
    for i in range(n_runs):
        accuracy = 74.0 + 3 * i
        mode = "tune" if i == 1 else "train"
        run_id = f"{mode}-2025010{i + 2}-000000-{i:04x}"
        add_run(ws, run_id, accuracy, mode=mode)
        assert gate.main(["--workspace", str(ws), "--threshold", "80",
                          "--build-id", str(i + 1)]) == 0
        assert promote.main(["--workspace", str(ws)]) == 0
    missing = ws / "runs" / "train-20250201-000000-dead"
    missing.mkdir()
    (missing / "checkpoint.pt").write_bytes(b"ckpt")
    corrupt = ws / "runs" / "train-20250202-000000-beef"
    corrupt.mkdir()
    (corrupt / "metrics.json").write_text('{"accuracy": 81.5, "run_id": ')
    (ws / "status").mkdir()
    (ws / "status" / "train.properties").write_text(
        "RUNTIME=docker\nRESTARTS=2\nSTATUS=exited\nEXIT_CODE=0\nGAVE_UP=\n")
    (ws / "status" / "tune.properties").write_text(
        "RESTARTS=3\nSTATUS=gave-up\nEXIT_CODE=137\nGAVE_UP=killed after 3 restart(s)\n")
    return ws


class Dom(HTMLParser):
    """The few things the tests look for in a page: elements by id and class, img sources."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.classes: list[str] = []
        self.imgs: list[str] = []
        self.tags: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        self.tags.append(tag)
        if found.get("id"):
            self.ids.add(found["id"] or "")
        self.classes.extend((found.get("class") or "").split())
        if tag == "img":
            self.imgs.append(found.get("src") or "")


# ---------------------------------------------------------------- the page


def test_report_shows_best_history_runs_tuning_and_restarts(tmp_path: Path) -> None:
    ws = build_workspace(tmp_path / "ws")
    proc = run_module("ct.pipeline.report", "--workspace", str(ws))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"ct.report: wrote {ws / 'report' / 'index.html'}"
    page = (ws / "report" / "index.html").read_text()
    dom = Dom(page)
    assert {"best", "history", "runs", "tuning", "restarts", "accuracy-chart",
            "threshold-line"} <= dom.ids
    assert "<script" not in page.lower()
    best = json.loads((ws / "best.json").read_text())
    assert best["run_id"] == "train-20250105-000000-0003"
    card = page.split('id="best"', 1)[1].split("</section>", 1)[0]
    for text in ("83%", COMMIT, DATASET_SHA, "2.13.0", "cpu (bfloat16, 2 threads)",
                 best["model_sha256"], best["promoted_at"], best["run_id"], "lr=0.05"):
        assert text in card, text
    # one row per run folder, newest first; the broken ones listed as unreadable, with why
    rows = re.findall(r'<tr class="run[^"]*" id="run-([^"]+)"', page)
    folders = sorted((p.name for p in (ws / "runs").iterdir()),
                     key=lambda n: re.search(r"-(\d{8}-\d{6})-", n).group(1), reverse=True)
    assert rows == folders and len(rows) == 7
    unreadable = re.findall(r'<tr class="run unreadable" id="run-([^"]+)">.*?</tr>', page)
    assert unreadable == ["train-20250202-000000-beef", "train-20250201-000000-dead"]
    assert "no metrics.json (not finished" in page and "metrics.json is not valid JSON" in page
    # curves by relative path, so the page works from disk and from Jenkins' copy
    assert "../runs/train-20250105-000000-0003/curves.png" in dom.imgs
    assert "../runs/tune-20250103-000000-0001/trials.png" in dom.imgs
    assert all(src.startswith("../runs/") for src in dom.imgs)
    tuning = page.split('id="tuning"', 1)[1].split("</section>", 1)[0]
    assert "optimizer=adamw" in tuning and "4 of 8 (3 finished, 1 pruned)" in tuning
    assert "cifar10-0123456789ab" in tuning, "the round names its study"
    restarts = page.split('id="restarts"', 1)[1].split("</section>", 1)[0]
    assert "gave-up" in restarts and "137" in restarts and "killed after 3 restart(s)" in restarts
    # the chart has a point per judged run (4 gate checks), each with a tooltip
    assert page.count("<circle ") == 4


def test_report_escapes_what_it_shows(tmp_path: Path) -> None:
    ws = build_workspace(tmp_path / "ws", n_runs=1)
    bad = ws / "runs" / "train-20250301-000000-<b>"
    bad.mkdir()
    (bad / "metrics.json").write_text(json.dumps(
        {"accuracy": 50, "mode": "<script>alert(1)</script>", "commit": "<i>x"}))
    assert report.main(["--workspace", str(ws)]) == 0
    page = (ws / "report" / "index.html").read_text()
    assert "<script" not in page.lower() and "&lt;script&gt;alert(1)" in page
    assert "000000-<b>" not in page and "train-20250301-000000-&lt;b&gt;" in page
    assert "<i>x" not in page


def test_empty_workspace_still_gets_a_page(tmp_path: Path) -> None:
    assert report.main(["--workspace", str(tmp_path)]) == 0
    page = (tmp_path / "report" / "index.html").read_text()
    assert "no model has been promoted yet" in page and "no gate results yet" in page


def test_runs_are_limited_to_the_newest(tmp_path: Path) -> None:
    ws = build_workspace(tmp_path / "ws", n_runs=3)
    assert report.main(["--workspace", str(ws), "--runs", "2"]) == 0
    page = (ws / "report" / "index.html").read_text()
    assert len(re.findall(r'<tr class="run', page)) == 2 and "the 4 oldest are not shown" in page


def test_an_unusable_workspace_is_exit_2_with_one_line(tmp_path: Path) -> None:
    proc = run_module("ct.pipeline.report", "--workspace", str(tmp_path / "nope"))
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "is not a directory" in proc.stderr
    (tmp_path / "file").write_text("x")
    proc = run_module("ct.pipeline.report", "--workspace", str(tmp_path / "file"))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1


def test_a_report_folder_in_the_way_is_exit_2_and_the_old_page_stays(tmp_path: Path) -> None:
    ws = build_workspace(tmp_path / "ws", n_runs=1)
    assert report.main(["--workspace", str(ws)]) == 0
    before = (ws / "report" / "index.html").read_bytes()
    (ws / "report" / "index.html").unlink()
    (ws / "report" / "index.html").mkdir()  # something in the way of the page
    proc = run_module("ct.pipeline.report", "--workspace", str(ws))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "cannot write" in proc.stderr
    shutil.rmtree(ws / "report")
    assert report.main(["--workspace", str(ws)]) == 0
    after = (ws / "report" / "index.html").read_bytes()
    assert after.endswith(b"</html>\n") and len(after) > len(before) // 2  # whole, never partial
    assert sorted(p.name for p in (ws / "report").iterdir()) == ["index.html", report.STYLESHEET]


# ---------------------------------------------------------------- under Jenkins' CSP
# Jenkins serves the page with a Content-Security-Policy that allows style sheets from its own
# server only: no <style>, no style attributes, no scripts (tests/test_report_browser.py loads it
# under that policy in a real browser).

STYLESHEET_SOURCE = Path(report.__file__).with_name(report.STYLESHEET)


def test_the_page_links_its_style_sheet_written_beside_it(tmp_path: Path) -> None:
    ws = build_workspace(tmp_path / "ws", n_runs=1)
    assert report.main(["--workspace", str(ws)]) == 0
    page = (ws / "report" / "index.html").read_text()
    assert "<style" not in page and "style=" not in page and "<script" not in page
    assert page.count(f'<link rel="stylesheet" href="{report.STYLESHEET}">') == 1
    css = (ws / "report" / report.STYLESHEET).read_bytes()
    assert css == STYLESHEET_SOURCE.read_bytes() and b"body {" in css


def test_the_chart_carries_its_own_colours(tmp_path: Path) -> None:
    """An SVG shape whose fill nobody set is filled black: every shape says fill (and a line its
    stroke) itself, so the chart draws right even when the style sheet is blocked."""
    ws = build_workspace(tmp_path / "ws", n_runs=2)
    assert report.main(["--workspace", str(ws)]) == 0
    page = (ws / "report" / "index.html").read_text()
    svg = page.split('<svg id="accuracy-chart"', 1)[1].split("</svg>", 1)[0]
    shapes = re.findall(r"<(rect|polyline|circle|text|line)\b([^>]*)>", svg)
    assert {kind for kind, _ in shapes} == {"rect", "polyline", "circle", "text", "line"}
    for kind, attrs in shapes:
        if kind != "line":  # a line has no inside to fill
            assert re.search(r' fill="(none|#[0-9a-f]{3,6})"', attrs), (kind, attrs)
        if kind in ("polyline", "line", "rect"):
            assert re.search(r' stroke="#[0-9a-f]{3,6}"', attrs), (kind, attrs)
    assert re.findall(r'<polyline[^>]* fill="([^"]*)"', svg) == ["none", "none"]
    assert "svg " not in STYLESHEET_SOURCE.read_text(), "the chart's colours have one owner"


def test_a_checkout_without_the_style_sheet_is_exit_2_and_keeps_the_old_page(
        tmp_path: Path) -> None:
    ws = build_workspace(tmp_path / "ws", n_runs=1)
    assert report.main(["--workspace", str(ws)]) == 0
    before = (ws / "report" / "index.html").read_bytes()
    checkout = tmp_path / "checkout"  # this project's code, less the style sheet
    shutil.copytree(Path(report.__file__).parents[2] / "ct", checkout / "ct",
                    ignore=shutil.ignore_patterns("__pycache__", report.STYLESHEET))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CT_")}
    proc = subprocess.run(  # from the checkout, so that `-m` finds its ct first
        [sys.executable, "-m", "ct.pipeline.report", "--workspace", str(ws)], cwd=checkout,
        env=env | {"PYTHONPATH": str(checkout)}, capture_output=True, text=True, timeout=60,
        check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"cannot read the report's style sheet {report.STYLESHEET}" in proc.stderr
    assert (ws / "report" / "index.html").read_bytes() == before


# ---------------------------------------------------------------- a real browser, from disk

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

# The report has no JavaScript; whether its pictures decoded is asked by this wrapper page, in the
# test's temp dir, which frames the report and, on load (after the frame's load), writes each
# image's naturalWidth into its own DOM for --dump-dom. --allow-file-access-from-files lets the
# wrapper read the framed file:// page (otherwise each file is its own origin).
WRAPPER = """<!DOCTYPE html><html><body><iframe id="r" src="REPORT" width="1200" height="1600">
</iframe><pre id="out">pending</pre><script>
window.addEventListener("load", function () {
  var doc = document.getElementById("r").contentDocument;
  var images = Array.prototype.slice.call(doc.images);
  document.getElementById("out").textContent = JSON.stringify(images.map(function (i) {
    return [i.getAttribute("src"), i.complete, i.naturalWidth]; }));
});
</script></body></html>"""


def chromium(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CHROMIUM or "chromium", "--headless", "--no-sandbox", "--disable-gpu",
         "--disable-dev-shm-usage", "--no-first-run", f"--user-data-dir={cwd / 'profile'}",
         *args], capture_output=True, text=True, timeout=120, check=False, cwd=cwd)


def png_size_and_variety(data: bytes) -> tuple[int, int, int]:
    """(width, height, distinct byte values in the decompressed image data) of a PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    pos, idat = 8, b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        if data[pos + 4:pos + 8] == b"IDAT":
            idat += data[pos + 8:pos + 8 + length]
        pos += 12 + length
    return width, height, len(set(zlib.decompress(idat)))


def test_a_browser_opens_the_report_from_disk(tmp_path: Path, browser: str) -> None:
    ws = build_workspace(tmp_path / "ws")
    assert report.main(["--workspace", str(ws)]) == 0
    index = ws / "report" / "index.html"

    proc = chromium("--dump-dom", index.as_uri(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = Dom(proc.stdout)  # the DOM as the browser built it, not the file's text
    assert {"best", "accuracy-chart", "threshold-line", "runs-table"} <= dom.ids
    assert "svg" in dom.tags and "polyline" in dom.tags
    assert len(re.findall(r'<tr class="run[^"]*" id="run-', proc.stdout)) == 7
    assert "../runs/train-20250105-000000-0003/curves.png" in dom.imgs
    assert "83%" in proc.stdout.split('id="best"', 1)[1].split("</section>", 1)[0]

    wrapper = tmp_path / "wrapper.html"
    wrapper.write_text(WRAPPER.replace("REPORT", index.as_uri()))
    proc = chromium("--allow-file-access-from-files", "--virtual-time-budget=5000",
                    "--dump-dom", wrapper.as_uri(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = re.search(r'<pre id="out">(.*?)</pre>', proc.stdout, re.S)
    assert out, proc.stdout[-2000:]
    images = json.loads(out.group(1).replace("&quot;", '"'))
    assert len(images) == len(dom.imgs) >= 7
    assert all(complete and width == 48 for _, complete, width in images), images

    shot = tmp_path / "report.png"
    proc = chromium(f"--screenshot={shot}", "--window-size=1200,1600", index.as_uri(),
                    cwd=tmp_path)
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    width, height, variety = png_size_and_variety(shot.read_bytes())
    assert (width, height) == (1200, 1600) and variety > 20, "blank screenshot"
