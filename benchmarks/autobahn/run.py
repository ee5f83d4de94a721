"""Run the Autobahn fuzzing client (cases 1-7, 9, 10) against callsock's framing; print the verdicts.

    python -m benchmarks.autobahn.run --wstest .venv-autobahn/bin/wstest

Starts :mod:`benchmarks.autobahn.echo_server` on a free loopback port, runs ``wstest -m
fuzzingclient`` against it, and prints how many cases ended each way (Autobahn's ``OK``,
``NON-STRICT``, ``INFORMATIONAL``, ``UNIMPLEMENTED``, ``FAILED``) and every case that failed.
Exits 1 if any did. The full HTML report is left in the output directory.
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = ["1.*", "2.*", "3.*", "4.*", "5.*", "6.*", "7.*", "9.*", "10.*"]
AGENT = "callsock"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_listening(port: int, seconds: float = 20.0) -> None:
    """Wait until something accepts connections on the port."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def run(wstest: str, outdir: Path, cases: list[str]) -> dict[str, dict[str, str]]:
    """Run the suite; return Autobahn's verdict per case."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "benchmarks.autobahn.echo_server", "--port", str(port)])
    try:
        wait_listening(port)
        spec = {
            "outdir": str(outdir),
            "servers": [{"agent": AGENT, "url": f"ws://127.0.0.1:{port}"}],
            "cases": cases,
            "exclude-cases": [],
            "exclude-agent-cases": {},
        }
        spec_path = outdir / "fuzzingclient.json"
        outdir.mkdir(parents=True, exist_ok=True)
        spec_path.write_text(json.dumps(spec, indent=2))
        subprocess.run([wstest, "-m", "fuzzingclient", "-s", str(spec_path)], check=True, cwd=outdir)
    finally:
        server.terminate()
        server.wait(timeout=20)
    index = json.loads((outdir / "index.json").read_text())
    results: dict[str, dict[str, str]] = index[AGENT]
    return results


def main() -> int:
    """Parse the options, run, report; exit 1 on any failed case."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wstest", default=".venv-autobahn/bin/wstest", help="the wstest program")
    parser.add_argument("--outdir", type=Path, default=Path(tempfile.gettempdir()) / "callsock-autobahn")
    parser.add_argument("--cases", nargs="*", default=CASES, help="case patterns (default: 1-7, 9, 10)")
    args = parser.parse_args()
    wstest = str(Path(shutil.which(args.wstest) or args.wstest).resolve())  # wstest runs in outdir
    results = run(wstest, args.outdir.resolve(), args.cases)
    verdicts = collections.Counter(r["behavior"] for r in results.values())
    closes = collections.Counter(r["behaviorClose"] for r in results.values())
    print(f"{len(results)} cases: " + ", ".join(f"{n} {v}" for v, n in sorted(verdicts.items())))
    print("closing behaviour: " + ", ".join(f"{n} {v}" for v, n in sorted(closes.items())))
    failed = sorted(case for case, r in results.items() if "FAILED" in (r["behavior"], r["behaviorClose"]))
    for case in failed:
        print(f"FAILED {case}: {results[case]}")
    print(f"report: {args.outdir / 'index.html'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
