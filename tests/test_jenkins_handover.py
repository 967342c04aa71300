"""job6's hand-overs in Jenkins: the rendered triggers that start job4 with a restarted run and
job3 with the next queued push, and what the real job6 writes for them."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from ct import workspace as names
from tests import test_jenkins_checks as jc
from tests.conftest import REPO, read_props, run_script
from tests.jenkins_render import PT, chain_from, downstream_publishers


def test_job6_hands_a_restarted_run_to_job4_with_its_commit_and_run_folder(rendered, script_env,
                                                                          tmp_path):
    """parameterized-trigger 859.vb_e3907a_07a_16: FileBuildParameters.extractAllValues() reads
    the properties file from the build's archived artifacts, then the workspace; when it is
    missing and failTriggerOnMissing is set it throws DontTriggerException, which
    BuildTriggerConfig.perform() and ParameterizedDependency.shouldTriggerBuild() (the freestyle
    dependency-graph path) catch: nothing is triggered and the build result is untouched.
    ResultCondition.ALWAYS triggers whatever job6's result."""
    root = rendered["job6"]
    config = job6_trigger(root, "job4")
    assert config.findtext("condition") == "ALWAYS"
    params = config.find(f"configs/{PT}FileBuildParameters")
    assert params.findtext("propertiesFile") == "handover.properties"
    assert params.findtext("failTriggerOnMissing") == "true"
    # the build that writes it archives it, so the trigger reads this build's copy first
    archived = root.find("publishers/hudson.tasks.ArtifactArchiver").findtext("artifacts")
    assert "handover.properties" in {a.strip() for a in archived.split(",")}
    # job6 as Jenkins runs it, on a restarted run that has finished (its process gone, its
    # metrics.json written since it started): the keys it writes are parameters job4 declares
    # (Jenkins drops undeclared ones), and job4 hands RUN_DIR to its script
    ws, commit, gone = Path(script_env["CT_WORKSPACE"]), "c" * 40, subprocess.Popen(["true"])
    gone.wait()
    (ws / "runs" / "train-1").mkdir(parents=True)
    (ws / "metrics.json").write_text(json.dumps({
        "accuracy": 90.0, "run_id": "train-1", "mode": "train", "run_dir": "runs/train-1",
        "model": "runs/train-1/model.pt"}))
    (ws / "status").mkdir()
    (ws / "status" / "train.properties").write_text(
        f"ROLE=train\nRUNTIME=local\nCONTAINER=pid-{gone.pid}\nIMAGE=local\nCOMMIT={commit}\n"
        "RESTARTS=1\nSTATUS=running\nSTARTED_AT=2000-01-01T00:00:00Z\n")
    assert "handing the restarted run" in run_script("job6-monitor.sh", script_env, "monitor",
                                                     cwd=tmp_path).stderr
    written = read_props(ws / "handover.properties")
    assert written == {"COMMIT": commit, "RUN_DIR": "runs/train-1"}
    declared = {p.findtext("name") for p in rendered["job4"].iter(
        "hudson.model.StringParameterDefinition")}
    assert set(written) <= declared
    (command,) = jc.shell_commands(rendered["job4"])
    assert re.search(r'scripts/job4-gate\.sh "\$RUN_DIR"', command)


def job6_trigger(root, project: str):
    configs = {c.findtext("projects"): c for c in downstream_publishers(root)}
    assert set(configs) == {"job4", "job3"}, "job6 hands over to job4 and starts job3, nothing else"
    return configs[project]


def test_job6_starts_the_next_queued_push_with_job3(rendered, script_env, tmp_path):
    """The same parameterized-trigger facts as the hand-over to job4 (859.vb_e3907a_07a_16,
    FileBuildParameters / DontTriggerException, above): no next-push.properties, no job3 and
    job6's result untouched; ALWAYS whatever job6's result. The two configs are independent: the
    plugin's BuildTrigger.buildDependencyGraph() adds one ParameterizedDependency per config and
    project, and core jenkins-2.492.1 core/src/main/java/hudson/model/DependencyGraph.java add()
    groups dependencies only between the same two projects; hudson/tasks/BuildTrigger.java
    execute() asks every downstream dependency's shouldTriggerBuild() in turn: a missing
    handover.properties does not stop the next push, nor the other way round."""
    root = rendered["job6"]
    config = job6_trigger(root, "job3")
    assert config.findtext("condition") == "ALWAYS"
    (params,) = config.find("configs")
    assert params.tag == f"{PT}FileBuildParameters"
    assert params.findtext("propertiesFile") == names.NEXT_PUSH_PROPERTIES
    assert params.findtext("failTriggerOnMissing") == "true"
    archived = root.find("publishers/hudson.tasks.ArtifactArchiver").findtext("artifacts")
    assert names.NEXT_PUSH_PROPERTIES in {a.strip() for a in archived.split(",")}
    # the real job6 on an idle workspace with a push waiting writes COMMIT=<id>, which job3
    # declares and passes on to job4 (test_accuracy_and_commit_pass_downstream_as_parameters)
    ws, commit = Path(script_env["CT_WORKSPACE"]), "d" * 40
    ws.mkdir()
    run_script("job6-monitor.sh", script_env, "monitor", cwd=tmp_path)  # no push waits
    assert not (ws / names.NEXT_PUSH_PROPERTIES).exists()
    subprocess.run([sys.executable, "-m", "ct.pipeline.pushes", "--workspace", str(ws), "add",
                    "--commit", commit], cwd=REPO, check=True, capture_output=True)
    run_script("job6-monitor.sh", script_env, "monitor", cwd=tmp_path)
    written = read_props(ws / names.NEXT_PUSH_PROPERTIES)
    assert written == {"COMMIT": commit}
    assert set(written) <= {p.findtext("name") for p in rendered["job3"].iter(
        "hudson.model.StringParameterDefinition")}
    assert chain_from(rendered, "job3") == ["job3", "job4"]
