"""Jenkins as code: no secret in jenkins/, the controller's set-up (casc.yaml, compose file,
Dockerfile, renderer pin), the deploy script, and the documented fan-out for tuning. No Jenkins
server and no Docker engine needed."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import yaml

from tests import test_jenkins_checks as jc
from tests.conftest import required_tool, venv_tool
from tests.jenkins_render import (
    JENKINS,
    JOBS,
    PT,
    REPO,
    TOKEN,
)

# ------------------------------------------------------------------------------- secrets

SECRET_WORDS = re.compile(r"(password|passwd|secret|token|api[_-]?key)", re.I)
ENV_REF = re.compile(r"^\$\{[A-Z][A-Z0-9_]*(:[-?][^}]*)?\}$")


def test_no_literal_secret_anywhere_in_jenkins_dir():
    problems = []
    assignment = re.compile(
        r"(?P<key>[\w.-]*(password|passwd|secret|token|api[_-]?key)[\w.-]*)\s*[:=]\s*"
        r"(?P<value>[^\s#][^#\n]*)", re.I)
    for path in sorted(p for p in JENKINS.rglob("*") if p.is_file()):
        text = path.read_text(errors="replace")
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.lstrip().startswith("#") or jc.PINNED.match(line.strip()):
                continue  # comments, and plugin pins such as token-macro:400.v35420b_922dcb_
            for m in assignment.finditer(line):
                value = m["value"].strip().strip("'\"")
                allowed = (
                    ENV_REF.match(value)
                    or value.startswith("!include-raw-verbatim:")
                    or value.startswith("?set ")
                    or m["key"].lower() in {"credential-id", "id", "token-macro"}  # a plugin
                    or value in {"", "GLOBAL"}
                    or re.fullmatch(r"[A-Z][A-Z0-9_]*", value)  # names a variable to bind
                )
                if not allowed:
                    problems.append(f"{path.relative_to(REPO)}:{lineno}: {line.strip()}")
            # Long random-looking strings (API tokens are 32+ hex characters).
            for blob in re.findall(r"\b[0-9a-fA-F]{32,}\b|\b[A-Za-z0-9+/]{40,}={0,2}", line):
                problems.append(f"{path.relative_to(REPO)}:{lineno}: looks like a key: {blob}")
    assert problems == []


# --------------------------------------------------------------------------- controller


def walk(node, path=""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from walk(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from walk(value, f"{path}[{i}]")
    else:
        yield path, node


def test_casc_takes_every_secret_from_the_environment(rendered):
    casc = yaml.safe_load((JENKINS / "casc.yaml").read_text())
    assert {"jenkins", "credentials", "unclassified"} <= set(casc)
    secrets = [(p, v) for p, v in walk(casc)
               if SECRET_WORDS.search(p.rsplit("/", 1)[-1]) and "description" not in p]
    assert secrets, "casc.yaml configures no secret at all?"
    for path, value in secrets:
        assert isinstance(value, str) and ENV_REF.match(value), f"{path}: {value!r}"
        default = value.partition(":-")[2].rstrip("}")
        assert default == "", f"{path} has a default secret"
    users = casc["jenkins"]["securityRealm"]["local"]["users"]
    assert users and all(ENV_REF.match(u["password"]) for u in users)
    # Every credential a job binds is defined by casc.yaml, and the label the jobs want exists
    # (on the agent: tests/test_jenkins_security.py).
    defined = {v for p, v in walk(casc["credentials"]) if p.endswith("/id")}
    bound = {el.text for root in rendered.values() for el in root.iter("credentialsId")}
    assert bound and bound <= defined
    labels = {label for node in casc["jenkins"]["nodes"]
              for label in node["permanent"]["labelString"].split()}
    assert {rendered[j].findtext("assignedNode") for j in JOBS} <= labels
    env = {e["key"] for e in casc["jenkins"]["globalNodeProperties"][0]["envVars"]["env"]}
    assert "CT_WORKSPACE" in env
    # the repository is rendered into job1 (see above), not a global variable nobody expands
    assert not {"CT_REPO_URL", "CT_REPO_WEB_URL", "CT_BRANCH"} & env


def compose_command() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return None


def required_compose() -> list[str]:
    """The compose command, else a skip, or a failure under CT_REQUIRE_COMPOSE=1 (.ci/run): not
    pip-installable (PyPI's docker-compose is the retired v1), so it is a switch like Docker's."""
    cmd = compose_command()
    if cmd is None:
        required_tool(None, "docker-compose (or the docker compose plugin)",
                      "apt-get install -y docker-compose", "CT_REQUIRE_COMPOSE")
    assert cmd is not None
    return cmd


def test_compose_file_is_accepted_by_docker_compose_config():
    cmd = required_compose()
    compose = JENKINS / "docker-compose.yml"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CT_", "JENKINS_", "SMTP_"))}
    env.update(JENKINS_ADMIN_PASSWORD="x", JENKINS_RETRAIN_PASSWORD="r")
    proc = subprocess.run([*cmd, "-f", str(compose), "config"], capture_output=True, text=True,
                          env=env, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    config = yaml.safe_load(proc.stdout)
    service = config["services"]["jenkins"]
    assert "8080" in str(service["ports"])
    volumes = str(config["services"]["agent"]["volumes"])
    assert "/var/run/docker.sock" in volumes and "/srv/ct-workspace" in volumes
    # jenkinsci/docker tag 2.492.1, jenkins.sh: JAVA_OPTS and JENKINS_JAVA_OPTS both go to the JVM
    prop = "-Dhudson.plugins.git.GitSCM.ALLOW_LOCAL_CHECKOUT="
    assert f"{prop}false" in service["environment"]["JENKINS_JAVA_OPTS"]
    allowed = subprocess.run([*cmd, "-f", str(compose), "config"], capture_output=True, text=True,
                             env={**env, "CT_ALLOW_LOCAL_CHECKOUT": "true"}, timeout=60,
                             check=False)
    assert f"{prop}true" in yaml.safe_load(allowed.stdout)["services"]["jenkins"]["environment"][
        "JENKINS_JAVA_OPTS"]
    # Without the required secrets it refuses to start, instead of running with empty ones.
    for required in ("JENKINS_ADMIN_PASSWORD", "JENKINS_RETRAIN_PASSWORD"):
        without = {k: v for k, v in env.items() if k != required}
        proc = subprocess.run([*cmd, "-f", str(compose), "config"], capture_output=True,
                              text=True, env=without, timeout=60, check=False)
        assert proc.returncode != 0 and required in proc.stderr


def test_jenkins_dockerfiles_are_hadolint_clean():
    exe = required_tool(venv_tool("hadolint"), "hadolint", "pip install -r requirements-dev.txt",
                        "CT_REQUIRE_HADOLINT")
    for name in ("Dockerfile", "Dockerfile.agent"):
        proc = subprocess.run([exe, str(JENKINS / name)], capture_output=True, text=True,
                              timeout=60, check=False)
        assert proc.returncode == 0, name + proc.stdout + proc.stderr
    text = (JENKINS / "Dockerfile").read_text()
    assert "plugins.txt" in text and "casc.yaml" in text
    # the builds' tools are the agent's (tests/test_jenkins_security.py: the controller runs none)
    assert "docker.io" in (JENKINS / "Dockerfile.agent").read_text()


def test_jenkins_requirements_pin_the_renderer():
    lines = [x for x in (JENKINS / "requirements.txt").read_text().splitlines()
             if x and not x.startswith("#")]
    assert "jenkins-job-builder==6.5.0" in lines
    assert all("==" in x for x in lines)


# -------------------------------------------------------------------------- deploy script


def test_deploy_script_renders_offline_with_the_repository_from_the_environment(tmp_path):
    env = {**os.environ, "JJB": jc.jenkins_jobs_bin(), "PYTHONWARNINGS": "ignore",
           "CT_REPO_URL": "https://github.com/o/r.git"}
    proc = subprocess.run([str(REPO / "scripts" / "jenkins-deploy.sh"), "--test",
                           str(tmp_path / "out")], capture_output=True, text=True, env=env,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert ET.parse(tmp_path / "out" / "job2").getroot().find("authToken") is None
    assert ET.parse(tmp_path / "out" / "job1").getroot().findtext(
        ".//hudson.plugins.git.UserRemoteConfig/url") == "https://github.com/o/r.git"


def test_deploy_script_refuses_to_upload_without_its_settings():
    env = {k: v for k, v in os.environ.items()
           if k not in {"JENKINS_URL", "JENKINS_ADMIN_ID", "JENKINS_ADMIN_TOKEN", "CT_REPO_URL"}}
    env["JJB"] = jc.jenkins_jobs_bin()
    proc = subprocess.run([str(REPO / "scripts" / "jenkins-deploy.sh")], capture_output=True,
                          text=True, env=env, timeout=60, check=False)
    assert proc.returncode == 2
    assert "JENKINS_URL is not set" in proc.stderr
    # the retrain user's token is no upload identity: jobs are the admin's to create
    env.update(JENKINS_URL="http://j:8080/", JENKINS_USER="u", JENKINS_API_TOKEN="t")
    proc = subprocess.run([str(REPO / "scripts" / "jenkins-deploy.sh")], capture_output=True,
                          text=True, env=env, timeout=60, check=False)
    assert proc.returncode == 2 and "JENKINS_ADMIN_TOKEN is not set" in proc.stderr
    env.update(JENKINS_ADMIN_TOKEN="a")
    proc = subprocess.run([str(REPO / "scripts" / "jenkins-deploy.sh")], capture_output=True,
                          text=True, env=env, timeout=60, check=False)
    assert proc.returncode == 2 and "CT_REPO_URL is not set" in proc.stderr


def test_the_guides_fan_out_for_tuning_renders_and_does_not_block_job5(tmp_path: Path) -> None:
    """docs/jenkins.md "Tuning on several agents": its JJB snippet renders with the real renderer
    into a concurrent job on ct-docker agents and a trigger step without <block>.
    parameterized-trigger 859.vb_e3907a_07a_16 BlockableBuildTriggerConfig.perform3 returns no
    futures when block is null, and TriggerBuilder.perform then only logs "Triggering projects"
    and goes on: job5's own round starts at once, beside its helpers."""
    guide = (REPO / "docs" / "jenkins.md").read_text()
    (snippet,) = [block for block in re.findall(r"```yaml\n(.*?)```", guide, re.S)
                  if "name: job5-worker" in block]
    jobs = tmp_path / "fan-out.yaml"
    jobs.write_text(snippet + "\n- job:\n    name: job5\n    builders:\n      - ct-tune-helpers\n"
                    "      - shell: 'scripts/job5-tune.sh --no-mail'\n")
    xml = jc.render(jobs, tmp_path / "out", TOKEN)
    worker = xml["job5-worker"]
    assert worker.findtext("assignedNode") == "ct-docker"
    assert worker.findtext("concurrentBuild") == "true"
    command = worker.findtext(".//hudson.tasks.Shell/command")
    assert 'scripts/job5-tune.sh --worker "$WORKER"' in command
    binding = worker.find(".//org.jenkinsci.plugins.credentialsbinding.impl.StringBinding")
    assert binding.findtext("variable") == "CT_TUNE_STORAGE"
    trigger, shell = list(xml["job5"].find("builders"))
    assert trigger.tag == PT + "TriggerBuilder" and shell.tag == "hudson.tasks.Shell"
    configs = trigger.findall(f".//{PT}BlockableBuildTriggerConfig")
    assert [c.findtext(f".//{PT}PredefinedBuildParameters/properties") for c in configs] == [
        "WORKER=1", "WORKER=2"]
    assert all(c.find("block") is None for c in configs), "job5 must not wait for its helpers"
