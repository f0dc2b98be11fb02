"""Shared tiny models. Random weights, built from configs: nothing is downloaded."""

import os
import pathlib

import pytest
import torch

torch.set_num_threads(1)

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


class TwoLayer(torch.nn.Module):
    """A module that calls ``shared`` twice per forward, for multi-call tests."""

    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(4, 8)
        self.shared = torch.nn.Linear(8, 8)
        self.out = torch.nn.Linear(8, 2)
        self.unused = torch.nn.Linear(8, 8)

    def forward(self, x):
        h = self.inp(x)
        h = self.shared(h)
        h = torch.relu(self.shared(h))
        return self.out(h)


@pytest.fixture
def seq():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 10), torch.nn.ReLU(), torch.nn.Linear(10, 2))


@pytest.fixture
def twolayer():
    torch.manual_seed(0)
    return TwoLayer()


def _gpt2(n_layer=2):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=n_layer, n_embd=32, n_head=4, vocab_size=50257, n_positions=64, attn_pdrop=0.0,
        embd_pdrop=0.0, resid_pdrop=0.0,
    )
    model = transformers.GPT2LMHeadModel(config)
    model.eval()
    return model


@pytest.fixture(scope="session")
def gpt2_module():
    return _gpt2()


@pytest.fixture
def gpt2(gpt2_module):
    return gpt2_module


def _block_hidden(output):
    """A decoder block's hidden states: a GPT-2 block returns a tuple under transformers 4.x, the tensor under 5.x."""
    return output[0] if isinstance(output, tuple) else output


@pytest.fixture(scope="session")
def block_hidden():
    """``block_hidden(model.transformer.h[0].output)``: the hidden states under either transformers line."""
    return _block_hidden


@pytest.fixture(scope="session")
def transformers_major():
    """4 or 5. Under 4.x GPT-2 blocks return tuples, so ``h[i].output[0]`` is the hidden states; under 5.x, batch row 0."""
    transformers = pytest.importorskip("transformers")
    return int(transformers.__version__.split(".")[0])


def _load_gpt2_tokenizer():
    transformers = pytest.importorskip("transformers")
    return transformers.GPT2TokenizerFast.from_pretrained(str(FIXTURES / "gpt2-tokenizer"))


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    """Shared by many tests, so set up once as for batched generation: left padding (what a
    tokenizer LanguageModel loads itself gets). Tests that change it use ``fresh_gpt2_tokenizer``."""
    tok = _load_gpt2_tokenizer()
    tok.padding_side = "left"
    return tok


@pytest.fixture
def fresh_gpt2_tokenizer():
    """A GPT-2 tokenizer of this test's own, as Hugging Face loads it (right padding, no pad token)."""
    return _load_gpt2_tokenizer()


@pytest.fixture(autouse=True)
def _no_leaked_hooks():
    """Every test must leave no nnsight hook on any module."""
    yield
    left = leaked_slots()
    assert not left, f"{len(left)} nnsight hook(s) left on modules"


def leaked_slots():
    """Every nnsight slot still sitting in some module's forward (found through the garbage collector)."""
    import gc

    from nnsight.tracing.interleaver import ModuleSlot

    return [o for o in gc.get_objects() if type(o) is ModuleSlot and o.users]


def _lora(base, folder, seed):
    """A random (non-identity) LoRA on GPT-2's attention and MLP projections, saved by peft."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(seed)
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, init_lora_weights=False,
        lora_dropout=0.0,
    )
    peft.get_peft_model(base, config).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def lora_dirs(tmp_path_factory):
    """Two different saved LoRA adapters for the tiny GPT-2 (``_gpt2()``)."""
    root = tmp_path_factory.mktemp("lora")
    return _lora(_gpt2(), root / "a", 1), _lora(_gpt2(), root / "b", 2)


@pytest.fixture
def fresh_gpt2():
    """A new tiny GPT-2 (same weights as ``gpt2_module``) for tests that change its modules."""
    return _gpt2()


def _clip_tokenizer_files(folder):
    """A tiny CLIP BPE tokenizer written offline: single letters, a few merges, the special tokens."""
    import json
    import string

    folder.mkdir(parents=True, exist_ok=True)
    tokens = ["<|startoftext|>", "<|endoftext|>", "!"] + list(string.ascii_lowercase)
    tokens += [c + "</w>" for c in string.ascii_lowercase] + ["ca", "cat</w>", "do", "dog</w>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\nc a\nca t</w>\nd o\ndo g</w>\n")
    return folder


@pytest.fixture(scope="session")
def sd_pipeline(tmp_path_factory):
    """A tiny random Stable Diffusion pipeline (UNet2DConditionModel, CLIP text encoder, VAE, DDIM)."""
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    folder = _clip_tokenizer_files(tmp_path_factory.mktemp("clip-tokenizer"))
    tokenizer = transformers.CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=8, pad_token="!"
    )
    torch.manual_seed(0)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=8, bos_token_id=0, eos_token_id=1, pad_token_id=2,
    ))
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
    )
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=32,
    )
    scheduler = diffusers.DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
        steps_offset=1,
    )
    pipeline = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    for module in (unet, vae, text_encoder):
        module.eval()
    return pipeline


def _tokenizer_with(tokens):
    """The fixture GPT-2 tokenizer plus ``tokens`` as special tokens (a fresh copy each time)."""
    transformers = pytest.importorskip("transformers")
    tok = transformers.GPT2TokenizerFast.from_pretrained(str(FIXTURES / "gpt2-tokenizer"))
    tok.add_tokens(list(tokens), special_tokens=True)
    tok.padding_side = "left"  # the tests batch prompts of different lengths and read the last tokens
    return tok


def _image_processor(name):
    """``transformers.<name>``, preferring its PIL variant (no torchvision needed)."""
    transformers = pytest.importorskip("transformers")
    return getattr(transformers, name + "Pil", None) or getattr(transformers, name)


@pytest.fixture(scope="session")
def tiny_llava():
    """``(model, processor)``: a random LLaVA (CLIP vision tower, 2-layer Llama) and its offline processor.

    16x16 images in 8x8 patches: each image is 4 ``<image>`` tokens.
    """
    transformers = pytest.importorskip("transformers")
    tok = _tokenizer_with(["<image>"])
    processor = transformers.LlavaProcessor(
        image_processor=_image_processor("CLIPImageProcessor")(
            size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}
        ),
        tokenizer=tok, patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )
    torch.manual_seed(0)
    config = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(
            hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=16,
            patch_size=8,
        ),
        text_config=transformers.LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=len(tok), max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0,
        ),
        image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="default",
        vision_feature_layer=-1, projector_hidden_act="gelu", image_seq_length=4,
    )
    model = transformers.LlavaForConditionalGeneration(config).eval()
    return model, processor


@pytest.fixture(scope="session")
def tiny_qwen2_vl():
    """``(model, processor)``: a random Qwen2-VL (2-block vision transformer, 2-layer LM) and its processor.

    56x56 images: 16 patches of 14x14, merged 2x2 into 4 ``<|image_pad|>`` tokens.
    """
    transformers = pytest.importorskip("transformers")
    names = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tok = _tokenizer_with(names)
    ids = {name: tok.convert_tokens_to_ids(name) for name in names}

    class Processor(transformers.Qwen2VLProcessor):
        # transformers 5.24 cannot check a missing video processor's class without torchvision.
        def check_argument_for_proper_class(self, name, value):
            return None if value is None else super().check_argument_for_proper_class(name, value)

    processor = Processor(
        image_processor=_image_processor("Qwen2VLImageProcessor")(
            min_pixels=56 * 56, max_pixels=56 * 56, patch_size=14, merge_size=2, temporal_patch_size=2
        ),
        tokenizer=tok, video_processor=None,
    )
    torch.manual_seed(0)
    config = transformers.Qwen2VLConfig(
        text_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=len(tok), max_position_embeddings=128, bos_token_id=0, eos_token_id=0,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]},
        ),
        vision_config=dict(
            depth=2, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=14, spatial_merge_size=2,
            temporal_patch_size=2, in_channels=3,
        ),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    model = transformers.Qwen2VLForConditionalGeneration(config).eval()
    return model, processor


def random_image(seed, size):
    """A PIL image of random pixels, ``size`` x ``size``."""
    import numpy
    from PIL import Image

    pixels = numpy.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=numpy.uint8)
    return Image.fromarray(pixels)


def run_readme_example(heading, replacements, scope, folder):
    """Run the first python block under README heading ``## <heading>``, with ``replacements`` applied.

    Each replacement must match, so an edited README cannot silently stop being tested. The
    block runs from a file (trace blocks are read from their source file); returns its globals.
    """
    import re
    import runpy

    text = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    for old, new in replacements.items():
        assert old in code, f"README section {heading!r} no longer contains {old!r}"
        code = code.replace(old, new)
    script = folder / "readme_example.py"
    script.write_text(code)
    return runpy.run_path(str(script), init_globals=scope)


@pytest.fixture(scope="session")
def pixart_pipeline():
    """A tiny random PixArt-alpha pipeline: a transformer denoiser (not a UNet), T5 text encoder."""
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    tok = _tokenizer_with([])
    tok.pad_token = tok.eos_token
    torch.manual_seed(0)
    text_encoder = transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=len(tok), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, pad_token_id=tok.pad_token_id,
    ))
    transformer = diffusers.PixArtTransformer2DModel(
        sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=4, caption_channels=32,
        in_channels=4, out_channels=8, cross_attention_dim=32, norm_type="ada_norm_single", norm_num_groups=32,
        use_additional_conditions=False,
    )
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=32,
    )
    pipeline = diffusers.PixArtAlphaPipeline(
        tokenizer=tok, text_encoder=text_encoder.eval(), vae=vae.eval(), transformer=transformer.eval(),
        scheduler=diffusers.DDIMScheduler(),
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


# Test files get these helpers as fixtures: `from conftest import ...` would reach whichever
# conftest module pytest imported last (tests/vllm has its own).


@pytest.fixture(scope="session")
def make_gpt2():
    """``make_gpt2()``: a new tiny GPT-2 with the same weights as ``gpt2_module``."""
    return _gpt2


@pytest.fixture(scope="session")
def make_image():
    """``make_image(seed, size)``: a PIL image of random pixels."""
    return random_image


@pytest.fixture(scope="session")
def readme_example():
    """``readme_example(heading, replacements, scope, folder)``: run that README block (see run_readme_example)."""
    return run_readme_example


def served_tiny_gpt2(tmp_path_factory, name, flags=(), keys=1, models=("tiny",), timeout=120):
    """A real ``nnsight serve`` subprocess serving tiny GPT-2 folders (one per name in ``models``).

    Yields the server with ``.keys`` (``keys`` API keys) and ``.key`` (the first); stops it after.
    For module-scoped fixtures: ``yield from served_tiny_gpt2(tmp_path_factory, "ray", ["--ray"])``.
    """
    from remote_support import create_key, make_tiny_gpt2, start_server

    root = tmp_path_factory.mktemp(name)
    specs = [f"{model}={make_tiny_gpt2(root / model)}" for model in models]
    data = root / "data"
    created = [create_key(data, f"client{i}") for i in range(keys)]
    server = start_server(specs, data, *flags, timeout=timeout)
    server.keys, server.key = created, created[0]
    try:
        yield server
    finally:
        server.stop()


def record_outputs(module, run):
    """Every output ``module`` produced while ``run()`` ran, seen by a plain forward hook."""
    seen = []
    handle = module.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    try:
        run()
    finally:
        handle.remove()
    return seen


@pytest.fixture
def recorded():
    """``recorded(module, run)``: the outputs a plain forward hook sees (the oracle for saved values)."""
    return record_outputs


def pytest_collection_modifyitems(config, items):
    """Against the Ray-mode server run only tests marked ``every_mode`` (a representative subset, to keep it short)."""
    kept, dropped = [], []
    for item in items:
        spec = getattr(item, "callspec", None)
        ray = spec is not None and spec.params.get("server_mode") == "ray"
        (dropped if ray and item.get_closest_marker("every_mode") is None else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


@pytest.fixture(scope="module", params=["workers", "ray"])
def server_mode(request):
    """How a module's server runs its models: worker processes here, or replicas on Ray (see ``ray_server``)."""
    if request.param == "ray":
        pytest.importorskip("ray")
    return request.param


@pytest.fixture(scope="session")
def ray_server(tmp_path_factory):
    """One ``nnsight serve --ray`` (local Ray, 127.0.0.1, 2 CPUs) shared by every module's Ray-mode tests.

    Serves the tiny GPT-2 as ``tiny-gpt2`` with keys ``alice`` and ``bob`` (``.keys``), its folder as ``.folder``,
    and the limits the hostile suite expects (2 MB bodies, 1 MB tensors, 4 jobs per key).
    """
    from remote_support import create_key, make_tiny_gpt2, start_server

    root = tmp_path_factory.mktemp("ray-mode")
    folder = make_tiny_gpt2(root / "tiny")
    data = root / "data"
    keys = {name: create_key(data, name) for name in ("alice", "bob")}
    server = start_server([f"tiny-gpt2={folder}"], data, "--ray", "--ray-cpus", "2", "--job-timeout", "10",
                          "--memory-mb", "6000", "--max-body-mb", "2", "--max-tensor-mb", "1", "--max-concurrent", "4",
                          "--rate-limit", "1000", timeout=240)
    server.keys, server.folder = keys, folder
    try:
        yield server
    finally:
        server.stop()
