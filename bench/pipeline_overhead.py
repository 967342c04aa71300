"""Pipeline overhead: what the chain adds to training, for a push whose image already exists.

    python bench/pipeline_overhead.py [--runtime docker|local] [--pushes 3]

Makes a git repository from this checkout's files and a small dataset, pushes once to warm up
(builds the image), then times each further push job by job (job1 pull, job2 image, job3 train,
job4 gate + promote + mail to the outbox). Overhead = the chain's wall time minus the training
time train.py reports (metrics.json wall_time_s): git, image check, container start, interpreter
and torch start-up, data loading, gate, promotion, notification. Target: <= 15 s.
On the docker runtime it uses the test engine (tests/docker_engine.py; starts one if needed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.synthetic_cifar import make_cifar  # noqa: E402

JOBS = ("job1-pull.sh", "job2-image.sh", "job3-train.sh", "job4-gate.sh")


def git(repo: Path, *args: str) -> None:
    env = {**os.environ, "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@example.com",
           "GIT_COMMITTER_NAME": "b", "GIT_COMMITTER_EMAIL": "b@example.com"}  # fmt: skip
    subprocess.run(["git", "-C", str(repo), *args], env=env, check=True, capture_output=True)


def make_repo(dst: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
        capture_output=True,
    ).stdout.decode().split("\0")  # fmt: skip
    for rel in filter(None, files):
        if (REPO / rel).is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dst / rel)
    git(dst, "init", "-q", "-b", "main")
    git(dst, "add", "-A")
    git(dst, "commit", "-qm", "bench push 0")


def push(env: dict[str, str], repo: Path) -> dict[str, float]:
    times = {}
    for job in JOBS:
        args = [str(repo)] if job.startswith("job1") else []
        t0 = time.perf_counter()
        proc = subprocess.run(
            [str(REPO / "scripts" / job), *args], env=env, capture_output=True, text=True
        )
        times[job] = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.exit(f"{job} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    metrics = json.loads((Path(env["CT_WORKSPACE"]) / "metrics.json").read_text())
    times["training (train.py wall_time_s)"] = float(metrics["wall_time_s"])
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runtime", choices=("docker", "local"), default="docker")
    parser.add_argument("--pushes", type=int, default=3)
    parser.add_argument("--train-args", default="--batch-size 64 --epochs 1 --seed 1")
    args = parser.parse_args()

    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ct-bench-")))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CT_", "SMTP_"))}
        env.update(
            PATH=f"{REPO / '.venv' / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}",
            CT_WORKSPACE=str(tmp / "ws"), CT_RUNTIME=args.runtime, CT_THRESHOLD="1",
            CT_DATA_DIR=str(make_cifar(tmp / "data", per_batch=200, test=200)),
            CT_TRAIN_ARGS=args.train_args, CT_IMAGE_PREFIX="ct-bench",
        )  # fmt: skip
        device = "local runtime (python on the host)"
        if args.runtime == "docker":
            from tests.docker_engine import engine_session

            engine = stack.enter_context(engine_session())
            env.update(DOCKER_HOST=engine.host, CT_BASE_IMAGE=engine.base_image)
            device = f"docker runtime (engine {engine.host}, base {engine.base_image})"
        repo = tmp / "src"
        repo.mkdir()
        make_repo(repo)
        print(f"pipeline overhead, {device}; train.py {args.train_args}")
        t0 = time.perf_counter()
        push(env, repo)
        print(f"warm-up push (image build if new): {time.perf_counter() - t0:.1f} s")

        rows = []
        for i in range(1, args.pushes + 1):
            net = repo / "network.py"
            net.write_text(net.read_text() + f"# bench push {i}\n")
            git(repo, "commit", "-qam", f"bench push {i}")
            rows.append(push(env, repo))
        keys = list(rows[0])
        print(f"\nmedian of {len(rows)} pushes with an existing image (seconds):")
        med = {k: statistics.median(r[k] for r in rows) for k in keys}
        for k in keys:
            print(f"  {k:34s} {med[k]:6.2f}   ({', '.join(f'{r[k]:.2f}' for r in rows)})")
        chains = [sum(r[j] for j in JOBS) for r in rows]
        overheads = [
            c - r["training (train.py wall_time_s)"] for c, r in zip(chains, rows, strict=True)
        ]
        overhead = statistics.median(overheads)
        print(f"  {'chain wall time (job1..job4)':34s} {statistics.median(chains):6.2f}")
        print(f"  {'OVERHEAD (chain - training)':34s} {overhead:6.2f}   target <= 15 s: "
              f"{'met' if overhead <= 15 else 'MISSED'}")  # fmt: skip
        out = REPO / "bench" / "results"
        out.mkdir(exist_ok=True)
        (out / f"pipeline_overhead_{args.runtime}.json").write_text(
            json.dumps({"runtime": args.runtime, "pushes": rows, "overhead_s": overheads}, indent=2)
        )


if __name__ == "__main__":
    main()
