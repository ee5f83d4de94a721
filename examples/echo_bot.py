"""Echo bot: the caller hears themselves, like Twilio's ``connect-basic`` sample.

Every 20 ms frame of the caller's audio is sent straight back, as the mu-law bytes it arrived
in (no decoding, no resampling). Run it from the repository root with::

    callsock serve examples.echo_bot:app

and point a ``<Connect><Stream url="wss://your-host/call">`` at it.
"""

from __future__ import annotations

from callsock import App, AudioFrame, Call

app = App()


@app.on_audio
async def echo(call: Call, frame: AudioFrame) -> None:
    """Send each frame of the caller's audio back to them."""
    if call.bidirectional:  # a one-way <Start><Stream> fork has no way back
        await call.send_mulaw(frame.mulaw)
