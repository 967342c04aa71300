"""Pictures of a run, drawn from what the run records (epochs.jsonl, trials.jsonl):

- `curves.png` in every run folder (tuning trials too): loss, training and evaluation accuracy
  (the per-epoch glance at the evaluation set, see ct.trainer.run._glance) and learning rate per
  epoch, and the tested accuracy once the run is tested; redrawn after every checkpoint and once
  more after the test.
- `confusion.png` in every tested run folder: the confusion matrix of the final test (rows: true
  class, columns: predicted), each cell's count written in it and shaded by its share of the row;
  the per-class accuracies are the diagonal's shares. Drawn once, after the test.
- `trials.png` in a tuning run's folder: every trial's validation accuracy per epoch (its
  epochs.jsonl) ending in a dot at its final validation accuracy (trials.jsonl); trials that were
  pruned, cut by the budget or lost are faded, the best is highlighted; redrawn after every trial.

matplotlib is optional: without it (a base image that lacks it) one line is logged, once, and no
picture is drawn. A picture never fails a run: any error drawing one is logged (once) and
training goes on. The figures are drawn with matplotlib's object API on the Agg canvas (no pyplot
state, no GUI), one figure per kind reused for the whole process, at a small resolution; drawing
touches no random number generator, so it cannot change what a resumed run computes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ct import atomic
from ct import workspace as names

DPI = 72
CURVES_SIZE = (10.0, 3.0)  # inches: three panels side by side, 720 x 216 pixels
TRIALS_SIZE = (7.0, 4.0)
CONFUSION_SIZE = (6.5, 5.5)  # 468 x 396 pixels: ten class names down the side and along the foot
# The run folder's confusion-matrix picture. ct.pipeline.report_inputs names the same file (the
# host side imports nothing of the trainer's); tests/test_per_class.py checks that they agree.
CONFUSION = "confusion.png"

LogLine = Callable[[str], None]

_figure_class: Any = None  # matplotlib's Figure once imported; False when it cannot be
_figures: dict[str, Any] = {}  # kind -> the process's reused figure
_failed: set[str] = set()  # kinds whose drawing failed once already (logged once)


def available(log: LogLine) -> bool:
    """Whether matplotlib imports; the first time it does not, one line says so."""
    global _figure_class
    if _figure_class is None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            from matplotlib.figure import Figure
        except Exception as exc:  # missing or broken: either way, no pictures
            _figure_class = False
            log(f"no {names.RUN_CURVES}/{names.RUN_TRIALS_PLOT}/{CONFUSION}: matplotlib does "
                f"not import ({exc.__class__.__name__}: {exc}); training goes on without pictures")
        else:
            _figure_class = Figure
    return _figure_class is not False


def _figure(kind: str, size: tuple[float, float], panels: int, **margins: float
            ) -> tuple[Any, list[Any]]:
    """The process's figure for `kind`, its panels cleared for a new drawing. Fixed margins:
    matplotlib's automatic layouts would double the cost of a drawing."""
    if kind not in _figures:
        fig = _figure_class(figsize=size, dpi=DPI)
        fig.subplots_adjust(**margins)
        fig.subplots(1, panels, squeeze=False)
        _figures[kind] = fig
    fig = _figures[kind]
    for ax in fig.axes:
        ax.clear()
    return fig, list(fig.axes)


def _save(fig: Any, path: Path) -> None:
    atomic.write_via(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))


def _safely(kind: str, log: LogLine, draw: Callable[[], None]) -> bool:
    if not available(log):
        return False
    try:
        draw()
    except Exception as exc:  # a picture must never fail a run
        if kind not in _failed:
            _failed.add(kind)
            log(f"could not draw {kind} ({exc.__class__.__name__}: {exc}); training goes on")
        return False
    return True


def draw_curves(run_dir: Path, history: Sequence[dict[str, Any]], log: LogLine,
                evaluation: tuple[str, float] | None = None) -> bool:
    """run_dir/curves.png from epochs.jsonl's rows; `evaluation` is (name, accuracy) once the
    run is tested. True when the picture was written."""
    return _safely(names.RUN_CURVES, log,
                   lambda: _draw_curves(run_dir / names.RUN_CURVES, history, evaluation,
                                        run_dir.name))


def _draw_curves(path: Path, history: Sequence[dict[str, Any]],
                 evaluation: tuple[str, float] | None, title: str) -> None:
    fig, (loss_ax, acc_ax, lr_ax) = _figure("curves", CURVES_SIZE, 3, left=0.06, right=0.98,
                                            bottom=0.16, top=0.82, wspace=0.25)
    epochs = [row["epoch"] for row in history]
    loss_ax.plot(epochs, [row["loss"] for row in history], marker=".", color="tab:red")
    loss_ax.set(title="training loss", xlabel="epoch")
    acc_ax.plot(epochs, [row["train_accuracy"] for row in history], marker=".",
                color="tab:blue", label="training (augmented batches)")
    evals = [(row["epoch"], row["eval_accuracy"]) for row in history if "eval_accuracy" in row]
    if evals:  # rows written before the per-epoch glance existed have none
        acc_ax.plot(*zip(*evals, strict=True), marker=".", color="tab:green",
                    label="evaluation (glance)")
    if evaluation is not None and epochs:
        name, accuracy = evaluation
        acc_ax.plot([epochs[-1]], [accuracy], marker="*", markersize=12, linestyle="none",
                    color="tab:green", label=f"{name} {accuracy:.2f}%")
    acc_ax.set(title="accuracy (%)", xlabel="epoch")
    acc_ax.legend(loc="lower right", fontsize="small")
    lr_ax.plot(epochs, [row["lr"] for row in history], marker=".", color="tab:purple")
    lr_ax.set(title="learning rate (end of epoch)", xlabel="epoch")
    for ax in (loss_ax, acc_ax, lr_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
        if epochs:
            ax.set_xlim(0.5, max(epochs) + 0.5)
    fig.suptitle(title, fontsize="medium")
    _save(fig, path)


# How a trial that is not "done" ended, in the legend of trials.png (trials.jsonl's status).
ENDINGS = {"stopped": "stopped (budget)", "pruned": "pruned (fell behind)",
           "failed": "failed (worker lost; retried)", "running": "running"}


def draw_trials(run_dir: Path, rows: Sequence[dict[str, Any]], folder_of: Callable[[int], Path],
                log: LogLine) -> bool:
    """run_dir/trials.png from trials.jsonl's rows and each trial's epochs.jsonl, in the folder
    `folder_of(trial number)`."""
    return _safely(names.RUN_TRIALS_PLOT, log, lambda: _draw_trials(run_dir, rows, folder_of))


def _epochs_of(trial_folder: Path) -> list[dict[str, Any]]:
    try:
        text = (trial_folder / names.RUN_EPOCHS).read_text(encoding="utf-8")
    except OSError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _draw_trials(run_dir: Path, rows: Sequence[dict[str, Any]],
                 folder_of: Callable[[int], Path]) -> None:
    fig, (ax,) = _figure("trials", TRIALS_SIZE, 1, left=0.1, right=0.97, bottom=0.12, top=0.87)
    done = [r for r in rows if r.get("status") == "done" and r.get("val_accuracy") is not None]
    best = max(done, key=lambda r: r["val_accuracy"])["trial"] if done else None
    for row in rows:
        history = _epochs_of(folder_of(row["trial"]))
        epochs = [h["epoch"] for h in history]
        # the validation glance per epoch; older rows only have the training accuracy
        key = "eval_accuracy" if all("eval_accuracy" in h for h in history) else "train_accuracy"
        accuracy = [h[key] for h in history]
        optimizer = row.get("params", {}).get("optimizer", "?")
        name = f"trial-{row['trial']:03d} {optimizer}"
        if row.get("status") != "done":
            style = {"alpha": 0.3, "linestyle": "--", "linewidth": 1, "zorder": 1}
            label = f"{name}: {ENDINGS.get(row.get('status', ''), row.get('status'))}"
        else:
            highlight = row["trial"] == best
            style = ({"color": "black", "linewidth": 2.5, "zorder": 3} if highlight
                     else {"alpha": 0.8, "linewidth": 1.2, "zorder": 2})
            label = (f"{name}: validation "
                     f"{row['val_accuracy']:.2f}%" + (" (best)" if highlight else ""))
        (line,) = ax.plot(epochs, accuracy, marker=".", label=label, **style)
        if row.get("status") == "done" and epochs:
            ax.plot([epochs[-1]], [row["val_accuracy"]], marker="o", markersize=8,
                    linestyle="none", color=line.get_color(), alpha=style.get("alpha", 1.0),
                    zorder=4)
    ax.set(title=f"{run_dir.name}\nvalidation accuracy per epoch (line), final validation (dot)",
           xlabel="epoch", ylabel="accuracy (%)")
    ax.title.set_fontsize("medium")
    ax.grid(alpha=0.3)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(loc="lower right", fontsize="small")
    _save(fig, run_dir / names.RUN_TRIALS_PLOT)


def draw_confusion(run_dir: Path, classes: Sequence[str], matrix: Sequence[Sequence[int]],
                   evaluation: str, log: LogLine) -> bool:
    """run_dir/confusion.png from the test's confusion matrix (rows: true class, columns:
    predicted, in `classes`' order); `evaluation` names the set tested ("test", "validation")."""
    return _safely(CONFUSION, log, lambda: _draw_confusion(
        run_dir / CONFUSION, list(classes), [list(row) for row in matrix], evaluation,
        run_dir.name))


def _draw_confusion(path: Path, classes: list[str], matrix: list[list[int]], evaluation: str,
                    title: str) -> None:
    fig, (ax,) = _figure("confusion", CONFUSION_SIZE, 1, left=0.2, right=0.98, bottom=0.22,
                         top=0.9)
    # Shaded by the share of the true class's images, so that a class with fewer test images
    # reads like the others; the count is written in each cell.
    shares = [[cell / max(1, sum(row)) for cell in row] for row in matrix]
    ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto")
    for i, row in enumerate(matrix):
        for j, cell in enumerate(row):
            if cell:
                ax.text(j, i, str(cell), ha="center", va="center", fontsize="x-small",
                        color="white" if shares[i][j] > 0.5 else "black")
    ticks = range(len(classes))
    ax.set_xticks(ticks, classes, rotation=45, ha="right", fontsize="small")
    ax.set_yticks(ticks, classes, fontsize="small")
    total = sum(map(sum, matrix))
    right = sum(matrix[i][i] for i in range(len(matrix)))
    ax.set(xlabel="predicted class", ylabel="true class")
    ax.set_title(f"{title}\n{evaluation}: {right} of {total} right "
                 f"({100.0 * right / max(1, total):.2f}%)", fontsize="medium")
    _save(fig, path)
