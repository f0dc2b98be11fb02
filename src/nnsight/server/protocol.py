"""Messages between the server and its worker processes: length-prefixed JSON frames (no pickle).

A frame is a 4-byte big-endian length followed by that many bytes of UTF-8 JSON.
The server never trusts what a worker sends beyond parsing it as JSON with a size cap.
"""

from __future__ import annotations

import json
import struct

MAX_FRAME = 1 << 30


class ProtocolError(Exception):
    pass


def write_msg(stream, message: dict) -> None:
    data = json.dumps(message, separators=(",", ":")).encode()
    stream.write(struct.pack(">I", len(data)) + data)
    stream.flush()


def _read_exact(stream, n):
    chunks = []
    while n:
        chunk = stream.read(n)
        if not chunk:
            raise EOFError("the other side closed the pipe")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def read_msg(stream, max_bytes: int = MAX_FRAME) -> dict:
    (size,) = struct.unpack(">I", _read_exact(stream, 4))
    if size > max_bytes:
        raise ProtocolError(f"a message of {size} bytes is over the limit of {max_bytes}")
    message = json.loads(_read_exact(stream, size))
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ProtocolError("malformed message")
    return message
