"""Generation streaming: ``model.generator.streamer.output`` per step; a Hugging Face streamer still works."""

import threading

import pytest
import torch

transformers = pytest.importorskip("transformers")

from nnsight import LanguageModel  # noqa: E402


@pytest.fixture
def lm(gpt2, gpt2_tokenizer):
    return LanguageModel(gpt2, tokenizer=gpt2_tokenizer)


def test_streamer_output_is_each_steps_new_tokens(lm):
    with lm.generate("Hello there", max_new_tokens=4) as tracer:
        streamed = list().save()
        argmax = list().save()
        for step in tracer.iter[:]:
            argmax.append(lm.lm_head.output[:, -1].argmax(-1))
            streamed.append(lm.generator.streamer.output)
        tokens = tracer.result.save()
    assert len(streamed) == 4
    assert torch.equal(torch.stack(streamed, 1), tokens[:, -4:])  # oracle: the ids generate returns
    assert torch.equal(torch.stack(streamed), torch.stack(argmax))  # greedy: each step's argmax


def test_streamer_rows_per_invoke(lm):
    with lm.generate(max_new_tokens=2) as tracer:
        with tracer.invoke("Hello"):
            first = list().save()
            for step in tracer.iter[:]:
                first.append(lm.generator.streamer.output)
            a = tracer.result.save()
        with tracer.invoke("The Eiffel Tower is in"):
            b = tracer.result.save()
    assert [t.shape for t in first] == [(1,), (1,)] and torch.equal(torch.stack(first, 1), a[:, -2:])
    assert b.shape[0] == 1


def test_a_text_iterator_streamer_runs_alongside_the_trace(lm, gpt2_tokenizer):
    streamer = transformers.TextIteratorStreamer(gpt2_tokenizer, skip_prompt=True, timeout=60)
    pieces = []
    reader = threading.Thread(target=lambda: pieces.extend(streamer))
    reader.start()
    with lm.generate("Hello there", max_new_tokens=5, streamer=streamer) as tracer:
        logits = lm.lm_head.output.save()
        tokens = tracer.result.save()
    reader.join(timeout=60)
    assert not reader.is_alive() and logits.shape[0] == 1
    assert "".join(pieces) == gpt2_tokenizer.decode(tokens[0, -5:])
