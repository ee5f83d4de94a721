"""callsock.protocol.g711 against an independent reading of ITU-T G.711 Table 2a (mu-law).

The reference below is built from the table's structure: 8 segments of 16 intervals, with the
decision values and decoder outputs of the 14-bit magnitude scale, and sign-magnitude coding of
negative values. It does not use the usual bias-0x84 shortcut, so it checks the codec rather
than repeating it.

ITU's own G.191 software library (``g711.c`` in the STL) forms the magnitude of negative inputs
with one's complement, and so differs from this symmetric reading on 508 boundary values by one
step. callsock, like ``audioop`` and Sun's ``g711.c``, follows the symmetric sign-magnitude
reading of Table 2a, which is what these tests check.
"""

from __future__ import annotations

import struct
from bisect import bisect_right
from typing import Final

from callsock.protocol.g711 import (
    BYTES_PER_MS,
    MULAW_SILENCE,
    SAMPLE_RATE,
    SAMPLE_WIDTH,
    pcm16_to_ulaw,
    ulaw_to_pcm16,
)

# Segment 0 has decision values 1, 3, ..., 31 (steps of 2 from 1); each later segment continues
# from the previous one's last decision value with twice the step.
_SEGMENT_STEPS: Final = (2, 4, 8, 16, 32, 64, 128, 256)


def _decision_values() -> list[int]:
    """Table 2a's 128 decision values on the 14-bit magnitude scale: 1, 3, ..., 31, 35, ..., 8159.

    ``values[n]`` is where interval ``n + 1`` (counting all segments) begins; ``values[127]`` is
    8159, the overload point above which magnitudes clip.
    """
    values: list[int] = []
    last = -1  # so that segment 0 starts at 1
    for step in _SEGMENT_STEPS:
        values += [last + step * k for k in range(1, 17)]
        last = values[-1]
    return values


DECISION_VALUES: Final = _decision_values()

# Decoder outputs are the mid-points of the intervals; interval 0 spans -1..1 and decodes to 0.
OUTPUTS: Final = [0] + [(DECISION_VALUES[n - 1] + DECISION_VALUES[n]) // 2 for n in range(1, 128)]


def ref_encode(sample: int) -> int:
    """Encode one 16-bit sample with the reference table."""
    value14 = sample >> 2  # arithmetic shift: floor division by 4
    negative = value14 < 0
    magnitude = min(-value14 if negative else value14, 8159)
    index = min(bisect_right(DECISION_VALUES, magnitude), 127)  # segment * 16 + interval
    return 0xFF ^ ((0x80 if negative else 0) | index)


def ref_decode(code: int) -> int:
    """Decode one mu-law byte to a 16-bit sample with the reference table."""
    inverted = 0xFF ^ code
    magnitude = OUTPUTS[inverted & 0x7F] * 4
    return -magnitude if inverted & 0x80 else magnitude


def pcm(samples: list[int]) -> bytes:
    """Pack samples as 16-bit little-endian PCM."""
    return struct.pack(f"<{len(samples)}h", *samples)


def unpcm(data: bytes) -> list[int]:
    """Unpack 16-bit little-endian PCM."""
    return list(struct.unpack(f"<{len(data) // 2}h", data))


ALL_CODES: Final = bytes(range(256))
ALL_SAMPLES: Final = list(range(-32768, 32768))


def test_reference_table_has_table_2a_shape() -> None:
    """The generated reference has 128 decision values from 1 to 8159 at Table 2a's segment starts."""
    assert len(DECISION_VALUES) == 128
    assert DECISION_VALUES[:16] == list(range(1, 32, 2))
    segment_ends = [DECISION_VALUES[16 * s + 15] for s in range(8)]
    assert segment_ends == [31, 95, 223, 479, 991, 2015, 4063, 8159]


def test_reference_outputs_are_table_2a_midpoints() -> None:
    """Reference decoder outputs equal Table 2a's ((2i+33) << s) - 33 for every segment s and interval i."""
    expected = [((2 * i + 33) << s) - 33 for s in range(8) for i in range(16)]
    assert OUTPUTS == expected
    assert OUTPUTS[:16] == list(range(0, 32, 2))
    assert OUTPUTS[16:18] == [33, 37]


def test_decodes_all_256_codes_like_reference() -> None:
    """Every mu-law code decodes to the reference value."""
    assert unpcm(ulaw_to_pcm16(ALL_CODES)) == [ref_decode(c) for c in ALL_CODES]


def test_encodes_all_65536_samples_like_reference() -> None:
    """Every 16-bit sample encodes to the reference code."""
    encoded = pcm16_to_ulaw(pcm(ALL_SAMPLES))
    expected = bytes(ref_encode(s) for s in ALL_SAMPLES)
    assert len(encoded) == 65536
    mismatches = [
        (s, encoded[i], expected[i]) for i, s in enumerate(ALL_SAMPLES) if encoded[i] != expected[i]
    ]
    assert mismatches == []


def test_well_known_codes_decode() -> None:
    """0xFF and 0x7F decode to 0, 0x00 to -32124 and 0x80 to 32124."""
    assert unpcm(ulaw_to_pcm16(bytes([0xFF, 0x7F, 0x00, 0x80]))) == [0, 0, -32124, 32124]


def test_well_known_samples_encode() -> None:
    """0 encodes to 0xFF, -1 to 0x7E, and the extremes clip to 0x80 and 0x00."""
    assert pcm16_to_ulaw(pcm([0, 1, 3, 4, -1, -4, -5, 32767, -32768])) == bytes(
        [0xFF, 0xFF, 0xFF, 0xFE, 0x7E, 0x7E, 0x7E, 0x80, 0x00]
    )


def test_encoder_never_emits_negative_zero() -> None:
    """No 16-bit sample encodes to 0x7F (negative zero)."""
    assert 0x7F not in pcm16_to_ulaw(pcm(ALL_SAMPLES))


def test_decode_then_encode_returns_every_code_but_negative_zero() -> None:
    """Re-encoding each decoded code gives the code back, except 0x7F which becomes 0xFF."""
    expected = bytes(0xFF if c == 0x7F else c for c in ALL_CODES)
    assert pcm16_to_ulaw(ulaw_to_pcm16(ALL_CODES)) == expected


def test_decode_is_independent_of_frame_size() -> None:
    """Odd-length chunks (1, 7, 161 bytes) decode to twice their length, equal to per-byte decoding."""
    for size in (1, 7, 160, 161):
        chunk = bytes((37 * i + 11) % 256 for i in range(size))
        decoded = ulaw_to_pcm16(chunk)
        assert len(decoded) == 2 * size
        assert decoded == b"".join(ulaw_to_pcm16(chunk[i : i + 1]) for i in range(size))


def test_encode_is_independent_of_frame_size() -> None:
    """Encoding 1, 7 or 161 samples at once equals encoding them one at a time."""
    for count in (1, 7, 161):
        samples = [(i * 4099) % 65536 - 32768 for i in range(count)]
        encoded = pcm16_to_ulaw(pcm(samples))
        assert len(encoded) == count
        assert encoded == b"".join(pcm16_to_ulaw(pcm([s])) for s in samples)


def test_empty_input_gives_empty_output() -> None:
    """Empty input decodes and encodes to empty bytes."""
    assert ulaw_to_pcm16(b"") == b""
    assert pcm16_to_ulaw(b"") == b""


def test_accepts_bytearray_and_memoryview() -> None:
    """bytearray and memoryview inputs give the same result as bytes."""
    data = bytes([0x00, 0x55, 0xFF])
    assert ulaw_to_pcm16(bytearray(data)) == ulaw_to_pcm16(memoryview(data)) == ulaw_to_pcm16(data)


def test_constants() -> None:
    """Silence is 0xFF, and audio is 8 kHz, 16-bit, 8 bytes a millisecond."""
    assert (MULAW_SILENCE, SAMPLE_RATE, SAMPLE_WIDTH, BYTES_PER_MS) == (0xFF, 8000, 2, 8)
    assert ulaw_to_pcm16(bytes([MULAW_SILENCE])) == b"\x00\x00"
