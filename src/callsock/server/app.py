"""The application API: a few ``async`` handlers make a call server answer the phone.

::

    from callsock import App

    app = App()

    @app.on_start
    async def greet(call):
        call.play(hello_pcm, sample_rate=16000)

    @app.on_audio
    async def hear(call, frame):
        ...  # frame.pcm: numpy int16 at 8 kHz; frame.mulaw: the raw bytes

Serve it with ``callsock serve mymodule:app``, or route a WebSocket path of a FastAPI or
Starlette application to ``app.asgi()``. Several handlers per event run in registration order.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from ..call.call import AudioFrame, Call, MarkEcho
from ..call.handlers import Handlers
from ..recording.sinks import Sink

if TYPE_CHECKING:
    from .asgi import ASGIAdapter
    from .settings import Settings

__all__ = ["App"]

F = TypeVar("F", bound=Callable[..., Awaitable[None]])

StartHandler = Callable[[Call], Awaitable[None]]
AudioHandler = Callable[[Call, AudioFrame], Awaitable[None]]
DtmfHandler = Callable[[Call, str], Awaitable[None]]
MarkHandler = Callable[[Call, MarkEcho], Awaitable[None]]
StopHandler = Callable[[Call], Awaitable[None]]


class App:
    """A set of call handlers: what the server runs for each call."""

    def __init__(self) -> None:
        self.handlers = Handlers()
        self.sinks: list[Callable[[], Sink]] = []
        """Makers of the recording formats each call gets, besides the WAVs and the summary."""

    def on_start(self, handler: F) -> F:
        """Register ``async def handler(call)``, run when the stream starts."""
        return self._register(self.handlers.start, handler)

    def on_audio(self, handler: F) -> F:
        """Register ``async def handler(call, frame)``, run for each chunk of audio (in order)."""
        return self._register(self.handlers.audio, handler)

    def on_dtmf(self, handler: F) -> F:
        """Register ``async def handler(call, digit)``, run when the caller presses a key."""
        return self._register(self.handlers.dtmf, handler)

    def on_mark(self, handler: F) -> F:
        """Register ``async def handler(call, mark)``, run when Twilio echoes a mark (played or cleared)."""
        return self._register(self.handlers.mark, handler)

    def on_stop(self, handler: F) -> F:
        """Register ``async def handler(call)``, run once when the call ends, whatever the end."""
        return self._register(self.handlers.stop, handler)

    def add_sink(self, make: Callable[[], Sink]) -> None:
        """Record each call in one more format.

        ``make()`` returns a new :class:`~callsock.recording.sinks.Sink` for each call; its files
        are published beside the WAVs, before the summary.
        """
        self.sinks.append(make)

    def include(self, other: App) -> None:
        """Add another app's handlers (and recording formats) after this one's."""
        self.handlers.extend(other.handlers)
        self.sinks.extend(other.sinks)

    def asgi(self, settings: Settings | None = None) -> ASGIAdapter:
        """Return an ASGI application serving Media Streams with these handlers.

        Route it where Twilio's ``<Stream url>`` points, e.g. in FastAPI:
        ``api.router.routes.append(WebSocketRoute("/call", app.asgi()))``. Every WebSocket that reaches it is
        a stream.
        """
        from .asgi import ASGIAdapter
        from .settings import Settings

        return ASGIAdapter(self, settings or Settings())

    @staticmethod
    def _register(handlers: list[Callable[..., Any]], handler: F) -> F:
        if not _is_async(handler):
            raise TypeError(f"{getattr(handler, '__qualname__', handler)!r} must be an async def function")
        handlers.append(handler)
        return handler


def _is_async(handler: object) -> bool:
    return inspect.iscoroutinefunction(handler)
