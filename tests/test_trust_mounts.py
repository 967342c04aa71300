"""What a training container can reach, and what the host does to the files it leaves: the real
sandbox_args of scripts/lib-process.sh (the `docker run` options every launcher uses, computed
without an engine), the real chown, real symlinks to real folders outside the temporary workspace,
and in the slow suite a real container started with those options (tests/docker_engine.py).
Tests run as root, as Jenkins or `make run` may: the container user is 1000:1000 by default."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import lib_sh, run_script

HIDDEN = ("code", "status", "serving", "outbox", "report", "plot", "artifacts")


def sandbox(env: dict[str, str], commit: str) -> subprocess.CompletedProcess[str]:
    """sandbox_args as launch and with_model_code call it; stdout: its options, NUL-separated."""
    return lib_sh(env, f"sandbox_args train ct-test {commit}; printf '%s\\0' \"${{SANDBOX[@]}}\"")


def one_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.fixture
def pulled(source_repo, script_env):
    """A workspace after job1 (so a snapshot exists), a root-owned folder outside it, the commit."""
    commit = run_script("job1-pull.sh", script_env, str(source_repo)).stdout.strip()
    outside = Path(script_env["CT_WORKSPACE"]).parent / "outside"
    outside.mkdir()
    (outside / "secret").write_text("host secret\n")
    os.chmod(outside / "secret", 0o600)
    return Path(script_env["CT_WORKSPACE"]), outside, commit


def owners(path: Path) -> dict[str, int]:
    return {str(p): os.lstat(p).st_uid for p in [path, *path.rglob("*")]}


# ------------------------------------------------------------------ chown never follows a link


@pytest.mark.parametrize("name", ["data", "runs"])
def test_a_symlinked_data_or_runs_folder_is_refused_and_nothing_outside_chowned(
        pulled, script_env, name):
    ws, outside, commit = pulled
    assert os.geteuid() == 0, "the chown happens only as root"
    if (ws / name).exists():
        (ws / name).rmdir()
    (ws / name).symlink_to(outside)
    before = owners(outside)
    proc = sandbox(script_env, commit)
    assert proc.returncode == 2
    assert f"{ws / name} is a symlink" in one_line(proc)
    assert owners(outside) == before and before[str(outside)] == 0
    assert os.lstat(ws).st_uid == 0  # refused before any chown


def test_chown_of_runs_changes_links_inside_it_not_what_they_point_to(pulled, script_env):
    ws, outside, commit = pulled
    run = ws / "runs" / "train-1"
    run.mkdir(parents=True)
    (run / "checkpoint.pt").write_bytes(b"x")
    (run / "to-folder").symlink_to(outside)
    (run / "to-file").symlink_to(outside / "secret")
    before = owners(outside)
    proc = sandbox({**script_env, "CT_CONTAINER_USER": "1000:1000"}, commit)
    assert proc.returncode == 0, proc.stderr
    assert owners(outside) == before and set(before.values()) == {0}
    assert {os.lstat(p).st_uid for p in (run, run / "checkpoint.pt", run / "to-folder",
                                         run / "to-file", ws / "data", ws)} == {1000}


def test_a_workspace_setting_that_is_a_link_gives_the_real_folder_to_the_container(
        pulled, script_env, tmp_path):
    ws, _outside, commit = pulled
    (tmp_path / "ws-link").symlink_to(ws)
    proc = sandbox({**script_env, "CT_WORKSPACE": str(tmp_path / "ws-link")}, commit)
    assert proc.returncode == 0, proc.stderr
    assert os.lstat(ws).st_uid == os.lstat(ws / "runs").st_uid == 1000


# ------------------------------------------------------------------ the container's user


@pytest.mark.parametrize("user", ["0:0", "0", "root", "1000:0", "00:1000", "1000",
                                  "1000:1000 -v /:/host"])
def test_a_root_or_non_numeric_container_user_is_refused(pulled, script_env, user):
    ws, _outside, commit = pulled
    proc = sandbox({**script_env, "CT_CONTAINER_USER": user}, commit)
    assert proc.returncode == 2
    assert "as root" in one_line(proc) or "numeric uid:gid" in one_line(proc)
    assert os.lstat(ws).st_uid == 0  # nothing chowned


def test_root_in_the_container_only_when_asked_for(pulled, script_env):
    _ws, _outside, commit = pulled
    proc = sandbox({**script_env, "CT_CONTAINER_USER": "0:0", "CT_ALLOW_ROOT_CONTAINER": "1"},
                   commit)
    assert proc.returncode == 0, proc.stderr
    args = proc.stdout.split("\0")
    assert args[args.index("--user") + 1] == "0:0"


# ------------------------------------------------------------------ what the container sees


def test_the_sandbox_hides_code_and_the_host_state_and_mounts_models_read_only(pulled,
                                                                              script_env):
    ws, outside, commit = pulled
    (ws / "best.json").write_text("{}\n")
    (ws / "gate.properties").symlink_to(outside / "secret")  # never mounted: docker follows
    proc = sandbox(script_env, commit)
    assert proc.returncode == 0, proc.stderr
    args = proc.stdout.rstrip("\0").split("\0")
    volumes = [args[i + 1] for i, arg in enumerate(args) if arg == "-v"]
    assert volumes == [f"{ws}:/workspace", f"{ws}/code/{commit}:/code:ro"]
    mounts = [args[i + 1] for i, arg in enumerate(args) if arg == "--mount"]
    assert mounts == [f"type=tmpfs,destination=/workspace/{name},tmpfs-mode=0555"
                      for name in HIDDEN] + [
        f"type=bind,source={ws}/{name},destination=/workspace/{name},readonly"
        for name in ("models", "commit.txt", "best.json")]  # the host's records that are files
    assert not (ws / "code" / commit / ".git").exists()
    for name in (*HIDDEN, "models", "runs", "data"):  # made by the host, not by the engine
        assert (ws / name).is_dir() and not (ws / name).is_symlink(), name


@pytest.mark.parametrize("name", ["models", "serving", "status", "outbox"])
def test_a_symlinked_host_folder_is_refused(pulled, script_env, name):
    ws, outside, commit = pulled
    if (ws / name).is_dir():
        os.rename(ws / name, ws.parent / "moved")
    (ws / name).symlink_to(outside)
    proc = sandbox(script_env, commit)
    assert proc.returncode == 2 and f"{ws / name} is a symlink" in one_line(proc)
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]


# ------------------------------------------------------------------ artifacts


@pytest.fixture
def artifacts(pulled, script_env, tmp_path):
    env = {**script_env, "CT_ARTIFACTS_DIR": str(tmp_path / "artifacts")}
    return env, tmp_path / "artifacts"


def test_keep_artifact_copies_a_regular_file(pulled, artifacts):
    ws, _outside, commit = pulled
    env, kept = artifacts
    proc = lib_sh(env, f'keep_artifact "{ws}/commit.txt"')
    assert proc.returncode == 0, proc.stderr
    assert (kept / "commit.txt").read_text() == commit + "\n"


@pytest.mark.parametrize("planted", ["file-link", "folder-link", "outside"])
def test_keep_artifact_never_copies_through_a_symlink_or_from_outside(pulled, artifacts,
                                                                       planted):
    ws, outside, _commit = pulled
    env, kept = artifacts
    if planted == "file-link":  # the container replaced commit.txt by a link to a host secret
        (ws / "commit.txt").unlink()
        (ws / "commit.txt").symlink_to(outside / "secret")
        given = ws / "commit.txt"
    elif planted == "folder-link":  # a folder of the workspace replaced by a link
        (ws / "status").rename(ws / "status.old")
        (ws / "status").symlink_to(outside)
        given = ws / "status" / "secret"
    else:
        given = outside / "secret"
    proc = lib_sh(env, f'keep_artifact "{given}"')
    assert proc.returncode == 2 and "not archived" in one_line(proc)
    assert not any("host secret" in p.read_text() for p in kept.rglob("*") if p.is_file())
    assert not [p for p in kept.rglob("*") if p.is_symlink()]


# ------------------------------------------------------------------ a real container (slow)

PROBE = r"""
import json, os
def attempt(what, action):
    try:
        action()
        return "ok"
    except OSError as err:
        return type(err).__name__ + ":" + os.strerror(err.errno)
def write(path):
    return lambda: open(path, "w").write("planted")
def replace(src, dst):
    def act():
        open(src, "w").write("{}")
        os.replace(src, dst)
    return act
print(json.dumps({
    "code_listing": sorted(os.listdir("/workspace/code")),
    "code_git": os.path.exists("/code/.git"),
    "train_py": os.path.isfile("/code/train.py"),
    "champion": open("/workspace/models/champion.pt").read(),
    "write_repo_hook": attempt(0, write("/workspace/code/repo.git/hooks/post-checkout")),
    "write_code_dir": attempt(0, write("/workspace/code/planted")),
    "write_snapshot": attempt(0, write("/code/train.py")),
    "rename_code": attempt(0, lambda: os.rename("/workspace/code", "/workspace/code.old")),
    "write_models": attempt(0, write("/workspace/models/champion.pt")),
    "rename_models": attempt(0, lambda: os.rename("/workspace/models", "/workspace/m.old")),
    "write_best": attempt(0, write("/workspace/best.json")),
    "replace_best": attempt(0, replace("/workspace/.b.tmp", "/workspace/best.json")),
    "remove_best": attempt(0, lambda: os.unlink("/workspace/best.json")),
    "write_status": attempt(0, write("/workspace/status/train.properties")),
    "write_serving": attempt(0, write("/workspace/serving/wanted.json")),
    "write_outbox": attempt(0, write("/workspace/outbox/m.eml")),
    "write_run": attempt(0, write("/workspace/runs/probe.txt")),
    "write_data": attempt(0, write("/workspace/data/probe.cache")),
    "replace_metrics": attempt(0, replace("/workspace/.m.tmp", "/workspace/metrics.json")),
    "uid": os.getuid(), "gid": os.getgid(),
    "capabilities": [line.split()[1] for line in open("/proc/self/status")
                     if line.startswith(("CapEff", "CapBnd"))],
    "no_new_privs": [line.split()[1] for line in open("/proc/self/status")
                     if line.startswith("NoNewPrivs")],
}))
"""


def tree_bytes(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and not p.is_symlink()}


@pytest.mark.slow
@pytest.mark.docker
def test_a_container_started_with_the_sandbox_cannot_reach_git_code_or_host_state(
        pulled, script_env, docker_engine):
    ws, _outside, commit = pulled
    (ws / "models").mkdir()
    (ws / "models" / "champion.pt").write_text("the champion")
    (ws / "best.json").write_text('{"model": "models/champion.pt"}\n')
    proc = sandbox(script_env, commit)  # makes the folders it mounts
    assert proc.returncode == 0, proc.stderr
    # the container's uid owns everything, as on a host that is not root (the container runs as
    # the caller): only the mounts keep it out
    subprocess.run(["chown", "-R", "1000:1000", ws], check=True)
    repo_before = tree_bytes(ws / "code" / "repo.git")
    snapshot_before = tree_bytes(ws / "code" / commit)
    env = {**script_env, "DOCKER_HOST": docker_engine.host}
    proc = sandbox(env, commit)
    assert proc.returncode == 0, proc.stderr
    args = proc.stdout.rstrip("\0").split("\0")
    name = f"ct-trust-{os.getpid()}"
    args[args.index("--name") + 1] = name
    try:
        out = docker_engine.docker("run", "--rm", *args, docker_engine.base_image, "-c", PROBE,
                                   timeout=300)
    finally:
        docker_engine.docker("rm", "-f", name, check=False)
    seen = json.loads(out.strip().splitlines()[-1])
    assert (seen["uid"], seen["gid"]) == (1000, 1000)
    assert seen["capabilities"] == ["0" * 16] * 2 and seen["no_new_privs"] == ["1"]
    assert seen["code_listing"] == [] and not seen["code_git"] and seen["train_py"]
    assert seen["champion"] == "the champion"
    for key in ("write_repo_hook", "write_code_dir", "write_snapshot", "write_models",
                "write_status", "write_serving", "write_outbox", "write_best", "replace_best",
                "remove_best"):
        assert seen[key] != "ok", key
    assert seen["rename_code"] != "ok" and seen["rename_models"] != "ok"
    assert seen["write_run"] == seen["write_data"] == seen["replace_metrics"] == "ok"
    # on the host: the repository, the snapshot and the champion as they were, nothing planted
    assert tree_bytes(ws / "code" / "repo.git") == repo_before
    assert tree_bytes(ws / "code" / commit) == snapshot_before
    assert (ws / "models" / "champion.pt").read_text() == "the champion"
    assert (ws / "best.json").read_text() == '{"model": "models/champion.pt"}\n'
    for name in ("status", "serving", "outbox"):
        assert not [p for p in (ws / name).rglob("*") if p.name in ("train.properties",
                                                                      "wanted.json", "m.eml")]
    assert (ws / "runs" / "probe.txt").read_text() == "planted"  # what it may write, it wrote


@pytest.mark.docker
def test_a_container_whose_mounted_record_is_gone_is_restarted_as_a_new_one(
        pulled, script_env, docker_engine):
    ws, _outside, commit = pulled
    (ws / "best.json").write_text("{}\n")  # mounted read-only as the container starts
    env = {**script_env, "DOCKER_HOST": docker_engine.host, "CT_RUNTIME": "docker"}
    proc = lib_sh(env, f"""resolve_runtime
        start_process train {docker_engine.base_image} {commit} --no-such-flag
        docker inspect -f '{{{{.Id}}}}' "$LAUNCHED"; docker wait "$LAUNCHED" >/dev/null
        rm "$CT_WORKSPACE/best.json"  # moved away by hand: no source for that mount any more
        restart train
        docker inspect -f '{{{{.Id}}}}' "$LAUNCHED"; docker rm -f "$LAUNCHED" >/dev/null""")
    assert proc.returncode == 0, proc.stderr
    first, second = proc.stdout.split()
    assert first != second and "cannot start again as it was" in proc.stderr
