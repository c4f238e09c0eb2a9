"""A raw HTTP/1.1 client for hostile uploads: chunked bodies sent until the server answers."""

from __future__ import annotations

import select
import socket
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Upload:
    status: int | None  # None: the server closed without answering
    body: bytes
    sent_bytes: int  # body bytes the server let us push before it answered or closed


def chunked_upload(
    port: int,
    path: str,
    *,
    total_bytes: int,
    head: bytes = b"",
    headers: dict[str, str] | None = None,
    chunk_bytes: int = 1 << 20,
    timeout_s: float = 120.0,
) -> Upload:
    """POST `head` + filler bytes up to `total_bytes` with Transfer-Encoding: chunked.

    Sends until everything is sent or the server answers, whichever comes first, then reads the
    answer. The filler is ASCII 'x', so `head` can open a JSON string that the filler continues.
    """
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
    sock.setblocking(False)
    lines = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Content-Type: application/json"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    lines += ["Transfer-Encoding: chunked", "", ""]
    pending = memoryview("\r\n".join(lines).encode())
    filler = b"x" * chunk_bytes
    sent = 0
    answer = b""
    deadline = time.monotonic() + timeout_s
    first = True
    finished = False
    try:
        while time.monotonic() < deadline:
            if not pending and not finished:
                if sent >= total_bytes:
                    pending, finished = memoryview(b"0\r\n\r\n"), True
                else:
                    data = head + filler[: chunk_bytes - len(head)] if first else filler
                    data = data[: total_bytes - sent]
                    first = False
                    pending = memoryview(b"%x\r\n%s\r\n" % (len(data), data))
                    sent += len(data)
            readable, writable, _ = select.select([sock], [sock] if pending else [], [], 1.0)
            if readable:
                break
            if writable:
                try:
                    n = sock.send(pending)
                except (BrokenPipeError, ConnectionResetError):
                    break
                pending = pending[n:]
        sock.setblocking(True)
        sock.settimeout(10)
        try:
            while b"\r\n\r\n" not in answer or len(answer.partition(b"\r\n\r\n")[2]) < _length(answer):
                more = sock.recv(65536)
                if not more:
                    break
                answer += more
        except (ConnectionResetError, TimeoutError):
            pass
    finally:
        sock.close()
    if not answer.startswith(b"HTTP/1.1 "):
        return Upload(None, answer, sent)
    head_part, _, body = answer.partition(b"\r\n\r\n")
    return Upload(int(head_part.split()[1]), body, sent)


def _length(answer: bytes) -> int:
    for line in answer.partition(b"\r\n\r\n")[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return 0


def rss_kib(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (the peak since start) of a process, in KiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out
