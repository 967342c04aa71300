"""ct.pipeline.lineage: the chain commit -> image -> data -> config -> run -> model, and --verify,
on a workspace built from real files (tests/test_report.py's builder)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from ct import workspace as names
from ct.pipeline import promote
from tests.gate_workspace import COMMIT, make_workspace, run_module
from tests.test_report import add_run


def workspace_with_data(root: Path, form: str = "archive", code: bool = False) -> Path:
    """A promoted run whose lineage names the dataset in W/data, hashed as the trainer does;
    with `code`, also the snapshot W/code/<commit>/ of its commit and that folder's digest."""
    ws = make_workspace(root, 70.0, run_id="train-20250101-000000-aaaa")
    data = ws / "data"
    if form == "archive":
        data.mkdir()
        (data / names.DATA_ARCHIVE).write_bytes(b"not really gzip, only bytes to hash" * 100)
        source = data / names.DATA_ARCHIVE
    else:
        source = data / names.DATA_FOLDER
        source.mkdir(parents=True)
        for i, name in enumerate(names.DATASET_FOLDER_FILES):
            (source / name).write_bytes(bytes([i]) * 1000)
    metrics = add_run(ws, "train-20250102-000000-bbbb", 84.5)
    metrics["lineage"] |= {"dataset_sha256": names.dataset_sha256(source), "dataset_form": form}
    if code:
        metrics["lineage"]["code_sha256"] = names.code_sha256(snapshot(ws))
    text = json.dumps(metrics)
    (ws / "runs" / metrics["run_id"] / "metrics.json").write_text(text)
    (ws / "metrics.json").write_text(text)
    assert promote.main(["--workspace", str(ws)]) == 0
    return ws


def snapshot(ws: Path) -> Path:
    """The commit's code as job1 leaves it: a few files, a subfolder, a link inside it."""
    folder = ws / names.snapshot_dir(COMMIT)
    if not folder.exists():
        (folder / "ct").mkdir(parents=True)
        (folder / "train.py").write_text("print('train')\n")
        (folder / "ct" / "engine.py").write_text("STEP = 1\n")
        (folder / "ct" / "link.py").symlink_to("engine.py")
    return folder


def lineage(ws: Path, *args: str):
    return run_module("ct.pipeline.lineage", "--workspace", str(ws), *args)


def test_promotion_copies_the_lineage_into_best_json(tmp_path: Path) -> None:
    ws = workspace_with_data(tmp_path / "ws")
    best = json.loads((ws / "best.json").read_text())
    metrics = json.loads((ws / "metrics.json").read_text())
    assert best["lineage"] == metrics["lineage"]
    assert best["lineage"]["model_sha256"] == best["model_sha256"]


def test_the_chain_of_the_best_model_and_of_a_run(tmp_path: Path) -> None:
    ws = workspace_with_data(tmp_path / "ws")
    best = json.loads((ws / "best.json").read_text())
    proc = lineage(ws)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "lineage of the best model:"
    labels = [line.split()[0] for line in lines[1:]]
    assert labels == ["commit", "image", "data", "config", "run", "model"]
    assert COMMIT in lines[1] and "ct-cifar-train:0123456789ab (sha256:abc)" in lines[2]
    assert best["lineage"]["dataset_sha256"] in lines[3] and "seed 1" in lines[4]
    assert "train-20250102-000000-bbbb" in lines[5] and best["model_sha256"] in lines[6]
    proc = lineage(ws, "train-20250102-000000-bbbb")
    assert proc.returncode == 0 and proc.stdout.startswith(
        "lineage of the run train-20250102-000000-bbbb:")
    assert "runs/train-20250102-000000-bbbb/model.pt" in proc.stdout


def test_verify_passes_then_catches_a_changed_model_and_a_changed_dataset(tmp_path: Path) -> None:
    for form in ("archive", "folder"):
        ws = workspace_with_data(tmp_path / form, form)
        proc = lineage(ws, "--verify")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "verified: the model and the dataset match the record" in proc.stdout
        assert lineage(ws, "train-20250102-000000-bbbb", "--verify").returncode == 0

        best = json.loads((ws / "best.json").read_text())
        model = ws / best["model"]
        model.write_bytes(model.read_bytes() + b"tampered")
        proc = lineage(ws, "--verify")
        assert proc.returncode == 1
        (problem,) = [x for x in proc.stdout.splitlines() if "MISMATCH" in x]
        assert problem.startswith("ct.lineage: MISMATCH model:") and "model file changed" in problem

        source = ws / "data" / (names.DATA_ARCHIVE if form == "archive" else
                                f"{names.DATA_FOLDER}/test_batch")
        source.write_bytes(source.read_bytes()[:-1] + b"X")
        proc = lineage(ws, "train-20250102-000000-bbbb", "--verify")
        assert proc.returncode == 1
        (problem,) = [x for x in proc.stdout.splitlines() if "MISMATCH" in x]
        assert "data:" in problem and "the dataset changed" in problem


def test_dataset_sha256_is_the_files_one_after_the_other(tmp_path: Path) -> None:
    """The definition (ct.workspace.dataset_files + hash_files), written out again independently."""
    folder = tmp_path / names.DATA_FOLDER
    folder.mkdir()
    blob = b""
    for i, name in enumerate(names.DATASET_FOLDER_FILES):
        (folder / name).write_bytes(bytes([65 + i]) * (i + 3))
        blob += bytes([65 + i]) * (i + 3)
    (folder / "readme.html").write_text("not covered")
    assert names.dataset_sha256(folder) == hashlib.sha256(blob).hexdigest()
    archive = tmp_path / names.DATA_ARCHIVE
    archive.write_bytes(b"abc")
    assert names.dataset_sha256(archive) == hashlib.sha256(b"abc").hexdigest()
    assert names.dataset_source(tmp_path) == folder  # the folder wins, as in data.locate


def test_old_records_without_lineage(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path / "ws", 81.0, run_id="r1")
    assert promote.main(["--workspace", str(ws)]) == 0
    assert "lineage" not in json.loads((ws / "best.json").read_text())
    proc = lineage(ws)
    assert proc.returncode == 0 and "no lineage recorded" in proc.stdout
    assert COMMIT in proc.stdout  # from the record's own commit
    proc = lineage(ws, "--verify")
    assert proc.returncode == 1 and "names no dataset sha256" in proc.stdout


def test_bad_input_is_exit_2_with_one_line(tmp_path: Path) -> None:
    for args in (["--workspace", str(tmp_path / "nope")],
                 ["--workspace", str(tmp_path)],  # no best.json
                 ["--workspace", str(tmp_path), "no-such-run"],
                 ["--workspace", str(tmp_path), "../etc"]):
        proc = run_module("ct.pipeline.lineage", *args)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, (args, proc.stderr)


def test_verify_checks_the_commits_code_snapshot(tmp_path: Path) -> None:
    ws = workspace_with_data(tmp_path / "ws", code=True)
    best = json.loads((ws / "best.json").read_text())
    assert best["lineage"]["code_sha256"] == names.code_sha256(snapshot(ws))
    proc = lineage(ws, "--verify")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "verified: the model, the dataset and the code match the record" in proc.stdout
    assert f"code sha256 {best['lineage']['code_sha256']}" in proc.stdout.splitlines()[1]
    assert "not checked" not in proc.stdout

    engine = snapshot(ws) / "ct" / "engine.py"
    engine.write_text("STEP = 2\n")
    proc = lineage(ws, "train-20250102-000000-bbbb", "--verify")
    assert proc.returncode == 1
    (problem,) = [x for x in proc.stdout.splitlines() if "MISMATCH" in x]
    assert problem.startswith("ct.lineage: MISMATCH code:") and "snapshot changed" in problem
    assert best["lineage"]["code_sha256"] in problem

    engine.write_text("STEP = 1\n")
    (snapshot(ws) / "ct" / "link.py").unlink()
    (snapshot(ws) / "ct" / "link.py").symlink_to("/etc/passwd")  # a link's target counts
    proc = lineage(ws, "--verify")
    assert proc.returncode == 1 and "MISMATCH code:" in proc.stdout


def test_verify_says_when_the_code_is_not_checked(tmp_path: Path) -> None:
    ws = workspace_with_data(tmp_path / "ws", code=True)
    shutil.rmtree(snapshot(ws))
    proc = lineage(ws, "--verify")
    assert proc.returncode == 0, proc.stdout
    assert f"ct.lineage: code not checked: snapshot of {COMMIT} removed" in proc.stdout
    assert "verified: the model and the dataset match the record" in proc.stdout

    proc = lineage(workspace_with_data(tmp_path / "older"), "--verify")  # no code_sha256
    assert proc.returncode == 0 and "code not checked: not recorded" in proc.stdout


def test_verify_follows_no_snapshot_out_of_the_workspace(tmp_path: Path) -> None:
    ws = workspace_with_data(tmp_path / "ws", code=True)
    elsewhere = tmp_path / "elsewhere"
    snapshot(ws).rename(elsewhere)  # the same files, the same digest, outside the workspace
    assert names.code_sha256(elsewhere) == json.loads(
        (ws / "best.json").read_text())["lineage"]["code_sha256"]
    (ws / names.snapshot_dir(COMMIT)).symlink_to(elsewhere)
    proc = lineage(ws, "--verify")
    assert proc.returncode == 1
    (problem,) = [x for x in proc.stdout.splitlines() if "MISMATCH" in x]
    assert "is a symlink" in problem and "not followed" in problem

    (ws / names.snapshot_dir(COMMIT)).unlink()
    shutil.rmtree(ws / names.CODE_DIR)
    (ws / names.CODE_DIR).symlink_to(tmp_path)  # code/ itself leads out
    elsewhere.rename(tmp_path / COMMIT)
    proc = lineage(ws, "--verify")
    assert proc.returncode == 1
    (problem,) = [x for x in proc.stdout.splitlines() if "MISMATCH" in x]
    assert "leads out of the workspace" in problem
