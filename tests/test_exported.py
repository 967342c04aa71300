"""python3 -m ct.pipeline.exported: a real export of a real champion (trained, promoted and
exported by the project's own commands) recorded on the host; everything the container could
have written wrong (another model, a changed file, a symlink, a manifest off its schema, a
damaged smoke set) is refused with one line and leaves best.json and models/ as they were."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ct.pipeline import promote
from tests.gate_workspace import run_module
from tests.synthetic_cifar import make_cifar
from tests.test_export import run_export, sha256, train_model

MIRROR_ONLY = ("--tta-translate", "no")  # the cheaper test; the export's own tests do both


def export_dir(ws: Path, model: Path) -> str:
    status, out, err = run_export(ws, model, ws / "data")
    assert status == 0, err
    return out.splitlines()[-1]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """A workspace whose champion (promoted, seed 1) has an export, beside the export of a
    model that was not promoted (seed 2): (workspace, champion's export, the other's)."""
    ws = tmp_path_factory.mktemp("exported") / "ws"
    make_cifar(ws / "data", per_batch=200, test=600)
    other = train_model(ws, ws / "data", *MIRROR_ONLY, "--seed", "2")
    champion = train_model(ws, ws / "data", *MIRROR_ONLY, "--seed", "1")
    assert promote.promote(ws, env={}).promoted
    best = json.loads((ws / "best.json").read_text())
    assert best["model_sha256"] == sha256(champion) != sha256(other)
    return ws, export_dir(ws, ws / best["model"]), export_dir(ws, other)


@pytest.fixture
def ws(base: tuple[Path, str, str], tmp_path: Path) -> Path:
    """A private copy of the base workspace (best-model.pt stays a link)."""
    copy = tmp_path / "ws"
    shutil.copytree(base[0], copy, symlinks=True)
    return copy


@pytest.fixture
def run_dir(base: tuple[Path, str, str]) -> str:
    return base[1]


def exported(ws: Path, *args: str) -> Any:
    return run_module("ct.pipeline.exported", *args, "--workspace", str(ws))


def state(ws: Path) -> tuple[bytes, dict[str, int]]:
    """best.json's bytes and what models/ holds (name: size), hidden temp files included."""
    return ((ws / "best.json").read_bytes(),
            {p.name: p.stat().st_size for p in (ws / "models").iterdir()})


def refused(ws: Path, run: str, *said: str) -> str:
    """Record `run`: exit 2, one line naming the problem, best.json and models/ unchanged."""
    before = state(ws)
    result = exported(ws, "record", run)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout == "" and len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith("ct.exported: ") and "Traceback" not in result.stderr
    for text in said:
        assert text in result.stderr
    assert state(ws) == before
    return result.stderr


def manifest_of(ws: Path, run: str) -> dict[str, Any]:
    return json.loads((ws / run / "export.json").read_text())


# ---------------------------------------------------------------- record, needs


def test_needs_then_record_then_exported(ws, run_dir):
    best = json.loads((ws / "best.json").read_text())
    asked = exported(ws, "needs")
    assert asked.returncode == 0 and asked.stdout == f"export {best['commit']} {best['model']}\n"
    assert re.fullmatch(r"[0-9a-f]{40}", best["commit"])

    result = exported(ws, "record", run_dir)
    assert result.returncode == 0, result.stderr
    manifest = manifest_of(ws, run_dir)
    sha = manifest["onnx_sha256"]
    x = sha[:16]
    assert result.stdout.startswith(f"ct.exported: recorded {run_dir} for the champion")
    assert f"models/champion-{x}.onnx" in result.stdout
    models = ws / "models"
    assert sorted(p.name for p in models.iterdir()) == sorted([
        Path(best["model"]).name, f"champion-{x}.onnx", f"champion-{x}.json",
        f"champion-{x}-smoke.npz"])
    for stored, source in ((f"champion-{x}.onnx", "model.onnx"),
                           (f"champion-{x}-smoke.npz", "smoke.npz")):
        assert (models / stored).read_bytes() == (ws / run_dir / source).read_bytes()
    assert sha256(models / f"champion-{x}.onnx") == sha
    stored = json.loads((models / f"champion-{x}.json").read_text())
    assert stored == {**manifest, "onnx": f"champion-{x}.onnx", "run_dir": run_dir,
                      "smoke": {**manifest["smoke"], "file": f"champion-{x}-smoke.npz"}}

    after = json.loads((ws / "best.json").read_text())
    assert after.pop("export") == {
        "onnx": f"models/champion-{x}.onnx", "onnx_sha256": sha,
        "manifest": f"models/champion-{x}.json", "served_accuracy": manifest["served_accuracy"],
        "parity": manifest["parity"], "exported_at": manifest["exported_at"],
        "run_dir": run_dir}
    assert after["lineage"].pop("onnx_sha256") == sha
    assert after == best  # nothing else changed
    assert exported(ws, "needs").stdout == "exported\n"


def test_the_smoke_set_loads_as_the_service_reads_it(ws, run_dir):
    assert exported(ws, "record", run_dir).returncode == 0
    stored = json.loads((ws / "best.json").read_text())["export"]["manifest"]
    manifest = json.loads((ws / stored).read_text())
    smoke = np.load(ws / "models" / manifest["smoke"]["file"], allow_pickle=False)
    assert smoke["images"].shape == (500, 3, 32, 32) and smoke["labels"].dtype == np.int64


def test_an_absolute_run_dir_works_and_recording_again_changes_nothing(ws, run_dir):
    assert exported(ws, "record", str(ws / run_dir)).returncode == 0
    first = state(ws)
    again = run_module("ct.pipeline.exported", "--workspace", str(ws), "record", run_dir)
    assert again.returncode == 0, again.stderr  # --workspace before the command works too
    assert state(ws) == first


def test_needs_asks_again_when_the_stored_export_is_gone(ws, run_dir):
    assert exported(ws, "record", run_dir).returncode == 0
    onnx = ws / json.loads((ws / "best.json").read_text())["export"]["onnx"]
    onnx.unlink()
    assert exported(ws, "needs").stdout.startswith("export ")


def test_needs_without_a_champion_says_none(tmp_path):
    (tmp_path / "empty").mkdir()
    result = exported(tmp_path / "empty", "needs")
    assert (result.returncode, result.stdout) == (0, "none\n")


def test_needs_without_a_commit_to_export_with_is_exit_2(ws):
    best = json.loads((ws / "best.json").read_text())
    best["commit"] = None
    best["lineage"]["commit"] = None
    (ws / "best.json").write_text(json.dumps(best))
    result = exported(ws, "needs")
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1
    assert "names no full commit id" in result.stderr


def test_record_without_a_champion_is_refused(ws, run_dir):
    (ws / "best.json").unlink()
    before = sorted(p.name for p in (ws / "models").iterdir())
    result = exported(ws, "record", run_dir)
    assert result.returncode == 2 and "no model has been promoted" in result.stderr
    assert sorted(p.name for p in (ws / "models").iterdir()) == before
    assert not (ws / "best.json").exists()


# ---------------------------------------------------------------- what is refused


def test_an_export_of_another_model_is_refused(ws, base):
    other = base[2]
    said = refused(ws, other, "an export of another model", "best.json is unchanged")
    assert manifest_of(ws, other)["model_sha256"][:16] in said


def test_an_onnx_file_changed_after_the_export_is_refused(ws, run_dir):
    with open(ws / run_dir / "model.onnx", "ab") as handle:
        handle.write(b"\0")
    refused(ws, run_dir, f"{ws / run_dir / 'model.onnx'} has sha256",
            f"its manifest says {manifest_of(ws, run_dir)['onnx_sha256']}")


def _link_file(ws: Path, run: str, name: str) -> None:
    """Replace run/name by a symlink to a copy of it outside the run folder (same bytes)."""
    target = ws.parent / f"outside-{name}"
    shutil.copy(ws / run / name, target)
    (ws / run / name).unlink()
    (ws / run / name).symlink_to(target)


def _link_folder(ws: Path, run: str) -> None:
    target = ws.parent / "outside-run"
    shutil.move(ws / run, target)
    (ws / run).symlink_to(target, target_is_directory=True)


@pytest.mark.parametrize("what", ["export.json", "model.onnx", "smoke.npz", "the folder"])
def test_a_symlink_is_not_followed(ws, run_dir, what):
    if what == "the folder":
        _link_folder(ws, run_dir)
    else:
        _link_file(ws, run_dir, what)
    refused(ws, run_dir, "a symlink is not followed")


def _without(key: str) -> Callable[[dict], Any]:
    return lambda m: {k: v for k, v in m.items() if k != key}


def _with(key: str, value: Any) -> Callable[[dict], Any]:
    return lambda m: {**m, key: value}


def _parity(**change: Any) -> Callable[[dict], Any]:
    return lambda m: {**m, "parity": {**m["parity"], **change}}


@pytest.mark.parametrize(("change", "said"), [
    (_without("onnx_sha256"), "lacks 'onnx_sha256'"),
    (_without("smoke"), "lacks 'smoke'"),
    (_with("format", "ct-export/2"), "has format"),
    (_with("opset", "17"), "has opset"),
    (_with("opset", 11), "has opset"),
    (_with("onnx", "../../best.json"), "has onnx"),
    (_with("onnx_sha256", "ABC"), "has onnx_sha256"),
    (_with("model_sha256", 7), "has model_sha256"),
    (_with("input", {"name": "images", "dtype": "float32", "shape": ["N", 3, 32, 32]}),
     "has input"),
    (_with("classes", ["cat"] * 10), "has classes"),
    (_with("tta", {"mirror": "yes", "translate": False}), "has tta"),
    (_with("served_accuracy", 101), "has served_accuracy"),
    (_with("exported_at", "yesterday"), "has exported_at"),
    (_parity(max_abs_logit_diff=0.5), "has parity"),  # the host's bound, whatever --tolerance
    (_parity(top1_agreement=99.0), "has parity"),
    (_parity(max_abs_logit_diff=float("nan")), "has parity"),
    (lambda m: {**m, "smoke": {**m["smoke"], "file": "../../../best.json"}}, "has smoke"),
    (lambda m: {**m, "smoke": {**m["smoke"], "images": 10 ** 6}}, "more smoke images"),
    (lambda m: [m], "holds a list"),
])
def test_a_manifest_off_its_schema_is_refused(ws, run_dir, change, said):
    manifest = change(manifest_of(ws, run_dir))
    (ws / run_dir / "export.json").write_text(json.dumps(manifest))
    refused(ws, run_dir, said)


def test_a_manifest_that_is_not_utf8_is_refused(ws, run_dir):
    (ws / run_dir / "export.json").write_bytes(b'{"format": "\xff"}')
    refused(ws, run_dir, "is not valid JSON")


@pytest.mark.parametrize("damage", ["truncated", "int32 labels", "fewer images", "extra array"])
def test_a_damaged_smoke_set_is_refused(ws, run_dir, damage):
    path = ws / run_dir / "smoke.npz"
    arrays = dict(np.load(path, allow_pickle=False))
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:4000])
    else:
        if damage == "int32 labels":
            arrays["labels"] = arrays["labels"].astype(np.int32)
        elif damage == "fewer images":
            arrays = {k: v[:499] for k, v in arrays.items()}
        else:
            arrays["extra"] = np.zeros(3)
        with open(path, "wb") as handle:
            np.savez(handle, **arrays)
    refused(ws, run_dir, "is not the smoke set its manifest describes")


@pytest.mark.parametrize("given", [
    "runs/train-20250101-000000-0123456789", "runs", "../elsewhere",
    "runs/export-20250101-000000-0123456789/..", "/tmp/runs/export-20250101-000000-0123456789",
    "runs/export-20250101-000000-0123456789",  # the right shape, but not there
])
def test_a_run_dir_that_is_not_an_export_folder_is_refused(ws, given):
    refused(ws, given)


def test_models_that_is_a_symlink_is_not_written_through(ws, run_dir, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    shutil.move(ws / "models", elsewhere)
    (ws / "models").symlink_to(elsewhere, target_is_directory=True)
    before = (ws / "best.json").read_bytes(), sorted(p.name for p in elsewhere.iterdir())
    result = exported(ws, "record", run_dir)
    assert result.returncode == 2 and "symlink is not followed" in result.stderr
    assert ((ws / "best.json").read_bytes(), sorted(p.name for p in elsewhere.iterdir())) == before


# ---------------------------------------------------------------- lineage --verify


def test_lineage_verify_hashes_the_recorded_export(ws, run_dir):
    assert exported(ws, "record", run_dir).returncode == 0
    sha = manifest_of(ws, run_dir)["onnx_sha256"]
    shown = run_module("ct.pipeline.lineage", "--workspace", str(ws), "--verify")
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert f"onnx    sha256 {sha} (models/champion-{sha[:16]}.onnx)" in shown.stdout
    assert "verified: the model, the ONNX export, the dataset" in shown.stdout
    with open(ws / "models" / f"champion-{sha[:16]}.onnx", "ab") as handle:
        handle.write(b"\0")
    changed = run_module("ct.pipeline.lineage", "--workspace", str(ws), "--verify")
    assert changed.returncode == 1
    assert "MISMATCH onnx:" in changed.stdout and "the exported model changed" in changed.stdout
