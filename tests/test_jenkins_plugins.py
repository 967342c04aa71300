"""Jenkins as code: every shell step calls a script that exists, and the plugins the rendered jobs
use are exactly the pinned ones, a set jenkins-plugin-cli accepts."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import yaml

from tests import test_jenkins_checks as jc
from tests.jenkins_render import (
    JENKINS,
    JOBS,
    TOKEN,
    job_script,
)


def test_every_shell_step_calls_an_existing_executable_script(rendered):
    assert jc.script_problems(rendered) == []
    assert {job_script(rendered[j]) for j in JOBS} == {
        "job1-pull", "job2-image", "job3-train", "job4-gate", "job5-tune", "job6-monitor",
        "job7-deploy"}


def test_plugins_txt_is_pinned_and_lists_exactly_the_plugins_used(rendered):
    assert jc.plugin_problems(rendered) == []


def broken_copy(tmp_path: Path, old: str, new: str) -> dict[str, ET.Element]:
    text = jc.JOBS_YAML.read_text()
    assert old in text
    copy = tmp_path / "jobs.yaml"
    copy.write_text(text.replace(old, new, 1))
    return jc.render(copy, tmp_path / "out", TOKEN)


def _version_key(version: str) -> list[tuple[int, int | str]]:
    """Jenkins-style version order, enough for these pins: numbers compare as numbers, and
    1963.v24e046127a_3f > 1903.v004d55388f30, 859.vb_e3907a_07a_16 > 2.45, 1.5.0 > 1.4.2."""
    parts = re.split(r"[.\-_]", version.split()[0])
    return [(0, int(p)) if p.isdigit() else (1, p) for p in parts]


def _dependency_table() -> dict:
    return yaml.safe_load((JENKINS / "plugin-dependencies.yaml").read_text())


def plugin_pin_problems(pins: dict[str, str], table: dict, core: str) -> list[str]:
    problems = []
    for name, version in pins.items():
        row = table["pinned"].get(name)
        if row is None or str(row["version"]) != version:
            problems.append(f"{name}:{version} has no row in plugin-dependencies.yaml")
            continue
        if _version_key(str(row["core"])) > _version_key(core):
            problems.append(f"{name}:{version} needs Jenkins core {row['core']} > {core}")
    for section in ("pinned", "transitive"):
        for owner, row in table[section].items():
            for dep, declared in (row.get("depends") or {}).items():
                pin = pins.get(dep)
                if pin and _version_key(pin) < _version_key(str(declared)):
                    problems.append(f"{owner}:{row['version']} declares {dep} {declared}, "
                                    f"but plugins.txt pins the older {dep}:{pin}")
    return problems


def controller_core() -> str:
    (image,) = re.findall(r"^FROM jenkins/jenkins:(\S+)", (JENKINS / "Dockerfile").read_text(),
                          re.M)
    return image.split("-")[0]


def test_plugin_pins_are_a_set_jenkins_plugin_cli_accepts():
    """jenkinsci/plugin-installation-manager-tool: PluginManager refuses a top-level pin older
    than a version another plugin declares (optional dependencies included): "depends on X, but
    there is an older version defined on the top level". plugin-dependencies.yaml holds what each
    pin declares at its tag (pom.xml + the BOM it imports)."""
    pins, unpinned = jc.read_plugins()
    assert not unpinned
    assert plugin_pin_problems(pins, _dependency_table(), controller_core()) == []


def test_the_pin_check_catches_the_old_conditional_buildstep_and_a_too_new_core():
    table = _dependency_table()
    pins, _ = jc.read_plugins()
    old = {**pins, "conditional-buildstep": "1.4.2"}
    table["pinned"]["conditional-buildstep"]["version"] = "1.4.2"
    problems = plugin_pin_problems(old, table, controller_core())
    assert ("parameterized-trigger:859.vb_e3907a_07a_16 declares conditional-buildstep 1.5.0 "
            "optional, but plugins.txt pins the older conditional-buildstep:1.4.2") in problems
    assert any("needs Jenkins core" in p for p in
               plugin_pin_problems(pins, _dependency_table(), "2.401.1"))


def test_a_job_naming_a_missing_script_fails_the_checks(tmp_path):
    xml = broken_copy(tmp_path, "script: job3-train.sh", "script: job3-trian.sh")
    assert jc.check(xml) == ["job3: scripts/job3-trian.sh does not exist"]


def test_a_job_using_an_unlisted_plugin_fails_the_checks(tmp_path):
    xml = broken_copy(tmp_path, "    publishers:\n      - archive:",
                      "    publishers:\n      - workspace-cleanup\n      - archive:")
    problems = jc.plugin_problems(xml)
    assert "plugin ws-cleanup is used but not in plugins.txt" in problems
    assert all("ws-cleanup" in p or "ws__cleanup" in p for p in problems)


def test_a_plugin_listed_but_unused_or_unpinned_fails_the_checks(rendered, tmp_path):
    extra = tmp_path / "plugins.txt"
    extra.write_text(jc.PLUGINS_TXT.read_text() + "timestamper:1.27\nplot\n")
    problems = jc.plugin_problems(rendered, extra)
    assert "plugin timestamper is in plugins.txt but unused" in problems
    assert "plugins.txt line not pinned as name:version: plot" in problems
