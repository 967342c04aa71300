"""job2's image tag is the hash of what goes into the image (README, the jobs table; scripts/lib.sh
image_tag): a push that changes requirements.txt, requirements-tune.txt, .dockerignore or the
Dockerfile, or another CT_BASE_IMAGE, builds a new image; a push of code only reuses the one built.
The real job1 and job2 on real git pushes; the engine is a recording stand-in
(tests/stand_ins.py): what matters here is the tag job2 asks for and whether it builds."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.conftest import REPO, SCRIPTS, git, run_script
from tests.stand_ins import FakeDocker

BUILD_INPUTS = ("Dockerfile.train", "requirements.txt", "requirements-tune.txt", ".dockerignore")
BASE = "registry.example.org/python:3.11-slim"


def change(path: Path) -> None:
    with open(path, "a") as handle:
        handle.write("\n# changed by a push\n")


def test_a_push_of_code_only_reuses_the_image_and_another_base_builds_one(
        source_repo, script_env, tmp_path):
    docker = FakeDocker(tmp_path / "bin", answers=True, path=script_env["PATH"])
    env = {**script_env, **docker.env, "CT_RUNTIME": "docker"}

    def job2(commit: str, **settings: str) -> str:
        return run_script("job2-image.sh", {**env, "COMMIT": commit, **settings}).stdout.strip()

    first = run_script("job1-pull.sh", env, str(source_repo)).stdout.strip()
    image = job2(first)
    assert docker.built() == [image]

    for name in ("train.py", "network.py"):
        change(source_repo / name)
    git(source_repo, "commit", "-qam", "the code only")
    second = run_script("job1-pull.sh", env, str(source_repo)).stdout.strip()
    assert second != first
    assert job2(second) == image
    assert docker.built() == [image], "a push of code only rebuilt the image"

    based = job2(second, CT_BASE_IMAGE=BASE)
    assert based != image and docker.built() == [image, based]
    (build,) = [call for call in docker.calls() if call[0] == "build" and based in call]
    assert f"BASE_IMAGE={BASE}" in build  # built from that base
    assert job2(second, CT_BASE_IMAGE=BASE) == based
    assert docker.built() == [image, based]  # the same base again: reused


def test_each_file_that_goes_into_the_image_changes_its_tag(script_env, tmp_path):
    """lib.sh's own image_tag (what job2 tags and looks up by) over a commit's files, and over
    the same files with one of them changed; the tag job2 then asks for is new, so it builds."""
    files = (*BUILD_INPUTS, "train.py", "network.py")
    commits: dict[str, Path] = {}
    for name in ("as pushed", *files):
        folder = commits[name] = tmp_path / name.strip(".")
        folder.mkdir()
        for file in files:
            shutil.copy2(REPO / file, folder / file)
        if name != "as pushed":
            change(folder / name)
    script = "".join(f'CODE="{folder}"; image_tag train Dockerfile.train; echo\n'
                     for folder in commits.values())
    done = subprocess.run(["bash", "-c", f'source "{SCRIPTS}/lib.sh"\n{script}'],
                          env=script_env, capture_output=True, text=True, timeout=120, check=True)
    tags = dict(zip(commits, done.stdout.split(), strict=True))

    for name in BUILD_INPUTS:
        assert tags[name] != tags["as pushed"], f"a changed {name} kept the tag"
    assert tags["train.py"] == tags["network.py"] == tags["as pushed"]  # code: the same image
    assert len(set(tags.values())) == 1 + len(BUILD_INPUTS)
