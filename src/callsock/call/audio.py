"""Audio for applications: PCM as numpy int16, WAV loading, resampling to 8 kHz with soxr.

This is the application side (greetings, prompts, text-to-speech output). The per-frame path
of the server never comes here: it moves mu-law bytes and decodes with :mod:`callsock.g711`.
"""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import numpy.typing as npt
import soxr

from ..protocol.g711 import SAMPLE_RATE, pcm16_to_ulaw, ulaw_to_pcm16

__all__ = ["PCM", "load_wav", "mulaw_to_pcm", "pcm_to_mulaw", "resample"]

PCM = npt.NDArray[np.int16]
"""Mono 16-bit PCM samples."""

# On little-endian machines (every platform Python runs callsock on) this is plain int16.
_INT16_LE = np.dtype("<i2")


def mulaw_to_pcm(mulaw: bytes | bytearray) -> PCM:
    """Decode mu-law bytes to int16 samples."""
    return np.frombuffer(ulaw_to_pcm16(mulaw), dtype=_INT16_LE)


def pcm_to_mulaw(pcm: PCM | bytes, sample_rate: int = SAMPLE_RATE) -> bytes:
    """Encode int16 PCM at any rate (an array, or little-endian bytes) to 8 kHz mu-law.

    Raises:
        ValueError: the array is not one-dimensional int16, or the rate is not positive.
    """
    if sample_rate == SAMPLE_RATE and type(pcm) is np.ndarray and pcm.dtype == _INT16_LE and pcm.ndim == 1:
        # The common case, a frame at 8 kHz: audioop reads the array's buffer, no copy.
        try:
            return pcm16_to_ulaw(pcm)
        except ValueError:  # a strided view ("not C-contiguous"): audioop needs contiguous memory
            return pcm16_to_ulaw(pcm.copy())
    samples = _as_int16(pcm)
    if sample_rate != SAMPLE_RATE:
        samples = resample(samples, sample_rate, SAMPLE_RATE)
    return pcm16_to_ulaw(samples.astype("<i2", copy=False).tobytes())


def resample(pcm: PCM, from_rate: int, to_rate: int) -> PCM:
    """Resample int16 PCM with soxr (high quality); returns int16, clipped."""
    if from_rate <= 0 or to_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {from_rate} and {to_rate}")
    if from_rate == to_rate or pcm.size == 0:
        return pcm
    out: npt.NDArray[np.float32] = soxr.resample(pcm.astype(np.float32), from_rate, to_rate, quality="HQ")
    return np.clip(np.rint(out), -32768, 32767).astype(np.int16)


def load_wav(path: Path | str, sample_rate: int = SAMPLE_RATE) -> PCM:
    """Read a PCM WAV file (8/16/24/32-bit, any channels, any rate) as mono int16 at ``sample_rate``.

    Raises:
        ValueError: the file is not a PCM WAV the standard library can read.
    """
    try:
        with wave.open(str(path), "rb") as w:
            width, channels, rate = w.getsampwidth(), w.getnchannels(), w.getframerate()
            raw = w.readframes(w.getnframes())
    except (wave.Error, EOFError) as exc:
        raise ValueError(f"{path}: not a PCM WAV file ({exc})") from exc
    samples = _widen(raw, width).reshape(-1, channels).mean(axis=1)
    mono = np.clip(np.rint(samples), -32768, 32767).astype(np.int16)
    return resample(mono, rate, sample_rate)


def _widen(raw: bytes, width: int) -> npt.NDArray[np.float64]:
    """Samples of ``width`` bytes as floats on the 16-bit scale."""
    if width == 1:  # 8-bit WAV is unsigned
        return (np.frombuffer(raw, dtype=np.uint8).astype(np.float64) - 128.0) * 256.0
    if width == 2:
        return np.frombuffer(raw, dtype="<i2").astype(np.float64)
    if width == 3:
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        value = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        value = np.where(value >= 1 << 23, value - (1 << 24), value)
        return value.astype(np.float64) / 256.0
    if width == 4:
        return np.frombuffer(raw, dtype="<i4").astype(np.float64) / 65536.0
    raise ValueError(f"unsupported sample width: {width} bytes")


def _as_int16(pcm: PCM | bytes) -> PCM:
    if isinstance(pcm, bytes | bytearray | memoryview):
        if len(pcm) % 2:
            raise ValueError("16-bit PCM bytes must have an even length")
        return np.frombuffer(pcm, dtype="<i2").astype(np.int16, copy=False)
    if pcm.dtype != np.int16 or pcm.ndim != 1:
        raise ValueError(f"PCM must be a one-dimensional int16 array, got {pcm.dtype} with shape {pcm.shape}")
    return pcm
