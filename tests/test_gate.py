"""ct.gate: the accuracy gate and model promotion, run as the real CLI where it matters."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ct import gate

REPO = Path(__file__).resolve().parent.parent
COMMIT = "a1b2c3d4e5f60718293a4b5c6d7e8f9012345678"


def make_workspace(
    root: Path,
    accuracy: float = 81.27,
    *,
    run_id: str = "r1",
    mode: str = "train",
    model_bytes: bytes | None = b"model-r1",
    accuracy_text: str | None = None,
) -> Path:
    """A workspace as train.py leaves it: accuracy.txt, metrics.json, runs/<id>/model.pt."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "commit.txt").write_text(COMMIT + "\n")
    text = f"{accuracy}\n" if accuracy_text is None else accuracy_text
    (root / "accuracy.txt").write_text(text)
    write_run(root, accuracy, run_id=run_id, mode=mode, model_bytes=model_bytes)
    return root


def write_run(
    root: Path,
    accuracy: float,
    *,
    run_id: str,
    mode: str = "train",
    model_bytes: bytes | None = b"model",
) -> dict[str, Any]:
    run_dir = f"runs/{run_id}"
    (root / run_dir).mkdir(parents=True, exist_ok=True)
    if model_bytes is not None:
        (root / run_dir / "model.pt").write_bytes(model_bytes)
    metrics: dict[str, Any] = {
        "accuracy": accuracy,
        "test_loss": 0.61,
        "epochs": 3,
        "wall_time_s": 42.5,
        "images_per_s": 1834.2,
        "config": {"lr": 0.05, "optimizer": "sgd", "batch_size": 128, "seed": 1},
        "device": "cpu",
        "torch": "2.13.0",
        "commit": COMMIT,
        "run_id": run_id,
        "run_dir": run_dir,
        "model": f"{run_dir}/model.pt",
        "mode": mode,
    }
    if mode == "tune":
        metrics |= {
            "best_params": {"lr": 0.1, "optimizer": "adamw", "weight_decay": 0.0005},
            "val_accuracy": accuracy - 0.5,
            "trials": 4,
        }
    (root / "metrics.json").write_text(json.dumps(metrics))
    return metrics


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("CT_", "BUILD_"))}
    full_env |= {"PYTHONPATH": str(REPO)} | (env or {})
    return subprocess.run(
        [sys.executable, "-m", "ct.gate", *args],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def read_properties(path: Path) -> dict[str, str]:
    """Parse like java.util.Properties does for these simple files."""
    pairs = {}
    for line in path.read_text(encoding="ascii").splitlines():
        if line and not line.startswith(("#", "!")):
            key, sep, value = line.partition("=")
            assert sep, f"not a key=value line: {line!r}"
            pairs[key] = value
    return pairs


def snapshot(workspace: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(workspace)): p.read_bytes() for p in workspace.rglob("*") if p.is_file()
    }


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
    result = run_cli("check", "--workspace", str(ws), "--threshold", "80", "--build-id", "12")
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
    assert gate.main(["check", "--workspace", str(ws), "--threshold", "80", "--build-id", "1"]) == 0
    make_workspace(ws, 78.5, run_id="r2")
    assert gate.main(["check", "--workspace", str(ws), "--threshold", "80", "--build-id", "2"]) == 0

    with open(ws / "accuracy-history.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["time", "build", "commit", "accuracy", "threshold", "passed"]
    assert [r[1:] for r in rows[1:]] == [
        ["1", COMMIT, "81.27", "80", "true"],
        ["2", COMMIT, "78.5", "80", "false"],
    ]
    assert all(r[0].endswith("Z") for r in rows[1:])
    assert (ws / "plot" / "accuracy.csv").read_text() == "accuracy,threshold\n78.5,80\n"
    assert read_properties(ws / "gate.properties")["RUN_DIR"] == "runs/r2"


def test_check_without_metrics_uses_commit_txt(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path / "ws", 90.0)
    (ws / "metrics.json").unlink()
    assert gate.main(["check", "--workspace", str(ws), "--threshold", "85.5"]) == 0
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
    assert gate.main(["promote", "--workspace", str(ws)]) == 0
    if content is None:
        (ws / "accuracy.txt").unlink()
    else:
        (ws / "accuracy.txt").write_text(content)
    before = snapshot(ws)

    result = run_cli("check", "--workspace", str(ws), "--threshold", "80")

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
    result = run_cli("check", "--workspace", str(ws), "--threshold", "80")
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1 and complaint in result.stderr
    assert snapshot(ws) == before


def test_small_rounding_gap_is_accepted(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path / "ws", 81.27)
    (ws / "accuracy.txt").write_text("81.265\n")
    assert gate.main(["check", "--workspace", str(ws), "--threshold", "80"]) == 0


@pytest.mark.parametrize("threshold", ["0", "-5", "100.1", "abc", "nan", "inf", ""])
def test_bad_threshold_exit_2(tmp_path: Path, threshold: str) -> None:
    ws = make_workspace(tmp_path / "ws")
    result = run_cli("check", "--workspace", str(ws), "--threshold", threshold)
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1 and "threshold" in result.stderr
    assert not (ws / "gate.properties").exists()


def test_threshold_from_environment(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path / "ws", 81.27)
    result = run_cli("check", "--workspace", str(ws), env={"CT_THRESHOLD": "90"})
    assert result.returncode == 0, result.stderr
    assert "below threshold 90" in result.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["check", "--workspace"],
        ["check", "--bogus"],
        ["frobnicate"],
        [],
        ["promote"],  # no --workspace and no CT_WORKSPACE
    ],
)
def test_bad_flags_are_argparse_errors(args: list[str]) -> None:
    result = run_cli(*args)
    assert result.returncode == 2
    assert "usage:" in result.stderr


def test_missing_workspace_is_clear(tmp_path: Path) -> None:
    result = run_cli("check", "--workspace", str(tmp_path / "nope"), "--threshold", "80")
    assert result.returncode == 2
    assert "is not a directory" in result.stderr


def test_property_values_are_escaped() -> None:
    text = gate.format_properties({"RUN_DIR": "runs/a=b:c\\d é"}, "c")
    assert text == "# c\nRUN_DIR=runs/a\\=b\\:c\\\\d \\u00e9\n"


# ---------------------------------------------------------------- promote


def promote(ws: Path) -> subprocess.CompletedProcess[str]:
    return run_cli("promote", "--workspace", str(ws))


def test_first_promotion(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path / "ws", 81.27, model_bytes=b"first model")
    result = promote(ws)
    assert result.returncode == 0, result.stderr
    assert "promoted" in result.stdout
    assert (ws / "best-model.pt").read_bytes() == b"first model"
    best = json.loads((ws / "best.json").read_text())
    assert best["accuracy"] == 81.27
    assert best["params"] == {"lr": 0.05, "optimizer": "sgd", "batch_size": 128, "seed": 1}
    assert best["commit"] == COMMIT
    assert (best["run_id"], best["run_dir"], best["mode"]) == ("r1", "runs/r1", "train")
    assert best["promoted_at"].endswith("Z")
    assert "val_accuracy" not in best
    assert read_properties(ws / "promotion.properties")["PROMOTED"] == "true"


def test_better_tune_run_replaces_best(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path / "ws", 81.27, model_bytes=b"first model")
    assert promote(ws).returncode == 0
    write_run(ws, 84.5, run_id="t1", mode="tune", model_bytes=b"tuned model")

    result = promote(ws)

    assert result.returncode == 0, result.stderr
    assert "promoted" in result.stdout and "previous 81.27%" in result.stdout
    assert (ws / "best-model.pt").read_bytes() == b"tuned model"
    best = json.loads((ws / "best.json").read_text())
    assert best["accuracy"] == 84.5 and best["val_accuracy"] == 84.0
    assert best["params"] == {"lr": 0.1, "optimizer": "adamw", "weight_decay": 0.0005}
    assert (best["run_id"], best["mode"]) == ("t1", "tune")


@pytest.mark.parametrize("accuracy", [80.5, 81.27])
def test_worse_or_equal_keeps_best(tmp_path: Path, accuracy: float) -> None:
    ws = make_workspace(tmp_path / "ws", 81.27, model_bytes=b"first model")
    assert promote(ws).returncode == 0
    best_before = (ws / "best.json").read_bytes()
    write_run(ws, accuracy, run_id="r2", model_bytes=b"second model")

    result = promote(ws)

    assert result.returncode == 0, result.stderr
    assert "kept the current best 81.27%" in result.stdout
    assert (ws / "best-model.pt").read_bytes() == b"first model"
    assert (ws / "best.json").read_bytes() == best_before
    assert read_properties(ws / "promotion.properties")["PROMOTED"] == "false"


def test_missing_model_exit_2_nothing_changed(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path / "ws", 81.27, model_bytes=b"first model")
    assert promote(ws).returncode == 0
    write_run(ws, 90.0, run_id="r2", model_bytes=None)
    before = snapshot(ws)

    result = promote(ws)

    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1
    assert "runs/r2/model.pt" in result.stderr and "is missing" in result.stderr
    assert snapshot(ws) == before


@pytest.mark.parametrize(
    "best_text", ["{truncated", "", '{"accuracy": "high"}', '{"accuracy": 120}', "[]"]
)
def test_corrupt_best_json_exit_2_model_untouched(tmp_path: Path, best_text: str) -> None:
    ws = make_workspace(tmp_path / "ws", 81.27, model_bytes=b"first model")
    assert promote(ws).returncode == 0
    (ws / "best.json").write_text(best_text)
    write_run(ws, 95.0, run_id="r2", model_bytes=b"second model")
    before = snapshot(ws)

    result = promote(ws)

    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1
    assert "best.json" in result.stderr and "nothing changed" in result.stderr
    assert snapshot(ws) == before
    assert (ws / "best-model.pt").read_bytes() == b"first model"


@pytest.mark.parametrize(
    "metrics_text", ["{garbled", '{"accuracy": 81.27}', '{"accuracy": "x", "model": "m"}']
)
def test_garbled_metrics_promote_exit_2(tmp_path: Path, metrics_text: str) -> None:
    ws = make_workspace(tmp_path / "ws")
    (ws / "metrics.json").write_text(metrics_text)
    before = snapshot(ws)
    result = promote(ws)
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1 and "metrics.json" in result.stderr
    assert snapshot(ws) == before


def test_best_without_its_model_is_replaced(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path / "ws", 81.27, model_bytes=b"first model")
    assert promote(ws).returncode == 0
    (ws / "best-model.pt").unlink()
    write_run(ws, 70.0, run_id="r2", model_bytes=b"second model")
    result = promote(ws)
    assert result.returncode == 0, result.stderr
    assert "was missing" in result.stdout
    assert (ws / "best-model.pt").read_bytes() == b"second model"

