"""VisionLanguageModel on tiny random LLaVA and Qwen2-VL models, checked against plain hooks on plain forwards."""

import pytest
import torch

pytest.importorskip("PIL")

from nnsight import NNsightError, VisionLanguageModel, save  # noqa: E402

# (fixture, prompt with one image, image size, a vision-tower layer under model.vision_tower)
FAMILIES = {
    "llava": ("tiny_llava", "<image> What is this?", 16, "encoder.layers.0"),
    "qwen2_vl": ("tiny_qwen2_vl", "<|vision_start|><|image_pad|><|vision_end|> What is this?", 56, "blocks.0"),
}


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    fixture, prompt, size, layer = FAMILIES[request.param]
    hf_model, processor = request.getfixturevalue(fixture)
    return VisionLanguageModel(hf_model, processor=processor), hf_model, processor, prompt, size, layer


def _modules(hf_model, layer):
    vision = getattr(hf_model.model, "vision_tower", None) or hf_model.model.visual
    projector = getattr(hf_model.model, "multi_modal_projector", None) or hf_model.model.visual.merger
    return vision.get_submodule(layer), projector, hf_model.model.language_model.layers[1]


def _plain(hf_model, processor, prompt, images, watch, patch=None):
    """A plain forward: ``watch`` modules' outputs recorded by forward hooks; ``patch``: (module, hook) edits."""
    recorded = {}
    handles = [m.register_forward_hook(lambda mod, i, o, k=k: recorded.setdefault(k, o)) for k, m in watch.items()]
    if patch is not None:
        handles.append(patch[0].register_forward_hook(patch[1]))
    try:
        with torch.no_grad():
            logits = hf_model(**processor(text=[prompt], images=images, return_tensors="pt")).logits
    finally:
        for handle in handles:
            handle.remove()
    return logits, recorded


def test_saved_values_equal_plain_hooks(family, make_image):
    model, hf_model, processor, prompt, size, layer = family
    image = make_image(0, size)
    with model.trace(prompt, images=[image]):
        vision = model.vision_tower.get(layer).output.save()
        projected = model.multi_modal_projector.output.save()
        hidden = model.language_model.layers[1].output.save()
        logits = model.lm_head.output.save()
    vision_m, projector_m, layer_m = _modules(hf_model, layer)
    expected, seen = _plain(hf_model, processor, prompt, [image], {"v": vision_m, "p": projector_m, "h": layer_m})
    torch.testing.assert_close(vision, seen["v"])
    torch.testing.assert_close(projected, seen["p"])
    torch.testing.assert_close(hidden, seen["h"])
    torch.testing.assert_close(logits, expected)
    other, _ = _plain(hf_model, processor, prompt, [make_image(1, size)], {})
    assert not torch.allclose(other, expected)  # the image really reaches the output


def test_each_invoke_sees_only_its_own_rows_and_images(family, make_image):
    model, hf_model, processor, prompt, size, layer = family
    image_a, image_b = make_image(0, size), make_image(1, size)
    prompt_b = prompt + " Answer in a few more words"
    with model.trace() as tracer:
        with tracer.invoke(prompt, images=[image_a]):
            vision_a = model.vision_tower.get(layer).output.save()
            projected_a = model.multi_modal_projector.output.save()
            logits_a = model.lm_head.output.save()
        with tracer.invoke(prompt_b, images=[image_b]):
            vision_b = model.vision_tower.get(layer).output.save()
            projected_b = model.multi_modal_projector.output.save()
            logits_b = model.lm_head.output.save()
    vision_m, projector_m, _ = _modules(hf_model, layer)
    for prompt_x, image, vision, projected, logits in (
        (prompt, image_a, vision_a, projected_a, logits_a),
        (prompt_b, image_b, vision_b, projected_b, logits_b),
    ):
        expected, seen = _plain(hf_model, processor, prompt_x, [image], {"v": vision_m, "p": projector_m})
        torch.testing.assert_close(vision, seen["v"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(projected, seen["p"], atol=1e-5, rtol=1e-5)
        # Left padding: the shorter prompt's real tokens are the last ones of its row.
        torch.testing.assert_close(logits[:, -expected.shape[1]:], expected, atol=1e-5, rtol=1e-5)


def test_patching_image_tokens_from_one_invoke_into_another(family, make_image):
    model, hf_model, processor, prompt, size, layer = family
    image_a, image_b = make_image(0, size), make_image(1, size)
    ids = processor(text=[prompt], images=[image_a], return_tensors="pt")["input_ids"][0]
    image_positions = (ids == hf_model.config.image_token_id).nonzero().flatten()
    assert len(image_positions) == 4
    with model.trace() as tracer:
        with tracer.invoke(prompt, images=[image_a]):
            donor = model.language_model.layers[0].output[:, image_positions].clone()
        with tracer.invoke(prompt, images=[image_b]):
            model.language_model.layers[0].output[:, image_positions] = donor
            patched = model.lm_head.output.save()
    layer0 = hf_model.model.language_model.layers[0]
    _, from_a = _plain(hf_model, processor, prompt, [image_a], {"h": layer0})

    def put_a(module, inputs, output):
        output = output.clone()
        output[:, image_positions] = from_a["h"][:, image_positions]
        return output

    expected, _ = _plain(hf_model, processor, prompt, [image_b], {}, patch=(layer0, put_a))
    untouched, _ = _plain(hf_model, processor, prompt, [image_b], {})
    torch.testing.assert_close(patched, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(patched, untouched, atol=1e-4)


def test_generate_with_images_matches_plain_generate(family, make_image):
    model, hf_model, processor, prompt, size, layer = family
    image = make_image(2, size)
    with model.generate(text=prompt, images=[image], max_new_tokens=3, do_sample=False) as tracer:
        steps = save([])
        for step in tracer.iter[:]:
            steps.append(model.language_model.layers[0].output.shape[1])
        tokens = tracer.result.save()
    encoding = processor(text=[prompt], images=[image], return_tensors="pt")
    with torch.no_grad():
        expected = hf_model.generate(**encoding, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert tokens.tolist() == expected.tolist()
    assert steps == [encoding["input_ids"].shape[1], 1, 1]  # the prompt with its image, then one token a step


def test_a_processor_output_is_an_input(family, make_image):
    model, hf_model, processor, prompt, size, layer = family
    encoding = processor(text=[prompt], images=[make_image(3, size)], return_tensors="pt")
    with model.trace(encoding):
        logits = model.lm_head.output.save()
    with torch.no_grad():
        torch.testing.assert_close(logits, hf_model(**encoding).logits)


def test_image_count_mismatch_is_named(tiny_llava, make_image):
    hf_model, processor = tiny_llava
    model = VisionLanguageModel(hf_model, processor=processor)
    image = make_image(0, 16)
    with pytest.raises(NNsightError, match="image token"):
        with model.trace(["<image> one", "<image> two"], images=[image]):
            model.lm_head.output.save()
    with pytest.raises(NNsightError, match="exactly one prompt"):
        with model.trace("<image> a", "<image> b", images=[image, image]):
            model.lm_head.output.save()
    with pytest.raises(AttributeError, match="no module or attribute 'vision_towers'"):
        model.vision_towers


def test_an_invoke_with_two_images_keeps_both(tiny_llava, make_image):
    hf_model, processor = tiny_llava
    model = VisionLanguageModel(hf_model, processor=processor)
    first, second, third = (make_image(seed, 16) for seed in (4, 5, 6))
    with model.trace() as tracer:
        with tracer.invoke("<image><image> Which differs?", images=[first, second]):
            pair = model.multi_modal_projector.output.save()
        with tracer.invoke("<image> And this?", images=[third]):
            single = model.multi_modal_projector.output.save()
            single_logits = model.lm_head.output.save()
    projector = hf_model.model.multi_modal_projector
    _, seen_pair = _plain(hf_model, processor, "<image><image> Which differs?", [first, second], {"p": projector})
    expected, seen_single = _plain(hf_model, processor, "<image> And this?", [third], {"p": projector})
    assert pair.shape[0] == 2 and single.shape[0] == 1  # 3 images in the batch of 2 rows
    torch.testing.assert_close(pair, seen_pair["p"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(single, seen_single["p"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(single_logits[:, -expected.shape[1]:], expected, atol=1e-5, rtol=1e-5)


def test_loads_from_a_folder_lazily(tiny_llava, tmp_path, make_image):
    hf_model, processor = tiny_llava
    hf_model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    model = VisionLanguageModel(str(tmp_path))
    assert next(model._module.parameters()).is_meta  # nothing loaded until the first trace
    image = make_image(7, 16)
    with model.trace("<image> hi", images=[image]):
        logits = model.lm_head.output.save()
    expected, _ = _plain(hf_model, processor, "<image> hi", [image], {})
    torch.testing.assert_close(logits, expected)


def test_readme_example_runs(tiny_llava, tmp_path, readme_example):
    hf_model, processor = tiny_llava
    scope = readme_example("Vision-language models", {
        'VisionLanguageModel("llava-hf/llava-interleave-qwen-0.5b-hf")': "VisionLanguageModel(hf_model, processor=p)",
        "print(": "(",
    }, {"hf_model": hf_model, "p": processor}, tmp_path)
    prompt_length = processor(text=[scope["prompt"]], images=[scope["red"]], return_tensors="pt")["input_ids"].shape[1]
    assert scope["features"].shape == (1, 4, 32) and scope["tokens"].shape == (1, prompt_length + 3)
    # The patched blue forward is the red forward from layer 0 on: same logits as red alone.
    with scope["model"].trace(scope["prompt"], images=[scope["red"]]):
        red_logits = scope["model"].lm_head.output.save()
    torch.testing.assert_close(scope["patched"], red_logits, atol=1e-5, rtol=1e-5)


def test_pixels_follow_the_model_dtype(tiny_llava, make_image):
    import copy

    hf_model, processor = tiny_llava
    half = copy.deepcopy(hf_model).to(torch.bfloat16)
    model = VisionLanguageModel(half, processor=processor)
    image = make_image(8, 16)
    with model.trace("<image> hi", images=[image]):
        pixels = model.vision_tower.input.save()
        logits = model.lm_head.output.save()
    encoding = processor(text=["<image> hi"], images=[image], return_tensors="pt")
    encoding["pixel_values"] = encoding["pixel_values"].to(torch.bfloat16)
    with torch.no_grad():
        expected = half(**encoding).logits
    assert pixels.dtype == torch.bfloat16
    torch.testing.assert_close(logits, expected)


def test_batched_generation_with_images_matches_each_solo_generate(family, make_image):
    model, hf_model, processor, prompt, size, layer = family
    long_prompt = prompt + " Answer in a few more words"
    image_a, image_b = make_image(9, size), make_image(10, size)
    with model.generate(max_new_tokens=3, do_sample=False) as tracer:
        with tracer.invoke(prompt, images=[image_a]):
            short = tracer.result.save()
        with tracer.invoke(long_prompt, images=[image_b]):
            long = tracer.result.save()
    for tokens, text, image in ((short, prompt, image_a), (long, long_prompt, image_b)):
        encoding = processor(text=[text], images=[image], return_tensors="pt")
        with torch.no_grad():
            expected = hf_model.generate(**encoding, max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert tokens[:, -expected.shape[1]:].tolist() == expected.tolist()
