"""The pipeline's report: one static HTML page. Standard library only.

    python3 -m ct.pipeline.report --workspace W [--runs N]

Writes W/report/index.html atomically (a reader sees the old page or the new one): the best model
(best.json and its lineage), the accuracy over commits with the threshold (an inline SVG chart of
accuracy-history.csv), the test accuracy per class of the best model and the latest run (an
inline SVG chart of grouped bars) with the latest run's confusion matrix (its confusion.png,
copied to report/confusion.png: Jenkins publishes report/** but no run's confusion.png), the
newest N runs (default 50) with their training curves
(<img src="../runs/<id>/curves.png">), the tuning rounds (trials, best parameters, trials.png)
and job6's restarts (status/train.properties, status/tune.properties). No JavaScript, no server:
it opens from disk, and Jenkins' HTML Publisher shows it as "CT report" (job4, job5). Jenkins
serves it under a Content-Security-Policy that allows no inline styles, so its styles come from
report.css, written beside it in the same change.

Input is read leniently: a run whose metrics.json is missing or damaged is listed as unreadable,
with the reason, and the page is still written. Exit 0 when written; 2 (one line on stderr) for
a workspace that is not a folder or a page that cannot be written.
"""

from __future__ import annotations

import html
import json
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any
from urllib.parse import quote

from ct import atomic, data_version, untrusted
from ct import workspace as names
from ct.pipeline import class_guard, cli, lineage, records, report_chart
from ct.pipeline.errors import PipelineError
from ct.pipeline.report_inputs import ReportInputs, Run, collect, number

DEFAULT_RUNS = 50
MAX_TUNE_ROUNDS = 20
MAX_CHART_POINTS = 500
STYLESHEET = "report.css"  # ct/pipeline/report.css, copied to report/ beside index.html
CONFUSION = "confusion.png"  # the latest run's confusion matrix, copied beside index.html
BEST_COLOUR, LATEST_COLOUR = "#bf8700", report_chart.ACCURACY_COLOUR  # the per-class bars


class ReportError(PipelineError):
    """The report cannot be made; its text is the one line printed on stderr (exit 2)."""


# ---------------------------------------------------------------- HTML pieces


def esc(value: Any) -> str:
    if value is None or value == "":
        return '<span class="na">n/a</span>'
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return html.escape(text)


def pct(value: Any) -> str:
    return f"{records.fmt_number(value)}%" if records.is_percentage(value) else esc(None)


def short(sha: Any, n: int = 12) -> str:
    if not isinstance(sha, str) or not sha:
        return esc(None)
    return f'<code title="{html.escape(sha)}">{html.escape(sha[:n])}</code>'


def rel_url(*parts: str) -> str:
    """A relative URL from report/index.html to a workspace file."""
    return "../" + "/".join(quote(p) for p in parts)


def params_text(params: Any) -> str:
    if not isinstance(params, dict) or not params:
        return esc(None)
    return ", ".join(f"{html.escape(str(k))}={esc(params[k])}" for k in sorted(params))


def seconds(value: Any) -> str:
    total = number(value)
    if total is None:
        return esc(None)
    minutes, secs = divmod(total, 60)
    return f"{int(minutes)} min {secs:.0f} s" if minutes else f"{secs:.1f} s"


def dl(rows: Sequence[tuple[str, str]]) -> str:
    return "<dl>" + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in rows) + "</dl>"


def best_card(inputs: ReportInputs) -> str:
    if inputs.best is None:
        problem = inputs.best_problem
        why = f"best.json is unreadable: {html.escape(problem)}" if problem \
            else "no model has been promoted yet (no best.json)"
        return f'<section id="best" class="card"><h2>Best model</h2><p>{why}</p></section>'
    best = inputs.best
    run_id = best.get("run_id")
    source = next((r for r in inputs.runs if r.run_id == run_id and r.metrics), None)
    summary = source.metrics if source else None

    def pick(name: str) -> Any:
        return lineage.field(best, name) or lineage.field(summary, name)

    image = pick("image")
    rows = [
        ("accuracy", f'<b class="big">{pct(best.get("accuracy"))}</b>'
                     + (f" (validation {pct(best['val_accuracy'])})"
                        if best.get("val_accuracy") is not None else "")),
        ("commit", short(pick("commit"), 40)),
        ("parameters", params_text(best.get("params"))),
        ("data sha256", short(pick("dataset_sha256"), 64)),
        ("data version", esc(data_version.summary({"data_version": pick("data_version"),
                                                   "data": pick("data")}))),
        ("torch", esc(pick("torch"))),
        ("device", esc(pick("device"))),
        ("image", esc(image)),
        ("model sha256", short(best.get("model_sha256"), 64)),
        ("model file", esc(best.get("model"))),
        ("promoted", f"{esc(best.get('promoted_at'))} from run {esc(run_id)} "
                     f"({esc(best.get('mode'))})"),
    ]
    lineage_note = "" if isinstance(best.get(names.LINEAGE), dict) else \
        '<p class="note">best.json carries no lineage (promoted before lineage was recorded)</p>'
    curves = ""
    if source is not None and source.has_curves:
        curves = (f'<img class="curves" alt="training curves of {html.escape(str(run_id))}" '
                  f'src="{rel_url(names.RUNS_DIR, source.run_id, names.RUN_CURVES)}">')
    return (f'<section id="best" class="card"><h2>Best model</h2>{dl(rows)}{lineage_note}'
            f"{curves}</section>")


def chart_points(rows: list[dict[str, str]]) -> list[report_chart.Point]:
    """The newest MAX_CHART_POINTS rows of accuracy-history.csv, as the chart's points."""
    points = []
    for row in rows[-MAX_CHART_POINTS:]:
        acc, thr = number(row.get("accuracy")) or 0.0, number(row.get("threshold"))
        commit = (row.get("commit") or "")[:7] or "?"
        tip = (f"{acc:g}% at {commit}, build {row.get('build') or '?'}, "
               f"{row.get('time') or ''}, threshold {'' if thr is None else f'{thr:g}%'}")
        passed = row.get("passed") == "true" or (thr is not None and acc >= thr)
        points.append(report_chart.Point(acc, thr, passed, commit, tip))
    return points


def history_section(inputs: ReportInputs) -> str:
    problem = inputs.history_problem
    note = f'<p class="note">{html.escape(problem)}</p>' if problem else ""
    points = chart_points(inputs.history)
    return (f'<section id="history"><h2>Accuracy over commits</h2><p>{len(points)} judged run(s) '
            f'from {html.escape(names.HISTORY_FILE)}; the red line is the threshold.</p>'
            f"{note}{report_chart.history_chart(points)}</section>")


def class_models(inputs: ReportInputs) -> tuple[Any, str, str]:
    """The model the latest run is set against in the per-class view: (its record, its name in
    the legend, a sentence naming both). That is the best model; when the latest run is the
    best, the model it replaced (best.json's `replaced`)."""
    best, latest = inputs.best or {}, inputs.latest or {}
    label = f"the latest run ({esc(latest.get('run_id'))})"
    if best and best.get("run_id") == latest.get("run_id"):
        baseline = best["replaced"] if isinstance(best.get("replaced"), dict) else {}
        return baseline, "replaced model", (
            f"{label}, now the best model, and the model it replaced "
            + (f"({esc(baseline.get('run_id'))})" if baseline else "(none recorded)"))
    return best, "best model", f"the best model ({esc(best.get('run_id'))}) and {label}"


def per_class_section(inputs: ReportInputs, confusion: bool) -> str:
    """The per-class chart, the classes that got worse, and the latest run's confusion matrix
    (`confusion`: report/confusion.png is written with the page)."""
    baseline, name, said = class_models(inputs)
    models = ((name, class_guard.per_class(baseline), "best", BEST_COLOUR),
              ("latest run", class_guard.per_class(inputs.latest), "latest", LATEST_COLOUR))
    series = [report_chart.Series(*model) for model in models if model[1]]
    parts = ['<section id="per-class"><h2>Per class</h2>']
    if len(series) == 1:
        lacking = models[0][0] if series[0].kind == "latest" else "latest run"
        parts.append(f'<p class="note">the {lacking} records no test accuracy per class</p>')
    if not series:
        parts.append(f"<p>No test accuracy per class recorded for {said} (runs record it since "
                     "the per-class view; tuning rounds do not).</p>")
    else:
        # label order: the latest run's classes, then any only the other model has
        named = (inputs.latest or {}).get("classes")
        shown = [c for one in series for c in one.values]
        classes = list(dict.fromkeys([*(c for c in (named if isinstance(named, list) else [])
                                        if isinstance(c, str) and c in shown), *shown]))
        changes = class_guard.class_changes(inputs.latest, baseline)
        worse = class_guard.worse_text(changes) if changes else ""
        verdict = "" if changes is None else \
            f" Worse: {html.escape(worse)}." if worse else " No class got worse."
        parts.append(f"<p>Test accuracy per class: {said}; hover a bar for its value."
                     f"{verdict}</p>{report_chart.per_class_chart(classes, series)}")
    if inputs.confusion_problem:
        parts.append(f'<p class="note">{html.escape(inputs.confusion_problem)}</p>')
    if confusion:
        run_id = html.escape(str((inputs.latest or {}).get("run_id")))
        parts.append(f"<p>Confusion matrix of the latest run ({run_id}): rows are the true "
                     f'classes, columns the predicted ones.</p><a href="{CONFUSION}"><img '
                     f'class="confusion" alt="confusion matrix of {run_id}" src="{CONFUSION}">'
                     "</a>")
    return "".join(parts) + "</section>"


def run_row(run: Run) -> str:
    rid = html.escape(run.run_id)
    if run.metrics is None:
        return (f'<tr class="run unreadable" id="run-{rid}"><td><code>{rid}</code></td>'
                f"<td>{html.escape(run.mode)}</td><td colspan=\"4\"><b>unreadable</b>: "
                f"{html.escape(run.problem)}</td><td>{curves_cell(run)}</td></tr>")
    m = run.metrics
    resumes = m.get("resumes")
    wall = seconds(m.get("wall_time_s")) + (f" ({esc(resumes)} resume(s))" if resumes else "")
    return (f'<tr class="run" id="run-{rid}"><td><code>{rid}</code></td>'
            f"<td>{esc(run.mode)}</td><td class=\"num\">{pct(m.get('accuracy'))}</td>"
            f"<td>{short(m.get('commit'), 7)}</td><td>{wall}</td>"
            f"<td>{esc(m.get('finished_at'))}</td><td>{curves_cell(run)}</td></tr>")


def curves_cell(run: Run) -> str:
    if not run.has_curves:
        return esc(None)
    src = rel_url(names.RUNS_DIR, run.run_id, names.RUN_CURVES)
    return (f'<a href="{src}"><img class="curves" alt="training curves of '
            f'{html.escape(run.run_id)}" src="{src}"></a>')


def runs_section(inputs: ReportInputs, limit: int) -> str:
    shown = inputs.runs[:limit]
    unreadable = sum(1 for r in inputs.runs if r.metrics is None)
    more = len(inputs.runs) - len(shown)
    head = (f"<p>{len(inputs.runs)} run(s) in {names.RUNS_DIR}/, newest first"
            + (f"; the {more} oldest are not shown" if more > 0 else "")
            + (f"; {unreadable} unreadable" if unreadable else "") + ".</p>")
    if not shown:
        return f'<section id="runs"><h2>Recent runs</h2>{head}</section>'
    return (f'<section id="runs"><h2>Recent runs</h2>{head}<table id="runs-table"><thead><tr>'
            "<th>run</th><th>mode</th><th>accuracy</th><th>commit</th><th>wall time</th>"
            "<th>finished</th><th>curves</th></tr></thead><tbody>"
            + "".join(run_row(r) for r in shown) + "</tbody></table></section>")


def tuning_section(inputs: ReportInputs) -> str:
    rounds = [r for r in inputs.runs if r.mode == "tune"][:MAX_TUNE_ROUNDS]
    if not rounds:
        return '<section id="tuning"><h2>Tuning rounds</h2><p>no tuning runs.</p></section>'
    rows = []
    for run in rounds:
        m = run.metrics or {}
        if run.metrics is None:
            detail = f"<td colspan=\"4\"><b>unreadable</b>: {html.escape(run.problem)}</td>"
        else:
            planned = m.get("trials_planned")
            trials = esc(m.get("trials")) + (f" of {esc(planned)}" if planned else "")
            if m.get("trials_finished") is not None:
                trials += (f" ({esc(m['trials_finished'])} finished, "
                           f"{esc(m.get('trials_pruned', 0))} pruned)")
            if m.get("study"):
                trials += f"<br>study <code>{esc(m['study'])}</code>"
            detail = (f"<td>{trials}</td><td>{params_text(m.get('best_params'))}</td>"
                      f"<td class=\"num\">{pct(m.get('accuracy'))} "
                      f"(val {pct(m.get('val_accuracy'))})</td>"
                      f"<td>{short(m.get('commit'), 7)}</td>")
        plot = esc(None)
        if run.has_trials_plot:
            src = rel_url(names.RUNS_DIR, run.run_id, names.RUN_TRIALS_PLOT)
            plot = (f'<a href="{src}"><img class="trials" alt="trials of '
                    f'{html.escape(run.run_id)}" src="{src}"></a>')
        rows.append(f'<tr class="tune-round"><td><code>{html.escape(run.run_id)}</code></td>'
                    f"{detail}<td>{plot}</td></tr>")
    return ('<section id="tuning"><h2>Tuning rounds</h2><table><thead><tr><th>run</th>'
            "<th>trials</th><th>best parameters</th><th>test accuracy</th><th>commit</th>"
            "<th>trials plot</th></tr></thead><tbody>" + "".join(rows)
            + "</tbody></table></section>")


def restarts_section(inputs: ReportInputs) -> str:
    if not inputs.status:
        return ('<section id="restarts"><h2>Restarts (job6)</h2><p>no training or tuning '
                "process recorded yet (status/*.properties).</p></section>")
    keys = ("RESTARTS", "STATUS", "EXIT_CODE", "GAVE_UP")
    rows = "".join(
        f'<tr class="status-{html.escape(role)}"><td>{html.escape(role)}</td>'
        + "".join(f"<td>{esc(props.get(k))}</td>" for k in keys) + "</tr>"
        for role, props in inputs.status.items())
    return ('<section id="restarts"><h2>Restarts (job6)</h2><table><thead><tr><th>process</th>'
            + "".join(f"<th>{k}</th>" for k in keys) + f"</tr></thead><tbody>{rows}</tbody>"
            "</table></section>")


PAGE = Template("""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>CT report: CIFAR-10 continuous training</title>
<link rel="stylesheet" href="$stylesheet">
</head>
<body>
<h1>CIFAR-10 continuous training</h1>
<p>Workspace <code>$workspace</code>, report written $written by
<code>python3 -m ct.pipeline.report</code>.</p>
$best
$history
$per_class
$runs
$tuning
$restarts
<footer>Static page: no JavaScript; styles in $stylesheet beside it; pictures read from
../runs/ next to this folder.</footer>
</body>
</html>
""")


def render(inputs: ReportInputs, limit: int = DEFAULT_RUNS) -> str:
    """The page; it shows report/confusion.png when `inputs` carry its bytes (write_report
    writes them beside the page, in the same change)."""
    return PAGE.substitute(
        stylesheet=STYLESHEET, workspace=html.escape(str(inputs.root)),
        written=html.escape(records.utc_now()),
        best=best_card(inputs), history=history_section(inputs),
        per_class=per_class_section(inputs, inputs.confusion is not None),
        runs=runs_section(inputs, limit), tuning=tuning_section(inputs),
        restarts=restarts_section(inputs),
    )


def stylesheet() -> bytes:
    """The page's CSS, kept as a file of this package (one copy, written beside each page)."""
    try:
        return resources.files(__package__).joinpath(STYLESHEET).read_bytes()
    except OSError as err:
        raise ReportError(f"cannot read the report's style sheet {STYLESHEET} in {__package__} "
                          f"({err.strerror or err}); restore it from the repository") from None


def write_report(root: Path, limit: int = DEFAULT_RUNS) -> Path:
    inputs = collect(root)
    page = render(inputs, limit)
    try:  # report/ a link would have the page (and the picture) written outside the workspace
        untrusted.real_folder(root, names.REPORT_DIR, create=True)
    except untrusted.UntrustedFile as err:
        raise ReportError(f"cannot write {err.path} ({err.cause}); move {err.path} away, "
                          "then rerun") from None
    target = root / names.REPORT_INDEX
    # One change, the style sheet (and picture) first: a reader never gets a page without them.
    files = {target.with_name(STYLESHEET): stylesheet(), target: page.encode("utf-8")}
    if inputs.confusion is not None:
        files = {target.with_name(CONFUSION): inputs.confusion, **files}
    try:
        atomic.write_files(files)
    except atomic.WriteError as err:
        raise ReportError(
            f"cannot write {err.target} ({err.reason}); make {root / names.REPORT_DIR} writable "
            "for this user (or move what is in the way), then rerun") from None
    return target


# ---------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    parser = cli.parser("ct.report", __doc__)
    parser.add_argument("--runs", type=int, default=DEFAULT_RUNS,
                        help=f"how many of the newest runs to list (default {DEFAULT_RUNS})")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    workspace = cli.workspace_or_exit(parser, args.workspace)

    def action() -> int:
        print(f"ct.report: wrote {write_report(workspace, args.runs)}")
        return 0

    return cli.run("ct.report", action)


if __name__ == "__main__":
    sys.exit(main())
