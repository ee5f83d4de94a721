"""A keypad menu: press 1 or 2 to hear a clip; a key pressed during a clip cuts it short.

On start the caller hears a short beep. Key 1 plays a low tone (440 Hz), key 2 a high one
(880 Hz), any other key a buzz. Each clip is followed by a mark named after its key
(``menu-1``...); ``call.state["heard"]`` collects ``(mark, outcome)`` pairs: ``played`` when
Twilio played the clip to the end, ``cleared`` when a key press cut it short. Run it from the
repository root with::

    callsock serve examples.dtmf_menu:app
"""

from __future__ import annotations

import asyncio

import numpy as np

from callsock import App, Call
from callsock.call.audio import PCM

RATE = 8_000
"""The clips are made at the phone's own rate, so they are sent as they are."""


def tone(freq: float, seconds: float, volume: float = 0.3) -> PCM:
    """A sine tone as int16 PCM, with 10 ms fades so it does not click."""
    t = np.arange(int(seconds * RATE)) / RATE
    envelope = np.minimum(1.0, np.minimum(t, seconds - t) / 0.01)
    return (volume * 32767 * envelope * np.sin(2 * np.pi * freq * t)).astype(np.int16)


PROMPT = tone(1_000, 0.25)
CLIPS = {"1": tone(440, 0.8), "2": tone(880, 0.8)}
ERROR = tone(150, 0.3)

app = App()


async def play_clip(call: Call, name: str, clip: PCM) -> None:
    """Play a clip, then a mark; remember whether the caller heard it all."""
    outcome = "cleared"  # unless it plays to the end
    try:
        await call.send_audio(clip, sample_rate=RATE)
        outcome = await call.mark(name)
    finally:  # also when cut short: cancelled by a key press, or the call ended
        call.state.setdefault("heard", []).append((name, outcome))


def start_clip(call: Call, name: str, clip: PCM) -> None:
    """Play a clip in the background, so that key presses are handled while it plays."""
    call.state["playing"] = call.create_task(play_clip(call, name, clip))


async def stop_clip(call: Call) -> None:
    """Cut short the clip that is playing, if any."""
    playing: asyncio.Task[None] | None = call.state.get("playing")
    if playing is not None and not playing.done():
        playing.cancel()  # stop sending the rest of it...
        await call.clear()  # ...and drop what Twilio has queued but not yet played


@app.on_start
async def welcome(call: Call) -> None:
    """Beep: the menu is ready."""
    if call.bidirectional:  # a one-way <Start><Stream> fork cannot play anything
        start_clip(call, "prompt", PROMPT)


@app.on_dtmf
async def choose(call: Call, digit: str) -> None:
    """Play the clip of the key pressed, after cutting short whatever is playing."""
    if not call.bidirectional:
        return
    await stop_clip(call)
    start_clip(call, f"menu-{digit}", CLIPS.get(digit, ERROR))
