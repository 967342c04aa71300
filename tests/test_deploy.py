"""ct.pipeline.deploy against a real HTTP server on loopback: deploy, already served, a refused
model keeps the old one (exit 1, wanted.json back), rollback, a rolled-back champion held, the
timeout, untrusted answers and records, prune, and the local service's pid check.

STAND-IN: `StandIn` below is not the model service. It is a small stdlib http.server that plays
ct.serving's /model protocol (docs: /tmp/spec/serving.md, "The service"): it polls
serving/wanted.json, answers each new request in GET /model's "swap", and refuses the models the
test tells it to. What ct.serving itself does is tested end to end in tests/test_job7.py."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from ct.pipeline import deploy, serving_api
from ct.pipeline.deploy_records import DEPLOYED, RECORD, WANTED, mail_lines
from tests.gate_workspace import COMMIT, assert_one_line_error, run_module


class StandIn:
    """STAND-IN for ct.serving's /model protocol (see the module docstring), on a free port."""

    def __init__(self, workspace: Path, refuse: set[str] | None = None, mute: bool = False,
                 body: bytes | None = None) -> None:
        self.workspace, self.refuse, self.mute, self.body = workspace, refuse or set(), mute, body
        self.model: dict[str, Any] | None = None
        self.swap: dict[str, Any] | None = None
        self.seen = ""
        self.stop = threading.Event()
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                code, body = stand_in.answer(self.path)
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.threads = [threading.Thread(target=self.server.serve_forever, daemon=True),
                        threading.Thread(target=self.watch, daemon=True)]
        for thread in self.threads:
            thread.start()

    def answer(self, path: str) -> tuple[int, bytes]:
        if self.body is not None:
            return 200, self.body
        if path == "/healthz":
            return (200 if self.model else 503), json.dumps({"status": "ok"}).encode()
        if path == "/model":
            return 200, json.dumps({"model": self.model, "previous": None,
                                    "swap": self.swap}).encode()
        return 404, b'{"error": "not found"}'

    def watch(self) -> None:
        """Like ct.serving: poll wanted.json; a new request is smoke-tested, then swapped."""
        while not self.stop.wait(0.05):
            try:
                wanted = json.loads((self.workspace / WANTED).read_text())
            except (OSError, ValueError):
                continue
            if wanted["request"] == self.seen or self.mute:
                continue
            self.seen = wanted["request"]
            data = (self.workspace / wanted["model"]).read_bytes()
            ok = hashlib.sha256(data).hexdigest() == wanted["sha256"] \
                and wanted["sha256"] not in self.refuse
            reason = "swapped" if ok else \
                "smoke accuracy 9.8% is more than 1.0 point below the manifest's 80.4%\n(kept)"
            smoke = {"images": 500, "accuracy": 80.4 if ok else 9.8, "expected": 80.4,
                     "p50_ms": 1.2, "p99_ms": 3.1}
            if ok:
                self.model = {"id": wanted["sha256"][:16], "sha256": wanted["sha256"],
                              "commit": COMMIT, "accuracy": 81.2}
            self.swap = {"request": wanted["request"], "ok": ok, "reason": reason,
                         "smoke": smoke, "at": "2026-12-06T06:30:00Z"}

    def close(self) -> None:
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def service(tmp_path):
    services: list[StandIn] = []

    def start(**kwargs: Any) -> StandIn:
        services.append(StandIn(tmp_path / "ws", **kwargs))
        return services[-1]

    yield start
    for one in services:
        one.close()


def store(ws: Path, content: bytes) -> dict[str, Any]:
    """An export as ct.pipeline.exported records it: models/champion-X.* and best.json's
    "export"."""
    sha = hashlib.sha256(content).hexdigest()
    stem = ws / "models" / f"champion-{sha[:16]}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".onnx").write_bytes(content)
    stem.with_suffix(".json").write_text(json.dumps({"format": "ct-export/1"}))
    Path(f"{stem}-smoke.npz").write_bytes(b"npz")
    return {"onnx": f"models/champion-{sha[:16]}.onnx", "onnx_sha256": sha,
            "manifest": f"models/champion-{sha[:16]}.json", "served_accuracy": 81.2,
            "exported_at": "2026-12-06T06:30:00Z"}


def crown(ws: Path, content: bytes) -> dict[str, Any]:
    """Make the model with these bytes the exported champion."""
    export = store(ws, content)
    (ws / "best.json").write_text(json.dumps({"accuracy": 81.3, "commit": COMMIT,
                                              "model": "models/best-0.pt", "export": export}))
    return export


def run(ws: Path, *args: str, url: str, timeout: str = "10") -> int:
    return deploy.main(["--workspace", str(ws), *args, "--url", url, "--timeout", timeout])


def load(ws: Path, rel: str) -> dict[str, Any]:
    return json.loads((ws / rel).read_text())


@pytest.fixture
def ws(tmp_path):
    (tmp_path / "ws").mkdir()
    return tmp_path / "ws"


def test_deploy_waits_for_the_service_then_records_current_and_previous(ws, service, capsys):
    up = service()
    first = crown(ws, b"model-one")
    assert run(ws, "deploy", url=up.url) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"deployed {first['onnx']} (commit {COMMIT[:7]}, served accuracy 81.2%)")
    assert "smoke 80.4% on 500 images (expected 80.4%), p99 3.1 ms" in out
    assert up.model["sha256"] == first["onnx_sha256"]
    deployed = load(ws, DEPLOYED)
    assert deployed["current"]["sha256"] == first["onnx_sha256"] and deployed["previous"] is None
    assert load(ws, RECORD)["outcome"] == "deployed"
    # served already: nothing asked, exit 0
    asked = (ws / WANTED).read_bytes()
    assert run(ws, "deploy", url=up.url) == 0
    assert "serves the champion" in capsys.readouterr().out
    assert (ws / WANTED).read_bytes() == asked and load(ws, RECORD)["outcome"] == "served"
    second = crown(ws, b"model-two")
    assert run(ws, "deploy", url=up.url) == 0
    deployed = load(ws, DEPLOYED)
    assert deployed["current"]["model"] == second["onnx"]
    assert deployed["previous"]["model"] == first["onnx"]
    assert deployed["previous"]["accuracy"] == 81.2  # the record's entry, not a bare file


def test_a_refused_model_keeps_the_old_one_and_says_why(ws, service, capsys):
    good = crown(ws, b"model-good")
    bad_bytes = b"model-bad"
    up = service(refuse={hashlib.sha256(bad_bytes).hexdigest()})
    assert run(ws, "deploy", url=up.url) == 0
    asked, deployed = (ws / WANTED).read_bytes(), (ws / DEPLOYED).read_bytes()
    bad = crown(ws, bad_bytes)
    capsys.readouterr()
    assert run(ws, "deploy", url=up.url) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"ct.deploy: the service refused {bad['onnx']}")
    assert "smoke accuracy 9.8% is more than 1.0 point below" in err and "(kept)" in err
    assert up.model["sha256"] == good["onnx_sha256"]
    assert (ws / WANTED).read_bytes() == asked, "wanted.json names the old model again"
    assert (ws / DEPLOYED).read_bytes() == deployed
    record = load(ws, RECORD)
    assert record["outcome"] == "failed" and record["serving"] == good["onnx"]
    lines = mail_lines(ws)
    assert lines[0].startswith("why:") and "smoke accuracy 9.8%" in lines[0]
    assert f"serving now: {good['onnx']}" in lines
    assert "smoke test:  smoke 9.8% on 500 images (expected 80.4%), p99 3.1 ms" in lines


def test_the_first_deploy_refused_leaves_nothing_wanted(ws, service):
    bad = crown(ws, b"model-bad")
    up = service(refuse={bad["onnx_sha256"]})
    assert run(ws, "deploy", url=up.url) == 1
    assert not (ws / WANTED).exists() and not (ws / DEPLOYED).exists()
    assert load(ws, RECORD)["serving"] == "no model"


def test_rollback_swaps_back_and_deploy_holds_the_rolled_back_champion(ws, service, capsys):
    up = service()
    first = crown(ws, b"model-one")
    run(ws, "deploy", url=up.url)
    second = crown(ws, b"model-two")
    run(ws, "deploy", url=up.url)
    capsys.readouterr()
    assert run(ws, "rollback", url=up.url) == 0
    assert capsys.readouterr().out.startswith(f"rolled back to {first['onnx']}")
    assert up.model["sha256"] == first["onnx_sha256"]
    deployed = load(ws, DEPLOYED)
    assert (deployed["current"]["model"], deployed["previous"]["model"]) == \
        (first["onnx"], second["onnx"])
    assert deployed["rolled_back"] == second["onnx_sha256"]
    # the next job7 run (no new champion) does not undo the rollback ...
    assert run(ws, "deploy", url=up.url) == 0
    assert "rolled back by hand" in capsys.readouterr().out
    assert up.model["sha256"] == first["onnx_sha256"]
    # ... --force does, and a new champion would
    assert run(ws, "deploy", "--force", url=up.url) == 0
    assert up.model["sha256"] == second["onnx_sha256"]
    assert load(ws, DEPLOYED)["rolled_back"] is None


def test_rollback_without_a_previous_model_is_bad_input(ws, service, capsys):
    up = service()
    crown(ws, b"model-one")
    run(ws, "deploy", url=up.url)
    assert run(ws, "rollback", url=up.url) == 2
    assert "names no previous model: nothing to roll back to" in capsys.readouterr().err


def test_no_answer_in_time_is_a_failure_and_puts_wanted_back(ws, service, capsys):
    up = service(mute=True)
    crown(ws, b"model-one")
    # a mute service never answers: only the 1 s timeout ends the deploy (pytest's own timeout
    # would end a hang, and no time is asserted)
    assert run(ws, "deploy", url=up.url, timeout="1") == 1
    assert "did not answer request" in capsys.readouterr().err
    assert not (ws / WANTED).exists()


def test_nothing_answering_is_a_failure_and_changes_nothing(ws, capsys):
    crown(ws, b"model-one")
    assert run(ws, "deploy", url="http://127.0.0.1:9") == 1
    err = capsys.readouterr().err
    assert err.startswith("ct.deploy: nothing answers at http://127.0.0.1:9") and \
        "start it (scripts/job7-deploy.sh)" in err
    assert not (ws / WANTED).exists()
    assert load(ws, RECORD)["outcome"] == "failed"


@pytest.mark.parametrize("best, says", [
    ({"accuracy": 80.0, "commit": COMMIT}, "export first"),
    ({"export": {"onnx": "../x.onnx", "onnx_sha256": "0" * 64}}, "not models/champion-"),
    ({"export": {"onnx": "models/champion-0123456789abcdef.onnx", "onnx_sha256": "f" * 64}},
     "the sha256 does not match"),
])
def test_a_champion_without_a_usable_export_is_one_line_exit_2(ws, best, says):
    (ws / "best.json").write_text(json.dumps(best))
    result = run_module("ct.pipeline.deploy", "--workspace", str(ws), "deploy", "--url",
                        "http://127.0.0.1:9")
    assert_one_line_error(result, says)


def test_no_best_json_is_nothing_to_deploy(ws, capsys):
    assert run(ws, "deploy", url="http://127.0.0.1:9") == 0
    assert "nothing to deploy" in capsys.readouterr().err


def test_records_are_never_read_through_a_symlink(ws, service, tmp_path):
    up = service()
    crown(ws, b"model-one")
    run(ws, "deploy", url=up.url)
    (tmp_path / "elsewhere.json").write_text((ws / DEPLOYED).read_text())
    (ws / DEPLOYED).unlink()
    (ws / DEPLOYED).symlink_to(tmp_path / "elsewhere.json")
    result = run_module("ct.pipeline.deploy", "--workspace", str(ws), "rollback", "--url", up.url)
    assert_one_line_error(result, "deployed.json cannot be read")
    os.mkfifo(ws / "best.json.fifo")
    (ws / "best.json").unlink()
    (ws / "best.json.fifo").rename(ws / "best.json")  # a FIFO would block a plain open
    result = run_module("ct.pipeline.deploy", "--workspace", str(ws), "deploy", "--url", up.url)
    assert_one_line_error(result, "best.json cannot be read (not a regular file)")


@pytest.mark.parametrize("url", ["ftp://127.0.0.1:8500", "http://127.0.0.1:85x0",
                                 "http://u:p@127.0.0.1:8500", "http://127.0.0.1:8500/?a=1",
                                 "http://", "http://127.0.0.1:8500/a b"])
def test_a_bad_service_url_is_bad_input(ws, url):
    crown(ws, b"model-one")
    result = run_module("ct.pipeline.deploy", "--workspace", str(ws), "deploy", "--url", url)
    assert_one_line_error(result, "set CT_SERVE_URL")


def test_the_url_comes_from_the_settings():
    assert serving_api.service_url(None, {}) == "http://127.0.0.1:8500"
    assert serving_api.service_url(None, {"CT_SERVE_PORT": "9001"}) == "http://127.0.0.1:9001"
    assert serving_api.service_url(None, {"CT_SERVE_URL": "http://h:1/api/"}) == "http://h:1/api"
    assert serving_api.service_url("https://[::1]:8443", {}) == "https://[::1]:8443"
    with pytest.raises(ValueError, match="CT_SERVE_PORT"):
        serving_api.service_url(None, {"CT_SERVE_PORT": "99999"})


SHA = "a" * 64


@pytest.mark.parametrize("status, body, says", [
    (200, [], "not ct.serving"),
    (200, {"model": None}, "not ct.serving"),
    (200, {"model": {"sha256": "abc"}, "swap": None}, "model.sha256"),
    (200, {"model": "x", "swap": None}, "not an object"),
    (200, {"model": None, "swap": {"request": "", "ok": True}}, "swap.request"),
    (200, {"model": None, "swap": {"request": 7, "ok": True}}, "swap.request"),
    (200, {"model": None, "swap": {"request": "r" * 129, "ok": True}}, "swap.request"),
    (200, {"model": None, "swap": {"request": "r", "ok": "yes"}}, "swap.ok"),
    (200, {"model": None, "swap": {"request": "r", "ok": True, "smoke": [1]}}, "swap.smoke"),
    (200, {"model": None, "swap": {"request": "r", "ok": True, "reason": 5}}, "not text"),
    (404, {"model": None, "swap": None}, "HTTP 404"),
])
def test_the_services_answer_is_checked(status, body, says):
    with pytest.raises(serving_api.BadAnswer, match=says):
        serving_api.parse_model_answer(status, body)


def test_what_the_service_says_is_made_one_bounded_line():
    swap = serving_api.parse_model_answer(200, {"model": {"sha256": SHA}, "swap": {
        "request": "r", "ok": False, "reason": "bad\n\x1b[31mred " + "x" * 1000,
        "smoke": {"accuracy": 9.5, "p99_ms": True, "images": float("nan"), "evil": 1}}}).swap
    assert "\n" not in swap.reason and "\x1b" not in swap.reason and len(swap.reason) == 300
    assert swap.smoke == {"accuracy": 9.5}
    # ct.serving answers an unreadable wanted.json with a swap of no request: no one's answer
    refused = {"request": None, "ok": False, "reason": "cannot read serving/wanted.json"}
    assert serving_api.parse_model_answer(503, {"model": None, "swap": refused}).swap.request == ""


def test_an_answer_that_is_not_json_or_too_large_is_refused(ws, service, capsys):
    crown(ws, b"model-one")
    for body in (b"<html>", b"{" + b" " * (serving_api.MAX_ANSWER + 10) + b"}"):
        up = service(body=body)
        assert run(ws, "deploy", url=up.url) == 1
        err = capsys.readouterr().err
        assert "does not answer as ct.serving does" in err and err.count("\n") == 1
        assert not serving_api.answers(up.url)


def test_prune_keeps_what_a_record_names(ws, service, capsys):
    up = service()
    one = crown(ws, b"model-one")
    run(ws, "deploy", url=up.url)
    two = crown(ws, b"model-two")
    run(ws, "deploy", url=up.url)
    orphan = store(ws, b"model-orphan")
    three = crown(ws, b"model-three")  # the champion, not deployed yet
    stale = ws / "models" / ".champion-incoming.onnx.x1y2.tmp"
    fresh = ws / "models" / ".champion-incoming.onnx.a1b2.tmp"
    stale.write_bytes(b"half")
    fresh.write_bytes(b"half")
    os.utime(stale, (time.time() - 7200,) * 2)
    (ws / "models" / "best-0123456789abcdef.pt").write_bytes(b"pt")  # promotion's, not ours
    capsys.readouterr()
    assert deploy.main(["--workspace", str(ws), "prune"]) == 0
    left = {p.name for p in (ws / "models").iterdir()}
    for export in (one, two, three):
        stem = Path(export["onnx"]).stem
        assert {f"{stem}.onnx", f"{stem}.json", f"{stem}-smoke.npz"} <= left
    assert not any(Path(orphan["onnx"]).stem in name for name in left)
    assert stale.name not in left and fresh.name in left and "best-0123456789abcdef.pt" in left
    assert capsys.readouterr().out.startswith("pruned 4 file(s)")


def test_status_and_running(ws, service, capsys):
    assert deploy.main(["--workspace", str(ws), "running", "--url", "http://127.0.0.1:9"]) == 1
    up = service()
    crown(ws, b"model-one")
    assert run(ws, "deploy", url=up.url) == 0
    assert deploy.main(["--workspace", str(ws), "running", "--url", up.url]) == 0
    capsys.readouterr()
    assert deploy.main(["--workspace", str(ws), "status", "--url", up.url]) == 0
    out = capsys.readouterr().out
    assert "last swap: request" in out and "current:     models/champion-" in out


def test_begin_forgets_the_last_outcome(ws):
    (ws / "status").mkdir()
    (ws / RECORD).write_text("{}")
    assert deploy.main(["--workspace", str(ws), "begin"]) == 0
    assert not (ws / RECORD).exists() and mail_lines(ws) == []


def test_local_pid_names_only_this_workspaces_live_service(ws, tmp_path, capsys):
    pid_file = ws / "serving" / "service.pid"
    pid_file.parent.mkdir()
    # what `python -m ct.serving --workspace WS` looks like in /proc/PID/cmdline
    ours = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "ct.serving",
                             "--workspace", str(ws)])
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "ct.serving",
                              "--workspace", str(tmp_path)])
    try:
        for pid, code in ((ours.pid, 0), (other.pid, 1), (os.getpid(), 1)):
            pid_file.write_text(f"{pid}\n")
            assert deploy.main(["--workspace", str(ws), "local-pid"]) == code, pid
        assert capsys.readouterr().out == f"{ours.pid}\n"
    finally:
        for proc in (ours, other):
            proc.kill()
            proc.wait()
    pid_file.write_text(f"{ours.pid}\n")  # the process is gone: a stale pid file
    assert deploy.main(["--workspace", str(ws), "local-pid"]) == 1
