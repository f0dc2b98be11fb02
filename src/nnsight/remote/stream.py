"""Reading a job's result as it downloads: one copy of the tensors in memory, plus a bounded buffer.

    reader = ResultReader()
    for chunk in compression.chunks(response, "job 1234"):     # decompressed, at most CHUNK bytes each
        reader.feed(chunk)
    body, tensors = reader.finish()    # body: the result's JSON without "tensors"; tensors: {id: tensor}

A result is ``{"id", "values", "tensors": "<base64 safetensors>"}`` (``schema.JobResult``). The
reader keeps the small JSON part aside and decodes the base64 text as it arrives, four
characters at a time, into ``TensorStream``, which parses the safetensors header itself and
writes each tensor's bytes straight into that tensor. So neither the JSON text nor the
base64 text nor the raw safetensors bytes are ever held whole. Nothing is unpickled: the
safetensors header is JSON and the data is raw little-endian values.
"""

from __future__ import annotations

import binascii
import json
import re
import sys

import torch

MAX_HEADER = 100 << 20  # the safetensors format's own limit on its JSON header

_DTYPES = {name: getattr(torch, attr) for name, attr in (
    ("BOOL", "bool"), ("U8", "uint8"), ("I8", "int8"), ("I16", "int16"), ("U16", "uint16"), ("I32", "int32"),
    ("U32", "uint32"), ("I64", "int64"), ("U64", "uint64"), ("F16", "float16"), ("BF16", "bfloat16"),
    ("F32", "float32"), ("F64", "float64"), ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
    ("C64", "complex64"),
) if isinstance(getattr(torch, attr, None), torch.dtype)}


class TensorStream:
    """safetensors bytes in (``feed``), tensors out (``finish``); each tensor is allocated once and filled in place.

        stream = TensorStream(max_bytes=1 << 30)
        stream.feed(part_1); stream.feed(part_2)
        tensors = stream.finish()          # {"t0": tensor(...), ...}; ValueError if malformed or cut short
    """

    def __init__(self, max_bytes: int | None = None):
        if sys.byteorder != "little":  # pragma: no cover (safetensors data is little-endian)
            raise ValueError("tensors: reading safetensors data needs a little-endian machine")
        self.max_bytes = max_bytes
        self._head = bytearray()
        self._header_size = None
        self._entries = None  # [(name, dtype, shape, start, end)] in data order
        self._tensors = {}
        self._index = 0  # the entry being filled
        self._target = None  # a writable view of its bytes
        self._pos = 0  # bytes of the data section received

    def feed(self, data) -> None:
        data = memoryview(data).cast("B")
        while len(data):
            if self._entries is None:
                data = self._read_header(data)
                continue
            if self._index >= len(self._entries):
                raise ValueError("tensors: more data than the safetensors header describes")
            name, dtype, shape, start, end = self._entries[self._index]
            if self._target is None:
                tensor = self._tensors[name] = torch.empty(shape, dtype=dtype)
                self._target = memoryview(tensor.reshape(-1).view(torch.uint8).numpy()).cast("B") if end > start else None
            take = min(len(data), end - self._pos)
            if take:
                self._target[self._pos - start:self._pos - start + take] = data[:take]
                self._pos += take
                data = data[take:]
            if self._pos == end:
                self._index += 1
                self._target = None
                self._skip_empty()

    def _read_header(self, data):
        want = 8 if self._header_size is None else 8 + self._header_size
        take = min(len(data), want - len(self._head))
        self._head += data[:take]
        data = data[take:]
        if len(self._head) < want:
            return data
        if self._header_size is None:
            self._header_size = int.from_bytes(self._head[:8], "little")
            if self._header_size > MAX_HEADER:
                raise ValueError("tensors: not a valid safetensors blob (header too large)")
            return data
        try:
            header = json.loads(bytes(self._head[8:]))
        except (UnicodeDecodeError, ValueError):
            raise ValueError("tensors: not a valid safetensors blob (header)") from None
        self._entries = self._check(header)
        self._head = bytearray()
        self._skip_empty()
        return data

    def _check(self, header) -> list:
        if not isinstance(header, dict):
            raise ValueError("tensors: not a valid safetensors blob (header)")
        entries = []
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype = _DTYPES.get(info.get("dtype")) if isinstance(info, dict) else None
            shape, offsets = (info.get("shape"), info.get("data_offsets")) if isinstance(info, dict) else (None, None)
            if (dtype is None or not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape)
                    or not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)):
                raise ValueError(f"tensors: malformed safetensors entry {str(name)[:100]!r}")
            numel = 1
            for d in shape:
                numel *= d
            start, end = offsets
            if end - start != numel * dtype.itemsize or start < 0:
                raise ValueError(f"tensors: safetensors entry {str(name)[:100]!r} has the wrong size")
            entries.append((name, dtype, shape, start, end))
        entries.sort(key=lambda e: (e[3], e[4]))
        position = 0
        for entry in entries:
            if entry[3] != position:
                raise ValueError("tensors: safetensors entries overlap or leave gaps")
            position = entry[4]
        if self.max_bytes is not None and position > self.max_bytes:
            raise ValueError(f"tensors are {position} bytes; the limit is {self.max_bytes}")
        return entries

    def _skip_empty(self):
        while self._index < len(self._entries) and self._entries[self._index][3] == self._entries[self._index][4]:
            name, dtype, shape, _, _ = self._entries[self._index]
            self._tensors[name] = torch.empty(shape, dtype=dtype)
            self._index += 1

    def finish(self) -> dict:
        if self._entries is None or self._index < len(self._entries):
            raise ValueError("tensors: the safetensors data ended early")
        return self._tensors


_JSON_SPECIAL = re.compile(rb'["{}\[\]:,]')
_STRING_SPECIAL = re.compile(rb'["\\]')
_WHITESPACE = b" \t\r\n"


class ResultReader:
    """A result's JSON bytes in (``feed``, any chunking); ``finish()`` -> ``(body without "tensors", tensors)``.

        reader = ResultReader()
        reader.feed(b'{"id": "j", "values": {"x": {"$t": "tensor", "id": "t0"}}, "tensors": "')
        reader.feed(base64_part); ...; reader.feed(b'"}')
        body, tensors = reader.finish()     # ({"id": "j", "values": {...}, "tensors": None}, {"t0": tensor})

    The top-level ``"tensors"`` string is base64-decoded as it arrives (strict: only the base64
    alphabet, padding only at its end) into a ``TensorStream``; everything else is kept as JSON
    text (``max_json`` bytes at most) and parsed at the end.
    """

    def __init__(self, max_bytes: int | None = None, max_json: int = 256 << 20):
        self.tensors = TensorStream(max_bytes)
        self.max_json = max_json
        self._json = bytearray()
        self._mode = "json"  # "json" | "string" | "escape" | "base64"
        self._depth = 0
        self._string = None  # the depth-1 string being read (first bytes only: keys are compared with "tensors")
        self._last = None  # the last depth-1 string read
        self._key = None  # the depth-1 key whose value comes next
        self._value_next = False  # a ':' at depth 1 was the last token
        self._base64 = bytearray()  # at most 3 characters carried to the next chunk
        self._padded = False
        self._seen = False

    def _keep(self, data):
        if len(self._json) + len(data) > self.max_json:
            raise ValueError(f"the result's values are over {self.max_json} bytes of JSON")
        self._json += data

    def feed(self, chunk) -> None:
        chunk = bytes(chunk) if not isinstance(chunk, bytes) else chunk
        pos, n = 0, len(chunk)
        while pos < n:
            if self._mode == "base64":
                end = chunk.find(b'"', pos)
                self._decode(chunk[pos:n if end < 0 else end])
                if end < 0:
                    return
                self._end_base64()
                pos = end + 1
            elif self._mode == "escape":
                self._keep(chunk[pos:pos + 1])
                if self._string is not None:
                    self._string += b"\\" + chunk[pos:pos + 1]
                self._mode = "string"
                pos += 1
            elif self._mode == "string":
                found = _STRING_SPECIAL.search(chunk, pos)
                stop = n if found is None else found.start()
                self._keep(chunk[pos:found.end() if found else n])
                if self._string is not None and len(self._string) < 16:
                    self._string += chunk[pos:stop][:16]
                if found is None:
                    return
                pos = found.end()
                if found.group() == b"\\":
                    self._mode = "escape"
                else:
                    self._mode = "json"
                    if self._string is not None:
                        self._last, self._string = bytes(self._string), None
            else:
                pos = self._json_token(chunk, pos, n)

    def _json_token(self, chunk, pos, n):
        found = _JSON_SPECIAL.search(chunk, pos)
        between = chunk[pos:n if found is None else found.start()]
        if between.strip(_WHITESPACE):
            self._value_next = False  # a number or literal
        if found is None:
            self._keep(between)
            return n
        char = found.group()
        if char == b'"' and self._depth == 1 and self._value_next and self._key == b"tensors":
            if self._seen:
                raise ValueError("the result has two tensors fields")
            self._seen = True
            self._keep(between + b"null")
            self._mode = "base64"
            self._value_next = False
            return found.end()
        self._keep(chunk[pos:found.end()])
        if char == b'"':
            self._mode = "string"
            self._string = bytearray() if self._depth == 1 else None
        elif char == b":":
            if self._depth == 1:
                self._key = self._last
                self._value_next = True
            return found.end()
        elif char in b"{[":
            self._depth += 1
        elif char in b"}]":
            self._depth -= 1
        self._value_next = False
        return found.end()

    def _decode(self, text):
        if not text:
            return
        if self._padded:
            raise ValueError("tensors: not valid base64 (data after its padding)")
        data = self._base64 + text
        whole = len(data) - len(data) % 4
        self._base64 = bytearray(data[whole:])
        if whole:
            try:
                raw = binascii.a2b_base64(bytes(data[:whole]), strict_mode=True)
            except binascii.Error:
                raise ValueError("tensors: not valid base64") from None
            self._padded = data[whole - 1:whole] == b"="
            self.tensors.feed(raw)

    def _end_base64(self):
        if self._base64:
            raise ValueError("tensors: not valid base64 (its length is not a multiple of 4)")
        self._mode = "json"

    def finish(self) -> tuple[dict, dict]:
        if self._mode != "json" or self._depth != 0:
            raise ValueError("the result ended early")
        try:
            body = json.loads(bytes(self._json))
        except (UnicodeDecodeError, ValueError):
            raise ValueError("the result is not valid JSON") from None
        self._json = bytearray()
        if not isinstance(body, dict) or body.get("tensors") is not None:
            raise ValueError("the result is malformed")  # e.g. a "tensors" key this reader did not see as one
        tensors = self.tensors.finish() if self._seen else {}
        return body, tensors
