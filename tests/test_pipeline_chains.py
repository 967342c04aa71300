"""The chain end to end through scripts/pipeline.sh and the job scripts, on both runtimes:
real git repositories, a real SMTP server (aiosmtpd), a real Docker engine (tests/docker_engine.py).
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import git, read_props, run_script


def _mail_checks(inbox, ws: Path, commit: str) -> None:
    assert len(inbox.messages) == 1
    msg = inbox.messages[0]
    best = json.loads((ws / "best.json").read_text())
    assert commit[:7] in msg["Subject"]
    assert f"{best['accuracy']:g}" in msg["Subject"] or str(best["accuracy"]) in msg["Subject"]
    assert msg["To"] == "team@example.com"


def _assert_passed_and_promoted(ws: Path, inbox) -> None:
    commit = (ws / "commit.txt").read_text().strip()
    gate = read_props(ws / "gate.properties")
    assert gate["PASSED"] == "true"
    best = json.loads((ws / "best.json").read_text())
    metrics = json.loads((ws / "metrics.json").read_text())
    assert best["accuracy"] == metrics["accuracy"] >= 80
    assert best["commit"] == commit
    assert (ws / "best-model.pt").stat().st_size > 0
    assert read_props(ws / "status" / "train.properties")["EXIT_CODE"] == "0"
    _mail_checks(inbox, ws, commit)


@pytest.fixture
def docker_env(script_env, docker_engine):
    """script_env on the docker runtime, with the test base image and a private image prefix."""
    prefix = f"ct-test-{uuid.uuid4().hex[:8]}"
    env = {
        **script_env,
        "DOCKER_HOST": docker_engine.host,
        "CT_RUNTIME": "docker",
        "CT_BASE_IMAGE": docker_engine.base_image,
        "CT_IMAGE_PREFIX": prefix,
    }
    yield env
    ids = docker_engine.docker("ps", "-aq", "--filter", f"label=ct.workspace={env['CT_WORKSPACE']}")
    if ids.split():
        docker_engine.docker("rm", "-f", *ids.split(), check=False)
    images = docker_engine.docker("images", "-q", "--filter", f"reference={prefix}-*")
    if images.split():
        docker_engine.docker("rmi", "-f", *set(images.split()), check=False)


# ------------------------------------------------------------------------------ local runtime


def test_local_chain_passes_promotes_and_mails(source_repo, script_env, smtp_server):
    smtp, inbox = smtp_server
    env = {**script_env, **smtp}
    proc = run_script("pipeline.sh", env, str(source_repo))
    ws = Path(env["CT_WORKSPACE"])
    _assert_passed_and_promoted(ws, inbox)
    assert "job5" not in proc.stderr  # no tuning above the threshold
    assert read_props(ws / "status" / "train.properties")["RUNTIME"] == "local"


@pytest.mark.slow
def test_local_chain_below_threshold_tunes_once(source_repo, script_env, smtp_server):
    smtp, inbox = smtp_server
    env = {**script_env, **smtp, "CT_THRESHOLD": "100"}
    env["CT_TRAIN_ARGS"] = "--batch-size 64 --epochs 1 --lr 0.01 --seed 1"  # well below 100 %
    run_script("pipeline.sh", env, str(source_repo), timeout=900)
    ws = Path(env["CT_WORKSPACE"])
    assert read_props(ws / "gate.properties")["PASSED"] == "false"
    _assert_tuned(ws, inbox)
    # a second job5 for the same commit does not tune again
    again = run_script("job5-tune.sh", env)
    assert "not tuning again" in again.stderr
    assert len(inbox.messages) == 1


def _assert_tuned(ws: Path, inbox) -> None:
    metrics = json.loads((ws / "metrics.json").read_text())
    assert metrics["mode"] == "tune"
    assert metrics["trials"] <= 2
    best = json.loads((ws / "best.json").read_text())
    assert (ws / "best-model.pt").exists()
    assert read_props(ws / "status" / "tune-rounds.properties")["ROUNDS"] == "1"
    assert len(inbox.messages) == 1
    body = inbox.messages[0].get_body(("plain",)).get_content()
    assert "tun" in inbox.messages[0]["Subject"].lower()
    for key in ("lr", "optimizer"):
        assert key in body
    assert best["accuracy"] >= 0


# ------------------------------------------------------------------------------ docker runtime


@pytest.mark.docker
def test_docker_image_reused_on_second_push(source_repo, docker_env, docker_engine):
    ws = Path(docker_env["CT_WORKSPACE"])
    run_script("job1-pull.sh", docker_env, str(source_repo))
    first = run_script("job2-image.sh", docker_env)
    tag = first.stdout.strip()
    assert tag.startswith(docker_env["CT_IMAGE_PREFIX"] + "-train:")
    assert "building" in first.stderr
    image_id = docker_engine.docker("image", "inspect", "-f", "{{.Id}}", tag).strip()
    assert docker_engine.docker("image", "inspect", "-f", "{{.Config.User}}", tag).strip() == (
        "1000:1000"
    )
    assert read_props(ws / "status" / "image.properties")["FRAMEWORK"] == "pytorch"
    # second push: code changed, Dockerfile and requirements unchanged -> same image, no build
    (source_repo / "network.py").write_text((source_repo / "network.py").read_text() + "# v2\n")
    git(source_repo, "commit", "-qam", "code only")
    run_script("job1-pull.sh", docker_env, str(source_repo))
    t0 = time.monotonic()
    second = run_script("job2-image.sh", docker_env)
    assert second.stdout.strip() == tag
    assert "not rebuilding" in second.stderr and "Step 1/" not in second.stderr
    assert docker_engine.docker("image", "inspect", "-f", "{{.Id}}", tag).strip() == image_id
    assert time.monotonic() - t0 < 15
    # a changed Dockerfile is a new image
    (source_repo / "Dockerfile.train").write_text(
        (source_repo / "Dockerfile.train").read_text() + "# v3\n"
    )
    git(source_repo, "commit", "-qam", "Dockerfile changed")
    run_script("job1-pull.sh", docker_env, str(source_repo))
    third = run_script("job2-image.sh", docker_env)
    assert third.stdout.strip() != tag and "building" in third.stderr


@pytest.mark.docker
def test_docker_restart_limit(source_repo, docker_env):
    env = {**docker_env, "CT_TRAIN_ARGS": "--epochs -3", "CT_MAX_RESTARTS": "2"}
    run_script("job1-pull.sh", env, str(source_repo))
    run_script("job2-image.sh", env)
    assert run_script("job3-train.sh", env, check=False).returncode == 1
    state = read_props(Path(env["CT_WORKSPACE"]) / "status" / "train.properties")
    assert state["EXIT_CODE"] == "2" and state["OOM_KILLED"] == "false"
    proc = run_script("job6-monitor.sh", env, "monitor", "--follow", check=False)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.count("restarting it") == 2
    assert "giving up" in proc.stderr
    assert read_props(Path(env["CT_WORKSPACE"]) / "status" / "train.properties")["RESTARTS"] == "2"


@pytest.mark.docker
@pytest.mark.slow
def test_docker_chain_passes_promotes_and_mails(
    source_repo, docker_env, smtp_server, docker_engine
):
    smtp, inbox = smtp_server
    env = {**docker_env, **smtp}
    run_script("pipeline.sh", env, str(source_repo))
    ws = Path(env["CT_WORKSPACE"])
    _assert_passed_and_promoted(ws, inbox)
    state = read_props(ws / "status" / "train.properties")
    assert state["RUNTIME"] == "docker"
    name = state["CONTAINER"]
    config = json.loads(docker_engine.docker("inspect", name))[0]
    assert config["Config"]["User"] not in ("", "0", "root", "0:0")
    assert config["Config"]["Labels"]["ct.role"] == "train"
    assert any(m["Destination"] == "/workspace" for m in config["Mounts"])
    run_dir = json.loads((ws / "metrics.json").read_text())["run_dir"]
    assert (ws / run_dir / "model.pt").stat().st_uid != 0  # written by the non-root user


@pytest.mark.docker
@pytest.mark.slow
def test_docker_chain_below_threshold_tunes(source_repo, docker_env, smtp_server):
    smtp, inbox = smtp_server
    env = {**docker_env, **smtp, "CT_THRESHOLD": "100"}
    env["CT_TRAIN_ARGS"] = "--batch-size 64 --epochs 1 --lr 0.01 --seed 1"  # well below 100 %
    run_script("pipeline.sh", env, str(source_repo), timeout=900)
    ws = Path(env["CT_WORKSPACE"])
    assert read_props(ws / "gate.properties")["PASSED"] == "false"
    state = read_props(ws / "status" / "tune.properties")
    assert state["RUNTIME"] == "docker" and state["EXIT_CODE"] == "0"
    assert state["IMAGE"].startswith(env["CT_IMAGE_PREFIX"] + "-tune:")
    _assert_tuned(ws, inbox)
    assert "not tuning again" in run_script("job5-tune.sh", env).stderr


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _epochs_done(ws: Path) -> int:
    return sum(len(p.read_text().splitlines()) for p in ws.glob("runs/train-*/epochs.jsonl"))


@pytest.mark.docker
@pytest.mark.slow
def test_docker_killed_training_resumes_to_the_same_result_and_is_judged_once(
    source_repo, docker_env, docker_engine, tmp_path, smtp_server
):
    """The Jenkins path of self-healing: job3 fails when its container is killed (so Jenkins never
    runs job4 after it), job6 cycles restart the container and, once the run has finished, hand it
    to job4 through handover.properties; the gate, the promotion and the mail happen once."""
    smtp, inbox = smtp_server
    args = "--batch-size 32 --epochs 5 --lr 0.05 --seed 7"
    # the reference: an uninterrupted run with the same seed
    ref_env = {**docker_env, "CT_TRAIN_ARGS": args, "CT_WORKSPACE": str(tmp_path / "ref")}
    run_script("job1-pull.sh", ref_env, str(source_repo))
    run_script("job2-image.sh", ref_env)
    run_script("job3-train.sh", ref_env)
    reference = json.loads((tmp_path / "ref" / "metrics.json").read_text())

    # threshold 1%: the small synthetic dataset passes, so the verdict promotes and mails
    env = {**docker_env, **smtp, "CT_TRAIN_ARGS": args, "CT_THRESHOLD": "1"}
    ws = Path(env["CT_WORKSPACE"])
    run_script("job1-pull.sh", env, str(source_repo))
    run_script("job2-image.sh", env)
    job3 = subprocess.Popen(
        [str(Path(__file__).parent.parent / "scripts" / "job3-train.sh")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        _wait_for(lambda: _epochs_done(ws) >= 1, 180, "the first epoch")
        name = read_props(ws / "status" / "train.properties")["CONTAINER"]
        docker_engine.docker("kill", name)  # mid-epoch 2
        _, err = job3.communicate(timeout=60)
    finally:
        job3.kill()
    assert job3.returncode == 1, err
    state = read_props(ws / "status" / "train.properties")
    assert state["EXIT_CODE"] == "137"
    done_before = _epochs_done(ws)
    assert done_before < 5

    # one monitor cycle: back to training at once
    proc = run_script("job6-monitor.sh", env, "monitor")
    assert "restarting it (1 of 3)" in proc.stderr
    running = docker_engine.docker("inspect", "-f", "{{.State.Running}}", name).strip()
    assert running == "true" or _epochs_done(ws) == 5
    assert not (ws / "handover.properties").exists()  # nothing to judge while it trains
    docker_engine.docker("wait", name, timeout=600)
    assert not (ws / "gate.properties").exists() and not inbox.messages  # nobody judged it yet

    # the cycle that sees it finished hands it over (in Jenkins: job6's parameterized trigger)
    proc = run_script("job6-monitor.sh", env, "monitor")
    assert "finished" in proc.stderr and "handing the restarted run" in proc.stderr
    handover = read_props(ws / "handover.properties")
    run_dir = json.loads((ws / "metrics.json").read_text())["run_dir"]
    assert handover == {"COMMIT": (ws / "commit.txt").read_text().strip(), "RUN_DIR": run_dir}
    # job4 as that trigger starts it: the file's keys become its parameters (a stand-in for the
    # Jenkins server, which cannot run here; jobs.yaml passes "$RUN_DIR" to the script)
    run_script("job4-gate.sh", {**env, "COMMIT": handover["COMMIT"]}, handover["RUN_DIR"])
    gate = read_props(ws / "gate.properties")
    assert gate["RUN_DIR"] == run_dir and gate["PASSED"] == "true"
    best = json.loads((ws / "best.json").read_text())
    assert best["run_dir"] == run_dir
    assert len(inbox.messages) == 1

    # later cycles hand nothing over again, and a second job4 for the run changes nothing
    proc = run_script("job6-monitor.sh", env, "monitor")
    assert "finished" in proc.stderr and "handing" not in proc.stderr
    assert not (ws / "handover.properties").exists()
    assert "judged already" in run_script("job4-gate.sh", env, run_dir).stderr
    assert len(inbox.messages) == 1
    assert len((ws / "accuracy-history.csv").read_text().splitlines()) == 2  # header + 1 verdict
    assert json.loads((ws / "best.json").read_text())["promoted_at"] == best["promoted_at"]

    result = json.loads((ws / "metrics.json").read_text())
    assert result["run_id"].startswith("train-")
    assert len(list(ws.glob("runs/train-*"))) == 1  # the same run, resumed
    log = (ws / result["run_dir"] / "train.log").read_text()
    assert "resum" in log.lower()
    epochs = [
        json.loads(line)["epoch"]
        for line in (ws / result["run_dir"] / "epochs.jsonl").read_text().splitlines()
    ]
    assert epochs[-1] == 5 and sorted(set(epochs)) == [1, 2, 3, 4, 5]
    assert result["accuracy"] == reference["accuracy"]
    assert result["test_loss"] == reference["test_loss"]
    assert (ws / "accuracy.txt").read_text() == (tmp_path / "ref" / "accuracy.txt").read_text()
