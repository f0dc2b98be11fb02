"""Large results travel zstd-compressed, and download with a progress bar into one buffer.

    body, headers = compress_body(raw, request.headers.get("accept-encoding"))   # server
    data = download(response, "job 1234")                                          # client: the JSON bytes

Bodies under ``MIN_BYTES`` are sent as they are (compression would cost more than it saves).
Without the ``zstandard`` package on either side, bodies are sent uncompressed.
"""

from __future__ import annotations

import sys

MIN_BYTES = 64 * 1024
PROGRESS_BYTES = 1 << 20  # show a progress bar for downloads at least this large
CHUNK = 1 << 20


def _zstd():
    try:
        import zstandard
    except ImportError:
        return None
    return zstandard


def accepts_zstd(accept_encoding: str | None) -> bool:
    return bool(accept_encoding) and "zstd" in [p.split(";")[0].strip() for p in accept_encoding.split(",")]


def compress_body(raw: bytes, accept_encoding: str | None) -> tuple[bytes, dict]:
    """``(body, extra headers)`` for a response of ``raw`` bytes."""
    zstd = _zstd()
    if len(raw) < MIN_BYTES or zstd is None or not accepts_zstd(accept_encoding):
        return raw, {}
    return zstd.ZstdCompressor(level=3).compress(raw), {"Content-Encoding": "zstd", "X-Uncompressed-Length": str(len(raw))}


def request_headers() -> dict:
    return {"Accept-Encoding": "zstd, identity" if _zstd() is not None else "identity"}


def download(response, label: str, show_progress: bool = True) -> bytearray:
    """The body of a streamed ``requests`` response, decompressed chunk by chunk into one buffer."""
    encoding = (response.headers.get("Content-Encoding") or "identity").strip().lower()
    total = int(response.headers.get("Content-Length") or 0)
    decompress = None
    if encoding == "zstd":
        zstd = _zstd()
        if zstd is None:
            raise RuntimeError("the server sent a zstd-compressed result; install the zstandard package")
        decompress = zstd.ZstdDecompressor().decompressobj()
    elif encoding not in ("identity", ""):
        raise RuntimeError(f"the server sent a result with an unexpected Content-Encoding {encoding!r}")
    bar = None
    if show_progress and total >= PROGRESS_BYTES:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {label}", file=sys.stderr, leave=False)
    out = bytearray()
    try:
        while True:
            chunk = response.raw.read(CHUNK, decode_content=False)
            if not chunk:
                break
            out += decompress.decompress(chunk) if decompress is not None else chunk
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    return out
