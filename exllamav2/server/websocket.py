"""ExLlamaV2WebSocketServer: upstream's WebSocket server over one model, cache and tokenizer, with a
streaming generator. The server has no authentication: bind it to a loopback address unless the
network in front of it is trusted."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import threading
from typing import TYPE_CHECKING, Any

from ..generator import ExLlamaV2StreamingGenerator
from . import websocket_actions as actions

if TYPE_CHECKING:
    from ..cache.base import ExLlamaV2CacheBase
    from ..model.model import ExLlamaV2
    from ..tokenizer import ExLlamaV2Tokenizer

log = logging.getLogger(__name__)


def _websockets() -> Any:
    try:
        import websockets
    except ImportError as e:
        raise ImportError("exllamav2.server needs the websockets package: pip install exllamav2[server] "
                          "(or pip install websockets)") from e
    return websockets


def _is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return ip == "localhost"


class ExLlamaV2WebSocketServer:
    def __init__(self, ip: str, port: int, model: "ExLlamaV2", tokenizer: "ExLlamaV2Tokenizer",
                 cache: "ExLlamaV2CacheBase") -> None:
        self.ip = ip
        self.port = port
        self.model = model
        self.tokenizer = tokenizer
        self.cache = cache
        self.generator = ExLlamaV2StreamingGenerator(model, cache, tokenizer)
        self.stop_signal = threading.Event()    # set it (from any thread) to make serve() return
        self.ready = threading.Event()          # set once listening; `port` is then the bound port
        self.lock: asyncio.Lock | None = None   # made in start(): a lock belongs to one event loop

    def serve(self) -> None:
        """Listen on ip:port and serve until `stop_signal` is set."""
        self.stop_signal.clear()
        asyncio.run(self._serve_until_stopped())

    async def start(self) -> Any:
        """Start listening on the running event loop; returns the websockets server (close() stops it)."""
        websockets = _websockets()
        self.lock = asyncio.Lock()
        if not _is_loopback(self.ip):
            log.warning("WebSocket server on %s:%s has no authentication; anyone who can reach it can run "
                        "the model", self.ip, self.port)
        server = await websockets.serve(self.main, self.ip, self.port)
        self.port = server.sockets[0].getsockname()[1]
        log.info("WebSocket server listening on %s port %d", self.ip, self.port)
        self.ready.set()
        return server

    async def _serve_until_stopped(self) -> None:
        server = await self.start()
        try:
            while not self.stop_signal.is_set():
                await asyncio.sleep(0.05)
        finally:
            server.close()
            await server.wait_closed()
            self.ready.clear()

    async def main(self, websocket: Any, path: str | None = None) -> None:
        """One connection: each message is a JSON request, answered in order."""
        async for message in websocket:
            try:
                request = json.loads(message)
            except (json.JSONDecodeError, TypeError) as e:
                await websocket.send(json.dumps({"action": None, "error": f"request is not JSON: {e}"}))
                continue
            await actions.dispatch(request, websocket, self)
