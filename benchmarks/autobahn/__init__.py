"""The Autobahn WebSocket test suite against callsock's own framing (``make autobahn``)."""
