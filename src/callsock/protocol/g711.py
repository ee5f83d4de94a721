"""G.711 mu-law, the only encoding Media Streams carries (8000 Hz, mono, one byte a sample).

The codec is the standard library's ``audioop`` (the ``audioop-lts`` package on Python >= 3.13,
which installs the same module). It is C, bit-exact with ITU-T G.711, and about twice as fast
as a numpy table lookup on Twilio's 160-byte frames, where per-call overhead dominates.
Nothing here assumes a frame size.
"""

from __future__ import annotations

import warnings
from typing import Any, Final

Buffer = Any  # anything with the buffer protocol: bytes, bytearray, memoryview, numpy arrays

with warnings.catch_warnings():
    # Python 3.11 and 3.12 warn that audioop leaves the standard library in 3.13;
    # on 3.13+ the audioop-lts distribution provides the module under the same name.
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

__all__ = ["MULAW_SILENCE", "SAMPLE_RATE", "SAMPLE_WIDTH", "pcm16_to_ulaw", "ulaw_to_pcm16"]

SAMPLE_RATE: Final = 8000
"""Media Streams audio is always 8 kHz."""

SAMPLE_WIDTH: Final = 2
"""Decoded audio is 16-bit signed little-endian PCM."""

MULAW_SILENCE: Final = 0xFF
"""The mu-law code for a zero sample (0x7F decodes to zero too, but encoders never emit it)."""

BYTES_PER_MS: Final = SAMPLE_RATE // 1000
"""Mu-law bytes in one millisecond of audio."""


def ulaw_to_pcm16(data: Buffer) -> bytes:
    """Decode mu-law bytes to 16-bit little-endian PCM (two bytes out per byte in)."""
    return audioop.ulaw2lin(data, SAMPLE_WIDTH)


def pcm16_to_ulaw(data: Buffer) -> bytes:
    """Encode 16-bit little-endian PCM (any buffer, a numpy int16 array included) to mu-law."""
    return audioop.lin2ulaw(data, SAMPLE_WIDTH)
