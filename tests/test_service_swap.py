"""Changing the model the service serves (serving/wanted.json, polled): under load no request
fails and each answer is the model's it names; a candidate that fails its smoke test, is not
the file asked for, or lies outside WS/models leaves the serving model in place, and GET /model
says why. The real service, real models, real clients in threads."""

from __future__ import annotations

import io
import json
import threading
import time
from pathlib import Path

import httpx
import pytest

from ct.images import SERVING, decode
from ct.serving import model as served
from tests import served_model
from tests.served_model import Champion, RunningService
from tests.test_predict import picture

CLIENTS, SWAPS = 4, 3
Service = tuple[RunningService, Path, dict[str, Champion]]


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory):
    ws = tmp_path_factory.mktemp("swap") / "ws"
    champions = {"a": served_model.write_champion(ws, 2),
                 "b": served_model.write_champion(ws, 3),
                 "wrong smoke": served_model.write_champion(ws, 4, accuracy_offset=10.0)}
    served_model.want(ws, champions["a"])
    with served_model.running_service(ws) as running:
        yield running, ws, champions


def pngs(count: int) -> list[bytes]:
    out = []
    for seed in range(count):
        buffer = io.BytesIO()
        picture("RGB", (48, 40), 100 + seed).save(buffer, "PNG")
        out.append(buffer.getvalue())
    return out


def expected_answers(ws: Path, champion: Champion, images: list[bytes]) -> list[dict]:
    loaded = served.load_champion(ws, champion.onnx, champion.sha256, 1)
    return [served.prediction(loaded.probabilities(decode(data, SERVING)[None])[0],
                              loaded.classes) for data in images]


def serving_now(running: RunningService) -> str:
    return httpx.get(f"{running.url}/healthz").json()["model"]


def ask(running: RunningService, ws: Path, champion: Champion | None = None,
        raw: dict | bytes | None = None) -> dict:
    """Write wanted.json (for `champion`, or `raw` as it is) and wait for the service's
    answer to that request; GET /model's answer."""
    if champion is not None:
        request = served_model.want(ws, champion)
    else:
        request = raw.get("request", "") if isinstance(raw, dict) else ""
        text = raw if isinstance(raw, bytes) else json.dumps(raw).encode()
        path = ws / "serving" / "wanted.json"
        # read before the write: the service may judge the new content before a read after it
        before = httpx.get(f"{running.url}/model").json()["swap"]
        path.write_bytes(text)
        if not request:  # no request id to wait for: wait for the content to be judged
            deadline = time.monotonic() + 30
            while httpx.get(f"{running.url}/model").json()["swap"] == before:
                assert time.monotonic() < deadline, "wanted.json was not judged"
                time.sleep(0.05)
            return httpx.get(f"{running.url}/model").json()
    return served_model.wait_for_swap(running.url, request)


def test_swaps_under_load_fail_no_request(service: Service) -> None:
    running, ws, champions = service
    a, b = champions["a"], champions["b"]
    assert serving_now(running) == a.id
    images = pngs(4)
    expected = {c.id: expected_answers(ws, c, images) for c in (a, b)}
    assert expected[a.id] != expected[b.id], "the two models must answer apart"
    stop = threading.Event()
    answers: list[tuple[int, dict]] = []  # (first image, body)
    failures: list[str] = []

    def client(number: int) -> None:
        with httpx.Client(base_url=running.url, timeout=30) as http:
            sent = 0
            while not stop.is_set() and sent < 5000:
                first = (number + sent) % len(images)
                try:
                    if sent % 3 == 2:  # every third request sends two images
                        parts = [("image", (f"{i}.png", images[i], "image/png"))
                                 for i in (first, (first + 1) % len(images))]
                        reply = http.post("/predict", files=parts)
                    else:
                        reply = http.post("/predict", content=images[first],
                                          headers={"content-type": "image/png"})
                except httpx.HTTPError as exc:
                    failures.append(f"client {number}: {type(exc).__name__}: {exc}")
                    continue
                finally:
                    sent += 1
                if reply.status_code != 200:
                    failures.append(f"client {number}: {reply.status_code} {reply.text}")
                else:
                    answers.append((first, reply.json()))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
    for thread in threads:
        thread.start()
    swapped = []
    try:
        time.sleep(0.3)
        for target in [b, a, b][:SWAPS]:
            answer = ask(running, ws, target)
            assert answer["swap"]["ok"], answer["swap"]
            assert answer["model"]["id"] == target.id
            swapped.append(answer)
            time.sleep(0.3)  # requests on this model too
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    assert failures == []
    models = {body["model"] for _, body in answers}
    assert models == {a.id, b.id}, models
    for first, body in answers:  # each answer is its model's, whatever swapped meanwhile
        want = expected[body["model"]]
        got = [{k: v for k, v in p.items() if k != "file"} for p in body["predictions"]]
        assert got == [want[(first + i) % len(images)] for i in range(len(got))]
    assert swapped[-1]["previous"]["id"] == a.id and swapped[-1]["model"]["id"] == b.id
    assert swapped[0]["previous"]["id"] == a.id
    print(f"{len(answers)} answers from {CLIENTS} clients over {SWAPS} swaps")  # in -s runs


def test_a_candidate_failing_its_smoke_test_leaves_the_model_serving(service: Service) -> None:
    running, ws, champions = service
    serving = serving_now(running)
    before = httpx.get(f"{running.url}/model").json()
    failed_before = swaps(running)["failed"]
    wrong = champions["wrong smoke"]
    answer = ask(running, ws, wrong)
    swap = answer["swap"]
    assert swap["ok"] is False and swap["model"] == wrong.id
    assert "smoke accuracy" in swap["reason"] and f"{serving} keeps serving" in swap["reason"]
    assert swap["smoke"]["expected"] == pytest.approx(swap["smoke"]["accuracy"] + 10.0)
    assert answer["model"] == before["model"] and answer["previous"] == before["previous"]
    assert serving_now(running) == serving
    reply = httpx.post(f"{running.url}/predict", content=pngs(1)[0],
                       headers={"content-type": "image/png"})
    assert reply.status_code == 200 and reply.json()["model"] == serving
    assert swaps(running)["failed"] == failed_before + 1


def swaps(running: RunningService) -> dict[str, int]:
    text = httpx.get(f"{running.url}/metrics").text
    return {result: int(float(line.rsplit(" ", 1)[1])) for result in ("ok", "failed")
            for line in text.splitlines()
            if line.startswith(f'ct_serve_swaps_total{{result="{result}"}}')}


def test_requests_for_files_that_are_not_the_ones_asked_for_are_refused(
        service: Service, tmp_path: Path) -> None:
    running, ws, champions = service
    serving = serving_now(running)
    b = champions["b"]
    # a link in models/ named as a champion, to a file outside
    outside = tmp_path / "elsewhere.onnx"
    outside.write_bytes((ws / b.onnx).read_bytes())
    linked_name = "models/champion-0123456789abcdef.onnx"
    (ws / linked_name).symlink_to(outside)
    cases = {
        "sha256 of another file": ({"model": b.onnx, "sha256": "0" * 64}, "not the 0000"),
        "a name outside models": ({"model": "../best.json", "sha256": b.sha256},
                                  "not a plain file name"),
        "an absolute name": ({"model": "/etc/passwd", "sha256": b.sha256},
                             "not a plain file name"),
        "not a champion's name": ({"model": "models/other.onnx", "sha256": b.sha256},
                                  "is not models/champion-"),
        "a symbolic link": ({"model": linked_name, "sha256": b.sha256}, "symbolic link"),
        "a missing file": ({"model": "models/champion-ffffffffffffffff.onnx",
                            "sha256": b.sha256}, "No such file"),
        "no sha256": ({"model": b.onnx}, "is not {"),
    }
    for case, (fields, says) in cases.items():
        answer = ask(running, ws, raw={"request": f"req-{case}", **fields})
        swap = answer["swap"]
        assert swap["request"] == f"req-{case}" and swap["ok"] is False, case
        assert says in swap["reason"] and "\n" not in swap["reason"], (case, swap["reason"])
        assert serving_now(running) == serving, case
    answer = ask(running, ws, raw=b"{not json")
    assert answer["swap"]["ok"] is False and "is not JSON" in answer["swap"]["reason"]
    assert answer["swap"]["request"] is None and serving_now(running) == serving


def test_asking_for_the_model_that_serves_is_answered_at_once(service: Service) -> None:
    running, ws, champions = service
    serving = next(c for c in champions.values() if c.id == serving_now(running))
    loaded_at = httpx.get(f"{running.url}/model").json()["model"]["loaded_at"]
    answer = ask(running, ws, serving)
    assert answer["swap"]["ok"] and answer["swap"]["reason"] == f"already serving {serving.id}"
    assert answer["swap"]["smoke"] is not None
    assert answer["model"]["loaded_at"] == loaded_at, "not loaded again"


def test_a_model_over_the_latency_limit_does_not_serve(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    champion = served_model.write_champion(ws, 2)
    request = served_model.want(ws, champion)
    with served_model.running_service(ws, {"CT_SERVE_SMOKE_P99_MS": "0.001"},
                                      wait_for_model=False) as running:
        answer = served_model.wait_for_swap(running.url, request)
        assert answer["swap"]["ok"] is False and answer["model"] is None
        assert "p99 latency" in answer["swap"]["reason"]
        assert "CT_SERVE_SMOKE_P99_MS" in answer["swap"]["reason"]
        assert "no model serves" in answer["swap"]["reason"]
        health = httpx.get(f"{running.url}/healthz")
        assert health.status_code == 503 and "p99 latency" in health.json()["error"]
