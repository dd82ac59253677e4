"""caiflow.cpu_kernels: packed linear layers and decode attention on the CPU, and the engine on them."""

from __future__ import annotations

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import AttentionInterface

from caiflow import cpu_kernels
from caiflow.config import ModelConfig
from caiflow.cpu_kernels import ATTENTION, decode_attention, packed_linears, unsupported
from caiflow.cpu_kernels import cpu_kernels as kernels_context
from caiflow.decoding import ContinuousDecoder, prefill_groups
from caiflow.generation import GenerationEngine, Sampling, engine_options
from caiflow.step_config import GenerationConfig

SAMPLED = Sampling(max_new_tokens=8, temperature=0.9)
PROMPTS = [
    "Hello there.",
    "Tell me a long story about a dragon who guards a library full of ancient books and maps.",
    "Why?",
    "What is two plus two? Please explain your reasoning step by step, slowly.",
    "Name a colour.",
    "Hi",
]
SEEDS = [3, 1, 4, 1, 5, 9]


def switched(model) -> list[str]:
    """Names of the linear layers that carry their own forward (the packed one)."""
    return [n for n, m in model.named_modules() if "forward" in m.__dict__]


# ---------------------------------------------------------------- packed linear layers


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("bias", [True, False])
def test_a_packed_layer_computes_torchs_product_and_is_put_back(dtype, tol, bias):
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(48, 80, bias=bias)).to(dtype).eval()
    x = torch.randn(3, 5, 48, dtype=dtype)
    with torch.no_grad():
        want = layer(x)
        cache: dict = {}
        with packed_linears(layer, cache) as n:
            assert n == 1 and switched(layer) == ["0"]
            got = layer(x)
        assert len(cache) == 1  # the product ran on the packed weight
    assert switched(layer) == []
    assert got.shape == want.shape and got.dtype == dtype
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


def test_the_packed_weight_follows_in_place_writes_and_swapped_weights():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 16)).eval()
    layer = model[0]
    x = torch.randn(4, 32)
    cache: dict = {}

    def packed_output():
        with torch.no_grad(), packed_linears(model, cache):
            return model(x)

    def check():
        torch.testing.assert_close(packed_output(), torch.nn.functional.linear(x, layer.weight, layer.bias))

    check()
    first = cache[id(layer)][0]
    check()
    assert cache[id(layer)] == [first]  # packed once, reused
    with torch.no_grad():
        layer.weight.mul_(-2.0)  # an optimiser step writes in place
    check()
    assert first not in cache[id(layer)]
    own = layer.weight
    for scale in (3.0, 0.5):  # RL swaps in merged copies: each a new tensor, the last one freed
        layer.weight = torch.nn.Parameter(torch.randn(16, 32) * scale, requires_grad=False)
        check()
    layer.weight = own  # the layer's own weight back after sampling
    check()
    assert len(cache[id(layer)]) == cpu_kernels.KEEP_PER_LAYER


def test_a_layer_in_training_never_multiplies_by_a_stale_packing_after_a_fused_optimiser_step():
    """torch's fused AdamW (the Trainer's default, adamw_torch_fused) writes the weights in place without
    bumping their version, which the cache checks: a no-grad pass during training (TRL's old
    log-probabilities) must still multiply by the weights as they are now."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 16))
    layer = model[0]
    x = torch.randn(4, 32)
    optimiser = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    with packed_linears(model, {}):
        with torch.no_grad():
            before = model(x)
        model(x).square().sum().backward()
        version = layer.weight._version
        optimiser.step()
        assert layer.weight._version == version  # the write the cache cannot see
        with torch.no_grad():
            after = model(x)
    assert (after - before).abs().max() > 1e-2  # the step moved the output
    torch.testing.assert_close(after, torch.nn.functional.linear(x, layer.weight, layer.bias))


def test_bfloat16_products_round_a_float32_layers_input_and_weight_inside_the_context_only():
    """cpu_kernels(products=bfloat16): a float32 layer multiplies as autocast would (input, weight and
    bias rounded to bfloat16, the output returned in float32), also where an enclosing context already
    switched the layer (RL scores rewards inside the trainer's context); a recorded gradient and the
    layer outside the context keep float32."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 48)).eval()
    layer = model[0]
    x = torch.randn(5, 64)
    low = torch.nn.functional.linear(x.bfloat16(), layer.weight.bfloat16(), layer.bias.bfloat16()).float()
    full = torch.nn.functional.linear(x, layer.weight, layer.bias)
    assert (low - full).abs().max() > 1e-3  # the two precisions can be told apart
    cache: dict = {}
    with torch.no_grad():
        with kernels_context(model, cache, products=torch.bfloat16):
            got = model(x)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, low, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(x), full)  # outside: float32 again
        with packed_linears(model, cache):  # the trainer's context around the scorer's
            with kernels_context(model, cache, products=torch.bfloat16):
                torch.testing.assert_close(model(x), low, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(model(x), full, atol=1e-5, rtol=1e-5)
    x.requires_grad_(True)
    with kernels_context(model, cache, products=torch.bfloat16):
        torch.testing.assert_close(model(x), full, atol=1e-5, rtol=1e-5)  # training's products stay


def test_a_layer_that_trains_runs_torchs_product():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4))
    x = torch.randn(2, 8)
    model(x).square().sum().backward()
    want = model[0].weight.grad.clone()
    model.zero_grad()
    cache: dict = {}
    with packed_linears(model, cache):
        model(x).square().sum().backward()
        with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast chooses the dtype: torch's product
            assert model(x).dtype == torch.bfloat16
    assert cache == {}
    torch.testing.assert_close(model[0].weight.grad, want)


def test_a_frozen_layer_passes_the_gradient_through_packed_weights():
    """LoRA's layout: a frozen base layer between trained ones; the trained ones' gradients are torch's."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.Linear(40, 56), torch.nn.Linear(56, 8))
    model[1].requires_grad_(False)
    x = torch.randn(3, 7, 24)

    def grads():
        model.zero_grad()
        model(x).tanh().sum().backward()
        return [p.grad.clone() for p in model.parameters() if p.requires_grad]

    want = grads()
    cache: dict = {}
    with packed_linears(model, cache):
        got = grads()
    assert list(cache) == [id(model[1])] and cache[id(model[1])][0]._transposed is not None
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)
    with torch.no_grad():  # the check can fail: a changed frozen weight changes the gradients
        model[1].weight.mul_(1.5)
    with packed_linears(model, cache):
        moved = grads()
    assert not torch.allclose(moved[0], want[0], atol=1e-3)


def test_what_cannot_be_packed_is_left_alone():
    half = torch.nn.Sequential(torch.nn.Linear(8, 4)).half()
    assert "float16" in unsupported(half)
    with packed_linears(half) as n:
        assert n == 0 and switched(half) == []
    assert "meta" in unsupported(torch.nn.Linear(4, 4, device="meta"))
    assert unsupported(torch.nn.Sequential()) == "the model has no parameters"

    class Own(torch.nn.Linear):  # a subclass (a quantised layer) keeps its own forward
        pass

    hooked = torch.nn.Linear(4, 4)
    hooked.forward = hooked.forward  # what accelerate's hooks leave on a module
    model = torch.nn.Sequential(Own(4, 4), hooked, torch.nn.Linear(4, 4))
    with packed_linears(model) as n:
        assert n == 1 and switched(model) == ["1", "2"]
    assert switched(model) == ["1"]


# ---------------------------------------------------------------- decode attention


class _Module:
    num_key_value_groups = 3
    is_causal = True


@pytest.mark.parametrize("width", [1, 7, 70])
def test_decode_attention_equals_sdpa(width):
    torch.manual_seed(width)
    rows, kv_heads, dim = 5, 2, 16
    q = torch.randn(rows, kv_heads * 3, 1, dim)
    # the cache's filled columns: a view of a wider buffer, as caiflow.kv_cache returns them
    k = torch.randn(rows, kv_heads, width + 9, dim)[:, :, :width]
    v = torch.randn(rows, kv_heads, width + 9, dim)[:, :, :width]
    mask = torch.ones(rows, 1, 1, width, dtype=torch.bool)
    mask[1, ..., : width // 2] = False  # left padding
    mask[..., -1] = True
    for m in (mask, None):
        want, _ = sdpa_attention_forward(_Module(), q, k, v, m, scaling=0.3)
        got, weights = decode_attention(_Module(), q, k, v, m, scaling=0.3)
        assert weights is None and got.shape == want.shape == (rows, 1, kv_heads * 3, dim)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_masked_prompt_tokens_read_the_key_value_heads_without_copies(monkeypatch):
    """Several query tokens under a padding mask (prefill, scoring), no gradient: SDPA with enable_gqa,
    the same output as transformers' repeat_kv path; with a gradient recorded, the training products."""
    torch.manual_seed(0)
    rows, kv_heads, dim, q_len, width = 3, 2, 16, 5, 9
    q = torch.randn(rows, kv_heads * 3, q_len, dim)
    k, v = torch.randn(rows, kv_heads, width, dim), torch.randn(rows, kv_heads, width, dim)
    mask = torch.ones(rows, 1, q_len, width, dtype=torch.bool).tril(diagonal=width - q_len)
    mask[0, ..., :3] = False  # left padding
    want, _ = sdpa_attention_forward(_Module(), q, k, v, mask, scaling=0.25)
    with torch.no_grad():
        got, _ = decode_attention(_Module(), q, k, v, mask, scaling=0.25)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    calls = []
    monkeypatch.setattr(
        cpu_kernels, "sdpa_attention_forward", lambda *a, **kw: calls.append(1) or ("sdpa", None)
    )
    got, _ = decode_attention(_Module(), q.requires_grad_(), k, v, mask, scaling=0.25)
    assert calls == [] and got.requires_grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_attention_equals_sdpa_and_its_gradients(dtype):
    """Several query tokens with a gradient to record (training): the same output and input gradients as
    transformers' SDPA path, under a padding mask and causal without one; a padding row that sees no
    column stays finite, so it cannot poison the rows that read it."""
    torch.manual_seed(0)
    rows, kv_heads, dim, tokens = 3, 2, 16, 7
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    base = [torch.randn(rows, h, tokens, dim) for h in (kv_heads * 3, kv_heads, kv_heads)]
    padded = torch.ones(rows, 1, tokens, tokens, dtype=torch.bool).tril()
    padded[0, ..., :3] = False  # left padding: row 0's first three tokens see nothing
    valid = torch.ones(rows, tokens, dtype=torch.bool)
    valid[0, :3] = False
    for mask in (padded, None):
        outputs, grads = [], []
        for attend in (sdpa_attention_forward, decode_attention):
            q, k, v = (t.to(dtype).requires_grad_(True) for t in base)
            out, _ = attend(_Module(), q, k, v, mask, scaling=0.25)
            (out.float()[valid] ** 2).sum().backward()
            outputs.append(out.float()[valid])
            grads.append([t.grad.float() for t in (q, k, v)])
        assert out.dtype == dtype and out.shape == (rows, tokens, kv_heads * 3, dim)
        assert torch.isfinite(out.float()).all()
        torch.testing.assert_close(outputs[1], outputs[0], **tol)
        for got, want in zip(grads[1], grads[0]):
            torch.testing.assert_close(got, want, **tol)


def test_decode_attention_leaves_prefill_and_extras_to_sdpa(monkeypatch):
    calls = []
    monkeypatch.setattr(
        cpu_kernels, "sdpa_attention_forward", lambda *a, **k: calls.append(k) or ("sdpa", None)
    )
    q, k = torch.randn(2, 6, 4, 8), torch.randn(2, 2, 4, 8)
    assert decode_attention(_Module(), q, k, k, None)[0] == "sdpa"  # four query tokens
    one = q[:, :, :1]
    assert decode_attention(_Module(), one, k, k, None, dropout=0.1)[0] == "sdpa"
    assert decode_attention(_Module(), one, k, k, torch.zeros(2, 1, 1, 4))[0] == "sdpa"  # a float mask
    assert decode_attention(_Module(), one, k, k, None, s_aux=torch.zeros(6))[0] == "sdpa"
    assert len(calls) == 4
    assert decode_attention(_Module(), one, k, k, None)[0].shape == (2, 1, 6, 8)
    assert len(calls) == 4


# ---------------------------------------------------------------- the engine on them


def test_the_engine_runs_on_the_kernels_and_writes_the_same_tokens(tiny_model, monkeypatch):
    model, tokenizer, _ = tiny_model
    decode_steps = []

    def counted(module, query, *args, **kwargs):
        decode_steps.append(query.shape[2] == 1)
        return decode_attention(module, query, *args, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, ATTENTION, counted)
    fast = GenerationEngine(model, tokenizer, batch_size=3)
    plain = GenerationEngine(model, tokenizer, batch_size=3, fast_cpu=False)
    assert fast.fast_cpu and not plain.fast_cpu
    for sampling in (SAMPLED, Sampling(max_new_tokens=8, temperature=0)):
        assert fast.generate_ids(PROMPTS, sampling, SEEDS) == plain.generate_ids(PROMPTS, sampling, SEEDS)
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    assert len(fast._packed) == len(linears) and plain._packed == {}
    assert any(decode_steps)
    steps = len(decode_steps)
    probs = fast.score_choices(PROMPTS, [" yes", " no"])
    torch.testing.assert_close(
        torch.from_numpy(probs),
        torch.from_numpy(plain.score_choices(PROMPTS, [" yes", " no"])),
        atol=1e-5,
        rtol=0,
    )
    assert len(decode_steps) >= steps  # scoring runs a few tokens a row: through SDPA or the products
    # outside its calls the model is what it was
    assert switched(model) == [] and model.config._attn_implementation == "sdpa"


def test_model_cpu_kernels_false_reaches_the_engine(tiny_model):
    model, tokenizer, _ = tiny_model
    gen = GenerationConfig()
    off = GenerationEngine(model, tokenizer, **engine_options(gen, ModelConfig(cpu_kernels=False)))
    on = GenerationEngine(model, tokenizer, **engine_options(gen, ModelConfig()))
    assert not off.fast_cpu and on.fast_cpu


def test_the_context_is_reentrant_and_restores_attention(tiny_model):
    model = tiny_model[0]
    with kernels_context(model) as outer:
        assert outer > 0 and model.config._attn_implementation == ATTENTION
        with kernels_context(model) as inner:
            assert inner == 0  # every layer already switched by the outer context
        assert model.config._attn_implementation == ATTENTION and switched(model)
    assert model.config._attn_implementation == "sdpa" and switched(model) == []


# ---------------------------------------------------------------- prefill groups


def test_prefill_groups_keep_one_long_prompt_from_padding_the_rest():
    lengths = [30, 4, 5, 200, 6, 28, 5, 31]
    groups = prefill_groups(lengths)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert [lengths[i] for i in groups[0]] == [200]  # the long one alone
    assert {lengths[i] for i in groups[1]} == {31, 30, 28}
    assert {lengths[i] for i in groups[2]} == {6, 5, 4}
    assert prefill_groups([12] * 40) == [list(range(40))]  # equal lengths: one pass
    assert prefill_groups([]) == [] and prefill_groups([3]) == [[0]]


def test_grouped_prefill_changes_no_token(tiny_model, monkeypatch):
    import caiflow.decoding as decoding

    model, tokenizer, _ = tiny_model
    prompts = [p * (1 + 3 * (i % 2)) for i, p in enumerate(PROMPTS)]  # lengths far apart
    passes = []
    real = ContinuousDecoder._prefill_group
    monkeypatch.setattr(
        ContinuousDecoder, "_prefill_group", lambda self, rows: passes.append(rows) or real(self, rows)
    )
    runs = {}
    for cost in (0, 10**9):  # a pass per length; one pass for all
        monkeypatch.setattr(decoding, "PREFILL_GROUP_COST", cost)
        passes.clear()
        runs[cost] = GenerationEngine(model, tokenizer, batch_size=8).generate_ids(prompts, SAMPLED, SEEDS)
        runs[f"passes {cost}"] = len(passes)
    assert runs["passes 0"] > 1 and runs["passes 1000000000"] == 1
    assert runs[0] == runs[10**9]
