"""Test accuracy of a trained run at three TTA levels, without training anything.

    python bench/tta_eval.py RUN_DIR [RUN_DIR ...] [--data-dir ../shared/data]

Level 0: the image only; 1: image and mirror (tta); 2: also the two 1-pixel shifts
(tta_translate, airbench's tta_level 2). Reads RUN_DIR/model.pt; evaluates on the CPU unless a
GPU is visible. One line per run: its id, the config's own levels, and the three accuracies with
the evaluation seconds of each (level 2 runs 6 forwards per image, level 1 two).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ct import workspace as names  # noqa: E402
from ct.trainer.data import load_cifar  # noqa: E402
from ct.trainer.engine import DEVICES, evaluate, make_compute  # noqa: E402
from ct.trainer.state import load_model  # noqa: E402

LEVELS = {0: (False, False), 1: (True, False), 2: (True, True)}  # level: (flip, translate)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR")
    p.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    p.add_argument("--device", default="auto", choices=DEVICES)
    args = p.parse_args()
    compute = make_compute(args.device)
    data = load_cifar(args.data_dir)
    x, y = data.test_x.to(compute.device), data.test_y.to(compute.device)
    for run_dir in args.run_dirs:
        model, cfg = load_model(run_dir / names.RUN_MODEL, compute)
        figures = []
        for level, (flip, translate) in LEVELS.items():
            t0 = time.perf_counter()
            accuracy, _ = evaluate(model, x, y, compute, flip_tta=flip, translate=translate)
            figures.append(f"level {level} {accuracy:.2f}% ({time.perf_counter() - t0:.1f}s)")
        own = f"tta {cfg['tta']}, tta_translate {cfg['tta_translate']}"
        print(f"{run_dir.name} ({own}): " + ", ".join(figures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
