"""Greeting with barge-in: play a tune when the call starts; stop it when the caller talks.

The greeting is synthesized at 16 kHz (callsock resamples it to the phone's 8 kHz) and played
with ``call.play``, in the background, so ``on_audio`` keeps running while it plays. When the
caller's audio stays loud for three frames in a row (60 ms) during the greeting, the app
cancels the rest of the greeting, clears what Twilio has queued and sends a ``barged-in`` mark.
Run it from the repository root with::

    callsock serve examples.greeting:app
"""

from __future__ import annotations

import asyncio

import numpy as np

from callsock import App, AudioFrame, Call
from callsock.call.audio import PCM

GREETING_RATE = 16_000
"""The rate the greeting is made at; ``call.play`` resamples it to 8 kHz."""

BARGE_IN_RMS = 1_000.0
"""Caller loudness (RMS of 16-bit samples) that counts as speech; a quiet line is far below."""

BARGE_IN_FRAMES = 3
"""How many loud 20 ms frames in a row interrupt the greeting."""

_C4, _D4, _E4 = 261.63, 293.66, 329.63
MELODY = [(_E4, 0.4), (_D4, 0.4), (_C4, 0.4), (_D4, 0.4), (_E4, 0.4), (_E4, 0.4), (_E4, 0.6)]
"""(frequency in Hz, seconds): "Mary had a little lamb", 3 s."""


def tune(notes: list[tuple[float, float]], rate: int = GREETING_RATE) -> PCM:
    """Synthesize notes as int16 PCM: sine tones with 10 ms fades so they do not click."""
    parts = []
    for freq, seconds in notes:
        t = np.arange(int(seconds * rate)) / rate
        envelope = np.minimum(1.0, np.minimum(t, seconds - t) / 0.01)
        parts.append(0.3 * envelope * np.sin(2 * np.pi * freq * t))
    return (np.concatenate(parts) * 32767).astype(np.int16)


GREETING = tune(MELODY)

app = App()


@app.on_start
async def greet(call: Call) -> None:
    """Start the greeting in the background and get ready to listen."""
    call.state["loud_frames"] = 0
    if call.bidirectional:  # a one-way <Start><Stream> fork cannot play anything
        call.state["greeting"] = call.play(GREETING, sample_rate=GREETING_RATE)


@app.on_audio
async def barge_in(call: Call, frame: AudioFrame) -> None:
    """Interrupt the greeting once the caller has been loud for ``BARGE_IN_FRAMES`` frames."""
    greeting: asyncio.Task[None] | None = call.state.get("greeting")
    if greeting is None or greeting.done():
        return  # nothing to interrupt: skip the per-frame work
    samples = frame.pcm.astype(np.float32)
    loud = float(np.mean(samples * samples)) > BARGE_IN_RMS**2
    call.state["loud_frames"] = call.state["loud_frames"] + 1 if loud else 0
    if call.state["loud_frames"] < BARGE_IN_FRAMES:
        return
    greeting.cancel()  # stop sending the rest...
    call.state["greeting"] = None
    await call.clear()  # ...and drop what Twilio has queued but not yet played
    # Nothing is queued after a clear, so Twilio echoes this mark at once.
    call.state["barged_in"] = await call.mark("barged-in")
