"""The prediction service as an ASGI app (Starlette): POST /predict, GET /healthz, /model,
/metrics, and a small web page at / (docs/serving.md has the answers' fields). Run it with
`python -m ct.serving --workspace WS`.

A request to /predict: the model serving at its arrival answers it (a swap meanwhile does not
change that); its body is read under the byte limit and decoded in a thread pool (ct.images,
PNG and JPEG, the pixel limit checked before decoding), at most max_active requests at a time
(memory stays bounded whatever the number of clients); its images join the micro-batcher's
queue. Every refusal is a 4xx with {"error": "one line"}.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from ct import images
from ct.serving import bodies
from ct.serving.batcher import Batcher
from ct.serving.metrics import Metrics
from ct.serving.model import prediction
from ct.serving.settings import Settings, usable_cores
from ct.serving.swap import State, Watcher

STATIC = Path(__file__).with_name("static")
PAGES = {"index.html": "text/html; charset=utf-8", "page.js": "text/javascript; charset=utf-8",
         "page.css": "text/css; charset=utf-8"}
# The page's scripts and styles come from files of this origin only (no inline code); its
# preview of the chosen image is a blob: URL the page makes itself.
HEADERS = {
    "content-security-policy": "default-src 'self'; img-src 'self' blob:; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}
ENDPOINTS = ("/", "/predict", "/healthz", "/model", "/metrics")
STATUS_OF = {images.TOO_LARGE: 413}  # every other ImageError kind is 400

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]],
                    Callable[[Message], Awaitable[None]]], Awaitable[None]]


def error(status: int, reason: str) -> JSONResponse:
    return JSONResponse({"error": " ".join(reason.split())}, status_code=status)


class Service:
    """What the endpoints share: the state, the batcher, the decoders, the metrics."""

    def __init__(self, workspace: Path, settings: Settings) -> None:
        self.workspace, self.settings = workspace, settings
        self.state = State()
        self.watcher = Watcher(workspace, settings, self.state)
        self.metrics = Metrics()
        self.batcher = Batcher(settings.max_batch, settings.batch_wait_ms / 1000,
                               self.metrics.batch_size.observe)
        self.decoders = ThreadPoolExecutor(max_workers=usable_cores(),
                                           thread_name_prefix="decode")
        self.active = asyncio.Semaphore(settings.max_active)
        self.limits = images.Limits(formats=images.SERVING.formats,
                                    max_pixels=settings.max_pixels)
        self.pages = {name: (STATIC / name).read_bytes() for name in PAGES}

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        tasks = [asyncio.create_task(self.watcher.run(), name="watch wanted.json"),
                 asyncio.create_task(self.batcher.run(), name="batcher")]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.batcher.close()
            self.decoders.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------ endpoints

    async def predict(self, request: Request) -> Response:
        model = self.state.current  # the model that answers, whatever swaps meanwhile
        if model is None:
            return error(503, f"no model is loaded: {self._why_none()}")
        async with self.active:
            try:
                sent = await bodies.images_of(request, self.settings.max_bytes,
                                              self.settings.max_images)
                pixels = await self._decode(sent)
            except bodies.Refused as refused:
                return error(refused.status, refused.reason)
            probabilities = await self.batcher.probabilities(model, np.stack(pixels))
        self.metrics.images += len(pixels)
        answers = [prediction(row, model.classes) for row in probabilities]
        if sent[0][0] is not None:  # multipart: each answer names its part's file
            answers = [{"file": name, **answer}
                       for (name, _), answer in zip(sent, answers, strict=True)]
        return JSONResponse({"model": model.id, "predictions": answers})

    async def _decode(self, sent: list[tuple[str | None, bytes]]) -> list[np.ndarray]:
        loop = asyncio.get_running_loop()
        jobs = [loop.run_in_executor(self.decoders, images.decode, data, self.limits)
                for _, data in sent]
        results = await asyncio.gather(*jobs, return_exceptions=True)
        for (name, _), result in zip(sent, results, strict=True):
            if isinstance(result, images.ImageError):
                where = f"{name}: " if name is not None else ""
                raise bodies.Refused(STATUS_OF.get(result.kind, 400), f"{where}{result}")
            if isinstance(result, BaseException):
                raise result
        return [r for r in results if isinstance(r, np.ndarray)]

    async def healthz(self, request: Request) -> Response:
        model = self.state.current
        if model is None:
            return JSONResponse({"status": "no model", "model": None,
                                 "error": self._why_none()}, status_code=503)
        return JSONResponse({"status": "ok", "model": model.id})

    async def model(self, request: Request) -> Response:
        return JSONResponse(self.state.describe())

    async def metrics_text(self, request: Request) -> Response:
        model = self.state.current
        text = self.metrics.render(None if model is None else model.id,
                                   None if model is None else model.manifest.get("commit"),
                                   self.state.swaps)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def page(self, request: Request) -> Response:
        name = request.path_params.get("name", "index.html")
        if name not in self.pages:
            return error(404, f"/static/{name} does not exist")
        return Response(self.pages[name], media_type=PAGES[name],
                        headers={"cache-control": "no-cache"})

    def _why_none(self) -> str:
        swap = self.state.swap
        if swap is None:
            return f"{self.workspace / 'serving' / 'wanted.json'} names no model yet"
        return str(swap["reason"])

    # ------------------------------------------------------------ the app

    def measured(self, app: ASGIApp) -> ASGIApp:
        """The app with the security headers on every answer, and each request counted and
        timed by endpoint in the metrics."""

        async def wrapped(scope: Scope, receive: Callable[[], Awaitable[Message]],
                          send: Callable[[Message], Awaitable[None]]) -> None:
            if scope["type"] != "http":
                return await app(scope, receive, send)
            start, status = time.perf_counter(), [500]

            async def sending(message: Message) -> None:
                if message["type"] == "http.response.start":
                    status[0] = message["status"]
                    message["headers"] = [*message.get("headers", []), *(
                        (k.encode(), v.encode()) for k, v in HEADERS.items())]
                await send(message)

            try:
                await app(scope, receive, sending)
            finally:
                path = scope.get("path", "")
                endpoint = ("/static" if path.startswith("/static/") else
                            path if path in ENDPOINTS else "other")
                self.metrics.request(endpoint, status[0], time.perf_counter() - start)

        return wrapped


async def _http_error(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    detail = exc.detail if isinstance(exc, HTTPException) else "internal error"
    return error(status, f"{request.method} {request.url.path}: {detail}")


async def _internal_error(request: Request, exc: Exception) -> Response:
    return error(500, f"internal error: {type(exc).__name__}: {exc}")


def create_app(workspace: Path, settings: Settings) -> tuple[ASGIApp, Service]:
    """The ASGI app serving `workspace`, and the Service behind it (for tests and __main__)."""
    service = Service(workspace, settings)
    routes = [Route("/predict", service.predict, methods=["POST"]),
              Route("/healthz", service.healthz, methods=["GET"]),
              Route("/model", service.model, methods=["GET"]),
              Route("/metrics", service.metrics_text, methods=["GET"]),
              Route("/", service.page, methods=["GET"]),
              Route("/static/{name}", service.page, methods=["GET"])]
    app = Starlette(routes=routes, lifespan=service.lifespan,
                    exception_handlers={HTTPException: _http_error,
                                        Exception: _internal_error})
    return service.measured(app), service


def workspace_problem(workspace: Path) -> str | None:
    """Why `workspace` cannot be served, or None."""
    if not workspace.is_dir():
        return f"--workspace {workspace} is not a folder"
    if not os.access(workspace, os.R_OK | os.X_OK):
        return f"--workspace {workspace} cannot be read"
    return None
