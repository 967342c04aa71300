"""Has anything changed since a judged run? What decides that a retrain trains nothing.

    python3 -m ct.pipeline.changes check [--commit C] [--increments DIR] [--force]
                                         [--workspace W]
    python3 -m ct.pipeline.changes retrain --data-version V [--workspace W]

A training request is three things: the code (a commit), the data (its version: the CIFAR-10 base
plus the increments, ct.data_version) and the training flags (CT_TRAIN_ARGS). A judged run whose
lineage records the same three, the champion's or any in accuracy-history.csv, means nothing has
changed since that run: training again would give the same model (runs are reproducible). `check`
prints one line on stdout, `unchanged DATA_VERSION` or `changed DATA_VERSION`, and says why on
stderr: "nothing changed since run X", or what differs from the champion. --force (Jenkins'
FORCE parameter) prints `changed` whatever the record says.

job3 asks before it trains a push it took; job6's `check` and `weekly` ask before they start a
retrain, which `retrain` requests: a POST to job2's buildWithParameters as JENKINS_USER with its
API token JENKINS_API_TOKEN, the one credential (job2's matrix lets that user build it; job2 has no
build token), built here from the environment, so that the token is on no command line, in no file
and not in the log. The commit is --commit, else the latest push (commit.txt). Standard library
only.
"""

from __future__ import annotations

import base64
import http.client
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ct import data_version
from ct import workspace as names
from ct.pipeline import cli, records, report_inputs
from ct.pipeline.errors import PipelineError


@dataclass(frozen=True)
class Request:
    commit: str
    data_version: str
    train_args: str

    def differences(self, lineage: Mapping[str, Any]) -> list[str]:
        """What differs between this request and a run's lineage, in words ([] for nothing)."""
        said = []
        for key, now in (("commit", self.commit), ("data_version", self.data_version),
                         ("train_args", self.train_args)):
            then = lineage.get(key)
            if then != now:
                shown = "not recorded" if then is None else repr(then)
                said.append(f"{key.replace('_', ' ')} {now!r} (was {shown})")
        return said


def normal_args(text: str) -> str:
    """CT_TRAIN_ARGS as the trainer records it (ct.workspace.canonical_flags)."""
    try:
        return names.canonical_flags(text)
    except ValueError as err:
        raise PipelineError(f"CT_TRAIN_ARGS cannot be read as flags ({err}): {text!r}") from None


def judged_runs(workspace: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(run id, lineage) of the champion, then of every judged run, newest first."""
    best, _ = records.read_json_object(workspace / names.BEST_FILE, root=workspace)
    if best and isinstance(best.get(names.LINEAGE), dict):
        yield str(best.get("run_id", "the champion")), best[names.LINEAGE]
    rows, _ = report_inputs.read_history(workspace, workspace / names.HISTORY_FILE)
    for run_id in reversed([row.get("run", "") for row in rows]):
        if not records.is_workspace_file(run_id) or "/" in run_id:
            continue
        metrics, _ = records.read_json_object(
            workspace / names.RUNS_DIR / run_id / names.RUN_METRICS, root=workspace)
        if metrics and isinstance(metrics.get(names.LINEAGE), dict):
            yield run_id, metrics[names.LINEAGE]


def decide(request: Request, runs: Iterator[tuple[str, dict[str, Any]]], force: bool
           ) -> tuple[bool, str]:
    """(changed, why). Pure, but for the runs it is given."""
    first: tuple[str, list[str]] | None = None
    for run_id, lineage in runs:
        differences = request.differences(lineage)
        if not differences:
            if force:
                return True, f"nothing changed since run {run_id}, but FORCE is set: retraining"
            return False, f"nothing changed since run {run_id}: not training"
        first = first or (run_id, differences)
    if first is None:
        return True, "no judged run records what it trained: training"
    run_id, differences = first
    return True, f"changed since run {run_id}: {'; '.join(differences)}"


def current(workspace: Path, commit: str, increments: Path | None, train_args: str) -> Request:
    commit = commit or names.recorded_commit(workspace)
    if not commit:
        raise PipelineError(f"no commit: {workspace / names.COMMIT_FILE} names none; run job1")
    data = workspace / names.DATA_DIR
    if names.dataset_source(data) is None:
        version = ""  # no dataset yet (the run downloads it): nothing to compare, so changed
    else:
        try:
            version = data_version.compute(data, increments, cache_dir=data).version
        except data_version.DataVersionError as err:
            raise PipelineError(f"{err}; nothing trained") from None
    return Request(commit, version, normal_args(train_args))


# ---------------------------------------------------------------- the retrain request


class NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is an answer, not followed: urllib would send the credentials on to wherever
    it points."""

    def redirect_request(self, *_args: Any, **_kwargs: Any) -> None:
        return None


def secret(env: Mapping[str, str], name: str) -> str:
    """A setting that goes into the request as it is: any character but a control character
    (a line break pasted with the token; tab is kept), said by name, never by value."""
    value = env.get(name, "")
    if not value or any(c != "\t" and (ord(c) < 0x20 or ord(c) == 0x7F) for c in value):
        raise PipelineError(f"{name} is empty or holds a control character (a line break?): "
                            "set it to the credential alone; no retrain requested")
    return value


def retrain_request(env: Mapping[str, str], data_version: str) -> urllib.request.Request:
    """The POST that starts job2 (buildWithParameters: it has parameters), built here and never
    on a command line: the parameters URL-encoded in the query, the user and its API token in the
    Authorization header, the only credential (Jenkins checks that the user may build job2)."""
    user = secret(env, "JENKINS_USER")
    if ":" in user:
        raise PipelineError("JENKINS_USER holds ':', which HTTP basic authentication cannot "
                            "carry: use the user's id; no retrain requested")
    force = env.get("FORCE") or "false"
    if force not in ("true", "false"):
        raise PipelineError(f"FORCE must be true or false, not {force[:20]!r}")
    query = urllib.parse.urlencode({"DATA_VERSION": data_version, "FORCE": force})
    job = urllib.parse.quote(env.get("CT_RETRAIN_JOB") or "job2", safe="")
    base = f"{(env.get('JENKINS_URL') or '').rstrip('/')}/job/{job}/buildWithParameters"
    if urllib.parse.urlsplit(base).scheme not in ("http", "https"):
        raise PipelineError(f"JENKINS_URL must be an http(s) URL, not {env.get('JENKINS_URL')!r}")
    pair = f"{user}:{secret(env, 'JENKINS_API_TOKEN')}".encode()
    return urllib.request.Request(f"{base}?{query}", data=b"", method="POST", headers={
        "Authorization": "Basic " + base64.b64encode(pair).decode()})


def retrain(env: Mapping[str, str], data_version: str) -> int:
    request = retrain_request(env, data_version)
    shown = request.full_url.split("?", 1)[0]
    try:
        with urllib.request.build_opener(NoRedirect).open(request, timeout=30) as answer:
            status = answer.status
    except urllib.error.HTTPError as err:
        status = err.code
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as err:
        cli.say(f"error: retrain: cannot reach {shown} ({getattr(err, 'reason', err)})")
        return 1
    if not 200 <= status < 300:
        cli.say(f"error: retrain: {shown} answered HTTP {status}")
        return 1
    cli.say(f"retrain requested: POST {shown} -> HTTP {status}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = cli.parser("ct.changes", __doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="has the code, the data or the flags changed?")
    check.add_argument("--commit", default="")
    check.add_argument("--increments", type=Path,
                       default=os.environ.get("CT_INCREMENTS_DIR") or None)
    check.add_argument("--train-args", default=os.environ.get("CT_TRAIN_ARGS", ""))
    check.add_argument("--force", action="store_true",
                       default=os.environ.get("FORCE", "") == "true")
    post = sub.add_parser("retrain", help="start job2 by its buildWithParameters URL (settings "
                          "from the environment: JENKINS_URL, JENKINS_USER, JENKINS_API_TOKEN, "
                          "CT_RETRAIN_JOB, FORCE)")
    post.add_argument("--data-version", required=True)
    args = parser.parse_args(argv)
    workspace = cli.workspace_or_exit(parser, args.workspace)

    def action() -> int:
        if args.command == "retrain":
            return retrain(os.environ, args.data_version)
        request = current(workspace, args.commit, args.increments, args.train_args)
        changed, why = decide(request, judged_runs(workspace), args.force)
        cli.say(why)
        print(f"{'changed' if changed else 'unchanged'} {request.data_version}")
        return 0

    return cli.run("ct.changes", action)


if __name__ == "__main__":
    raise SystemExit(main())
