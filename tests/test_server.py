"""exllamav2.server on loopback: upstream's request/response JSON for echo, estimate_token, lefttrim_token and
infer (streamed and not), checked against the tokenizer and transformers' greedy generate; bad requests
get an `error` reply. A bounded number of requests, each with a timeout."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest
import torch

from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config
from exllamav2.tokenizer import ExLlamaV2Tokenizer

websockets = pytest.importorskip("websockets", reason="websockets not installed: pip install exllamav2[server]")

from exllamav2.server import ExLlamaV2WebSocketServer  # noqa: E402

TIMEOUT = 30.0
PROMPT = "The function returns the value of the"
GREEDY = {"top_k": 1, "temperature": 1.0, "rep_pen": 1.0, "top_p": 0.0}


@pytest.fixture(scope="module")
def server_parts(tiny):
    config = ExLlamaV2Config(str(tiny[0]))
    model = ExLlamaV2(config)
    model.load()
    return model, ExLlamaV2Tokenizer(config), ExLlamaV2Cache(model, max_seq_len=256), tiny[1]


async def talk(port: int, requests: list, replies_per_request: list[int]) -> list[list[dict]]:
    """Send each request and collect its replies (the count given, or until a 'full' infer reply)."""
    out = []
    async with websockets.connect(f"ws://127.0.0.1:{port}", open_timeout=TIMEOUT) as ws:
        for req, n in zip(requests, replies_per_request):
            await asyncio.wait_for(ws.send(req if isinstance(req, str) else json.dumps(req)), TIMEOUT)
            got = []
            while len(got) < n:
                got.append(json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT)))
                if got[-1].get("response_type") == "chunk":
                    n += 1                              # chunks come before the final reply
            out.append(got)
    return out


def run_session(parts, requests, counts):
    model, tok, cache, _ = parts

    async def session():
        srv = ExLlamaV2WebSocketServer("127.0.0.1", 0, model, tok, cache)
        ws_server = await srv.start()
        try:
            return await talk(srv.port, requests, counts)
        finally:
            ws_server.close()
            await ws_server.wait_closed()

    return asyncio.run(asyncio.wait_for(session(), 4 * TIMEOUT))


def hf_greedy_text(hf, tok, n: int) -> str:
    ids = tok.encode(PROMPT)
    out = hf.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0,
                      attention_mask=torch.ones_like(ids))
    return tok.decode(out[0, ids.shape[-1]:])


def test_actions_answer_as_upstream(server_parts):
    _, tok, _, hf = server_parts
    text = "Split the string at each separator and return the list"
    ids = tok.encode(text)
    requests = [
        {"action": "echo", "request_id": "r1", "response_id": 7},
        {"action": "estimate_token", "request_id": "r2", "text": text},
        {"action": "lefttrim_token", "request_id": "r3", "text": text, "trimmed_length": 4},
        {"action": "lefttrim_token", "text": text, "trimmed_length": 1000},
        {"action": "infer", "request_id": "r5", "text": PROMPT, "max_new_tokens": 12, "stream": False, **GREEDY},
        {"action": "infer", "request_id": "r6", "tag": "t", "text": PROMPT, "max_new_tokens": 12, "stream": True,
         "full_response": True, **GREEDY},
    ]
    echo, est, trim, untrimmed, infer, streamed = run_session(server_parts, requests, [1] * len(requests))
    assert echo == [{"action": "echo", "request_id": "r1", "response_id": 7}]
    assert est == [{"action": "estimate_token", "request_id": "r2", "num_tokens": ids.shape[-1]}]
    assert trim[0]["trimmed_text"] == tok.decode(ids[0, -4:]) and trim[0]["request_id"] == "r3"
    assert untrimmed[0]["trimmed_text"] == text

    want = hf_greedy_text(hf, tok, 12)
    (final,) = infer
    assert final == {"action": "infer", "request_id": "r5", "response_type": "full", "util_text": PROMPT,
                     "response": want}
    *chunks, last = streamed
    assert chunks and all(c["response_type"] == "chunk" and c["tag"] == "t" for c in chunks)
    assert "".join(c["chunk"] for c in chunks) == want == last["response"]
    assert chunks[-1]["response"] == want                # full_response: the whole text so far
    assert last["response_type"] == "full" and last["tag"] == "t" and "chunk" not in last


def test_bad_requests_get_an_error_reply(server_parts):
    requests = [
        "not json",
        {"action": "fly"},
        {"action": "infer", "request_id": 1, "max_new_tokens": 4},
        {"action": "infer", "text": "a", "max_new_tokens": 4, "top_k": "many"},
        {"action": "lefttrim_token", "text": "a", "trimmed_length": -1},
        {"action": "infer", "text": "a", "max_new_tokens": 4, "temperature": -1.0},   # refused by the sampler
        {"action": "echo"},                                   # the connection still works afterwards
    ]
    replies = run_session(server_parts, requests, [1] * len(requests))
    errors = [r[0].get("error", "") for r in replies]
    assert "not JSON" in errors[0]
    assert "unknown action 'fly'" in errors[1]
    assert "needs the field 'text'" in errors[2] and replies[2][0]["request_id"] == 1
    assert "'top_k' must be a whole number" in errors[3]
    assert "trimmed_length must be at least 0" in errors[4]
    assert "temperature" in errors[5]
    assert replies[6] == [{"action": "echo"}]


def test_serve_blocks_until_stop_signal(server_parts):
    model, tok, cache, _ = server_parts
    srv = ExLlamaV2WebSocketServer("127.0.0.1", 0, model, tok, cache)
    thread = threading.Thread(target=srv.serve, daemon=True)
    thread.start()
    assert srv.ready.wait(TIMEOUT)
    (reply,) = asyncio.run(talk(srv.port, [{"action": "echo", "request_id": "x"}], [1]))
    assert reply == [{"action": "echo", "request_id": "x"}]
    srv.stop_signal.set()
    thread.join(TIMEOUT)
    assert not thread.is_alive()
