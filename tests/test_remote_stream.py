"""Results read as they download (nnsight.remote.stream): exact values, malformed data refused, bounded memory."""

from __future__ import annotations

import base64
import io
import json

import pytest
import torch

from nnsight.remote import compression
from nnsight.remote.stream import ResultReader, TensorStream

safetensors_torch = pytest.importorskip("safetensors.torch")


def result_bytes(tensors, values=None):
    """A result as the server stores it (hub.done): JSON with the tensors as one base64 safetensors string."""
    blob = base64.b64encode(safetensors_torch.save(tensors)).decode() if tensors else None
    return json.dumps({"id": "job", "values": values or {}, "tensors": blob}).encode()


def read(data, size):
    reader = ResultReader()
    for start in range(0, len(data), size):
        reader.feed(data[start:start + size])
    return reader.finish()


TENSORS = {
    "t0": torch.randn(3, 4), "t1": torch.arange(10, dtype=torch.int64), "t2": torch.zeros(0, 3),
    "t3": torch.tensor(True), "t4": torch.randn(5).to(torch.bfloat16), "t5": torch.randn(2, 2, dtype=torch.float64),
    "t6": torch.tensor([1, -2], dtype=torch.int8), "t7": torch.randn(7).half(),
}


@pytest.mark.parametrize("size", [1, 3, 4, 7, 100, 1 << 20])
def test_any_chunking_gives_the_exact_tensors_and_values(size):
    values = {"x": {"$t": "tensor", "id": "t0"}, "tricky": 'tensors"\\ {[', "tensors": "a nested key, not the blob"}
    body, tensors = read(result_bytes(TENSORS, values), size)
    assert body["values"] == values and body["id"] == "job"
    assert tensors.keys() == TENSORS.keys()
    for name, expected in TENSORS.items():
        assert tensors[name].dtype == expected.dtype and tensors[name].shape == expected.shape
        assert torch.equal(tensors[name], expected), name


def test_a_result_without_tensors():
    body, tensors = read(result_bytes({}, {"n": 3}), 5)
    assert body["values"] == {"n": 3} and tensors == {}


def _safetensors(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data


@pytest.mark.parametrize("blob, match", [
    (_safetensors({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4), "ended early"),
    (_safetensors({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8), "more data"),
    (_safetensors({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4), "wrong size"),
    (_safetensors({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                   "b": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]}}, b"\0" * 8), "overlap"),
    (_safetensors({"a": {"dtype": "OBJ", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4), "malformed"),
    ((1 << 40).to_bytes(8, "little"), "header too large"),
    (b"\x80\x04K\x01.", "ended early"),  # a pickle: never unpickled, just not safetensors
])
def test_malformed_safetensors_are_refused(blob, match):
    stream = TensorStream()
    with pytest.raises(ValueError, match=match):
        stream.feed(blob)
        stream.finish()


@pytest.mark.parametrize("text, match", [
    (b'{"id": "j", "values": {}, "tensors": "AAA*"}', "not valid base64"),
    (b'{"id": "j", "values": {}, "tensors": "AA==AAAA"}', "not valid base64"),
    (b'{"id": "j", "values": {}, "tensors": "AAAAA"}', "multiple of 4"),
    (b'{"id": "j", "values": {}, "tensors": "AAAA", "tensors": "AAAA"}', "two tensors"),
    (b'{"id": "j", "values": {}, "tensor\\u0073": "AAAA"}', "malformed"),
    (b'{"id": "j", "values": {}, "tensors": "AAAA', "ended early"),
    (b'{"id": "j", "values": {}', "ended early"),
])
def test_malformed_results_are_refused(text, match):
    with pytest.raises(ValueError, match=match):
        read(text, 3)


class _Response:
    """What ``requests`` gives for a streamed body (``raw.read(n, decode_content=False)``)."""

    def __init__(self, body, headers):
        self.headers = headers
        stream = io.BytesIO(body)
        self.raw = type("Raw", (), {"read": staticmethod(lambda n, decode_content=False: stream.read(n))})()


def test_peak_memory_while_reading_a_100_mb_result_is_one_copy_plus_a_bounded_buffer():
    import tracemalloc

    torch.manual_seed(0)
    tensors = {"t0": torch.randn(20 << 20), "t1": torch.randn(5 << 20, dtype=torch.float16)}  # 90 MiB
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    body, headers = compression.compress_body(result_bytes(tensors, {"x": {"$t": "tensor", "id": "t0"}}), "zstd")
    headers["Content-Length"] = str(len(body))
    # Tensor memory is not seen by tracemalloc (torch allocates it itself): it is exactly `size`,
    # allocated once, so the peak is `size` plus what tracemalloc sees (the buffers).
    tracemalloc.start()
    try:
        reader = ResultReader()
        for part in compression.chunks(_Response(body, headers), "test", show_progress=False):
            assert len(part) <= compression.CHUNK
            reader.feed(part)
        _, got = reader.finish()
        buffers = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert buffers < 0.1 * size, (buffers, size)  # peak ~ size + buffers < 1.1x (the JSON/base64 way: ~3.3x)
    assert all(torch.equal(got[k], tensors[k]) for k in tensors)
