"""job1's git checkout as rendered by Jenkins Job Builder: only fields that the pinned git plugin's
GitSCM saves, with the repository, branch and no-wipe behaviour of the pipeline.

git-plugin git-5.6.0 (jenkins/plugins.txt pins git:5.6.0):
- src/main/java/hudson/plugins/git/GitSCM.java declares the fields GitSCM saves (GITSCM_FIELDS);
  its other instance field, remoteRepositories, is transient.
- src/main/java/hudson/plugins/git/GitSCMBackwardCompatibility.java, GitSCM's superclass, keeps
  the old settings (LEGACY_FIELDS) as transient fields only: readBackExtensionsFromLegacy() turns
  what an old job.xml holds into extensions (a non-blank gitConfigName into UserIdentity, a true
  disableSubmodules into SubmoduleOption, ...), and XStream never writes a transient field back.
Jenkins core jenkins-2.492.1, core/src/main/java/hudson/util/RobustReflectionConverter.java
(fieldDefinedInClass: "unmarshal into transient fields") reads such elements when a job loads, so
they are legacy input that Jenkins drops at its next save, not settings; JJB 6.5.0's git module
(jenkins_jobs/modules/scm.py, git(): the `mapping` list) writes them into every job all the same,
which is why job1's scm is raw XML (jenkins/jobs.yaml).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests import test_jenkins_checks as jc

TOKEN = "test-only-token-git-3c9e"
GITSCM = "hudson.plugins.git.GitSCM"
# GitSCM.java at git-5.6.0: its non-static, non-transient fields.
GITSCM_FIELDS = {"configVersion", "userRemoteConfigs", "branches",
                 "doGenerateSubmoduleConfigurations", "gitTool", "browser", "submoduleCfg",
                 "extensions"}
# GitSCMBackwardCompatibility.java at git-5.6.0: every instance field, all transient.
LEGACY_FIELDS = {"source", "branch", "choosingStrategy", "relativeTargetDir", "includedRegions",
                 "excludedRegions", "excludedUsers", "skipTag", "disableSubmodules",
                 "recursiveSubmodules", "trackingSubmodules", "gitConfigName", "gitConfigEmail",
                 "pruneBranches", "userMergeOptions", "mergeOptions", "clean", "wipeOutWorkspace",
                 "useShallowClone", "reference", "remotePoll", "authorOrCommitter",
                 "ignoreNotifyCommit", "scmName", "localBranch", "buildChooser"}
# UserRemoteConfig.java and BranchSpec.java at git-5.6.0: their saved fields.
REMOTE_FIELDS = {"name", "refspec", "url", "credentialsId"}
BRANCH_FIELDS = {"name"}
# What JJB's `git` module rendered for job1 before (url and branches from the include path).
JJB_GIT_MODULE = """    scm:
      - git:
          url: !include-raw-verbatim: ct-repo-url
          branches:
            - !include-raw-verbatim: ct-branch
          wipe-workspace: false
          clean:
            before: false
            after: false
"""


@pytest.fixture(scope="module")
def job1(tmp_path_factory: pytest.TempPathFactory) -> ET.Element:
    return jc.render(jc.JOBS_YAML, tmp_path_factory.mktemp("jjb") / "out", TOKEN)["job1"]


def git_scm(job: ET.Element) -> ET.Element:
    scm = job.find("scm")
    assert scm is not None and scm.get("class") == GITSCM
    return scm


def unsaved_fields(scm: ET.Element) -> set[str]:
    """Elements of the GitSCM XML (and its remotes and branches) that GitSCM would not save."""
    extra = {child.tag for child in scm} - GITSCM_FIELDS
    for remote in scm.iterfind("userRemoteConfigs/hudson.plugins.git.UserRemoteConfig"):
        extra |= {f"UserRemoteConfig/{c.tag}" for c in remote} - {
            f"UserRemoteConfig/{f}" for f in REMOTE_FIELDS}
    for spec in scm.iterfind("branches/hudson.plugins.git.BranchSpec"):
        extra |= {f"BranchSpec/{c.tag}" for c in spec} - {f"BranchSpec/{f}" for f in BRANCH_FIELDS}
    return extra


def test_job1_writes_only_fields_that_gitscm_saves(job1: ET.Element) -> None:
    scm = git_scm(job1)
    assert unsaved_fields(scm) == set()
    assert {child.tag for child in scm} & LEGACY_FIELDS == set()
    assert scm.get("plugin") == "git"


def test_job1_checks_out_the_repository_and_branch_and_never_wipes_or_cleans(
        job1: ET.Element) -> None:
    scm = git_scm(job1)
    (remote,) = scm.iterfind("userRemoteConfigs/hudson.plugins.git.UserRemoteConfig")
    assert (remote.findtext("name"), remote.findtext("url"), remote.findtext("refspec")) == (
        "origin", jc.REPO_URL, "+refs/heads/*:refs/remotes/origin/*")
    assert [b.findtext("name") for b in scm.iterfind("branches/hudson.plugins.git.BranchSpec")] \
        == [jc.BRANCH]
    assert scm.findtext("configVersion") == "2"  # 2: the branch specs need no migration
    assert scm.findtext("gitTool") == "Default"
    assert scm.findtext("doGenerateSubmoduleConfigurations") == "false"
    extensions = scm.find("extensions")
    assert extensions is not None and list(extensions) == []  # no WipeWorkspace, no Clean*


def test_the_url_and_branch_reach_the_xml_as_given(tmp_path: Path) -> None:
    url = "https://git.example.com/team/cifar-ct.git?ref=a&b=<c>"
    branch = r":^origin/(main|release-\d{2})$"
    job = jc.render(jc.JOBS_YAML, tmp_path / "out", TOKEN,
                    {"CT_REPO_URL": url, "CT_REPO_WEB_URL": "https://git.example.com/team",
                     "CT_BRANCH": branch})["job1"]
    scm = git_scm(job)
    assert scm.findtext(".//hudson.plugins.git.UserRemoteConfig/url") == url
    assert scm.findtext(".//hudson.plugins.git.BranchSpec/name") == branch


def test_jjbs_git_module_would_write_legacy_fields(tmp_path: Path) -> None:
    """The control: the same job through JJB's `git` module fails the field check."""
    text = jc.JOBS_YAML.read_text()
    job1 = text.index("    name: job1\n")
    block = re.compile(r"    scm:\n(?:      .*\n|\n)+?(?=    triggers:)")
    found = block.search(text, job1)
    assert found, "job1 has no scm block followed by triggers"
    copy = tmp_path / "jobs.yaml"
    copy.write_text(text[:found.start()] + JJB_GIT_MODULE + text[found.end():])
    scm = git_scm(jc.render(copy, tmp_path / "out", TOKEN)["job1"])
    assert {"disableSubmodules", "recursiveSubmodules", "remotePoll", "reference",
            "gitConfigName", "gitConfigEmail"} <= unsaved_fields(scm)
    assert unsaved_fields(scm) <= LEGACY_FIELDS
    assert scm.findtext(".//hudson.plugins.git.UserRemoteConfig/url") == jc.REPO_URL


@pytest.mark.parametrize(("setting", "value"), [("CT_REPO_URL", "https://h/{{ x }}.git"),
                                                 ("CT_BRANCH", "*/ma{%in"),
                                                 ("CT_BRANCH", "*/{#main")])
def test_template_syntax_in_the_repository_or_branch_is_refused(tmp_path: Path, setting: str,
                                                                value: str) -> None:
    """job1's XML reads them through a Jinja2 include, which would expand them: refused with one
    line rather than rendered into something else."""
    with pytest.raises(RuntimeError) as err:
        jc.render(jc.JOBS_YAML, tmp_path / "out", TOKEN, {setting: value})
    assert "Jinja2" in str(err.value)
    assert not (tmp_path / "out" / "job1").exists()
