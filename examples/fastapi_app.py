"""The echo bot inside a FastAPI application, beside ordinary HTTP routes.

``app.asgi()`` turns a callsock :class:`~callsock.App` into an ASGI application; route the
WebSocket path Twilio's ``<Stream url>`` points at to it (a ``WebSocketRoute`` matches the
path exactly; a ``mount`` at ``/call`` would serve ``/call/`` and below, but not ``/call``).
Routed applications get no lifespan events, so the host application's own lifespan shuts the
calls down. Run it from the repository root with (recordings go to ``./recordings``)::

    uvicorn examples.fastapi_app:api --port 8081
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.routing import WebSocketRoute

from examples.echo_bot import app as echo_bot

calls = echo_bot.asgi()  # or .asgi(Settings(record_dir=..., max_calls=...))


@asynccontextmanager
async def lifespan(api: FastAPI) -> AsyncIterator[None]:
    """On shutdown, end the calls still open: close them (1001) and publish their recordings.

    uvicorn closes its open WebSockets itself (code 1012, which callsock takes as a shutdown)
    before it runs this; the call is here for servers that leave them open until the
    application's shutdown.
    """
    yield
    calls.shutdown()


api = FastAPI(lifespan=lifespan)
api.router.routes.append(WebSocketRoute("/call", calls))


@api.get("/status")
async def status() -> dict[str, Any]:
    """Liveness and load of the call service: open calls and connections, uptime."""
    return calls.hub.health()
