"""train.py end to end on the small synthetic set: outputs, resume, dry run, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ct.trainer import config, stopping
from ct.trainer.engine import cpu_has_bf16, make_compute
from ct.trainer.errors import UsageError
from network import build_model
from tests.conftest import REPO
from tests.train_cli import QUICK, only_run_dir, run, signalled_at, unfinished_run


def test_full_run_writes_every_output(tmp_path: Path, tiny_cifar_root: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    ws = tmp_path / "ws"
    status, out, _ = run(["--out", ws, "--data-dir", tiny_cifar_root, *QUICK], capsys)
    assert status == 0
    text = (ws / "accuracy.txt").read_text()
    assert text.endswith("\n") and len(text.strip().split(".")[1]) == 2
    accuracy = float(text)
    assert accuracy > 50, "the synthetic classes are easy: a working trainer clears 50%"
    metrics = json.loads((ws / "metrics.json").read_text())
    for key in ("accuracy", "test_loss", "epochs", "wall_time_s", "images_per_s", "config",
                "device", "torch", "commit", "run_id", "run_dir", "model", "mode"):
        assert key in metrics, key
    assert metrics["accuracy"] == accuracy and metrics["mode"] == "train"
    run_dir = ws / metrics["run_dir"]
    rows = [json.loads(line) for line in (run_dir / "epochs.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert json.loads((run_dir / "config.json").read_text()) == metrics["config"]
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert ckpt["epoch"] == 3 and set(ckpt) >= {"model", "optimizer", "schedule", "generator"}
    model = torch.load(ws / metrics["model"], weights_only=False)
    assert model["test_accuracy"] == accuracy
    assert "epoch 3/3" in (run_dir / "train.log").read_text()
    assert out.count(" img/s ") == 3, "one log line per epoch"
    assert out.count("train accuracy") == 3
    assert not list(ws.rglob("*.tmp")), "atomic writes leave no temp files behind"


def test_commit_is_recorded_from_the_workspace(tmp_path: Path, tiny_cifar_root: Path,
                                               capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CT_COMMIT", raising=False)
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "commit.txt").write_text("0123abc\n")
    assert run(["--out", ws, "--data-dir", tiny_cifar_root, "--dry-run"], capsys)[0] == 0
    assert json.loads((only_run_dir(ws, "dry") / "metrics.json").read_text())["commit"] == "0123abc"


def test_dry_run_leaves_the_workspace_results_alone(tmp_path: Path, tiny_cifar_root: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "accuracy.txt").write_text("81.00\n")
    status, out, _ = run(["--out", ws, "--data-dir", tiny_cifar_root, "--dry-run"], capsys)
    assert status == 0 and "epoch 1/" in out
    assert (ws / "accuracy.txt").read_text() == "81.00\n"
    assert not (ws / "metrics.json").exists()


def _train_cmd(ws: Path, data: Path, *extra: str) -> list[str]:
    """The plain recipe (PLAIN_RECIPE alone), scaled down; airbench's levers come as `extra`."""
    return [sys.executable, str(REPO / "train.py"), "--out", str(ws), "--data-dir", str(data),
            "--preset", "plain", "--epochs", "4", "--batch-size", "32", "--dropout", "0.1",
            *extra]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, tiny_cifar_root: Path) -> Path:
    """The workspace of an uninterrupted run of _train_cmd: what every resumed run must match."""
    ws = tmp_path_factory.mktemp("reference")
    subprocess.run(_train_cmd(ws, tiny_cifar_root), check=True, capture_output=True)
    return ws


def assert_same_result(reference: Path, resumed: Path) -> None:
    """Bit for bit: the same accuracy, test loss and weights."""
    assert (resumed / "accuracy.txt").read_text() == (reference / "accuracy.txt").read_text()
    ref_metrics = json.loads((reference / "metrics.json").read_text())
    metrics = json.loads((resumed / "metrics.json").read_text())
    assert metrics["test_loss"] == ref_metrics["test_loss"]
    ref_model = torch.load(only_run_dir(reference) / "model.pt", weights_only=False)["model"]
    cut_model = torch.load(only_run_dir(resumed) / "model.pt", weights_only=False)["model"]
    for name, tensor in ref_model.items():
        assert torch.equal(tensor, cut_model[name]), f"{name} differs after resume"


def test_killed_run_resumes_to_the_same_result(tmp_path: Path, tiny_cifar_root: Path,
                                               reference: Path) -> None:
    """kill -9 just after epoch 2's checkpoint, start the same command again: it continues from
    epoch 3 and ends as if never stopped."""
    interrupted = tmp_path / "cut"
    cmd = _train_cmd(interrupted, tiny_cifar_root)
    killed = signalled_at(cmd, "after epoch 2/4", "SIGKILL")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (interrupted / "accuracy.txt").exists(), "the killed run must not have finished"
    again = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert "resuming" in again.stdout and "after epoch 2" in again.stdout
    assert "epoch 1/4" not in again.stdout, "finished epochs are not trained again"
    assert_same_result(reference, interrupted)


def test_sigterm_stops_at_once_and_the_rerun_ends_as_if_never_stopped(
        tmp_path: Path, tiny_cifar_root: Path, reference: Path) -> None:
    """`docker stop` during epoch 3: exit 143 and one line, the epoch abandoned at once rather
    than finished first, epoch 2's checkpoint intact; the same command then finishes exactly like
    an uninterrupted run, and metrics.json counts both processes' time."""
    ws = tmp_path / "ws"
    stop = signalled_at(_train_cmd(ws, tiny_cifar_root), "during epoch 3/4", "SIGTERM")
    assert stop.returncode == 143, stop.stderr
    (line,) = stop.stderr.splitlines()
    assert line.startswith("train.py: stopped by SIGTERM during epoch 3/4 of train-"), line
    assert line.endswith("; the checkpoint of epoch 2 is kept: run the same command again (or "
                         "job6 restarts it) to continue"), line
    run_dir = only_run_dir(ws)
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert ckpt["epoch"] == 2 and "epoch 3/4" not in stop.stdout
    assert len((run_dir / "epochs.jsonl").read_text().splitlines()) == 2
    assert not (ws / "accuracy.txt").exists() and not list(ws.rglob("*.tmp"))
    stopped_s = json.loads((run_dir / "clock.json").read_text())["wall_seconds"]
    first_train_s = ckpt["train_seconds"]
    assert stopped_s > first_train_s, "the stopped process's clock covers its training"

    again = subprocess.run(_train_cmd(ws, tiny_cifar_root), capture_output=True, text=True,
                           check=True)
    assert "after epoch 2" in again.stdout and "epoch 1/4" not in again.stdout
    assert_same_result(reference, ws)
    metrics = json.loads((ws / "metrics.json").read_text())
    assert metrics["resumes"] == 1
    assert json.loads((reference / "metrics.json").read_text())["resumes"] == 0
    second_train_s = metrics["train_seconds"] - first_train_s
    # wall_time_s and train_seconds are rounded to 2 decimals
    assert metrics["wall_time_s"] >= stopped_s + second_train_s - 0.01, (
        "wall_time_s counts the stopped process's time as well as the resumed one's")


def test_a_signal_waits_for_the_write_in_progress_and_handlers_are_restored() -> None:
    before = signal.getsignal(signal.SIGTERM)
    finished_writing = False
    with stopping.handling_signals():
        with pytest.raises(stopping.Stopped) as stop, stopping.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # the handler has run by now, and must not have raised
            finished_writing = True
        assert finished_writing and stop.value.exit_status == 143
    with stopping.handling_signals():
        stopping.finishing()
        os.kill(os.getpid(), signal.SIGINT)  # ignored: the results are being published
        time.sleep(0.05)
    assert signal.getsignal(signal.SIGTERM) is before


def test_sigint_stops_with_130_and_keeps_the_checkpoint(tmp_path: Path,
                                                        tiny_cifar_root: Path) -> None:
    ws = tmp_path / "ws"
    stop = signalled_at(_train_cmd(ws, tiny_cifar_root), "during epoch 2/4", "SIGINT")
    assert stop.returncode == 130, stop.stderr
    (line,) = stop.stderr.splitlines()
    assert line.startswith("train.py: stopped by SIGINT during epoch 2/4 "), line
    assert "the checkpoint of epoch 1 is kept" in line, line
    ckpt = torch.load(only_run_dir(ws) / "checkpoint.pt", weights_only=False)
    assert ckpt["epoch"] == 1
    assert json.loads((only_run_dir(ws) / "clock.json").read_text())["wall_seconds"] > 0


def test_explicit_resume_and_fresh(tmp_path: Path, tiny_cifar_root: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    ws = tmp_path / "ws"
    args = ["--out", ws, "--data-dir", tiny_cifar_root, *QUICK]
    status, _, err = run([*args, "--resume"], capsys)
    assert status == 2 and "no unfinished train run" in err
    assert run(args, capsys)[0] == 0
    assert run([*args, "--fresh"], capsys)[0] == 0
    assert len(list(ws.glob("runs/train-*"))) == 2, "--fresh starts a new run folder"
    status, _, err = run([*args, "--fresh", "--resume"], capsys)
    assert status == 2 and "contradict" in err


def _empty_dir(tmp: Path) -> Path:
    (tmp / "empty").mkdir()
    return tmp / "empty"


def _path_under_a_file(tmp: Path) -> Path:
    (tmp / "file").write_text("x")
    return tmp / "file" / "ws"


# Each case: the flags to add, given a private tmp folder.
BAD_INPUT = {
    "epochs zero": lambda tmp: ["--epochs", "0"],
    "negative lr": lambda tmp: ["--lr", "-0.1"],
    "unknown optimizer": lambda tmp: ["--optimizer", "rmsprop"],
    "unknown device": lambda tmp: ["--device", "tpu"],
    "unknown precision": lambda tmp: ["--precision", "fp16"],
    "not a number": lambda tmp: ["--batch-size", "many"],
    "unknown flag": lambda tmp: ["--epoch", "3"],
    "bad knob": lambda tmp: ["--blocks", "9"],
    "no dataset": lambda tmp: ["--data-dir", _empty_dir(tmp)],
    "unwritable out": lambda tmp: ["--out", _path_under_a_file(tmp)],
    "tune without budget": lambda tmp: ["--tune", "--time-budget", "0"],
    "tune unknown optimizer": lambda tmp: ["--tune", "--optimizers", "sgd,lbfgs"],
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_line_and_keeps_results(case: str, tmp_path: Path, tiny_cifar_root: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "accuracy.txt").write_text("81.27\n")
    argv = ["--out", ws, "--data-dir", tiny_cifar_root, *QUICK, *BAD_INPUT[case](tmp_path)]
    status, _, err = run(argv, capsys)
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train.py: error:"), err
    assert (ws / "accuracy.txt").read_text() == "81.27\n"


def test_cuda_asked_without_gpu_is_refused(tmp_path: Path, tiny_cifar_root: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: --device cuda is valid here")
    status, _, err = run(["--out", tmp_path, "--data-dir", tiny_cifar_root, "--device", "cuda"],
                         capsys)
    assert status == 2 and "no CUDA GPU" in err


def test_precision_fp32_turns_bf16_off(tmp_path: Path, tiny_cifar_root: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """auto takes bf16 where the CPU has native bf16 instructions; fp32 never does, and the run
    records which it computed in."""
    assert make_compute("cpu", "fp32").amp_dtype is None
    with pytest.raises(UsageError, match="unknown precision 'fp16'"):
        make_compute("cpu", "fp16")
    auto = make_compute("cpu", "auto").amp_dtype
    assert auto == (torch.bfloat16 if cpu_has_bf16() else None)
    ws = tmp_path / "ws"
    status, out, _ = run(["--out", ws, "--data-dir", tiny_cifar_root, *QUICK,
                          "--device", "cpu", "--precision", "fp32"], capsys)
    assert status == 0 and out.startswith("device cpu (fp32, ")
    assert json.loads((ws / "metrics.json").read_text())["device"].startswith("cpu (fp32, ")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: p.write_bytes(b"\x00garbage"), "is corrupt"),
        (lambda p: torch.save({"config": {"epochs": 99}}, p), "belongs to another config"),
    ],
)
def test_bad_checkpoint_is_refused_and_nothing_lost(tmp_path: Path, tiny_cifar_root: Path,
                                                    capsys: pytest.CaptureFixture[str],
                                                    damage, message: str) -> None:
    ws = unfinished_run(tmp_path, tiny_cifar_root, capsys)
    before = {p: p.read_bytes() for p in (ws / "accuracy.txt", ws / "metrics.json")}
    damage(only_run_dir(ws) / "checkpoint.pt")
    status, _, err = run(["--out", ws, "--data-dir", tiny_cifar_root, *QUICK], capsys)
    assert status == 2 and message in err and "--fresh" in err
    assert len(err.strip().splitlines()) == 1
    assert {p: p.read_bytes() for p in before} == before


def test_bad_input_through_the_real_cli(tmp_path: Path) -> None:
    """The same contract seen from outside: exit status 2 and one line, no traceback."""
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "--out", str(tmp_path),
                           "--data-dir", str(tmp_path / "nowhere")], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "no CIFAR-10 in" in proc.stderr


def test_every_training_flag_says_its_meaning_and_the_default_presets_value(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert set(config.CONFIG_HELP) == set(config.PLAIN_RECIPE)
    default = config.default_config()
    assert default == {**config.PLAIN_RECIPE, **config.PRESETS["default"]}
    assert default["epochs"] != config.PLAIN_RECIPE["epochs"], "the two are told apart below"
    status, out, _ = run(["--help"], capsys)
    assert status == 0
    flat = " ".join(out.split())  # argparse wraps long help lines
    assert "Each default below is the config `python train.py` runs: the default preset" in flat
    for key, meaning in config.CONFIG_HELP.items():
        value = default[key]
        shown = ("yes" if value else "no") if isinstance(value, bool) else value
        assert f"{' '.join(meaning.split())} (default: {shown})" in flat, key
    assert ("--optimizers OPTIMIZERS optimizers the search uses (default: sgd,adam,adamw,muon)"
            in flat)


# --- lineage and --reproduce ------------------------------------------------------------------

LEVERS = ["--stem", "whiten", "--whiten-bias-epochs", "2", "--lookahead", "yes",
           "--lookahead-start", "0.2", "--tta-translate", "yes", "--flip", "alternate",
           "--bn-scales", "no", "--bias-lr-scale", "8", "--dirac-init", "yes", "--crop-pad", "2",
           "--train-sizes", "16,24,32", "--cutout", "8", "--optimizer", "muon"]


@pytest.fixture(scope="module")
def reference_levers(tmp_path_factory: pytest.TempPathFactory, tiny_cifar_root: Path) -> Path:
    """An uninterrupted run with the whitening stem, lookahead and translated TTA."""
    ws = tmp_path_factory.mktemp("reference-levers")
    subprocess.run(_train_cmd(ws, tiny_cifar_root, *LEVERS), check=True, capture_output=True)
    return ws


@pytest.mark.slow  # the plain recipe's resume test covers the mechanism in the fast suite
def test_killed_run_with_airbench_levers_resumes_to_the_same_result(
        tmp_path: Path, tiny_cifar_root: Path, reference_levers: Path) -> None:
    """Killed after epoch 2 of 4: the lookahead average (started in epoch 1: 32 steps an epoch,
    start at step 26) and Muon's momentum for the filters come back from the checkpoint, and the
    whitening bias, trained for 2 epochs, is frozen in the resumed process as it was in the
    uninterrupted one."""
    cmd = _train_cmd(tmp_path / "cut", tiny_cifar_root, *LEVERS)
    killed = signalled_at(cmd, "after epoch 2/4", "SIGKILL")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    ckpt = torch.load(only_run_dir(tmp_path / "cut") / "checkpoint.pt", weights_only=False)
    assert ckpt["epoch"] == 2 and isinstance(ckpt["lookahead"], dict), "the average is kept"
    assert ckpt["optimizer"]["param_groups"][-1]["muon"], "the filters' Muon group is kept"
    for name, tensor in ckpt["model"].items():
        if tensor.is_floating_point():
            assert torch.equal(tensor, ckpt["lookahead"][name]), f"{name}: net == average"
    again = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert "resuming" in again.stdout and "after epoch 2" in again.stdout
    assert_same_result(reference_levers, tmp_path / "cut")


def _batch_norm_scales(saved: dict) -> list[torch.Tensor]:
    model = build_model(saved["config"])
    return [saved["model"][f"{name}.weight"] for name, module in model.named_modules()
            if isinstance(module, torch.nn.BatchNorm2d)]


def test_the_lever_flags_shape_the_trained_model(reference: Path,
                                                 reference_levers: Path) -> None:
    """--bn-scales no keeps every batch norm's scale at 1 through training, where the plain run
    trains them; the whitening stem's filters stay frozen, each still the negative of another."""
    plain = torch.load(only_run_dir(reference) / "model.pt", weights_only=False)
    levers = torch.load(only_run_dir(reference_levers) / "model.pt", weights_only=False)
    fixed, trained = _batch_norm_scales(levers), _batch_norm_scales(plain)
    assert fixed and all(torch.equal(scale, torch.ones_like(scale)) for scale in fixed)
    assert trained and not all(torch.equal(scale, torch.ones_like(scale)) for scale in trained)
    whitening = levers["model"]["features.0.weight"]
    assert torch.equal(whitening[12:], -whitening[:12])
