"""The service's settings, from the environment (defaults written once, here; docs/serving.md
lists them). A value that is not a number in range is refused with one line naming it."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass


class SettingError(ValueError):
    """A CT_SERVE_* variable holds a value the service cannot use; str() is one line."""


def usable_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class Settings:
    max_bytes: int = 8 << 20  # CT_SERVE_MAX_BYTES: a request body
    max_pixels: int = 4096 * 4096  # CT_SERVE_MAX_PIXELS: an image's width * height
    max_images: int = 256  # CT_SERVE_MAX_IMAGES: images in one request
    max_batch: int = 256  # CT_SERVE_MAX_BATCH: images in one ONNX Runtime call
    # CT_SERVE_BATCH_WAIT_MS: how long a batch waits for company. 0: batches still form under
    # load (what queued during a call is the next batch); a wait only adds latency (measured:
    # docs/benchmarks.md, Serving)
    batch_wait_ms: float = 0.0
    threads: int = 0  # CT_SERVE_THREADS: ONNX Runtime intra-op threads (0: the usable cores)
    smoke_p99_ms: float = 50.0  # CT_SERVE_SMOKE_P99_MS: a candidate's single-image p99
    poll_s: float = 0.5  # CT_SERVE_POLL_S: how often serving/wanted.json is looked at
    max_active: int = 64  # CT_SERVE_MAX_ACTIVE: predict requests read and decoded at once

    @property
    def onnx_threads(self) -> int:
        return self.threads or usable_cores()


# variable -> (field, type, smallest allowed)
VARIABLES = {
    "CT_SERVE_MAX_BYTES": ("max_bytes", int, 1),
    "CT_SERVE_MAX_PIXELS": ("max_pixels", int, 1),
    "CT_SERVE_MAX_IMAGES": ("max_images", int, 1),
    "CT_SERVE_MAX_BATCH": ("max_batch", int, 1),
    "CT_SERVE_BATCH_WAIT_MS": ("batch_wait_ms", float, 0),
    "CT_SERVE_THREADS": ("threads", int, 0),
    "CT_SERVE_SMOKE_P99_MS": ("smoke_p99_ms", float, 0),
    "CT_SERVE_POLL_S": ("poll_s", float, 0.01),
    "CT_SERVE_MAX_ACTIVE": ("max_active", int, 1),
}


def from_environment(env: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if env is None else env
    values: dict[str, int | float] = {}
    for variable, (field, kind, least) in VARIABLES.items():
        text = env.get(variable, "").strip()
        if not text:
            continue
        try:
            value = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise SettingError(f"{variable}={text!r} is not {what}; unset it for the "
                               "default") from None
        if not least <= value < math.inf:  # NaN fails too
            raise SettingError(f"{variable}={text!r} must be a finite number, at least {least}")
        values[field] = value
    return Settings(**values)  # type: ignore[arg-type]
