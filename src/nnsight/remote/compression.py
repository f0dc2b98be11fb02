"""Large results travel zstd-compressed, and download with a progress bar, chunk by chunk.

    body, headers = compress_body(raw, request.headers.get("accept-encoding"))   # server
    for part in chunks(response, "job 1234"):                                     # client: at most CHUNK bytes each
        reader.feed(part)                                                          # (see stream.ResultReader)

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


class _Counted:
    """``response.raw`` as a file the zstd reader pulls from; the progress bar counts what arrived."""

    def __init__(self, raw, bar):
        self.raw, self.bar = raw, bar

    def read(self, size=-1):
        data = self.raw.read(size if size and size > 0 else CHUNK, decode_content=False)
        if self.bar is not None:
            self.bar.update(len(data))
        return data


def chunks(response, label: str, show_progress: bool = True):
    """The body of a streamed ``requests`` response, decompressed, in pieces of at most ``CHUNK`` bytes.

    However well the body compresses, no piece is larger: memory stays bounded while it downloads.
    """
    encoding = (response.headers.get("Content-Encoding") or "identity").strip().lower()
    total = int(response.headers.get("Content-Length") or 0)
    if encoding == "zstd":
        zstd = _zstd()
        if zstd is None:
            raise RuntimeError("the server sent a zstd-compressed result; install the zstandard package")
    elif encoding not in ("identity", ""):
        raise RuntimeError(f"the server sent a result with an unexpected Content-Encoding {encoding!r}")
    bar = None
    if show_progress and total >= PROGRESS_BYTES:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {label}", file=sys.stderr, leave=False)
    source = _Counted(response.raw, bar)
    try:
        if encoding == "zstd":
            with zstd.ZstdDecompressor().stream_reader(source, read_size=CHUNK, read_across_frames=True,
                                                       closefd=False) as reader:
                while True:
                    part = reader.read(CHUNK)
                    if not part:
                        break
                    yield part
        else:
            while True:
                part = source.read(CHUNK)
                if not part:
                    break
                yield part
    finally:
        if bar is not None:
            bar.close()

