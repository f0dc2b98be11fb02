"""A corpus of legitimate research blocks, each written once and run locally and remotely.

Each entry is ``def block_<name>(model, remote, torch)`` that runs one ``with`` block with
``remote=remote`` and returns the saved values as a dict. The tests compare the values of
``remote=False`` (the oracle) with ``remote="local"`` (the whole remote path in-process)
and with a real server. Patterns from the public docs: steering, activation patching,
attribution patching, logit lens, SAE on activations, per-head attention, ablation,
multi-prompt comparison, plus ordinary Python (classes, closures, comprehensions, ...).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch

PROMPT = "The Eiffel Tower is in the city of"
SCALE = 0.5


def shrink(model, layers):
    for i in layers:
        model.transformer.h[i].output = model.transformer.h[i].output * SCALE


def _norm(x):
    return x / x.norm(dim=-1, keepdim=True)


def top_k_ids(logits, k=3):
    _, ids = logits[0, -1].topk(k)
    return ids


def fact(n):
    return 1 if n <= 1 else n * fact(n - 1)


def is_even(n):
    return True if n == 0 else is_odd(n - 1)


def is_odd(n):
    return False if n == 0 else is_even(n - 1)


async def scaled_async(t, k: float = SCALE):
    return await plain_async(t) * k


async def plain_async(t):
    return t + 1


async def rows_async(t):
    for row in t[0]:
        yield row.sum()


async def sum_rows_async(t):
    return sum([s async for s in rows_async(t)])


def drive(coroutine):
    """Remote code has no event loop: a coroutine that never suspends is run by ``send(None)``."""
    try:
        coroutine.send(None)
    except StopIteration as stop:
        return stop.value
    raise RuntimeError("the coroutine suspended")


def block_async_function_driven_by_send(model, remote, torch):
    with model.trace(PROMPT, remote=remote):
        out = drive(scaled_async(model.transformer.h[0].output)).save()
    return {"out": out}


def block_async_generator_in_async_comprehension(model, remote, torch):
    with model.trace(PROMPT, remote=remote):
        coroutine = sum_rows_async(model.transformer.h[1].output)
        try:
            coroutine.send(None)
        except StopIteration as stop:
            total = stop.value.save()
    return {"total": total}


def block_annotated_functions(model, remote, torch):
    import annotated_helpers as a

    with model.trace(PROMPT, remote=remote):
        out = a.annotated(model.transformer.h[0].output, 3).save()
        other = a.unsendable(model.transformer.h[1].output, 2).save()
    return {"out": out, "other": other}


def block_steer_last_token(model, remote, torch):
    direction = torch.ones(32)
    coef = 0.1
    with model.trace(PROMPT, remote=remote):
        model.transformer.h[1].output[:, -1, :] += direction * coef
        out = model.lm_head.output.save()
    return {"out": out}


def block_assign_output_tensor(model, remote, torch):
    with model.trace(PROMPT, remote=remote):
        model.transformer.h[0].output = model.transformer.h[0].output * 2
        out = model.lm_head.output.save()
    return {"out": out}


def block_assign_output_scalar(model, remote, torch):
    with model.trace(PROMPT, remote=remote):
        model.transformer.h[1].mlp.output = 0
        out = model.lm_head.output.save()
    return {"out": out}


def block_assign_input(model, remote, torch):
    with model.trace(PROMPT, remote=remote):
        model.transformer.h[1].input = model.transformer.h[1].input * 0.5
        out = model.lm_head.output.save()
    return {"out": out}


def block_assign_inputs(model, remote, torch):
    with model.trace(PROMPT, remote=remote):
        args, kwargs = model.transformer.h[1].inputs
        model.transformer.h[1].inputs = ((args[0] + 1,) + tuple(args[1:]), kwargs)
        out = model.lm_head.output.save()
    return {"out": out}


def block_assign_tuple_output(model, remote, torch):
    with model.trace(PROMPT, remote=remote):
        attn = model.transformer.h[0].attn.output
        model.transformer.h[0].attn.output = (attn[0] * 0,) + tuple(attn[1:])
        out = model.lm_head.output.save()
    return {"out": out}


def block_inplace_slice_zero(model, remote, torch):
    with model.trace(PROMPT, remote=remote):
        model.transformer.h[0].output[:] = 0
        out = model.lm_head.output.save()
    return {"out": out}


def block_inplace_index_mul(model, remote, torch):
    with model.trace(PROMPT, remote=remote):
        x = model.transformer.h[0].output.clone()
        for i in range(2):
            x[0, i] *= 2
        saved = x.save()
    return {"saved": saved}


def block_attribute_augassign(model, remote, torch):
    with model.trace(PROMPT, remote=remote):
        class Acc:
            def __init__(self):
                self.total = 0

        acts = Acc()
        for layer in model.transformer.h:
            acts.total += layer.output.sum()
        total = acts.total.save()
    return {"total": total}


def block_underscore_loop(model, remote, torch):
    with model.trace(PROMPT, remote=remote):
        hs = []
        for _ in range(2):
            hs.append(model.transformer.h[0].output)
        both = (hs[0] + hs[1]).save()
    return {"both": both}


def block_underscore_unpack(model, remote, torch):
    with model.trace(PROMPT, remote=remote):
        _, top = model.lm_head.output[0, -1].topk(5)
        top = top.save()
    return {"top": top}


def block_underscore_helper(model, remote, torch):
    with model.trace(PROMPT, remote=remote):
        normed = _norm(model.transformer.h[1].output).save()
    return {"normed": normed}


def block_helper_writes_envoys(model, remote, torch):
    with model.trace(PROMPT, remote=remote):
        shrink(model, [0, 1])
        out = model.lm_head.output.save()
    return {"out": out}


def block_helper_defined_in_block_writes(model, remote, torch):
    with model.trace(PROMPT, remote=remote):
        def zero_mlp(m, i):
            m.transformer.h[i].mlp.output = m.transformer.h[i].mlp.output * 0

        zero_mlp(model, 1)
        out = model.lm_head.output.save()
    return {"out": out}


def block_class_sae(model, remote, torch):
    torch.manual_seed(1)
    w_enc = torch.randn(32, 64) * 0.1
    w_dec = torch.randn(64, 32) * 0.1
    with model.trace(PROMPT, remote=remote):
        class SAE(torch.nn.Module):
            def __init__(self, enc, dec):
                super().__init__()
                self.enc = torch.nn.Parameter(enc)
                self.dec = torch.nn.Parameter(dec)

            def forward(self, x):
                return torch.relu(x @ self.enc) @ self.dec

        sae = SAE(w_enc, w_dec)
        with torch.no_grad():
            recon = sae(model.transformer.h[1].output).save()
    return {"recon": recon}


def block_class_dataclass(model, remote, torch):
    with model.trace(PROMPT, remote=remote):
        @dataclasses.dataclass
        class Result:
            layer: int
            norm: float = 0.0
            tags: list = dataclasses.field(default_factory=list)

        results = []
        for i, layer in enumerate(model.transformer.h):
            r = Result(i, float(0))
            r.tags.append("h")
            results.append(layer.output.norm())
        norms = torch.stack(results).save()
    return {"norms": norms}


def block_lambda_and_comprehension(model, remote, torch):
    with model.trace(PROMPT, remote=remote):
        f = lambda t: t.mean(dim=-1)  # noqa: E731
        means = [f(layer.output) for layer in model.transformer.h]
        stacked = torch.stack(means).save()
        squares = {i: i * i for i in range(4)}
        total = torch.tensor(sum(squares.values())).save()
    return {"stacked": stacked, "total": total}


def block_nested_recursive_functions(model, remote, torch):
    with model.trace(PROMPT, remote=remote):
        def depth_sum(t, n):
            if n == 0:
                return t
            return depth_sum(t * 0.5, n - 1) + t

        value = depth_sum(model.transformer.h[0].output, 3).save()
    return {"value": value}


def block_closure_over_local(model, remote, torch):
    scale = 3.0
    with model.trace(PROMPT, remote=remote):
        def scaled(t):
            return t * scale

        value = scaled(model.transformer.h[0].output).save()
    return {"value": value}


def block_functools_partial(model, remote, torch):
    with model.trace(PROMPT, remote=remote):
        topk3 = functools.partial(torch.topk, k=3)
        values = topk3(model.lm_head.output[0, -1]).values.save()
    return {"values": values}


def block_fstring_and_print(model, remote, torch):
    with model.trace(PROMPT, remote=remote):
        shape = model.transformer.h[0].output.shape
        label = f"shape={tuple(shape)} layers={len(model.transformer.h)}"
        n = torch.tensor(len(label)).save()
    return {"n": n}


def block_try_except(model, remote, torch):
    with model.trace(PROMPT, remote=remote):
        hs = model.transformer.h[0].output
        try:
            bad = torch.ones(2, 3) @ torch.ones(2, 3)
        except RuntimeError:
            bad = torch.zeros(1)
        ok = (bad + hs.sum()).save()
    return {"ok": ok}


def block_assert(model, remote, torch):
    with model.trace(PROMPT, remote=remote):
        hs = model.transformer.h[0].output
        assert hs.dim() == 3, "hidden states are [batch, seq, dim]"
        hs = hs.save()
    return {"hs": hs}


def block_no_grad(model, remote, torch):
    with model.trace(PROMPT, remote=remote):
        with torch.no_grad():
            hs = (model.transformer.h[1].output * 2).save()
    return {"hs": hs}


def block_logit_lens(model, remote, torch):
    with model.trace(PROMPT, remote=remote):
        lens = []
        for layer in model.transformer.h:
            lens.append(model.lm_head(model.transformer.ln_f(layer.output)).argmax(dim=-1))
        lens = torch.stack(lens).save()
    return {"lens": lens}


def block_activation_patching(model, remote, torch):
    with model.trace(remote=remote) as tracer:
        with tracer.invoke("The Eiffel Tower is in"):
            clean = model.transformer.h[0].output[:, -1, :]
        with tracer.invoke("The Colosseum is in"):
            model.transformer.h[0].output[:, -1, :] = clean
            patched = model.lm_head.output.save()
    return {"patched": patched}


def block_multi_prompt(model, remote, torch):
    with model.trace(remote=remote) as tracer:
        outs = []
        for prompt in ["Hello world", "Goodbye world"]:
            with tracer.invoke(prompt):
                outs.append(model.lm_head.output[:, -1].save())
    return {"a": outs[0], "b": outs[1]}


def block_ablation_heads(model, remote, torch):
    with model.trace(PROMPT, remote=remote):
        attn = model.transformer.h[0].attn.c_proj.input
        heads = attn.view(attn.shape[0], attn.shape[1], 4, 8).clone()
        heads[:, :, 1, :] = 0
        model.transformer.h[0].attn.c_proj.input = heads.view(attn.shape)
        out = model.lm_head.output.save()
    return {"out": out}


def block_per_head_norms(model, remote, torch):
    with model.trace(PROMPT, remote=remote):
        attn = model.transformer.h[1].attn.c_proj.input
        per_head = attn.view(attn.shape[0], attn.shape[1], 4, 8).norm(dim=-1).save()
    return {"per_head": per_head}


def block_attribution_patching(model, remote, torch):
    with model.trace(PROMPT, remote=remote):
        hs = model.transformer.h[0].output
        hs.requires_grad_(True)
        logits = model.lm_head.output
        loss = logits[0, -1].max()
        with loss.backward():
            grad = hs.grad.save()
    return {"grad": grad}


def block_gradient_on_output(model, remote, torch):
    with model.trace(PROMPT, remote=remote):
        hs = model.transformer.h[1].output
        loss = model.lm_head.output.sum()
        with loss.backward():
            g = hs.grad.save()
    return {"g": g}


def block_module_level_helper_topk(model, remote, torch):
    with model.trace(PROMPT, remote=remote):
        ids = top_k_ids(model.lm_head.output).save()
    return {"ids": ids}


def block_recursive_module_helper(model, remote, torch):
    with model.trace(PROMPT, remote=remote):
        v = (model.transformer.h[0].output * fact(4)).save()
    return {"v": v}


def block_mutual_recursion(model, remote, torch):
    with model.trace(PROMPT, remote=remote):
        flag = torch.tensor(is_even(6)).save()
        hs = model.transformer.h[0].output.save()
    return {"flag": flag, "hs": hs}


def block_math_module(model, remote, torch):
    with model.trace(PROMPT, remote=remote):
        scaled = (model.transformer.h[0].output / math.sqrt(32)).save()
    return {"scaled": scaled}


def block_cache(model, remote, torch):
    with model.trace(PROMPT, remote=remote) as tracer:
        cache = tracer.cache()
    return {"h0": cache["model.transformer.h.0"].output, "lm": cache["model.lm_head"].output}


def block_source_read(model, remote, torch):
    with model.trace(PROMPT, remote=remote):
        value = model.transformer.h[0].attn.source.self_c_proj_0.output.save()
    return {"value": value}


def block_enumerate_zip(model, remote, torch):
    with model.trace(PROMPT, remote=remote):
        pairs = []
        for i, (a, b) in enumerate(zip(model.transformer.h, ["x", "y"])):
            pairs.append(a.output[:, i].sum())
        pairs = torch.stack(pairs).save()
    return {"pairs": pairs}


def block_while_loop(model, remote, torch):
    with model.trace(PROMPT, remote=remote):
        hs = model.transformer.h[0].output
        n = 0
        while n < 3:
            hs = hs * 0.9
            n += 1
        hs = hs.save()
    return {"hs": hs}


def block_dict_of_saves(model, remote, torch):
    with model.trace(PROMPT, remote=remote):
        acts = {f"layer{i}": layer.output.save() for i, layer in enumerate(model.transformer.h)}
    return {"acts": acts}


def block_list_of_saves(model, remote, torch):
    with model.trace(PROMPT, remote=remote):
        acts = [layer.mlp.output.save() for layer in model.transformer.h]
    return {"acts": acts}


def block_walrus_and_ternary(model, remote, torch):
    with model.trace(PROMPT, remote=remote):
        big = (n := model.transformer.h[0].output.norm()) > 0
        value = (n if big else -n).save()
    return {"value": value}


def block_generator_function(model, remote, torch):
    with model.trace(PROMPT, remote=remote):
        def layers_out():
            for layer in model.transformer.h:
                yield layer.output

        total = sum(o.sum() for o in layers_out()).save()
    return {"total": total}


def block_star_args(model, remote, torch):
    with model.trace(PROMPT, remote=remote):
        def combine(*ts, weight=1.0):
            return sum(ts) * weight

        value = combine(model.transformer.h[0].output, model.transformer.h[1].output, weight=0.5).save()
    return {"value": value}


def block_kwargs_dict(model, remote, torch):
    opts = {"dim": -1, "keepdim": True}
    with model.trace(PROMPT, remote=remote):
        value = model.transformer.h[1].output.mean(**opts).save()
    return {"value": value}


def block_class_with_dunders(model, remote, torch):
    with model.trace(PROMPT, remote=remote):
        class Stack:
            def __init__(self):
                self._items = []

            def push(self, x):
                self._items.append(x)

            def __len__(self):
                return len(self._items)

            def __getitem__(self, i):
                return self._items[i]

        stack = Stack()
        for layer in model.transformer.h:
            stack.push(layer.output.mean())
        last = (stack[len(stack) - 1] * len(stack)).save()
    return {"last": last}


def block_class_inheritance(model, remote, torch):
    with model.trace(PROMPT, remote=remote):
        class Base:
            scale = 2.0

            def apply(self, x):
                return x * self.scale

        class Half(Base):
            scale = 0.5

        value = Half().apply(model.transformer.h[0].output).save()
    return {"value": value}


def block_probe_linear(model, remote, torch):
    torch.manual_seed(2)
    probe = torch.nn.Linear(32, 2)
    w, b = probe.weight.detach().clone(), probe.bias.detach().clone()
    with model.trace(PROMPT, remote=remote):
        lin = torch.nn.Linear(32, 2)
        with torch.no_grad():
            lin.weight.copy_(w)
            lin.bias.copy_(b)
            logits = lin(model.transformer.h[1].output[:, -1]).save()
    return {"logits": logits}


def block_softmax_probs(model, remote, torch):
    with model.trace(PROMPT, remote=remote):
        probs = torch.nn.functional.softmax(model.lm_head.output[0, -1], dim=-1)
        top = probs.topk(3).indices.save()
    return {"top": top}


def block_ln_final_norm(model, remote, torch):
    with model.trace(PROMPT, remote=remote):
        ln = model.transformer.ln_f.output.save()
        mean = ln.mean().save()
    return {"ln": ln, "mean": mean}


def block_barrier(model, remote, torch):
    with model.trace(remote=remote) as tracer:
        barrier = tracer.barrier(2)
        with tracer.invoke("Hello world"):
            emb = model.transformer.wte.output
            barrier()
        with tracer.invoke("Goodbye world"):
            barrier()
            model.transformer.wte.output = emb
            out = model.lm_head.output.save()
    return {"out": out}


def block_stop_early(model, remote, torch):
    with model.trace(PROMPT, remote=remote) as tracer:
        hs = model.transformer.h[0].output.save()
        tracer.stop()
    return {"hs": hs}


def block_tuple_unpack_shape(model, remote, torch):
    with model.trace(PROMPT, remote=remote):
        b, s, d = model.transformer.h[0].output.shape
        size = torch.tensor([b, s, d]).save()
    return {"size": size}


def block_next_step_generate(model, remote, torch):
    with model.generate(PROMPT, max_new_tokens=2, do_sample=False, remote=remote) as tracer:
        steps = []
        for step in tracer.iter[:]:
            steps.append(model.lm_head.output[0, -1].argmax())
        steps = torch.stack(steps).save()
    return {"steps": steps}


def block_sorted_with_key(model, remote, torch):
    with model.trace(PROMPT, remote=remote):
        norms = [(i, float(0)) for i in range(3)]
        order = sorted(norms, key=lambda p: -p[0])
        firsts = torch.tensor([p[0] for p in order]).save()
        hs = model.transformer.h[0].output.save()
    return {"firsts": firsts, "hs": hs}


def block_aug_on_local_tensor(model, remote, torch):
    with model.trace(PROMPT, remote=remote):
        acc = torch.zeros(1, 32)
        for layer in model.transformer.h:
            acc += layer.output[:, -1]
        acc = acc.save()
    return {"acc": acc}


def block_steer_with_helper_scalar(model, remote, torch):
    with model.trace(PROMPT, remote=remote):
        model.transformer.h[0].output[:, :, :4] *= 3
        out = model.lm_head.output.save()
    return {"out": out}




def block_source_write(model, remote, torch):
    with model.trace(PROMPT, remote=remote):
        proj = model.transformer.h[0].attn.source.self_c_proj_0
        proj.output = proj.output * 0
        out = model.lm_head.output.save()
    return {"out": out}


def block_cache_with_inputs(model, remote, torch):
    with model.trace(PROMPT, remote=remote) as tracer:
        cache = tracer.cache(modules=[model.transformer.h[0].mlp], include_inputs=True)
    return {"out": cache["transformer.h.0.mlp"].output, "args": cache["transformer.h.0.mlp"].inputs[0][0]}


BLOCKS = {name[len("block_"):]: fn for name, fn in sorted(globals().items()) if name.startswith("block_")}
