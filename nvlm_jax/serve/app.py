"""The HTTP routes (Starlette): an OpenAI-compatible chat endpoint over the engine.

    GET  /health                  200 {"status": "ok"} while the engine thread is alive
    GET  /v1/models               the one served model
    POST /v1/chat/completions     answers, or server-sent events with `"stream": true`
    GET  /metrics                 Prometheus text: requests, slots, tokens, image cache

Refusals are OpenAI-style JSON errors `{"error": {"message", "type", "code"}}` with a 4xx status
and a one-line message; the server keeps serving. Request parsing, image reading and tiling run
on a worker thread, the model on the engine's thread; the event loop only moves events. A
streaming client that goes away cancels its request (its slot is freed at the next step); a
non-streaming one is noticed within a second.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from nvlm_jax.serve.engine import Engine
from nvlm_jax.serve.protocol import Delta, Failed, Finished
from nvlm_jax.serve.requests import Limits, RequestError, build_engine_request, parse_chat_request


def error_response(message: str, status: int = 400, code: str = "invalid_request_error") -> JSONResponse:
    message = " ".join(str(message).split())  # one line
    return JSONResponse({"error": {"message": message, "type": code, "param": None, "code": status}},
                        status_code=status)


def _usage(event: Finished) -> dict:
    completion = len(event.token_ids)
    return {"prompt_tokens": event.prompt_tokens, "completion_tokens": completion,
            "total_tokens": event.prompt_tokens + completion}


def create_app(engine: Engine, *, model_name: str, limits: Limits | None = None) -> Starlette:
    """The ASGI app serving `engine` (already started) under the name `model_name`."""
    limits = limits or Limits()
    created = int(time.time())

    async def health(request: Request) -> Response:
        if not engine.alive:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": model_name, "object": "model", "created": created, "owned_by": "nvlm_jax",
             "max_model_len": engine.max_len}]})

    async def metrics(request: Request) -> Response:
        lines = []
        for name, value in sorted(engine.metrics().items()):
            lines.append(f"nvlm_{name} {value}")
        return PlainTextResponse("\n".join(lines) + "\n")

    async def chat_completions(request: Request) -> Response:
        raw = await request.body()
        try:
            chat = parse_chat_request(raw)
            if chat.model != model_name:
                raise RequestError(f"model {chat.model!r} does not exist; this server serves {model_name!r}", 404,
                                   "model_not_found")
            engine_request = await run_in_threadpool(build_engine_request, engine.model, chat, limits,
                                                     engine.max_len)
            loop = asyncio.get_running_loop()
            events: asyncio.Queue = asyncio.Queue()
            handle = engine.submit(engine_request, lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        except RequestError as e:
            return error_response(str(e), e.status, e.code)
        except ValueError as e:  # what the engine's own checks refuse
            return error_response(str(e))
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if not chat.stream:
            return await _complete(request, handle, events, rid, now)

        def chunk(delta: dict, finish=None, usage=None) -> str:
            body = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_name,
                    "choices": [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish,
                                                  "logprobs": None}]}
            if usage:
                body["usage"] = usage
            return f"data: {json.dumps(body)}\n\n"

        async def stream():
            try:
                yield chunk({"role": "assistant", "content": ""})
                while True:
                    event = await events.get()
                    if isinstance(event, Delta):
                        yield chunk({"content": event.text})
                        continue
                    if isinstance(event, Finished):
                        yield chunk({}, finish=event.reason)
                        if chat.include_usage:
                            yield chunk({}, usage=_usage(event))
                    else:
                        error = {"message": event.message, "type": "server_error", "code": event.status}
                        yield f"data: {json.dumps({'error': error})}\n\n"
                    yield "data: [DONE]\n\n"
                    return
            finally:
                handle.cancel()  # a client that went away frees its slot (no-op once finished)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _complete(request: Request, handle, events: asyncio.Queue, rid: str, now: int) -> Response:
        while True:
            try:
                event = await asyncio.wait_for(events.get(), timeout=1.0)
            except TimeoutError:
                if await request.is_disconnected():
                    handle.cancel()
                    return Response(status_code=499)
                continue
            if isinstance(event, Failed):
                return error_response(event.message, event.status, "server_error" if event.status >= 500
                                      else "invalid_request_error")
            if isinstance(event, Finished):
                return JSONResponse({
                    "id": rid, "object": "chat.completion", "created": now, "model": model_name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": event.text},
                                 "finish_reason": event.reason, "logprobs": None}],
                    "usage": _usage(event)})

    async def not_found(request: Request, exc) -> Response:
        return error_response(f"no route {request.method} {request.url.path}", 404, "not_found")

    async def bad_method(request: Request, exc) -> Response:
        return error_response(f"{request.method} is not allowed on {request.url.path}", 405, "method_not_allowed")

    routes = [
        Route("/health", health),
        Route("/v1/models", models),
        Route("/metrics", metrics),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    ]
    return Starlette(routes=routes, exception_handlers={404: not_found, 405: bad_method})
