"""Shared test helpers: waiting on conditions, Twilio-side message builders, a running server, WAV reading."""

from __future__ import annotations

import asyncio
import base64
import inspect
import json
import os
import struct
import time
import wave
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp

from callsock.protocol.g711 import ulaw_to_pcm16
from callsock.server.app import App
from callsock.server.routes import CallServer
from callsock.server.settings import Settings

ACCOUNT = "AC" + "0" * 32
REPO = Path(__file__).resolve().parent.parent
"""The repository's root (examples, deploy files)."""

WAIT_SECONDS = 10.0
"""How long a test waits for something that should happen at once: far more than it takes on a
busy machine, so only a real bug (it never happens) fails; the wait ends as soon as it happens."""


def _describe(condition: Callable[..., object], what: str | None) -> str:
    """Name what a test waits for: ``what``, else the condition's source (a lambda's), else its name."""
    if what is not None:
        return what
    try:
        source = inspect.getsource(condition).strip()
    except (OSError, TypeError):
        source = ""
    if getattr(condition, "__name__", "") == "<lambda>" and source:
        return source
    return getattr(condition, "__qualname__", repr(condition))


async def eventually(
    condition: Callable[[], object | Awaitable[object]],
    within: float = WAIT_SECONDS,
    interval: float = 0.01,
    *,
    what: str | None = None,
) -> Any:
    """Poll ``condition()`` (plain or async) until it is truthy; return that value.

    Fails with an AssertionError naming what was awaited after ``within`` seconds. This is how a
    test waits for a server to process, a file to appear, a task to run: never a fixed sleep.
    """
    deadline = time.monotonic() + within
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"still not true after {within} s: {_describe(condition, what)}")
        await asyncio.sleep(interval)


def eventually_sync(
    condition: Callable[[], object],
    within: float = WAIT_SECONDS,
    interval: float = 0.01,
    *,
    what: str | None = None,
) -> Any:
    """:func:`eventually` for code without an event loop (it blocks the thread while it polls)."""
    deadline = time.monotonic() + within
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"still not true after {within} s: {_describe(condition, what)}")
        time.sleep(interval)
    return result


def sid(prefix: str, n: int) -> str:
    """A Twilio-shaped SID: two letters and 32 hex digits."""
    return f"{prefix}{n:032x}"


def connected() -> str:
    return json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"})


def twilio_start(
    stream_sid: str,
    call_sid: str | None = None,
    tracks: tuple[str, ...] = ("inbound",),
    params: dict[str, str] | None = None,
) -> str:
    """Twilio's real start message (tracks as strings, mediaFormat)."""
    return json.dumps(
        {
            "event": "start",
            "sequenceNumber": "1",
            "start": {
                "accountSid": ACCOUNT,
                "streamSid": stream_sid,
                "callSid": call_sid or "CA" + stream_sid[2:],
                "tracks": list(tracks),
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                "customParameters": params or {},
            },
            "streamSid": stream_sid,
        }
    )


def seed_start(stream_sid: str, tracks: tuple[str, ...] = ("inbound",), **overrides: Any) -> str:
    """The seed guide's start: tracks as {id, format, rate, channels} objects."""
    track_objects = [
        {"id": t, "format": "audio/x-mulaw", "rate": 8000, "channels": 1, **overrides} for t in tracks
    ]
    return json.dumps({"event": "start", "streamSid": stream_sid, "start": {"tracks": track_objects}})


def media(stream_sid: str, payload: bytes, timestamp_ms: int, track: str = "inbound", seq: int = 2) -> str:
    return json.dumps(
        {
            "event": "media",
            "sequenceNumber": str(seq),
            "media": {
                "track": track,
                "chunk": str(seq - 1),
                "timestamp": str(timestamp_ms),
                "payload": base64.b64encode(payload).decode(),
            },
            "streamSid": stream_sid,
        }
    )


def dtmf(stream_sid: str, digit: str, seq: int = 3) -> str:
    return json.dumps(
        {
            "event": "dtmf",
            "streamSid": stream_sid,
            "sequenceNumber": str(seq),
            "dtmf": {"track": "inbound_track", "digit": digit},
        }
    )


def mark(stream_sid: str, name: str, seq: int = 3) -> str:
    return json.dumps(
        {"event": "mark", "sequenceNumber": str(seq), "streamSid": stream_sid, "mark": {"name": name}}
    )


def stop(stream_sid: str, seq: int = 9) -> str:
    return json.dumps(
        {
            "event": "stop",
            "sequenceNumber": str(seq),
            "stop": {"accountSid": ACCOUNT, "callSid": "CA" + stream_sid[2:]},
            "streamSid": stream_sid,
        }
    )


def frames(audio: bytes, size: int = 160) -> list[bytes]:
    """Cut mu-law audio into frames of ``size`` bytes (the last may be shorter)."""
    return [audio[i : i + size] for i in range(0, len(audio), size)]


def read_wav(path: Path) -> bytes:
    """Return the PCM frames of an 8 kHz 16-bit mono WAV, checking its format."""
    with wave.open(str(path), "rb") as w:
        assert (w.getframerate(), w.getsampwidth(), w.getnchannels()) == (8000, 2, 1)
        return w.readframes(w.getnframes())


def decoded(mulaw: bytes) -> bytes:
    return ulaw_to_pcm16(mulaw)


@asynccontextmanager
async def running_server(
    record_dir: Path, app: App | None = None, **overrides: Any
) -> AsyncIterator[CallServer]:
    """A real CallServer on 127.0.0.1 and a free port, serving ``app``."""
    settings = replace(Settings(host="127.0.0.1", port=0, record_dir=record_dir), **overrides)
    server = CallServer(settings, app)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def ws_url(server: CallServer, path: str | None = None) -> str:
    return f"ws://127.0.0.1:{server.port}{path or server.settings.path}"


def http_url(server: CallServer, path: str) -> str:
    return f"http://127.0.0.1:{server.port}{path}"


async def receive_close(ws: aiohttp.ClientWebSocketResponse) -> tuple[int | None, str]:
    """Read until the server's close frame (each message waited for at most WAIT_SECONDS); its code and reason."""
    while True:
        msg = await ws.receive(timeout=WAIT_SECONDS)
        if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING):
            return ws.close_code, msg.extra or ""


class TwilioPeer:
    """The Twilio side of one call, driven by hand over a real WebSocket."""

    def __init__(
        self, ws: aiohttp.ClientWebSocketResponse, stream_sid: str, call_sid: str | None = None
    ) -> None:
        self.ws = ws
        self.stream_sid = stream_sid
        self.call_sid = call_sid or "CA" + stream_sid[2:]
        self.seq = 1
        self.clock_ms = 0

    async def start(
        self, tracks: tuple[str, ...] = ("inbound",), params: dict[str, str] | None = None
    ) -> None:
        await self.ws.send_str(connected())
        await self.ws.send_str(twilio_start(self.stream_sid, self.call_sid, tracks, params))

    async def media(self, mulaw: bytes, track: str = "inbound") -> None:
        """Send audio as 20 ms frames on the stream clock (no real-time pacing)."""
        for frame in frames(mulaw):
            self.seq += 1
            await self.ws.send_str(media(self.stream_sid, frame, self.clock_ms, track=track, seq=self.seq))
            self.clock_ms += len(frame) // 8

    async def dtmf(self, digit: str) -> None:
        self.seq += 1
        await self.ws.send_str(dtmf(self.stream_sid, digit, seq=self.seq))

    async def mark(self, name: str) -> None:
        self.seq += 1
        await self.ws.send_str(mark(self.stream_sid, name, seq=self.seq))

    async def stop(self) -> None:
        self.seq += 1
        await self.ws.send_str(stop(self.stream_sid, seq=self.seq))

    async def receive(self) -> dict[str, Any] | None:
        """The next message from the server (waiting at most WAIT_SECONDS), parsed; None once it closes."""
        msg = await self.ws.receive(timeout=WAIT_SECONDS)
        if msg.type is not aiohttp.WSMsgType.TEXT:
            return None
        message: dict[str, Any] = json.loads(msg.data)
        return message

    async def receive_until(self, event: str) -> list[dict[str, Any]]:
        """Messages up to and including the first of ``event`` (or all, if the server closes)."""
        received: list[dict[str, Any]] = []
        while (message := await self.receive()) is not None:
            received.append(message)
            if message["event"] == event:
                break
        return received


def payload_audio(messages: list[dict[str, Any]]) -> bytes:
    """The mu-law audio of the media messages among ``messages``, in order."""
    return b"".join(base64.b64decode(m["media"]["payload"]) for m in messages if m["event"] == "media")


_CLOSED = (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING)
FRAME = bytes(range(0, 256, 8)) * 5  # 160 bytes, varied


class StreamingCall:
    """A call that streams FRAME every 20 ms until the server closes it; keeps what it sent."""

    def __init__(
        self,
        client: aiohttp.ClientSession,
        url: str,
        n: int,
        params: dict[str, str] | None = None,
        **connect: Any,
    ) -> None:
        self.client, self.url, self.connect = client, url, connect
        self.stream_sid, self.call_sid = sid("MZ", n), sid("CA", n)
        self.params = params  # the start's customParameters
        self.sent = 0
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self.answered_at: float | None = None  # when the server first sent something (its close)

    async def run(self, seconds: float | None = None) -> None:
        """Stream for ``seconds`` (then stop), or until the server closes the connection."""
        async with self.client.ws_connect(self.url, **self.connect) as ws:
            await ws.send_str(twilio_start(self.stream_sid, self.call_sid, params=self.params))
            reader = asyncio.create_task(ws.receive())
            reader.add_done_callback(lambda _: setattr(self, "answered_at", time.monotonic()))
            began = time.monotonic()
            while not reader.done() and (seconds is None or time.monotonic() - began < seconds):
                try:
                    await ws.send_str(media(self.stream_sid, FRAME, 20 * self.sent))
                except ConnectionError:
                    break
                self.sent += 1
                await asyncio.sleep(0.02)
            if not reader.done():
                await ws.send_str(stop(self.stream_sid))
            message = await reader
            while message.type not in _CLOSED and not ws.closed:
                message = await ws.receive()
            self.close_code = ws.close_code
            self.close_reason = message.extra if message.type is aiohttp.WSMsgType.CLOSE else None

    def audio(self) -> bytes:
        """The linear PCM of what was sent."""
        return decoded(FRAME * self.sent)


def files_under(directory: Path) -> list[Path]:
    """The files under ``directory`` (none if it does not exist), also while a server removes some.

    ``Path.rglob`` raises FileNotFoundError when a directory it found vanishes before it looks
    inside, as a call's ``.partial/`` directory does when the call is published; ``os.walk``
    skips it.
    """
    return [Path(root) / name for root, _, names in os.walk(directory) for name in names]


def published(record_dir: Path) -> dict[str, dict[str, Any]]:
    """The published summaries, by streamSid."""
    return {
        json.loads(path.read_text())["streamSid"]: json.loads(path.read_text())
        for path in record_dir.glob("*/*.json")
    }


def assert_valid_wav(path: Path) -> bytes:
    """Check an 8 kHz 16-bit mono WAV whose header matches its size; return its PCM."""
    with wave.open(str(path), "rb") as w:
        assert (w.getframerate(), w.getsampwidth(), w.getnchannels()) == (8000, 2, 1)
        assert 44 + 2 * w.getnframes() == path.stat().st_size
    return read_wav(path)


RFC_KEY = b"\x37\xfa\x21\x3d"  # the masking key of the examples in RFC 6455 section 5.7


def raw_frame(
    opcode: int,
    payload: bytes,
    key: bytes | None = RFC_KEY,
    *,
    fin: bool = True,
    rsv: int = 0,
    announce: int | None = None,
) -> bytes:
    """A client frame built independently of callsock (RFC 6455 section 5.2).

    ``rsv`` is the three RSV bits as a number (0-7); the payload is masked with ``key`` (5.3), or
    not at all with ``None``; ``announce`` lies about the payload's length.
    """
    size = len(payload) if announce is None else announce
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    mask_bit = 0x80 if key is not None else 0
    if size < 126:
        header = bytes((first, mask_bit | size))
    elif size < 1 << 16:
        header = bytes((first, mask_bit | 126)) + struct.pack(">H", size)
    else:
        header = bytes((first, mask_bit | 127)) + struct.pack(">Q", size)
    if key is None:
        return header + payload
    stream = (key * (len(payload) // 4 + 1))[: len(payload)]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(len(payload), "big")
    return header + key + masked
