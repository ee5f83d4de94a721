"""Faults keep their promise: a killed server's calls are recovered by its lock, not its process id;
a full disk or a deleted record directory costs audio, counted, never a call or its summary; one bad
leftover never stops recovery; names never run out; a seed stream can never pass for another call."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from callsock.recording.layout import Part, publish, wav_header

from ..helpers import (
    FRAME,
    StreamingCall,
    assert_valid_wav,
    eventually,
    media,
    receive_close,
    seed_start,
    sid,
    stop,
)
from ..processes import free_port, run_callsock, wait_healthy
from .harness import beside_a_good_call, target


def files_under(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file()) if directory.exists() else []


def process_state(pid: int) -> str:
    """The state letter of a process in /proc (``Z`` for a zombie)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


@contextlib.contextmanager
def server_process(record_dir: Path, prefix: list[str]) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """`callsock serve` started behind ``prefix`` (e.g. ``unshare``), reaped at the end."""
    port = free_port()
    command = [*prefix, sys.executable, "-m", "callsock", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--record-dir", str(record_dir), "--flush-seconds", "0.2", "--log-format", "json"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield process, port
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=20)


PID_1 = ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc"]


@pytest.mark.parametrize("how", ["pid-1-in-a-container", "zombie"])
async def test_a_killed_servers_calls_are_recovered_by_its_lock(tmp_path: Path, how: str) -> None:
    """A server that was PID 1 in its container, or whose process is a zombie nobody reaped: a
    process id says nothing (1 is alive, a zombie's pid exists); the lock file it held does."""
    record_dir = tmp_path / "rec"
    with server_process(record_dir, PID_1 if how == "pid-1-in-a-container" else []) as (process, port):
        await wait_healthy(port)
        async with aiohttp.ClientSession() as client:
            call = StreamingCall(client, f"ws://127.0.0.1:{port}/call", 400)
            streaming = asyncio.create_task(call.run())
            await eventually(lambda: any(record_dir.glob(".partial/*/*.inbound.wav")), what="partial audio")
            status, out, err = await run_callsock("recover", str(record_dir), "--json")
            assert status == 0, err
            assert [r["skipped"] for r in json.loads(out)] == ["its server is still running"]
            await eventually(lambda: call.sent >= 25, what="half a second of audio")
            process.send_signal(signal.SIGKILL)  # never reaped here: a zombie until the end
            await asyncio.gather(streaming, return_exceptions=True)
            if how == "zombie":
                await eventually(lambda: process_state(process.pid) == "Z", what="a zombie")
            status, out, err = await run_callsock("recover", str(record_dir), "--json")
            if how == "zombie":
                assert process_state(process.pid) == "Z"  # its pid still there while recovered
    assert status == 0, err
    [result] = json.loads(out)
    assert (result["streamSid"], result["skipped"], result["failed"]) == (call.stream_sid, None, None)
    summary = json.loads((record_dir / result["files"]["summary"]).read_text())
    assert summary["endReason"] == "crashed"
    pcm = assert_valid_wav(record_dir / result["files"]["inbound"])
    assert pcm and call.audio().startswith(pcm)
    assert files_under(record_dir / ".partial") == [] and files_under(record_dir / ".instances") == []


def run_root(*command: str) -> None:
    """Run a command as root (this process, or passwordless sudo), as the test setup installs."""
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    subprocess.run([*sudo, *command], check=True)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs, nearly full: 40 KiB free, two and a half seconds of a call's PCM."""
    mount = tmp_path / "disk"
    mount.mkdir()
    run_root("mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount))
    try:
        filler = mount / "filler"
        filler.write_bytes(b"\0" * (1024 * 1024 - 40 * 1024))
        yield mount
    finally:
        run_root("umount", str(mount))


async def test_a_full_disk_costs_audio_never_the_call_or_its_summary(
    small_disk: Path, tmp_path: Path
) -> None:
    """The disk fills mid-call: calls go on, the summary is published and says what was lost and
    why, and no partial file stays behind."""
    stream_sid = sid("MZ", 401)
    async with target(tmp_path, "--record-dir", str(small_disk / "rec"), "--flush-seconds", "0.2") as t:
        t.record_dir = small_disk / "rec"

        async def attack() -> None:  # a call long enough to fill the disk
            async with aiohttp.ClientSession() as client:
                call = StreamingCall(client, t.ws_url, 401)
                await call.run(4.0)
                assert call.close_code == 1000

        outcome = await beside_a_good_call(t, attack(), seconds=3.0, n=402, recorded=False)
        await eventually(lambda: stream_sid in t.summaries(), what="the long call's summary")
        summary = t.summaries()[stream_sid]
    assert summary["endReason"] == "stop" and summary["recordingLostMs"] > 0
    assert summary["recordingError"] == "No space left on device"
    assert files_under(small_disk / "rec" / ".partial") == []
    outcome.assert_health_answered()


async def test_a_deleted_record_dir_costs_audio_never_the_summary(tmp_path: Path) -> None:
    """The record directory is deleted mid-call: the call goes on, its summary is published (the
    directory made again) saying what was lost, and nothing is left under .partial."""
    stream_sid = sid("MZ", 403)
    async with target(tmp_path, "--flush-seconds", "0.2") as t:

        async def attack() -> None:
            await eventually(lambda: any(t.record_dir.glob(".partial/*/*.wav")), what="partial files")
            shutil.rmtree(t.record_dir)

        async with aiohttp.ClientSession() as client:
            call = StreamingCall(client, t.ws_url, 403)
            await asyncio.gather(call.run(2.0), attack())
        assert call.close_code == 1000
        await eventually(lambda: stream_sid in t.summaries(), what="the summary")
        summary = t.summaries()[stream_sid]
    assert summary["recordingLostMs"] > 0 and summary["recordingError"]
    assert summary["files"] == {"summary": f"{call.call_sid}/{stream_sid}.json"}
    assert files_under(t.record_dir / ".partial") == []


def leave(record_dir: Path, name: str, stream_sid: str, pcm_bytes: int) -> Path:
    """A partial call as a dead server of an older callsock (pid-named, pid gone) would leave it."""
    directory = record_dir / ".partial" / name
    directory.mkdir(parents=True)
    (directory / f"{stream_sid}.inbound.wav").write_bytes(wav_header(0) + b"\1\0" * (pcm_bytes // 2))
    (directory / f"{stream_sid}.json").write_text(json.dumps({"streamSid": stream_sid, "callSid": None}))
    return directory


async def test_one_bad_leftover_never_stops_recovery(tmp_path: Path) -> None:
    """A leftover that cannot be published is reported (exit 1); the others are still recovered."""
    record_dir = tmp_path / "rec"
    leave(record_dir, "7ffffff0-1-1", "MZgood1", 1600)
    bad = leave(record_dir, "7ffffff0-1-2", "MZbad", 1600)
    leave(record_dir, "7ffffff0-1-3", "MZgood2", 1600)
    (record_dir / "stream.MZbad").write_text("a file where the call's directory should go")
    status, out, err = await run_callsock("recover", str(record_dir), "--json")
    assert status == 1, (out, err)
    results = {r["streamSid"] or r["connectionId"]: r for r in json.loads(out)}
    assert results["MZgood1"]["files"] and results["MZgood2"]["files"]
    failed = [r for r in results.values() if r["failed"]]
    assert [r["connectionId"] for r in failed] == ["7ffffff0-1-2"] and bad.exists()


def numbered(n: int, files: dict[str, str]) -> dict[str, Any]:
    return {"n": n, "files": files}


def test_file_names_for_a_repeated_sid_never_run_out(tmp_path: Path) -> None:
    """1,005 recordings of one streamSid: each gets the next free number, nothing is overwritten."""
    record_dir = tmp_path / "rec"
    for n in range(1005):
        partial = record_dir / ".partial" / f"c{n}"
        partial.mkdir(parents=True)
        (partial / "MZsame.inbound.wav").write_bytes(wav_header(0) + n.to_bytes(2, "little"))
        wav = Part("inbound", "inbound.wav", path=partial / "MZsame.inbound.wav")
        summary = Part("summary", "json", render=functools.partial(numbered, n))
        publish(record_dir, "CAsame", "MZsame", [wav, summary])
    names = {p.name for p in (record_dir / "CAsame").iterdir()}
    assert len(names) == 2 * 1005 and "MZsame.1004.json" in names
    assert json.loads((record_dir / "CAsame" / "MZsame.1004.json").read_text())["n"] == 1004


async def test_a_seed_stream_named_like_a_call_never_touches_it(tmp_path: Path) -> None:
    """A seed-dialect stream whose streamSid is a live call's callSid: it neither replaces that call
    nor writes into its directory."""
    async with target(tmp_path) as t:
        victim = sid("CA", 1)  # the good call's callSid (beside_a_good_call places call 1)

        async def attack() -> None:
            await eventually(lambda: (t.record_dir / ".partial").exists(), what="the good call")
            async with aiohttp.ClientSession() as client, client.ws_connect(t.ws_url) as ws:
                await ws.send_str(seed_start(victim))
                await ws.send_str(media(victim, FRAME, 0))
                await ws.send_str(stop(victim))
                assert (await receive_close(ws))[0] == 1000

        await beside_a_good_call(t, attack())  # the good call ends with 1000: never replaced
        seed_files = sorted(p.name for p in (t.record_dir / f"stream.{victim}").iterdir())
        victim_files = sorted(p.name for p in (t.record_dir / victim).iterdir())
    assert seed_files == [f"{victim}.inbound.wav", f"{victim}.json"]
    assert victim_files == [f"{sid('MZ', 1)}.inbound.wav", f"{sid('MZ', 1)}.json"]
