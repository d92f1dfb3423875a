# SPDX-License-Identifier: Apache-2.0
"""The OpenAI-compatible API over one or several engines (one per model), on FastAPI + uvicorn.

    POST /v1/completions, /v1/chat/completions   (stream: server-sent events, "data: {...}" ... "data: [DONE]")
    GET  /v1/models, /health, /metrics (Prometheus text)

Prompts are text (the model's tokenizer) or token ids (``prompt`` a list of ints; chat needs a tokenizer with a
chat template). Beyond OpenAI's fields: ``top_k``, ``min_tokens``, ``ignore_eos``, ``stop_token_ids``, and
``token_ids`` in each choice (the generated ids: random models have no tokenizer, so no text). A bad request gets
a 4xx with OpenAI's error body and touches no other request; a client that goes away cancels its request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from vkv.allocator import InvalidRequestError, OutOfPagesError
from vkv.engine import Engine, EngineGroup, SamplingParams
from vkv.engine.request import RequestOutput

from .remote import EngineProcessError, RemoteEngine, RemoteGroup

DISCONNECT_POLL_S = 0.2
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def _error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error") -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return JSONResponse(body, status_code=status)


class Metrics:
    """Per model: KV mapped and in use, running and waiting requests (read at scrape time), time to first token
    and between tokens (observed as tokens come), tokens and requests counted."""

    def __init__(self, group: EngineGroup | RemoteGroup):
        self.registry = CollectorRegistry()
        self.group, self.engines = group, group.engines
        r, label = self.registry, ["model"]
        self.gauges = {
            "kv_mapped_bytes": Gauge("vkv_kv_mapped_bytes", "KV bytes mapped by the model's cache", label, registry=r),
            "kv_in_use_bytes": Gauge("vkv_kv_in_use_bytes", "KV bytes the running requests hold", label, registry=r),
            "running": Gauge("vkv_requests_running", "requests holding a slot", label, registry=r),
            "waiting": Gauge("vkv_requests_waiting", "requests queued (new or preempted)", label, registry=r),
            "preemptions": Gauge("vkv_preemptions", "requests preempted so far (recomputed later)", label, registry=r),
            "device_full": Gauge(
                "vkv_kv_device_full",
                "times so far the model's growth found the device with no memory for pages the budget allowed",
                label,
                registry=r,
            ),
            "forward_out_of_memory": Gauge(
                "vkv_forward_out_of_memory",
                "times so far a forward of the model found no device memory (its requests stepped again, fewer)",
                label,
                registry=r,
            ),
            "torch_peak_reserved_bytes": Gauge(
                "vkv_torch_peak_reserved_bytes",
                "the most bytes torch's allocator has held on the GPU in the process that runs the model (weights, "
                "activations, CUDA graph pools; not the KV pages), 0 on the CPU",
                label,
                registry=r,
            ),
        }
        self.ttft = Histogram("vkv_time_to_first_token_seconds", "arrival to first token", label,
                              buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.itl = Histogram("vkv_inter_token_latency_seconds", "between a request's tokens", label,
                             buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.held = Gauge(
            "vkv_kv_budget_held_bytes",
            "KV bytes a budget counts now (pages mapped plus pages pooled for reuse), read in one snapshot: the "
            "ledger's total over every process sharing it, or one pool's pages",
            ["budget"],
            registry=r,
        )
        self.tokens = Counter("vkv_generation_tokens", "tokens generated", label, registry=r)
        self.prompts = Counter("vkv_prompt_tokens", "prompt tokens of finished requests", label, registry=r)
        self.finished = Counter("vkv_requests_finished", "requests finished", [*label, "reason"], registry=r)

    def render(self) -> bytes:
        for engine in self.engines:
            stats = engine.stats()
            for key, gauge in self.gauges.items():
                gauge.labels(engine.name).set(stats[key])
        for label, held in self.group.budgets().items():
            self.held.labels(label).set(held)
        return generate_latest(self.registry)


class Mailbox:
    """Outputs from the engine's thread to the event loop: one wake-up of the loop for all that arrived since the
    last (a step's outputs for every stream), not one per token and stream."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.lock, self.items = loop, threading.Lock(), []

    def post(self, queue: asyncio.Queue, item: Any) -> None:  # the engine's thread
        with self.lock:
            self.items.append((queue, item))
            wake = len(self.items) == 1  # else a wake-up is on its way and will take this one too
        if wake:
            with contextlib.suppress(RuntimeError):  # the loop is closed: the server has stopped, nobody listens
                self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:  # the loop
        with self.lock:
            items, self.items = self.items, []
        for queue, item in items:
            queue.put_nowait(item)


class Stream:
    """One request's outputs, carried from the engine's thread to the event loop (through the loop's mailbox)."""

    def __init__(self, mailbox: Mailbox, metrics: Metrics, model: str):
        self.mailbox, self.queue = mailbox, asyncio.Queue()
        self.metrics, self.model = metrics, model
        self.ttft, self.itl, self.tokens = (m.labels(model) for m in (metrics.ttft, metrics.itl, metrics.tokens))
        self.start, self.last = time.monotonic(), None

    def push(self, output: RequestOutput) -> None:  # the engine's thread
        now = time.monotonic()
        if output.new_token_ids:
            (self.ttft if self.last is None else self.itl).observe(now - (self.last or self.start))
            self.last = now
            self.tokens.inc(len(output.new_token_ids))
        if output.finished:
            self.metrics.finished.labels(self.model, output.finish_reason or "unknown").inc()
            self.metrics.prompts.labels(self.model).inc(output.num_prompt_tokens)
        self.mailbox.post(self.queue, output)


class Text:
    """Detokenizes a request's output as it grows; cuts it at the first stop string."""

    def __init__(self, tokenizer: Any, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, stops
        self.ids: list[int] = []
        self.sent = ""
        self.stopped = False

    def add(self, ids: list[int], final: bool) -> str:
        """The new text ("" without a tokenizer); holds back a partial character or a possible stop's start."""
        self.ids += ids
        if self.tokenizer is None or self.stopped:
            return ""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        for stop in self.stops:
            if (at := text.find(stop)) >= 0:
                text, self.stopped, final = text[:at], True, True
        if not final:
            if text.endswith("\ufffd"):
                return ""
            hold = max((len(s) - 1 for s in self.stops), default=0)
            text = text[: len(text) - hold] if hold else text
        new = text[len(self.sent) :] if text.startswith(self.sent) else ""
        self.sent += new
        return new


def create_app(engines: Engine | Sequence[Engine] | EngineGroup | RemoteGroup) -> FastAPI:
    """The FastAPI app over ``engines`` (started here if no thread runs them: one EngineGroup for all), or over the
    engines of an engine process (:class:`vkv.server.remote.RemoteGroup`)."""
    if isinstance(engines, (EngineGroup, RemoteGroup)):
        group = engines
    else:
        group = EngineGroup([engines] if isinstance(engines, Engine) else list(engines))
    by_name = {e.name: e for e in group.engines}
    metrics = Metrics(group)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        started = all(e.group is None for e in group.engines)
        if started:
            group.start()
        try:
            yield
        finally:
            if started:
                group.stop()

    app = FastAPI(title="vkv", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.group, app.state.metrics, app.state.mailbox = group, metrics, None
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.param, exc.kind)

    @app.exception_handler(EngineProcessError)
    async def _engine_process(request: Request, exc: EngineProcessError) -> JSONResponse:
        return _error(503, f"the engine process cannot serve: {exc}", kind="server_error")

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(400, f"invalid request: {exc.errors()}")

    @app.get("/health")
    async def health() -> JSONResponse:
        if group.error is not None:  # an engine failed (its requests ended with "error"); the server still answers
            error = f"{type(group.error).__name__}: {group.error}"
            return JSONResponse({"status": "degraded", "models": list(by_name), "error": error}, status_code=503)
        return JSONResponse({"status": "ok", "models": list(by_name)})

    @app.get("/v1/models")
    async def models() -> dict:
        data = [{"id": n, "object": "model", "created": created, "owned_by": "vkv"} for n in by_name]
        return {"object": "list", "data": data}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await _json(request)
        engine = _engine(by_name, body)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if not isinstance(prompt, str) and not (isinstance(prompt, list) and all(_is_int(t) for t in prompt)):
            raise ApiError(400, "prompt must be a string or a list of token ids (one prompt a request)", "prompt")
        return await _respond(request, engine, prompt, body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body = await _json(request)
        engine = _engine(by_name, body)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(_message(m) for m in messages):
            raise ApiError(400, "messages must be a non-empty list of {role, content (a string)}", "messages")
        template = getattr(engine.tokenizer, "chat_template", None)
        if engine.tokenizer is None or not template:
            raise ApiError(400, f"model {engine.name!r} has no tokenizer with a chat template: use /v1/completions")
        text = engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = engine.tokenizer.encode(text, add_special_tokens=False)
        return await _respond(request, engine, ids, body, chat=True)

    async def _respond(request: Request, engine: Engine, prompt: Any, body: dict, chat: bool) -> Response:
        params, stops, stream, usage_in_stream = _params(body, engine)
        loop = asyncio.get_running_loop()
        mailbox = app.state.mailbox
        if mailbox is None or mailbox.loop is not loop:  # the first request (of this loop: uvicorn runs one)
            mailbox = app.state.mailbox = Mailbox(loop)
        sink = Stream(mailbox, metrics, engine.name)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        try:
            ids = engine.encode(prompt)
            asked = body.get("max_completion_tokens", body.get("max_tokens"))
            if asked is not None and len(ids) + params.max_tokens > engine.max_seq_len:
                raise ApiError(
                    400, f"this model's maximum context length is {engine.max_seq_len} tokens; the request asks for "
                    f"{len(ids) + params.max_tokens} ({len(ids)} in the prompt, {params.max_tokens} to generate)",
                    "max_tokens",
                )  # fmt: skip
            submitted = await _submit(engine, ids, params, rid, sink)
        except (InvalidRequestError, OutOfPagesError) as exc:
            raise ApiError(400, str(exc), "prompt") from None
        text = Text(engine.tokenizer, stops)
        head = {"id": rid, "created": int(time.time()), "model": engine.name}
        n_prompt = len(submitted.prompt_ids)
        if stream:
            gen = _events(request, engine, rid, sink, text, head, chat, n_prompt, usage_in_stream)
            return StreamingResponse(gen, media_type="text/event-stream")
        ids, reason = [], None
        try:
            async for output in _outputs(request, engine, rid, sink):
                ids += output.new_token_ids
                text.add(output.new_token_ids, output.finished)
                if text.stopped and not output.finished:
                    engine.abort(rid)  # a stop string: no more tokens needed
                if output.finished:
                    reason = "stop" if text.stopped else output.finish_reason
                    if reason == "error":
                        raise ApiError(500, f"the engine failed this request: {output.error}", kind="server_error")
        except asyncio.CancelledError:
            engine.abort(rid)
            raise
        usage = {"prompt_tokens": n_prompt, "completion_tokens": len(ids), "total_tokens": n_prompt + len(ids)}
        if chat:
            message = {"role": "assistant", "content": text.sent}
            choice = {"index": 0, "message": message, "finish_reason": reason, "token_ids": ids}
            return JSONResponse({**head, "object": "chat.completion", "choices": [choice], "usage": usage})
        choice = {"index": 0, "text": text.sent, "logprobs": None, "finish_reason": reason, "token_ids": ids}
        return JSONResponse({**head, "object": "text_completion", "choices": [choice], "usage": usage})

    return app


async def _submit(engine: Engine | RemoteEngine, ids: list[int], params: SamplingParams, rid: str, sink: Stream):
    """``engine.add_request``. An engine process answers over its pipe, so that wait goes to a worker thread and
    the event loop streams the other requests' tokens meanwhile; a client gone during it aborts the request once
    it is in (an abort sent before the add would find nothing)."""
    if not isinstance(engine, RemoteEngine):  # in this process: a queue append, no wait
        return engine.add_request(ids, params, request_id=rid, on_output=sink.push)
    adding = asyncio.ensure_future(asyncio.to_thread(engine.add_request, ids, params, request_id=rid,
                                                     on_output=sink.push))  # fmt: skip
    try:
        return await asyncio.shield(adding)
    except asyncio.CancelledError:
        adding.add_done_callback(lambda done: not done.cancelled() and done.exception() is None and engine.abort(rid))
        raise


async def _outputs(request: Request, engine: Engine, rid: str, sink: Stream) -> AsyncIterator[RequestOutput]:
    """The request's outputs until it finishes; aborts it if the client goes away meanwhile (checked every
    DISCONNECT_POLL_S by a watcher of its own, whether or not tokens are flowing: a token costs no timer)."""
    watcher = asyncio.create_task(_watch(request, engine, rid, sink))
    try:
        while True:
            try:  # what has arrived already, without a wait
                output = sink.queue.get_nowait()
            except asyncio.QueueEmpty:
                output = await sink.queue.get()
            if output is None:  # the watcher saw the client go and aborted the request
                return
            yield output
            if output.finished:
                return
    finally:
        watcher.cancel()


async def _watch(request: Request, engine: Engine, rid: str, sink: Stream) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(DISCONNECT_POLL_S)
    engine.abort(rid)
    sink.queue.put_nowait(None)


async def _events(request, engine, rid, sink, text, head, chat, n_prompt, usage_in_stream) -> AsyncIterator[str]:
    kind = "chat.completion.chunk" if chat else "text_completion"
    finished = False
    count = 0

    def event(choice: dict, usage: dict | None = None) -> str:
        payload = {**head, "object": kind, "choices": [choice] if choice else []}
        if usage_in_stream:
            payload["usage"] = usage
        return f"data: {json.dumps(payload)}\n\n"

    try:
        if chat:
            yield event({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
        async for output in _outputs(request, engine, rid, sink):
            count += len(output.new_token_ids)
            new = text.add(output.new_token_ids, output.finished)
            stop = text.stopped
            if stop and not output.finished:
                engine.abort(rid)
            reason = ("stop" if stop else output.finish_reason) if output.finished else None
            if output.new_token_ids or new or reason:
                delta = {"content": new} if chat else None
                choice = {"index": 0, "finish_reason": reason, "token_ids": output.new_token_ids}
                choice |= {"delta": delta} if chat else {"text": new, "logprobs": None}
                yield event(choice)
            finished = output.finished
        if usage_in_stream:
            yield event({}, {"prompt_tokens": n_prompt, "completion_tokens": count, "total_tokens": n_prompt + count})
        yield "data: [DONE]\n\n"
    finally:
        if not finished:  # the client went away (the response was cancelled) or the server stops
            engine.abort(rid)


async def _json(request: Request) -> dict:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def _engine(by_name: dict[str, Engine], body: dict) -> Engine:
    name = body.get("model")
    if name is None and len(by_name) == 1:
        return next(iter(by_name.values()))
    if name not in by_name:
        raise ApiError(404, f"model {name!r} is not served here; models: {sorted(by_name)}", "model",
                       "not_found_error")  # fmt: skip
    return by_name[name]


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _message(m: Any) -> bool:
    return isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)


def _params(body: dict, engine: Engine) -> tuple[SamplingParams, list[str], bool, bool]:
    """SamplingParams, stop strings, stream?, usage in the stream? from an OpenAI request body."""
    if body.get("n", 1) != 1:
        raise ApiError(400, "n must be 1 (one choice a request)", "n")
    for unsupported in ("logprobs", "top_logprobs", "echo", "best_of", "suffix"):
        if body.get(unsupported) not in (None, False, 1 if unsupported == "best_of" else None):
            raise ApiError(400, f"{unsupported} is not supported", unsupported)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "stream must be a bool", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "stream_options must be an object", "stream_options")
    stops = body.get("stop") or []
    stops = [stops] if isinstance(stops, str) else stops
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, "stop must be a non-empty string or a list of them", "stop")
    if stops and engine.tokenizer is None:
        raise ApiError(400, f"stop strings need a tokenizer and model {engine.name!r} has none: use stop_token_ids")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = engine.max_seq_len  # as many as fit: the engine stops at max_seq_len ("length")
    fields = {
        "max_tokens": max_tokens,
        "temperature": body.get("temperature", 1.0),
        "top_p": body.get("top_p", 1.0),
        "top_k": body.get("top_k", 0) if body.get("top_k") != -1 else 0,
        "seed": body.get("seed"),
        "stop_token_ids": body.get("stop_token_ids") or [],
        "ignore_eos": body.get("ignore_eos", False),
        "min_tokens": body.get("min_tokens", 0),
    }
    for name in ("temperature", "top_p"):
        if fields[name] is None:
            fields[name] = {"temperature": 1.0, "top_p": 1.0}[name]
    if isinstance(fields["temperature"], float) and math.isnan(fields["temperature"]):
        raise ApiError(400, "temperature must be a number >= 0", "temperature")
    try:
        return SamplingParams(**fields), stops, stream, bool(options.get("include_usage"))
    except InvalidRequestError as exc:
        raise ApiError(400, str(exc), str(exc).split(" ", 1)[0]) from None


def serve(
    engines: Engine | Sequence[Engine] | RemoteGroup, host: str = "127.0.0.1", port: int = 8000, *, sock=None,
    log_level: str = "info",
) -> None:  # fmt: skip
    """Serve ``engines`` until interrupted (uvicorn). ``sock``: a bound socket to serve on instead of host:port."""
    import uvicorn

    app = create_app(engines)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5))
    server.run(sockets=[sock] if sock is not None else None)
