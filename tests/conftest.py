"""Fixtures: a running server on loopback, an HTTP/WebSocket client session."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import trustme

from callsock.observability.logs import configure_logging
from callsock.server.routes import CallServer

from .helpers import running_server


@pytest.fixture(autouse=True, scope="session")
def _logging() -> None:
    configure_logging("warning", "json")


@pytest.fixture
def record_dir(tmp_path: Path) -> Path:
    return tmp_path / "recordings"


@pytest.fixture
async def server(record_dir: Path) -> AsyncIterator[CallServer]:
    async with running_server(record_dir) as srv:
        yield srv


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A certificate for 127.0.0.1 from a throwaway CA: (certificate, key, CA certificate)."""
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1")
    cert, key, authority = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(authority))
    return cert, key, authority
