"""ct.pipeline.promote: a better run's model replaces the best one, atomically, and nothing else
does; run as the real CLI where it matters."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ct import atomic
from ct.pipeline import gate
from ct.pipeline import promote as promotion
from tests.gate_workspace import (
    COMMIT,
    assert_one_line_error,
    make_read_only,
    make_workspace,
    other_user,
    read_properties,
    readonly_workspace,
    run_module,
    snapshot,
    write_run,
)

__all__ = ["other_user", "readonly_workspace"]  # fixtures, used by name


def promote(ws: Path) -> subprocess.CompletedProcess[str]:
    return run_module("ct.pipeline.promote", "--workspace", str(ws))


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
    assert (best["study"], best["trials"], best["trials_finished"], best["trials_pruned"]) == (
        "cifar10-0123456789ab", 4, 3, 1), "the study and its counts travel with the model"


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



# ---------------------------------------------------------------- promotion is atomic


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_consistent_pair(ws: Path, model_bytes: bytes) -> dict[str, Any]:
    """best.json names a stored model whose sha256 it records; best-model.pt leads to it."""
    best = json.loads((ws / "best.json").read_text())
    assert re.fullmatch(r"models/best-[0-9a-f]{16}\.pt", best["model"]), best["model"]
    named = ws / best["model"]
    assert named.read_bytes() == model_bytes
    assert sha256(named) == best["model_sha256"]
    assert best["model"] == f"models/best-{best['model_sha256'][:16]}.pt"
    link = ws / "best-model.pt"
    assert link.is_symlink() and os.readlink(link) == best["model"]  # relative: works in Docker
    assert link.read_bytes() == model_bytes
    assert sorted(p.name for p in (ws / "models").iterdir()) == [named.name]  # old ones pruned
    assert not list(ws.rglob("*.tmp"))
    return best


def test_promotion_stores_the_model_by_content_and_links_it(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path / "ws", 81.27, model_bytes=b"first model")
    assert promote(ws).returncode == 0
    first = assert_consistent_pair(ws, b"first model")
    write_run(ws, 84.5, run_id="r2", model_bytes=b"second model")

    result = promote(ws)

    assert result.returncode == 0, result.stderr
    second = assert_consistent_pair(ws, b"second model")
    assert not (ws / first["model"]).exists()
    assert second["model"] in result.stdout


def fail_replace_onto(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Injected fault: every rename onto a file called `name` fails (EIO), as a full or broken
    disk would make it; all other renames work."""
    real_replace = os.replace

    def faulty_replace(src: Any, dst: Any, **kwargs: Any) -> None:
        if Path(dst).name == name:
            raise OSError(errno.EIO, "Input/output error (injected fault)", str(dst))
        real_replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "replace", faulty_replace)


@pytest.fixture
def immutable() -> Iterator[list[Path]]:
    """Files to `chattr +i` (a best.json that cannot be replaced); cleared again after the test."""
    paths: list[Path] = []
    yield paths
    for path in paths:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True, check=False)


def make_immutable(path: Path, registry: list[Path]) -> None:
    if shutil.which("chattr") is None:
        pytest.skip("no chattr on this machine")
    done = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"chattr +i not possible here: {done.stderr.strip()}")
    registry.append(path)


@pytest.mark.parametrize("how", ["immutable best.json", "injected rename fault"])
def test_failed_record_write_keeps_the_old_pair(
    tmp_path: Path,
    how: str,
    immutable: list[Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ws = make_workspace(tmp_path / "ws", 81.27, model_bytes=b"first model")
    assert promote(ws).returncode == 0
    write_run(ws, 95.0, run_id="r2", model_bytes=b"second model")
    before = snapshot(ws)

    if how == "immutable best.json":
        make_immutable(ws / "best.json", immutable)
        result = promote(ws)
        code, err = result.returncode, result.stderr
    else:
        fail_replace_onto("best.json", monkeypatch)
        code = promotion.main(["--workspace", str(ws)])
        err = capsys.readouterr().err

    assert code == 2, err
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert f"cannot write {ws / 'best.json'}" in err and "best model is unchanged" in err
    assert snapshot(ws) == before  # record, model, link, promotion.properties: all as they were
    assert_consistent_pair(ws, b"first model")  # and the copy of the new model is gone again


# A reader racing promotions: tests/test_gate.py, whose reader's exceptions fail the test.


def test_a_link_that_could_not_be_switched_is_repaired_by_the_next_promote(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ws = make_workspace(tmp_path / "ws", 81.27, model_bytes=b"first model")
    assert promotion.main(["--workspace", str(ws)]) == 0
    write_run(ws, 90.0, run_id="r2", model_bytes=b"second model")

    def injected_fault(link: Path, target: str) -> None:
        raise atomic.WriteError(link, OSError(errno.EIO, "Input/output error (injected)"))

    with monkeypatch.context() as patch:
        patch.setattr(atomic, "replace_symlink", injected_fault)
        assert promotion.main(["--workspace", str(ws)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "rerun ct.pipeline.promote to repair the link" in err
    best = json.loads((ws / "best.json").read_text())  # the record is the new one, and whole
    assert sha256(ws / best["model"]) == best["model_sha256"]
    assert (ws / "best-model.pt").read_bytes() == b"first model"  # its old model is still there

    assert promotion.main(["--workspace", str(ws)]) == 0  # same run again: kept, repaired
    assert "kept the current best 90%" in capsys.readouterr().out
    assert_consistent_pair(ws, b"second model")


def test_a_folder_named_best_model_pt_stops_promotion_before_anything(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path / "ws", 81.27, model_bytes=b"first model")
    (ws / "best-model.pt").mkdir()
    before = snapshot(ws)
    result = promote(ws)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.splitlines()) == 1 and "best-model.pt is a folder" in result.stderr
    assert snapshot(ws) == before and not (ws / "models").exists()


def test_a_record_from_before_models_is_kept_then_replaced(tmp_path: Path) -> None:
    """Workspaces promoted by the old code: best-model.pt is a file, best.json names it."""
    ws = make_workspace(tmp_path / "ws", 81.27, model_bytes=b"old model")
    (ws / "best-model.pt").write_bytes(b"old model")
    old = {"accuracy": 81.27, "run_id": "r1", "model": "best-model.pt",
           "model_sha256": sha256(ws / "best-model.pt")}  # fmt: skip
    (ws / "best.json").write_text(json.dumps(old))
    write_run(ws, 80.0, run_id="r2", model_bytes=b"worse model")
    assert promote(ws).returncode == 0
    assert (ws / "best-model.pt").read_bytes() == b"old model"
    assert json.loads((ws / "best.json").read_text()) == old

    write_run(ws, 85.0, run_id="r3", model_bytes=b"better model")
    assert promote(ws).returncode == 0
    assert_consistent_pair(ws, b"better model")


def test_a_record_naming_a_path_outside_the_workspace_is_refused(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path / "ws", 81.27)
    assert promote(ws).returncode == 0
    best = json.loads((ws / "best.json").read_text())
    (ws / "best.json").write_text(json.dumps(best | {"model": "../elsewhere.pt"}))
    write_run(ws, 90.0, run_id="r2")
    before = snapshot(ws)
    result = promote(ws)
    assert result.returncode == 2 and "not a workspace file" in result.stderr
    assert snapshot(ws) == before


# ---------------------------------------------------------------- I/O errors: one line


@pytest.mark.parametrize(
    ("in_the_way", "named"),
    [("models", "models"), ("promotion.properties/", "promotion.properties")],
)
def test_promote_that_cannot_write_is_one_line_and_changes_nothing(
    tmp_path: Path, in_the_way: str, named: str
) -> None:
    ws = make_workspace(tmp_path / "ws", 81.27, model_bytes=b"first model")
    (ws / in_the_way.rstrip("/")).mkdir() if in_the_way.endswith("/") else (
        ws / in_the_way
    ).write_text("in the way\n")
    before = snapshot(ws)

    result = promote(ws)

    assert_one_line_error(result, str(ws / named), "best model is unchanged")
    assert snapshot(ws) == before
    assert not (ws / "best.json").exists()


def test_kept_promotion_that_cannot_write_is_one_line(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path / "ws", 81.27, model_bytes=b"first model")
    assert promote(ws).returncode == 0
    (ws / "promotion.properties").unlink()
    (ws / "promotion.properties").mkdir()
    write_run(ws, 70.0, run_id="r2", model_bytes=b"worse model")
    before = snapshot(ws)
    assert_one_line_error(promote(ws), "promotion.properties", "Is a directory")
    assert snapshot(ws) == before


def test_check_and_promote_on_a_read_only_workspace(
    readonly_workspace: Path, other_user: tuple[str, ...]
) -> None:
    ws = make_workspace(readonly_workspace, 81.27, model_bytes=b"first model")
    assert gate.main(["--workspace", str(ws), "--threshold", "80"]) == 0
    assert promotion.main(["--workspace", str(ws)]) == 0
    make_workspace(ws, 90.0, run_id="r2", model_bytes=b"second model")
    make_read_only(ws)
    before = snapshot(ws)

    checked = run_module("ct.pipeline.gate", "--workspace", str(ws), "--threshold", "80",
                         user=other_user)  # fmt: skip
    promoted = run_module("ct.pipeline.promote", "--workspace", str(ws), user=other_user)

    assert_one_line_error(checked, "cannot write", str(ws), "Permission denied", "rerun job4")
    assert_one_line_error(promoted, "cannot store", "Permission denied", "best model is unchanged")
    assert snapshot(ws) == before
    assert_consistent_pair(ws, b"first model")


def test_promotion_carries_the_runs_lineage_and_old_runs_have_none(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path / "ws", 81.0, run_id="r1")
    assert promotion.main(["--workspace", str(ws)]) == 0
    assert "lineage" not in json.loads((ws / "best.json").read_text())
    metrics = write_run(ws, 85.0, run_id="r2", model_bytes=b"model-r2")
    lineage = {"dataset_sha256": "e" * 64, "seed": 3, "commit": COMMIT, "image": "img:1",
               "model_sha256": hashlib.sha256(b"model-r2").hexdigest()}
    (ws / "metrics.json").write_text(json.dumps(metrics | {"lineage": lineage}))
    assert promotion.main(["--workspace", str(ws)]) == 0
    best = json.loads((ws / "best.json").read_text())
    assert best["lineage"] == lineage and best["model_sha256"] == lineage["model_sha256"]
