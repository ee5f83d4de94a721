"""The built-in applications ``callsock serve --echo`` and ``--greeting FILE.wav`` run."""

from __future__ import annotations

from ..server.settings import Settings
from .app import App
from .audio import load_wav
from .call import AudioFrame, Call

__all__ = ["builtin_app", "echo_app", "greeting_app"]


def echo_app() -> App:
    """Send each inbound frame straight back: the caller hears themselves (Twilio's connect-basic)."""
    app = App()

    @app.on_audio
    async def echo(call: Call, frame: AudioFrame) -> None:
        if call.bidirectional and frame.track == "inbound":
            await call.send_mulaw(frame.mulaw)

    return app


def greeting_app(path: str) -> App:
    """Play a WAV file (any rate, resampled to 8 kHz) when a call starts.

    Raises:
        ValueError: the file is not a PCM WAV file.
    """
    pcm = load_wav(path)
    app = App()

    @app.on_start
    async def greet(call: Call) -> None:
        if call.bidirectional:
            call.play(pcm)

    return app


def builtin_app(settings: Settings) -> App | None:
    """The built-ins the settings ask for, greeting first, or ``None``."""
    parts = []
    if settings.greeting is not None:
        parts.append(greeting_app(str(settings.greeting)))
    if settings.echo:
        parts.append(echo_app())
    if not parts:
        return None
    app = App()
    for part in parts:
        app.include(part)
    return app
