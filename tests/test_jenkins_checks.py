"""Checks on the Jenkins job XML that Jenkins Job Builder renders from jenkins/jobs.yaml (no tests
here: the helpers of tests/test_jenkins*.py, named so because that is where Jenkins checks live).

Used by tests/test_jenkins*.py on the real definitions and on deliberately broken copies, so that a
job naming a missing script or an unlisted plugin is caught.
"""

from __future__ import annotations

import os
import re
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

from tests.conftest import required_tool, venv_tool

REPO = Path(__file__).resolve().parent.parent
JENKINS = REPO / "jenkins"
JOBS_YAML = JENKINS / "jobs.yaml"
PLUGINS_TXT = JENKINS / "plugins.txt"

# Java class-name prefixes -> the plugin that provides them. Core classes map to None. A class that
# matches nothing here is reported, so a new module in jobs.yaml forces a look at plugins.txt.
CLASS_PLUGINS: dict[str, str | None] = {
    "hudson.model.": None,
    "hudson.tasks.Shell": None,
    "hudson.tasks.ArtifactArchiver": None,
    "hudson.tasks.LogRotator": None,
    "hudson.tasks.BuildTrigger": None,
    "hudson.triggers.SCMTrigger": None,
    "hudson.triggers.TimerTrigger": None,
    "hudson.scm.NullSCM": None,
    "jenkins.model.BuildDiscarderProperty": None,
    "jenkins.triggers.ReverseBuildTrigger": None,
    "java.util.": None,
    "string-array": None,
    "hudson.plugins.git.": "git",
    "com.cloudbees.jenkins.GitHubPushTrigger": "github",
    "com.coravy.hudson.plugins.github.": "github",
    "hudson.plugins.parameterizedtrigger.": "parameterized-trigger",
    "org.jenkinsci.plugins.conditionalbuildstep.": "conditional-buildstep",
    "org.jenkins_ci.plugins.run_condition.": "run-condition",
    "hudson.plugins.build_timeout.": "build-timeout",
    "hudson.plugins.build__timeout.": "build-timeout",
    "hudson.plugins.plot.": "plot",
    "hudson.plugins.emailext.": "email-ext",
    "htmlpublisher.": "htmlpublisher",
    "org.jenkinsci.plugins.credentialsbinding.": "credentials-binding",
    "org.jenkinsci.plugins.parameterizedscheduler.": "parameterized-scheduler",
    "au.com.centrumsystems.hudson.plugin.buildpipeline.": "build-pipeline-plugin",
    "hudson.security.AuthorizationMatrixProperty": "matrix-auth",
    "org.jenkinsci.plugins.matrixauth.": "matrix-auth",
}

# Plugins the controller needs that no job XML names: the one that reads casc.yaml.
CONTROLLER_PLUGINS = {"configuration-as-code"}

# Token macros (expanded by the token-macro plugin) that the jobs use in text fields.
TOKEN_MACROS = {"PROPFILE": "token-macro", "FILE": "email-ext"}

PINNED = re.compile(r"^(?P<name>[A-Za-z0-9_.-]+):(?P<version>[0-9][A-Za-z0-9_.+-]*)$")
SCRIPT_CALL = re.compile(r"(?:^|\s)(?:exec\s+)?(scripts/[A-Za-z0-9_.-]+\.sh)\b", re.M)
CLASSY = re.compile(r"^[a-z][\w$]*(\.[\w$]+)+$")


def jenkins_jobs_bin() -> str:
    return required_tool(venv_tool("jenkins-jobs"), "jenkins-jobs",
                         "pip install -r jenkins/requirements.txt", "CT_REQUIRE_JJB")


# What scripts/jenkins-deploy.sh renders into the XML as literals; the tests' stand-in values.
REPO_URL = "https://github.com/example-org/cifar-ct.git"
REPO_WEB_URL = "https://github.com/example-org/cifar-ct"
BRANCH = "*/main"


def render(jobs_yaml: Path, out: Path, token: str,
           settings: dict[str, str] | None = None) -> dict[str, ET.Element]:
    """Render with the real `jenkins-jobs test` through scripts/jenkins-deploy.sh --test, which
    puts the repository on JJB's include path as it does for an upload; `token` is the admin's
    API token in its environment (the deploy's one secret, which no rendered file may hold)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CT_", "JENKINS_"))}
    env.update(PYTHONWARNINGS="ignore", JJB=jenkins_jobs_bin(), JENKINS_ADMIN_TOKEN=token,
               CT_REPO_URL=REPO_URL, CT_REPO_WEB_URL=REPO_WEB_URL, CT_BRANCH=BRANCH)
    env.update(settings or {})
    proc = subprocess.run(
        [str(REPO / "scripts" / "jenkins-deploy.sh"), "--test", str(out), str(jobs_yaml)],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"jenkins-deploy.sh --test failed:\n{proc.stdout}\n{proc.stderr}")
    return {p.name: ET.parse(p).getroot() for p in sorted(out.iterdir()) if p.is_file()}


def read_plugins(path: Path = PLUGINS_TXT) -> tuple[dict[str, str], list[str]]:
    """name -> version, and the lines that are not pinned name:version."""
    plugins: dict[str, str] = {}
    bad: list[str] = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = PINNED.match(line)
        if m:
            plugins[m["name"]] = m["version"]
        else:
            bad.append(line)
    return plugins, bad


def plugin_for_class(name: str) -> tuple[bool, str | None]:
    """(known, plugin) for a Java class name, by the longest matching prefix."""
    best = None
    for prefix in CLASS_PLUGINS:
        if name.startswith(prefix) and (best is None or len(prefix) > len(best)):
            best = prefix
    if best is None:
        return False, None
    return True, CLASS_PLUGINS[best]


def plugins_used(xml: dict[str, ET.Element]) -> tuple[set[str], set[str]]:
    """Plugins the rendered XML needs, and class names that no mapping explains."""
    used: set[str] = set()
    unknown: set[str] = set()
    for root in xml.values():
        for el in root.iter():
            plugin_attr = el.get("plugin")
            if plugin_attr:
                used.add(plugin_attr.split("@", 1)[0])
            for name in (el.tag, el.get("class") or ""):
                if not CLASSY.match(name):
                    continue
                known, plugin = plugin_for_class(name)
                if not known:
                    unknown.add(name)
                elif plugin:
                    used.add(plugin)
            for macro, plugin in TOKEN_MACROS.items():
                if el.text and "${" + macro in el.text:
                    used.add(plugin)
    return used, unknown


def shell_commands(root: ET.Element) -> list[str]:
    return [el.findtext("command") or "" for el in root.iter("hudson.tasks.Shell")]


def script_problems(xml: dict[str, ET.Element], repo: Path = REPO) -> list[str]:
    """Every shell step calls exactly one script under scripts/, which exists and is executable."""
    problems = []
    for name, root in xml.items():
        for command in shell_commands(root):
            calls = SCRIPT_CALL.findall(command)
            if len(calls) != 1:
                problems.append(f"{name}: shell step should call one script, calls {calls}")
                continue
            path = repo / calls[0]
            if not path.is_file():
                problems.append(f"{name}: {calls[0]} does not exist")
            elif not os.access(path, os.X_OK):
                problems.append(f"{name}: {calls[0]} is not executable")
    return problems


def plugin_problems(xml: dict[str, ET.Element], plugins_txt: Path = PLUGINS_TXT) -> list[str]:
    listed, unpinned = read_plugins(plugins_txt)
    used, unknown = plugins_used(xml)
    problems = [f"plugins.txt line not pinned as name:version: {line}" for line in unpinned]
    problems += [f"class {c} belongs to no known plugin (extend CLASS_PLUGINS)" for c in unknown]
    needed = used | CONTROLLER_PLUGINS
    problems += [f"plugin {p} is used but not in plugins.txt" for p in sorted(needed - set(listed))]
    problems += [f"plugin {p} is in plugins.txt but unused" for p in sorted(set(listed) - needed)]
    return problems


def check(xml: dict[str, ET.Element], repo: Path = REPO,
          plugins_txt: Path = PLUGINS_TXT) -> list[str]:
    return script_problems(xml, repo) + plugin_problems(xml, plugins_txt)
