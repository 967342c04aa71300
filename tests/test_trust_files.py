"""The host reads the workspace as untrusted input (ct.untrusted): a file the training container
wrote, a symbolic link it planted or a path it named in metrics.json never makes the gate, the
promotion, the mail or the report read, write or delete a file outside the workspace. Each test
plants the attack with real files and links, and a secret of mode 600 outside the workspace,
and checks that the secret shows up nowhere: not in the workspace, not in the outputs."""

from __future__ import annotations

import json
import os
import subprocess
from email import message_from_bytes
from pathlib import Path

import pytest

from ct import untrusted
from ct.pipeline import push_queue
from tests.gate_workspace import assert_one_line_error, make_workspace, run_module, write_run

SECRET = b"HOST-SECRET-81.5-d41d8cd98f00b204"
XSS = '<script>alert("x")</script>'


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder beside the workspace, holding the host's secret (mode 600) and a file named
    like a stored model, both of which must survive untouched."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "host-secret").write_bytes(SECRET)
    (folder / "host-secret").chmod(0o600)
    (folder / "best-0123456789abcdef.pt").write_bytes(b"an outside file named like a model")
    return folder


def state(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def assert_nothing_leaked(ws: Path, outside: Path, before: dict[str, bytes],
                          *outputs: str | bytes) -> None:
    """The secret is in no regular file of the workspace and in no output; outside is as it
    was (nothing written, nothing deleted)."""
    for path in ws.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert SECRET not in path.read_bytes(), path
    for out in outputs:
        assert SECRET not in (out if isinstance(out, bytes) else out.encode()), out
    assert state(outside) == before


def tool(module: str, ws: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_module(module, "--workspace", str(ws), *args)


# ---------------------------------------------------------------- the model promoted


def point_model(ws: Path, model: str, run_dir: str = "runs/r1") -> None:
    metrics = json.loads((ws / "metrics.json").read_text())
    (ws / "metrics.json").write_text(json.dumps(metrics | {"model": model, "run_dir": run_dir}))


@pytest.mark.parametrize("attack", ["absolute", "dot-dot", "another run", "linked model",
                                    "linked run folder", "linked runs"])
def test_promotion_never_copies_a_host_file(tmp_path: Path, outside: Path, attack: str) -> None:
    ws = make_workspace(tmp_path / "ws", 90.0)
    if attack == "absolute":
        point_model(ws, str(outside / "host-secret"))
    elif attack == "dot-dot":
        point_model(ws, "runs/r1/../../../outside/host-secret")
    elif attack == "another run":  # a regular file of the workspace, but not of this run
        point_model(ws, "commit.txt")
    elif attack == "linked model":
        (ws / "runs" / "r1" / "model.pt").unlink()
        (ws / "runs" / "r1" / "model.pt").symlink_to(outside / "host-secret")
    elif attack == "linked run folder":
        (ws / "runs" / "r1" / "model.pt").unlink()
        (ws / "runs" / "r1").rmdir()
        (ws / "runs" / "r1").symlink_to(outside, target_is_directory=True)
        point_model(ws, "runs/r1/host-secret")
    else:
        (ws / "runs" / "r1" / "host-secret").symlink_to(outside / "host-secret")
        (ws / "runs").rename(tmp_path / "runs-elsewhere")
        (ws / "runs").symlink_to(tmp_path / "runs-elsewhere", target_is_directory=True)
        point_model(ws, "runs/r1/model.pt")
    before = state(outside)

    result = tool("ct.pipeline.promote", ws)

    assert_one_line_error(result, "nothing promoted")
    assert not (ws / "best.json").exists() and not (ws / "best-model.pt").exists()
    assert not (ws / "models").exists() or not list((ws / "models").iterdir())
    assert_nothing_leaked(ws, outside, before, result.stdout, result.stderr)


def test_a_linked_models_folder_is_neither_written_nor_pruned(tmp_path: Path,
                                                              outside: Path) -> None:
    ws = make_workspace(tmp_path / "ws", 81.0, model_bytes=b"first model")
    assert tool("ct.pipeline.promote", ws).returncode == 0
    best = (ws / "best.json").read_bytes()
    for stored in (ws / "models").iterdir():
        stored.unlink()
    (ws / "models").rmdir()
    (ws / "models").symlink_to(outside, target_is_directory=True)
    write_run(ws, 90.0, run_id="r2", model_bytes=b"attacker bytes")
    before = state(outside)

    result = tool("ct.pipeline.promote", ws)

    assert_one_line_error(result, f"{ws / 'models'}: a symbolic link, refused",
                          "best model is unchanged")
    assert (ws / "best.json").read_bytes() == best
    assert state(outside) == before, "no attacker bytes written, no best-*.pt deleted outside"


def test_a_linked_best_model_pt_is_replaced_not_written_through(tmp_path: Path,
                                                                outside: Path) -> None:
    ws = make_workspace(tmp_path / "ws", 81.0, model_bytes=b"first model")
    (ws / "best-model.pt").symlink_to(outside / "host-secret")
    before = state(outside)
    assert tool("ct.pipeline.promote", ws).returncode == 0
    assert os.readlink(ws / "best-model.pt").startswith("models/best-")
    assert_nothing_leaked(ws, outside, before)


# ---------------------------------------------------------------- the gate


@pytest.mark.parametrize("linked", ["accuracy.txt", "accuracy-history.csv"])
def test_the_gate_shows_and_copies_nothing_a_link_points_at(tmp_path: Path, outside: Path,
                                                            linked: str) -> None:
    ws = make_workspace(tmp_path / "ws", 81.5)
    secret = outside / "host-secret"
    if linked == "accuracy.txt":  # its first characters used to be printed in the error
        secret.write_bytes(SECRET + b" " + SECRET)
        (ws / linked).unlink()
    (ws / linked).symlink_to(secret)
    before = state(outside)

    result = tool("ct.pipeline.gate", ws, "--threshold", "80")

    assert_one_line_error(result, f"{ws / linked}", "symbolic link")
    assert not (ws / "gate.properties").exists()
    assert_nothing_leaked(ws, outside, before, result.stdout, result.stderr)


# ---------------------------------------------------------------- the mail


@pytest.mark.parametrize("attack", ["curves.png", "run folder", "best.json", "outbox"])
def test_the_mail_attaches_no_host_file(tmp_path: Path, outside: Path, attack: str) -> None:
    ws = make_workspace(tmp_path / "ws", 81.5)
    secret = outside / "host-secret"
    if attack == "curves.png":
        (ws / "runs" / "r1" / "curves.png").symlink_to(secret)
    elif attack == "run folder":  # a regular file, in a run folder that is a link
        (outside / "curves.png").write_bytes(SECRET)
        (outside / "curves.png").chmod(0o600)
        (ws / "runs" / "r1" / "model.pt").unlink()
        (ws / "runs" / "r1").rmdir()
        (ws / "runs" / "r1").symlink_to(outside, target_is_directory=True)
    elif attack == "best.json":
        (ws / "best.json").symlink_to(secret)
    else:
        (ws / "outbox").symlink_to(outside, target_is_directory=True)
    before = state(outside)

    result = tool("ct.pipeline.notify", ws, "--event", "best-model")

    words = ("cannot keep the message", "a symbolic link") if attack == "outbox" else \
        ("cannot read", "a symbolic link", "nothing sent")
    assert_one_line_error(result, *words)
    assert not list(ws.glob("outbox/*.eml")), "no message kept"
    assert_nothing_leaked(ws, outside, before, result.stdout, result.stderr)


def test_a_regular_curves_png_is_still_attached(tmp_path: Path, outside: Path) -> None:
    ws = make_workspace(tmp_path / "ws", 81.5)
    (ws / "runs" / "r1" / "curves.png").write_bytes(b"\x89PNG\r\n\x1a\n picture")
    result = tool("ct.pipeline.notify", ws, "--event", "best-model")
    assert result.returncode == 0, result.stderr
    (eml,) = (ws / "outbox").glob("*.eml")
    parts = message_from_bytes(eml.read_bytes()).walk()
    assert "curves.png" in [part.get_filename() for part in parts]


# ---------------------------------------------------------------- the report


def plant_scripts(ws: Path) -> None:
    """`<script>` in every string the report reads: metrics.json, best.json (lineage, params,
    replaced), a tuning run's fields, a run folder's name, the history and job6's records."""
    keys = ("mode", "commit", "finished_at", "resumes", "wall_time_s", "trials", "study",
            "trials_planned", "trials_finished", "trials_pruned", "val_accuracy", "device",
            "torch", "image", "model", "model_sha256", "promoted_at", "dataset_sha256",
            "data_version", "test_version")
    fields = {key: XSS for key in keys}
    lineage = {key: XSS for key in ("commit", "image", "torch", "device", "dataset_sha256",
                                    "data_version", "data", "code_sha256")}
    classes = {"classes": [XSS, "cat"], "per_class_accuracy": {XSS: 50.0, "cat": 60.0}}
    run = {**fields, **classes, "accuracy": 81.0, "run_id": XSS, "lineage": lineage,
           "best_params": {XSS: XSS}, "config": {XSS: XSS}}
    for name, mode in (f"train-20250101-000000-{XSS}", "train"), ("tune-20250102-000000-x", "tune"):
        folder = ws / "runs" / name
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text(json.dumps(run | {"mode": mode, "run_id": name}))
        (folder / "curves.png").write_bytes(b"png")
        (folder / "trials.png").write_bytes(b"png")
    (ws / "runs" / "broken").mkdir()
    (ws / "runs" / "broken" / "metrics.json").write_text(json.dumps({"accuracy": XSS}))
    (ws / "metrics.json").write_text(json.dumps(run))
    best = {**run, "params": {XSS: XSS}, "replaced": {"run_id": XSS, **classes}}
    (ws / "best.json").write_text(json.dumps(best))
    row = ",".join([XSS.replace('"', "'")] * 3)
    (ws / "accuracy-history.csv").write_text(
        f"time,build,commit,accuracy,threshold,passed,run\n{row},81,80,{XSS},{XSS}\n")
    (ws / "status").mkdir()
    (ws / "status" / "train.properties").write_text(
        "\n".join(f"{key}={XSS}" for key in ("RESTARTS", "STATUS", "EXIT_CODE", "GAVE_UP")))


def test_the_report_escapes_every_field(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    plant_scripts(ws)
    result = tool("ct.pipeline.report", ws)
    assert result.returncode == 0, result.stderr
    page = (ws / "report" / "index.html").read_text()
    assert "&lt;script&gt;" in page, "the planted values are shown, escaped"
    assert "<script" not in page.lower()


def test_the_report_publishes_no_linked_picture(tmp_path: Path, outside: Path) -> None:
    ws = make_workspace(tmp_path / "ws", 81.5)
    (ws / "runs" / "r1" / "confusion.png").symlink_to(outside / "host-secret")
    (ws / "runs" / "r1" / "curves.png").symlink_to(outside / "host-secret")
    before = state(outside)
    result = tool("ct.pipeline.report", ws)
    assert result.returncode == 0, result.stderr
    page = (ws / "report" / "index.html").read_text()
    assert not (ws / "report" / "confusion.png").exists() and "curves.png" not in page
    assert "confusion.png cannot be read (a symbolic link, refused)" in page
    assert_nothing_leaked(ws, outside, before, result.stdout, result.stderr)


def test_a_linked_report_folder_is_not_written_through(tmp_path: Path, outside: Path) -> None:
    ws = make_workspace(tmp_path / "ws", 81.5)
    (ws / "report").symlink_to(outside, target_is_directory=True)
    before = state(outside)
    result = tool("ct.pipeline.report", ws)
    assert_one_line_error(result, f"{ws / 'report'}", "a symbolic link")
    assert state(outside) == before


# ---------------------------------------------------------------- other records, the helper


def test_the_push_queue_is_never_read_or_locked_through_a_link(tmp_path: Path,
                                                               outside: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "status").symlink_to(outside, target_is_directory=True)
    before = state(outside)
    with pytest.raises(push_queue.PipelineError, match="a symbolic link"), \
            push_queue.locked(ws):
        pass
    assert state(outside) == before, "no lock file created outside"
    (ws / "status").unlink()
    (ws / "status").mkdir()
    (ws / "status" / "pushes.json").symlink_to(outside / "host-secret")
    with pytest.raises(push_queue.PipelineError, match="a symbolic link") as err:
        push_queue.load(ws)
    assert SECRET.decode() not in str(err.value)


def test_untrusted_reads_refuse_links_fifos_and_big_files(tmp_path: Path,
                                                          outside: Path) -> None:
    ws = tmp_path / "ws"
    (ws / "a" / "b").mkdir(parents=True)
    (ws / "a" / "b" / "ok.json").write_text('{"k": 1}')
    assert untrusted.read_json(ws / "a/b/ok.json", 100, root=ws) == {"k": 1}
    (ws / "link").symlink_to(ws / "a", target_is_directory=True)
    (ws / "a" / "secret").symlink_to(outside / "host-secret")
    (ws / "dangling").symlink_to(tmp_path / "nowhere")
    os.mkfifo(ws / "fifo")  # opened without O_NONBLOCK, this read would never return
    (ws / "big").write_bytes(b"x" * 101)
    refused = {"link/b/ok.json": "a symbolic link", "a/secret": "a symbolic link",
               "dangling": "a symbolic link", "fifo": "not a regular file",
               "big": "101 bytes, over the 100 allowed", "a": "not a regular file"}
    for name, why in refused.items():
        with pytest.raises(untrusted.UntrustedFile, match=why):
            untrusted.read_bytes(ws / name, 100, root=ws)
    with pytest.raises(untrusted.Missing):
        untrusted.read_bytes(ws / "a" / "none", 100, root=ws)
    with pytest.raises(untrusted.UntrustedFile, match="not inside"):
        untrusted.read_bytes(outside / "host-secret", 100, root=ws)
    (ws / "bad.json").write_text('{"password": ' + SECRET.decode())
    with pytest.raises(untrusted.UntrustedFile) as err:
        untrusted.read_json(ws / "bad.json", 1000, root=ws)
    assert SECRET.decode() not in str(err.value), "a JSON error names a position, not content"
    assert untrusted.within("runs/r1/model.pt", "runs/r1")
    for name in ("/runs/r1/x", "runs/r1/../r2/x", "runs/r1", "runs/r10/x", "runs/r1/\nx", 7):
        assert not untrusted.within(name, "runs/r1"), name
