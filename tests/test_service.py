"""The prediction service, run for real (`python -m ct.serving`, uvicorn on a loopback port, a
real exported model in ONNX Runtime): its answers are predict's, one image or many; every bad
input is a 4xx with a one-line error and the service answers the next request; a body over the
limit is refused while it is read; /model, /healthz and /metrics say what they must."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ct.serving import predict
from tests import served_model
from tests.served_model import REPO, Champion, RunningService
from tests.test_images import png_header
from tests.test_predict import picture, write_images

MAX_BYTES, MAX_IMAGES = 1_000_000, 8
TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[tuple[RunningService, Champion, Path]]:
    ws = tmp_path_factory.mktemp("service") / "ws"
    champion = served_model.write_champion(ws, 2)
    served_model.write_best(ws, champion)
    served_model.want(ws, champion)
    env = {"CT_SERVE_MAX_BYTES": str(MAX_BYTES), "CT_SERVE_MAX_IMAGES": str(MAX_IMAGES),
           "CT_SERVE_BATCH_WAIT_MS": "5"}
    with served_model.running_service(ws, env) as running:
        yield running, champion, ws


def png(seed: int = 0, size: tuple[int, int] = (40, 30)) -> bytes:
    buffer = io.BytesIO()
    picture("RGB", size, seed).save(buffer, "PNG")
    return buffer.getvalue()


def post_file(url: str, path: Path) -> httpx.Response:
    kind = TYPES.get(path.suffix.lower(), "application/octet-stream")
    return httpx.post(f"{url}/predict", content=path.read_bytes(),
                      headers={"content-type": kind}, timeout=30)


def predicted_lines(ws: Path, paths: list[Path], capsys: pytest.CaptureFixture[str]
                    ) -> list[dict]:
    capsys.readouterr()
    predict.main(["--model", str(ws), *map(str, paths)])
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def still_answers(url: str, champion: Champion) -> None:
    assert httpx.get(f"{url}/healthz", timeout=10).json() == {"status": "ok",
                                                              "model": champion.id}
    reply = httpx.post(f"{url}/predict", content=png(), timeout=30,
                       headers={"content-type": "image/png"})
    assert reply.status_code == 200 and reply.json()["model"] == champion.id


# ---------------------------------------------------------------- answers


def test_answers_are_predicts_one_image_at_a_time_or_many(
        service: tuple[RunningService, Champion, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    running, champion, ws = service
    paths = sorted(write_images(tmp_path / "in").values())
    lines = predicted_lines(ws, paths, capsys)
    for path, line in zip(paths, lines, strict=True):
        reply = post_file(running.url, path)
        assert reply.status_code == 200, reply.text
        assert reply.json() == {"model": champion.id, "predictions": [
            {k: line[k] for k in ("class", "probability", "top3")}]}, path.name
        octets = httpx.post(f"{running.url}/predict", content=path.read_bytes(), timeout=30,
                            headers={"content-type": "application/octet-stream"})
        assert octets.json() == reply.json()

    parts = [("image", (p.name, p.read_bytes(), TYPES[p.suffix.lower()])) for p in paths]
    reply = httpx.post(f"{running.url}/predict", files=parts, data={"note": "ignored"},
                       timeout=30)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["model"] == champion.id
    assert body["predictions"] == [{"file": p.name, **{k: line[k] for k in (
        "class", "probability", "top3")}} for p, line in zip(paths, lines, strict=True)]


def test_concurrent_requests_share_batches(service: tuple[RunningService, Champion, Path]
                                           ) -> None:
    running, _, _ = service
    before = metrics(running.url)
    answers: list[httpx.Response] = []

    def client(seed: int) -> None:
        with httpx.Client(timeout=30) as http:
            for i in range(4):
                answers.append(http.post(f"{running.url}/predict", content=png(seed * 10 + i),
                                         headers={"content-type": "image/png"}))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [a.status_code for a in answers] == [200] * 48
    after = metrics(running.url)
    images = after["ct_serve_images_total"] - before["ct_serve_images_total"]
    calls = after["ct_serve_batch_size_count"] - before["ct_serve_batch_size_count"]
    summed = after["ct_serve_batch_size_sum"] - before["ct_serve_batch_size_sum"]
    assert images == summed == 48
    assert calls < 48, "no two requests shared an ONNX Runtime call"


# ---------------------------------------------------------------- bad input


def chunks(total: int, size: int = 256 << 10) -> Iterator[bytes]:
    """A body sent without Content-Length (chunked), so the limit must hold while reading."""
    block = bytes(size)
    for _ in range(total // size):
        yield block


def multipart(count: int) -> list:
    return [("image", (f"{i}.png", png(i), "image/png")) for i in range(count)]


BAD: dict[str, tuple[dict, int, str]] = {
    "not an image": ({"content": b"hello, not a picture\n" * 4,
                      "headers": {"content-type": "image/png"}}, 400, "not an image"),
    "truncated": ({"content": png(1, (64, 64))[:-200],
                   "headers": {"content-type": "image/png"}}, 400, "damaged"),
    "decompression bomb": ({"content": png_header(20000, 20000),
                            "headers": {"content-type": "image/png"}}, 413, "pixels"),
    "a GIF": ({"content": b"GIF89a" + bytes(40), "headers": {"content-type": "image/png"}},
              400, "not a PNG or JPEG file"),
    "over the size limit": ({"content": os.urandom(MAX_BYTES + 1),
                             "headers": {"content-type": "application/octet-stream"}},
                            413, f"over the limit of {MAX_BYTES}"),
    "over the size limit, chunked": ({"content": chunks(3 * MAX_BYTES),
                                      "headers": {"content-type": "image/jpeg"}},
                                     413, "over the limit"),
    "wrong content type": ({"content": png(), "headers": {"content-type": "text/plain"}},
                           415, "text/plain is not accepted"),
    "no content type": ({"content": png(), "headers": {"content-type": ""}}, 415,
                        "no Content-Type"),
    "empty body": ({"content": b"", "headers": {"content-type": "image/png"}}, 400,
                   "body is empty"),
    "a form without images": ({"data": {"x": "1"}, "files": [("other", ("a.png", png()))]},
                              400, "no part named 'image'"),
    "a form with a bad image": ({"files": [*multipart(2), ("image", ("bad.png", b"xx"))]},
                                400, "bad.png: not an image"),
    "a form with too many images": ({"files": multipart(MAX_IMAGES + 1)}, 413,
                                    f"more than {MAX_IMAGES} files"),
    "a form without boundary": ({"content": b"--x\r\n", "headers": {
        "content-type": "multipart/form-data"}}, 400, "form cannot be read"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_a_4xx_of_one_line_and_the_service_goes_on(
        service: tuple[RunningService, Champion, Path], case: str) -> None:
    running, champion, _ = service
    request, status, says = BAD[case]
    reply = httpx.post(f"{running.url}/predict", timeout=60, **request)
    assert reply.status_code == status, reply.text
    assert list(reply.json()) == ["error"] and says in reply.json()["error"], reply.text
    assert "\n" not in reply.json()["error"]
    still_answers(running.url, champion)


def test_other_methods_and_paths_answer_json_errors(
        service: tuple[RunningService, Champion, Path]) -> None:
    running, _, _ = service
    assert httpx.get(f"{running.url}/predict").status_code == 405
    missing = httpx.get(f"{running.url}/nothing-here")
    assert missing.status_code == 404 and "error" in missing.json()
    assert httpx.get(f"{running.url}/static/app.py").status_code == 404  # only the page's files
    assert httpx.get(f"{running.url}/static/..%2Fapp.py").status_code == 404


def peak_memory_kb(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1))


def test_a_large_body_is_refused_while_read_not_held(
        service: tuple[RunningService, Champion, Path]) -> None:
    """50 MB sent (chunked, and with a Content-Length): the service's peak memory grows by
    far less than the body, since it stops keeping bytes past the limit."""
    running, champion, _ = service
    url = f"{running.url}/predict"
    httpx.post(url, content=chunks(2 * MAX_BYTES), headers={"content-type": "image/png"})
    before = peak_memory_kb(running.proc.pid)
    for body in (chunks(50 << 20), bytes(50 << 20)):
        reply = httpx.post(url, content=body, headers={"content-type": "image/png"},
                           timeout=120)
        assert reply.status_code == 413
    grown_mb = (peak_memory_kb(running.proc.pid) - before) / 1024
    assert grown_mb < 15, f"peak memory grew by {grown_mb:.0f} MB"
    still_answers(running.url, champion)


# ---------------------------------------------------------------- /model, /healthz, /metrics


def test_model_says_what_serves_and_the_swap_that_put_it_there(
        service: tuple[RunningService, Champion, Path]) -> None:
    running, champion, _ = service
    answer = httpx.get(f"{running.url}/model").json()
    assert set(answer) == {"model", "previous", "swap"} and answer["previous"] is None
    model, manifest = answer["model"], champion.manifest
    assert model == {"id": champion.id, "sha256": champion.sha256,
                     "commit": manifest["commit"], "data_version": manifest["data_version"],
                     "accuracy": manifest["served_accuracy"],
                     "exported_at": manifest["exported_at"], "classes": manifest["classes"],
                     "loaded_at": model["loaded_at"]}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", model["loaded_at"])
    swap = answer["swap"]
    assert swap["ok"] is True and swap["model"] == champion.id and swap["request"]
    assert set(swap["smoke"]) == {"images", "accuracy", "expected", "p50_ms", "p99_ms"}
    assert swap["smoke"]["images"] == served_model.SMOKE_IMAGES
    assert swap["smoke"]["accuracy"] == swap["smoke"]["expected"]
    assert 0 < swap["smoke"]["p50_ms"] <= swap["smoke"]["p99_ms"] <= 50


SAMPLE = re.compile(r'([a-z_]+)(\{[^}]*\})? (\S+)')


def metrics(url: str) -> dict[str, float]:
    """The samples of /metrics by name and labels, each line checked against the format."""
    reply = httpx.get(f"{url}/metrics")
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain")
    samples = {}
    for line in reply.text.splitlines():
        if line.startswith("#"):
            assert re.fullmatch(r"# (HELP|TYPE) ct_serve_\w+ .+", line), line
            continue
        found = SAMPLE.fullmatch(line)
        assert found, line
        samples[found.group(1) + (found.group(2) or "")] = float(found.group(3))
    return samples


def test_metrics_count_requests_images_batches_and_swaps(
        service: tuple[RunningService, Champion, Path]) -> None:
    running, champion, _ = service
    before = metrics(running.url)
    for seed in range(3):
        assert httpx.post(f"{running.url}/predict", content=png(seed),
                          headers={"content-type": "image/png"}).status_code == 200
    httpx.post(f"{running.url}/predict", files=multipart(2))
    httpx.post(f"{running.url}/predict", content=b"x", headers={"content-type": "text/plain"})
    after = metrics(running.url)
    ok, refused = ('ct_serve_requests_total{endpoint="/predict",code="200"}',
                   'ct_serve_requests_total{endpoint="/predict",code="415"}')
    assert after[ok] - before.get(ok, 0) == 4
    assert after[refused] - before.get(refused, 0) == 1
    assert after["ct_serve_images_total"] - before["ct_serve_images_total"] == 5
    assert after[f'ct_serve_model_info{{id="{champion.id}",commit="'
                 f'{champion.manifest["commit"]}"}}'] == 1
    assert after['ct_serve_swaps_total{result="ok"}'] >= 1
    for name in ('ct_serve_request_seconds', 'ct_serve_batch_size'):
        labels = '{endpoint="/predict",' if name == "ct_serve_request_seconds" else "{"
        buckets = [(k, v) for k, v in after.items() if k.startswith(f"{name}_bucket{labels}")]
        counts = [v for _, v in buckets]
        assert counts == sorted(counts) and buckets[-1][0].endswith('le="+Inf"}')
        count_key = f"{name}_count" + (labels[:-1] + "}" if labels != "{" else "")
        assert counts[-1] == after[count_key]


def test_without_a_model_the_service_says_so_and_takes_one_when_asked(
        tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    with served_model.running_service(ws, wait_for_model=False) as running:
        health = httpx.get(f"{running.url}/healthz")
        assert health.status_code == 503 and health.json()["model"] is None
        assert "wanted.json names no model" in health.json()["error"]
        reply = httpx.post(f"{running.url}/predict", content=png(),
                           headers={"content-type": "image/png"})
        assert reply.status_code == 503 and "no model is loaded" in reply.json()["error"]
        assert httpx.get(f"{running.url}/model").json() == {"model": None, "previous": None,
                                                             "swap": None}
        assert 'ct_serve_model_info{' not in httpx.get(f"{running.url}/metrics").text
        champion = served_model.write_champion(ws, 3)
        request = served_model.want(ws, champion)
        answer = served_model.wait_for_swap(running.url, request)
        assert answer["swap"]["ok"] and answer["model"]["id"] == champion.id
        assert httpx.get(f"{running.url}/healthz").json()["model"] == champion.id


@pytest.mark.parametrize(("args", "env", "says"), [
    (["--workspace", "/no/such/ws"], {}, "is not a folder"),
    ([], {"CT_WORKSPACE": ""}, "--workspace is required"),
    (["--workspace", "."], {"CT_SERVE_MAX_BATCH": "many"}, "CT_SERVE_MAX_BATCH='many' is not"),
    (["--workspace", ".", "--port", "70000"], {}, "is not a port number"),
])
def test_the_command_line_refuses_bad_settings_in_one_line(args: list[str], env: dict,
                                                           says: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "ct.serving", *args], cwd=REPO,
                          env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("ct.serving: error: ") and says in proc.stderr


def test_the_service_imports_without_torch() -> None:
    probe = ("import sys\nclass NoTorch:\n    def find_spec(self, name, path=None, target=None):\n"
             "        if name.split('.')[0] in ('torch', 'torchvision'):\n"
             "            raise ImportError(name)\n"
             "sys.meta_path.insert(0, NoTorch())\n"
             "import ct.serving.app, ct.serving.__main__, ct.serving.predict, ct.images\n")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
