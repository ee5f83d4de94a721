"""The callsock application the benchmark runs: the same echo work the other servers do.

Each inbound frame is decoded from mu-law to 16-bit PCM and encoded back before it is sent, as
the FastAPI and Node echo servers do, so the comparison is of equal work. Everything else
callsock does stays on: validation, metrics, recording, pacing.
"""

from __future__ import annotations

from callsock import App, AudioFrame, Call

codec_echo = App()


@codec_echo.on_audio
async def echo(call: Call, frame: AudioFrame) -> None:
    """Send the frame back through the codec: mu-law to PCM (frame.pcm), PCM to mu-law."""
    await call.send_audio(frame.pcm)
