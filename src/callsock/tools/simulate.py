"""``callsock simulate``: one call placed the way Twilio places it, and a report of what happened.

The simulator plays Twilio's side of a Media Stream at real-time pace: ``connected`` (Twilio's
dialect only), ``start``, the audio in 20 ms frames on absolute deadlines, DTMF digits with
silence between them, then ``stop``. Like Twilio on a bidirectional stream it plays what the
server sends back on a playback clock and echoes each mark when the audio before it has
played, or at once after a ``clear`` (Twilio echoes pending marks on clear; WebSocket Messages,
"Send a clear message"). On a fork (``--fork``) the server must send nothing.

It checks each message the server sends (JSON text, known event, the stream's SID, a base64
payload, a named mark) and reports the handshake, the start acknowledgement, marks, the delay
to the first audio back, and the close code.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
import wave
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiohttp

from ..call.audio import load_wav, pcm_to_mulaw
from ..call.outbound import FRAME_BYTES
from ..protocol.g711 import MULAW_SILENCE, SAMPLE_RATE, ulaw_to_pcm16
from ..server.twilio import signature_for
from .twilio_side import Caller, Dialect

__all__ = ["SimulationConfig", "SimulationReport", "simulate", "write_reply"]

ForkTrack = Literal["inbound", "outbound", "both"]
_FRAME_SECONDS = FRAME_BYTES / SAMPLE_RATE
_DTMF_GAP_FRAMES = 10  # 200 ms of silence after each digit


@dataclass(frozen=True)
class SimulationConfig:
    """What call to place.

    Attributes:
        url: the server's WebSocket URL.
        audio: a PCM WAV file (any rate and channels) the caller says.
        dialect: ``twilio`` or ``seed``.
        fork: simulate a one-way ``<Start><Stream>`` (no marks, nothing may come back).
        track: on a fork, which tracks carry the audio.
        dtmf: digits pressed after the audio.
        parameters: ``customParameters`` of ``start``.
        auth_token: sign the upgrade with ``X-Twilio-Signature`` and give ``start`` the call's
            stream token, as Twilio does with callsock's TwiML.
        quiet_seconds: after the caller is done, this long without audio back ends the call.
        max_drain_seconds: the longest wait for the server to finish after the caller is done.
    """

    url: str
    audio: Path
    dialect: Dialect = "twilio"
    fork: bool = False
    track: ForkTrack = "inbound"
    dtmf: str = ""
    parameters: dict[str, str] = field(default_factory=dict)
    auth_token: str | None = None
    quiet_seconds: float = 1.0
    max_drain_seconds: float = 10.0

    def __post_init__(self) -> None:
        if self.track != "inbound" and not self.fork:
            raise ValueError(f"track {self.track!r} needs fork: a bidirectional stream has only inbound")


@dataclass
class SimulationReport:
    """What happened on the call (times in milliseconds).

    ``frames_sent`` counts the media messages sent on every track; ``frames_by_track`` splits
    them (a ``--fork --track both`` call sends each 20 ms of audio on both tracks).
    """

    url: str
    dialect: str
    handshake_status: int | None = None
    handshake_ms: float | None = None
    stream_sid: str = ""
    call_sid: str = ""
    ack_received: bool = False
    ack_exact: bool | None = None
    frames_sent: int = 0
    frames_by_track: dict[str, int] = field(default_factory=dict)
    dtmf_sent: str = ""
    media_received: int = 0
    audio_received_ms: float = 0.0
    first_audio_ms: float | None = None
    marks_received: int = 0
    marks_echoed: int = 0
    clears_received: int = 0
    unknown_events: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    close_code: int | None = None
    close_reason: str = ""
    closed_by: str | None = None
    error: str | None = None
    reply: bytes = field(default=b"", repr=False)

    @property
    def ok(self) -> bool:
        """Whether the call went through cleanly.

        That is: upgraded, acknowledged exactly (seed dialect), no violation, closed normally.
        """
        acknowledged = self.dialect != "seed" or (self.ack_received and bool(self.ack_exact))
        return (
            self.error is None
            and self.handshake_status == 101
            and acknowledged
            and not self.violations
            and self.close_code in (1000, None)
        )

    def to_dict(self) -> dict[str, Any]:
        """The report as plain data (``--json``)."""
        data = asdict(self)
        del data["reply"]
        data["ok"] = self.ok
        return data


def write_reply(report: SimulationReport, path: Path) -> None:
    """Write the audio the server sent back as an 8 kHz 16-bit mono WAV."""
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(ulaw_to_pcm16(report.reply))


async def simulate(config: SimulationConfig) -> SimulationReport:
    """Place one call and report on it; connection failures are reported, not raised."""
    caller = Caller(
        dialect=config.dialect,
        parameters=dict(config.parameters),
        tracks=_tracks(config),
        auth_token=config.auth_token,
    )
    report = SimulationReport(
        config.url, config.dialect, stream_sid=caller.stream_sid, call_sid=caller.call_sid
    )
    frames = _frames(load_wav(config.audio))
    headers = {"User-Agent": "Twilio.TmeWs/1.0"}
    if config.auth_token:
        headers["X-Twilio-Signature"] = signature_for(config.auth_token, config.url, {})
    began = time.monotonic()
    async with aiohttp.ClientSession() as session:
        try:
            ws = await session.ws_connect(config.url, headers=headers, autoclose=False, compress=0)
        except aiohttp.WSServerHandshakeError as exc:
            report.handshake_status = exc.status
            report.error = f"handshake refused: HTTP {exc.status}"
            return report
        except (aiohttp.ClientError, OSError) as exc:
            report.error = f"cannot connect: {exc}"
            return report
        report.handshake_status = 101
        report.handshake_ms = round(1000 * (time.monotonic() - began), 1)
        async with ws:
            await _run_call(ws, caller, frames, config, report)
    return report


class _Line:
    """The receiving side of the call: Twilio's playback clock, marks and checks."""

    def __init__(
        self,
        ws: aiohttp.ClientWebSocketResponse,
        caller: Caller,
        config: SimulationConfig,
        report: SimulationReport,
    ) -> None:
        self.ws = ws
        self.caller = caller
        self.config = config
        self.report = report
        self.stream_start = 0.0
        self.playing_until = 0.0
        self.last_audio = 0.0
        self.pending_marks: list[tuple[float, str]] = []
        self.ack_wanted = config.dialect == "seed"
        self.closed = asyncio.Event()

    async def receive(self) -> None:
        try:
            while True:
                msg = await self.ws.receive()
                if msg.type is aiohttp.WSMsgType.TEXT:
                    await self._message(msg.data)
                elif msg.type is aiohttp.WSMsgType.BINARY:
                    self._violation("binary frame (Twilio: warning 31950)")
                elif msg.type is aiohttp.WSMsgType.CLOSE:
                    self.report.close_code, self.report.close_reason = msg.data, msg.extra or ""
                    if self.report.closed_by is None:
                        self.report.closed_by = "server"
                    await self.ws.close()
                    return
                elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                    return
                await self._echo_due_marks()
        finally:
            self.closed.set()

    async def _message(self, text: str) -> None:
        report = self.report
        try:
            message = json.loads(text)
        except ValueError:
            self._violation("message is not JSON (31951)")
            return
        if not isinstance(message, dict) or not isinstance(message.get("event"), str):
            self._violation("message without an event (31951)")
            return
        event = message["event"]
        if self.ack_wanted and event == "start" and not report.ack_received:
            self._ack(text)
            return
        if event not in ("media", "mark", "clear"):
            report.unknown_events.append(event)
            return
        if self.config.fork:
            self._violation(f"{event} sent on a one-way fork (31924)")
        if message.get("streamSid") != self.caller.stream_sid:
            self._violation(f"{event} with a missing or wrong streamSid (31951)")
        if event == "media":
            self._media(message)
        elif event == "mark":
            self._mark(message)
        else:
            report.clears_received += 1
            self.playing_until = time.monotonic()
            for _, name in self.pending_marks:  # Twilio echoes pending marks on clear
                await self._send_mark(name)
            self.pending_marks.clear()

    def _ack(self, text: str) -> None:
        report = self.report
        report.ack_received = True
        expected = json.dumps(
            {
                "event": "start",
                "protocol": "wss",
                "version": "1.0.0",
                "streamSid": self.caller.stream_sid,
                "tracks": [{"id": t} for t in self.caller.tracks],
            },
            separators=(",", ":"),
        )
        report.ack_exact = text == expected

    def _media(self, message: dict[str, Any]) -> None:
        report = self.report
        payload = message.get("media", {}).get("payload") if isinstance(message.get("media"), dict) else None
        try:
            audio = base64.b64decode(payload, validate=True) if isinstance(payload, str) else None
        except binascii.Error:
            audio = None
        if audio is None:
            self._violation("media without a valid base64 payload (31951)")
            return
        now = time.monotonic()
        if report.first_audio_ms is None:
            report.first_audio_ms = round(1000 * (now - self.stream_start), 1)
        report.media_received += 1
        report.reply += audio
        report.audio_received_ms = 1000 * len(report.reply) / SAMPLE_RATE
        self.playing_until = max(self.playing_until, now) + len(audio) / SAMPLE_RATE
        self.last_audio = now

    def _mark(self, message: dict[str, Any]) -> None:
        mark = message.get("mark")
        name = mark.get("name") if isinstance(mark, dict) else None
        if not isinstance(name, str):
            self._violation("mark without mark.name (31951)")
            return
        self.report.marks_received += 1
        self.pending_marks.append((max(self.playing_until, time.monotonic()), name))

    async def _echo_due_marks(self) -> None:
        now = time.monotonic()
        while self.pending_marks and self.pending_marks[0][0] <= now:
            _, name = self.pending_marks.pop(0)
            await self._send_mark(name)

    async def _send_mark(self, name: str) -> None:
        if not self.ws.closed:
            await self.ws.send_str(self.caller.mark(name).decode())
            self.report.marks_echoed += 1

    def _violation(self, what: str) -> None:
        if what not in self.report.violations:
            self.report.violations.append(what)


async def _run_call(
    ws: aiohttp.ClientWebSocketResponse,
    caller: Caller,
    frames: list[bytes],
    config: SimulationConfig,
    report: SimulationReport,
) -> None:
    line = _Line(ws, caller, config, report)
    receiving = asyncio.create_task(line.receive())
    try:
        if config.dialect == "twilio":
            await ws.send_str(caller.connected().decode())
        await ws.send_str(caller.start().decode())
        line.stream_start = time.monotonic()
        await _stream(ws, caller, frames, line, config)
        await _drain(line, config)
        if not line.closed.is_set():
            report.closed_by = "caller"
            await ws.send_str(caller.stop().decode())
            await asyncio.wait_for(line.closed.wait(), 5.0)
    except (TimeoutError, ConnectionError, aiohttp.ClientError) as exc:
        report.error = report.error or f"{type(exc).__name__}: {exc}"
    finally:
        receiving.cancel()
        if report.close_code is None and ws.close_code is not None:
            report.close_code = ws.close_code


async def _stream(
    ws: aiohttp.ClientWebSocketResponse,
    caller: Caller,
    frames: list[bytes],
    line: _Line,
    config: SimulationConfig,
) -> None:
    """Send the audio, then the digits with silence between them, each frame on its deadline."""
    schedule: list[tuple[bytes, str | None]] = [(frame, None) for frame in frames]
    silence = bytes([MULAW_SILENCE]) * FRAME_BYTES
    for pressed in config.dtmf:
        schedule.append((b"", pressed))
        schedule.extend((silence, None) for _ in range(_DTMF_GAP_FRAMES))
    tracks = caller.tracks
    for index, (frame, digit) in enumerate(schedule):
        delay = line.stream_start + index * _FRAME_SECONDS - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        if line.closed.is_set():
            return
        await line._echo_due_marks()
        if digit is not None:
            await ws.send_str(caller.dtmf(digit).decode())
            line.report.dtmf_sent += digit
            continue
        for track in tracks:
            await ws.send_str(caller.media(frame, track).decode())
            _count_frame(line.report, track)


def _count_frame(report: SimulationReport, track: str) -> None:
    report.frames_sent += 1
    report.frames_by_track[track] = report.frames_by_track.get(track, 0) + 1


async def _drain(line: _Line, config: SimulationConfig) -> None:
    """Wait for the server to finish: no audio for ``quiet_seconds`` and no mark pending."""
    deadline = time.monotonic() + config.max_drain_seconds
    while time.monotonic() < deadline and not line.closed.is_set():
        now = time.monotonic()
        quiet = now - max(line.last_audio, line.playing_until) >= config.quiet_seconds
        if quiet and not line.pending_marks:
            return
        await asyncio.sleep(0.02)
        await line._echo_due_marks()


def _frames(pcm: Any) -> list[bytes]:
    mulaw = pcm_to_mulaw(pcm)
    padding = (-len(mulaw)) % FRAME_BYTES
    mulaw += bytes([MULAW_SILENCE]) * padding
    return [mulaw[i : i + FRAME_BYTES] for i in range(0, len(mulaw), FRAME_BYTES)]


def _tracks(config: SimulationConfig) -> tuple[str, ...]:
    if not config.fork or config.track == "inbound":
        return ("inbound",)
    if config.track == "outbound":
        return ("outbound",)
    return ("inbound", "outbound")
