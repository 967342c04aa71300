"""The per-class view: a real run records each class's test accuracy and the confusion matrix
(and draws confusion.png), promotion's guard refuses a model that lost a class
(CT_MAX_CLASS_DROP), the mail names the classes that got worse, the report draws them.
(tests/test_report_browser.py loads the per-class chart in a real browser.)"""

from __future__ import annotations

import json
import pickle
import re
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from ct.pipeline import promote, report, report_inputs
from ct.trainer import plots
from ct.trainer.run import CIFAR10_CLASSES, per_class_view
from tests.gate_workspace import (
    assert_one_line_error,
    make_workspace,
    read_properties,
    run_module,
    snapshot,
    write_run,
)
from tests.test_report import add_run, build_workspace, tiny_png
from tests.train_cli import QUICK, only_run_dir, run

# Not CIFAR-10's own names: the run must take them from the dataset's batches.meta.
NAMES = ["plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "lorry"]


def relabel_and_thin(data: Path) -> Counter[str]:
    """The small dataset with NAMES in batches.meta and a test set short of some cats and dogs
    (so that the classes' counts differ); the test images per class name."""
    folder = data / "cifar-10-batches-py"
    meta = pickle.loads((folder / "batches.meta").read_bytes())
    meta[b"label_names"] = [n.encode() for n in NAMES]
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    test = pickle.loads((folder / "test_batch").read_bytes(), encoding="bytes")
    dropped = {3: 7, 5: 3}  # label -> images left out
    keep = []
    for i, label in enumerate(test[b"labels"]):
        if dropped.get(label, 0) > 0:
            dropped[label] -= 1
        else:
            keep.append(i)
    test[b"labels"] = [test[b"labels"][i] for i in keep]
    test[b"data"] = test[b"data"][keep]
    test[b"filenames"] = [test[b"filenames"][i] for i in keep]
    (folder / "test_batch").write_bytes(pickle.dumps(test, protocol=2))
    return Counter(NAMES[label] for label in test[b"labels"])


# ---------------------------------------------------------------- what a run records


def test_a_run_records_per_class_accuracy_and_the_confusion_matrix(
        tmp_path: Path, tiny_cifar: Path, capsys: pytest.CaptureFixture[str]) -> None:
    counts = relabel_and_thin(tiny_cifar)
    assert counts["cat"] == 13 and counts["dog"] == 17 and counts["car"] == 20
    ws = tmp_path / "ws"
    status, out, err = run(["--out", ws, "--data-dir", tiny_cifar, *QUICK], capsys)
    assert status == 0, out + err
    metrics = json.loads((ws / "metrics.json").read_text())
    run_dir = only_run_dir(ws)
    assert json.loads((run_dir / "metrics.json").read_text()) == metrics  # the same summary

    assert metrics["classes"] == NAMES
    matrix = metrics["confusion_matrix"]
    assert len(matrix) == 10 and all(len(row) == 10 for row in matrix)
    assert all(type(cell) is int and cell >= 0 for row in matrix for cell in row)
    # rows: the true classes, each as many images as the test set has of it
    assert {name: sum(row) for name, row in zip(NAMES, matrix, strict=True)} == counts
    right, total = sum(matrix[i][i] for i in range(10)), sum(map(sum, matrix))
    assert total == sum(counts.values()) == 190
    # the diagonal is the very test that `accuracy` is (with the recipe's mirror and shifts)
    assert metrics["config"]["tta"] and metrics["config"]["tta_translate"]
    assert round(100 * right / total, 2) == metrics["accuracy"]
    assert metrics["per_class_accuracy"] == {
        name: round(100 * matrix[i][i] / counts[name], 2) for i, name in enumerate(NAMES)}
    # right may reach total: the synthetic classes are easy, and how soon a run learns all of
    # them depends on its thread count
    assert right > 0, "a run that learned something"

    png = (run_dir / plots.CONFUSION).read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
    width, height = (round(side * plots.DPI) for side in plots.CONFUSION_SIZE)
    assert (int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")) == (
        width, height)


def test_the_view_counts_the_predictions_it_is_given() -> None:
    truth = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2, 2])
    predicted = [torch.tensor([0, 1, 1, 1]), torch.tensor([0, 2, 2, 0])]  # 8 of 9 evaluated
    view = per_class_view(["a", "b", "c"], truth, predicted)
    assert view["confusion_matrix"] == [[1, 1, 0], [1, 2, 0], [1, 0, 2]]
    assert view["per_class_accuracy"] == {"a": 50.0, "b": 66.67, "c": 66.67}
    none = per_class_view(["a", "b", "c", "d"], truth[:4], [torch.tensor([0, 0, 1, 1])])
    assert none["per_class_accuracy"]["d"] is None, "no image of the class: no accuracy"
    assert per_class_view(list(CIFAR10_CLASSES), truth, [])["confusion_matrix"] == [[0] * 10] * 10


def test_without_matplotlib_no_confusion_png_and_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plots, "_figure_class", False)  # as after a failed import
    lines: list[str] = []
    assert not plots.draw_confusion(tmp_path, NAMES, [[1] * 10] * 10, "test", lines.append)
    assert lines == [] and not list(tmp_path.iterdir())
    monkeypatch.setattr(plots, "_figure_class", None)
    monkeypatch.setattr(plots, "_failed", set())

    def broken(fig: Any, path: Path) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(plots, "_save", broken)
    assert not plots.draw_confusion(tmp_path, NAMES, [[1] * 10] * 10, "test", lines.append)
    assert len(lines) == 1 and "could not draw confusion.png" in lines[0], lines


def test_the_trainer_and_the_report_name_the_same_picture() -> None:
    assert plots.CONFUSION == report_inputs.RUN_CONFUSION == report.CONFUSION


# ---------------------------------------------------------------- the guard


def per_class_of(base: float, **changes: float) -> dict[str, float]:
    values = dict.fromkeys(CIFAR10_CLASSES, base)
    return values | changes


def with_classes(ws: Path, per_class: dict[str, float] | None) -> None:
    """Give the workspace's latest run (metrics.json, top and run folder) per-class numbers."""
    metrics = json.loads((ws / "metrics.json").read_text())
    if per_class is not None:
        metrics |= {"classes": list(CIFAR10_CLASSES), "per_class_accuracy": per_class}
    for path in (ws / "metrics.json", ws / metrics["run_dir"] / "metrics.json"):
        path.write_text(json.dumps(metrics))


def champion_and_challenger(tmp_path: Path, challenger: dict[str, float] | None,
                            champion: dict[str, float] | None = None) -> Path:
    """A promoted champion (80%) and a better challenger (82%) as the latest run."""
    ws = make_workspace(tmp_path / "ws", 80.0, run_id="champ", model_bytes=b"champion")
    with_classes(ws, per_class_of(80.0, cat=70.0, dog=75.0) if champion is None else champion)
    assert promote.main(["--workspace", str(ws)]) == 0
    write_run(ws, 82.0, run_id="chall", model_bytes=b"challenger")
    with_classes(ws, challenger)
    return ws


def guarded(ws: Path, limit: str) -> subprocess.CompletedProcess[str]:
    return run_module("ct.pipeline.promote", "--workspace", str(ws),
                      env={"CT_MAX_CLASS_DROP": limit})


def test_the_guard_refuses_a_better_model_that_lost_a_class(tmp_path: Path) -> None:
    ws = champion_and_challenger(tmp_path, per_class_of(83.0, cat=66.5, dog=73.9))
    before = json.loads((ws / "best.json").read_text())

    result = guarded(ws, "2")

    assert result.returncode == 0, result.stderr
    line = result.stdout.strip()
    assert line.startswith("ct.promote: kept the current best 80% (run champ)"), line
    assert "82% is better, but the per-class guard refuses it" in line
    assert "cat -3.5, dog -1.1" not in line and "cat -3.5" in line  # dog lost 1.1: allowed
    assert "CT_MAX_CLASS_DROP allows 2" in line
    assert json.loads((ws / "best.json").read_text()) == before
    assert (ws / "best-model.pt").read_bytes() == b"champion"
    assert read_properties(ws / "promotion.properties")["PROMOTED"] == "false"


def test_the_guard_promotes_when_every_class_is_within_the_limit(tmp_path: Path) -> None:
    ws = champion_and_challenger(tmp_path, per_class_of(83.0, cat=68.0, dog=73.9))

    result = guarded(ws, "2")  # cat lost exactly 2 points: not more than the limit

    assert result.returncode == 0, result.stderr
    assert "promoted runs/chall/model.pt" in result.stdout
    assert "per-class guard: no class lost more than 2 points" in result.stdout
    best = json.loads((ws / "best.json").read_text())
    assert (best["run_id"], best["per_class_accuracy"]["cat"]) == ("chall", 68.0)
    assert best["classes"] == list(CIFAR10_CLASSES)
    assert best["replaced"]["run_id"] == "champ"  # what the mail compares with
    assert best["replaced"]["per_class_accuracy"]["cat"] == 70.0
    assert (ws / "best-model.pt").read_bytes() == b"challenger"


def test_the_guard_is_off_when_empty(tmp_path: Path) -> None:
    ws = champion_and_challenger(tmp_path, per_class_of(83.0, cat=10.0))
    result = guarded(ws, "")
    assert result.returncode == 0 and "promoted runs/chall/model.pt" in result.stdout
    assert "per-class guard" not in result.stdout


@pytest.mark.parametrize("missing", ["champion", "challenger"])
def test_without_per_class_numbers_the_guard_says_so_and_promotes(tmp_path: Path,
                                                                   missing: str) -> None:
    older = {"per_class_accuracy": "recorded before the per-class view"}  # not a mapping
    ws = champion_and_challenger(
        tmp_path, None if missing == "challenger" else per_class_of(83.0, cat=10.0),
        champion=older if missing == "champion" else None)
    result = guarded(ws, "2")
    assert result.returncode == 0 and "promoted runs/chall/model.pt" in result.stdout
    whose = "the best model's best.json" if missing == "champion" else "this run"
    assert (f"the per-class guard (CT_MAX_CLASS_DROP=2) could not compare: {whose} records no "
            "per-class accuracy") in result.stdout


@pytest.mark.parametrize("limit", ["-1", "two", "nan", "inf", "2%"])
def test_a_nonsense_limit_is_one_line_exit_2_and_nothing_promoted(tmp_path: Path,
                                                                    limit: str) -> None:
    ws = champion_and_challenger(tmp_path, per_class_of(83.0))
    before = snapshot(ws)
    result = guarded(ws, limit)
    assert_one_line_error(result, "CT_MAX_CLASS_DROP", repr(limit), "nothing promoted")
    assert snapshot(ws) == before


def test_lib_sh_defaults_the_setting_to_empty_and_exports_it() -> None:
    lib = (Path(__file__).resolve().parent.parent / "scripts" / "lib.sh").read_text()
    assert re.search(r'^: "\$\{CT_MAX_CLASS_DROP:=\}" +# ', lib, re.M)
    exported = re.search(r"^export CT_WORKSPACE .*?[^\\]$", lib, re.M | re.S)
    assert exported and " CT_MAX_CLASS_DROP " in exported.group(0).replace("\\\n", " ")


# ---------------------------------------------------------------- the mail


def mail(ws: Path, *args: str) -> str:
    result = run_module("ct.pipeline.notify", "--workspace", str(ws), "--dry-run", *args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_the_mail_names_the_classes_that_got_worse(tmp_path: Path) -> None:
    ws = champion_and_challenger(tmp_path, per_class_of(81.0, cat=66.8, dog=73.9, ship=84.0))
    assert guarded(ws, "").returncode == 0  # promoted: compared with the model it replaced
    text = mail(ws)
    assert "per class: this run vs the model it replaced (run champ), points:" in text
    assert "  cat           66.80%   70.00%  -3.20" in text
    assert "  ship          84.00%   80.00%  +4.00" in text
    assert "\nworse: cat -3.2, dog -1.1\n" in text, "only the classes that lost, most first"


def test_a_refused_tuned_run_is_compared_with_the_best(tmp_path: Path) -> None:
    ws = champion_and_challenger(tmp_path, per_class_of(83.0, cat=60.0))
    assert "refuses it" in guarded(ws, "5").stdout
    text = mail(ws, "--event", "tuned")
    assert "per class: this run vs the best model (run champ), points:" in text
    assert "\nworse: cat -10\n" in text and "promoted:            no" in text


def test_no_class_got_worse_and_runs_without_numbers(tmp_path: Path) -> None:
    ws = champion_and_challenger(tmp_path, per_class_of(85.0))
    assert guarded(ws, "0").returncode == 0
    assert "\nno class got worse\n" in mail(ws)
    write_run(ws, 90.0, run_id="tune1", mode="tune")  # tuning rounds record no per-class view
    assert "per class: not compared (this run records no per-class accuracy)" in mail(ws)
    first = make_workspace(tmp_path / "first", 81.0)
    with_classes(first, per_class_of(81.0))
    assert promote.main(["--workspace", str(first)]) == 0
    assert "per class: not compared (no earlier best)" in mail(first)


# ---------------------------------------------------------------- the report


CONFUSION_COLOUR = (20, 60, 160)  # per_class_workspace's stand-in confusion.png


def per_class_workspace(root: Path) -> Path:
    """The report's workspace (tests/test_report.build_workspace) and two later runs with the
    per-class view: the first promoted (the best), the second the latest, not better."""
    ws = build_workspace(root)
    confusion = tiny_png(60, 50, rgb=CONFUSION_COLOUR)
    for run_id, accuracy, per_class in (
            ("train-20250301-000000-c1a5", 90.0, per_class_of(90.0, cat=80.0, dog=85.0)),
            ("train-20250302-000000-c1a6", 88.0, per_class_of(90.5, cat=77.0, dog=86.0))):
        add_run(ws, run_id, accuracy)
        with_classes(ws, per_class)
        (ws / "runs" / run_id / plots.CONFUSION).write_bytes(confusion)
        assert promote.main(["--workspace", str(ws)]) == 0
    return ws


def test_the_report_draws_both_models_per_class_and_the_confusion_matrix(tmp_path: Path) -> None:
    ws = per_class_workspace(tmp_path / "ws")
    assert report.main(["--workspace", str(ws)]) == 0
    page = (ws / "report" / "index.html").read_text()
    section = page.split('<section id="per-class">', 1)[1].split("</section>", 1)[0]
    assert "the best model (train-20250301-000000-c1a5) and the latest run " \
           "(train-20250302-000000-c1a6)" in section
    assert "Worse: cat -3." in section  # dog gained a point, the others half a point
    svg = section.split('<svg id="per-class-chart"', 1)[1].split("</svg>", 1)[0]
    bars = re.findall(r'<rect [^>]*class="bar (best|latest)" fill="(#[0-9a-f]{6})"[^>]*>'
                      r"<title>([^<]*)</title>", svg)
    assert Counter(kind for kind, _, _ in bars) == {"best": 10, "latest": 10}
    assert {fill for _, fill, _ in bars} == {report.BEST_COLOUR, report.LATEST_COLOUR}
    assert "cat: best model 80%" in svg and "cat: latest run 77%" in svg
    labels = re.findall(r'<text [^>]*class="xlab"[^>]*>([^<]*)</text>', svg)
    assert labels == list(CIFAR10_CLASSES)
    # the confusion matrix: the latest run's picture, copied beside the page (report/** is
    # what Jenkins publishes), shown from there
    assert '<img class="confusion" alt="confusion matrix of train-20250302-000000-c1a6" ' \
           'src="confusion.png">' in section
    assert (ws / "report" / "confusion.png").read_bytes() == (
        ws / "runs" / "train-20250302-000000-c1a6" / plots.CONFUSION).read_bytes()


def test_a_report_without_per_class_numbers_says_so(tmp_path: Path) -> None:
    ws = build_workspace(tmp_path / "ws", n_runs=2)
    assert report.main(["--workspace", str(ws)]) == 0
    page = (ws / "report" / "index.html").read_text()
    section = page.split('<section id="per-class">', 1)[1].split("</section>", 1)[0]
    assert "No test accuracy per class recorded" in section and "<svg" not in section
    assert not (ws / "report" / "confusion.png").exists()


def test_the_report_compares_a_new_best_with_the_model_it_replaced(tmp_path: Path) -> None:
    ws = per_class_workspace(tmp_path / "ws")
    add_run(ws, "train-20250303-000000-c1a7", 95.0)  # better: promoted, the latest and the best
    with_classes(ws, per_class_of(95.0, cat=79.0))
    assert promote.main(["--workspace", str(ws)]) == 0
    assert report.main(["--workspace", str(ws)]) == 0
    section = (ws / "report" / "index.html").read_text().split(
        '<section id="per-class">', 1)[1].split("</section>", 1)[0]
    assert "now the best model, and the model it replaced (train-20250301-000000-c1a5)" in section
    assert "cat: replaced model 80%" in section and "cat: latest run 79%" in section
    assert "Worse: cat -1." in section
    assert "<img" not in section, "this run drew no confusion.png"

    add_run(ws, "tune-20250304-000000-c1a8", 91.0, mode="tune")  # no per-class view
    assert report.main(["--workspace", str(ws)]) == 0
    section = (ws / "report" / "index.html").read_text().split(
        '<section id="per-class">', 1)[1].split("</section>", 1)[0]
    assert "the latest run records no test accuracy per class" in section
    assert len(re.findall(r'class="bar best"', section)) == 10
    assert 'class="bar latest"' not in section and "Worse" not in section
