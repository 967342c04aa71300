"""The job scripts and the rendered jobs agree on what they hand each other, by behaviour: the exit
code of a job3 that trains nothing is the one job3's shell step turns into UNSTABLE (so it starts
no job4), what job6 hands on in next-push.properties are parameters that the job it starts
declares, and so are the parameters job6's retrain POSTs to job2, which reach job3 as the
environment its scripts read. The Jenkins source facts behind them are cited here and in
tests/test_jenkins.py."""

from __future__ import annotations

import os
import subprocess
import sys

from ct import workspace as names
from ct.pipeline import push_queue, records
from ct.pipeline.push_queue import Push
from tests.conftest import REPO, run_script

PARAMETER = "hudson.model.StringParameterDefinition"
TRIGGER = "hudson.plugins.parameterizedtrigger.BuildTriggerConfig"


def test_a_job3_with_nothing_to_train_ends_unstable_in_jenkins(rendered, script_env):
    (code,) = [s.findtext("unstableReturn") for s in rendered["job3"].iter("hudson.tasks.Shell")]
    proc = run_script("job3-train.sh", script_env, check=False)  # a fresh workspace: no push
    assert "no push is waiting" in proc.stderr
    assert proc.returncode == int(code) != 0


def test_next_push_properties_are_parameters_of_the_job_job6_starts(rendered, tmp_path):
    commit = "d" * 40
    push_queue.save(tmp_path, [Push(commit, "refs/heads/main", "2026-12-06T01:00:00Z")])
    env = {k: v for k, v in os.environ.items() if not k.startswith("CT_")}
    proc = subprocess.run([sys.executable, "-m", "ct.pipeline.pushes", "--workspace",
                           str(tmp_path), "dispatch", "--max-restarts", "3"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == commit, proc.stderr
    handed = records.parse_properties((tmp_path / names.NEXT_PUSH_PROPERTIES).read_text())
    (started,) = [c.findtext("projects") for c in rendered["job6"].iter(TRIGGER)
                  if any(f.findtext("propertiesFile") == names.NEXT_PUSH_PROPERTIES
                         for f in c.iter())]
    declared = {p.findtext("name") for p in rendered[started].iter(PARAMETER)}
    assert handed == {"COMMIT": commit} and set(handed) <= declared


def test_the_chain_declares_the_retrains_parameters_down_to_job4(rendered):
    """Jenkins core jenkins-2.492.1: a parameter reaches a build's environment under its own name
    (StringParameterValue / BooleanParameterValue.buildEnvironment: env.put(name, value), a bool
    as "true"/"false"), which is how job2 reads COMMIT and job3 (ct.pipeline.changes) FORCE; and
    only declared parameters are kept (ParametersAction keeps undefined ones only with
    hudson.model.ParametersAction.keepUndefinedParameters), so every job the retrain's
    parameters pass through (current-parameters: job2 -> job3 -> job4) declares them."""
    for job in ("job2", "job3", "job4", "job5"):
        declared = {p.findtext("name"): p.tag for p in rendered[job].iter()
                    if p.tag.endswith("ParameterDefinition")}
        assert declared.get("COMMIT") == PARAMETER and declared.get("DATA_VERSION") == PARAMETER
        assert declared.get("FORCE") == "hudson.model.BooleanParameterDefinition", job
