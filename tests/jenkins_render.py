"""jenkins/jobs.yaml rendered by the real Jenkins Job Builder, and what the Jenkins tests read off
its XML. The session fixture `rendered` (tests/conftest.py) renders it once. Not a test module."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from tests import test_jenkins_checks as jc

REPO = jc.REPO
JENKINS = jc.JENKINS
# The admin's API token the render runs with (JENKINS_ADMIN_TOKEN): no rendered file may hold it.
TOKEN = "test-only-token-7f3a"
JOBS = ["job1", "job2", "job3", "job4", "job5", "job6", "job7"]
VIEW = "CT pipeline"
PT = "hudson.plugins.parameterizedtrigger."


def render_jobs(out: Path) -> dict[str, ET.Element]:
    return jc.render(jc.JOBS_YAML, out, TOKEN)


def downstream_publishers(root: ET.Element) -> list[ET.Element]:
    """Parameterized-trigger publisher configs (not build steps)."""
    publishers = root.find("publishers")
    assert publishers is not None
    return list(publishers.iter(PT + "BuildTriggerConfig"))


def chain_from(xml: dict[str, ET.Element], first: str) -> list[str]:
    chain, job = [first], first
    while True:
        nxt = [c.findtext("projects") for c in downstream_publishers(xml[job])]
        if not nxt:
            return chain
        assert len(nxt) == 1, f"{job} triggers several jobs: {nxt}"
        job = nxt[0]
        assert job not in chain, f"cycle at {job}"
        chain.append(job)


def job_script(root: ET.Element) -> str:
    (command,) = jc.shell_commands(root)
    (script,) = jc.SCRIPT_CALL.findall(command)
    return Path(script).stem


def gated_trigger(root: ET.Element) -> ET.Element:
    """job4's conditional step that triggers job5."""
    steps = list(root.iter("org.jenkinsci.plugins.conditionalbuildstep.singlestep."
                           "SingleConditionalBuilder"))
    assert len(steps) == 1
    return steps[0]


def started_after(xml: dict[str, ET.Element], job: str) -> set[str]:
    """The jobs Jenkins starts when `job` ends: those its trigger publishers and trigger build
    steps name, and those whose "build after other projects" (ReverseBuildTrigger) names it."""
    def names(text: str | None) -> set[str]:
        return {name.strip() for name in (text or "").split(",") if name.strip()}

    started = set().union(*(names(p.text) for p in xml[job].iter("projects")))
    for other, root in xml.items():
        for trigger in root.iter("jenkins.triggers.ReverseBuildTrigger"):
            if job in names(trigger.findtext("upstreamProjects")):
                started.add(other)
    return started
