"""Serving under load on this machine: `python -m ct.serving` answering from a trained model's
ONNX export, driven by a load generator on loopback, beside the same weights served by torch.

    python bench/serve_load.py MODEL.pt [--data-dir ../shared/data] [--seconds 5]
                               [--also "int8 static mirror"] [--window 0] [--quick]

MODEL.pt is a model train.py wrote; it is exported as the pipeline exports a champion
(ct.trainer.export's Served and write_onnx: uint8 in, the recipe's test-time augmentation in the
graph) into a scratch workspace. The requests carry real CIFAR-10 test images as PNG files.
Printed, in order:

1. each served graph's test accuracy (the whole test set) and its cost per ONNX Runtime call
   (images/s at 1 and 256 images a call, 1 and 2 intra-op threads): the export, the
   same weights with fewer test-time views, and int8 copies of each by ONNX Runtime's static
   quantization (activation ranges from the smoke set, the first 500 test images, so the
   accuracy on the other 9,500 is given too), and a dynamic one of the export;
2. the service with its defaults serving the export, then --also GRAPH with the batching
   window --window: single-image latency p50/p99 and throughput at concurrency 1, 8 and 32;
   multipart requests of 64 and 256 images (HTTP and decoding included); three swaps
   (serving/wanted.json rewritten, to a copy of the graph and back) under concurrency-8 load,
   which must fail no request; the peak RSS;
3. with the window --window unless a row changes it: --also GRAPH with other settings (other
   windows, 1 intra-op thread, 2 uvicorn workers of 1 thread, uvicorn's plain asyncio + h11
   where uvloop and httptools are installed), the other graphs, and the export's computation
   in torch (fp32, bf16 autocast) behind the same app (bench/serve_app.py).

Each load line gives the load generator's CPU share (it shares the cores with the service) and
the service's CPU in cores. --quick: the export and section 2 for it only, shorter.
The goals: p99 <= 20 ms for one image at concurrency 8, >= 2,000 images/s batched.
"""

from __future__ import annotations

import argparse
import http.client
import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import serve_models as sm  # noqa: E402
from bench.serve_app import CLASSES  # noqa: E402
from bench.serve_client import (  # noqa: E402
    Load,
    cifar_test_images,
    png,
    requests_for,
    run_load,
)

SMOKE = 500
FAST_HTTP = all(importlib.util.find_spec(name) for name in ("uvloop", "httptools"))
SINGLE = (1, 8, 32)  # concurrency, one image a request
BATCHED = ((64, 2), (64, 4), (256, 1), (256, 2))  # (images a request, concurrency)


@dataclass
class Server:
    """A service process (with its uvicorn workers, if any) on a loopback port."""

    proc: subprocess.Popen[bytes]
    port: int
    label: str
    model: str  # the id it answers with

    def pids(self) -> list[int]:
        children = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == self.proc.pid:
                children.append(int(stat.parent.name))
        return [self.proc.pid, *children]

    def cpu_seconds(self) -> float:
        total = 0.0
        for pid in self.pids():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return total

    def peak_rss_mb(self) -> float:
        """VmHWM, summed over the service's processes (MB)."""
        total = 0
        for pid in self.pids():
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            total += next(int(line.split()[1]) for line in status.splitlines()
                          if line.startswith("VmHWM:"))
        return total / 1024

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get_json(port: int, path: str) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        answer = conn.getresponse()
        return answer.status, json.loads(answer.read() or b"null")
    finally:
        conn.close()


def start(label: str, command: list[str], env: dict[str, str], log: Path,
          model: str, timeout: float = 180) -> Server:
    """Start `command` (--port is added) and wait until /healthz names `model`."""
    port = free_port()
    with open(log, "ab") as out:
        proc = subprocess.Popen([*command, "--port", str(port)], env=env, stdout=out,
                                stderr=out, stdin=subprocess.DEVNULL)
    server = Server(proc, port, label, model)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"serve_load.py: {label} exited with {proc.returncode}; see {log}")
        try:
            status, body = get_json(port, "/healthz")
            if status == 200 and body.get("model") == model:
                return server
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    server.stop()
    raise SystemExit(f"serve_load.py: {label} did not serve {model} in {timeout:.0f} s; see {log}")


def want(ws: Path, name: str, sha: str) -> str:
    request = uuid.uuid4().hex
    wanted = ws / "serving" / "wanted.json"
    wanted.parent.mkdir(parents=True, exist_ok=True)
    part = wanted.with_suffix(".part")
    part.write_text(json.dumps({"request": request, "model": name, "sha256": sha}))
    part.replace(wanted)
    return request


class Bench:
    def __init__(self, args: argparse.Namespace, scratch: Path) -> None:
        self.args, self.scratch = args, scratch
        self.ws = scratch / "ws"
        images, self.labels = cifar_test_images(args.data_dir, 10_000)
        self.images = images
        pngs = [png(image) for image in images[:1000]]
        self.requests = {1: requests_for(pngs, 1, "127.0.0.1", 256),
                         **{n: requests_for(pngs, n, "127.0.0.1", 8) for n in (64, 256)}}
        self.smoke = scratch / "smoke.npz"
        np.savez(self.smoke, images=images[:SMOKE], labels=self.labels[:SMOKE])
        self.installed: dict[str, tuple[str, str]] = {}
        self.log = scratch / "services.log"
        self.env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2"}

    def graphs(self) -> None:
        """Export, quantize, score and cost every graph, and store each in the workspace."""
        variants, self.cfg = sm.export_views(self.args.model, self.scratch)
        self.export = variants[0].name
        if not self.args.quick:
            variants += [q for k, fp32 in enumerate(list(variants))
                         for q in sm.quantize(fp32, self.images[:SMOKE], self.scratch, k == 0)]
            names = [variant.name for variant in variants]
            if self.args.also and self.args.also not in names:
                usage_error(f"--also {self.args.also!r}: no such graph; choose from "
                            f"{', '.join(names)}")
        print(f"\n## Served graphs ({self.args.model}, TTA mirror {self.cfg['tta']}, shifts "
              f"{self.cfg['tta_translate']}): test accuracy, ONNX Runtime images/s per call")
        for variant in variants:
            sm.score(variant, self.images, self.labels, SMOKE)
            costs = [sm.call_cost(variant.path, self.images, batch, threads, self.args.call_s)
                     for threads in (1, 2) for batch in (1, 256)]
            print(f"{variant.name:<26} {variant.views} view(s): {variant.accuracy:.2f}% "
                  f"({variant.calibration_accuracy:.2f}% past the first {SMOKE}); images/s, "
                  f"1 thread: {costs[0]:,.0f} (1 a call) {costs[1]:,.0f} (256); 2 threads: "
                  f"{costs[2]:,.0f} {costs[3]:,.0f}", flush=True)
            self.install(variant.name, variant)
            self.install(f"{variant.name} copy", sm.tagged_copy(variant, self.scratch))

    def install(self, name: str, variant: sm.Variant) -> None:
        cfg = self.cfg
        manifest = {"format": "ct-export/1", "model": str(self.args.model), "opset": 17,
                    "input": {"name": "images", "dtype": "uint8", "shape": ["N", 3, 32, 32]},
                    "output": {"name": "logits"}, "classes": CLASSES,
                    "tta": {"mirror": cfg["tta"], "translate": cfg["tta_translate"]},
                    "smoke": {"images": SMOKE}, "commit": "bench", "test_images": 10_000}
        self.installed[name] = sm.install(self.ws, variant, manifest, self.smoke,
                                          sm.smoke_accuracy(variant, self.smoke))

    def service(self, label: str, graph: str, env: dict[str, str] | None = None,
                runner: list[str] | None = None) -> Server:
        name, sha = self.installed[graph]
        torch = runner is not None and "--torch" in runner
        if not torch:
            want(self.ws, name, sha)
        command = runner or [sys.executable, "-m", "ct.serving", "--workspace", str(self.ws),
                             "--host", "127.0.0.1"]
        model = f"torch-{runner[-1]}" if torch and runner else sha[:16]
        return start(label, command, {**self.env, **(env or {})}, self.log, model)

    def load(self, server: Server, concurrency: int, images: int = 1,
             seconds: float | None = None) -> Load:
        cpu = server.cpu_seconds()
        load = run_load(server.port, self.requests[images], concurrency, images,
                        seconds or self.args.seconds)
        busy = (server.cpu_seconds() - cpu) / (load.seconds + 0.5)
        others = sorted(set(load.models) - {server.model})
        wrong = f"; ANSWERED BY {', '.join(others)}" if others else ""
        print(f"  {server.label}: {load.line()}; service CPU {busy:.2f} cores{wrong}", flush=True)
        return load

    def swaps(self, server: Server, graphs: tuple[str, str], count: int = 3) -> Load:
        """`count` swaps back and forth under concurrency-8 load, each awaited on GET /model."""
        result: list[Load] = []
        runner = threading.Thread(target=lambda: result.append(run_load(
            server.port, self.requests[1], 8, 1, self.args.seconds + 4.0 * count)))
        runner.start()
        time.sleep(1.5)
        for k in range(count):
            name, sha = self.installed[graphs[(k + 1) % 2]]
            t0, request = time.perf_counter(), want(self.ws, name, sha)
            swap: dict[str, Any] = {"ok": False, "reason": "no answer to the request in 60 s"}
            while time.perf_counter() - t0 < 60:
                seen = get_json(server.port, "/model")[1]["swap"] or {}
                if seen.get("request") == request:
                    swap = seen
                    break
                time.sleep(0.05)
            print(f"  swap {k + 1} to {sha[:16]} ({graphs[(k + 1) % 2]}): "
                  f"{'ok' if swap['ok'] else 'FAILED'} in {time.perf_counter() - t0:.2f} s "
                  f"({swap['reason']})", flush=True)
            time.sleep(1.0)
        runner.join()
        load = result[0]
        answered = ", ".join(f"{model} x{n}" for model, n in load.models.items())
        print(f"  {server.label}, during {count} swaps: {load.line()}; answered by {answered}")
        return load

    def runner(self, *flags: str) -> list[str]:
        """bench/serve_app.py; with --torch on an empty workspace, where no wanted.json would
        swap the torch model for an ONNX one."""
        ws = self.scratch / "empty" if "--torch" in flags else self.ws
        ws.mkdir(exist_ok=True)
        return [sys.executable, str(REPO / "bench" / "serve_app.py"), "--workspace", str(ws),
                *flags]


def full(bench: Bench, label: str, graph: str, window: str | None = None) -> dict[str, Any]:
    """Every load on `graph` (with the batching window `window` ms, else the service's
    default), three swaps, the peak RSS."""
    figures: dict[str, Any] = {"graph": graph, "window": window or "the default"}
    http = "uvloop + httptools" if FAST_HTTP else "asyncio + h11 (uvloop, httptools not installed)"
    print(f"\n## {label}: python -m ct.serving serving {graph} (ONNX Runtime threads: the cores; "
          f"batching window: {figures['window']}; {http})")
    env = {} if window is None else {"CT_SERVE_BATCH_WAIT_MS": window}
    server = bench.service("service", graph, env)
    try:
        for c in SINGLE:
            figures[f"c{c}"] = bench.load(server, c)
        for images, c in BATCHED:
            figures[f"b{images}c{c}"] = bench.load(server, c, images)
        figures["swaps"] = bench.swaps(server, (graph, f"{graph} copy"))
        figures["rss"] = server.peak_rss_mb()
        print(f"  peak RSS of the service: {figures['rss']:.0f} MB")
    finally:
        server.stop()
    return figures


def others(bench: Bench, tuned: str, window: str) -> None:
    """Graph `tuned` with other settings, the other graphs, and the export's computation in
    torch, all with the batching window `window` ms unless a row changes it."""
    print(f"\n## Other settings (serving {tuned}), the other graphs, torch; batching window "
          f"{window} ms unless said (one image a request at concurrency 1, 8 and 32; 64 images "
          "a request, 4 at a time)")
    model, base = str(bench.args.model), {"CT_SERVE_BATCH_WAIT_MS": window}
    one = {**base, "CT_SERVE_THREADS": "1"}
    runs = [*[(f"window {ms} ms", tuned, {"CT_SERVE_BATCH_WAIT_MS": ms}, None)
              for ms in ("2", "5") if ms != window],
            ("1 ONNX Runtime thread", tuned, one, None),
            ("2 uvicorn workers x 1 thread", tuned, one, bench.runner("--workers", "2")),
            *([("asyncio + h11", tuned, base, bench.runner("--plain-http"))] if FAST_HTTP
              else []),
            *[(graph, graph, base, None) for graph in bench.installed
              if graph != tuned and not graph.endswith(" copy")],
            ("torch fp32", tuned, base, bench.runner("--torch", model, "--precision", "fp32")),
            ("torch bf16", tuned, base, bench.runner("--torch", model, "--precision", "bf16"))]
    for label, graph, env, runner in runs:
        server = bench.service(label, graph, env, runner)
        try:
            for concurrency, images in ((1, 1), (8, 1), (32, 1), (4, 64)):
                bench.load(server, concurrency, images)
            print(f"  {label}: peak RSS {server.peak_rss_mb():.0f} MB")
        finally:
            server.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path, metavar="MODEL.pt")
    p.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    p.add_argument("--seconds", type=float, default=5.0, help="measured seconds per load")
    p.add_argument("--call-s", type=float, default=1.0, help="seconds per ONNX Runtime cost")
    p.add_argument("--also", default="int8 static mirror", metavar="GRAPH",
                   help="a second graph measured as fully as the export, with --window "
                        "('' for none)")
    p.add_argument("--window", default="0", metavar="MS",
                   help="the batching window (CT_SERVE_BATCH_WAIT_MS) of --also and section 3")
    p.add_argument("--quick", action="store_true",
                   help="the export and the service's defaults only (no int8, no variants)")
    args = p.parse_args()
    if not args.model.is_file():
        usage_error(f"{args.model} is not a file; give a model.pt train.py "
                 "wrote")
    if not args.seconds > 0 or not args.call_s > 0:
        usage_error("--seconds and --call-s must be positive")
    try:
        if not float(args.window) >= 0:
            raise ValueError
    except ValueError:
        usage_error(f"--window {args.window!r}: give milliseconds, 0 or more")
    load = os.getloadavg()
    print(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
          f"({os.cpu_count()} cores)")
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        bench = Bench(args, Path(tmp))
        bench.graphs()
        also = None if args.quick else args.also
        measured = [full(bench, "The export, as the service's defaults serve it", bench.export)]
        if also:
            measured.append(full(bench, "The recommendation", also, args.window))
        if not args.quick:
            others(bench, also or bench.export, args.window)
    for figures in measured:
        summary(figures)
    load = os.getloadavg()
    print(f"\nload average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    return 0


def usage_error(message: str) -> NoReturn:
    """Bad input: one line on stderr, exit 2."""
    print(f"serve_load.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def summary(figures: dict[str, Any]) -> None:
    c8, swaps = figures["c8"], figures["swaps"]
    batched = max((figures[f"b{n}c{c}"] for n, c in BATCHED), key=lambda load: load.images_per_s)
    print(f"\n## Against the goals: {figures['graph']}, batching window {figures['window']}")
    print(f"one image at concurrency 8: p99 {c8.percentile_ms(99):.1f} ms (goal <= 20, stretch "
          f"<= 10)")
    print(f"batched: {batched.images_per_s:,.0f} images/s with {batched.images_per_request} "
          f"images a request at concurrency {batched.concurrency} (goal >= 2,000, stretch "
          ">= 4,000)")
    print(f"three swaps under load: {swaps.failed} failed of {swaps.ok + swaps.failed} requests")
    print(f"peak RSS: {figures['rss']:.0f} MB")


if __name__ == "__main__":
    sys.exit(main())
