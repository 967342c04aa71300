"""The service's variants that bench/serve_load.py compares with `python -m ct.serving`: the same
app (ct.serving.app.create_app: Starlette, the decoders, the micro-batcher) run by uvicorn with
several worker processes, or with its pure-Python loop and parser, or answering from torch
instead of ONNX Runtime.

    python bench/serve_app.py --workspace WS --port P [--workers N] [--plain-http]
                              [--torch MODEL.pt --precision fp32|bf16]

With --torch the model is MODEL.pt behind ct.trainer.export's Served (the export's own
normalisation and test-time augmentation, the recipe's), in fp32 or under bf16 autocast, with
CT_SERVE_THREADS torch threads; WS then needs no model. The settings are the service's
(CT_SERVE_*). A benchmark's tool: the service itself never imports torch.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ct.serving import settings as serving_settings  # noqa: E402
from ct.serving.app import create_app  # noqa: E402

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck"]


class TorchModel:
    """What the batcher and the endpoints use of ct.serving.model.Model, computed by torch."""

    def __init__(self, model_pt: Path, precision: str, threads: int) -> None:
        import torch

        from ct.trainer.engine import make_compute
        from ct.trainer.evaluate import load_saved
        from ct.trainer.export import Served

        self.torch, self.threads, self.bf16 = torch, threads, precision == "bf16"
        model, cfg = load_saved(model_pt, make_compute("cpu", "fp32"))
        self.served = Served(model.eval(), cfg).eval()
        self.id = self.sha256 = f"torch-{precision}"
        self.classes = CLASSES
        self.manifest: dict[str, Any] = {"commit": "torch"}
        self.loaded_at = ""
        self._configured = threading.local()

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        torch = self.torch
        if not getattr(self._configured, "done", False):  # per thread: the batcher's own
            torch.set_num_threads(self.threads)
            self._configured.done = True
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=self.bf16):
            logits = self.served(torch.from_numpy(images)).float().numpy().astype(np.float64)
        exp = np.exp(logits - logits.max(axis=1, keepdims=True))
        return exp / exp.sum(axis=1, keepdims=True)

    def info(self) -> dict[str, Any]:
        return {"id": self.id, "sha256": self.sha256, "commit": "torch", "classes": self.classes,
                "loaded_at": self.loaded_at}


def app_factory() -> Any:
    """The ASGI app for one uvicorn worker, from CT_BENCH_* (set by main)."""
    settings = serving_settings.from_environment()
    app, service = create_app(Path(os.environ["CT_BENCH_WORKSPACE"]), settings)
    model_pt = os.environ.get("CT_BENCH_TORCH")
    if model_pt:
        service.state.install(TorchModel(Path(model_pt), os.environ["CT_BENCH_PRECISION"],
                                         settings.onnx_threads))
    return app


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workspace", type=Path, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--plain-http", action="store_true",
                   help="uvicorn's asyncio loop and h11 parser, even where uvloop and httptools "
                        "are installed")
    p.add_argument("--torch", type=Path, metavar="MODEL.pt")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    args = p.parse_args()
    os.environ["CT_BENCH_WORKSPACE"] = str(args.workspace.resolve())
    os.environ["CT_BENCH_PRECISION"] = args.precision
    if args.torch:
        os.environ["CT_BENCH_TORCH"] = str(args.torch.resolve())
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    import uvicorn

    uvicorn.run("bench.serve_app:app_factory", factory=True, host=args.host, port=args.port,
                workers=args.workers, log_level="warning", access_log=False,
                loop="asyncio" if args.plain_http else "auto",
                http="h11" if args.plain_http else "auto")
    return 0


if __name__ == "__main__":
    sys.exit(main())
