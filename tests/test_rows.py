"""``batching.Rows``: an invoke's segments of batch tensors laid out other than one row per input."""

import torch

from nnsight.tracing.batching import Rows, merge, narrow


def test_narrow_takes_the_segments_of_a_tensor_with_another_leading_size():
    full = torch.arange(8.0).reshape(4, 2)  # e.g. [uncond0, uncond1, cond0, cond1] for 2 inputs
    rows = Rows(1, 1, {4: [(1, 1), (3, 1)]})
    assert narrow(full, rows, 2).tolist() == [[2.0, 3.0], [6.0, 7.0]]
    assert narrow(torch.zeros(2, 3), rows, 2).shape == (1, 3)  # the plain batch: rows (1, 1)
    assert narrow(torch.zeros(5, 3), rows, 2).shape == (5, 3)  # a size it has no segments for: whole


def test_merge_puts_edited_segments_back_in_place():
    full = torch.arange(8.0).reshape(4, 2)
    rows = Rows(1, 1, {4: [(1, 1), (3, 1)]})
    view = narrow(full, rows, 2)
    merged = merge(full, view, torch.full_like(view, -1.0), rows, 2)
    assert merged.tolist() == [[0.0, 1.0], [-1.0, -1.0], [4.0, 5.0], [-1.0, -1.0]]
    assert full[1].tolist() == [2.0, 3.0]  # the model's tensor itself is not written


def test_a_single_segment_stays_a_view():
    full = torch.zeros(6, 2)
    rows = Rows(0, 1, {6: [(2, 3)]})
    view = narrow(full, rows, 2)
    view[:] = 1.0
    assert full[2:5].eq(1.0).all() and full[:2].eq(0.0).all() and full[5:].eq(0.0).all()
