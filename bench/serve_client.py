"""The load generator of bench/serve_load.py: closed-loop HTTP/1.1 clients on raw asyncio sockets.

Each of C connections sends a request, reads the whole answer, and sends the next (keep-alive),
until a request count or a deadline is reached. The requests are built once as bytes, and an
answer is parsed only as far as its status line, Content-Length and the "model" field, so that the
generator takes as little as possible of the CPU it shares with the service on a small machine;
`Load.cpu_seconds` says how much it took.

Not a module to run: bench/serve_load.py imports it.
"""

from __future__ import annotations

import asyncio
import io
import pickle
import resource
import tarfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

BOUNDARY = "ctbenchboundary7d1f"


@dataclass
class Load:
    """What one load run saw."""

    concurrency: int
    images_per_request: int
    latencies: list[float] = field(default_factory=list)  # seconds, successful requests
    failures: Counter[str] = field(default_factory=Counter)  # "HTTP 503", "ConnectionReset..."
    models: Counter[str] = field(default_factory=Counter)  # the model id that answered
    seconds: float = 0.0  # wall-clock of the measured window
    cpu_seconds: float = 0.0  # this process's CPU time over the window (the generator's cost)

    @property
    def ok(self) -> int:
        return len(self.latencies)

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    def percentile_ms(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return 1e3 * ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]

    @property
    def requests_per_s(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    @property
    def images_per_s(self) -> float:
        return self.requests_per_s * self.images_per_request

    def line(self) -> str:
        what = (f"{self.images_per_request} images/request" if self.images_per_request > 1
                else "1 image/request")
        text = (f"concurrency {self.concurrency:>2}, {what}: p50 {self.percentile_ms(50):.1f} ms, "
                f"p99 {self.percentile_ms(99):.1f} ms, {self.requests_per_s:,.0f} requests/s, "
                f"{self.images_per_s:,.0f} images/s ({self.ok} ok, {self.failed} failed, "
                f"{self.seconds:.1f} s; generator CPU {self.cpu_share:.0%})")
        if self.failures:
            text += " failures: " + ", ".join(f"{k} x{v}" for k, v in self.failures.items())
        return text

    @property
    def cpu_share(self) -> float:
        """The generator's CPU time over the window's wall-clock (1.0: one core's worth)."""
        return self.cpu_seconds / self.seconds if self.seconds else 0.0


def cifar_test_images(data_dir: Path, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `count` CIFAR-10 test images, uint8 (count, 3, 32, 32), and their labels,
    from the python-version archive or folder in `data_dir` (no torch needed)."""
    folder = data_dir / "cifar-10-batches-py" / "test_batch"
    if folder.is_file():
        raw = folder.read_bytes()
    else:
        with tarfile.open(data_dir / "cifar-10-python.tar.gz") as archive:
            member = archive.extractfile("cifar-10-batches-py/test_batch")
            if member is None:
                raise FileNotFoundError("cifar-10-batches-py/test_batch")
            raw = member.read()
    batch = pickle.loads(raw, encoding="bytes")
    images = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)[:count]
    return images, np.asarray(batch[b"labels"], dtype=np.int64)[:count]


def png(image: np.ndarray) -> bytes:
    """A uint8 (3, 32, 32) image as PNG bytes."""
    out = io.BytesIO()
    Image.fromarray(image.transpose(1, 2, 0)).save(out, format="PNG")
    return out.getvalue()


def single_request(body: bytes, host: str) -> bytes:
    head = (f"POST /predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/png\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


def multipart_request(bodies: list[bytes], host: str) -> bytes:
    parts = []
    for i, body in enumerate(bodies):
        parts.append(f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"image\"; "
                     f"filename=\"{i}.png\"\r\nContent-Type: image/png\r\n\r\n".encode()
                     + body + b"\r\n")
    payload = b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()
    head = (f"POST /predict HTTP/1.1\r\nHost: {host}\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n")
    return head.encode() + payload


def requests_for(pngs: list[bytes], per_request: int, host: str, count: int = 64) -> list[bytes]:
    """`count` distinct requests of `per_request` images each, taken in turn from `pngs`."""
    out = []
    for i in range(count):
        start = (i * per_request) % len(pngs)
        chosen = [pngs[(start + j) % len(pngs)] for j in range(per_request)]
        out.append(single_request(chosen[0], host) if per_request == 1
                   else multipart_request(chosen, host))
    return out


async def _answer(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    return status, await reader.readexactly(length)


def _model_of(body: bytes) -> str:
    at = body.find(b'"model":"')
    return body[at + 9:body.find(b'"', at + 9)].decode() if at >= 0 else "?"


async def _client(host: str, port: int, requests: list[bytes], offset: int, load: Load,
                  window: list[float], stop: float, budget: list[int]) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    i = offset
    try:
        while budget[0] > 0 and time.perf_counter() < stop:
            budget[0] -= 1
            t0 = time.perf_counter()
            writer.write(requests[i % len(requests)])
            i += 1
            try:
                status, body = await _answer(reader)
            except (OSError, asyncio.IncompleteReadError) as exc:
                load.failures[type(exc).__name__] += 1
                writer.close()
                reader, writer = await asyncio.open_connection(host, port)
                continue
            if t0 < window[0]:
                continue  # warm-up: neither counted nor timed
            if status != 200:
                load.failures[f"HTTP {status}"] += 1
                continue
            load.latencies.append(time.perf_counter() - t0)
            load.models[_model_of(body)] += 1
    finally:
        writer.close()


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _run(host: str, port: int, requests: list[bytes], concurrency: int, per_request: int,
               seconds: float, max_requests: int, warmup: float) -> Load:
    load = Load(concurrency, per_request)
    begin = time.perf_counter()
    window = [begin + warmup]
    budget = [max_requests]
    tasks = [asyncio.create_task(_client(host, port, requests, k * 7, load, window,
                                         begin + warmup + seconds, budget))
             for k in range(concurrency)]
    await asyncio.sleep(max(0.0, window[0] - time.perf_counter()))
    cpu0 = _cpu()
    measured_from = time.perf_counter()
    await asyncio.gather(*tasks)
    load.seconds = time.perf_counter() - measured_from
    load.cpu_seconds = _cpu() - cpu0
    return load


def run_load(port: int, requests: list[bytes], concurrency: int, per_request: int = 1,
             seconds: float = 5.0, max_requests: int = 50_000, warmup: float = 0.5,
             host: str = "127.0.0.1") -> Load:
    """Closed-loop load: `concurrency` connections, each sending the next of `requests` as soon
    as its last answer is in, for `warmup` + `seconds` or `max_requests` requests in all."""
    return asyncio.run(_run(host, port, requests, concurrency, per_request, seconds,
                            max_requests, warmup))
