"""Two trainings on one host: with the thread budget, and without it.

    python bench/concurrent_runs.py                    # 2 at once, fast preset on 10,000 images
    python bench/concurrent_runs.py --processes 3 --subset 5000

torch gives every process one compute thread per core it sees, and its OpenMP threads spin while
they wait, so N trainings started side by side on the same cores fight for them: 3-17x slower
each, not N x. The pipeline gives each training its share instead (ct.cpu_budget: the host
divides its cores, each process gets CT_THREADS and, under docker, --cpus). This runs real
`train.py --preset fast --subset N` processes on real data:

1. one alone, with every core (the reference);
2. N at once, each with its share of the cores (what the pipeline does);
3. N at once, each taking every core (what happens without a budget).

and prints each batch's wall time over the single run's. N runs sharing the cores fairly take
about N times one run's time; the target for two is at most 2.2x.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ct import cpu_budget  # noqa: E402


def train_command(out: Path, data_dir: Path, subset: int, seed: int) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), "--preset", "fast", "--subset", str(subset),
            "--seed", str(seed), "--out", str(out), "--data-dir", str(data_dir),
            "--device", "cpu"]


def run_batch(count: int, threads: int | None, data_dir: Path, subset: int) -> float:
    """Wall seconds until `count` trainings started together have all ended; each gets
    CT_THREADS=threads, or no budget (every core) when threads is None."""
    env = {**os.environ}
    env.pop(cpu_budget.THREADS_ENV, None)
    if threads is not None:
        env[cpu_budget.THREADS_ENV] = str(threads)
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(count):  # each run decodes its data cache first, untimed
            _prime(Path(tmp) / f"run{k}", data_dir)
        start = time.perf_counter()
        procs = [subprocess.Popen(train_command(Path(tmp) / f"run{k}", data_dir, subset, k),
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True) for k in range(count)]
        errors = [proc.communicate()[1] for proc in procs]
        wall = time.perf_counter() - start
    failed = [err for proc, err in zip(procs, errors, strict=True) if proc.returncode != 0]
    if failed:
        sys.exit(f"concurrent_runs.py: error: a training failed: {failed[0].strip()[-300:]}")
    return wall


def _prime(out: Path, data_dir: Path) -> None:
    from ct.trainer.data import load_cifar

    load_cifar(data_dir, cache_dir=out / "data")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--processes", type=int, default=2, help="trainings at once (default 2)")
    p.add_argument("--subset", type=int, default=10000, help="training images of each run")
    p.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    args = p.parse_args()
    if args.processes < 2 or args.subset < 1000:
        sys.exit("concurrent_runs.py: error: --processes must be at least 2, --subset 1000+")
    cores = cpu_budget.usable_cores()
    share = cpu_budget.share(cores, args.processes)
    alone = run_batch(1, None, args.data_dir, args.subset)
    budgeted = run_batch(args.processes, share, args.data_dir, args.subset)
    unbudgeted = run_batch(args.processes, None, args.data_dir, args.subset)
    print(f"{cores} cores; train.py --preset fast --subset {args.subset}: one alone "
          f"{alone:.1f} s (every core)")
    print(f"{args.processes} at once, {share} thread(s) each (the budget): {budgeted:.1f} s = "
          f"{budgeted / alone:.2f}x one run")
    print(f"{args.processes} at once, {cores} threads each (no budget): {unbudgeted:.1f} s = "
          f"{unbudgeted / alone:.2f}x one run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
