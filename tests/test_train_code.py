"""The code a run trains: runs/<id>/code.json (the commit and the snapshot's digest the pipeline
passes in as $CT_COMMIT and $CT_CODE_SHA256), the lineage's code_sha256, and a resume that
continues only a run of the same code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ct import workspace as names
from ct.trainer import runs
from ct.trainer.config import default_config
from ct.trainer.errors import UsageError
from ct.trainer.plan import upgrade_plan
from tests.train_cli import QUICK, only_run_dir, run, unfinished_run
from tests.tune_workspace import TUNE, tune_dirs

SMALL = [*QUICK, "--subset", "300"]
COMMIT_A, COMMIT_B = "aaaa1111", "bbbb2222"
CODE_A, CODE_B = "a" * 64, "b" * 64


def code_json(run_dir: Path) -> dict:
    return json.loads((run_dir / names.RUN_CODE).read_text())


def set_code(monkeypatch: pytest.MonkeyPatch, commit: str | None, code: str | None) -> None:
    for name, value in ((names.COMMIT_ENV, commit), (names.CODE_SHA256_ENV, code)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)


def test_a_run_records_its_commit_and_code_in_code_json_and_its_lineage(
        tmp_path: Path, tiny_cifar_root: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    set_code(monkeypatch, COMMIT_A, CODE_A)
    ws = tmp_path / "ws"
    status, _, err = run(["--out", ws, "--data-dir", tiny_cifar_root, *SMALL], capsys)
    assert status == 0, err
    run_dir = only_run_dir(ws)
    assert code_json(run_dir) == {"commit": COMMIT_A, "code_sha256": CODE_A}
    lineage = json.loads((run_dir / "metrics.json").read_text())["lineage"]
    assert (lineage["commit"], lineage["code_sha256"]) == (COMMIT_A, CODE_A)

    set_code(monkeypatch, COMMIT_B, None)  # outside the pipeline: no digest passed in
    status, _, err = run(["--out", ws, "--data-dir", tiny_cifar_root, *SMALL, "--dry-run"],
                         capsys)
    assert status == 0, err
    dry = only_run_dir(ws, "dry")
    assert code_json(dry) == {"commit": COMMIT_B, "code_sha256": None}
    assert json.loads((dry / "metrics.json").read_text())["lineage"]["code_sha256"] is None


@pytest.mark.parametrize("differs", ["commit", "code_sha256"])
def test_an_unfinished_run_is_continued_only_by_the_same_code(
        differs: str, tmp_path: Path, tiny_cifar_root: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    mine, other = (COMMIT_A, CODE_A), ((COMMIT_B, CODE_A) if differs == "commit"
                                       else (COMMIT_A, CODE_B))
    set_code(monkeypatch, *mine)
    ws = unfinished_run(tmp_path, tiny_cifar_root, capsys, "--subset", "300")
    first = only_run_dir(ws)
    args = ["--out", ws, "--data-dir", tiny_cifar_root, *SMALL]
    why = (f"not continuing runs/{first.name}: "
           + (f"it trains commit {COMMIT_A}, this is commit {COMMIT_B}" if differs == "commit"
              else f"it trains code sha256 {CODE_A}, this is code sha256 {CODE_B}"))

    set_code(monkeypatch, *other)
    status, _, err = run([*args, "--resume"], capsys)
    assert status == 2, err
    (line,) = err.strip().splitlines()
    assert "no unfinished train run of this code" in line and why in line, line
    assert list(ws.glob("runs/train-*")) == [first], "--resume started nothing"

    status, out, err = run(args, capsys)
    assert status == 0, err
    assert why in out and "resuming" not in out, out
    (second,) = [d for d in ws.glob("runs/train-*") if d != first]
    assert why in (second / "train.log").read_text()
    assert code_json(second) == dict(zip(("commit", "code_sha256"), other, strict=True))
    assert not (first / "metrics.json").exists(), "the other code's run is left as it was"

    set_code(monkeypatch, *mine)
    status, out, err = run([*args, "--resume"], capsys)
    assert status == 0, err
    assert f"resuming {first.name} from its checkpoint after epoch 3" in out
    assert "not continuing" not in out
    assert (first / "metrics.json").exists()
    assert len(list(ws.glob("runs/train-*"))) == 2, "no third run folder"


def test_a_tuning_round_of_another_commit_is_not_continued(
        tmp_path: Path, tiny_cifar_root: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    args = ["--out", tmp_path, "--data-dir", tiny_cifar_root, *TUNE, "--trials", "1",
            "--subset", "300", "--no-recipe-trial"]
    set_code(monkeypatch, COMMIT_A, CODE_A)
    assert run(args, capsys)[0] == 0
    (first,) = tune_dirs(tmp_path)
    assert code_json(first) == {"commit": COMMIT_A, "code_sha256": CODE_A}
    (first / "metrics.json").unlink()  # as if killed just before the end
    set_code(monkeypatch, COMMIT_B, CODE_B)
    status, out, err = run(args, capsys)
    assert status == 0, err
    assert f"not continuing runs/{first.name}: it trains commit {COMMIT_A}" in out
    (second,) = [d for d in tune_dirs(tmp_path) if d != first]
    assert code_json(second) == {"commit": COMMIT_B, "code_sha256": CODE_B}


# --- choosing the run folder, without training ------------------------------------------------


def unfinished(ws: runs.Workspace, kind: str, state: dict, code: dict | None) -> Path:
    run_dir = ws.new_run_dir(kind, "0123456789")
    (run_dir / names.RUN_CONFIG).write_text(json.dumps(state))
    if code is not None:
        (run_dir / names.RUN_CODE).write_text(json.dumps(code))
    return run_dir


def test_a_run_from_before_code_json_is_continued_only_without_a_commit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runs, "CODE_DIR", tmp_path / "not-a-checkout")  # no git HEAD either
    set_code(monkeypatch, None, None)
    ws = runs.Workspace(tmp_path / "ws")
    cfg = default_config()
    old = unfinished(ws, "train", cfg, None)
    assert runs.choose_run_dir(ws, "train", cfg, runs.RunOptions(), dict) == (old, cfg, True)

    set_code(monkeypatch, COMMIT_A, None)
    run_dir, _, resumed = runs.choose_run_dir(ws, "train", cfg, runs.RunOptions(), dict)
    assert run_dir != old and not resumed
    assert code_json(run_dir) == {"commit": COMMIT_A, "code_sha256": None}
    assert f"it trains no recorded commit, this is commit {COMMIT_A}" in (
        run_dir / names.RUN_LOG).read_text()


def test_resume_takes_the_latest_unfinished_run_of_the_same_code(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    set_code(monkeypatch, COMMIT_A, CODE_A)
    ws = runs.Workspace(tmp_path / "ws")
    plan = {"base": default_config(), "trials": 2}
    mine = unfinished(ws, "tune", {**plan, "trials": 3}, {"commit": COMMIT_A,
                                                          "code_sha256": CODE_A})
    newer = unfinished(ws, "tune", plan, {"commit": COMMIT_B, "code_sha256": CODE_A})
    assert newer.name > mine.name, "newest first"
    resume = runs.RunOptions(resume=True)
    run_dir, stored, resumed = runs.choose_run_dir(ws, "tune", plan, resume, upgrade_plan)
    assert (run_dir, stored["trials"], resumed) == (mine, 3, True)

    set_code(monkeypatch, COMMIT_A, CODE_B)
    with pytest.raises(UsageError, match="no unfinished tune run of this code"):
        runs.choose_run_dir(ws, "tune", plan, resume, upgrade_plan)
    run_dir, _, resumed = runs.choose_run_dir(ws, "tune", plan, runs.RunOptions(), upgrade_plan)
    assert run_dir not in (mine, newer) and not resumed
    assert code_json(run_dir) == {"commit": COMMIT_A, "code_sha256": CODE_B}
    assert json.loads((run_dir / names.RUN_CONFIG).read_text()) == plan


def test_an_unfinished_run_does_not_continue_on_other_data(
        tmp_path: Path, tiny_cifar: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Killed, then an increment added: the run's epochs would mix two datasets, so the same
    command is refused with one line, the run's files untouched; --fresh starts over."""
    from PIL import Image

    ws = unfinished_run(tmp_path, tiny_cifar, capsys)
    run_dir = only_run_dir(ws)
    first = json.loads((run_dir / names.RUN_DATA).read_text())["data_version"]
    picture = tiny_cifar / "increments" / "new" / "train" / "cat" / "one.png"
    picture.parent.mkdir(parents=True)
    Image.new("RGB", (40, 30), (250, 40, 10)).save(picture)
    checkpoint = (run_dir / names.RUN_CHECKPOINT).read_bytes()
    status, _, err = run(["--out", ws, "--data-dir", tiny_cifar, *QUICK], capsys)
    assert status == 2 and err.count("\n") == 1
    assert f"{run_dir.name} began on data version {first}" in err and "--fresh" in err
    assert (run_dir / names.RUN_CHECKPOINT).read_bytes() == checkpoint
    assert not (run_dir / "metrics.json").exists()
    status, _, err = run(["--out", ws, "--data-dir", tiny_cifar, *QUICK, "--fresh"], capsys)
    assert status == 0, err
    assert len(list((ws / "runs").glob("train-*"))) == 2
