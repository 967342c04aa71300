"""ct.pipeline.gate: the accuracy gate, its verdict and history, run as the real CLI where it
matters."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ct.pipeline import gate, records
from ct.pipeline import promote as promotion
from tests.gate_workspace import (
    COMMIT,
    Reader,
    assert_one_line_error,
    make_workspace,
    read_properties,
    run_module,
    snapshot,
    write_run,
)

# ---------------------------------------------------------------- check


@pytest.mark.parametrize(
    ("accuracy", "passed", "line"),
    [
        (81.27, "true", "accuracy 81.27% >= threshold 80: passed"),
        (80.0, "true", "accuracy 80% >= threshold 80: passed"),
        (79.99, "false", "accuracy 79.99% below threshold 80: tuning needed"),
    ],
)
def test_check_writes_properties(tmp_path: Path, accuracy: float, passed: str, line: str) -> None:
    ws = make_workspace(tmp_path / "ws", accuracy)
    result = run_module("ct.pipeline.gate", "--workspace", str(ws), "--threshold", "80",
                        "--build-id", "12")
    assert result.returncode == 0, result.stderr
    assert result.stdout == line + "\n"
    assert result.stderr == ""
    props = read_properties(ws / "gate.properties")
    assert props["ACCURACY"] == f"{accuracy:g}"
    assert props["THRESHOLD"] == "80"
    assert props["PASSED"] == passed
    assert props["COMMIT"] == COMMIT
    assert props["RUN_DIR"] == "runs/r1"


def test_history_appends_and_plot_holds_latest(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path / "ws", 81.27)
    assert gate.main(["--workspace", str(ws), "--threshold", "80", "--build-id", "1"]) == 0
    make_workspace(ws, 78.5, run_id="r2")
    assert gate.main(["--workspace", str(ws), "--threshold", "80", "--build-id", "2"]) == 0

    with open(ws / "accuracy-history.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["time", "build", "commit", "accuracy", "threshold", "passed", "run"]
    assert [r[1:] for r in rows[1:]] == [
        ["1", COMMIT, "81.27", "80", "true", "r1"],
        ["2", COMMIT, "78.5", "80", "false", "r2"],
    ]
    assert all(r[0].endswith("Z") for r in rows[1:])
    assert (ws / "plot" / "accuracy.csv").read_text() == "accuracy,threshold\n78.5,80\n"
    assert read_properties(ws / "gate.properties")["RUN_DIR"] == "runs/r2"


def test_a_run_judged_again_keeps_its_one_history_row_and_plot_point(tmp_path: Path) -> None:
    """A retried job4 (after a failed promotion, say) judges the same run again: it writes the
    verdict again, but the history and the plot keep the run once."""
    ws = make_workspace(tmp_path / "ws", 81.27)
    (ws / "accuracy-history.csv").write_text(
        "time,build,commit,accuracy,threshold,passed\n2026-01-01T00:00:00Z,0,abc,70,80,false\n")
    for build in ("1", "2", "3"):
        assert gate.main(["--workspace", str(ws), "--threshold", "80", "--build-id", build]) == 0
        if build == "1":
            (ws / "plot" / "accuracy.csv").unlink()  # archived by the build that judged it
    with open(ws / "accuracy-history.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["build"], row["run"]) for row in rows] == [("0", None), ("1", "r1")]
    assert not (ws / "plot" / "accuracy.csv").exists()
    assert read_properties(ws / "gate.properties")["RUN_ID"] == "r1"


def test_check_without_metrics_uses_commit_txt(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path / "ws", 90.0)
    (ws / "metrics.json").unlink()
    assert gate.main(["--workspace", str(ws), "--threshold", "85.5"]) == 0
    props = read_properties(ws / "gate.properties")
    assert props["COMMIT"] == COMMIT
    assert props["RUN_DIR"] == ""
    assert props["THRESHOLD"] == "85.5"


@pytest.mark.parametrize(
    ("content", "complaint"),
    [
        (None, "is missing"),
        ("", "is empty"),
        (" \n\t\n", "is empty"),
        ("abc\n", "'abc', not a percentage"),
        ("81.2 82\n", "holds 2 values"),
        ("nan\n", "not a finite number"),
        ("inf\n", "not a finite number"),
        ("-1\n", "outside [0, 100]"),
        ("100.5\n", "outside [0, 100]"),
        ("0x50\n", "not a percentage"),
    ],
)
def test_bad_accuracy_is_one_line_exit_2_nothing_written(
    tmp_path: Path, content: str | None, complaint: str
) -> None:
    ws = make_workspace(tmp_path / "ws")
    assert promotion.main(["--workspace", str(ws)]) == 0
    if content is None:
        (ws / "accuracy.txt").unlink()
    else:
        (ws / "accuracy.txt").write_text(content)
    before = snapshot(ws)

    result = run_module("ct.pipeline.gate", "--workspace", str(ws), "--threshold", "80")

    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("ct.gate: ") and "accuracy.txt" in lines[0]
    assert complaint in lines[0]
    assert "job3" in lines[0]
    assert snapshot(ws) == before  # no gate.properties, no history, best.json untouched


@pytest.mark.parametrize(
    ("metrics_text", "complaint"),
    [
        ('{"accuracy": 85.0, "model": "m", "run_dir": "r", "run_id": "i"}', "81.27 but"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "not a JSON object"),
    ],
)
def test_metrics_must_agree_with_accuracy(
    tmp_path: Path, metrics_text: str, complaint: str
) -> None:
    ws = make_workspace(tmp_path / "ws", 81.27)
    (ws / "metrics.json").write_text(metrics_text)
    before = snapshot(ws)
    result = run_module("ct.pipeline.gate", "--workspace", str(ws), "--threshold", "80")
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1 and complaint in result.stderr
    assert snapshot(ws) == before


def test_small_rounding_gap_is_accepted(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path / "ws", 81.27)
    (ws / "accuracy.txt").write_text("81.265\n")
    assert gate.main(["--workspace", str(ws), "--threshold", "80"]) == 0


@pytest.mark.parametrize("threshold", ["0", "-5", "100.1", "abc", "nan", "inf", ""])
def test_bad_threshold_exit_2(tmp_path: Path, threshold: str) -> None:
    ws = make_workspace(tmp_path / "ws")
    result = run_module("ct.pipeline.gate", "--workspace", str(ws), "--threshold", threshold)
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1 and "threshold" in result.stderr
    assert not (ws / "gate.properties").exists()


def test_threshold_from_environment(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path / "ws", 81.27)
    result = run_module("ct.pipeline.gate", "--workspace", str(ws), env={"CT_THRESHOLD": "90"})
    assert result.returncode == 0, result.stderr
    assert "below threshold 90" in result.stdout


@pytest.mark.parametrize(
    ("module", "args"),
    [
        ("ct.pipeline.gate", ["--workspace"]),
        ("ct.pipeline.gate", ["--bogus"]),
        ("ct.pipeline.gate", ["frobnicate"]),
        ("ct.pipeline.promote", []),  # no --workspace and no CT_WORKSPACE
    ],
)
def test_bad_flags_are_argparse_errors(module: str, args: list[str]) -> None:
    result = run_module(module, *args, env={"CT_WORKSPACE": ""})
    assert result.returncode == 2
    assert "usage:" in result.stderr


def test_missing_workspace_is_clear(tmp_path: Path) -> None:
    result = run_module("ct.pipeline.gate", "--workspace", str(tmp_path / "nope"),
                        "--threshold", "80")
    assert result.returncode == 2
    assert "is not a directory" in result.stderr


def test_property_values_are_escaped() -> None:
    text = records.format_properties({"RUN_DIR": "runs/a=b:c\\d é"}, "c")
    assert text == "# c\nRUN_DIR=runs/a\\=b\\:c\\\\d \\u00e9\n"
    assert records.parse_properties(text) == {"RUN_DIR": "runs/a=b:c\\d é"}


# ---------------------------------------------------------------- I/O errors: one line


def check_cli(ws: Path) -> subprocess.CompletedProcess[str]:
    return run_module("ct.pipeline.gate", "--workspace", str(ws), "--threshold", "80",
                      "--build-id", "2")


@pytest.mark.parametrize(
    ("in_the_way", "named", "reason"),
    [
        ("plot", "plot/accuracy.csv", "Not a directory"),  # a file where the folder must be
        ("gate.properties/", "gate.properties", "Is a directory"),
        ("accuracy-history.csv/", "accuracy-history.csv", "not a regular file"),
        ("plot/accuracy.csv/", "plot/accuracy.csv", "Is a directory"),
    ],
)
def test_check_that_cannot_write_is_one_line_and_changes_nothing(
    tmp_path: Path, in_the_way: str, named: str, reason: str
) -> None:
    ws = make_workspace(tmp_path / "ws", 81.27)
    assert gate.main(["--workspace", str(ws), "--threshold", "80"]) == 0
    path = ws / in_the_way.rstrip("/")
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    if in_the_way.endswith("/"):
        path.mkdir()
    else:
        path.write_text("in the way\n")
    make_workspace(ws, 78.5, run_id="r2")  # a new run: the gate would record it
    before = snapshot(ws)

    result = check_cli(ws)

    assert_one_line_error(result, "ct.gate: cannot ", str(ws / named), reason, "nothing recorded")
    assert snapshot(ws) == before  # gate.properties, history and plot of the first check


# ---------------------------------------------------------------- readers during promotions


def test_a_reader_sees_a_whole_matching_pair_during_every_promotion(tmp_path: Path) -> None:
    """A reader (a mail, the report, job7's export) reads best.json, then the model it names,
    while promotions replace both: it always gets the model whose sha256 the record holds, it
    never finds best.json missing or cut short, and it saw every promoted record. Whatever the
    reader raises fails the test (tests/gate_workspace.py Reader)."""
    ws = make_workspace(tmp_path / "ws", 50.0, model_bytes=b"model 0")
    assert promotion.main(["--workspace", str(ws)]) == 0
    seen: list[str] = []

    def read_pair() -> None:
        best = json.loads((ws / "best.json").read_text())
        try:
            data = (ws / best["model"]).read_bytes()
        except FileNotFoundError:
            return  # superseded and pruned between the two reads: read the record again
        assert hashlib.sha256(data).hexdigest() == best["model_sha256"], best["run_id"]
        seen.append(best["run_id"])

    reader = Reader(read_pair)
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # the threads take turns often: inside the promotion's steps
    reader.start()
    try:
        for i in range(1, 25):
            write_run(ws, 50.0 + i, run_id=f"r{i}", model_bytes=f"model {i}".encode() * 1000)
            assert promotion.main(["--workspace", str(ws)]) == 0
            reader.wait_past(reader.reads + 1)  # one whole read of this record before the next
    finally:
        sys.setswitchinterval(switch)
        reader.finish()
    assert {f"r{i}" for i in range(1, 25)} <= set(seen)
    best = json.loads((ws / "best.json").read_text())
    assert best["run_id"] == "r24" and (ws / best["model"]).read_bytes() == b"model 24" * 1000
