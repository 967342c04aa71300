"""ct.trainer.allocator: the buffers a training step frees are reused by the next steps instead
of being handed back to the kernel and faulted in again."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc",
                                reason="mallopt's settings are glibc's")

STEP_MB = (8, 48, 24, 64, 16)  # one "step": buffers of a training step's sizes, then all freed
STEP_PAGES = sum(STEP_MB) * 2**20 // 4096
STEPS, SETTLED = 12, 8  # the first steps grow the heap (6 here); then it only reuses
SETTLED_PAGES = (STEPS - SETTLED) * STEP_PAGES

SET_UPS = {
    "default": "",
    "keep": "from ct.trainer.allocator import keep_freed_memory; keep_freed_memory()",
    "compute": "from ct.trainer.engine import make_compute; make_compute('cpu')",
}
# The page faults of each step, in a fresh process after one of SET_UPS.
STEPS_PROBE = f"""
import json, resource, torch
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
per_step = []
for _ in range({STEPS}):
    before = faults()
    buffers = [torch.empty(mb * 2**18).fill_(1.0) for mb in {STEP_MB}]
    del buffers
    per_step.append(faults() - before)
print(json.dumps(per_step))
"""


def settled_faults(set_up: str) -> int:
    out = subprocess.run([sys.executable, "-c", SET_UPS[set_up] + STEPS_PROBE], cwd=REPO,
                         capture_output=True, text=True, timeout=120, check=True)
    return sum(json.loads(out.stdout)[SETTLED:])


def transparent_huge_pages_always() -> bool:
    path = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return path.exists() and "[always]" in path.read_text()


def test_steps_reuse_the_memory_earlier_steps_freed() -> None:
    kept = settled_faults("keep")
    assert kept < SETTLED_PAGES // 4  # a stray block at most
    # Compared with the default in the same kernel, not with a page count: kernels that fault
    # anonymous memory in larger folios (mTHP) count fewer faults for the same pages.
    if not transparent_huge_pages_always():  # 2 MB pages would hide the default's faults
        assert kept < settled_faults("default") // 4  # what it saves: most of the faults


def test_the_cpu_compute_set_up_keeps_freed_memory() -> None:
    assert settled_faults("compute") < SETTLED_PAGES // 4
