"""The pictures of a run: curves.png every epoch, trials.png after every trial, and training that
goes on without them when matplotlib is missing or a drawing fails."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from ct.trainer import plots
from tests.conftest import REPO
from tests.train_cli import run

PNG = b"\x89PNG\r\n\x1a\n"
SMALL = ["--epochs", "3", "--batch-size", "64", "--subset", "300"]


def is_png(path: Path) -> bool:
    data = path.read_bytes()
    return len(data) > 1000 and data.startswith(PNG)


def test_curves_png_is_redrawn_after_every_epoch_and_the_test(
        tmp_path: Path, tiny_cifar_root: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    pictures: list[bytes] = []
    draw = plots.draw_curves

    def recording(run_dir: Path, *args, **kwargs) -> bool:
        written = draw(run_dir, *args, **kwargs)
        pictures.append((run_dir / "curves.png").read_bytes())
        return written

    monkeypatch.setattr(plots, "draw_curves", recording)
    status, out, _ = run(["--out", tmp_path, "--data-dir", tiny_cifar_root, *SMALL], capsys)
    assert status == 0, out
    (run_dir,) = tmp_path.glob("runs/train-*")
    assert is_png(run_dir / "curves.png")
    assert len(pictures) == 4, "one drawing per epoch, one more with the test accuracy"
    assert len(set(pictures)) == 4, "every drawing shows something new"
    assert pictures[-1] == (run_dir / "curves.png").read_bytes()
    assert "matplotlib" not in out and not list(tmp_path.rglob("*.tmp"))


def test_every_epoch_redraws_one_small_figure_without_a_layout_engine(tmp_path: Path) -> None:
    """What keeps a drawing a small part of an epoch, checked without a clock (a cost is for
    bench/, not a test): one figure per kind for the process, cleared and redrawn, not built again
    per epoch; fixed margins, as matplotlib's automatic layouts double a drawing's cost; a
    720 x 216 picture."""
    rows = [{"epoch": e, "loss": 2.0 / e, "train_accuracy": 50 + e, "lr": 0.4 / e}
            for e in range(1, 19)]
    assert plots.draw_curves(tmp_path, rows[:1], print)
    fig = plots._figures["curves"]
    for n in range(2, 19):
        assert plots.draw_curves(tmp_path, rows[:n], print)
        assert plots._figures["curves"] is fig, "the process's one curves figure, redrawn"
    loss_ax = fig.axes[0]
    assert len(fig.axes) == 3 and len(loss_ax.get_lines()) == 1, "panels cleared, not stacked"
    assert list(loss_ax.get_lines()[0].get_xdata()) == list(range(1, 19))
    assert fig.get_layout_engine() is None
    png = (tmp_path / "curves.png").read_bytes()
    assert is_png(tmp_path / "curves.png")
    assert struct.unpack(">II", png[16:24]) == (720, 216), "the IHDR's width and height"


@pytest.mark.slow  # a tuning round for its picture
def test_trials_png_after_a_small_tune(tmp_path: Path, tiny_cifar_root: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(["--out", tmp_path, "--data-dir", tiny_cifar_root, "--tune",
                          "--trials", "2", "--epochs", "2", "--batch-size", "64",
                          "--subset", "300"], capsys)
    assert status == 0, out
    (tune_dir,) = tmp_path.glob("runs/tune-*")
    assert is_png(tune_dir / "trials.png")
    for trial in ("trial-000", "trial-001"):
        assert is_png(tune_dir / trial / "curves.png"), "each trial is a run with its curves"
    # the round's own curves are the best trial's (the report's row and the mail show them)
    best = json.loads((tune_dir / "best.json").read_text())["trial"]
    assert (tune_dir / "curves.png").read_bytes() == (
        tune_dir / f"trial-{best:03d}" / "curves.png").read_bytes()


def test_trials_png_fades_stopped_trials_and_highlights_the_best(tmp_path: Path) -> None:
    rows = []
    for index, (status, val) in enumerate([("done", 60.0), ("done", 70.0), ("stopped", None),
                                           ("pruned", 20.0)]):
        folder = tmp_path / f"trial-{index:02d}"
        folder.mkdir()
        epochs = 3 if status == "done" else 1
        folder.joinpath("epochs.jsonl").write_text("".join(
            json.dumps({"epoch": e, "train_accuracy": 40 + 10 * e + index}) + "\n"
            for e in range(1, epochs + 1)))
        rows.append({"trial": index, "params": {"optimizer": "sgd"}, "status": status,
                     "val_accuracy": val})
    assert plots.draw_trials(tmp_path, rows, lambda i: tmp_path / f"trial-{i:02d}", print)
    assert is_png(tmp_path / "trials.png")
    fig = plots._figures["trials"]
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert "trial-001 sgd: validation 70.00% (best)" in labels
    assert "trial-002 sgd: stopped (budget)" in labels
    assert "trial-003 sgd: pruned (fell behind)" in labels
    (best,) = [ln for ln in fig.axes[0].get_lines() if ln.get_label().endswith("(best)")]
    (stopped,) = [ln for ln in fig.axes[0].get_lines() if "stopped" in ln.get_label()]
    assert best.get_linewidth() > 2 and stopped.get_alpha() < 0.5


def test_a_failing_drawing_is_one_line_and_never_an_error(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(fig, path: Path) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(plots, "_save", broken)
    monkeypatch.setattr(plots, "_failed", set())
    lines: list[str] = []
    rows = [{"epoch": 1, "loss": 1.0, "train_accuracy": 50.0, "lr": 0.1}]
    assert not plots.draw_curves(tmp_path, rows, lines.append)
    assert not plots.draw_curves(tmp_path, rows, lines.append)
    assert len(lines) == 1 and "could not draw curves.png" in lines[0], lines


# Runs train.py with `import matplotlib` failing, as on a base image without it.
WITHOUT_MATPLOTLIB = """
import runpy, sys

class NoMatplotlib:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "matplotlib":
            raise ImportError("No module named 'matplotlib' (blocked by test_plots)")
        return None

sys.meta_path.insert(0, NoMatplotlib())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_without_matplotlib_the_run_succeeds_without_pictures(tmp_path: Path,
                                                              tiny_cifar_root: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", WITHOUT_MATPLOTLIB, str(REPO / "train.py"), "--out", str(tmp_path),
         "--data-dir", str(tiny_cifar_root), *SMALL],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = tmp_path.glob("runs/train-*")
    assert (run_dir / "metrics.json").is_file() and not (run_dir / "curves.png").exists()
    said = [line for line in proc.stdout.splitlines() if "matplotlib" in line]
    assert len(said) == 1 and "no curves.png" in said[0], proc.stdout
    assert said[0] in (run_dir / "train.log").read_text()
