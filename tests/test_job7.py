"""job7 (scripts/job7-deploy.sh) on the local runtime with the real service (`python -m
ct.serving`, started by job7) and real exported models (tests/served_model.py): it deploys the
champion, leaves a served champion alone, keeps the old model when the new one fails its smoke
test (exit 1 and a mail that says why), rolls back, stops; nothing to deploy is green; a step
that fails before the deploy mails too. Then the whole local chain (slow): train, gate, export
with the champion's own code, deploy."""

from __future__ import annotations

import json
import os
import re
import signal
import time
import urllib.request
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

from ct.pipeline.deploy_records import DEPLOYED, PID_FILE
from tests import served_model
from tests.conftest import REPO, run_script

# What the service is asked to check; a loaded CI machine must not fail the latency part.
SERVICE_ENV = {"CT_SERVE_POLL_S": "0.1", "CT_SERVE_THREADS": "1", "OMP_NUM_THREADS": "1",
               "CT_SERVE_SMOKE_P99_MS": "5000"}


@pytest.fixture
def job7_env(script_env):
    """script_env on a free port; the service job7 starts is stopped afterwards."""
    env = {**script_env, **SERVICE_ENV, "CT_SERVE_PORT": str(served_model.free_port())}
    ws = Path(env["CT_WORKSPACE"])
    ws.mkdir(parents=True, exist_ok=True)
    yield env
    run_script("job7-deploy.sh", env, "stop", check=False)
    pid = service_pid(ws)
    if pid is not None:  # stop failed: do not leave it running
        os.kill(pid, signal.SIGKILL)


def service_pid(ws: Path) -> int | None:
    try:
        pid = int((ws / PID_FILE).read_text())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def get_model(env: dict[str, str]) -> dict:
    url = f"http://127.0.0.1:{env['CT_SERVE_PORT']}/model"
    with urllib.request.urlopen(url, timeout=5) as answer:
        return json.loads(answer.read())


def crown(ws: Path, seed: int, **kwargs) -> served_model.Champion:
    commit = str(seed) * 40  # commit 1111111..., 2222222...
    champion = served_model.write_champion(ws, seed, commit=commit, **kwargs)
    served_model.write_best(ws, champion)
    best = json.loads((ws / "best.json").read_text())
    (ws / "best.json").write_text(json.dumps({**best, "commit": commit}))
    return champion


def test_nothing_to_deploy_is_green_and_starts_nothing(job7_env):
    proc = run_script("job7-deploy.sh", job7_env)
    assert "no champion yet (no best.json): nothing to deploy" in proc.stderr
    assert service_pid(Path(job7_env["CT_WORKSPACE"])) is None


def test_job7_deploys_keeps_the_old_model_on_a_failed_smoke_test_and_rolls_back(
        job7_env, smtp_server):
    smtp, inbox = smtp_server
    env = {**job7_env, **smtp,
           # what Jenkins gives a build, which core kills the leftovers of (test_jenkins_deploy)
           "BUILD_ID": "41", "BUILD_NUMBER": "41", "JOB_NAME": "job7",
           "JENKINS_SERVER_COOKIE": "c0ffee"}
    ws = Path(env["CT_WORKSPACE"])
    first = crown(ws, 1)
    proc = run_script("job7-deploy.sh", env)
    assert f"deployed {first.onnx} (commit 1111111" in proc.stdout
    assert "service started: pid" in proc.stderr
    pid = service_pid(ws)
    assert pid is not None
    served = get_model(env)
    assert served["model"]["sha256"] == first.sha256 and served["swap"]["ok"] is True
    environ = dict(item.split("=", 1) for item in
                   Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in item)
    assert environ["BUILD_ID"] != "41", "Jenkins would kill the service at the end of the build"

    # the champion is served: nothing asked, the same process
    again = run_script("job7-deploy.sh", env)
    assert "serves the champion" in again.stdout and service_pid(ws) == pid

    # a champion that fails its smoke test: red, mailed, the old model keeps serving
    bad = crown(ws, 2, accuracy_offset=30.0)
    artifacts = ws.parent / "artifacts" / "job7"  # what Jenkins archives of this build
    failed = run_script("job7-deploy.sh", {**env, "CT_ARTIFACTS_DIR": str(artifacts)},
                        check=False)
    assert failed.returncode == 1, failed.stderr
    kept = json.loads((artifacts / "deploy.json").read_text())
    assert kept["outcome"] == "failed" and kept["target"]["sha256"] == bad.sha256
    assert json.loads((artifacts / "deployed.json").read_text())["current"]["sha256"] == \
        first.sha256
    assert f"ct.deploy: the service refused {bad.onnx}" in failed.stderr
    assert get_model(env)["model"]["sha256"] == first.sha256
    assert json.loads((ws / "serving" / "wanted.json").read_text())["sha256"] == first.sha256
    (mail,) = inbox.messages
    assert mail["Subject"].startswith(f"[CT] deploying the champion failed at 2222222: "
                                      f"the service refused {bad.onnx}")
    body = mail.get_body(("plain",)).get_content()
    assert "smoke" in body and f"serving now: {first.onnx}" in body
    assert "job7 failed while deploying the champion" in body

    # a good champion deploys; rollback goes back to the one before
    second = crown(ws, 3)
    run_script("job7-deploy.sh", env)
    assert get_model(env)["model"]["sha256"] == second.sha256
    deployed = json.loads((ws / DEPLOYED).read_text())
    assert deployed["previous"]["sha256"] == first.sha256
    back = run_script("job7-deploy.sh", env, "rollback")
    assert f"rolled back to {first.onnx}" in back.stdout
    assert get_model(env)["model"]["sha256"] == first.sha256
    held = run_script("job7-deploy.sh", env)
    assert "rolled back by hand" in held.stdout
    assert len(inbox.messages) == 1

    run_script("job7-deploy.sh", env, "stop")
    for _ in range(50):
        if service_pid(ws) is None:
            break
        time.sleep(0.1)
    assert service_pid(ws) is None


def test_a_step_before_the_deploy_that_fails_is_mailed(job7_env, smtp_server):
    smtp, inbox = smtp_server
    ws = Path(job7_env["CT_WORKSPACE"])
    # a champion with no export and no commit whose code could export it
    (ws / "best.json").write_text(json.dumps({"accuracy": 81.0, "model": "models/best-x.pt"}))
    proc = run_script("job7-deploy.sh", {**job7_env, **smtp}, check=False)
    assert proc.returncode == 2
    assert "names no full commit id" in proc.stderr
    (mail,) = inbox.messages
    body = mail.get_body(("plain",)).get_content()
    assert "job7 failed while checking the champion's export (exit 2)." in body
    assert service_pid(ws) is None


@pytest.mark.parametrize("args, says", [(["undeploy"], "unknown action 'undeploy'"),
                                        (["deploy", "x"], "usage: job7-deploy.sh")])
def test_job7_refuses_what_it_does_not_know(job7_env, args, says):
    proc = run_script("job7-deploy.sh", job7_env, *args, check=False)
    assert proc.returncode == 2 and says in proc.stderr


def test_the_serving_image_tag_covers_everything_dockerfile_serve_copies():
    """lib.sh's serve_image tags the image by the hash of SERVE_IMAGE_SOURCES: a COPY source
    missing there would let a changed file reuse an image built without it."""
    text = (REPO / "scripts" / "lib.sh").read_text()
    listed = re.search(r"^SERVE_IMAGE_SOURCES=\((.*?)\)", text, re.M | re.S).group(1).split()
    parser = DockerfileParser(fileobj=open(REPO / "Dockerfile.serve", "rb"))
    copied = [src for i in parser.structure if i["instruction"] == "COPY"
              for src in i["value"].split()[:-1] if not src.startswith("--")]
    assert copied
    for source in copied:
        assert any(source == item or source.startswith(item + "/") for item in listed), source
    assert {"Dockerfile.serve", ".dockerignore"} <= set(listed)


@pytest.mark.slow
def test_the_local_chain_trains_exports_and_deploys(source_repo, job7_env, smtp_server):
    smtp, inbox = smtp_server
    env = {**job7_env, **smtp, "CT_DEPLOY": "1"}
    proc = run_script("pipeline.sh", env, str(source_repo), timeout=900)
    ws = Path(env["CT_WORKSPACE"])
    best = json.loads((ws / "best.json").read_text())
    export = best["export"]
    assert get_model(env)["model"]["sha256"] == export["onnx_sha256"]
    assert "job7-deploy.sh exit 0" in proc.stderr
    manifest = json.loads((ws / export["manifest"]).read_text())
    assert manifest["commit"] == best["commit"] and manifest["format"] == "ct-export/1"
    assert len(inbox.messages) == 1  # the promotion's mail; a deploy that went well sends none


@pytest.mark.slow
@pytest.mark.docker
def test_the_docker_chain_deploys_into_a_locked_down_container(source_repo, docker_env,
                                                               docker_engine):
    """The same on docker: the export in the champion's training image, the serving image built
    from Dockerfile.serve (on the tests' serve base), the service's container as job7 runs it."""
    from tests import docker_engine as de

    env = {**docker_env, **SERVICE_ENV, "CT_DEPLOY": "1",
           "CT_SERVE_PORT": str(served_model.free_port()),
           "CT_SERVE_BASE_IMAGE": de.ensure_serve_base_image(docker_engine)}
    run_script("pipeline.sh", env, str(source_repo), timeout=1800)
    ws = Path(env["CT_WORKSPACE"])
    export = json.loads((ws / "best.json").read_text())["export"]
    assert get_model(env)["model"]["sha256"] == export["onnx_sha256"]
    (name,) = docker_engine.docker("ps", "-q", "--filter", "label=ct.role=serve", "--filter",
                                   f"label=ct.workspace={ws}").split()
    config = json.loads(docker_engine.docker("inspect", name))[0]
    host = config["HostConfig"]
    assert config["Config"]["User"] == "1000:1000" and host["ReadonlyRootfs"] is True
    assert host["CapDrop"] == ["ALL"] and "no-new-privileges" in host["SecurityOpt"]
    assert host["Memory"] > 0 and host["RestartPolicy"]["Name"] == "unless-stopped"
    assert host["NetworkMode"] == "host"
    mounts = {m["Destination"]: m["RW"] for m in config["Mounts"]}
    assert mounts == {"/workspace/models": False, "/workspace/serving": False}
    # a second job7 finds the champion served by the same container
    again = run_script("job7-deploy.sh", env)
    assert "serves the champion" in again.stdout and "not rebuilding" in again.stderr
    assert docker_engine.docker("ps", "-q", "--filter", "label=ct.role=serve", "--filter",
                                f"label=ct.workspace={ws}").split() == [name]
