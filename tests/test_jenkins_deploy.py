"""job7 deploy in Jenkins: rendered by the real Jenkins Job Builder, started after every job4 and
job5 build that passed, drawn after them in the Build Pipeline view, mailing from its script like
job4, and a local service that outlives the build. What Jenkins does with the XML is read from
core's and the plugins' source at the pinned tags, cited in each test."""

from __future__ import annotations

import re

from tests import test_jenkins_checks as jc
from tests.jenkins_render import REPO, VIEW, chain_from, downstream_publishers, job_script

REVERSE = "jenkins.triggers.ReverseBuildTrigger"
# core jenkins-2.492.1 core/src/main/java/hudson/model/Result.java: name -> ordinal
RESULTS = {"SUCCESS": 0, "UNSTABLE": 1, "FAILURE": 2, "NOT_BUILT": 3, "ABORTED": 4}


def test_job7_is_a_freestyle_job_that_calls_its_script(rendered):
    root = rendered["job7"]
    assert root.tag == "project" and root.findtext("displayName") == "job7 deploy"
    assert job_script(root) == "job7-deploy"
    (command,) = jc.shell_commands(root)
    assert re.search(r"^exec scripts/job7-deploy\.sh\s*$", command, re.M), "no arguments: deploy"
    assert root.findtext("customWorkspace") == "${CT_WORKSPACE}"
    assert root.findtext("concurrentBuild") == "false"
    assert root.findtext("publishers/hudson.tasks.ArtifactArchiver/artifacts") == \
        "artifacts/job7/**"
    assert int(root.findtext(".//timeoutMinutes")) >= 30  # a first export and image build


def upstreams(rendered, job: str) -> tuple[list[str], int]:
    """What core reads off a ReverseBuildTrigger: the upstream names and the threshold."""
    (trigger,) = rendered[job].find("triggers").iter(REVERSE)
    # core Items.fromNameList: a StringTokenizer on ",", each token trimmed
    names = [n.strip() for n in trigger.findtext("upstreamProjects").split(",") if n.strip()]
    threshold = trigger.find("threshold")
    # Result.readResolve: the singleton with the stored ordinal (FAILURE when none matches)
    ordinal = int(threshold.findtext("ordinal"))
    assert threshold.findtext("name") == next(n for n, o in RESULTS.items() if o == ordinal)
    return names, ordinal


def test_job7_starts_after_every_job4_and_job5_that_passed(rendered):
    """Core jenkins-2.492.1, core/src/main/java/jenkins/triggers/ReverseBuildTrigger.java:
    fields upstreamProjects and threshold (what JJB's `reverse` writes); for freestyle upstream
    and downstream, buildDependencyGraph() adds a DependencyGraph.Dependency upstream -> job7
    (RunListenerImpl skips such pairs: "handled specially"), whose shouldTriggerBuild() is
    shouldTrigger(): the upstream build's result isBetterOrEqualTo(threshold), i.e. ordinal <=
    the threshold's (Result.java). hudson/model/AbstractBuild.java cleanUp() calls
    hudson/tasks/BuildTrigger.java execute() once the build has its result, which schedules each
    downstream dependency that answers true, with an UpstreamCause of that build. So a green
    job4 (promoted, kept, or handed to tuning) or job5 starts job7; a failed or aborted one
    does not. job7 declares no parameter, so Queue.java schedule2() folds a second request into
    one queued job7 (no ParametersAction to tell them apart): one deploy of the champion then."""
    names, threshold = upstreams(rendered, "job7")
    assert names == ["job4", "job5"]
    started_by = {result for result, ordinal in RESULTS.items() if ordinal <= threshold}
    assert started_by == {"SUCCESS"}
    assert rendered["job7"].find(".//hudson.model.ParametersDefinitionProperty") is None
    for job in ("job4", "job5"):
        # job4's and job5's own triggers are untouched: job7 is no publisher of theirs
        assert "job7" not in [c.findtext("projects") for c in downstream_publishers(rendered[job])]
    assert chain_from(rendered, "job1") == ["job1", "job2", "job3", "job4"]
    # job6's hand-over reaches job4, whose success reaches job7: a restarted run deploys too
    assert "job4" in [c.findtext("projects") for c in downstream_publishers(rendered["job6"])]


def test_the_pipeline_view_draws_job7_after_job4_and_job5(rendered):
    """build-pipeline-plugin build-pipeline-plugin-2.0.2: ProjectForm's dependencies are
    project.getDownstreamProjects() and PipelineBuild.getDownstreamPipeline() asks
    util/ProjectUtil.getDownstreamProjects(), both the core DependencyGraph's downstream, which
    holds the ReverseBuildTrigger's dependencies (above); util/BuildUtil.getDownstreamBuild()
    pairs a job7 build with the upstream build its UpstreamCause pointsTo(). The view starts at
    job1 and lists job7 in its description."""
    view = rendered[VIEW]
    assert view.findtext("gridBuilder/firstJob") == "job1"
    assert "job5 tune -> job7 deploy" in view.findtext("description")
    # the view's graph edges into job7 are exactly the trigger's upstreams
    assert upstreams(rendered, "job7")[0] == ["job4", "job5"]
    assert all(rendered[job].tag == "project" for job in ("job4", "job5", "job7")), \
        "the dependency graph edge needs freestyle (AbstractProject) jobs at both ends"


def test_job7_mails_from_its_script_as_job4_does(rendered):
    """No email-ext publisher: scripts/job7-deploy.sh mails a failed build itself through
    ct.pipeline.notify --event deploy-failed (SMTP from the environment, else outbox/), as job4's
    script mails a promotion; so the local chain mails the same (tests/test_job7.py)."""
    assert rendered["job7"].find(".//hudson.plugins.emailext.ExtendedEmailPublisher") is None
    assert rendered["job4"].find(".//hudson.plugins.emailext.ExtendedEmailPublisher") is None
    script = (REPO / "scripts" / "job7-deploy.sh").read_text()
    assert "ct.pipeline.notify" in script and "--event deploy-failed" in script
    assert re.search(r"^\s*trap on_exit EXIT$", script, re.M)


def has_matching_env_vars(process_env: dict[str, str], model: dict[str, str]) -> bool:
    """core jenkins-2.492.1 core/src/main/java/hudson/util/ProcessTree.java,
    OSProcess.hasMatchingEnvVars: every model variable present with the same value."""
    return bool(model) and all(process_env.get(k) == v for k, v in model.items())


def test_a_local_service_outlives_the_build_that_started_it():
    """core jenkins-2.492.1: when a freestyle build ends, core/src/main/java/hudson/model/
    AbstractBuild.java calls launcher.kill(getCharacteristicEnvVars()) ("kill run-away
    processes that are left"), i.e. ProcessTree.killAll of every process whose environment
    matches all of them: Job.java's JENKINS_SERVER_COOKIE, HUDSON_SERVER_COOKIE, JOB_NAME,
    JOB_BASE_NAME and Run.java's BUILD_NUMBER, BUILD_ID, BUILD_TAG. The service job7 starts on
    the local runtime must outlive job7, so lib-process.sh gives it another BUILD_ID (and the
    JENKINS_NODE_COOKIE pipeline jobs use); tests/test_job7.py reads the real service's
    environment."""
    build = {"JENKINS_SERVER_COOKIE": "c0ffee", "HUDSON_SERVER_COOKIE": "c0ffee",
             "JOB_NAME": "job7", "JOB_BASE_NAME": "job7", "BUILD_NUMBER": "41", "BUILD_ID": "41",
             "BUILD_TAG": "jenkins-job7-41"}
    text = (REPO / "scripts" / "lib-process.sh").read_text()
    body = re.search(r"^start_service_process\(\) \{\n(.*?)^\}", text, re.M | re.S).group(1)
    overrides = dict(re.findall(r"\b(BUILD_ID|JENKINS_NODE_COOKIE)=(\S+)", body))
    assert overrides.get("BUILD_ID") not in (None, build["BUILD_ID"])
    assert has_matching_env_vars(build, build), "a leftover of the build itself is killed"
    assert not has_matching_env_vars({**build, **overrides}, build)
    # the docker runtime's service is no child of the build: the engine runs (and restarts) it
    docker_run = re.search(r"^start_service_container\(\) \{\n(.*?)^\}", text, re.M | re.S)
    assert "--restart unless-stopped" in docker_run.group(1)
