"""A WebSocket front end for one model (upstream's exllamav2.server). Needs the optional `websockets`
package: pip install exllamav2[server]."""

from .websocket import ExLlamaV2WebSocketServer

__all__ = ["ExLlamaV2WebSocketServer"]
