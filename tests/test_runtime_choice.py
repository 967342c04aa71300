"""CT_RUNTIME unset: docker when an engine answers, else local, and the log says which (README,
"Runtimes"). The real job1 and job2 on a real git push; the engine is not the point here, so a
recording stand-in `docker` (tests/stand_ins.py) answers or not. The real engine runs in the slow
suite (tests/test_chains_docker.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests import stand_ins
from tests.conftest import read_props, run_script
from tests.stand_ins import FakeDocker, path_without_docker

NO_ENGINE = "no Docker engine answers"


def unset_runtime(env: dict[str, str], **extra: str) -> dict[str, str]:
    return {key: value for key, value in env.items() if key != "CT_RUNTIME"} | extra


def push_and_pick_image(source_repo: Path, env: dict[str, str]) -> tuple[str, str]:
    """job1 queues the push, job2 picks its image: (what job2 printed, its log)."""
    run_script("job1-pull.sh", env, str(source_repo))
    job2 = run_script("job2-image.sh", env)
    return job2.stdout.strip(), job2.stderr


def test_an_engine_that_answers_makes_job2_build_the_image(source_repo, script_env, tmp_path):
    docker = FakeDocker(tmp_path / "bin", answers=True, path=script_env["PATH"])
    env = unset_runtime(script_env, **docker.env)

    image, log = push_and_pick_image(source_repo, env)

    assert re.fullmatch(r"ct-cifar-train:[0-9a-f]{16}", image), image
    assert docker.built() == [image]
    assert f"building {image}" in log and NO_ENGINE not in log
    record = read_props(Path(env["CT_WORKSPACE"]) / "status" / "image.properties")
    assert record["TRAIN_IMAGE"] == image


@pytest.mark.parametrize("docker", ["no docker command", "an engine that does not answer"])
def test_without_an_engine_job2_runs_local_and_says_so(source_repo, script_env, tmp_path, docker):
    if docker == "no docker command":
        fake = None
        env = unset_runtime(script_env,
                            PATH=path_without_docker(tmp_path / "bin", script_env["PATH"]))
    else:
        fake = FakeDocker(tmp_path / "bin", answers=False, path=script_env["PATH"])
        env = unset_runtime(script_env, **fake.env)

    image, log = push_and_pick_image(source_repo, env)

    assert image == "local"
    assert NO_ENGINE in log and "using the local runtime" in log
    assert "local runtime, no image" in log
    record = read_props(Path(env["CT_WORKSPACE"]) / "status" / "image.properties")
    assert record["TRAIN_IMAGE"] == "local"
    if fake is not None:
        assert [call[0] for call in fake.calls()] == ["version"]  # asked, and nothing else


@pytest.mark.parametrize(("answers", "runtime"), [(True, "docker"), (False, "local")])
def test_the_chain_runner_settles_the_runtime_once_and_says_which(
        script_env, tmp_path, answers, runtime):
    """scripts/pipeline.sh (real) over stand-in jobs: its log names the runtime it chose, and
    every job it runs is given that runtime."""
    docker = FakeDocker(tmp_path / "bin", answers=answers, path=script_env["PATH"])
    env = unset_runtime(script_env, **docker.env)

    proc, ran = stand_ins.run_chain(tmp_path / "chain", env, ("a" * 40,))

    assert proc.returncode == 0, proc.stderr
    assert f"runtime: {runtime};" in proc.stderr
    jobs = [line.split() for line in ran if line.startswith("job")]
    assert [job for job, _ in jobs] == ["job1", "job2", "job3", "job4", "job7"]
    assert {given for _, given in jobs} == {runtime}
