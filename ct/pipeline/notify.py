"""Mail the pipeline's news (best model, tuning result, failure, a failed deploy). Standard
library only.

    python3 -m ct.pipeline.notify --workspace W [--event best-model|tuned|failed|deploy-failed]
                                  [--note TEXT] [--dry-run] [--outbox-only]

Settings come from the environment: SMTP_HOST, SMTP_PORT (25; 465 = implicit TLS),
SMTP_STARTTLS (true/false or 1/0), SMTP_USER, SMTP_PASSWORD, NOTIFY_FROM, NOTIFY_TO (comma list).
Without SMTP_HOST, or when sending fails, the message is kept in W/outbox/ as an .eml file.
Attached: metrics.json, best.json and the reported run's runs/<run id>/curves.png, when present.
The best-model and tuned mails compare the run per class with the model it replaced (or the best);
the deploy-failed mail (job7) says why, from this build's status/deploy.json and --note.
The transport (SMTP, the outbox) is ct.pipeline.mail_delivery's.
Exit 0 when mailed or kept for lack of a server, 1 when sending failed, 2 on bad input or a
file that cannot be read or written (one line on stderr naming it, starting `ct.notify:`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import Any

from ct import data_version, untrusted
from ct import workspace as names
from ct.pipeline import class_guard, cli, deploy_records, promote, records
from ct.pipeline.errors import PipelineError
from ct.pipeline.mail_delivery import NotifyError, SmtpSettings, deliver, short_commit

ATTACHMENTS = (names.METRICS_FILE, names.BEST_FILE)
MAX_JSON_ATTACHMENT = 1 << 20
MAX_PICTURE = 16 << 20  # curves.png is a few hundred kB
EVENTS = {
    "best-model": "the best model is being created",
    "tuned": "tuning finished",
    "failed": "the pipeline failed",
    "deploy-failed": "deploying the champion failed",
}
DEPLOY_HINT = ("The service keeps serving the model it served before. Fix the cause, then run "
               "job7 again (scripts/job7-deploy.sh); scripts/job7-deploy.sh rollback goes back "
               "one model.\n")
LENIENT = ("failed", "deploy-failed")  # events that mail even without a usable metrics.json


# ---------------------------------------------------------------- what the message says


@dataclass(frozen=True)
class Facts:
    """What the workspace tells about the run, read leniently where the event allows it."""

    event: str
    metrics: dict[str, Any] | None
    metrics_problem: str
    commit: str
    best: dict[str, Any] | None
    gate: dict[str, str]
    promotion: dict[str, str]
    note: str
    deploy: list[str]  # deploy-failed: what this job7 build's deploy said (status/deploy.json)


def read_facts(workspace: Path, event: str | None, note: str) -> Facts:
    try:
        metrics, problem = records.load_metrics(workspace), ""
    except PipelineError as err:
        if event not in LENIENT:
            raise NotifyError(str(err)) from None
        metrics, problem = None, str(err)
    try:
        best = promote.load_best(workspace)
    except PipelineError:
        best = None
    if event is None:
        event = "tuned" if metrics and metrics.get("mode") == "tune" else "best-model"
    deploying = event == "deploy-failed"  # about the champion, not the latest run
    champion = (best or {}).get("commit") if deploying else None
    if not isinstance(champion, str) or not re.fullmatch(records.COMMIT, champion):
        champion = None
    return Facts(
        event=event,
        metrics=metrics,
        metrics_problem="" if deploying else problem,
        commit=champion or names.commit_of_run(workspace, metrics),
        best=best,
        gate=records.read_properties(workspace / names.GATE_PROPERTIES),
        promotion=records.read_properties(workspace / names.PROMOTION_PROPERTIES),
        note=note,
        deploy=deploy_records.mail_lines(workspace) if deploying else [],
    )


def percent(value: Any) -> str:
    return f"{records.fmt_number(value)}%" if records.is_percentage(value) else "n/a"


def show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def subject(facts: Facts) -> str:
    at = short_commit(facts.commit)
    accuracy = percent(facts.metrics["accuracy"]) if facts.metrics else None
    if facts.event == "failed":
        tail = f": last accuracy {accuracy}" if accuracy else ""
        return f"[CT] {EVENTS['failed']} at {at}{tail}"
    if facts.event == "deploy-failed":
        why = facts.deploy[0].removeprefix("why:").strip() if facts.deploy else facts.note
        return f"[CT] {EVENTS['deploy-failed']} at {at}: {why[:150]}".rstrip(": ")
    return f"[CT] {EVENTS[facts.event]}: {accuracy} at {at}"


def threshold_line(gate_props: Mapping[str, str]) -> str:
    if "THRESHOLD" not in gate_props:
        return "threshold:           not checked (no gate.properties)"
    verdict = "passed" if gate_props.get("PASSED") == "true" else "below, tuning needed"
    return (
        f"threshold:           {gate_props['THRESHOLD']}% -> {verdict} "
        f"(gate saw {gate_props.get('ACCURACY', '?')}%)"
    )


def summary_lines(facts: Facts) -> list[str]:
    metrics = facts.metrics or {}
    lines = [
        f"accuracy:            {percent(metrics.get('accuracy'))}",
        f"validation accuracy: {percent(metrics.get('val_accuracy'))}",
        f"commit:              {facts.commit or 'unknown'}",
        f"data version:        {data_version.summary(metrics)}",
        threshold_line(facts.gate),
    ]
    if facts.promotion:
        promoted = "yes" if facts.promotion.get("PROMOTED") == "true" else "no"
        lines.append(f"promoted:            {promoted}")
    return lines + best_line(facts.best)


def best_line(best: Mapping[str, Any] | None) -> list[str]:
    if not best:
        return []
    return [f"best model:          {percent(best.get('accuracy'))} from run {best.get('run_id')}"
            f" at {short_commit(best.get('commit') or '')} ({names.BEST_MODEL})"]


def trial_counts(metrics: Mapping[str, Any]) -> str | None:
    """A tuning round's trials: "12 (9 finished, 3 pruned)"; older summaries: the plain count."""
    trials = metrics.get("trials")
    if trials is None or metrics.get("trials_finished") is None:
        return trials
    return (f"{trials} ({metrics['trials_finished']} finished, "
            f"{metrics.get('trials_pruned', 0)} pruned)")


def run_lines(metrics: Mapping[str, Any]) -> list[str]:
    facts = [
        ("run id", metrics.get("run_id")),
        ("mode", metrics.get("mode")),
        ("epochs", metrics.get("epochs")),
        ("trials", trial_counts(metrics)),
        ("study", metrics.get("study")),
        ("wall time (s)", metrics.get("wall_time_s")),
        ("images/s", metrics.get("images_per_s")),
        ("test loss", metrics.get("test_loss")),
        ("device", metrics.get("device")),
        ("torch", metrics.get("torch")),
        ("run dir", metrics.get("run_dir")),
        ("model", metrics.get("model")),
    ]
    return [f"  {name}: {show(value)}" for name, value in facts if value is not None]


def body(facts: Facts) -> str:
    lines = [f"{EVENTS[facts.event][0].upper()}{EVENTS[facts.event][1:]}.", ""]
    if facts.note:
        lines += [facts.note, ""]
    if facts.metrics_problem:
        lines += [f"No usable run summary: {facts.metrics_problem}", ""]
    if facts.event == "deploy-failed":
        return "\n".join([*lines, *facts.deploy, *best_line(facts.best), "", DEPLOY_HINT])
    lines += summary_lines(facts)
    if facts.metrics:
        lines += [] if facts.event == "failed" else class_lines(facts.metrics, facts.best or {})
        params = records.run_params(facts.metrics)
        lines += ["", "parameters:"] + [f"  {k} = {show(params[k])}" for k in sorted(params)]
        lines += ["", "run:", *run_lines(facts.metrics)]
    return "\n".join(lines) + "\n"


def class_lines(metrics: Mapping[str, Any], best: Mapping[str, Any]) -> list[str]:
    """Per class: the run's test accuracy against the model it replaced, else the best one."""
    replaced = best.get("run_id") == metrics.get("run_id")  # promotion made it the best
    champion = best.get("replaced") if replaced else best
    changes = class_guard.class_changes(metrics, champion)
    if changes is None:
        why = ("this run records no per-class accuracy" if class_guard.per_class(metrics) is None
               else "no earlier best" if not isinstance(champion, dict) or not champion
               else f"run {champion.get('run_id')} records none")
        return ["", f"per class: not compared ({why})"]
    rows = [f"  {c.name:<12} {c.now:6.2f}%  {c.before:6.2f}%  {c.change:+.2f}" for c in changes]
    worse = class_guard.worse_text(changes)
    who = "the model it replaced" if replaced else "the best model"
    return ["", f"per class: this run vs {who} (run {champion.get('run_id')}), points:", *rows,
            f"worse: {worse}" if worse else "no class got worse"]


def build_message(workspace: Path, facts: Facts, settings: SmtpSettings) -> EmailMessage:
    msg = EmailMessage()
    msg["Subject"] = subject(facts)
    msg["From"] = settings.sender
    if settings.recipients:
        msg["To"] = ", ".join(settings.recipients)
    msg["Date"] = formatdate(usegmt=True)
    msg["Message-ID"] = make_msgid(domain=settings.sender.rpartition("@")[2] or "localhost")
    msg.set_content(body(facts))
    for name in ATTACHMENTS:
        data = read_attachment(workspace, workspace / name, MAX_JSON_ATTACHMENT)
        if data is not None:
            msg.add_attachment(data, maintype="application", subtype="json", filename=name)
    curves = curves_of(workspace, facts.metrics)
    data = read_attachment(workspace, curves, MAX_PICTURE) if curves is not None else None
    if data is not None:
        msg.add_attachment(data, maintype="image", subtype="png", filename=names.RUN_CURVES)
    return msg


def curves_of(workspace: Path, metrics: Mapping[str, Any] | None) -> Path | None:
    """The reported run's training curves, runs/<run id>/curves.png (the run metrics.json names);
    None without a usable run id: nothing to attach."""
    run_id = (metrics or {}).get("run_id")
    if not isinstance(run_id, str) or not records.is_workspace_file(run_id) or "/" in run_id:
        return None
    return workspace / names.RUNS_DIR / run_id / names.RUN_CURVES


def read_attachment(workspace: Path, path: Path, limit: int) -> bytes | None:
    """The file's bytes, None when there is no such file. It is the container's: a symbolic
    link anywhere below W (runs/x/curves.png -> a host secret), a file that is not regular or
    one over `limit` is a NotifyError, and nothing is sent."""
    try:
        return untrusted.read_bytes(path, limit, root=workspace)
    except untrusted.Missing:
        return None
    except untrusted.UntrustedFile as err:
        raise NotifyError(f"cannot read {err.path} ({err.cause}); nothing sent; remove it or "
                          "rerun the run that writes it, then rerun") from None


# ---------------------------------------------------------------- where the message goes


# ---------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser("ct.notify", __doc__)
    parser.add_argument("--event", choices=sorted(EVENTS),
                        help="what happened (default: tuned for a tune run, else best-model)")
    parser.add_argument("--note", default="", help="a line to put at the top of the body")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the message instead of sending or keeping it")
    parser.add_argument("--outbox-only", action="store_true", help="keep the message in outbox/ "
                        "without mailing it (when Jenkins' email-ext mails)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    workspace = cli.workspace_or_exit(parser, args.workspace)

    def action() -> int:
        settings = SmtpSettings.from_env(os.environ)
        facts = read_facts(workspace, args.event, args.note)
        msg = build_message(workspace, facts, settings)
        if args.dry_run:
            print(msg.as_string())
            return 0
        return deliver(workspace, msg, facts.commit, settings, args.outbox_only)

    return cli.run("ct.notify", action)


if __name__ == "__main__":
    sys.exit(main())
