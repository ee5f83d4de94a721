"""The built-in applications ``callsock serve --echo`` and ``--greeting FILE.wav`` run."""

from __future__ import annotations

from pathlib import Path

from .audio import PCM, load_wav
from .call import AudioFrame, Call
from .handlers import Handlers

__all__ = ["builtin_handlers"]


async def echo(call: Call, frame: AudioFrame) -> None:
    """Send each inbound frame straight back: the caller hears themselves (Twilio's connect-basic)."""
    if call.bidirectional and frame.track == "inbound":
        await call.send_mulaw(frame.mulaw)


class Greeting:
    """Play a WAV file (any rate, resampled to 8 kHz) when a call starts.

    Raises:
        ValueError: the file is not a PCM WAV file.
    """

    def __init__(self, path: Path) -> None:
        self.pcm: PCM = load_wav(path)

    async def __call__(self, call: Call) -> None:
        """Start playing (in the background: the caller may interrupt it)."""
        if call.bidirectional:
            call.play(self.pcm)


def builtin_handlers(*, echo_calls: bool = False, greeting: Path | None = None) -> Handlers:
    """The handlers of the built-ins asked for: the greeting first, then the echo."""
    handlers = Handlers()
    if greeting is not None:
        handlers.start.append(Greeting(greeting))
    if echo_calls:
        handlers.audio.append(echo)
    return handlers
