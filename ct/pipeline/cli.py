"""What every host-side command line shares: --workspace, and one line on stderr for bad input.

A tool's action raises PipelineError for a problem the operator must fix; `run` prints its text
as one line after the tool's name and returns 2. An OSError that no reader or writer foresaw is
still one line naming the path, not a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from ct import workspace as names
from ct.pipeline.errors import PipelineError


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    """A host tool's parser, with --workspace (default: $CT_WORKSPACE): every tool has one."""
    made = argparse.ArgumentParser(prog=prog, description=description.split("\n")[0])
    names.add_workspace_argument(made)
    return made


def run(prog: str, action: Callable[[], int]) -> int:
    """Run `action`; its exit status, or 2 after one line on stderr for a problem to fix."""
    try:
        return action()
    except PipelineError as err:
        print(f"{prog}: {err}", file=sys.stderr, flush=True)
        return 2
    except OSError as err:
        print(f"{prog}: {err}; fix that path's permissions, then rerun", file=sys.stderr,
              flush=True)
        return 2


def workspace_or_exit(parser_: argparse.ArgumentParser, given: Path | None) -> Path:
    workspace = names.workspace_of(parser_, given)
    if workspace is None:
        raise SystemExit(2)
    return workspace


def say(message: str) -> None:
    """A log line on stderr in the job scripts' format ([HH:MM:SS job] message), so that a
    decision's explanation reads like the rest of the build log."""
    job = os.environ.get("CT_JOB", "ct")
    print(f"[{time.strftime('%H:%M:%S')} {job}] {message}", file=sys.stderr, flush=True)
