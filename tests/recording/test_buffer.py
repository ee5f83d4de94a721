"""AudioBuffer: bounded memory, wiped flushes, and each track placed on the stream's timeline."""

from __future__ import annotations

import pytest

from callsock.recording.buffer import AudioBuffer

SILENCE = b"\xff"


class Sink:
    """A deliver callback that keeps a copy of every delivery."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bytes]] = []

    def __call__(self, track: str, data: bytearray) -> None:
        self.calls.append((track, bytes(data)))

    def sizes(self) -> list[int]:
        return [len(data) for _, data in self.calls]

    def joined(self, track: str) -> bytes:
        return b"".join(data for t, data in self.calls if t == track)


def audio(size: int, value: int = 0x11) -> bytes:
    """``size`` bytes of mu-law audio, distinct from silence."""
    return bytes([value]) * size


def test_capacity_below_one_raises() -> None:
    """A capacity below one byte is refused."""
    for capacity in (0, -1):
        with pytest.raises(ValueError):
            AudioBuffer(["inbound"], capacity, Sink())


def test_holds_at_most_capacity() -> None:
    """Adding many frames never leaves more than capacity bytes buffered, and each delivery fits it."""
    sink = Sink()
    buf = AudioBuffer(["inbound"], 500, sink)
    for i in range(50):
        buf.add("inbound", None, audio(160, i))
        assert buf.size <= 500
    assert max(sink.sizes()) <= 500
    buf.flush()
    assert sink.joined("inbound") == b"".join(audio(160, i) for i in range(50))


def test_flushes_before_an_add_that_would_overflow() -> None:
    """An add that would overflow delivers what is buffered first, then buffers the new chunk."""
    sink = Sink()
    buf = AudioBuffer(["inbound"], 500, sink)
    for _ in range(3):
        buf.add("inbound", None, audio(160))
    assert sink.calls == []
    assert buf.size == 480
    buf.add("inbound", None, audio(160, 0x22))
    assert sink.calls == [("inbound", audio(480))]
    assert buf.size == 160


def test_flushes_when_exactly_full() -> None:
    """Reaching capacity exactly delivers at once and leaves the buffer empty."""
    sink = Sink()
    buf = AudioBuffer(["inbound"], 500, sink)
    buf.add("inbound", None, audio(250))
    buf.add("inbound", None, audio(250, 0x22))
    assert sink.calls == [("inbound", audio(250) + audio(250, 0x22))]
    assert buf.size == 0


def test_capacity_counts_all_tracks() -> None:
    """Capacity is shared: a chunk of one track can flush another track's bytes."""
    sink = Sink()
    buf = AudioBuffer(["inbound", "outbound"], 500, sink)
    buf.add("inbound", None, audio(300))
    buf.add("outbound", None, audio(300, 0x22))
    assert sink.calls == [("inbound", audio(300))]
    assert buf.size == 300


def test_chunk_larger_than_capacity_is_delivered_whole_and_in_order() -> None:
    """A chunk over capacity is delivered whole, after what was buffered before it, and nothing is lost."""
    sink = Sink()
    buf = AudioBuffer(["inbound"], 500, sink)
    big = bytes(i % 256 for i in range(1200))
    buf.add("inbound", None, audio(100))
    buf.add("inbound", None, big)
    buf.add("inbound", None, audio(10, 0x33))
    assert sink.calls == [("inbound", audio(100)), ("inbound", big)]
    assert buf.size == 10
    buf.flush()
    assert sink.joined("inbound") == audio(100) + big + audio(10, 0x33)


def test_flush_of_empty_buffer_delivers_nothing() -> None:
    """Flushing with nothing buffered does not call deliver."""
    sink = Sink()
    buf = AudioBuffer(["inbound", "outbound"], 500, sink)
    buf.flush()
    assert sink.calls == []
    assert buf.size == 0


def test_flush_delivers_each_nonempty_track() -> None:
    """A flush hands each track's bytes to deliver, one call per track with data."""
    sink = Sink()
    buf = AudioBuffer(["inbound", "outbound"], 500, sink)
    buf.add("inbound", None, audio(20))
    buf.add("outbound", None, audio(30, 0x22))
    buf.flush()
    assert sink.calls == [("inbound", audio(20)), ("outbound", audio(30, 0x22))]
    assert buf.size == 0


def test_delivered_bytearray_is_wiped_after_flush() -> None:
    """The bytearray given to deliver holds the audio during the call and is empty afterwards."""
    captured: list[bytearray] = []
    contents: list[bytes] = []

    def deliver(track: str, data: bytearray) -> None:
        captured.append(data)
        contents.append(bytes(data))

    buf = AudioBuffer(["inbound"], 500, deliver)
    buf.add("inbound", None, audio(160, 0x5A))
    buf.flush()
    assert contents == [audio(160, 0x5A)]
    assert len(captured) == 1
    assert captured[0] == bytearray()


def test_delivered_bytes_are_overwritten_with_zeros() -> None:
    """The audio is overwritten with zeros before release, as a view kept by the callback shows."""
    views: list[memoryview] = []

    def deliver(track: str, data: bytearray) -> None:
        views.append(memoryview(data))

    buf = AudioBuffer(["inbound"], 500, deliver)
    buf.add("inbound", None, audio(160, 0x5A))
    # The kept view pins the bytearray, so releasing it (clear) fails after the wipe.
    with pytest.raises(BufferError):
        buf.flush()
    assert views[0].tobytes() == bytes(160)
    views[0].release()


def test_buffer_is_wiped_when_deliver_raises() -> None:
    """If deliver raises, the error propagates and the delivered bytes are still wiped."""
    captured: list[bytearray] = []

    def deliver(track: str, data: bytearray) -> None:
        captured.append(data)
        raise OSError("disk full")

    buf = AudioBuffer(["inbound"], 500, deliver)
    buf.add("inbound", None, audio(160))
    with pytest.raises(OSError, match="disk full"):
        buf.flush()
    assert captured[0] == bytearray()


def test_gap_is_filled_with_silence_of_its_length() -> None:
    """A chunk that starts after the previous one ends is preceded by 0xFF, 8 bytes a millisecond."""
    sink = Sink()
    buf = AudioBuffer(["inbound"], 500, sink)
    buf.add("inbound", 0, audio(80))  # 0..10 ms
    buf.add("inbound", 13, audio(8, 0x22))  # 3 ms gap
    buf.flush()
    assert sink.joined("inbound") == audio(80) + SILENCE * 24 + audio(8, 0x22)
    assert buf.silence_bytes == 24
    assert buf.clamped_gaps == 0


def test_first_chunk_after_zero_gets_leading_silence() -> None:
    """A first chunk stamped 5 ms is preceded by 40 bytes of silence."""
    sink = Sink()
    buf = AudioBuffer(["inbound"], 500, sink)
    buf.add("inbound", 5, audio(8))
    buf.flush()
    assert sink.joined("inbound") == SILENCE * 40 + audio(8)
    assert buf.position_ms("inbound") == 6.0


def test_contiguous_timestamps_insert_nothing() -> None:
    """Chunks stamped exactly where the previous ended are appended with no silence."""
    sink = Sink()
    buf = AudioBuffer(["inbound"], 500, sink)
    buf.add("inbound", 0, audio(160))
    buf.add("inbound", 20, audio(160, 0x22))
    buf.flush()
    assert sink.joined("inbound") == audio(160) + audio(160, 0x22)
    assert buf.silence_bytes == 0


def test_overlap_is_appended_without_dropping() -> None:
    """A chunk that starts before the previous one ends is appended whole."""
    sink = Sink()
    buf = AudioBuffer(["inbound"], 500, sink)
    buf.add("inbound", 0, audio(160))  # 0..20 ms
    buf.add("inbound", 10, audio(160, 0x22))  # overlaps by 10 ms
    buf.flush()
    assert sink.joined("inbound") == audio(160) + audio(160, 0x22)
    assert buf.position_ms("inbound") == 40.0
    assert buf.silence_bytes == 0


def test_backward_timestamp_is_appended_without_dropping() -> None:
    """A timestamp that steps back to 0 appends the chunk after the audio so far."""
    sink = Sink()
    buf = AudioBuffer(["inbound"], 500, sink)
    buf.add("inbound", 100, audio(8))
    buf.add("inbound", 0, audio(8, 0x22))
    buf.flush()
    assert sink.joined("inbound") == SILENCE * 800 + audio(8) + audio(8, 0x22)
    assert buf.silence_bytes == 800


def test_none_timestamp_appends_contiguously() -> None:
    """A chunk without a timestamp goes right after the last, with no silence."""
    sink = Sink()
    buf = AudioBuffer(["inbound"], 500, sink)
    buf.add("inbound", 10, audio(8))
    buf.add("inbound", None, audio(8, 0x22))
    buf.add("inbound", None, audio(3, 0x33))
    buf.flush()
    assert sink.joined("inbound") == SILENCE * 80 + audio(8) + audio(8, 0x22) + audio(3, 0x33)
    assert buf.silence_bytes == 80


def test_gap_above_max_is_clamped_and_counted() -> None:
    """A jump longer than max_gap_ms inserts only max_gap_ms of silence and counts a clamped gap."""
    sink = Sink()
    buf = AudioBuffer(["inbound"], 500, sink, max_gap_ms=5)
    buf.add("inbound", 0, audio(8))
    buf.add("inbound", 100, audio(8, 0x22))
    buf.flush()
    assert sink.joined("inbound") == audio(8) + SILENCE * 40 + audio(8, 0x22)
    assert buf.clamped_gaps == 1
    assert buf.silence_bytes == 40


def test_clamped_jump_is_not_filled_again_by_the_next_chunk() -> None:
    """After a clamped jump, the chunk that follows it contiguously inserts no more silence.

    Fails on src/callsock/buffer.py as written (AudioBuffer.add): the clamp does not move the
    track's timeline, so every following chunk sees the rest of the jump as a new gap.
    """
    sink = Sink()
    buf = AudioBuffer(["inbound"], 500, sink, max_gap_ms=5)
    buf.add("inbound", 0, audio(8))  # 0..1 ms
    buf.add("inbound", 100, audio(8, 0x22))  # jump of 99 ms, clamped to 5 ms
    buf.add("inbound", 101, audio(8, 0x33))  # right after the previous chunk
    buf.flush()
    assert sink.joined("inbound") == audio(8) + SILENCE * 40 + audio(8, 0x22) + audio(8, 0x33)
    assert buf.clamped_gaps == 1
    assert buf.silence_bytes == 40


def test_gap_of_exactly_max_is_not_clamped() -> None:
    """A jump of exactly max_gap_ms is filled in full and not counted as clamped."""
    sink = Sink()
    buf = AudioBuffer(["inbound"], 500, sink, max_gap_ms=5)
    buf.add("inbound", 0, audio(8))
    buf.add("inbound", 6, audio(8, 0x22))
    buf.flush()
    assert sink.joined("inbound") == audio(8) + SILENCE * 40 + audio(8, 0x22)
    assert buf.clamped_gaps == 0


def test_long_gap_stays_within_capacity() -> None:
    """A one-second gap (8000 bytes of silence) is delivered in pieces no larger than capacity."""
    sink = Sink()
    buf = AudioBuffer(["inbound"], 500, sink)
    buf.add("inbound", 1000, audio(8))
    assert buf.size <= 500
    buf.flush()
    assert max(sink.sizes()) <= 500
    assert sink.joined("inbound") == SILENCE * 8000 + audio(8)
    assert buf.silence_bytes == 8000


def test_add_silence_counts_bytes() -> None:
    """add_silence appends that many 0xFF bytes and counts them."""
    sink = Sink()
    buf = AudioBuffer(["inbound"], 500, sink)
    buf.add_silence("inbound", 1234)
    buf.flush()
    assert sink.joined("inbound") == SILENCE * 1234
    assert buf.silence_bytes == 1234
    assert buf.position_ms("inbound") == 1234 / 8


def test_align_pads_shorter_tracks_to_the_longest() -> None:
    """align() pads each shorter track with silence to the end of the longest one."""
    sink = Sink()
    buf = AudioBuffer(["inbound", "outbound"], 500, sink)
    buf.add("inbound", 0, audio(800))
    buf.add("outbound", 0, audio(160, 0x22))
    buf.align()
    buf.flush()
    assert sink.joined("inbound") == audio(800)
    assert sink.joined("outbound") == audio(160, 0x22) + SILENCE * 640
    assert buf.position_ms("inbound") == buf.position_ms("outbound") == 100.0
    assert buf.silence_bytes == 640


def test_align_pads_a_track_that_got_nothing() -> None:
    """A track with no audio at all is padded to the full length by align()."""
    sink = Sink()
    buf = AudioBuffer(["inbound", "outbound"], 500, sink)
    buf.add("inbound", 0, audio(24))
    buf.align()
    buf.flush()
    assert sink.joined("outbound") == SILENCE * 24


def test_align_without_audio_does_nothing() -> None:
    """align() on an empty buffer adds nothing."""
    sink = Sink()
    buf = AudioBuffer(["inbound", "outbound"], 500, sink)
    buf.align()
    buf.flush()
    assert sink.calls == []
    assert buf.silence_bytes == 0


def test_tracks_have_independent_timelines() -> None:
    """A gap on one track does not move the other track's position."""
    sink = Sink()
    buf = AudioBuffer(["inbound", "outbound"], 500, sink)
    buf.add("inbound", 0, audio(8))
    buf.add("outbound", 0, audio(8, 0x22))
    buf.add("inbound", 10, audio(8))
    buf.add("outbound", 1, audio(8, 0x22))
    assert buf.position_ms("inbound") == 11.0
    assert buf.position_ms("outbound") == 2.0
    buf.flush()
    assert sink.joined("inbound") == audio(8) + SILENCE * 72 + audio(8)
    assert sink.joined("outbound") == audio(16, 0x22)


def test_position_counts_flushed_audio() -> None:
    """The position keeps counting across flushes, so gaps are measured from the stream start."""
    sink = Sink()
    buf = AudioBuffer(["inbound"], 500, sink)
    buf.add("inbound", 0, audio(400))
    buf.flush()
    buf.add("inbound", 60, audio(8))  # 50 ms of audio so far, so a 10 ms gap
    buf.flush()
    assert sink.joined("inbound") == audio(400) + SILENCE * 80 + audio(8)


def test_unknown_track_raises_key_error() -> None:
    """Adding to a track that was not declared raises KeyError."""
    buf = AudioBuffer(["inbound"], 500, Sink())
    with pytest.raises(KeyError):
        buf.add("outbound", 0, audio(8))


def test_delivered_bytes_concatenate_to_the_timeline() -> None:
    """Over many flushes, each track's deliveries concatenate to its expected timeline byte for byte."""
    sink = Sink()
    buf = AudioBuffer(["inbound", "outbound"], 500, sink, max_gap_ms=100)
    a, b, c, d = audio(160, 0x01), audio(161, 0x02), audio(7, 0x03), audio(1200, 0x04)
    e, f = audio(160, 0x05), audio(333, 0x06)
    buf.add("inbound", 0, a)  # inbound 0..20 ms
    buf.add("outbound", 40, e)  # outbound: 320 bytes silence, then 40..60 ms
    buf.add("inbound", 60, b)  # inbound: 320 bytes silence, then 161 bytes (641 in all)
    buf.add("inbound", None, c)  # inbound: contiguous (648 in all)
    buf.add("inbound", 50, d)  # inbound: overlap, appended (1848 in all)
    buf.add("outbound", 1000, f)  # outbound: gap of 7520 clamped to 800 (480 + 800 + 333 = 1613 in all)
    buf.align()  # outbound padded by 1848 - 1613 = 235
    buf.flush()
    assert sink.joined("inbound") == a + SILENCE * 320 + b + c + d
    assert sink.joined("outbound") == SILENCE * 320 + e + SILENCE * 800 + f + SILENCE * 235
    assert max(sink.sizes()) <= 1200
    assert buf.clamped_gaps == 1
    assert buf.silence_bytes == 320 + 320 + 800 + 235
    assert buf.size == 0
