"""The HTTP application: OpenAI's chat completions, completions and models endpoints over built systems.

    app = create_app({"latent_mas": build_system("latent_mas", backbone)}, ServeConfig(api_key="secret"))

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models`` (and ``/v1/models/{id}``),
``GET /health`` (never needs the key). Every error is OpenAI's JSON shape. A request is checked completely
(size, fields, caps, model, settings, question length) before it is queued; then it waits for its batch while a
watcher listens for the client going away, which takes it out of the queue. A streamed request's response begins
when its batch starts (until then it can still get an error status): server-sent events carry the final agent's
answer as it decodes it, piece by piece, and a client that goes away mid-stream cancels its jobs.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from diffmas.errors import DiffMASError
from diffmas.serve.batcher import Batcher, Job, QueueFull, ShuttingDown
from diffmas.serve.engine import Item, ServedModel, TextStream, run_batch, served_topologies
from diffmas.serve.protocol import APIError, Chunks, Completion, GenerationRequest, Limits, chat_response, \
    completion_response, parse_chat, parse_completion, read_json, sse, sum_usage
from diffmas.systems import System

__all__ = ["ServeConfig", "create_app"]

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeConfig:
    """How the server batches, whom it answers, and what one request may ask for."""

    max_batch: int = 8
    """Requests answered by one rollout (``--max-batch``)."""
    batch_window_ms: float = 20.0
    """How long the oldest waiting request waits for others to join its batch (``--batch-window-ms``)."""
    max_queue: int = 64
    """Waiting requests; one more is answered 503 with Retry-After (``--max-queue``)."""
    api_key: str | None = None
    """When set, every endpoint but /health needs ``Authorization: Bearer <key>``."""
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_queue < 1 or self.batch_window_ms < 0:
            raise DiffMASError("need --max-batch >= 1, --max-queue >= 1 and --batch-window-ms >= 0")
        if self.api_key is not None and not self.api_key.strip():
            raise DiffMASError("the API key is empty")


def create_app(systems: Mapping[str, System], config: ServeConfig | None = None) -> FastAPI:
    """An app serving ``systems`` (model id -> built system; systems may share a backbone, but a trained system
    needs one of its own, see :func:`diffmas.serve.server.load_systems`). Runs under any ASGI server; the
    batcher starts and stops with the app's lifespan."""
    if not systems:
        raise DiffMASError("no systems to serve")
    config = config or ServeConfig()
    topologies = served_topologies(systems)
    models = {mid: ServedModel(mid, system, topologies) for mid, system in systems.items()}
    batcher = Batcher(lambda key, items: run_batch(models[key.model].variant(key.topology, key.latent_steps), key,
                                                   items),
                      config.max_batch, config.batch_window_ms / 1000, config.max_queue)
    service = _Service(models, batcher, config)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        batcher.start()
        yield
        await batcher.close()

    app = FastAPI(title="DiffMAS", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher = batcher
    auth = [Depends(service.authorize)]
    app.add_api_route("/health", service.health, methods=["GET"])
    app.add_api_route("/v1/models", service.list_models, methods=["GET"], dependencies=auth)
    app.add_api_route("/v1/models/{model_id:path}", service.get_model, methods=["GET"], dependencies=auth)
    app.add_api_route("/v1/chat/completions", service.chat, methods=["POST"], dependencies=auth)
    app.add_api_route("/v1/completions", service.completions, methods=["POST"], dependencies=auth)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
    return app


class _Service:
    def __init__(self, models: dict[str, ServedModel], batcher: Batcher, config: ServeConfig) -> None:
        self.models, self.batcher, self.config, self.limits = models, batcher, config, config.limits
        self.created = int(time.time())
        self._solo = itertools.count()

    def authorize(self, request: Request) -> None:
        if self.config.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.config.api_key.encode()):
            raise APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                           type="authentication_error", code="invalid_api_key")

    async def health(self) -> dict:
        return {"status": "ok", "models": list(self.models), "waiting": self.batcher.waiting,
                "running": self.batcher.running}

    def _model_entry(self, model: ServedModel) -> dict:
        return {"id": model.id, "object": "model", "created": self.created, "owned_by": "diffmas",
                "diffmas": model.describe(self.limits.default_max_tokens)}

    async def list_models(self) -> dict:
        return {"object": "list", "data": [self._model_entry(m) for m in self.models.values()]}

    async def get_model(self, model_id: str) -> dict:
        return self._model_entry(self._model(model_id))

    def _model(self, model_id: str) -> ServedModel:
        if model_id not in self.models:
            raise APIError(404, f"model '{model_id}' is not served here; served: {', '.join(self.models)}",
                           param="model", code="model_not_found")
        return self.models[model_id]

    async def chat(self, request: Request) -> Response:
        return await self._answer(request, parse_chat, True,
                                  lambda rid, req, done: chat_response(rid, int(time.time()), req.model, done[0]))

    async def completions(self, request: Request) -> Response:
        return await self._answer(request, parse_completion, False,
                                  lambda rid, req, done: completion_response(rid, int(time.time()), req.model, done))

    async def _answer(self, request: Request, parse: Callable[[dict, Limits], GenerationRequest], chat: bool,
                      respond: Callable[[str, GenerationRequest, list[Completion]], dict]) -> Response:
        try:
            raw = await _read_body(request, self.limits.max_request_bytes)
        except ClientDisconnect:  # gone before the body arrived; nobody reads an answer
            return Response(status_code=499)
        req = parse(read_json(raw), self.limits)
        model = self._model(req.model)
        for question in req.questions:
            model.check_question(question, self.limits.max_question_tokens)
        # A streamed request's queue: (answer index, a piece of its text or None once its job has ended).
        pieces: asyncio.Queue[tuple[int, str | None]] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        streams = [TextStream(partial(_hand_over, loop, pieces, index)) if req.stream else None
                   for index in range(len(req.questions))]
        entries = [(model.batch_key(req, next(self._solo)), Item(q, req.max_tokens, stream))
                   for q, stream in zip(req.questions, streams)]
        try:
            jobs = self.batcher.submit(entries)
        except QueueFull as exc:
            raise APIError(503, f"the server is busy ({exc}; --max-queue): retry later", type="server_overloaded",
                           code="queue_full", headers={"Retry-After": str(self.batcher.retry_after())}) from None
        except ShuttingDown:
            raise _shutting_down() from None
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        if not req.stream:
            if not await self._until(request, jobs, lambda job: job.future):
                return Response(status_code=499)  # the client went away; nobody reads this
            if (failure := _failure(jobs)) is not None:
                raise failure
            return JSONResponse(respond(rid, req, [job.future.result() for job in jobs]))
        # The stream begins once the batch starts: until then a request can still be refused with an error status
        # (a shutdown answers 503) or leave the queue.
        if not await self._until(request, jobs, lambda job: job.left_queue.wait()):
            return Response(status_code=499)
        if (failure := _failure(jobs)) is not None:
            self._cancel(jobs)
            raise failure
        for index, job in enumerate(jobs):
            job.future.add_done_callback(lambda _, index=index: pieces.put_nowait((index, None)))
        events = self._events(Chunks(rid, int(time.time()), req.model, chat), req, jobs, pieces)
        return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def _events(self, chunks: Chunks, req: GenerationRequest, jobs: list[Job],
                      pieces: asyncio.Queue[tuple[int, str | None]]) -> AsyncIterator[str]:
        """The server-sent events of a streamed request: the opening chunk, each piece of text as the final agent
        decodes it, each answer's finish reason as it ends, the usage, ``[DONE]``; a failure after the stream
        began is an error event. A client that goes away stops the iteration: its jobs are cancelled."""
        try:
            for chunk in chunks.opening():
                yield sse(chunk)
            done: dict[int, Completion] = {}
            while len(done) < len(jobs):
                index, piece = await pieces.get()
                if piece is not None:
                    yield sse(chunks.piece(index, piece))
                    continue
                if (failure := _failure([jobs[index]])) is not None:
                    if not isinstance(failure, APIError):
                        _log.error("a streamed request failed", exc_info=failure)
                        failure = _internal(failure)
                    yield sse(failure.body())
                    yield sse("[DONE]")
                    return
                done[index] = jobs[index].future.result()
                yield sse(chunks.finish(index, done[index].finish_reason))
            if req.include_usage:
                yield sse(chunks.usage(sum_usage([done[i].usage for i in sorted(done)])))
            yield sse("[DONE]")
        finally:
            self._cancel(jobs)  # nothing for the jobs that ended

    def _cancel(self, jobs: list[Job]) -> None:
        for job in jobs:
            self.batcher.cancel(job)

    async def _until(self, request: Request, jobs: list[Job], event: Callable[[Job], Awaitable]) -> bool:
        """Wait for ``event`` of every job; False when the client disconnects first (its jobs are then
        cancelled)."""
        events = asyncio.gather(*(event(job) for job in jobs), return_exceptions=True)
        watcher = asyncio.ensure_future(_disconnected(request))
        await asyncio.wait({events, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not events.done():
            self._cancel(jobs)
            events.cancel()
            return False
        watcher.cancel()
        return True


def _failure(jobs: list[Job]) -> Exception | None:
    """The first failure of the jobs that have ended (a refusal at shutdown as the 503 it is answered with)."""
    for job in jobs:
        exc = job.future.exception() if job.future.done() else None
        if exc is not None:
            return _shutting_down() if isinstance(exc, ShuttingDown) else exc
    return None


def _hand_over(loop: asyncio.AbstractEventLoop, pieces: asyncio.Queue, index: int, piece: str) -> None:
    """A piece of answer ``index`` from the worker thread onto the event loop's queue."""
    loop.call_soon_threadsafe(pieces.put_nowait, (index, piece))


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read: the next message is that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _too_large(len(body), limit)
    return bytes(body)


def _too_large(size: int, limit: int) -> APIError:
    return APIError(413, f"the request body has {size} bytes or more; this server's limit is {limit} "
                    "(--max-request-bytes)", code="limit_exceeded")


def _shutting_down() -> APIError:
    return APIError(503, "the server is shutting down; this request was not started", type="server_overloaded",
                    code="shutting_down", headers={"Retry-After": "5"})


async def _api_error(_request: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _http_error(_request: Request, exc: HTTPException) -> JSONResponse:
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return JSONResponse(APIError(exc.status_code, str(exc.detail), type=kind).body(), status_code=exc.status_code,
                        headers=getattr(exc, "headers", None))


async def _internal_error(_request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse(_internal(exc).body(), status_code=500)


def _internal(exc: Exception) -> APIError:
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")
