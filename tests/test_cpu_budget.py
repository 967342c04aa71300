"""The thread budget: the host splits its cores among the trainings it runs at once, and the
trainer reads its share from CT_THREADS or, without one, from the cores its affinity and its
cgroup's CPU quota leave it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ct import cpu_budget
from tests.conftest import REPO, lib_sh, run_script


def run_module(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ct.cpu_budget", *args], cwd=REPO, text=True,
                          capture_output=True, timeout=60, check=False,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


@pytest.mark.parametrize(("cores", "processes", "each"), [(2, 1, 2), (2, 2, 1), (16, 3, 5),
                                                          (2, 5, 1)])
def test_the_cores_are_shared_equally_and_each_process_gets_one_at_least(
        cores: int, processes: int, each: int) -> None:
    assert cpu_budget.share(cores, processes) == each


def test_the_cgroup_v2_quota_caps_the_cores_rounded_up(tmp_path: Path) -> None:
    cpu_max = tmp_path / "cpu.max"
    absent = tmp_path / "absent"
    cpu_max.write_text("150000 100000\n")  # docker run --cpus 1.5
    assert cpu_budget.quota_cores(cpu_max, absent, absent) == 2
    cpu_max.write_text("100000 100000\n")  # --cpus 1
    assert cpu_budget.quota_cores(cpu_max, absent, absent) == 1
    cpu_max.write_text("max 100000\n")  # no limit
    assert cpu_budget.quota_cores(cpu_max, absent, absent) is None


def test_the_cgroup_v1_quota_is_read_where_there_is_no_v2_file(tmp_path: Path) -> None:
    quota, period = tmp_path / "cfs_quota_us", tmp_path / "cfs_period_us"
    quota.write_text("50000\n")
    period.write_text("100000\n")
    assert cpu_budget.quota_cores(tmp_path / "absent", quota, period) == 1
    quota.write_text("-1\n")
    assert cpu_budget.quota_cores(tmp_path / "absent", quota, period) is None


def test_ct_threads_sets_the_budget_but_never_above_the_usable_cores() -> None:
    assert cpu_budget.threads({"CT_THREADS": "1"}) == 1
    assert cpu_budget.threads({"CT_THREADS": "1024"}) == cpu_budget.usable_cores()
    assert cpu_budget.threads({}) == cpu_budget.usable_cores()


@pytest.mark.parametrize("bad", ["0", "08x", "-1", "1.5", " 2", "$(id)", "٣", "1025"])
def test_a_budget_that_is_not_a_plain_count_is_refused_with_its_name(bad: str) -> None:
    with pytest.raises(cpu_budget.BudgetError, match="CT_THREADS"):
        cpu_budget.threads({"CT_THREADS": bad})


def test_the_host_command_prints_each_process_share_of_this_machines_cores() -> None:
    cores = cpu_budget.usable_cores()
    proc = run_module()
    assert proc.returncode == 0 and proc.stdout == f"{cores}\n"
    proc = run_module("--trainings-per-host", "1", "--tune-workers", str(cores + 1))
    assert proc.returncode == 0 and proc.stdout == "1\n"


def test_the_host_splits_among_every_training_of_every_round_on_it(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(cpu_budget, "usable_cores", lambda: 16)  # a 16-core host
    assert cpu_budget.main(["--trainings-per-host", "2", "--tune-workers", "4"]) == 0
    assert cpu_budget.main(["--trainings-per-host", "1", "--tune-workers", "3"]) == 0
    assert capsys.readouterr().out.split() == ["2", "5"]


@pytest.mark.parametrize(("flag", "name"), [("--trainings-per-host", "CT_TRAININGS_PER_HOST"),
                                            ("--tune-workers", "CT_TUNE_WORKERS")])
def test_the_host_command_refuses_a_count_that_is_not_a_number(flag: str, name: str) -> None:
    proc = run_module(flag, "2;id")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and name in proc.stderr


def test_the_trainer_takes_its_budget_from_ct_threads() -> None:
    probe = ("from ct.trainer.engine import make_compute; import torch; "
             "c = make_compute('cpu'); print(torch.get_num_threads(), c.describe())")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, text=True, timeout=120,
                          capture_output=True, check=False,
                          env={**os.environ, "PYTHONPATH": str(REPO), "CT_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[0] == "1" and "1 threads" in proc.stdout


def test_train_py_refuses_a_garbled_budget_in_one_line_before_training(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "--preset", "fast",
                           "--out", str(tmp_path / "out"), "--device", "cpu"],
                          cwd=tmp_path, text=True, timeout=120, capture_output=True, check=False,
                          env={**os.environ, "CT_THREADS": "two"})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "CT_THREADS" in proc.stderr
    assert [path for path in (tmp_path / "out").rglob("*") if not path.is_dir()] == []


BUDGET_PROBE = ("from ct import cpu_budget; from ct.trainer.engine import make_compute; "
                "import torch; make_compute('cpu'); "
                "print(cpu_budget.quota_cores(), cpu_budget.affinity_cores(), "
                "torch.get_num_threads())")


@pytest.mark.slow
def test_a_container_limited_by_docker_cpus_trains_on_that_many_threads(docker_engine) -> None:
    # `docker run --cpus` is a cgroup quota: the container still sees every core of the host
    # (sched_getaffinity), so only reading the quota keeps torch from oversubscribing it.
    def in_container(*limit: str) -> list[str]:
        return docker_engine.docker(
            "run", "--rm", *limit, "--user", "1000:1000", "-v", f"{REPO}:/code:ro",
            "-e", "PYTHONPATH=/code", "-e", "PYTHONDONTWRITEBYTECODE=1", "-w", "/code",
            docker_engine.base_image, "python", "-c", BUDGET_PROBE).split()

    quota, cores, threads = in_container()
    assert quota == "None" and threads == cores  # no limit: every core it may run on
    quota, cores, threads = in_container("--cpus", "1")
    assert quota == "1" and threads == "1"
    quota, cores, threads = in_container("--cpus", "0.5")  # half a core: one thread, not none
    assert quota == "1" and threads == "1"


# ------------------------------------------------------- the host gives each training its share

@pytest.mark.parametrize(("per_host", "role", "workers", "processes"), [
    ("1", "train", "4", 1), ("2", "train", "4", 2), ("1", "tune", "2", 2),
    ("1", "tune-w1", "2", 2), ("2", "tune", "3", 6)])
def test_each_launch_gets_its_share_of_the_hosts_cores(script_env, per_host: str, role: str,
                                                       workers: str, processes: int) -> None:
    env = {**script_env, "CT_TRAININGS_PER_HOST": per_host, "CT_TUNE_WORKERS": workers}
    proc = lib_sh(env, f"thread_budget {role}")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{cpu_budget.share(cpu_budget.usable_cores(), processes)}\n"


def test_a_garbled_trainings_per_host_is_one_line_and_no_launch(script_env) -> None:
    proc = lib_sh({**script_env, "CT_TRAININGS_PER_HOST": "2*3"}, "thread_budget train")
    assert proc.returncode == 2 and proc.stdout == ""
    assert "CT_TRAININGS_PER_HOST" in proc.stderr and proc.stderr.strip().count("\n") == 0


def test_a_local_training_gets_ct_threads_and_none_of_the_hosts_secrets(
        source_repo, script_env, tmp_path: Path) -> None:
    # The local runtime starts "$CT_PYTHON" train.py: a stand-in records what that process gets
    # and runs the host's own modules (python -m) as the real python would.
    seen = tmp_path / "train-env"
    stand_in = tmp_path / "python"
    stand_in.write_text(f'#!/bin/sh\n[ "$1" = -m ] && exec "{sys.executable}" "$@"\n'
                        f'env > "{seen}"\n')
    stand_in.chmod(0o755)
    secrets = {"SMTP_PASSWORD": "smtp-s3cret", "SMTP_USER": "mailer",
               "JENKINS_API_TOKEN": "api-s3cret", "JENKINS_USER": "ct-retrain"}
    env = {**script_env, **secrets, "CT_PYTHON": str(stand_in), "CT_TRAININGS_PER_HOST": "1"}
    commit = run_script("job1-pull.sh", env, str(source_repo)).stdout.strip()
    proc = lib_sh(env, f"launch train local {commit} --preset fast; wait")
    assert proc.returncode == 0, proc.stderr
    child = dict(line.split("=", 1) for line in seen.read_text().splitlines() if "=" in line)
    assert child["CT_THREADS"] == str(cpu_budget.usable_cores())
    assert not set(secrets) & set(child)
