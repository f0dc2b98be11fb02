"""DiffusionModel on a tiny random Stable Diffusion pipeline, checked against plain hooks on plain runs."""

import pytest
import torch

pytest.importorskip("diffusers")

from nnsight import DiffusionModel, NNsightError  # noqa: E402

STEPS = 3


def _generators(seeds, device="cpu"):
    return [torch.Generator(device).manual_seed(s) for s in seeds]


def _plain(pipeline, prompts, seeds, hooks=(), **options):
    """A plain pipeline call with forward hooks ``(module, hook)``; returns the latents."""
    handles = [module.register_forward_hook(hook) for module, hook in hooks]
    try:
        return pipeline(
            prompts, num_inference_steps=STEPS, generator=_generators(seeds), output_type="latent", **options
        ).images
    finally:
        for handle in handles:
            handle.remove()


def test_per_step_reads_equal_plain_hooks(sd_pipeline):
    model = DiffusionModel(sd_pipeline)
    with model.generate("a cat", num_inference_steps=STEPS, seed=0, output_type="latent") as tracer:
        text = model.text_encoder.output.last_hidden_state.save()
        reads = []
        for step in tracer.iter[:]:
            reads.append(model.unet.down_blocks[1].resnets[0].output.save())
    recorded = []
    _plain(sd_pipeline, ["a cat"], [0], [(sd_pipeline.unet.down_blocks[1].resnets[0], lambda m, i, o: recorded.append(o))])
    assert len(reads) == len(recorded) == STEPS
    for ours, theirs in zip(reads, recorded):
        torch.testing.assert_close(ours, theirs)
    assert not torch.allclose(reads[0], reads[1])  # the steps really differ
    assert text.shape == (1, 8, 32)  # the prompt encoding belongs to step 0


def test_zeroing_a_block_at_step_k_matches_a_hand_patched_forward(sd_pipeline):
    model = DiffusionModel(sd_pipeline)
    with model.generate("a cat", num_inference_steps=STEPS, seed=0, output_type="latent") as tracer:
        for step in tracer.iter[1]:
            model.unet.mid_block.output = torch.zeros_like(model.unet.mid_block.output)
        latents = model.output.images.save()
    calls = []

    def zero_second_call(module, inputs, output):
        calls.append(1)
        return torch.zeros_like(output) if len(calls) == 2 else output

    expected = _plain(sd_pipeline, ["a cat"], [0], [(sd_pipeline.unet.mid_block, zero_second_call)])
    untouched = _plain(sd_pipeline, ["a cat"], [0])
    torch.testing.assert_close(latents, expected)
    assert not torch.allclose(latents, untouched)


def test_invokes_are_batched_and_see_their_own_guidance_rows(sd_pipeline):
    model = DiffusionModel(sd_pipeline)
    batch_sizes = []
    handle = sd_pipeline.unet.register_forward_hook(lambda m, i, o: batch_sizes.append(i[0].shape[0]))
    try:
        with model.generate(num_inference_steps=STEPS, output_type="latent") as tracer:
            with tracer.invoke("a cat", seed=0):
                cat_in = model.unet.input.save()
                cat = model.output.images.save()
            with tracer.invoke("a dog", seed=7):
                dog_in = model.unet.input.save()
                model.unet.mid_block.output = torch.zeros_like(model.unet.mid_block.output)  # step 0, dog only
                dog = model.output.images.save()
    finally:
        handle.remove()
    assert batch_sizes == [4] * STEPS  # one pipeline call: 2 prompts, doubled for guidance
    solo_inputs = []
    solo_cat = _plain(sd_pipeline, ["a cat"], [0], [(sd_pipeline.unet, lambda m, i, o: solo_inputs.append(i[0]))])
    first = []

    def zero_first(module, inputs, output):
        first.append(1)
        return torch.zeros_like(output) if len(first) == 1 else output

    solo_dog = _plain(sd_pipeline, ["a dog"], [7], [(sd_pipeline.unet.mid_block, zero_first)])
    assert cat_in.shape[0] == dog_in.shape[0] == 2  # unconditional and conditional row of its own prompt
    # Batched convolutions round differently from solo ones; guidance amplifies that a little.
    torch.testing.assert_close(cat_in, solo_inputs[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cat, solo_cat, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dog, solo_dog, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(dog, _plain(sd_pipeline, ["a dog"], [7]), atol=1e-2)  # the edit reached dog's rows


def test_several_images_per_prompt_keep_invoke_rows(sd_pipeline):
    model = DiffusionModel(sd_pipeline)
    with model.generate(num_inference_steps=1, num_images_per_prompt=2, output_type="latent") as tracer:
        with tracer.invoke("a cat", seed=0):
            cat_out = model.unet.output[0].save()
        with tracer.invoke("a dog", seed=3):
            dog = model.output.images.save()
    recorded = []
    handle = sd_pipeline.unet.register_forward_hook(lambda m, i, o: recorded.append(o[0]))
    try:
        sd_pipeline("a cat", num_inference_steps=1, num_images_per_prompt=2, generator=_generators([0, 1]),
                    output_type="latent")
        solo_dog = sd_pipeline("a dog", num_inference_steps=1, num_images_per_prompt=2,
                               generator=_generators([3, 4]), output_type="latent").images
    finally:
        handle.remove()
    assert cat_out.shape[0] == 4 and dog.shape[0] == 2
    torch.testing.assert_close(cat_out, recorded[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dog, solo_dog, atol=1e-5, rtol=1e-5)


def test_seed_reproduces_and_the_image_is_pil(sd_pipeline):
    import numpy
    from PIL import Image

    model = DiffusionModel(sd_pipeline)
    images = []
    for seed in (4, 4, 5):
        with model.generate("a dog", num_inference_steps=2, seed=seed):
            out = model.output.save()
        images.append(out.images[0])
    assert all(isinstance(image, Image.Image) for image in images)
    assert images[0].size == (16, 16)
    assert numpy.array_equal(numpy.asarray(images[0]), numpy.asarray(images[1]))
    assert not numpy.array_equal(numpy.asarray(images[0]), numpy.asarray(images[2]))


def test_trace_is_one_step_and_the_decode_is_read_as_its_first_call(sd_pipeline):
    model = DiffusionModel(sd_pipeline)
    calls = []
    handle = sd_pipeline.unet.register_forward_hook(lambda m, i, o: calls.append(1))
    try:
        with model.trace("a cat", seed=0):
            decoded_once = model.vae.decoder.output.save()
    finally:
        handle.remove()
    assert len(calls) == 1 and decoded_once.shape == (1, 3, 16, 16)
    with model.generate("a cat", num_inference_steps=STEPS, seed=0) as tracer:
        for step in tracer.iter[STEPS - 1]:
            last_noise = model.unet.output[0].save()
        decoded = model.vae.decoder.output.save()   # after the loop: its first (only) call again
    recorded = {}
    hooks = [
        (sd_pipeline.vae.decoder, lambda m, i, o: recorded.setdefault("decoded", o)),
        (sd_pipeline.unet, lambda m, i, o: recorded.__setitem__("noise", o[0])),
    ]
    handles = [module.register_forward_hook(hook) for module, hook in hooks]
    try:
        sd_pipeline("a cat", num_inference_steps=STEPS, generator=_generators([0]))
    finally:
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(decoded, recorded["decoded"])
    torch.testing.assert_close(last_noise, recorded["noise"])


def test_bad_input_is_named(sd_pipeline):
    model = DiffusionModel(sd_pipeline)
    with pytest.raises(NNsightError, match="takes prompts and seed=, not \\['guidance_scale'\\]"):
        with model.generate(num_inference_steps=1) as tracer:
            with tracer.invoke("a cat", guidance_scale=2.0):
                pass
    with pytest.raises(TypeError, match="prompt must be a string"):
        with model.generate(3, num_inference_steps=1):
            pass
    with pytest.raises(TypeError, match="DiffusionPipeline"):
        DiffusionModel(torch.nn.Linear(2, 2))


def test_loads_a_saved_pipeline_from_a_folder(sd_pipeline, tmp_path):
    sd_pipeline.save_pretrained(tmp_path)
    model = DiffusionModel(str(tmp_path), dispatch=True)  # 0.8.1 scripts pass dispatch=
    model.pipeline.set_progress_bar_config(disable=True)
    with model.generate("a cat", num_inference_steps=STEPS, seed=0, output_type="latent"):
        latents = model.output.images.save()
    torch.testing.assert_close(latents, _plain(sd_pipeline, ["a cat"], [0]))


def test_readme_example_runs(sd_pipeline, tmp_path, readme_example):
    from PIL import Image

    scope = readme_example(
        "Diffusion models", {'DiffusionModel("segmind/tiny-sd")': "DiffusionModel(pipeline)"},
        {"pipeline": sd_pipeline}, tmp_path,
    )
    assert isinstance(scope["image"], Image.Image)
    assert scope["last_noise"].shape == (2, 4, 8, 8) and scope["cat_noise"].shape == (2, 4, 8, 8)
    assert len(scope["dog"].images) == 1


PIXART = dict(height=16, width=16, max_sequence_length=8, use_resolution_binning=False, clean_caption=False,
              output_type="latent")


def test_a_transformer_denoiser_steps_and_batches(pixart_pipeline):
    model = DiffusionModel(pixart_pipeline)
    with model.generate(num_inference_steps=2, **PIXART) as tracer:
        with tracer.invoke("a cat", seed=0):
            cat_blocks = []
            for step in tracer.iter[:]:
                cat_blocks.append(model.transformer.transformer_blocks[1].output.save())
        with tracer.invoke("a dog", seed=1):
            dog = model.output.images.save()
    block = pixart_pipeline.transformer.transformer_blocks[1]
    recorded = []
    handle = block.register_forward_hook(lambda m, i, o: recorded.append(o))
    try:
        pixart_pipeline("a cat", num_inference_steps=2, generator=_generators([0]), **PIXART)
    finally:
        handle.remove()
    solo_dog = pixart_pipeline("a dog", num_inference_steps=2, generator=_generators([1]), **PIXART).images
    assert len(cat_blocks) == 2 and cat_blocks[0].shape[0] == 2  # its unconditional and conditional rows
    for ours, theirs in zip(cat_blocks, recorded):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dog, solo_dog, atol=1e-4, rtol=1e-4)


def test_each_invoke_gets_its_own_pil_images(sd_pipeline):
    import numpy

    model = DiffusionModel(sd_pipeline)
    with model.generate(num_inference_steps=2) as tracer:
        with tracer.invoke("a cat", seed=0):
            cat = model.output.save()
        with tracer.invoke(["a dog", "a cat"], seed=3):
            pair = tracer.result.save()
    solo = sd_pipeline(["a dog", "a cat"], num_inference_steps=2, generator=_generators([3, 4])).images
    assert len(cat.images) == 1 and len(pair.images) == 2
    for ours, theirs in zip(pair.images, solo):
        difference = numpy.abs(numpy.asarray(ours, dtype=int) - numpy.asarray(theirs, dtype=int))
        assert difference.max() <= 1  # batched float rounding may move a pixel by one level
