"""An echo server on callsock's own WebSocket stack, for the Autobahn fuzzing client.

Every text and binary message comes back as it came; a close frame is answered with its code.
It uses exactly what ``callsock serve`` uses from the upgrade on (``callsock.server.transport`` over
``callsock.protocol.websocket``), with a receiver that echoes instead of a Media Streams connection.

    python -m benchmarks.autobahn.echo_server --port 9001
"""

from __future__ import annotations

import argparse
import asyncio

from aiohttp import web

from callsock.protocol.errors import IdleTimeout, StreamError
from callsock.server.transport import WebSocketTransport, accept, check_upgrade

MAX_MESSAGE_BYTES = 64 << 20  # case 9 sends messages of up to 16 MiB


class Echo:
    """A receiver that sends each message back."""

    started = True

    def __init__(self, transport: WebSocketTransport) -> None:
        self.transport = transport

    def receive_text(self, data: bytes | bytearray) -> None:
        """Send the text back."""
        self.transport.write(bytes(data))

    def receive_binary(self, data: bytes | bytearray) -> None:
        """Send the bytes back."""
        self.transport.write_binary(data)

    def peer_closed(self, code: int | None) -> None:
        """Answer the close with its code (1000 when it had none)."""
        self.transport.close(code or 1000, "")

    def reject(self, error: StreamError) -> None:
        """The transport has already failed the connection with the error's code."""

    def timed_out(self, error: IdleTimeout) -> None:
        """Close an idle connection."""
        self.transport.close(error.close_code, error.close_reason)


async def handle(request: web.Request) -> web.StreamResponse:
    """Upgrade and echo until the connection closes."""
    refusal = check_upgrade(request)
    if refusal is not None:
        return refusal
    response, transport = await accept(
        request,
        max_message_bytes=MAX_MESSAGE_BYTES,
        close_timeout=5.0,
        idle_timeout=300.0,
        start_timeout=300.0,
    )
    if transport is not None:
        transport.receiver = Echo(transport)
        await transport.done
    return response


async def serve(port: int) -> None:
    """Serve on 127.0.0.1 until cancelled."""
    app = web.Application()
    app.router.add_get("/", handle)
    runner = web.AppRunner(app, access_log=None, handle_signals=True)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print(f"echo server on ws://127.0.0.1:{port}/ (callsock's framing)", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main() -> None:
    """Parse ``--port`` and serve."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=9001)
    asyncio.run(serve(parser.parse_args().port))


if __name__ == "__main__":
    main()
