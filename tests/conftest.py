"""Fixtures: a running server on loopback, an HTTP/WebSocket client session."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from callsock.logs import configure_logging
from callsock.server import CallServer

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
