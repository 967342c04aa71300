"""job1 takes nothing from outside on trust: the repository and ref (a build parameter, a webhook),
the workspace's git repository (code/repo.git, which an earlier container or a tampered workspace
may have planted hooks or config in) and the pushed tree (which may carry pipeline state). Real git
repositories, real files outside the temporary workspace; each attack as it was reproduced."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from ct.pipeline import push_source
from ct.pipeline.errors import PipelineError
from tests.conftest import REPO, git, run_script


def state_of(ws: Path) -> dict[str, tuple[str, bytes]]:
    """Every entry of the workspace but the git repository's objects: its kind and bytes."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(ws):
        rel_dir = Path(dirpath).relative_to(ws)
        if rel_dir.parts[:2] == ("code", "repo.git"):
            continue
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            if path.is_symlink():
                found[str(rel_dir / name)] = ("link", os.readlink(path).encode())
            elif path.is_file():
                found[str(rel_dir / name)] = ("file", path.read_bytes())
            else:
                found[str(rel_dir / name)] = ("dir", b"")
    return found


@pytest.fixture
def pulled(source_repo, script_env):
    """A workspace after one job1, and a folder outside it where an attack would leave marks."""
    run_script("job1-pull.sh", script_env, str(source_repo))
    outside = Path(script_env["CT_WORKSPACE"]).parent / "outside"
    outside.mkdir()
    return Path(script_env["CT_WORKSPACE"]), outside


def push(repo: Path, rel: str = "network.py", text: str = "\n# next push\n") -> str:
    path = repo / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text((path.read_text() if path.exists() else "") + text)
    git(repo, "add", "-f", rel)  # -f: .gitignore leaves out runs/ and *.pt
    git(repo, "commit", "-qm", f"push {rel}")
    return git(repo, "rev-parse", "HEAD")


# ------------------------------------------------------------------ the repository and the ref


@pytest.mark.parametrize(("repo", "ref", "says"), [
    ("--upload-pack=touch pwned; git-upload-pack", "HEAD", "must not be empty or start with '-'"),
    ("SRC", "--upload-pack=touch pwned; git-upload-pack", "must not be empty or start with '-'"),
    ("ext::sh -c touch% pwned", "HEAD", "git transport helper"),
    ("ssh://-oProxyCommand=touch%20pwned/x", "HEAD", "no valid host"),
    ("-oProxyCommand=touch pwned:x", "HEAD", "must not be empty or start with '-'"),
    ("SRC", "main:refs/heads/planted", "not a commit id, HEAD or a branch"),
    ("SRC", "main\nCOMMIT=0000000", "control character"),
    ("SRC\r", "HEAD", "control character"),
    ("http://example.invalid/repo.git", "HEAD", "only https://, ssh:// and file://"),
    ("origin", "HEAD", "neither a URL"),
], ids=["repo-option", "ref-option", "ext-helper", "ssh-host-option", "scp-host-option",
        "refspec", "ref-newline", "repo-return", "plain-http", "remote-name"])
def test_job1_refuses_an_untrusted_repository_or_ref(pulled, source_repo, script_env, repo, ref,
                                                     says):
    ws, outside = pulled
    before = state_of(ws)
    repo = repo.replace("SRC", str(source_repo))
    proc = run_script("job1-pull.sh", script_env, repo, ref, check=False, cwd=outside)
    assert proc.returncode == 2, proc.stderr
    assert says in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, lines  # one line: a newline in the value is shown escaped
    assert list(outside.iterdir()) == []  # nothing ran
    assert state_of(ws) == before
    refs = subprocess.run(["git", "--git-dir", ws / "code" / "repo.git", "for-each-ref"],
                          capture_output=True, text=True, check=True).stdout
    assert "planted" not in refs


@pytest.mark.parametrize("repo", [
    "https://github.com/owner/repo.git", "https://user:token@git.example.com:8443/a/b.git",
    "ssh://git@github.com/owner/repo.git", "git@github.com:owner/repo.git",
    "github.com:owner/repo", "file:///srv/git/repo.git", "ssh://git@[::1]:22/repo"])
def test_the_usual_repositories_are_accepted(repo):
    assert push_source.check_repo(repo) in ("https", "ssh", "file")


@pytest.mark.parametrize("ref", ["HEAD", "main", "refs/heads/feature/x-1", "v1.2.3", "abc1234",
                                 "0" * 40, "origin/main"])
def test_the_usual_refs_are_accepted(ref):
    push_source.check_ref(ref)


@pytest.mark.parametrize("ref", ["a..b", "x@{1}", ".hidden", "a/.b", "x.lock", "a//b", "a b",
                                 "+main", "a~1", "a^", "@", "dir/", "x" * 256, ""])
def test_refs_git_would_read_otherwise_are_refused(ref):
    with pytest.raises(PipelineError):
        push_source.check_ref(ref)


def test_a_local_folder_is_accepted(tmp_path):
    assert push_source.check_repo(str(tmp_path)) == "path"


# ------------------------------------------------------------------ the workspace's git repository

HOOKS = ("reference-transaction", "post-checkout", "post-merge", "pre-auto-gc", "post-rewrite",
         "post-index-change", "fsmonitor-watchman")


def plant_hook(path: Path, mark: Path) -> None:
    path.write_text(f"#!/bin/sh\ntouch '{mark}'\n")
    path.chmod(0o755)


def test_hooks_planted_in_the_workspace_repository_never_run(pulled, source_repo, script_env):
    ws, outside = pulled
    for name in HOOKS:
        plant_hook(ws / "code" / "repo.git" / "hooks" / name, outside / f"hook-{name}")
    commit = push(source_repo)
    # an abbreviated id is fetched by the branches (ref updates: reference-transaction's moment)
    out = run_script("job1-pull.sh", script_env, str(source_repo), commit[:10]).stdout.strip()
    assert out == commit and (ws / "code" / commit / "network.py").is_file()
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize(("key", "value"), [
    ("core.fsmonitor", "OUT/fsmonitor.sh"),
    ("filter.plant.smudge", "OUT/fsmonitor.sh"),  # git archive runs it for the tree's attributes
    ("core.hooksPath", "OUT"),
    ("include.path", "OUT/more.config"),
])
def test_config_planted_in_the_workspace_repository_is_refused(pulled, source_repo, script_env,
                                                               key, value):
    ws, outside = pulled
    program = outside / "fsmonitor.sh"
    plant_hook(program, outside / "ran")
    plant_hook(outside / "reference-transaction", outside / "ran")
    (outside / "more.config").write_text(f"[filter \"plant\"]\n\tsmudge = {program}\n")
    subprocess.run(["git", "--git-dir", ws / "code" / "repo.git", "config", key,
                    value.replace("OUT", str(outside))], check=True)
    commit = push(source_repo, ".gitattributes", "* filter=plant\n")
    before = state_of(ws)
    proc = run_script("job1-pull.sh", script_env, str(source_repo), commit[:10], check=False)
    assert proc.returncode == 2, proc.stderr
    assert "config holds" in proc.stderr and key.lower() in proc.stderr
    assert not (outside / "ran").exists()
    assert state_of(ws) == before and not (ws / "code" / commit).exists()


# ------------------------------------------------------------------ the pushed tree


@pytest.mark.parametrize("rel", ["models/x.pt", "status/tune-rounds.properties", "best.json",
                                 "models", "serving/wanted.json", "runs/r/metrics.json"])
def test_a_commit_that_tracks_pipeline_state_is_refused(pulled, source_repo, script_env, rel):
    ws, outside = pulled
    (ws / "status" / "tune-rounds.properties").write_text("ROUNDS=1\n")
    (ws / "models").mkdir()
    (ws / "models" / "x.pt").write_bytes(b"champion")
    if rel == "models":  # a symlink in place of the folder
        (source_repo / "models").symlink_to(outside)
        git(source_repo, "add", "models")
        git(source_repo, "commit", "-qm", "a models link")
        commit = git(source_repo, "rev-parse", "HEAD")
    else:
        commit = push(source_repo, rel, "ROUNDS=0\n")
    before = state_of(ws)
    proc = run_script("job1-pull.sh", script_env, str(source_repo), check=False)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and f"commit {commit} tracks the pipeline's state" in lines[0]
    assert state_of(ws) == before  # no snapshot, nothing queued, commit.txt as it was
    assert list(outside.iterdir()) == []


def test_state_names_follow_the_workspace_contract():
    assert {"status", "models", "runs", "data", "best.json", "best-model.pt", "serving", "code",
            "metrics.json", "accuracy.txt", "studies"} <= push_source.STATE_NAMES
    push_source.check_tree("c", ["train.py", "ct/trainer/data.py", "docs/models.md"])


def test_a_password_in_the_repository_url_stays_out_of_the_log(pulled, script_env):
    repo = "https://ci:s3cret-token@127.0.0.1:1/owner/repo.git"  # nothing listens on port 1
    proc = run_script("job1-pull.sh", script_env, repo, "HEAD", check=False)
    assert proc.returncode == 2 and "cannot fetch 'HEAD' from https://ci:***@127.0.0.1:1/" in (
        proc.stderr)
    assert "s3cret" not in proc.stderr + proc.stdout
    refused = run_script("job1-pull.sh", script_env, repo.replace("127.0.0.1", "-h"), "HEAD",
                         check=False)
    assert refused.returncode == 2 and "no valid host" in refused.stderr
    assert "s3cret" not in refused.stderr


def test_no_script_trusts_every_directory_for_git():
    """safe.directory='*' would let git use a repository that another user (a container's uid)
    owns, with its config and hooks."""
    for path in [*(REPO / "scripts").iterdir(), *(REPO / "jenkins").rglob("*"),
                 *REPO.glob("Dockerfile*"), REPO / "Makefile"]:
        if path.is_file():
            text = path.read_text(errors="replace")
            assert "safe.directory" not in text, path


@pytest.mark.parametrize("name", [".git", ".GIT", "git~1", ".git. "])
def test_a_commit_whose_tree_holds_a_git_folder_is_refused(pulled, source_repo, script_env,
                                                           name):
    """Such a tree only comes from a hand-made commit (git mktree): the snapshot would hold a
    repository, config and hooks included, where the container must see none."""
    ws, outside = pulled
    blob = subprocess.run(["git", "-C", source_repo, "hash-object", "-w", "--stdin"],
                          input=f"[core]\n\tfsmonitor = {outside}/ran\n", text=True,
                          capture_output=True, check=True).stdout.strip()
    inner = subprocess.run(["git", "-C", source_repo, "mktree"], text=True, check=True,
                           input=f"100644 blob {blob}\tconfig\n", capture_output=True
                           ).stdout.strip()
    head = git(source_repo, "rev-parse", "HEAD^{tree}")
    entries = git(source_repo, "ls-tree", head) + f"\n040000 tree {inner}\t{name}\n"
    tree = subprocess.run(["git", "-C", source_repo, "mktree"], input=entries, text=True,
                          capture_output=True, check=True).stdout.strip()
    commit = git(source_repo, "commit-tree", tree, "-p", "HEAD", "-m", "a .git inside")
    git(source_repo, "update-ref", "refs/heads/main", commit)
    before = state_of(ws)
    proc = run_script("job1-pull.sh", script_env, str(source_repo), check=False)
    assert proc.returncode == 2, proc.stderr
    # the fetch's fsck (transfer.fsckObjects) refuses it; ct.pipeline.push_source would next
    assert "hasDotgit" in proc.stderr and f"cannot fetch 'HEAD' from {source_repo}" in proc.stderr
    assert state_of(ws) == before and list(outside.iterdir()) == []
    assert commit not in git(ws / "code" / "repo.git", "log", "--all", "--format=%H")


@pytest.mark.parametrize("path", [".git/config", "a/.GIT/hooks/x", "git~1/config", ".git. /x",
                                  "a/../b", "./a", "a//b"])
def test_a_tree_with_a_git_folder_or_an_odd_path_is_refused(path):
    with pytest.raises(PipelineError, match="git itself would never check out"):
        push_source.check_tree("c", ["train.py", path])
