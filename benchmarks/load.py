"""Closed-loop HTTP load: C clients, each sending its next request when the last returned.

The client is a few lines of asyncio over raw keep-alive sockets, not httpx: on a
small machine the load generator shares the cores with the server, and a lean
client leaves more of them to the thing being measured. The multipart body is
built once; each response's status and Content-Length are checked.
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from dataclasses import dataclass, field

from benchmarks.stats import percentile


@dataclass
class LoadResult:
    clients: int
    requests: int
    errors: int
    seconds: float
    latencies_ms: list[float] = field(repr=False)
    bodies: list[bytes] = field(default_factory=list, repr=False)  # the last few 200s

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    @property
    def p50(self) -> float:
        return percentile(self.latencies_ms, 50)

    @property
    def p95(self) -> float:
        return percentile(self.latencies_ms, 95)


def multipart_request(host: str, port: int, path: str, data: bytes) -> bytes:
    """One complete HTTP/1.1 POST of `data` as the `file` form field."""
    boundary = uuid.uuid4().hex
    body = (
        (
            f"--{boundary}\r\n"
            'Content-Disposition: form-data; name="file"; filename="image.png"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body


def _status_and_length(head: bytes) -> tuple[int, int]:
    """An HTTP/1.1 response head -> (status, Content-Length; 0 when absent)."""
    lines = head.decode("latin-1").split("\r\n")
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    return int(lines[0].split()[1]), length


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> tuple[int, bytes]:
    writer.write(request)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    status, length = _status_and_length(head)
    body = await reader.readexactly(length)
    return status, body


async def _run(
    host: str,
    port: int,
    request: bytes,
    clients: int,
    max_requests: int,
    max_seconds: float,
    keep_bodies: int = 0,
) -> LoadResult:
    latencies: list[float] = []
    bodies: list[bytes] = []
    errors = 0
    issued = 0
    deadline = time.perf_counter() + max_seconds

    async def client() -> None:
        nonlocal errors, issued
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while issued < max_requests and time.perf_counter() < deadline:
                issued += 1
                t = time.perf_counter()
                status, body = await _exchange(reader, writer, request)
                latencies.append((time.perf_counter() - t) * 1000.0)
                if status != 200:
                    errors += 1
                elif keep_bodies:
                    bodies.append(body)
                    del bodies[:-keep_bodies]
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    seconds = time.perf_counter() - started
    return LoadResult(clients, len(latencies), errors, seconds, latencies, bodies)


def run_load(
    host: str,
    port: int,
    path: str,
    data: bytes,
    clients: int,
    max_requests: int,
    max_seconds: float,
    warmup: int = 0,
    keep_bodies: int = 0,
) -> LoadResult:
    """Closed-loop load, bounded by request count and wall time (whichever comes first)."""
    request = multipart_request(host, port, path, data)
    if warmup:
        asyncio.run(_run(host, port, request, clients, warmup, max_seconds))
    return asyncio.run(_run(host, port, request, clients, max_requests, max_seconds, keep_bodies))


def fetch(host: str, port: int, path: str, data: bytes) -> tuple[int, bytes]:
    """One request on a fresh connection (checks, not timing)."""

    async def one() -> tuple[int, bytes]:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            return await _exchange(reader, writer, multipart_request(host, port, path, data))
        finally:
            writer.close()

    return asyncio.run(one())


class BlockingClient:
    """One keep-alive connection, one request at a time, no event loop: for timing
    single requests interleaved with other work in the same loop."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port), timeout=60)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as asyncio does
        self._pending = b""

    def exchange(self, request: bytes) -> tuple[int, bytes]:
        self.sock.sendall(request)
        data = bytearray(self._pending)
        while (end := data.find(b"\r\n\r\n")) < 0:
            data += self._recv()
        status, length = _status_and_length(bytes(data[:end]))
        start = end + 4
        while len(data) < start + length:
            data += self._recv()
        self._pending = bytes(data[start + length :])
        return status, bytes(data[start : start + length])

    def _recv(self) -> bytes:
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        return chunk

    def close(self) -> None:
        self.sock.close()
