"""The service's Prometheus metrics, kept in the event loop's thread and written as the text
exposition format (no client library: six metrics do not need one).

ct_serve_requests_total{endpoint,code}, ct_serve_images_total, ct_serve_request_seconds
{endpoint} (histogram), ct_serve_batch_size (histogram), ct_serve_model_info{id,commit} 1,
ct_serve_swaps_total{result}.
"""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field

SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


@dataclass
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def observe(self, value: float) -> None:
        if not self.counts:
            self.counts = [0] * len(self.buckets)
        index = bisect.bisect_left(self.buckets, value)
        if index < len(self.buckets):
            self.counts[index] += 1
        self.total += value
        self.count += 1

    def lines(self, name: str, labels: str) -> list[str]:
        counts = self.counts or [0] * len(self.buckets)
        sep = "," if labels else ""
        out, running = [], 0
        for bound, count in zip(self.buckets, counts, strict=True):
            running += count
            out.append(f'{name}_bucket{{{labels}{sep}le="{bound:g}"}} {running}')
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        braces = f"{{{labels}}}" if labels else ""
        out += [f"{name}_sum{braces} {self.total:.6f}", f"{name}_count{braces} {self.count}"]
        return out


def label(value: str) -> str:
    """A label value, escaped as the exposition format wants."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


@dataclass
class Metrics:
    requests: Counter[tuple[str, int]] = field(default_factory=Counter)
    images: int = 0
    seconds: dict[str, Histogram] = field(default_factory=dict)
    batch_size: Histogram = field(default_factory=lambda: Histogram(BATCH_BUCKETS))

    def request(self, endpoint: str, code: int, seconds: float) -> None:
        self.requests[(endpoint, code)] += 1
        self.seconds.setdefault(endpoint, Histogram(SECONDS_BUCKETS)).observe(seconds)

    def render(self, model_id: str | None, commit: str | None, swaps: dict[str, int]) -> str:
        out = ["# HELP ct_serve_requests_total HTTP requests answered, by endpoint and status.",
               "# TYPE ct_serve_requests_total counter"]
        out += [f'ct_serve_requests_total{{endpoint="{label(e)}",code="{c}"}} {n}'
                for (e, c), n in sorted(self.requests.items())]
        out += ["# HELP ct_serve_images_total Images classified.",
                "# TYPE ct_serve_images_total counter", f"ct_serve_images_total {self.images}",
                "# HELP ct_serve_request_seconds Time to answer a request, by endpoint.",
                "# TYPE ct_serve_request_seconds histogram"]
        for endpoint, histogram in sorted(self.seconds.items()):
            out += histogram.lines("ct_serve_request_seconds", f'endpoint="{label(endpoint)}"')
        out += ["# HELP ct_serve_batch_size Images in one ONNX Runtime call.",
                "# TYPE ct_serve_batch_size histogram"]
        out += self.batch_size.lines("ct_serve_batch_size", "")
        out += ["# HELP ct_serve_model_info The model serving now.",
                "# TYPE ct_serve_model_info gauge"]
        if model_id is not None:
            out.append(f'ct_serve_model_info{{id="{label(model_id)}",commit="'
                       f'{label(commit or "")}"}} 1')
        out += ["# HELP ct_serve_swaps_total Model swaps tried, by result (ok, failed).",
                "# TYPE ct_serve_swaps_total counter"]
        out += [f'ct_serve_swaps_total{{result="{r}"}} {swaps.get(r, 0)}' for r in ("ok", "failed")]
        return "\n".join(out) + "\n"
