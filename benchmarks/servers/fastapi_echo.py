"""A Media Streams echo server in the style of Twilio's Python samples: FastAPI on uvicorn.

Like twilio-samples/speech-assistant-openai-realtime-api-python: a FastAPI WebSocket route,
``json.loads`` of each message, the start's streamSid kept, ``base64`` and ``audioop`` for the
audio, ``websocket.send_text(json.dumps(...))`` back. Each media frame is decoded to PCM and
encoded again, the same work the callsock and Node benchmarks do. Run with
``uvicorn benchmarks.servers.fastapi_echo:app``.
"""

from __future__ import annotations

import base64
import json
import warnings

from fastapi import FastAPI, WebSocket, WebSocketDisconnect

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

app = FastAPI()


@app.websocket("/call")
async def media_stream(websocket: WebSocket) -> None:
    """Echo every media frame back through the G.711 codec; close on stop."""
    await websocket.accept()
    stream_sid = None
    try:
        while True:
            data = json.loads(await websocket.receive_text())
            event = data["event"]
            if event == "start":
                stream_sid = data["start"]["streamSid"]
            elif event == "media":
                pcm = audioop.ulaw2lin(base64.b64decode(data["media"]["payload"]), 2)
                payload = base64.b64encode(audioop.lin2ulaw(pcm, 2)).decode("ascii")
                await websocket.send_text(
                    json.dumps({"event": "media", "streamSid": stream_sid, "media": {"payload": payload}})
                )
            elif event == "stop":
                await websocket.close()
                return
    except WebSocketDisconnect:
        pass
