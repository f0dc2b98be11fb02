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
from nnsight import InvokeError, LanguageModel, NNsightError  # noqa: E402


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


def _received(model, *invokes):
    """Trace each ``(args, kwargs)`` as its own invoke: (the keyword inputs the model got, its output)."""
    with model.trace() as tracer:
        for args, kwargs in invokes:
            with tracer.invoke(*args, **kwargs):
                pass
        with tracer.invoke():
            received = nnsight.save(model.inputs[1])
            out = nnsight.save(model.output)
    return received, out


def _tiny_gpt2(vocab=8):
    torch.manual_seed(7)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=vocab, n_layer=1, n_head=2, n_embd=16)).eval()


@torch.no_grad()
def test_tokenizer_options_apply_per_invoke(gpt2, fresh_gpt2_tokenizer):
    tok = fresh_gpt2_tokenizer
    tok.padding_side, tok.pad_token = "left", tok.eos_token
    model = LanguageModel(gpt2, tokenizer=tok)
    long, short = "The Eiffel Tower is in the city of", "Hello there"
    received, out = _received(model, ((long,), {"truncation": True, "max_length": 4}), ((short,), {}))
    cut = tok(long, truncation=True, max_length=4)["input_ids"]
    assert len(cut) == 4 and received["input_ids"][0].tolist() == cut
    assert received["input_ids"][1].tolist() == [tok.pad_token_id] * 2 + tok(short)["input_ids"]
    torch.testing.assert_close(out.logits[0], gpt2(torch.tensor([cut])).logits[0], atol=1e-5, rtol=1e-4)
    # The trace's own input takes them too; add_special_tokens= reaches the tokenizer (GPT-2 adds none).
    with model.trace(long, truncation=True, max_length=3, add_special_tokens=False):
        ids = nnsight.save(model.inputs[1]["input_ids"])
    assert ids.tolist() == [tok(long, truncation=True, max_length=3, add_special_tokens=False)["input_ids"]]


@torch.no_grad()
def test_add_special_tokens_per_invoke_reaches_the_tokenizer(bert):
    tok = _bert_tokenizer()
    model = LanguageModel(bert._module, tokenizer=tok, padding_side="right")
    received, _ = _received(model, (("hello world",), {"add_special_tokens": False}), (("hello world",), {}))
    bare, full = tok("hello world", add_special_tokens=False)["input_ids"], tok("hello world")["input_ids"]
    assert len(full) == len(bare) + 2  # [CLS] ... [SEP]
    assert received["input_ids"].tolist() == [bare + [tok.pad_token_id] * 2, full]
    assert received["attention_mask"].tolist() == [[1] * len(bare) + [0, 0], [1] * len(full)]


def _bert_tokenizer():
    import tempfile

    folder = tempfile.mkdtemp()
    with open(f"{folder}/vocab.txt", "w") as f:
        f.write("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nhello\nworld\nother\n")
    return transformers.BertTokenizer(vocab_file=f"{folder}/vocab.txt")


@torch.no_grad()
def test_pretokenized_forms_combine_across_invokes(gpt2, gpt2_tokenizer):
    np = pytest.importorskip("numpy")
    model = LanguageModel(gpt2, tokenizer=gpt2_tokenizer)  # left padding, eos as pad
    pad = gpt2_tokenizer.eos_token_id  # it has no pad token: its eos token pads, as in 0.8.1
    assert gpt2_tokenizer.pad_token_id is None
    invokes = [
        ((gpt2_tokenizer("The cat sat", return_tensors="pt"),), {}),        # BatchEncoding of tensors
        (({"input_ids": [[464, 3290]], "attention_mask": [[1, 1]]},), {}),   # dict of lists
        (([15496, 995, 11],), {}),                                          # list of ids
        ((torch.tensor([7, 8]),), {}),                                      # 1-D tensor
        ((torch.tensor([[1, 2, 3], [4, 5, 6]]),), {}),                       # 2-D tensor: two rows
        ((np.array([9, 10]),), {}),                                         # numpy
        (([np.int64(11)],), {}),                                            # numpy integers
    ]
    received, out = _received(model, *invokes)
    rows = [[464, 3797, 3332], [464, 3290], [15496, 995, 11], [7, 8], [1, 2, 3], [4, 5, 6], [9, 10], [11]]
    by_hand = [[pad] * (3 - len(r)) + r for r in rows]
    assert received["input_ids"].tolist() == by_hand
    assert received["attention_mask"].tolist() == [[0] * (3 - len(r)) + [1] * len(r) for r in rows]
    for i, row in enumerate(rows):  # each row reads as it does alone
        torch.testing.assert_close(out.logits[i, 3 - len(row):], gpt2(torch.tensor([row])).logits[0], atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_inputs_embeds_trace_and_invokes_pad_like_ids():
    hf = _tiny_gpt2()
    model = LanguageModel(hf, tokenizer=None, padding_side="left")
    emb = hf.get_input_embeddings()(torch.tensor([[2, 5, 6], [2, 7, 3]]))
    with model.trace(inputs_embeds=emb):
        logits = nnsight.save(model.output.logits)
    torch.testing.assert_close(logits, hf(inputs_embeds=emb).logits)
    received, out = _received(model, ((), {"inputs_embeds": emb[0, :2]}), (({"inputs_embeds": emb[1:]},), {}))
    by_hand = torch.cat((torch.nn.functional.pad(emb[:1, :2], (0, 0, 1, 0)), emb[1:]))
    torch.testing.assert_close(received["inputs_embeds"], by_hand)
    assert received["attention_mask"].tolist() == [[0, 1, 1], [1, 1, 1]] and "input_ids" not in received
    torch.testing.assert_close(out.logits[0, 1:], hf(inputs_embeds=emb[:1, :2]).logits[0], atol=1e-5, rtol=1e-4)
    with pytest.raises(InvokeError, match="token ids and others inputs_embeds"):
        _received(model, ((), {"inputs_embeds": emb[:1]}), ((torch.tensor([[2, 5, 6]]),), {}))


@torch.no_grad()
def test_decoder_fields_pad_on_the_right_at_their_own_width():
    torch.manual_seed(7)
    t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=8, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2, decoder_start_token_id=0, pad_token_id=0,
    )).eval()
    model = LanguageModel(t5, tokenizer=None, padding_side="left")
    short = {"input_ids": torch.tensor([[2, 5, 6, 3]]), "decoder_input_ids": torch.tensor([[0, 5, 6]]),
             "decoder_attention_mask": torch.tensor([[1, 1, 1]])}
    long = {"input_ids": torch.tensor([[2, 7, 3]]), "decoder_input_ids": torch.tensor([[0, 5, 6, 7, 5]]),
            "decoder_attention_mask": torch.tensor([[1, 1, 1, 1, 1]])}
    received, out = _received(model, ((short,), {}), ((), long))
    assert received["decoder_input_ids"].tolist() == [[0, 5, 6, 0, 0], [0, 5, 6, 7, 5]]
    assert received["decoder_attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1] * 5]
    assert received["input_ids"].tolist() == [[2, 5, 6, 3], [0, 2, 7, 3]]
    torch.testing.assert_close(out.logits[0, :3], t5(**short).logits[0], atol=1e-5, rtol=1e-4)
    with pytest.raises(InvokeError, match="1 of 2 rows have `decoder_input_ids`"):
        _received(model, ((short["input_ids"],), {"decoder_input_ids": short["decoder_input_ids"]}), ((long["input_ids"],), {}))


@torch.no_grad()
def test_start_and_end_positions_are_one_per_row():
    torch.manual_seed(7)
    qa = transformers.BertForQuestionAnswering(_bert().config).eval()
    model = LanguageModel(qa, tokenizer=None, padding_side="right")
    ids = torch.tensor([[2, 5, 6, 3], [2, 7, 3, 4]])
    expected = qa(input_ids=ids, start_positions=torch.tensor([1, 0]), end_positions=torch.tensor([2, 1])).loss
    _, out = _received(
        model,
        ((ids[:1],), {"start_positions": torch.tensor([1]), "end_positions": torch.tensor([2])}),
        ((ids[1:],), {"start_positions": 0, "end_positions": torch.tensor(1)}),
    )
    torch.testing.assert_close(out.loss, expected)


@torch.no_grad()
def test_ids_of_three_dimensions_reach_the_model_whole():
    torch.manual_seed(7)
    choice = transformers.BertForMultipleChoice(_bert().config).eval()
    model = LanguageModel(choice, tokenizer=None)
    ids = torch.tensor([[[2, 5, 6, 3], [2, 7, 6, 3]]])
    with model.trace(ids):
        received = nnsight.save(model.inputs[1])
        logits = nnsight.save(model.output.logits)
    assert received["attention_mask"].shape == ids.shape
    torch.testing.assert_close(logits, choice(input_ids=ids).logits)


@torch.no_grad()
def test_no_mask_is_made_up_beside_a_cache():
    import copy

    hf = _tiny_gpt2()
    model = LanguageModel(hf, tokenizer=None)
    past = hf(input_ids=torch.tensor([[2, 5, 6]]), use_cache=True).past_key_values
    expected = hf(input_ids=torch.tensor([[7]]), past_key_values=copy.deepcopy(past)).logits
    with model.trace([7], past_key_values=past):
        received = nnsight.save(model.inputs[1])
        logits = nnsight.save(model.output.logits)
    assert "attention_mask" not in received
    torch.testing.assert_close(logits, expected)


def test_a_per_token_field_of_the_wrong_width_is_named(bert):
    with pytest.raises(ValueError, match="`token_type_ids` has 3 positions for a row of 4"):
        with bert.trace(torch.tensor([[2, 5, 6, 3]]), token_type_ids=torch.tensor([[0, 1, 1]])):
            pass


@torch.no_grad()
def test_generate_from_inputs_embeds():
    hf = _tiny_gpt2()
    model = LanguageModel(hf, tokenizer=None)
    emb = hf.get_input_embeddings()(torch.tensor([[2, 5, 6]]))
    expected = hf.generate(inputs_embeds=emb, attention_mask=torch.ones(1, 3, dtype=torch.long), max_new_tokens=3,
                           do_sample=False, pad_token_id=0)
    with model.generate(inputs_embeds=emb, max_new_tokens=3, do_sample=False, pad_token_id=0) as tracer:
        result = nnsight.save(tracer.result)
    assert result.tolist() == expected.tolist() and result.shape == (1, 3)  # new tokens only, as HF returns


@torch.no_grad()
def test_a_sentence_pair_per_invoke_keeps_its_segments(bert):
    tok = _bert_tokenizer()
    model = LanguageModel(bert._module, tokenizer=tok, padding_side="right")
    pair = tok("hello", text_pair="world other", return_tensors="pt")
    received, out = _received(model, (("hello",), {"text_pair": "world other", "return_tensors": "pt"}), (("hello",), {}))
    n = pair["input_ids"].shape[1]
    assert received["token_type_ids"][0].tolist() == pair["token_type_ids"][0].tolist()
    assert received["token_type_ids"][1].tolist() == [0] * n  # the single text: segment 0, padded with 0
    torch.testing.assert_close(out.logits[0], bert._module(**pair).logits[0])
