"""The in-place KV cache (caiflow.kv_cache): same tokens as DynamicCache, and no per-step copy."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from caiflow.decoding import ContinuousDecoder
from caiflow.generation import GenerationEngine, Sampling
from caiflow.kv_cache import GrowingCache, GrowingLayer
from tests.test_generation import PROMPTS, SEEDS

PREFIX = "You are a careful assistant. Example: User: how do I bake bread? Assistant: mix, rise, bake. Now: "
SAMPLINGS = [
    Sampling(max_new_tokens=12, temperature=0),
    Sampling(max_new_tokens=12, temperature=0.9, top_p=0.95),
]


@pytest.fixture(scope="module")
def gqa_model(tiny_model):
    """A random Llama shaped like the default model (grouped-query attention: 3 KV heads for 6),
    with weights large enough that every cached column sways the next token."""
    _, tokenizer, _ = tiny_model
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=3,
        max_position_embeddings=512,
        initializer_range=0.2,  # the default 0.02 gives near-uniform attention that hides a wrong column
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval(), tokenizer


def decode(gqa_model, prompts, sampling, cache: str, monkeypatch, eos=(), grow=None, **kwargs):
    """generate_ids through caiflow's loop, its caches all GrowingCache or all DynamicCache."""
    model, tokenizer = gqa_model
    made, loop_cache = [], ContinuousDecoder._new_cache

    def new_cache(decoder):
        if cache == "dynamic":
            made.append(DynamicCache(config=decoder.model.config))
        else:
            made.append(GrowingCache(decoder.model.config, grow=grow) if grow else loop_cache(decoder))
        return made[-1]

    with monkeypatch.context() as patch:
        patch.setattr(ContinuousDecoder, "_new_cache", new_cache)
        engine = GenerationEngine(model, tokenizer, batch_size=3, **kwargs)
        assert engine.decoding == "continuous"
        engine.eos_token_ids += list(eos)  # rows end at different steps (a random model rarely ends)
        ids = engine.generate_ids(prompts, sampling, SEEDS)
    assert made and all(type(c) is (DynamicCache if cache == "dynamic" else GrowingCache) for c in made)
    return ids, engine


@pytest.mark.parametrize("sampling", SAMPLINGS, ids=["greedy", "sampled"])
@pytest.mark.parametrize("prefix", ["", PREFIX], ids=["own-prompts", "shared-prefix"])
@pytest.mark.parametrize("grow", [None, 2], ids=["grow-by-max-new", "grow-by-2"])
def test_growing_cache_gives_dynamic_cache_tokens_exactly(gqa_model, monkeypatch, sampling, prefix, grow):
    """8 prompts through 3 slots: rows end early (EOS) or at the limit, pending ones take their
    slots (prefill + merge), and with `grow=2` the buffers move every other token."""
    prompts = [prefix + p for p in PROMPTS]
    first, _ = decode(gqa_model, prompts, sampling, "dynamic", monkeypatch)
    eos = sorted({row[2] for row in first[:3]})  # tokens three rows emit early: as EOS they end them
    shared = {"prefix_min_tokens": 8 if prefix else None}
    want, plain = decode(gqa_model, prompts, sampling, "dynamic", monkeypatch, eos, **shared)
    got, grown = decode(gqa_model, prompts, sampling, "growing", monkeypatch, eos, grow, **shared)
    assert len({len(r) for r in want}) > 1  # rows really end at different steps
    assert got == want
    assert grown.prefill_tokens == plain.prefill_tokens
    if prefix:  # the shared prefix really ran once
        assert grown.prefill_tokens < sum(len(grown._encode(p)) for p in prompts) - 50


def test_a_wrong_cache_column_changes_the_tokens(gqa_model, monkeypatch):
    """The comparison above can fail: zeroing one cached column per step changes greedy tokens."""
    sampling = SAMPLINGS[0]
    want, _ = decode(gqa_model, PROMPTS, sampling, "growing", monkeypatch)
    update = GrowingLayer.update

    def forgetful(self, keys, values, *args, **kwargs):
        k, v = update(self, keys, values, *args, **kwargs)
        k[:, :, -2].zero_()  # forget the token before the newest one
        return k, v

    monkeypatch.setattr(GrowingLayer, "update", forgetful)
    got, _ = decode(gqa_model, PROMPTS, sampling, "growing", monkeypatch)
    assert got != want


# ---------------------------------------------------------------- the layer itself


def kv(rows: int, columns: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 3, columns, 8, generator=g), torch.randn(rows, 3, columns, 8, generator=g)


def test_update_writes_in_place_and_moves_once_per_grow_columns():
    layer, reference = GrowingLayer(grow=4), DynamicCache()
    keys, values = kv(2, 5, 0)
    layer.update(keys, values)
    reference.update(keys, values, 0)
    assert (layer.length, layer.capacity) == (5, 9)
    buffer = layer._keys.data_ptr()
    for step in range(1, 6):
        k, v = layer.update(*kv(2, 1, step))
        rk, rv = reference.update(*kv(2, 1, step), 0)
        assert torch.equal(k, rk) and torch.equal(v, rv)
        assert k.data_ptr() == layer._keys.data_ptr()  # a view of the buffer, not a copy
        moved = layer._keys.data_ptr() != buffer
        assert moved == (step == 5)  # columns 6..9 fit; the 10th moves the buffer
    assert (layer.length, layer.capacity, layer.get_seq_length()) == (10, 14, 10)


def test_assigned_tensors_are_held_as_they_are_and_never_written():
    """The loop's batch surgery assigns keys/values (a select, a merge, an expanded prefix)."""
    prefix_keys, prefix_values = kv(1, 4, 0)
    original = prefix_keys.clone()
    layer = GrowingLayer(grow=8)
    layer.lazy_initialization(prefix_keys, prefix_values)
    layer.keys, layer.values = prefix_keys.expand(3, -1, -1, -1), prefix_values.expand(3, -1, -1, -1)
    assert (layer.length, layer.capacity, layer.get_seq_length()) == (4, 4, 4)
    new_keys, new_values = kv(3, 2, 1)
    k, v = layer.update(new_keys, new_values)
    assert torch.equal(prefix_keys, original)  # the update moved the prefix out before writing
    assert torch.equal(k, torch.cat([prefix_keys.expand(3, -1, -1, -1), new_keys], dim=2))
    assert torch.equal(v, torch.cat([prefix_values.expand(3, -1, -1, -1), new_values], dim=2))
    # Keys assigned first, values computed from the old values after: each keeps its own width.
    index = torch.tensor([2, 0])
    layer.keys = layer.keys[index, :, 1:]
    layer.values = layer.values[index, :, 1:]
    assert torch.equal(layer.values, v[index, :, 1:])
    layer.keys = layer.keys[:, :, 1:]
    with pytest.raises(RuntimeError, match="assign keys and values of the same width"):
        layer.update(*kv(2, 1, 2))
    # Cropped after an assignment, the tensor has room again, and is still not written into.
    held_keys, held_values = kv(2, 5, 3)
    kept = held_keys.clone()
    layer.keys, layer.values = held_keys, held_values
    layer.crop(-2)
    k, _ = layer.update(*kv(2, 1, 4))
    assert torch.equal(held_keys, kept) and k.shape[2] == 4


def test_growing_cache_refuses_layers_it_does_not_replace():
    config = LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2
    )
    assert all(type(layer) is GrowingLayer for layer in GrowingCache(config).layers)
    config.layer_types = ["sliding_attention", "full_attention"]
    config.sliding_window = 4
    with pytest.raises(ValueError, match="replaces plain DynamicLayers only"):
        GrowingCache(config)
    with pytest.raises(ValueError, match="at least 1 spare column"):
        GrowingLayer(grow=0)


def step_allocations(cache_class) -> tuple[int, int]:
    """(largest CPU allocation of one decode step, bytes of one layer's cached keys) at 4 rows x 300
    tokens, on a small-vocabulary model so that the logits are smaller than a layer's cache."""
    from torch.profiler import ProfilerActivity, profile

    config = LlamaConfig(
        vocab_size=101,
        hidden_size=96,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    cache = cache_class(config=config)
    ids = torch.randint(0, 101, (4, 300), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :50] = 0  # a padded row: the step's attention takes a mask, as in the loop
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
        mask = torch.cat([mask, torch.ones((4, 1), dtype=torch.long)], 1)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            model(input_ids=ids[:, -1:], attention_mask=mask, position_ids=positions[:, -1:] + 1, cache=cache)
    keys = cache.layers[0].keys
    return max(e.cpu_memory_usage for e in prof.events()), keys.numel() * keys.element_size()


def test_a_decode_step_copies_no_layer_cache():
    """Neither the update nor SDPA (given the non-contiguous views) copies a layer's cache; the
    same measurement sees DynamicCache's torch.cat do it."""
    largest, layer_bytes = step_allocations(DynamicCache)
    assert largest >= layer_bytes
    largest, layer_bytes = step_allocations(GrowingCache)
    assert largest < layer_bytes / 4
