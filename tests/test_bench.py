"""The benchmarks that have no other test: run small, their arithmetic checked."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO


def _epoch_cost(*flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(REPO / "bench" / "epoch_cost.py"), *flags],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # a benchmark run end to end
def test_epoch_cost_adds_each_epochs_cost_and_scales_the_forecast() -> None:
    done = _epoch_cost("--presets", "fast", "--reference", "fast", "--rounds", "1",
                       "--batches", "1", "--epoch-seconds", "10")
    assert done.returncode == 0, done.stderr
    # The machine's kernels are named beside the figures (a CPU with AMX costs differently).
    assert re.search(r"oneDNN v[\d.]+, isa .+ \((with|no) AMX\)", done.stdout.splitlines()[0])
    line = next(x for x in done.stdout.splitlines() if x.startswith("--preset fast:"))
    # --preset fast trains 2 epochs, at 24x24 and 32x32 (train_sizes "24,32").
    sizes = dict(re.findall(r"(\d+)x\d+ ([\d.]+) \(x\d+\)", line))
    counts = dict(re.findall(r"(\d+)x\d+ [\d.]+ \(x(\d+)\)", line))
    assert counts == {"24": "1", "32": "1"}
    total = re.search(r": ([\d.]+) units", line)
    assert total is not None
    units = float(total.group(1))
    assert abs(units - sum(map(float, sizes.values()))) < 0.011
    forecast = re.search(r"with 10 s a unit: (\d+) s", line)
    assert forecast is not None and abs(int(forecast.group(1)) - units * 10) <= 1


@pytest.mark.parametrize(("flags", "message"), [
    (["--presets", "fastest"], "unknown preset 'fastest'; choose from"),
    (["--set", "widht=32"], "--set: no config key 'widht'"),
    (["--set", "activation=swish"], "--set: "),
    (["--rounds", "0"], "--rounds and --batches must be at least 1"),
    (["--epoch-seconds", "0"], "--epoch-seconds must be positive"),
])
def test_epoch_cost_refuses_bad_input_in_one_line(flags: list[str], message: str) -> None:
    done = _epoch_cost(*flags)
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0
    assert len(lines) == 1 and message in lines[0], done.stderr


def test_the_isa_line_names_the_kernels_oneDNN_runs_and_its_cap() -> None:
    # oneDNN reads ONEDNN_MAX_CPU_ISA (src/cpu/x64/cpu_isa_traits.cpp): AVX2 caps every CPU here.
    probe = "from bench.units import onednn_isa; print(onednn_isa())"
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True,
                          text=True, timeout=300, check=False,
                          env={**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"})
    assert done.returncode == 0, done.stderr
    assert "isa Intel AVX2 (no AMX), capped by ONEDNN_MAX_CPU_ISA=AVX2" in done.stdout


@pytest.mark.parametrize(("script", "flags", "message"), [
    ("concurrent_runs.py", ["--processes", "1"], "--processes must be at least 2"),
    ("concurrent_runs.py", ["--subset", "10"], "--subset 1000+"),
    ("compile_cost.py", ["--presets", "fastest"], "unknown preset 'fastest'"),
])
def test_the_speed_benchmarks_refuse_bad_input_in_one_line(script: str, flags: list[str],
                                                          message: str) -> None:
    done = subprocess.run([sys.executable, str(REPO / "bench" / script), *flags],
                          capture_output=True, text=True, timeout=300, check=False)
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0 and len(lines) == 1 and message in lines[0], done.stderr


@pytest.mark.slow  # a unit, a test of 10,000 images and a fresh interpreter
def test_outside_training_lists_each_piece_in_units_and_their_sum(tmp_path) -> None:
    done = subprocess.run([sys.executable, str(REPO / "bench" / "outside_training.py"),
                           "--preset", "fast", "--data-dir", str(tmp_path / "no-copy")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    unit = float(re.search(r"plain, ([\d.]+) s here\)", done.stdout).group(1))
    rows = dict(re.findall(r"^  (.+?) +([\d.]+) s = [\d.]+ units$", done.stdout, re.M))
    # --preset fast: 2 epochs; without a data copy the data row is left out, not made up
    assert {"glance x2", "checkpoint x2", "curves x3", "test (the preset's TTA, untrained)",
            "start (python, torch, train.py)"} <= set(rows)
    assert not any(name.startswith("data") for name in rows)
    total, once = float(rows.pop("total")), float(rows.pop("total but the glance"))
    assert abs(total - sum(map(float, rows.values()))) < 0.02 * len(rows)
    assert abs(once - (total - float(rows["glance x2"]))) < 0.02
    assert all(float(seconds) > 0 for seconds in rows.values()) and unit > 0
