"""New labelled data through the pipeline, on the real CIFAR-10 copy: a champion trained on the
first 40,000 training images, the other 10,000 then added as an increment (ImageFolder layout,
PNG files), and the change check before and after.

    python bench/data_increment.py [--data ../shared/data/cifar-10-python.tar.gz]
                                   [--train-args "--preset fast --seed 1"] [--keep DIR]

Steps (local runtime, the job scripts as Jenkins runs them): job1..job4 train and judge the
champion on the 40,000; `ct.pipeline.changes check` with nothing changed (skipped, timed); the
10,000 written to <workspace>/data/increments/withheld/train/<class>/*.png; the check again (sees
the new data version, timed: the first look hashes the 10,000 files); job2's retrain, job3, job4
(the same test set, so the two models are compared on the same numbers); the check once more
(unchanged, timed: the per-file digests come from the cache). Prints the accuracies, the
per-class change and the times. About 5 minutes on 2 cores with the fast preset: run it alone.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.pipeline_overhead import make_repo  # noqa: E402
from ct.data_version import CLASSES  # noqa: E402

SPLIT_AT = 40_000


def read_cifar(archive: Path, into: Path) -> Path:
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    return into / "cifar-10-batches-py"


def load_batch(path: Path) -> dict:
    with open(path, "rb") as handle:
        return pickle.load(handle, encoding="bytes")


def build_base_and_increment(source: Path, base: Path, increment: Path) -> None:
    """base: the python layout with the first SPLIT_AT training images in five batches;
    increment: the rest as PNG files, one folder per class."""
    batches = [load_batch(source / f"data_batch_{i}") for i in range(1, 6)]
    data = np.concatenate([b[b"data"] for b in batches])
    labels = np.concatenate([np.asarray(b[b"labels"]) for b in batches])
    folder = base / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    per_batch = SPLIT_AT // 5
    for i in range(5):
        part = slice(i * per_batch, (i + 1) * per_batch)
        batch = {b"batch_label": f"training batch {i + 1} of 5".encode(),
                 b"labels": labels[part].tolist(), b"data": data[part],
                 b"filenames": [f"{n:05d}.png".encode() for n in range(part.start, part.stop)]}
        with open(folder / f"data_batch_{i + 1}", "wb") as handle:
            pickle.dump(batch, handle, protocol=2)
    for name in ("test_batch", "batches.meta"):
        shutil.copy2(source / name, folder / name)
    for n in range(SPLIT_AT, len(labels)):
        pixels = data[n].reshape(3, 32, 32).transpose(1, 2, 0)
        path = increment / "train" / CLASSES[int(labels[n])] / f"{n:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path)


def job(env: dict[str, str], script: str, *args: str) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run([str(REPO / "scripts" / script), *args], env=env, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        sys.exit(f"{script} exit {proc.returncode}:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0, proc.stderr


def check(env: dict[str, str], ws: Path) -> tuple[float, str, str]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ct.pipeline.changes", "--workspace", str(ws),
                           "check"], env=env, cwd=REPO, capture_output=True, text=True,
                          check=True)
    return time.perf_counter() - t0, proc.stdout.split()[0], proc.stderr.strip()


def chain(env: dict[str, str], retrain: bool, repo: Path) -> float:
    total = 0.0
    steps = [("job2-image.sh",), ("job3-train.sh",), ("job4-gate.sh",)]
    if not retrain:
        steps.insert(0, ("job1-pull.sh", str(repo)))
    for script, *args in steps:
        seconds, _ = job(env, script, *args)
        total += seconds
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path,
                        default=REPO.parent / "shared" / "data" / "cifar-10-python.tar.gz")
    parser.add_argument("--train-args", default="--preset fast --seed 1")
    parser.add_argument("--keep", type=Path, help="keep the workspace here")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ct-increment-"))
    try:
        t0 = time.perf_counter()
        source = read_cifar(args.data, tmp / "full")
        increment = tmp / "withheld"
        build_base_and_increment(source, tmp / "base40k", increment)
        print(f"data: base {SPLIT_AT} training images + an increment of "
              f"{sum(1 for _ in increment.rglob('*.png'))} PNG files, made in "
              f"{time.perf_counter() - t0:.1f} s")
        repo = tmp / "repo"
        repo.mkdir()
        make_repo(repo)
        ws = args.keep or tmp / "ws"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CT_", "SMTP_"))}
        env.update(CT_WORKSPACE=str(ws), CT_RUNTIME="local", CT_PYTHON=sys.executable,
                   CT_DATA_DIR=str(tmp / "base40k"), CT_TRAIN_ARGS=args.train_args,
                   CT_THRESHOLD="70", PATH=f"{Path(sys.executable).parent}:{env['PATH']}")
        first_s = chain(env, retrain=False, repo=repo)
        champion = json.loads((ws / "best.json").read_text())
        print(f"champion ({SPLIT_AT} images): {champion['accuracy']:.2f}%, chain {first_s:.1f} s")
        seconds, verdict, why = check(env, ws)
        print(f"check, nothing changed: {verdict} in {seconds:.2f} s ({why})")
        shutil.copytree(increment, ws / "data" / "increments" / "withheld")
        seconds, verdict, why = check(env, ws)
        print(f"check, increment added: {verdict} in {seconds:.2f} s ({why[:160]}...)")
        second_s = chain(env, retrain=True, repo=repo)
        latest = json.loads((ws / "metrics.json").read_text())
        best = json.loads((ws / "best.json").read_text())
        promoted = best["run_id"] == latest["run_id"]
        print(f"challenger ({latest['data']['base_train'] + latest['data']['increment_train']} "
              f"images): {latest['accuracy']:.2f}%, chain {second_s:.1f} s; "
              f"{'promoted' if promoted else 'not promoted'}")
        before, after = champion.get("per_class_accuracy", {}), latest["per_class_accuracy"]
        deltas = {c: after[c] - before[c] for c in after if before.get(c) is not None}
        print("per class (challenger - champion, points): " + ", ".join(
            f"{c} {d:+.2f}" for c, d in deltas.items()))
        seconds, verdict, why = check(env, ws)
        print(f"check, nothing changed since: {verdict} in {seconds:.2f} s ({why})")
        mails = sorted((ws / "outbox").glob("*.eml"))
        print(f"mails in the outbox: {len(mails)}; report: {ws / 'report' / 'index.html'}")
    finally:
        if args.keep is None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
