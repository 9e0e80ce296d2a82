"""Fixtures shared by unit tests."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest


@pytest.fixture
def bound_port() -> Iterator[int]:
    """A port on 127.0.0.1 held by a bound socket that never listens: binding it fails
    (address in use) and connecting to it is refused at once."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()
