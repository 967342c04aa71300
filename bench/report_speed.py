"""How long ct.pipeline.report takes on a big workspace: 200 finished runs (each with metrics.json,
epochs.jsonl and a curves.png; every tenth a tuning run with trials.png), 200 history rows, a
promoted best. Target: under 5 s on 2 cores. Prints its figures; not a timed unit test.

    python bench/report_speed.py [--runs 200] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.test_report import tiny_png  # noqa: E402  (a stdlib PNG writer)

TARGET_S = 5.0


def build(ws: Path, runs: int) -> None:
    png, history = tiny_png(), ["time,build,commit,accuracy,threshold,passed"]
    for i in range(runs):
        mode = "tune" if i % 10 == 9 else "train"
        day = f"2025{1 + i // 28:02d}{1 + i % 28:02d}"
        run_id = f"{mode}-{day}-120000-{i:04x}"
        folder = ws / "runs" / run_id
        folder.mkdir(parents=True)
        accuracy = round(70 + (i * 7919 % 1700) / 100, 2)
        commit = f"{i:040x}"
        metrics = {"accuracy": accuracy, "mode": mode, "run_id": run_id,
                   "run_dir": f"runs/{run_id}", "model": f"runs/{run_id}/model.pt",
                   "commit": commit, "wall_time_s": 300 + i, "resumes": i % 3,
                   "finished_at": f"{day[:4]}-{day[4:6]}-{day[6:]}T12:00:00+00:00",
                   "config": {"lr": 0.05, "epochs": 18, "seed": i}, "lineage": {
                       "dataset_sha256": "d" * 64, "seed": i, "commit": commit,
                       "image": "ct-cifar-train:abc", "torch": "2.13.0", "device": "cpu",
                       "threads": 2, "model_sha256": f"{i:064x}"}}
        if mode == "tune":
            metrics |= {"best_params": {"lr": 0.1, "optimizer": "adamw"}, "trials": 8,
                        "trials_planned": 8, "val_accuracy": accuracy - 0.4}
            (folder / "trials.png").write_bytes(png)
        (folder / "metrics.json").write_text(json.dumps(metrics))
        (folder / "epochs.jsonl").write_text("".join(
            json.dumps({"epoch": e, "loss": 1.0 / e}) + "\n" for e in range(1, 19)))
        (folder / "curves.png").write_bytes(png)
        history.append(f"2025-01-01T00:00:00Z,{i},{commit},{accuracy},80,"
                       f"{'true' if accuracy >= 80 else 'false'}")
    (ws / "accuracy-history.csv").write_text("\n".join(history) + "\n")
    (ws / "best.json").write_text(json.dumps({
        "accuracy": 86.9, "run_id": run_id, "commit": commit, "params": {"lr": 0.05},
        "model": "models/best-0123456789abcdef.pt", "model_sha256": "f" * 64,
        "promoted_at": "2025-08-01T00:00:00Z", "mode": "train"}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ws = Path(tmp) / "ws"
        start = time.perf_counter()
        build(ws, args.runs)
        print(f"workspace: {args.runs} runs, {args.runs} history rows "
              f"(built in {time.perf_counter() - start:.2f} s), {os.cpu_count()} CPUs")
        times = []
        for _ in range(args.repeat):  # the real command, a fresh interpreter each time
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "ct.pipeline.report", "--workspace", str(ws)],
                           cwd=REPO, check=True, capture_output=True)
            times.append(time.perf_counter() - start)
        page = ws / "report" / "index.html"
        print(f"python3 -m ct.pipeline.report: median {statistics.median(times):.3f} s, "
              f"max {max(times):.3f} s over {args.repeat} runs (target < {TARGET_S:.0f} s)")
        text = page.read_text()
        rows, points = text.count('<tr class="run'), text.count("<circle ")
        print(f"page: {page.stat().st_size / 1024:.0f} KiB, {rows} run rows, "
              f"{points} chart points")
        ok = max(times) < TARGET_S
        print("OK" if ok else "TOO SLOW")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
