"""The generation engine on the tiny random model (and a smoke run of the real default model)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from caiflow.decoding import ContinuousDecoder
from caiflow.faults import OOM_ABOVE_ENV as FAULT_OOM_ENV
from caiflow.faults import free_accelerator_memory, is_out_of_memory
from caiflow.generation import GenerationEngine, Sampling
from caiflow.models import DEFAULT_MODEL, load_causal_lm, load_model_and_tokenizer, resolve_model
from tests.benchmark_scripts import benchmark_module

PROMPTS = [
    "Hello there.",
    "Tell me a long story about a dragon who guards a library full of ancient books.",
    "Why?",
    "What is two plus two? Please explain your reasoning step by step.",
    "Name a colour.",
    "Write a poem about the sea, the wind and a small boat.",
    "Hi",
    "How do plants grow?",
]
SEEDS = [11, 22, 33, 44, 55, 66, 77, 88]
SAMPLED = Sampling(max_new_tokens=8, temperature=0.9, top_p=0.95)
GREEDY = Sampling(max_new_tokens=8, temperature=0)


def engine_for(tiny_model, **kwargs) -> GenerationEngine:
    model, tokenizer, _ = tiny_model
    return GenerationEngine(model, tokenizer, **kwargs)


# ---------------------------------------------------------------- generation


def test_one_string_per_prompt_in_input_order(tiny_model):
    together = engine_for(tiny_model, batch_size=3).generate_text(PROMPTS, SAMPLED, SEEDS)
    alone = [engine_for(tiny_model).generate_text([p], SAMPLED, [s])[0] for p, s in zip(PROMPTS, SEEDS)]
    assert len(together) == len(PROMPTS)
    assert all(isinstance(t, str) for t in together)
    assert together == alone


def test_seeded_sampling_does_not_depend_on_batch_size(tiny_model):
    one = engine_for(tiny_model, batch_size=1).generate_text(PROMPTS, SAMPLED, SEEDS)
    four = engine_for(tiny_model, batch_size=4).generate_text(PROMPTS, SAMPLED, SEEDS)
    assert one == four
    reseeded = engine_for(tiny_model, batch_size=4).generate_text(PROMPTS, SAMPLED, [s + 1000 for s in SEEDS])
    assert sum(a != b for a, b in zip(four, reseeded)) >= len(PROMPTS) - 1


def test_same_prompt_different_seeds_differ(tiny_model):
    texts = engine_for(tiny_model, batch_size=4).generate_text(["Hello there."] * 4, SAMPLED, [1, 2, 3, 4])
    assert len(set(texts)) >= 3


def test_greedy_is_deterministic_and_ignores_seeds(tiny_model):
    engine = engine_for(tiny_model, batch_size=4)
    first = engine.generate_text(PROMPTS, GREEDY, SEEDS)
    assert engine.generate_text(PROMPTS, GREEDY, [0] * len(PROMPTS)) == first
    assert engine_for(tiny_model, batch_size=1).generate_text(PROMPTS, GREEDY, SEEDS) == first


def test_max_new_tokens_is_respected(tiny_model):
    engine = engine_for(tiny_model, batch_size=4)
    ids = engine.generate_ids(PROMPTS, Sampling(max_new_tokens=5, temperature=1.0), SEEDS)
    assert [len(r) <= 5 for r in ids] == [True] * len(PROMPTS)
    assert max(len(r) for r in ids) == 5  # a random model almost never emits EOS
    assert engine.generated_tokens == sum(len(r) for r in ids)


def test_generate_formats_chat(tiny_model):
    engine = engine_for(tiny_model, batch_size=4)
    convs = [[{"role": "user", "content": p}] for p in PROMPTS[:3]]
    prompts = [engine.format_chat(c) for c in convs]
    assert prompts[0].endswith("<|im_start|>assistant\n")  # the real template, with the generation prompt
    assert engine.generate(convs, SAMPLED, SEEDS[:3]) == engine.generate_text(prompts, SAMPLED, SEEDS[:3])


def test_format_chat_without_template(tiny_model, monkeypatch):
    engine = engine_for(tiny_model)
    monkeypatch.setattr(engine.tokenizer, "chat_template", None)
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert engine.format_chat(conv) == "System: Be brief.\nUser: Hi\nAssistant:"
    opened = [*conv, {"role": "assistant", "content": "I'm sorry, but"}]
    assert engine.format_chat(opened) == "System: Be brief.\nUser: Hi\nAssistant: I'm sorry, but"


def test_a_final_assistant_message_is_an_opening_the_model_goes_on_from(tiny_model):
    engine = engine_for(tiny_model)
    conv = [{"role": "user", "content": "Hi"}]
    opened = engine.format_chat([*conv, {"role": "assistant", "content": "I'm sorry, but I can't"}])
    # the answer's turn is open: no end-of-turn after the opening, nothing after it
    assert opened == engine.format_chat(conv) + "I'm sorry, but I can't"


def test_progress_is_reported_after_every_batch(tiny_model):
    calls = []
    engine = engine_for(tiny_model, batch_size=3, progress=lambda done, total: calls.append((done, total)))
    engine.generate_text(PROMPTS, GREEDY, SEEDS)
    assert calls == [(3, 8), (6, 8), (8, 8)]


def test_over_long_prompt_is_an_error(tiny_model):
    engine = engine_for(tiny_model, max_input_tokens=5)
    with pytest.raises(ValueError, match=r"prompt 1 has \d+ tokens.*drop over-long prompts"):
        engine.generate_text(["Hi", PROMPTS[1]], GREEDY, [0, 1])


def test_input_errors(tiny_model):
    engine = engine_for(tiny_model)
    with pytest.raises(ValueError, match="one seed per prompt"):
        engine.generate_text(["Hi", "Hello"], GREEDY, [0])
    with pytest.raises(ValueError, match="empty"):
        engine.generate_text([""], GREEDY, [0])
    assert engine.generate_text([], GREEDY, []) == []
    with pytest.raises(ValueError, match="temperature"):
        Sampling(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        Sampling(top_p=0)


# ---------------------------------------------------------------- out of memory


def test_injected_oom_halves_the_batch_and_keeps_the_outputs(tiny_model, monkeypatch):
    expected = engine_for(tiny_model, batch_size=2).generate_text(PROMPTS, SAMPLED, SEEDS)
    monkeypatch.setenv(FAULT_OOM_ENV, "2")
    engine = engine_for(tiny_model, batch_size=8)
    assert engine.generate_text(PROMPTS, SAMPLED, SEEDS) == expected
    assert engine.backoffs == 2
    assert engine.batch_size == 2


def test_oom_at_batch_size_one_is_raised(tiny_model, monkeypatch):
    monkeypatch.setenv(FAULT_OOM_ENV, "0")
    engine = engine_for(tiny_model, batch_size=4)
    with pytest.raises(torch.OutOfMemoryError, match="injected"):
        engine.generate_text(PROMPTS[:4], GREEDY, SEEDS[:4])
    assert (engine.backoffs, engine.batch_size) == (2, 1)


def test_other_errors_are_not_retried(tiny_model, monkeypatch):
    engine = engine_for(tiny_model, batch_size=4)

    def broken(*args, **kwargs):
        raise ValueError("a bug, not a lack of memory")

    monkeypatch.setattr(ContinuousDecoder, "_prefill", broken)
    with pytest.raises(ValueError, match="a bug"):
        engine.generate_text(PROMPTS, GREEDY, SEEDS)
    assert (engine.backoffs, engine.batch_size) == (0, 4)


@pytest.mark.parametrize(
    "exc, expected",
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
        (torch.cuda.OutOfMemoryError("CUDA out of memory"), True),
        (MemoryError(), True),
        (RuntimeError("CUDA error: out of memory"), True),
        (RuntimeError("MPS backend out of memory (MPS allocated: 8 GB)"), True),
        (RuntimeError("XPU out of memory. Tried to allocate 20.00 MiB"), True),
        (RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"), False),
        (ValueError("out of memory"), False),
        (KeyError("input_ids"), False),
    ],
)
def test_is_out_of_memory(exc, expected):
    assert is_out_of_memory(exc) is expected


def test_free_accelerator_memory_collects_unreachable_tensors():
    """What a failed batch leaves behind (tensors in a reference cycle) is gone after the call."""
    import gc
    import weakref

    class Holder:
        pass

    gc.disable()  # no automatic collection between the two checks
    try:
        holder = Holder()
        holder.tensor = torch.zeros(1024)
        holder.cycle = holder  # unreachable only after a cycle collection, like a failed batch's frames
        alive = weakref.ref(holder)
        del holder
        assert alive() is not None  # reference counting alone does not free a cycle
        free_accelerator_memory()
        assert alive() is None
    finally:
        gc.enable()


# ---------------------------------------------------------------- scoring

QUESTION = "Question: pick one. Answer:"


@pytest.fixture(scope="module")
def trained_model(tiny_model):
    """A fresh copy of the tiny model trained to always continue QUESTION with ' (A)'."""
    _, tokenizer, resolved = tiny_model
    model = load_causal_lm(resolved.path, device="cpu")
    model.train()
    ids = tokenizer(QUESTION + " (A)", return_tensors="pt")["input_ids"]
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(40):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return model, tokenizer


def test_score_choices_prefers_the_trained_answer(trained_model):
    model, tokenizer = trained_model
    engine = GenerationEngine(model, tokenizer)
    probs = engine.score_choices([QUESTION], [" (A)", " (B)"])
    assert probs.shape == (1, 2)
    assert probs[0, 0] > 0.9
    flipped = engine.score_choices([QUESTION], [" (B)", " (A)"])
    np.testing.assert_allclose(flipped[0], probs[0, ::-1], atol=1e-6)


def test_score_choices_shape_and_normalisation(tiny_model):
    engine = engine_for(tiny_model, batch_size=4)
    options = ["(A)", "(B)", " principle three", "x"]
    probs = engine.score_choices(PROMPTS[:5], options)
    assert probs.shape == (5, 4)
    assert probs.dtype == np.float64
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-9)
    assert (probs > 0).all()


def test_score_choices_batched_equals_unbatched(tiny_model):
    options = [" (A)", " (B)", " neither of these options"]
    batched = engine_for(tiny_model, batch_size=8).score_choices(PROMPTS, options)
    single = engine_for(tiny_model, batch_size=1).score_choices(PROMPTS, options)
    np.testing.assert_allclose(batched, single, atol=1e-4)


def test_score_choices_runs_a_shared_prefix_once_with_the_same_probabilities(tiny_model, monkeypatch):
    import caiflow.decoding as decoding

    head = "Which of these principles is most at stake in the request below? " * 3
    prompts = [head + f"Request: {p}" for p in PROMPTS]
    options = [" (A)", " (B)", " neither of these options"]
    runs = []
    real = decoding.prefix_kv
    monkeypatch.setattr(
        decoding, "prefix_kv", lambda model, ids, *a: runs.append(len(ids)) or real(model, ids, *a)
    )
    shared = engine_for(tiny_model, batch_size=3).score_choices(prompts, options)
    assert len(runs) == 1 and runs[0] >= 16  # once per call, for every batch of 3
    plain = engine_for(tiny_model, batch_size=3, prefix_min_tokens=None).score_choices(prompts, options)
    assert len(runs) == 1
    np.testing.assert_allclose(shared, plain, atol=1e-5)
    assert not np.allclose(shared[0], shared[1])  # the rows' own tokens still count
    engine_for(tiny_model, batch_size=3).score_choices(PROMPTS, options)  # no common head: no prefix run
    assert len(runs) == 1


def test_score_choices_backs_off_on_oom(tiny_model, monkeypatch):
    options = [" (A)", " (B)"]
    expected = engine_for(tiny_model, batch_size=8).score_choices(PROMPTS[:4], options)
    monkeypatch.setenv(FAULT_OOM_ENV, "3")
    engine = engine_for(tiny_model, batch_size=8)
    np.testing.assert_allclose(engine.score_choices(PROMPTS[:4], options), expected, atol=1e-4)
    assert (engine.backoffs, engine.batch_size) == (1, 2)  # 4 prompts > 3: halved once, to 2 prompts


def test_score_choices_chat_formats_then_scores(tiny_model):
    engine = engine_for(tiny_model, batch_size=4)
    convs = [[{"role": "user", "content": p}] for p in PROMPTS[:3]]
    got = engine.score_choices_chat(convs, ["(A)", "(B)"], assistant_prefix="The answer is ")
    want = engine.score_choices([engine.format_chat(c) + "The answer is " for c in convs], ["(A)", "(B)"])
    np.testing.assert_array_equal(got, want)


def test_score_choices_needs_options(tiny_model):
    with pytest.raises(ValueError, match="at least one option"):
        engine_for(tiny_model).score_choices(["Hi"], [])


# ---------------------------------------------------------------- the real default model


@pytest.mark.slow
def test_default_model_smoke(default_model_store):
    model, tokenizer = load_model_and_tokenizer(resolve_model(DEFAULT_MODEL, default_model_store))
    engine = GenerationEngine(model, tokenizer, batch_size=2)
    convs = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "user", "content": "Write one sentence about the sea."}],
    ]
    texts = engine.generate(convs, Sampling(max_new_tokens=16), seeds=[0, 1])
    assert len(texts) == 2
    assert all(t.strip() for t in texts)


# ---------------------------------------------------------------- caiflow's decode loop

LONG_PREFIX = (
    "You are a careful assistant. Here is an example. User: how do I bake bread? "
    "Assistant: mix flour, water, salt and yeast, let it rise, then bake it. Now answer: "
)


def with_eos(engine: GenerationEngine, eos: list[int]) -> GenerationEngine:
    """The engine stopping at extra tokens, so rows end at different steps (a random model rarely ends)."""
    engine.eos_token_ids = list(eos)
    return engine


def early_ends(tiny_model, sampling: Sampling) -> list[int]:
    """Tokens that three rows generate early: as EOS they end rows at different steps."""
    ids = engine_for(tiny_model, decoding="generate").generate_ids(PROMPTS, sampling, SEEDS)
    return sorted({row[2] for row in ids[:3]})


@pytest.mark.parametrize("temperature, top_p", [(0.9, 0.95), (0.7, 1.0), (1.0, 0.5), (0.3, 1.0)])
def test_pick_tokens_is_per_row_sampler_exactly(temperature, top_p):
    from caiflow.sampling import PerRowSampler, pick_tokens

    torch.manual_seed(0)
    for step in range(4):
        scores = torch.randn(12, 2048) * (1 + step)
        sampler = PerRowSampler(range(100, 112), temperature, top_p, "cpu")
        sampler.start = 0
        want = sampler(torch.zeros((12, step), dtype=torch.long), scores).argmax(dim=-1)
        got = pick_tokens(scores, sampler.seeds, torch.full((12,), step), temperature, top_p)
        assert torch.equal(got, want)


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_pick_tokens_without_nucleus_hashes_only_tokens_that_can_win(monkeypatch, temperature):
    """Peaked logits, as a language model's: the Gumbel noise's bound leaves a few hundred tokens to
    hash, and the pick is still PerRowSampler's; flat logits hash the whole vocabulary, same pick."""
    import caiflow.sampling as sampling
    from caiflow.sampling import PerRowSampler

    def whole_vocabulary(*args):
        raise AssertionError("hashed the whole vocabulary")

    torch.manual_seed(1)
    peaked = torch.randn(16, 49152) * 2
    peaked[:, :40] += torch.linspace(20, 8, 40)  # a few likely tokens, as after a prompt
    flat = torch.randn(16, 49152)
    picked = set()
    for scores, bounded in ((peaked, True), (flat, False)):
        for step in range(3):
            sampler = PerRowSampler(range(200, 216), temperature, 1.0, "cpu")
            sampler.start = 0
            want = sampler(torch.zeros((16, step), dtype=torch.long), scores).argmax(dim=-1)
            with monkeypatch.context() as m:
                if bounded:
                    m.setattr(sampling, "_full_vocab_pick", whole_vocabulary)
                got = sampling.pick_tokens(scores, sampler.seeds, torch.full((16,), step), temperature, 1.0)
            assert torch.equal(got, want)
            picked.update(want.tolist())
    assert len(picked) > 16  # the rows drew different tokens


# A (seed, step, token) whose hashed uniform is the largest, (2^24 - 0.5) / 2^24: 1.0 in float32.
EDGE_SEED, EDGE_STEP, EDGE_TOKEN = 1015106910, 24, 15613


@pytest.mark.parametrize("top_p", [0.9, 1.0])
def test_the_largest_uniform_neither_wins_outright_nor_breaks_the_pick(top_p):
    """The edge uniform once gave infinite noise: that token won whatever its probability, and
    outside the nucleus its score was NaN and pick_tokens returned the vocabulary size."""
    from caiflow.sampling import PerRowSampler, pick_tokens, row_uniforms

    seeds = torch.tensor([EDGE_SEED])
    u = row_uniforms(seeds, EDGE_STEP, 49152)
    assert u.max() < 1.0 and int(u.argmax()) == EDGE_TOKEN
    scores = torch.zeros(1, 49152)
    scores[0, :3] = torch.tensor([30.0, 29.0, 28.0])  # the edge token is far outside any nucleus
    sampler = PerRowSampler([EDGE_SEED], 0.7, top_p, "cpu")
    sampler.start = 0
    want = sampler(torch.zeros((1, EDGE_STEP), dtype=torch.long), scores).argmax(dim=-1)
    got = pick_tokens(scores, seeds, torch.tensor([EDGE_STEP]), 0.7, top_p)
    assert int(want) < 3 and torch.equal(got, want)


def test_continuous_decoding_equals_generate(tiny_model):
    """Rows leaving early and pending rows taking their slots change no row's tokens."""
    for sampling in (SAMPLED, GREEDY, Sampling(max_new_tokens=12, temperature=1.0)):
        eos = early_ends(tiny_model, sampling)
        plain = with_eos(engine_for(tiny_model, batch_size=3, decoding="generate"), eos)
        refill = with_eos(engine_for(tiny_model, batch_size=3, prefix_min_tokens=None), eos)
        assert refill.decoding == "continuous"
        want = plain.generate_ids(PROMPTS, sampling, SEEDS)
        assert len({len(r) for r in want}) > 1  # rows really end at different steps
        assert refill.generate_ids(PROMPTS, sampling, SEEDS) == want


def test_generate_tokens_keeps_the_eos_a_row_ended_on(tiny_model):
    """keep_stop (what an RL trainer scores): a row that ended on an EOS token ends with it, one cut off at
    max_new_tokens does not; the same on both decode paths, from token ids as from text."""
    model, tokenizer, _ = tiny_model
    encoded = [tokenizer(p)["input_ids"] for p in PROMPTS]
    eos = early_ends(tiny_model, SAMPLED)
    for decoding in ("continuous", "generate"):
        engine = with_eos(engine_for(tiny_model, batch_size=3, decoding=decoding), eos)
        plain = engine.generate_tokens(encoded, SAMPLED, SEEDS)
        kept = engine.generate_tokens(encoded, SAMPLED, SEEDS, keep_stop=True)
        assert plain == engine.generate_ids(PROMPTS, SAMPLED, SEEDS)
        ended = 0
        for p, k in zip(plain, kept):
            if len(p) < SAMPLED.max_new_tokens:
                assert k[:-1] == p and k[-1] in eos
                ended += 1
            else:
                assert k == p
        assert 0 < ended < len(PROMPTS)


def test_continuous_decoding_does_not_depend_on_batch_size(tiny_model):
    eos = early_ends(tiny_model, SAMPLED)
    runs = [
        with_eos(engine_for(tiny_model, batch_size=b), eos).generate_ids(PROMPTS, SAMPLED, SEEDS)
        for b in (1, 2, 3, 8)
    ]
    assert all(r == runs[0] for r in runs[1:])


def test_shared_prefix_runs_once_and_changes_no_token(tiny_model):
    prompts = [LONG_PREFIX + p for p in PROMPTS]
    reuse = engine_for(tiny_model, batch_size=3, prefix_min_tokens=8)
    fresh = engine_for(tiny_model, batch_size=3, prefix_min_tokens=None)
    for sampling in (GREEDY, SAMPLED):
        reuse.prefill_tokens = fresh.prefill_tokens = 0
        assert reuse.generate_ids(prompts, sampling, SEEDS) == fresh.generate_ids(prompts, sampling, SEEDS)
        encoded = [reuse._encode(p) for p in prompts]
        assert fresh.prefill_tokens == sum(len(e) for e in encoded)
        shared = len(reuse._encode(LONG_PREFIX))
        # the prefix once, then each row's own tokens (a token or so merged across the boundary)
        assert reuse.prefill_tokens <= fresh.prefill_tokens - (len(prompts) - 1) * (shared - 2)


def test_common_prefix_leaves_every_prompt_a_token():
    from caiflow.decoding import common_prefix

    assert common_prefix([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 9]]) == 2
    assert common_prefix([[1, 2, 3], [1, 2, 3]]) == 2
    assert common_prefix([[7], [7, 8]]) == 0


def test_decoding_must_be_known(tiny_model):
    with pytest.raises(ValueError, match="'continuous'"):
        engine_for(tiny_model, decoding="fast")


def test_generation_benchmark_profile_splits_the_engine_time(tiny_model):
    """benchmarks/generation.py --profile: the engine's tokens, its GEMM time and their FLOP count."""
    profile_engine = benchmark_module("engine_profile").profile_engine
    engine = engine_for(tiny_model, batch_size=4)
    prof = profile_engine(engine, PROMPTS, SAMPLED)
    ids = engine_for(tiny_model, batch_size=4).generate_ids(PROMPTS, SAMPLED, list(range(len(PROMPTS))))
    assert prof["tokens"] == sum(len(row) for row in ids) > 0
    assert prof["gemm"] > 0 and prof["gemm_gflops"] > 0 and prof["other"] > 0
    assert prof["attention"] > 0  # prefill's SDPA and the decode steps' batched products


def test_categorize_benchmark_prints_both_ways_and_their_agreement(model_store):
    """benchmarks/categorize.py on the tiny preset: a line per way, then the ratio and the differences."""
    from tests.benchmark_scripts import run_benchmark

    lines = run_benchmark(
        "categorize.py",
        "--config",
        "configs/tiny.yaml",
        "--storage",
        str(model_store),
        "--limit",
        "12",
        "--repeats",
        "1",
    )
    assert re.match(r"12 prompts, \d+ labels, batch 8, medians of 1 interleaved runs$", lines[0])
    assert lines[1].startswith("prefix once") and lines[2].startswith("whole prompts")
    assert lines[3].startswith("speed-up ") and lines[3].endswith("labels that differ 0")


def test_training_benchmark_measures_both_precisions_matmul_rate():
    rates = benchmark_module("training").matmul_rates(m=8, k=16, n=8, repeats=2)
    assert set(rates) == {"float32", "bfloat16", "float32 packed"} and all(r > 0 for r in rates.values())
