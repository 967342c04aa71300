"""ct.pipeline.measured: before promotion the candidate's accuracy is the pipeline's own
measurement (ct.serving.measure, run for real here on a real ONNX graph and a CIFAR-10 test set
in the official layout), and a claim further from it than the tolerance is refused with both
figures named. The workspace is as a finished run leaves it; metrics.json and the export's
folder are what a container wrote."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ct import data_version
from ct.pipeline import measured
from ct.pipeline.errors import PipelineError
from tests.conftest import read_props, run_script
from tests.gate_workspace import REPO, make_workspace, run_module
from tests.served_model import onnx_bytes
from tests.synthetic_cifar import make_cifar, make_cifar_archive

MODEL = b"the run's model.pt"
EXPORT = "runs/export-20261206-093000-0123456789"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_cifar(tmp_path_factory.mktemp("data"), per_batch=20, test=200)


@pytest.fixture
def ws(tmp_path: Path, data: Path) -> Path:
    """A finished run (its model, metrics.json with the test set's identity) and its export as
    the pipeline asks for a candidate's: runs/export-.../model.onnx (a real graph: random
    weights, so it really scores about 10%) beside its export.json."""
    ws = make_workspace(tmp_path / "ws", accuracy=50.0, model_bytes=MODEL)
    tested = data_version.test_version(data_version.compute(data))
    claim(ws, 50.0, test_version=tested)
    folder = ws / EXPORT
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(onnx_bytes(0))
    write_export(ws, model_sha256=sha256(MODEL), onnx_sha256=sha256(onnx_bytes(0)))
    return ws


def claim(ws: Path, accuracy: float, **fields: Any) -> dict[str, Any]:
    """metrics.json and accuracy.txt as the container writes them."""
    metrics = json.loads((ws / "metrics.json").read_text()) | {"accuracy": accuracy, **fields}
    (ws / "metrics.json").write_text(json.dumps(metrics))
    (ws / "accuracy.txt").write_text(f"{accuracy}\n")
    return metrics


def write_export(ws: Path, **fields: str) -> None:
    (ws / EXPORT / "export.json").write_text(json.dumps({"format": "ct-export/1", **fields}))


def measure_and_record(ws: Path, data: Path) -> tuple[subprocess.CompletedProcess[str], ...]:
    """What the job script runs: ct.serving.measure with the arguments measured.py gives, its
    line handed to `record`. (measure's result, record's result)."""
    args = run_module("ct.pipeline.measured", "--workspace", str(ws), "args", "--runtime",
                      "local", "--export", EXPORT, "--data-dir", str(data))
    assert args.returncode == 0, args.stderr
    result = run_module("ct.serving.measure", *args.stdout.splitlines(),
                        env={"CT_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    recorded = run_module_input("record", ws, result.stdout)
    return result, recorded


def run_module_input(command: str, ws: Path, stdin: str) -> subprocess.CompletedProcess[str]:
    """`python3 -m ct.pipeline.measured --workspace WS COMMAND --export EXPORT` < stdin."""
    return subprocess.run([sys.executable, "-m", "ct.pipeline.measured", "--workspace", str(ws),
                           command, "--export", EXPORT], cwd=REPO, input=stdin, text=True,
                          capture_output=True, env={"PYTHONPATH": str(REPO)}, timeout=30,
                          check=False)


def latest(ws: Path) -> dict[str, Any]:
    return json.loads((ws / "metrics.json").read_text())


def test_a_container_claim_of_99_percent_is_refused_naming_both_figures(ws, data):
    """The attack: the run's code writes metrics.json and accuracy.txt claiming 99% for a model
    that scores about 10%. The pipeline's own measurement refuses it in one line with both."""
    claim(ws, 99.0)
    result, recorded = measure_and_record(ws, data)
    assert recorded.returncode == 0, recorded.stderr
    truth = json.loads(result.stdout)["accuracy"]
    assert 0 < truth < 40, truth
    with pytest.raises(measured.Refused) as refused:
        measured.check(ws, latest(ws), env={})
    line = str(refused.value)
    assert "\n" not in line and "claims 99%" in line
    assert f"measured {truth:g}%" in line and "nothing promoted" in line


def test_an_honest_claim_promotes_the_measured_figure(ws, data):
    _, recorded = measure_and_record(ws, data)
    truth = json.loads((ws / measured.RECORD).read_text())["accuracy"]
    claim(ws, round(truth + 0.2, 2))
    found = measured.check(ws, latest(ws), env={})
    assert found.accuracy == truth and found.claimed == round(truth + 0.2, 2)
    assert "measured" in recorded.stderr and found.images == 200


def test_the_tolerance_is_a_setting_and_never_below_one_test_image(ws, data):
    measure_and_record(ws, data)
    truth = json.loads((ws / measured.RECORD).read_text())["accuracy"]
    tight = {"CT_MEASURE_TOLERANCE": "0.1"}
    claim(ws, truth + 0.5)  # one image of 200: a borderline one may flip between runtimes
    assert measured.check(ws, latest(ws), env=tight).tolerance == 0.5
    claim(ws, truth + 0.8)
    with pytest.raises(measured.Refused, match=r"more than 0\.5 points apart"):
        measured.check(ws, latest(ws), env=tight)
    assert measured.check(ws, latest(ws), env={"CT_MEASURE_TOLERANCE": "1"}).accuracy == truth
    claim(ws, truth + 1.2)
    with pytest.raises(measured.Refused, match=r"more than 1 points apart"):
        measured.check(ws, latest(ws), env={"CT_MEASURE_TOLERANCE": "1"})
    for bad in ("-1", "nan", "1e3", "0x1", "two"):
        with pytest.raises(PipelineError, match="CT_MEASURE_TOLERANCE"):
            measured.check(ws, latest(ws), env={"CT_MEASURE_TOLERANCE": bad})


def test_a_claim_on_another_test_set_is_refused(ws, data):
    measure_and_record(ws, data)
    claim(ws, 10.0, test_version="f" * 64)
    with pytest.raises(measured.Refused, match="on test set ffffffffffffffff, but the pipeline"):
        measured.check(ws, latest(ws), env={})


def test_without_a_measurement_the_candidate_is_measured_first_and_asked_once(ws, data):
    with pytest.raises(measured.NeedsMeasure) as needed:
        measured.check(ws, latest(ws), env={})
    assert needed.value.model == "runs/r1/model.pt" and len(needed.value.commit) == 40
    with pytest.raises(PipelineError, match="no measurement of run r1's model"):
        measured.check(ws, latest(ws), env={}, required=True)
    measure_and_record(ws, data)
    (ws / "runs" / "r1" / "model.pt").write_bytes(b"another model, same run")
    with pytest.raises(measured.NeedsMeasure):  # the measurement was of other bytes
        measured.check(ws, latest(ws), env={})


def test_an_export_of_another_model_or_another_graph_is_not_recorded(ws, data):
    """The export runs the pushed code: its export.json must name this run's model, and the
    graph measured must be the one it wrote; else nothing is kept."""
    write_export(ws, model_sha256=sha256(b"a better model"), onnx_sha256=sha256(onnx_bytes(0)))
    _, recorded = measure_and_record(ws, data)
    assert recorded.returncode == 2 and "not run r1's runs/r1/model.pt" in recorded.stderr
    assert not (ws / measured.RECORD).exists()
    write_export(ws, model_sha256=sha256(MODEL), onnx_sha256=sha256(b"another graph"))
    _, recorded = measure_and_record(ws, data)
    assert recorded.returncode == 2 and "is not runs/export-" in recorded.stderr
    assert not (ws / measured.RECORD).exists()
    assert len(recorded.stderr.splitlines()) == 1


@pytest.mark.parametrize("line", ["", "not json", json.dumps({"format": "ct-measure/1"}),
                                  json.dumps({"format": "ct-measure/1", "images": 200,
                                              "correct": 20, "accuracy": 99.0,
                                              "onnx_sha256": "0" * 64,
                                              "test_version": "0" * 64})])
def test_a_garbled_measurement_is_not_recorded(ws, line):
    recorded = run_module_input("record", ws, line)
    assert recorded.returncode == 2 and len(recorded.stderr.splitlines()) == 1, recorded.stderr
    assert not (ws / measured.RECORD).exists()


def test_without_ct_data_dir_only_the_official_archive_is_measured_on(ws, tmp_path):
    """The trainer downloads into data/, which the container can write: then measure reads
    only an archive with the official md5 (--official), and nothing without an archive."""
    with pytest.raises(PipelineError, match="set CT_DATA_DIR"):
        measured.data_source(ws, "")
    (ws / "data").mkdir()
    make_cifar_archive(tmp_path / "made", per_batch=20, test=200).rename(
        ws / "data" / "cifar-10-python.tar.gz")
    assert measured.data_source(ws, "") == (ws / "data" / "cifar-10-python.tar.gz", True)
    args = run_module("ct.pipeline.measured", "--workspace", str(ws), "args", "--runtime",
                      "local", "--export", EXPORT, "--data-dir", "")
    assert args.returncode == 0 and "--official" in args.stdout.splitlines()
    result = run_module("ct.serving.measure", *args.stdout.splitlines())
    assert result.returncode == 2 and "md5" in result.stderr  # not the official archive


def test_a_linked_increments_folder_is_refused(ws, data, tmp_path):
    outside = tmp_path / "host-folder"
    outside.mkdir()
    (ws / "data").mkdir()
    (ws / "data" / "increments").symlink_to(outside)
    args = run_module("ct.pipeline.measured", "--workspace", str(ws), "args", "--runtime",
                      "local", "--export", EXPORT, "--data-dir", str(data))
    assert args.returncode == 2 and len(args.stderr.splitlines()) == 1
    assert "increments" in args.stderr and args.stdout == ""


def test_in_docker_the_workspace_and_the_data_are_mounted_read_only(ws, data, tmp_path):
    increments = tmp_path / "increments"
    increments.mkdir()
    common = ["--runtime", "docker", "--data-dir", str(data), "--increments", str(increments)]
    mounts = run_module("ct.pipeline.measured", "--workspace", str(ws), "mounts", *common)
    source = data / "cifar-10-batches-py"
    assert mounts.stdout.splitlines() == [
        "-v", f"{ws.resolve()}:/workspace:ro", "-v", f"{source}:/data/{source.name}:ro",
        "-v", f"{increments}:/increments:ro"]
    args = run_module("ct.pipeline.measured", "--workspace", str(ws), "args", *common,
                      "--export", EXPORT)
    assert args.stdout.splitlines() == [
        f"/workspace/{EXPORT}/model.onnx", "--root", "/workspace",
        "--data", f"/data/{source.name}", "--increments", "/increments"]
    bad = run_module("ct.pipeline.measured", "--workspace", str(ws), "args", *common,
                     "--export", "runs/../../etc")
    assert bad.returncode == 2 and "not an export's run folder" in bad.stderr


# ---------------------------------------------------------------- the chain, for real


@pytest.fixture(params=["local", pytest.param("docker", marks=pytest.mark.docker)])
def measuring_env(request: pytest.FixtureRequest, script_env: dict[str, str]) -> dict[str, str]:
    """The job scripts' environment with the measurement on (conftest turns it off for the
    runs tests make up); on docker, with the tests' serving base image."""
    env = {**script_env, "CT_MEASURE": "1", "CT_THRESHOLD": "5",
           "CT_TRAIN_ARGS": "--batch-size 64 --epochs 1 --seed 1"}
    if request.param == "docker":
        from tests import docker_engine as de

        engine = request.getfixturevalue("docker_engine")
        env = {**request.getfixturevalue("docker_env"), **env,
               "CT_SERVE_BASE_IMAGE": de.ensure_serve_base_image(engine)}
    return env


def train(env: dict[str, str], source_repo: Path | None = None) -> dict[str, Any]:
    for script in ("job1-pull.sh", "job2-image.sh", "job3-train.sh"):
        if script != "job1-pull.sh" or source_repo is not None:
            run_script(script, env, *([str(source_repo)] if script == "job1-pull.sh" else []))
    return latest(Path(env["CT_WORKSPACE"]))


@pytest.mark.slow
def test_the_chain_promotes_the_measured_figure_and_refuses_a_forged_one(source_repo,
                                                                          measuring_env):
    """job1..job4: the run's model is exported with its commit's code and measured by the
    pipeline's (on docker in the serving image), and best.json carries the measured figure.
    Then a run that learns nothing, whose container claims 99% in metrics.json and
    accuracy.txt: job4 refuses it in one line naming both figures, records that verdict as
    not passed (gate.properties, the history), and the champion stays, byte for byte."""
    env, ws = measuring_env, Path(measuring_env["CT_WORKSPACE"])
    first = train(env, source_repo)
    judged = run_script("job4-gate.sh", env)
    kept = json.loads((ws / measured.RECORD).read_text())
    best = json.loads((ws / "best.json").read_text())
    assert kept["run_id"] == best["run_id"] == first["run_id"]
    assert best["accuracy"] == kept["accuracy"] == best["measured"]["accuracy"]
    assert best["measured"]["claimed"] == first["accuracy"]
    assert abs(kept["accuracy"] - first["accuracy"]) <= measured.DEFAULT_TOLERANCE
    assert f"measured {kept['accuracy']:g}% on 200 test images" in judged.stderr
    export = json.loads((ws / kept["export"] / "export.json").read_text())
    assert export["served_accuracy"] is None and export["tta"]["mirror"]

    champion = {name: (ws / name).read_bytes() for name in ("best.json", best["model"])}
    env["CT_TRAIN_ARGS"] += " --subset 100 --lr 0.000001 --muon-lr 0.000001"  # learns nothing
    second = train(env)
    claim(ws, 99.0)  # what the run's own code can write about itself
    refused = run_script("job4-gate.sh", env, check=False)
    assert refused.returncode == 2, refused.stderr
    kept = json.loads((ws / measured.RECORD).read_text())
    assert kept["run_id"] == second["run_id"] and kept["accuracy"] < 40
    (line,) = [x for x in refused.stderr.splitlines() if x.startswith("ct.after_run:")]
    assert line == refused.stderr.splitlines()[-1]
    assert "claims 99%" in line and f"measured {kept['accuracy']:g}%" in line
    gate = read_props(ws / "gate.properties")
    assert (gate["PASSED"], gate["RUN_ID"], gate["TUNE"]) == ("false", second["run_id"], "false")
    assert float(gate["ACCURACY"]) == kept["accuracy"]
    history = (ws / "accuracy-history.csv").read_text().splitlines()
    assert history[-1].endswith(f",false,{second['run_id']}")
    assert {name: (ws / name).read_bytes() for name in champion} == champion
    again = run_script("job4-gate.sh", env)  # judged once: a rebuild says so, promotes nothing
    assert "judged already" in again.stderr
    assert {name: (ws / name).read_bytes() for name in champion} == champion
