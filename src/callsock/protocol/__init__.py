"""The sans-I/O core: Media Streams and RFC 6455 as rules over bytes, with no asyncio and no sockets.

It imports nothing of callsock's outside itself, and nothing heavier than msgspec and audioop:
``import callsock.protocol`` pulls in no web framework, Redis client, numpy or Twilio library.
"""
