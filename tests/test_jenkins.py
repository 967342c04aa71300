"""Jenkins as code: render jenkins/jobs.yaml with the real Jenkins Job Builder and check the six
jobs, the view, the chain and job6's hand-over in the XML. No Jenkins server needed."""

from __future__ import annotations

import itertools
import re
from urllib.parse import parse_qs, urlsplit

import pytest

from ct import workspace as names
from ct.pipeline import changes
from ct.pipeline.records import GATE_RECORD
from tests import stand_ins
from tests import test_jenkins_checks as jc
from tests.jenkins_render import (
    JOBS,
    PT,
    REPO,
    TOKEN,
    VIEW,
    chain_from,
    downstream_publishers,
    gated_trigger,
    started_after,
)

# ----------------------------------------------------------------------------- jobs and view


def test_six_jobs_and_the_pipeline_view(rendered):
    assert set(rendered) == {*JOBS, VIEW}
    for job in JOBS:
        assert rendered[job].tag == "project", f"{job} is not a freestyle job"
    view = rendered[VIEW]
    assert view.tag == "au.com.centrumsystems.hudson.plugin.buildpipeline.BuildPipelineView"
    assert view.findtext("gridBuilder/firstJob") == "job1"


def test_every_job_has_timeout_rotation_archive_label_and_the_shared_workspace(rendered):
    for job in JOBS:
        root = rendered[job]
        assert root.find("buildWrappers/hudson.plugins.build__timeout.BuildTimeoutWrapper") \
            is not None, job
        minutes = int(root.findtext(".//timeoutMinutes"))
        assert 5 <= minutes <= 24 * 60, job
        strategy = root.find("properties/jenkins.model.BuildDiscarderProperty/strategy")
        assert strategy is not None and int(strategy.findtext("numToKeep")) > 0, job
        archive = root.find("publishers/hudson.tasks.ArtifactArchiver")
        assert archive is not None and f"artifacts/{job}/**" in archive.findtext("artifacts"), job
        assert root.findtext("assignedNode"), f"{job} has no node label"
        assert root.findtext("customWorkspace") == "${CT_WORKSPACE}", job
        assert root.findtext("concurrentBuild") == "false", job
    # Training jobs keep what the issue asks for.
    assert "accuracy.txt" in rendered["job3"].findtext(".//artifacts")
    assert "metrics.json" in rendered["job3"].findtext(".//artifacts")
    assert "best.json" in rendered["job5"].findtext(".//artifacts")


def test_job1_checks_out_the_repository_setting_on_push_or_poll(rendered):
    root = rendered["job1"]
    scm = root.find("scm")
    assert scm.get("class") == "hudson.plugins.git.GitSCM"
    assert scm.findtext(".//hudson.plugins.git.UserRemoteConfig/url") == jc.REPO_URL
    assert scm.findtext(".//hudson.plugins.git.BranchSpec/name") == jc.BRANCH
    # The workspace holds the data cache, runs and the best model: never wiped.
    assert scm.find(".//hudson.plugins.git.extensions.impl.WipeWorkspace") is None
    assert scm.find(".//hudson.plugins.git.extensions.impl.CleanCheckout") is None
    assert scm.find(".//hudson.plugins.git.extensions.impl.CleanBeforeCheckout") is None
    triggers = root.find("triggers")
    assert triggers.find("com.cloudbees.jenkins.GitHubPushTrigger") is not None
    poll = triggers.findtext("hudson.triggers.SCMTrigger/spec")
    assert poll and len(poll.split()) == 5


def test_the_repository_is_rendered_literally_so_a_github_push_finds_job1(rendered):
    """github-plugin v1.40.0, src/main/java/com/cloudbees/jenkins/
    GitHubRepositoryNameContributor.java (FromSCM): a push event is matched to a job by its SCM
    URLs expanded with buildEnv(job), which asks every
    EnvironmentContributor.buildEnvironmentFor(Job, ...); in Jenkins core jenkins-2.492.1
    (core/src/main/java/jenkins/model/CoreEnvironmentContributor.java) that adds JENKINS_URL,
    JOB_URL and the like, never the global node properties (those reach Runs only, through
    Computer.getEnvironment). So a global ${CT_REPO_URL} stays literal, matches no GitHub URL
    pattern (GitHubRepositoryName.create) and DefaultPushGHEventSubscriber skips job1. The GitHub
    project URL (com.coravy.hudson.plugins.github.GithubProjectProperty) is never expanded."""
    root = rendered["job1"]
    urls = {
        "git url": root.findtext(".//hudson.plugins.git.UserRemoteConfig/url"),
        "branch": root.findtext(".//hudson.plugins.git.BranchSpec/name"),
        "GitHub project url": root.findtext(
            "properties/com.coravy.hudson.plugins.github.GithubProjectProperty/projectUrl"),
    }
    for what, value in urls.items():
        assert value and "${" not in value and "$" not in value, f"{what}: {value!r}"
    assert re.fullmatch(r"https?://([^/]+)/([^/]+)/([^/]+)\.git/?", urls["git url"]), (
        "the URL must match the GitHub plugin's URL patterns")
    assert urls["GitHub project url"].rstrip("/") == jc.REPO_WEB_URL


def test_deploy_renders_the_repository_given_and_derives_the_github_page(tmp_path):
    xml = jc.render(jc.JOBS_YAML, tmp_path / "out", TOKEN, {
        "CT_REPO_URL": "git@github.com:acme/vision.git", "CT_REPO_WEB_URL": "",
        "CT_BRANCH": "*/release"})
    root = xml["job1"]
    assert root.findtext(".//hudson.plugins.git.UserRemoteConfig/url") == \
        "git@github.com:acme/vision.git"
    assert root.findtext(".//hudson.plugins.git.BranchSpec/name") == "*/release"
    assert root.findtext("properties/com.coravy.hudson.plugins.github.GithubProjectProperty/"
                         "projectUrl").rstrip("/") == "https://github.com/acme/vision"


@pytest.mark.parametrize("url", ["/srv/git/cifar-ct.git", "file:///srv/git/cifar-ct.git",
                                 "../cifar-ct"])
def test_deploy_refuses_a_local_repository_unless_allowed(tmp_path, url):
    """git-plugin git-5.6.0, src/main/java/hudson/plugins/git/GitSCM.java: _checkout() calls
    abortIfSourceIsLocal() on the controller unless ALLOW_LOCAL_CHECKOUT (system property
    hudson.plugins.git.GitSCM.ALLOW_LOCAL_CHECKOUT); isRemoteUrlValid() calls file:// URLs and
    paths that exist local: "Checkout of Git remote ... aborted because it references a local
    directory". jenkins/docker-compose.yml turns the property on with CT_ALLOW_LOCAL_CHECKOUT."""
    with pytest.raises(RuntimeError) as err:
        jc.render(jc.JOBS_YAML, tmp_path / "out", TOKEN, {"CT_REPO_URL": url})
    assert "local repository" in str(err.value) and "CT_ALLOW_LOCAL_CHECKOUT" in str(err.value)
    xml = jc.render(jc.JOBS_YAML, tmp_path / "out2", TOKEN,
                    {"CT_REPO_URL": url, "CT_ALLOW_LOCAL_CHECKOUT": "true"})
    assert xml["job1"].findtext(".//hudson.plugins.git.UserRemoteConfig/url") == url


def test_job6_monitors_every_five_minutes_checks_hourly_and_retrains_weekly(rendered):
    """parameterized-scheduler 378.va_234d1c44456, ParameterizedTimerTrigger.java: the trigger
    is built from one field, parameterizedSpecification ("cron % NAME=value" per line), the same
    as in the 1.1 pin it replaces; configurePropertyValues() gives every parameter a line does not
    name its default, so the scheduled builds run with FORCE=false."""
    root = rendered["job6"]
    spec = root.findtext("triggers/org.jenkinsci.plugins.parameterizedscheduler."
                         "ParameterizedTimerTrigger/parameterizedSpecification")
    lines = {line.split("%")[0].strip(): line.split("%")[1].strip()
             for line in spec.strip().splitlines()}
    assert lines == {"H/5 * * * *": "JOB6_MODE=monitor", "H * * * *": "JOB6_MODE=check",
                     "H H * * 0": "JOB6_MODE=weekly"}
    choices = [s.text for s in root.iter("string")
               if s.text in {"monitor", "check", "weekly"}]
    assert choices == ["monitor", "check", "weekly"], "monitor must be the default choice"
    (force,) = [p for p in root.iter("hudson.model.BooleanParameterDefinition")
                if p.findtext("name") == "FORCE"]
    assert force.findtext("defaultValue") == "false"
    (command,) = jc.shell_commands(root)
    assert re.search(r'scripts/job6-monitor\.sh "\$JOB6_MODE"', command)
    bindings = root.find("buildWrappers/org.jenkinsci.plugins.credentialsbinding.impl."
                         "SecretBuildWrapper/bindings")
    variables = {el.text for el in bindings.iter() if el.tag in
                 {"usernameVariable", "passwordVariable", "variable"}}
    assert variables == {"JENKINS_USER", "JENKINS_API_TOKEN"}  # no build token: job2 has none


def test_job2_is_started_by_buildwithparameters_as_ct_retrain_with_no_build_token(rendered):
    """Core jenkins-2.492.1, hudson/model/BuildAuthorizationToken.java checkPermission: a job with
    no token checks Item.BUILD for the caller, ignoring a `token` sent. job2 has none, its matrix
    gives ct-retrain Item.Build, and job6 sends ct-retrain's API token alone. A POST to /build of
    a parameterized job is HTTP 400 (tests/test_scripts_fast.py cites core)."""
    job2 = rendered["job2"]
    assert job2.find("authToken") is None and "COMMIT" in {p.findtext("name") for p in job2.iter()}
    assert "USER:hudson.model.Item.Build:ct-retrain" in {p.text for p in job2.iter("permission")}
    url = urlsplit(changes.retrain_request({"JENKINS_URL": "http://j", "JENKINS_USER": "ct-retrain",
                                            "JENKINS_API_TOKEN": "t"}, "v1").full_url)
    assert url.path == "/job/job2/buildWithParameters" and "token" not in parse_qs(url.query)
    readme = (REPO / "README.md").read_text()
    assert "/job/job2/buildWithParameters" in readme
    assert "/job/job2/build?" not in readme


# ------------------------------------------------------------------------------- the chain


def test_chain_job1_to_job4_on_success(rendered):
    assert chain_from(rendered, "job1") == ["job1", "job2", "job3", "job4"]
    for job in ["job1", "job2", "job3"]:
        (config,) = downstream_publishers(rendered[job])
        assert config.findtext("condition") == "SUCCESS", job


def test_job3_with_nothing_to_train_is_unstable_and_does_not_trigger_job4(rendered):
    """Core jenkins-2.492.1, core/src/main/java/hudson/tasks/CommandInterpreter.java perform():
    when isErrorlevelForUnstableBuild(exit code), the build is set UNSTABLE and the step passes
    (r = 0); any other non-zero code fails it (FAILURE). Shell.java there: that is `unstableReturn
    != null && exitCode != 0 && unstableReturn.equals(exitCode)`, so exit 0 is always success and
    an unstableReturn of 0 is inert (getUnstableReturn() reads it as unset), as in the other jobs.
    The step execs the script: its exit code is the step's. parameterized-trigger
    859.vb_e3907a_07a_16, ResultCondition.java: SUCCESS.isMet is `result == Result.SUCCESS`."""
    codes = {job: [s.findtext("unstableReturn") for s in rendered[job].iter("hudson.tasks.Shell")]
             for job in JOBS}
    assert codes == {job: ["3" if job == "job3" else "0"] for job in JOBS}
    (command,) = jc.shell_commands(rendered["job3"])
    assert re.search(r"^exec scripts/job3-train\.sh\s*$", command, re.M)
    (config,) = downstream_publishers(rendered["job3"])
    assert (config.findtext("projects"), config.findtext("condition")) == ("job4", "SUCCESS")
    # one owner: the script line lives in the ct-script macro only, job3 passes its code to it
    assert jc.JOBS_YAML.read_text().count("exec scripts/") == 1


def test_jenkins_queue_holds_a_second_job3_and_keeps_different_commits_apart(rendered):
    """Why pushes are also queued by the pipeline. Core jenkins-2.492.1, core/src/main/java/
    hudson/model/:
    - AbstractProject.java getCauseOfBlockage(): a project that is not concurrentBuild is blocked
      (BlockedBecauseOfBuildInProgress) while its last build runs, post-production included
      (isLogUpdated); Queue.java getCauseOfBlockageForItem() also keeps a second item of such a
      task out of buildables/pendings. So a second job3 waits, and starts as soon as the running
      job3 build ends, whatever job4/job5/job6 are still to do for its run.
    - Queue.java schedule2() -> scheduleInternal(): a new item is folded into a queued one
      (liveGetItems: waiting, blocked, buildable) unless a QueueAction of either shouldSchedule;
      ParametersAction.java shouldSchedule(): true when the parameter sets differ
      (StringParameterValue.equals: name and value). So waiting job3 builds with different
      COMMITs are all kept, identical ones folded into one (CauseAction is a FoldableAction only).
    parameterized-trigger 859.vb_e3907a_07a_16: job2's publisher trigger (CurrentBuildParameters)
    adds only a ParametersAction; the DifferentiatingAction that keeps every item apart comes from
    BlockableBuildTriggerConfig.schedule() (blocking build steps) only."""
    root = rendered["job3"]
    assert root.findtext("concurrentBuild") == "false"
    assert "COMMIT" in {p.findtext("name") for p in root.iter(
        "hudson.model.StringParameterDefinition")}
    (config,) = downstream_publishers(rendered["job2"])  # to job3 (test_chain_job1_to_job4...)
    assert [c.tag for c in config.find("configs")] == [f"{PT}CurrentBuildParameters"]
    assert rendered["job2"].find(f".//{PT}BlockableBuildTriggerConfig") is None


def test_job4_hands_over_to_job5_only_below_the_threshold(rendered):
    """The XML is read back by the classes at the pinned tags: conditional-buildstep-1.5.0
    singlestep/SingleConditionalBuilder.java (fields buildStep, condition, runner) and
    run-condition-1.7 core/StringsMatchCondition.java (arg1, arg2, ignoreCase) and
    BuildStepRunner.java (nested class Fail), unchanged from the 1.4.2/1.5 pins they replace."""
    root = rendered["job4"]
    assert downstream_publishers(root) == [], "job4 must not trigger job5 unconditionally"
    step = gated_trigger(root)
    condition = step.find("condition")
    assert condition.get("class") == "org.jenkins_ci.plugins.run_condition.core." \
                                     "StringsMatchCondition"
    assert condition.findtext("arg1") == '${PROPFILE,file="gate.properties",property="TUNE"}'
    assert condition.findtext("arg2") == "true"
    assert condition.findtext("ignoreCase") == "false"
    assert step.find("runner").get("class").endswith("BuildStepRunner$Fail")
    trigger = step.find("buildStep")
    assert trigger.get("class") == PT + "TriggerBuilder"
    assert trigger.findtext(".//projects") == "job5"
    assert trigger.findtext(f".//{PT}FileBuildParameters/propertiesFile") == "gate.properties"
    assert trigger.findtext(f".//{PT}FileBuildParameters/failTriggerOnMissing") == "true"
    # The gate script runs first; the condition reads what it wrote.
    builders = list(root.find("builders"))
    assert builders[0].tag == "hudson.tasks.Shell" and builders[1] is step


def test_accuracy_and_commit_pass_downstream_as_parameters(rendered):
    (job1_config,) = downstream_publishers(rendered["job1"])
    predefined = job1_config.findtext(f".//{PT}PredefinedBuildParameters/properties")
    assert predefined.strip() == "COMMIT=${GIT_COMMIT}"
    for job in ["job2", "job3"]:
        (config,) = downstream_publishers(rendered[job])
        assert config.find(f".//{PT}CurrentBuildParameters") is not None, job

    def declared(job):
        return {p.findtext("name") for p in rendered[job].iter(
            "hudson.model.StringParameterDefinition")}

    for job in ["job2", "job3", "job4"]:
        assert "COMMIT" in declared(job), job
    # job5 declares every key gate.properties carries: parameterized-trigger 859.vb_e3907a_07a_16
    # FileBuildParameters.getAction turns each entry of the loaded Properties into a
    # StringParameterValue, and core jenkins-2.492.1 hudson/model/ParametersAction.filter() keeps
    # only the names in the job's parameterDefinitionNames (unless keepUndefinedParameters).
    assert set(GATE_RECORD.required) <= declared("job5")


@pytest.mark.parametrize(("tune", "expected"), [
    ("false", ["job1", "job2", "job3", "job4", "job7"]),
    ("true", ["job1", "job2", "job3", "job4", "job5", "job7"]),
])
def test_the_local_chain_runner_runs_the_jobs_as_jenkins_triggers_them(
        rendered, script_env, tmp_path, tune, expected):
    """The real scripts/pipeline.sh over stand-in jobs that log their runs (tests/stand_ins.py):
    each job it runs is one that Jenkins starts after the job before (the rendered triggers), two
    pushes are trained one whole chain after the other, oldest first."""
    commits = ("a" * 40, "b" * 40)
    proc, ran = stand_ins.run_chain(tmp_path, script_env, commits, STAND_IN_TUNE=tune)
    assert proc.returncode == 0, proc.stderr
    chain = [f"{job} local" for job in expected[1:]]
    assert ran == [f"{expected[0]} local", *chain[:2], f"took {commits[0]}", *chain[2:],
                   *chain[:2], f"took {commits[1]}", *chain[2:]]
    assert rendered[VIEW].findtext("gridBuilder/firstJob") == expected[0]
    for before, after in itertools.pairwise(expected):
        assert after in started_after(rendered, before), f"Jenkins starts no {after} after {before}"


def test_job4_plots_only_what_the_build_measured(rendered):
    """plot-plugin plot-2.1.12: PlotPublisher.perform() never looks at the build result, and
    CSVSeries.loadSeries() returns no point when the file is missing (Plot.addBuild logs it and
    moves on). So the series file must be one that only a build which measured an accuracy holds:
    its own artifacts folder, which scripts/lib.sh empties at the start of every build
    (tests/test_scripts_fast.py shows a failed gate build leaves none)."""
    plot = rendered["job4"].find("publishers/hudson.plugins.plot.PlotPublisher")
    assert plot is not None
    series = plot.find(".//hudson.plugins.plot.CSVSeries")
    assert series.findtext("file") == "artifacts/job4/accuracy.csv"
    assert series.findtext("fileType") == "csv"
    (command,) = jc.shell_commands(rendered["job4"])
    assert 'CT_ARTIFACTS_DIR="$WORKSPACE/artifacts/$JOB_NAME"' in command


def test_job5_emails_best_accuracy_and_metrics_on_success_and_failure(rendered):
    mail = rendered["job5"].find("publishers/hudson.plugins.emailext.ExtendedEmailPublisher")
    assert mail is not None
    assert mail.findtext("recipientList") == "$DEFAULT_RECIPIENTS"
    triggers = {t.tag.rsplit(".", 1)[1] for t in mail.find("configuredTriggers")}
    assert {"SuccessTrigger", "FailureTrigger"} <= triggers
    attachments = {a.strip() for a in mail.findtext("attachmentsPattern").split(",")}
    assert {"metrics.json", "best.json"} <= attachments
    assert mail.findtext("attachBuildLog") == "true"
    assert "BEST_ACCURACY" in mail.findtext("defaultSubject")
    body = mail.findtext("defaultContent")
    assert '${FILE,path="best.json"}' in body and "${ACCURACY}" in body
    for trigger in mail.find("configuredTriggers"):
        assert trigger.find(".//hudson.plugins.emailext.plugins.recipients."
                            "ListRecipientProvider") is not None


def test_job5_mail_attaches_each_file_once(rendered):
    """email-ext 1861.vdb_d991590994, src/main/java/hudson/plugins/emailext/
    ExtendedEmailPublisher.java (createMail, lines 967-975): the publisher's attachmentsPattern is
    attached, then the firing trigger's own pattern too when it is not blank, with no
    de-duplication. JJB's email-ext writes `attachments` into both, so jobs.yaml renders this
    publisher as raw XML with the pattern on the publisher only."""
    mail = rendered["job5"].find("publishers/hudson.plugins.emailext.ExtendedEmailPublisher")
    per_trigger = [(t.findtext("email/attachmentsPattern") or "").strip()
                   for t in mail.find("configuredTriggers")]
    assert per_trigger and all(p == "" for p in per_trigger), per_trigger
    patterns = [mail.findtext("attachmentsPattern"), *per_trigger]
    for name in ("metrics.json", "best.json"):
        assert sum(name in (p or "") for p in patterns) == 1, name
    assert mail.get("plugin", "").startswith("email-ext")


def test_job5_mail_attaches_the_reported_runs_curves_once(rendered):
    mail = rendered["job5"].find("publishers/hudson.plugins.emailext.ExtendedEmailPublisher")
    patterns = [mail.findtext("attachmentsPattern"),
                *(t.findtext("email/attachmentsPattern") for t in mail.find("configuredTriggers"))]
    attached = [a.strip() for p in patterns if p for a in p.split(",")]
    assert attached.count("artifacts/job5/curves.png") == 1
    assert sum("curves.png" in a for a in attached) == 1


def test_job4_and_job5_publish_the_report_from_the_shared_workspace(rendered):
    """htmlpublisher-plugin htmlpublisher-427.1, src/main/java/htmlpublisher/HtmlPublisher.java
    (publishReports, lines 241-285): the report folder is `workspace.child(reportDir)`, relative
    to the build's workspace (here the shared custom workspace ${CT_WORKSPACE}), and only the
    files matching `includes` under it are copied (HtmlPublisherTarget.getIncludes: "**/*" when
    empty). With keepAll false the copy lives at project level and `targetDir.deleteRecursive()`
    removes the previous one first: no past reports are kept (keepAll true would keep one per
    build, HtmlPublisherTarget.getBuildArchiveDir). So the page's ../runs/<id>/curves.png only
    resolve in Jenkins when reportDir is the workspace itself and includes names report/ and the
    pictures, and never data/ or the models (the whole workspace would be copied otherwise)."""
    for job in ("job4", "job5"):
        publishers = rendered[job].find("publishers")
        (target,) = publishers.iter("htmlpublisher.HtmlPublisherTarget")
        assert publishers.find("htmlpublisher.HtmlPublisher").get("plugin") == "htmlpublisher"
        assert target.findtext("reportName") == "CT report"
        assert target.findtext("reportDir") == "."
        assert target.findtext("reportFiles") == "report/index.html"
        includes = {i.strip() for i in target.findtext("includes").split(",")}
        assert includes == {"report/**", "runs/*/curves.png", "runs/*/trials.png"}
        assert target.findtext("keepAll") == "false"
        assert target.findtext("allowMissing") == "true"
        assert rendered[job].findtext("customWorkspace") == "${CT_WORKSPACE}"
    for job in ("job1", "job2", "job3", "job6"):
        assert rendered[job].find(".//htmlpublisher.HtmlPublisher") is None, job


def test_the_workspace_files_the_jobs_read_are_named_by_their_one_owner(rendered):
    """jobs.yaml cannot import ct/workspace.py, where the workspace's file names are written
    once: every workspace file a job archives, attaches or reads a property from is one of them
    (a renamed file fails here, not in Jenkins)."""
    known = {value for key, value in vars(names).items()
             if key.isupper() and isinstance(value, str)}
    used: set[str] = set()
    for root in rendered.values():
        for tag in ("artifacts", "attachmentsPattern", "propertiesFile"):
            for element in root.iter(tag):
                used |= {part.strip() for part in (element.text or "").split(",")}
        for element in root.iter():
            used |= set(re.findall(r'\$\{(?:PROPFILE|FILE),(?:file|path)="([^"]+)"',
                                   element.text or ""))
    used = {path for path in used if path and "*" not in path
            and not path.startswith(f"{names.ARTIFACTS_DIR}/")}
    assert {names.GATE_PROPERTIES, names.HANDOVER_PROPERTIES, names.NEXT_PUSH_PROPERTIES,
            names.BEST_FILE} <= used
    assert used <= known, used - known
