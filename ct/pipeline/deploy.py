"""Deploy the champion to the model service (job7), roll back, tidy models/. Standard library only.

    python3 -m ct.pipeline.deploy --workspace W deploy [--force] [--url URL] [--timeout S]
    python3 -m ct.pipeline.deploy --workspace W rollback [--url URL] [--timeout S]
    python3 -m ct.pipeline.deploy --workspace W status [--url URL]
    python3 -m ct.pipeline.deploy --workspace W prune
    python3 -m ct.pipeline.deploy --workspace W running [--wait S] [--url URL]
    python3 -m ct.pipeline.deploy --workspace W begin | local-pid | names

The service (`python -m ct.serving`, at --url, else CT_SERVE_URL, else
http://127.0.0.1:$CT_SERVE_PORT) serves what W/serving/wanted.json asks for, once the candidate
passed its smoke test; GET /model says what it serves and how the last request went.
- deploy: the champion is best.json's "export" (none: exit 2, "export first"). Already served:
  exit 0. Else wanted.json names it under a new request id, and the service's answer to that
  request decides: taken, serving/deployed.json records {current, previous, at}; refused (or no
  answer within --timeout), wanted.json goes back to the model served before and the exit is 1
  with the service's reason. A champion rolled back by hand is not deployed again (--force does).
- rollback: the same swap to deployed.json's previous model; current and previous trade places.
- prune: deletes models/champion-* files that neither best.json's export nor deployed.json's
  current/previous nor wanted.json names.
- running: exit 0 when the service answers GET /healthz (waiting up to --wait seconds), else 1.
- begin: job7's first call: forgets the last build's outcome (status/deploy.json).
  local-pid: prints the local runtime's service pid, when it runs for W (else exit 1).
  names: the files job7's scripts use (NAME=path lines, like `ct.workspace names`).
Every deploy or rollback writes its outcome to W/status/deploy.json, which job7's failure mail
reads (ct.pipeline.notify --event deploy-failed). Exit 2: bad input, one line.
"""

from __future__ import annotations

import argparse
import secrets
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from ct import workspace as names
from ct.pipeline import cli, serving_api
from ct.pipeline.deploy_records import (
    DEPLOYED,
    PID_FILE,
    RECORD,
    SHELL_NAMES,
    WANTED,
    Deployed,
    Model,
    champion,
    prune_models,
    read_deployed,
    read_json,
    save_outcome,
    stored_model,
    write,
)
from ct.pipeline.errors import PipelineError
from ct.pipeline.records import utc_now
from ct.pipeline.serving_api import BadAnswer, Served, ServiceDown, Swap

DEFAULT_TIMEOUT_S = 180.0  # loading, the smoke test (500 images + 50 timed calls) and the swap
POLL_S = 0.25


class DeployFailed(Exception):
    """The service did not take the model (exit 1); the text is its one-line reason. `serving`:
    what the service serves now (the model before), for the record."""

    def __init__(self, reason: str, target: Model | None = None, swap: Swap | None = None,
                 serving: str = "") -> None:
        super().__init__(reason)
        self.target, self.swap, self.serving = target, swap, serving


# ---------------------------------------------------------------- the swap


def new_request() -> str:
    return f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{secrets.token_hex(4)}"


def wanted(model: Model, request: str) -> dict[str, str]:
    return {"request": request, "model": model.model, "sha256": model.sha256}


def ask(workspace: Path, url: str, target: Model, before: Served, timeout: float) -> Swap:
    """Ask the service to serve `target` and wait for its answer to that request: the Swap when
    it took it. Otherwise wanted.json names the model served before again and DeployFailed
    says why."""
    for rel in (target.model, target.manifest):
        if not (workspace / rel).is_file() or (workspace / rel).is_symlink():
            raise PipelineError(f"{workspace / rel} is missing (or not a plain file); "
                                "export the champion again (scripts/job7-deploy.sh)")
    old = read_json(workspace / WANTED, "move it away, then rerun", workspace)
    request = new_request()
    write(workspace, WANTED, wanted(target, request))
    swap = None
    try:
        swap = wait_for(url, request, timeout)
        if not swap.ok:
            raise DeployFailed(f"the service refused {target.model}: "
                               f"{swap.reason or 'no reason given'}")
        now = serving_api.served(url)
        if now.sha256 != target.sha256:
            raise DeployFailed(f"the service took request {request} but serves "
                               f"{now.sha256 and now.sha256[:16]}, not {target.id}")
        return swap
    except (DeployFailed, ServiceDown, BadAnswer) as err:
        serving = put_back(workspace, before, old)
        raise DeployFailed(str(err), target, swap, serving) from None


def wait_for(url: str, request: str, timeout: float) -> Swap:
    """Poll GET /model until its swap answers `request`; DeployFailed after `timeout` s."""
    deadline, last = time.monotonic() + timeout, ""
    while True:
        try:
            swap = serving_api.served(url).swap
            if swap is not None and swap.request == request:
                return swap
        except ServiceDown as err:
            last = f"; last: {err}"  # a restart of the service: keep asking until the deadline
        if time.monotonic() >= deadline:
            raise DeployFailed(f"the service at {url} did not answer request {request} within "
                               f"{timeout:g} s{last} (is it this workspace's service?)")
        time.sleep(POLL_S)


def put_back(workspace: Path, before: Served, old: dict[str, Any] | None) -> str:
    """wanted.json names the model the service served before the request again (the same
    request as then, when it named that model), or nothing when none was served. Returns it."""
    if before.sha256 is None:
        (workspace / WANTED).unlink(missing_ok=True)
        return ""
    model = stored_model(workspace, before.sha256, read_deployed(workspace))
    if old is not None and old.get("sha256") == before.sha256:
        write(workspace, WANTED, old)
    elif model is not None:
        write(workspace, WANTED, wanted(model, new_request()))
    return model.model if model else before.sha256[:16]


def now_served(url: str, target: Model) -> Served:
    try:
        return serving_api.served(url)
    except (ServiceDown, BadAnswer) as err:
        raise DeployFailed(f"{err}; start it (scripts/job7-deploy.sh), then rerun",
                           target) from None


# ---------------------------------------------------------------- commands


def deploy(workspace: Path, url: str, timeout: float, force: bool = False) -> int:
    target = champion(workspace)
    if target is None:
        cli.say(f"no {names.BEST_FILE} yet: nothing to deploy")
        return 0
    known = read_deployed(workspace)
    before = now_served(url, target)
    if before.sha256 == target.sha256:
        if known.current is None or known.current.sha256 != target.sha256:
            write(workspace, DEPLOYED, replace(known, current=target, at=utc_now()).to_json())
        save_outcome(workspace, "deploy", "served", target, url, serving=target.model)
        print(f"the service at {url} serves the champion {target.describe()} already")
        return 0
    if known.rolled_back == target.sha256 and not force:
        save_outcome(workspace, "deploy", "held", target, url,
                     serving=(before.sha256 or "")[:16])
        print(f"the champion {target.model} was rolled back by hand ({known.at}): not deployed "
              "again; deploy --force deploys it")
        return 0
    swap = ask(workspace, url, target, before, timeout)
    previous = stored_model(workspace, before.sha256, known) if before.sha256 else None
    write(workspace, DEPLOYED, Deployed(target, previous, utc_now()).to_json())
    save_outcome(workspace, "deploy", "deployed", target, url, swap=swap, serving=target.model)
    was = f"; before: {previous.model}" if previous else ""
    print(f"deployed {target.describe()} at {url}: {serving_api.smoke_text(swap.smoke)}{was}")
    return 0


def rollback(workspace: Path, url: str, timeout: float) -> int:
    known = read_deployed(workspace)
    if known.previous is None:
        raise PipelineError(f"{workspace / DEPLOYED} names no previous model: nothing to roll "
                            "back to")
    target = known.previous
    before = now_served(url, target)
    swap = None
    if before.sha256 != target.sha256:
        swap = ask(workspace, url, target, before, timeout)
    moved_from = known.current.sha256 if known.current else ""
    write(workspace, DEPLOYED, Deployed(target, known.current, utc_now(), moved_from).to_json())
    save_outcome(workspace, "rollback", "deployed", target, url, swap=swap, serving=target.model)
    smoke = f": {serving_api.smoke_text(swap.smoke)}" if swap else " (it served it already)"
    print(f"rolled back to {target.describe()} at {url}{smoke}; deploy --force brings "
          f"{known.current.model if known.current else 'the champion'} back")
    return 0


def status(workspace: Path, url: str) -> int:
    known = read_deployed(workspace)
    try:
        best = champion(workspace)
        best_text = best.describe() if best else f"none (no {names.BEST_FILE})"
    except PipelineError as err:
        best_text = str(err)
    try:
        now = serving_api.served(url)
        serves = now.sha256[:16] if now.sha256 else "no model"
        last = now.swap and (f"request {now.swap.request}: {'ok' if now.swap.ok else 'refused'}"
                             f" {now.swap.reason}".rstrip())
        service = f"{serves}; last swap: {last or 'none'}"
    except (ServiceDown, BadAnswer) as err:
        service = str(err)
    for name, value in (("service", f"{url}: {service}"), ("champion", best_text),
                        ("current", known.current and known.current.describe()),
                        ("previous", known.previous and known.previous.describe()),
                        ("deployed at", known.at)):
        print(f"{name + ':':<13}{value or 'none'}")
    return 0


def prune(workspace: Path) -> int:
    gone, freed, kept = prune_models(workspace)
    print(f"pruned {len(gone)} file(s) ({freed / 1e6:.1f} MB) from "
          f"{workspace / names.MODELS_DIR}; kept the champion files of "
          f"{', '.join(sorted(kept)) or 'none'}")
    return 0


def running(url: str, wait: float) -> int:
    deadline = time.monotonic() + wait
    while not serving_api.answers(url):
        if time.monotonic() >= deadline:
            cli.say(f"the service at {url} does not answer GET /healthz")
            return 1
        time.sleep(POLL_S)
    return 0


def begin(workspace: Path) -> int:
    """job7's first call: the mail of this build must never tell an earlier build's outcome."""
    (workspace / RECORD).unlink(missing_ok=True)
    return 0


def local_pid(workspace: Path) -> int:
    pid = serving_api.local_pid(workspace / PID_FILE, workspace)
    if pid is None:
        return 1
    print(pid)
    return 0


# ---------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser("ct.deploy", __doc__)
    parser.add_argument("command", choices=("deploy", "rollback", "status", "prune", "running",
                                            "begin", "local-pid", "names"))
    parser.add_argument("--url", help="the service (default: $CT_SERVE_URL, else "
                        "http://127.0.0.1:$CT_SERVE_PORT)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                        help="seconds to wait for the service's answer (deploy, rollback)")
    parser.add_argument("--wait", type=float, default=0.0, help="running: seconds to wait")
    parser.add_argument("--force", action="store_true",
                        help="deploy: also a champion that was rolled back by hand")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "names":
        print("\n".join(f"{key}={value}" for key, value in SHELL_NAMES.items()))
        return 0
    workspace = cli.workspace_or_exit(parser, args.workspace)

    def action() -> int:
        if not 0 < args.timeout <= 3600 or not 0 <= args.wait <= 3600:
            raise PipelineError("--timeout and --wait take seconds, up to 3600")
        try:
            url = serving_api.service_url(args.url)
        except ValueError as err:
            raise PipelineError(str(err)) from None
        commands = {
            "deploy": lambda: deploy(workspace, url, args.timeout, args.force),
            "rollback": lambda: rollback(workspace, url, args.timeout),
            "status": lambda: status(workspace, url), "prune": lambda: prune(workspace),
            "running": lambda: running(url, args.wait), "begin": lambda: begin(workspace),
            "local-pid": lambda: local_pid(workspace)}
        try:
            return commands[args.command]()
        except DeployFailed as err:
            save_outcome(workspace, args.command, "failed", err.target, url, str(err), err.swap,
                         err.serving)
            print(f"ct.deploy: {err}", file=sys.stderr, flush=True)
            return 1

    return cli.run("ct.deploy", action)


if __name__ == "__main__":
    sys.exit(main())
