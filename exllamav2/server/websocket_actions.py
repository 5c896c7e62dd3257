"""The server's actions. Each request is a JSON object with an `action`; the reply carries the same
`action` and echoes `request_id` / `response_id` when given (and `tag` for infer).

- echo: no fields; the reply is the echo of the ids.
- estimate_token {text}: reply `num_tokens`, the length of `text` in tokens.
- lefttrim_token {text, trimmed_length}: reply `trimmed_text`, `text` cut to its last `trimmed_length` tokens.
- infer {text, max_new_tokens, stream, full_response (or stream_full), sampler fields, stop_conditions,
  token_healing, tag}: while streaming, one reply per chunk with response_type "chunk" and `chunk` (plus the
  whole `response` so far with full_response); then the final reply with response_type "full", `util_text`
  (the prompt as used: left-trimmed to fit the context) and `response` (the completion).

Where upstream ignored a bad request (unknown action, missing field) and left the client waiting, the reply
here carries `error`, naming the problem.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING, Any

from ..errors import ExLlamaV2Error
from ..generator import ExLlamaV2Sampler
from ..inputs import check_sampler_settings

if TYPE_CHECKING:
    from .websocket import ExLlamaV2WebSocketServer

log = logging.getLogger(__name__)

# infer's sampler fields: request key -> (Settings attribute, type, default), the defaults upstream's server used
SAMPLER_FIELDS = {
    "top_k": ("top_k", int, 100),
    "top_p": ("top_p", float, 0.8),
    "top_a": ("top_a", float, 0.0),
    "min_p": ("min_p", float, 0.0),
    "tfs": ("tfs", float, 0.0),
    "typical": ("typical", float, 0.0),
    "temperature": ("temperature", float, 0.95),
    "rep_pen": ("token_repetition_penalty", float, 1.15),
    "freq_pen": ("token_frequency_penalty", float, 0.0),
    "pres_pen": ("token_presence_penalty", float, 0.0),
}


class RequestError(ValueError):
    """A request the server cannot serve; the message goes back to the client as `error`."""


def _field(request: dict, name: str, kind: type) -> Any:
    """request[name] as `kind`: a string for str, a JSON number for float, a whole number for int."""
    if name not in request:
        raise RequestError(f"{request.get('action')!r} needs the field {name!r}")
    value = request[name]
    if kind is str:
        ok = isinstance(value, str)
    else:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = ok and (kind is float or float(value).is_integer())
    if not ok:
        raise RequestError(f"field {name!r} must be {'a whole number' if kind is int else kind.__name__}, "
                           f"got {value!r}")
    return kind(value)


async def dispatch(request: Any, ws: Any, server: "ExLlamaV2WebSocketServer") -> None:
    """Serve one request on connection `ws`, sending its reply (and, for streamed infer, its chunks)."""
    response: dict[str, Any] = {"action": request.get("action") if isinstance(request, dict) else None}
    try:
        if not isinstance(request, dict) or not isinstance(request.get("action"), str):
            raise RequestError("a request is a JSON object with a string field 'action'")
        for key in ("request_id", "response_id"):
            if key in request:
                response[key] = request[key]
        action = ACTIONS.get(request["action"])
        if action is None:
            raise RequestError(f"unknown action {request['action']!r}; known: {', '.join(ACTIONS)}")
        await action(request, ws, server, response)
    except (RequestError, ExLlamaV2Error) as e:     # the request's fault: tell the client, keep serving
        response["error"] = str(e)
    await ws.send(json.dumps(response))


async def echo(request: dict, ws: Any, server: "ExLlamaV2WebSocketServer", response: dict) -> None:
    """The reply is the request's ids: a connection check."""


async def estimate_token(request: dict, ws: Any, server: "ExLlamaV2WebSocketServer", response: dict) -> None:
    ids = server.tokenizer.cached_encode_str(_field(request, "text", str))
    response["num_tokens"] = ids.shape[-1]


async def lefttrim_token(request: dict, ws: Any, server: "ExLlamaV2WebSocketServer", response: dict) -> None:
    text = _field(request, "text", str)
    length = _field(request, "trimmed_length", int)
    if length < 0:
        raise RequestError(f"trimmed_length must be at least 0, got {length}")
    ids = server.tokenizer.cached_encode_str(text)
    if ids.shape[-1] <= length:
        response["trimmed_text"] = text
    else:
        response["trimmed_text"] = server.tokenizer.decode(ids[0, ids.shape[-1] - length :])


def _settings(request: dict) -> ExLlamaV2Sampler.Settings:
    settings = ExLlamaV2Sampler.Settings()
    for key, (attr, kind, default) in SAMPLER_FIELDS.items():
        setattr(settings, attr, _field(request, key, kind) if key in request else default)
    check_sampler_settings(settings)            # a negative temperature etc.: an error reply, not garbage
    return settings


def _stop_conditions(request: dict, eos: int | None) -> list[int | str]:
    extra = request.get("stop_conditions", [])
    extra = extra if isinstance(extra, list) else [extra]
    if not all(isinstance(s, (str, int)) and not isinstance(s, bool) for s in extra):
        raise RequestError("stop_conditions must be strings or token ids")
    return ([eos] if eos is not None else []) + extra


async def infer(request: dict, ws: Any, server: "ExLlamaV2WebSocketServer", response: dict) -> None:
    if "tag" in request:
        response["tag"] = request["tag"]
    text = _field(request, "text", str)
    max_new = _field(request, "max_new_tokens", int)
    stream = bool(request.get("stream", False))
    full = bool(request.get("full_response", request.get("stream_full", False)))
    context = min(server.model.config.max_seq_len, server.cache.max_seq_len)
    if not 1 <= max_new < context:
        raise RequestError(f"max_new_tokens must be between 1 and {context - 1} (the context is {context} tokens)")
    settings = _settings(request)
    stops = _stop_conditions(request, server.tokenizer.eos_token_id)

    ids = server.tokenizer.cached_encode_str(text)
    overflow = ids.shape[-1] + max_new - context
    util_text = text
    if overflow > 0:                            # keep the end of the prompt, as upstream
        ids = ids[:, overflow:]
        util_text = server.tokenizer.decode(ids[0])

    generator = server.generator
    completion = ""
    async with server.lock:                     # one generator: requests take turns
        generator.set_stop_conditions(stops)
        generator.begin_stream(ids, settings, token_healing=bool(request.get("token_healing", False)))
        for _ in range(max_new):
            # the forward pass runs off the event loop, so other connections stay responsive
            chunk, eos, _ids = await asyncio.to_thread(generator.stream)
            completion += chunk
            if stream and chunk:
                part = {**response, "response_type": "chunk", "chunk": chunk}
                if full:
                    part["response"] = completion
                await ws.send(json.dumps(part))
            if eos:
                break
    response["response_type"] = "full"
    response["util_text"] = util_text
    response["response"] = completion


ACTIONS = {"echo": echo, "estimate_token": estimate_token, "lefttrim_token": lefttrim_token, "infer": infer}
