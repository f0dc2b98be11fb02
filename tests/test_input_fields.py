"""Per-token fields beside the ids (token_type_ids, position_ids, labels) are batched per row.

    with model.trace() as tracer:
        with tracer.invoke({"input_ids": short, "token_type_ids": seg, "labels": lab}): ...
        with tracer.invoke(long_ids): ...           # gets token_type_ids 0, labels -100

Oracle: a plain Hugging Face forward on the same batch padded by hand, or each row run alone.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import nnsight  # noqa: E402
from nnsight import LanguageModel, NNsightError  # noqa: E402


def _bert():
    torch.manual_seed(7)
    config = transformers.BertConfig(
        vocab_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        hidden_dropout_prob=0, attention_probs_dropout_prob=0, pad_token_id=0,
    )
    return transformers.BertForMaskedLM(config).eval()


@pytest.fixture
def bert():
    return LanguageModel(_bert(), tokenizer=None, padding_side="right")



@pytest.mark.parametrize("side", ["left", "right"])
@torch.no_grad()
def test_fields_of_unequal_invokes_are_padded_per_row(side):
    model = LanguageModel(_bert(), tokenizer=None, padding_side=side)
    short = {"input_ids": torch.tensor([[2, 4, 3]]), "token_type_ids": torch.tensor([[0, 1, 1]]),
             "position_ids": torch.tensor([[5, 6, 7]]), "labels": torch.tensor([[-100, 6, -100]])}
    long = {"input_ids": torch.tensor([[2, 5, 4, 3]]), "token_type_ids": torch.tensor([[0, 0, 1, 1]]),
            "position_ids": torch.tensor([[2, 3, 4, 5]]), "labels": torch.tensor([[-100, -100, 7, -100]])}
    pad = (1, 0) if side == "left" else (0, 1)
    fills = {"input_ids": 0, "token_type_ids": 0, "position_ids": 0, "labels": -100}
    by_hand = {k: torch.cat((torch.nn.functional.pad(short[k], pad, value=f), long[k])) for k, f in fills.items()}
    by_hand["attention_mask"] = torch.tensor([[0, 1, 1, 1] if side == "left" else [1, 1, 1, 0], [1, 1, 1, 1]])
    expected = model._module(**by_hand)
    with model.trace() as tracer:
        with tracer.invoke(short):
            pass
        with tracer.invoke(**long):  # keywords, not a mapping: the same rows
            pass
        with tracer.invoke():
            received = nnsight.save(model.inputs[1])
            out = nnsight.save(model.output)
    for key, value in by_hand.items():
        assert received[key].tolist() == value.tolist(), key
    torch.testing.assert_close(out.logits, expected.logits)
    torch.testing.assert_close(out.loss, expected.loss)


@torch.no_grad()
def test_an_invoke_without_a_field_gets_its_default(bert):
    ids = torch.tensor([[2, 5, 4, 3]])
    with bert.trace() as tracer:
        with tracer.invoke({"input_ids": ids, "token_type_ids": torch.tensor([[0, 0, 1, 1]]),
                            "labels": torch.tensor([[-100, 5, -100, -100]])}):
            pass
        with tracer.invoke(ids):
            pass
        with tracer.invoke():
            received = nnsight.save(bert.inputs[1])
            logits = nnsight.save(bert.output.logits)
    assert received["token_type_ids"].tolist() == [[0, 0, 1, 1], [0, 0, 0, 0]]
    assert received["labels"].tolist() == [[-100, 5, -100, -100], [-100] * 4]
    torch.testing.assert_close(logits[1], bert._module(input_ids=ids).logits[0])  # the row without fields


@torch.no_grad()
def test_a_shared_field_row_broadcasts_and_a_wrong_count_is_refused(bert):
    ids = torch.tensor([[2, 5, 4, 3], [2, 7, 4, 3]])
    segments = torch.tensor([[0, 1, 1, 1]])
    expected = bert._module(input_ids=ids, token_type_ids=segments).logits
    with bert.trace(ids, token_type_ids=segments):
        logits = nnsight.save(bert.output.logits)
    torch.testing.assert_close(logits, expected)
    with pytest.raises(NNsightError, match="`labels` has 3 rows, but `input_ids` has 2"):
        with bert.trace(ids, labels=torch.tensor([[1] * 4] * 3)):
            pass


@torch.no_grad()
def test_a_mask_beside_positional_ids_belongs_to_them(gpt2):
    # Two invokes each with its own mask; only the left-padded row gets positions from its mask.
    model = LanguageModel(gpt2, tokenizer=None, padding_side="left")
    with model.trace() as tracer:
        with tracer.invoke(torch.tensor([[2, 5, 6, 0, 0]]), attention_mask=torch.tensor([[1, 1, 1, 0, 0]])):
            pass
        with tracer.invoke(torch.tensor([[0, 2, 5, 6, 7]]), attention_mask=torch.tensor([[0, 1, 1, 1, 1]])):
            pass
        with tracer.invoke():  # an empty invoke sees the whole batch
            received = nnsight.save(model.inputs[1])
            logits = nnsight.save(model.output.logits)
    assert received["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 0, 1, 2, 3]]
    alone = gpt2(input_ids=torch.tensor([[2, 5, 6, 7]])).logits[0]
    torch.testing.assert_close(logits[1, 1:], alone, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_no_positions_without_left_padding(gpt2):
    model = LanguageModel(gpt2, tokenizer=None)
    ids = torch.tensor([[2, 5, 6, 7, 3]])
    for mask in ([[1, 1, 0, 1, 1]], [[1, 1, 1, 0, 0]]):
        with model.trace(ids, attention_mask=torch.tensor(mask)):
            received = nnsight.save(model.inputs[1])
        assert "position_ids" not in received


@torch.no_grad()
def test_one_class_label_per_row_however_it_is_written():
    torch.manual_seed(7)
    config = transformers.BertConfig(
        vocab_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        hidden_dropout_prob=0, attention_probs_dropout_prob=0, pad_token_id=0,
    )
    module = transformers.BertForSequenceClassification(config).eval()
    model = LanguageModel(module, tokenizer=None, padding_side="right")
    with model.trace() as tracer:
        for ids, label in (([2, 5, 6, 3], 1), ([2, 7, 3], torch.tensor(0)), ([2, 6, 3], [1]),
                           (torch.tensor([[2, 5, 3]]), torch.tensor([0]))):
            with tracer.invoke(ids, labels=label):
                pass
        with tracer.invoke():
            received = nnsight.save(model.inputs[1])
            loss = nnsight.save(model.output.loss)
    assert received["labels"].tolist() == [1, 0, 1, 0]
    expected = module(input_ids=received["input_ids"], attention_mask=received["attention_mask"],
                      labels=torch.tensor([1, 0, 1, 0])).loss
    torch.testing.assert_close(loss, expected)
    two = torch.tensor([[2, 5, 6, 3], [2, 7, 6, 3]])
    with model.trace(two, labels=torch.tensor([0, 1])):
        loss = nnsight.save(model.output.loss)
    torch.testing.assert_close(loss, module(input_ids=two, labels=torch.tensor([0, 1])).loss)
