"""How many CPU threads one training process may use, so that trainings sharing a host share its
cores instead of fighting over them.

torch starts one compute thread per core it sees, and its OpenMP threads spin while they wait:
two processes that each take every core of a 2-core machine ran 3-17x slower, not 2x. And a
container limited by `docker run --cpus` still sees every core of the host (the limit is a cgroup
quota, not an affinity mask), so torch alone would start too many threads there too.

- The host (job scripts, stdlib python3) splits its cores among the trainings it runs at once
  (CT_TRAININGS_PER_HOST, times a tuning round's CT_TUNE_WORKERS) and gives each its share:
  `python3 -m ct.cpu_budget --trainings-per-host N [--tune-workers K]` prints the threads per
  process, which the container gets as `--cpus` and CT_THREADS (scripts/lib-process.sh launch).
- The trainer (`threads()`) takes CT_THREADS when set, else every usable core: the affinity mask
  and the cgroup's CPU quota, whichever is smaller.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

THREADS_ENV = "CT_THREADS"  # a process's thread budget, set by whoever started it
CGROUP_V2_MAX = Path("/sys/fs/cgroup/cpu.max")  # "QUOTA PERIOD" or "max PERIOD"
CGROUP_V1_QUOTA = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")  # -1: no quota
CGROUP_V1_PERIOD = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")
MAX_THREADS = 1024


class BudgetError(ValueError):
    """A thread budget or process count that is not a usable number."""


def affinity_cores() -> int:
    """The cores this process may be scheduled on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def quota_cores(v2: Path = CGROUP_V2_MAX, v1_quota: Path = CGROUP_V1_QUOTA,
                v1_period: Path = CGROUP_V1_PERIOD) -> int | None:
    """The cgroup's CPU quota in whole cores (rounded up: --cpus 1.5 leaves 2 threads busy
    75% of the time, better than one), or None without a quota."""
    try:
        quota, period = v2.read_text().split()[:2]
        return None if quota == "max" else _cores(int(quota), int(period))
    except (OSError, ValueError):
        pass
    try:
        return _cores(int(v1_quota.read_text()), int(v1_period.read_text()))
    except (OSError, ValueError):
        return None


def _cores(quota: int, period: int) -> int | None:
    if quota <= 0 or period <= 0:
        return None
    return max(1, math.ceil(quota / period))


def usable_cores() -> int:
    """Cores this process can actually run on at once: its affinity, capped by the quota."""
    quota = quota_cores()
    cores = affinity_cores()
    return cores if quota is None else min(cores, quota)


def parse_threads(text: str, source: str = THREADS_ENV) -> int:
    """A thread count as decimal digits, 1..MAX_THREADS; BudgetError naming `source` otherwise."""
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_THREADS:
        raise BudgetError(f"{source} must be a whole number of threads in 1..{MAX_THREADS}, "
                          f"not {text!r}")
    return int(text)


def threads(environ: dict[str, str] | None = None) -> int:
    """This process's thread budget: CT_THREADS when its starter set one, else every usable
    core. Never more than the usable cores: a budget above them only oversubscribes."""
    value = (os.environ if environ is None else environ).get(THREADS_ENV, "")
    cores = usable_cores()
    return min(cores, parse_threads(value)) if value else cores


def share(cores: int, processes: int) -> int:
    """Threads for each of `processes` trainings run at once on `cores` cores: an equal whole
    share, at least one (more processes than cores then take turns on them)."""
    if processes < 1:
        raise BudgetError(f"the number of processes must be at least 1, not {processes}")
    return max(1, cores // processes)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m ct.cpu_budget", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trainings-per-host", default="1",
                   help="trainings (or tuning rounds) this host runs at once "
                        "(CT_TRAININGS_PER_HOST)")
    p.add_argument("--tune-workers", default="1",
                   help="workers of this tuning round on this host (CT_TUNE_WORKERS); 1 for a "
                        "training")
    args = p.parse_args(argv)
    try:
        per_host = parse_threads(args.trainings_per_host, "CT_TRAININGS_PER_HOST")
        workers = parse_threads(args.tune_workers, "CT_TUNE_WORKERS")
        print(share(usable_cores(), per_host * workers))
    except BudgetError as exc:
        print(f"ct.cpu_budget: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
