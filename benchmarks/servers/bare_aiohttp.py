"""The floor: the least an aiohttp + msgspec + audioop echo can do, with none of callsock's work.

No validation beyond the schema, no recording, no metrics, no pacing: it shows what callsock's
own work costs on top of the same stack. Run with ``python -m benchmarks.servers.bare_aiohttp PORT``.
"""

from __future__ import annotations

import sys
import warnings

import msgspec
import uvloop
from aiohttp import WSMsgType, web

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop


class _MediaBody(msgspec.Struct):
    payload: bytes


class _Media(msgspec.Struct, tag_field="event", tag="media"):
    media: _MediaBody


class _Start(msgspec.Struct, tag_field="event", tag="start", rename="camel"):
    stream_sid: str


class _Other(msgspec.Struct, tag_field="event", tag="connected"):
    pass


class _Stop(msgspec.Struct, tag_field="event", tag="stop"):
    pass


class _Out(msgspec.Struct, tag_field="event", tag="media", rename="camel"):
    stream_sid: str
    media: _MediaBody


_decode = msgspec.json.Decoder(_Media | _Start | _Other | _Stop).decode
_encode = msgspec.json.Encoder().encode


async def echo(request: web.Request) -> web.WebSocketResponse:
    """Echo each media frame through the codec."""
    ws = web.WebSocketResponse(compress=False, decode_text=False)
    await ws.prepare(request)
    stream_sid = ""
    async for msg in ws:
        if msg.type is not WSMsgType.TEXT:
            break
        message = _decode(msg.data)
        if type(message) is _Media:
            pcm = audioop.ulaw2lin(message.media.payload, 2)
            reply = _encode(_Out(stream_sid, _MediaBody(audioop.lin2ulaw(pcm, 2))))
            await ws.send_frame(reply, WSMsgType.TEXT)
        elif type(message) is _Start:
            stream_sid = message.stream_sid
        elif type(message) is _Stop:
            break
    await ws.close()
    return ws


if __name__ == "__main__":
    app = web.Application()
    app.router.add_get("/call", echo)
    uvloop.install()
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
