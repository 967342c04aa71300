"""Micro-batching: requests put their decoded images in a queue, one worker takes what waits
(up to max_batch images; after the first arrives it waits `wait_s` for company) and runs one
ONNX Runtime call per model in a thread of its own, so the event loop keeps accepting and
decoding while the model computes. Requests that arrive during a call make the next batch.

Each job names the model it started with: a swap between its arrival and its turn does not
change the model that answers it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ct.serving.model import Model


@dataclass
class Job:
    model: Model
    images: np.ndarray
    future: asyncio.Future[np.ndarray]


class Batcher:
    def __init__(self, max_batch: int, wait_s: float,
                 observe: Callable[[int], None] = lambda size: None) -> None:
        self.max_batch, self.wait_s, self.observe = max_batch, wait_s, observe
        self.waiting: deque[Job] = deque()
        self.ready = asyncio.Event()
        # One call at a time: ONNX Runtime's intra-op threads already use the cores.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnx")

    async def probabilities(self, model: Model, images: np.ndarray) -> np.ndarray:
        """The model's class probabilities for `images`, computed in some batch."""
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self.waiting.append(Job(model, images, future))
        self.ready.set()
        return await future

    def waiting_images(self) -> int:
        return sum(len(job.images) for job in self.waiting)

    async def run(self) -> None:
        """The worker: forever take a batch and answer it."""
        while True:
            await self.ready.wait()
            if self.wait_s > 0 and self.waiting_images() < self.max_batch:
                await asyncio.sleep(self.wait_s)
            jobs = self._take()
            if not self.waiting:
                self.ready.clear()
            for model, group in _by_model(jobs):
                await self._answer(model, group)

    def _take(self) -> list[Job]:
        """Jobs from the front, up to max_batch images (at least one job, however large)."""
        jobs, count = [], 0
        while self.waiting:
            size = len(self.waiting[0].images)
            if jobs and count + size > self.max_batch:
                break
            job = self.waiting.popleft()
            if not job.future.done():  # a client that went away cancelled its future
                jobs.append(job)
                count += size
        return jobs

    async def _answer(self, model: Model, jobs: list[Job]) -> None:
        batch = np.concatenate([job.images for job in jobs])
        loop = asyncio.get_running_loop()
        try:
            parts = []
            for start in range(0, len(batch), self.max_batch):  # one job over max_batch
                chunk = batch[start:start + self.max_batch]
                self.observe(len(chunk))
                parts.append(await loop.run_in_executor(self.executor, model.probabilities,
                                                        chunk))
            probabilities = np.concatenate(parts)
        except Exception as exc:  # ONNX Runtime's errors: every job of the batch gets it
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        start = 0
        for job in jobs:
            end = start + len(job.images)
            if not job.future.done():
                job.future.set_result(probabilities[start:end])
            start = end

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


def _by_model(jobs: list[Job]) -> list[tuple[Model, list[Job]]]:
    """The jobs grouped by the model they asked, in order of first arrival."""
    groups: dict[int, tuple[Model, list[Job]]] = {}
    for job in jobs:
        groups.setdefault(id(job.model), (job.model, []))[1].append(job)
    return list(groups.values())
