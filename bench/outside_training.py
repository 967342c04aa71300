"""What a run spends outside its training steps, piece by piece, in units measured in the same
process: starting Python and torch, loading the data, building the state (the whitening stem's
fit), the per-epoch glance, checkpoint and curves, the test with the preset's test-time
augmentation, and the pictures and model file after it.

    python bench/outside_training.py                      # the default preset
    python bench/outside_training.py --preset fast --data-dir ../shared/data
    python bench/outside_training.py --model RUN_DIR/model.pt   # the test of a trained network

The data load is timed on the real copy (its cache in a temporary workspace, as a pipeline run
finds it the second time); every other piece on random images, whose pixels change no cost, but
for the test: an untrained network is unsure of every image, so the margins (`--tta-margin`,
`--tta-translate-margin`) give every image every view. With --model (a trained model.pt of the
preset's network) the test is timed on the real test set with that network, as the preset tests
it. The per-epoch pieces are timed once each and multiplied by the preset's epochs.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench.units import FULL_SIZE, describe, unit_seconds  # noqa: E402
from ct.trainer import config, plots  # noqa: E402
from ct.trainer.engine import DEVICES, evaluate, evaluate_as_configured, make_compute  # noqa: E402
from ct.trainer.run import CIFAR10_CLASSES, GLANCE_IMAGES, per_class_view  # noqa: E402
from ct.trainer.runs import RunOptions, Workspace, load_data  # noqa: E402
from ct.trainer.state import TrainingState, load_model, save_checkpoint  # noqa: E402

TEST_IMAGES = 10_000


def timed(action: Callable[[], Any], repeats: int = 3) -> float:
    """The median seconds of `repeats` calls, after one untimed call (kernels, caches)."""
    action()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def fresh(found: list[torch.Tensor]) -> list[torch.Tensor]:
    """`found` emptied, for an evaluation that appends its predictions to it."""
    found.clear()
    return found


def start_seconds() -> float:
    """A fresh interpreter importing train.py (torch, the trainer), as every run starts."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import train"], cwd=REPO, check=True)
    return time.perf_counter() - start


def data_seconds(data_dir: Path) -> float | None:
    """load_data on the real copy with its cache made: decode, check, hash, increments."""
    if not any((data_dir / name).exists()
               for name in ("cifar-10-python.tar.gz", "cifar-10-batches-py")):
        return None  # no copy here: the row is left out
    with tempfile.TemporaryDirectory() as tmp:
        ws, opts = Workspace(Path(tmp)), RunOptions(data_dir=data_dir)
        return timed(lambda: load_data(opts, ws, lambda _: None), repeats=1)


def trained_test(cfg: dict[str, Any], model_path: Path, data_dir: Path, device: str
                 ) -> tuple[float, str]:
    """The preset's test of the trained network at `model_path` on the real test set."""
    compute = make_compute(device)
    model, _ = load_model(model_path, compute)
    with tempfile.TemporaryDirectory() as tmp:
        data = load_data(RunOptions(data_dir=data_dir), Workspace(Path(tmp)), lambda _: None)
    x, y = data.test_x.to(compute.device), data.test_y.to(compute.device)
    accuracy = 0.0

    def test() -> None:
        nonlocal accuracy
        accuracy, _ = evaluate_as_configured(model, x, y, compute, cfg)

    seconds = timed(test, repeats=1)
    return seconds, f"test of {model_path.parent.name} ({accuracy:.2f}%)"


def pieces(cfg: dict[str, Any], data_dir: Path, device: str) -> dict[str, float]:
    compute = make_compute(device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (TEST_IMAGES, 3, FULL_SIZE, FULL_SIZE), dtype=torch.uint8,
                      generator=gen).to(compute.device)
    y = torch.randint(0, 10, (TEST_IMAGES,), generator=gen).to(compute.device)
    state = TrainingState.build(cfg, len(x), compute, x)
    epochs = int(cfg["epochs"])
    history = [{"epoch": e + 1, "loss": 1.0, "train_accuracy": 50.0, "eval_accuracy": 50.0,
                "lr": 0.1, "images_per_s": 1000.0, "elapsed_s": float(e)} for e in range(epochs)]
    predictions: list[torch.Tensor] = []
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp)
        figures = {
            "start (python, torch, train.py)": start_seconds(),
            "data (cached copy, checked)": data_seconds(data_dir),
            "state (model, whitening fit)": timed(
                lambda: TrainingState.build(cfg, len(x), compute, x), repeats=1),
            f"glance x{epochs}": epochs * timed(lambda: evaluate(
                state.model, x[:GLANCE_IMAGES], y[:GLANCE_IMAGES], compute, flip_tta=False)),
            f"checkpoint x{epochs}": epochs * timed(lambda: save_checkpoint(
                run_dir / "checkpoint.pt", {"history": history, **state.saved(compute)})),
            f"curves x{epochs + 1}": (epochs + 1) * timed(
                lambda: plots.draw_curves(run_dir, history, print)),
            "test (the preset's TTA, untrained)": timed(lambda: evaluate_as_configured(
                state.model, x, y, compute, cfg, predictions=fresh(predictions)), repeats=1),
        }
        view = per_class_view(list(CIFAR10_CLASSES), y, predictions)
        figures["confusion and model.pt"] = timed(lambda: (
            plots.draw_confusion(run_dir, view["classes"], view["confusion_matrix"], "test",
                                 print),
            torch.save({"model": state.model.state_dict()}, run_dir / "model.pt")))
    return {name: seconds for name, seconds in figures.items() if seconds is not None}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=config.DEFAULT_PRESET, choices=sorted(config.PRESETS))
    p.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--model", type=Path, help="a trained model.pt of the preset's network: its "
                   "test on the real test set replaces the untrained one")
    args = p.parse_args()
    compute = make_compute(args.device)
    print(describe(compute))
    unit = unit_seconds(compute)
    cfg = config.preset_config(args.preset)
    figures = pieces(cfg, args.data_dir, args.device)
    if args.model is not None:
        del figures["test (the preset's TTA, untrained)"]
        seconds, name = trained_test(cfg, args.model, args.data_dir, args.device)
        figures[name] = seconds
    print(f"--preset {args.preset}, outside training (unit: one full-size epoch of --preset "
          f"plain, {unit:.1f} s here)")
    for name, seconds in figures.items():
        print(f"  {name:34s} {seconds:6.2f} s = {seconds / unit:.3f} units")
    total = sum(figures.values())
    print(f"  {'total':34s} {total:6.2f} s = {total / unit:.3f} units")
    # The glance is the run's progress report, one per epoch: the rest is what any run pays once.
    once = total - sum(seconds for name, seconds in figures.items() if name.startswith("glance"))
    print(f"  {'total but the glance':34s} {once:6.2f} s = {once / unit:.3f} units")
    return 0


if __name__ == "__main__":
    sys.exit(main())
