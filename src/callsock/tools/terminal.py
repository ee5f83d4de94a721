"""How the command line shows reports to a person: rich tables and a live progress display."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Final

from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from ..cluster.events import CallEvent
from ..recording.recover import Recovered
from .bench import BenchConfig, BenchReport
from .simulate import SimulationReport
from .verify import Check

__all__ = [
    "BenchProgress",
    "EventPrinter",
    "print_bench",
    "print_recovered",
    "print_simulation",
    "print_verify",
]


class EventPrinter:
    """Show call events one line each, as they arrive: time, type, call, stream, details."""

    _STYLES: Final = {"started": "green", "stopped": "yellow", "recording-ready": "cyan"}

    def __init__(self) -> None:
        self.console = Console(highlight=False, soft_wrap=True)  # one line per event, even piped

    def show(self, event: CallEvent) -> None:
        """Print one event."""
        at = time.strftime("%H:%M:%S", time.localtime(event.at)) + f".{int(event.at * 1000) % 1000:03d}"
        style = self._STYLES.get(event.type, "white")
        details = " ".join(f"{key}={_short(value)}" for key, value in event.data.items())
        self.console.print(
            f"{at} [{style}]{event.type:<15}[/] {event.call_sid} {event.stream_sid} "
            f"[dim]{event.server}[/] {escape(details)}"
        )


def _short(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def print_recovered(record_dir: Path, results: list[Recovered]) -> None:
    """Show what was recovered, and what was left alone and why."""
    if not results:
        Console().print(f"nothing to recover in {record_dir}")
        return
    table = Table(title=f"callsock recover {record_dir}")
    for column in ("connection", "callSid", "streamSid", "seconds", "result"):
        table.add_column(column)
    for r in results:
        if r.failed:
            outcome = f"[red]failed: {escape(r.failed)}[/]"
        elif r.skipped:
            outcome = f"[yellow]left: {r.skipped}[/]"
        else:
            outcome = f"[green]published[/] {r.files.get('summary', '')}"
        table.add_row(r.connection_id, r.call_sid or "-", r.stream_sid or "-", f"{r.seconds:.1f}", outcome)
    Console().print(table)


def print_verify(url: str, checks: list[Check]) -> None:
    """Show the checklist: each item passed, failed with its reason, or skipped."""
    table = Table(title=f"callsock verify {url}")
    table.add_column("#", justify="right")
    table.add_column("check")
    table.add_column("result")
    table.add_column("detail")
    for check in checks:
        result = {True: "[green]PASS[/]", False: "[red]FAIL[/]", None: "[yellow]SKIP[/]"}[check.passed]
        table.add_row(str(check.number), check.name, result, check.detail)
    Console().print(table)


def print_simulation(report: SimulationReport, out: Path | None) -> None:
    """Show what happened on a simulated call."""
    table = Table(title=f"callsock simulate {report.url}", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("result")
    handshake = f"HTTP {report.handshake_status}" if report.handshake_status else "no answer"
    if report.handshake_ms is not None:
        handshake += f" in {report.handshake_ms} ms"
    table.add_row("handshake", handshake)
    table.add_row("stream", f"{report.stream_sid} ({report.dialect} dialect)")
    if report.dialect == "seed":
        ack = "none" if not report.ack_received else ("exact" if report.ack_exact else "received, NOT exact")
        table.add_row("start acknowledgement", ack)
    table.add_row("sent", _sent(report))
    first = "none" if report.first_audio_ms is None else f"{report.first_audio_ms} ms after start"
    table.add_row("first audio back", first)
    table.add_row("received", f"{report.media_received} media ({report.audio_received_ms:.0f} ms of audio)")
    table.add_row("marks", f"{report.marks_received} received, {report.marks_echoed} echoed")
    table.add_row("clears", str(report.clears_received))
    if report.unknown_events:
        table.add_row("unknown events", ", ".join(sorted(set(report.unknown_events))))
    table.add_row("violations", "\n".join(report.violations) or "none")
    closed = f"{report.close_code} {report.close_reason}".strip() if report.close_code else "not closed"
    table.add_row("close", f"{closed} (by {report.closed_by or 'nobody'})")
    if report.error:
        table.add_row("error", report.error)
    if out is not None:
        table.add_row("reply written to", str(out))
    table.add_row("verdict", "[green]ok[/]" if report.ok else "[red]FAILED[/]")
    Console().print(table)


def _sent(report: SimulationReport) -> str:
    """``40 frames (20 inbound, 20 outbound), DTMF 12``: every track's frames are counted."""
    sent = f"{report.frames_sent} frames"
    if len(report.frames_by_track) > 1:
        sent += " (" + ", ".join(f"{n} {track}" for track, n in report.frames_by_track.items()) + ")"
    elif report.frames_by_track:
        sent += f" on {next(iter(report.frames_by_track))}"
    return sent + (f", DTMF {report.dtmf_sent}" if report.dtmf_sent else "")


def print_bench(report: BenchReport) -> None:
    """Show a benchmark's figures."""
    table = Table(title=f"callsock bench ({report.mode}, {report.calls} calls, {report.seconds} s)")
    table.add_column("figure", style="bold")
    table.add_column("value", justify="right")
    table.add_row("connected / failed", f"{report.connected} / {report.failed}")
    table.add_row("frames sent", str(report.frames_sent))
    table.add_row("echoes received", str(report.echoes_received))
    table.add_row("missing / wrong echoes", f"{report.missing_echoes} / {report.wrong_echoes}")
    table.add_row("messages/s (echoes)", f"{report.messages_per_second:,.0f}")
    for label, value in (
        ("p50", report.rtt_p50_ms),
        ("p90", report.rtt_p90_ms),
        ("p99", report.rtt_p99_ms),
        ("max", report.rtt_max_ms),
    ):
        table.add_row(f"echo round trip {label}", "-" if value is None else f"{value:.2f} ms")
    table.add_row("close codes", ", ".join(f"{code}: {n}" for code, n in sorted(report.closes.items())))
    table.add_row("load generator CPU", f"{report.loadgen_cpu_percent}%")
    Console().print(table)


class BenchProgress:
    """A live line of figures while a benchmark runs."""

    def __init__(self, config: BenchConfig) -> None:
        self._config = config
        self._live = Live(self._render({}), refresh_per_second=4, transient=True)

    def __enter__(self) -> BenchProgress:
        self._live.__enter__()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._live.__exit__(kind, value, traceback)

    def update(self, snapshot: dict[str, Any]) -> None:
        """Show the latest figures (called by the load generator about twice a second)."""
        self._live.update(self._render(snapshot))

    def _render(self, snapshot: dict[str, Any]) -> Table:
        table = Table.grid(padding=(0, 2))
        p99 = snapshot.get("p99")
        table.add_row(
            f"[bold]{self._config.mode}[/] {snapshot.get('connected', 0)}/{self._config.calls} calls",
            f"failed {snapshot.get('failed', 0)}",
            f"sent {snapshot.get('sent', 0):,}",
            f"echoes {snapshot.get('echoes', 0):,}",
            f"{snapshot.get('rate', 0.0):,.0f} msg/s",
            "p99 -" if p99 is None else f"p99 {p99:.1f} ms",
        )
        return table
