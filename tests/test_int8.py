"""int8 products for generation (caiflow/int8.py, `generation.matmul: int8`)."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from caiflow import int8
from caiflow.config import build_config
from caiflow.generation import GenerationEngine, Sampling
from caiflow.models import DEFAULT_MODEL, load_model_and_tokenizer, resolve_model
from tests.benchmark_scripts import run_benchmark

PROMPTS = ["Hello there.", "Tell me a long story about a dragon.", "Why?", "Name a colour.", "Hi"]
SEEDS = [11, 22, 33, 44, 55]
SAMPLED = Sampling(max_new_tokens=8, temperature=0.9, top_p=0.95)


def inputs_with_outlier_channels(rows: int = 64, width: int = 256) -> torch.Tensor:
    """Activations as a transformer's residual stream has them: a few channels 50x the others."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, width, generator=g)
    x[:, [3, 77]] *= 50
    return x


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_int8_product_stays_close_to_float_where_plain_int8_does_not(monkeypatch):
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 128)
    x = inputs_with_outlier_channels()
    exact = linear(x).detach()
    act_max = x.abs().amax(0)
    layer = int8.Int8Linear([linear], act_max)
    assert set(layer.outliers.tolist()) >= {3, 77}  # the big channels go the float32 way
    smoothed = relative_error(layer(x), exact)
    monkeypatch.setattr(int8, "ALPHA", 0.0)
    monkeypatch.setattr(int8, "OUTLIERS", 0)
    plain = relative_error(int8.Int8Linear([linear], act_max)(x), exact)
    assert smoothed < 0.01
    assert plain > 3 * smoothed  # what smoothing and the float32 channels buy


def test_a_group_runs_its_product_once_per_input_and_again_for_a_new_one(monkeypatch):
    torch.manual_seed(0)
    a, b = torch.nn.Linear(64, 32, bias=False), torch.nn.Linear(64, 16)
    group = int8.Int8Linear([a, b], torch.ones(64))
    first, second = int8.Int8Member(group, 0), int8.Int8Member(group, 1)
    runs = []
    forward = int8.Int8Linear.forward
    monkeypatch.setattr(int8.Int8Linear, "forward", lambda self, x: runs.append(1) or forward(self, x))
    x = torch.randn(3, 5, 64)
    ya, yb = first(x), second(x)
    assert len(runs) == 1 and ya.shape == (3, 5, 32) and yb.shape == (3, 5, 16)
    assert group._input is None and not group._outputs  # let go once every layer has its part
    assert torch.equal(first(x), ya) and len(runs) == 2  # asked again: computed again
    assert relative_error(ya, a(x).detach()) < 0.02 and relative_error(yb, b(x).detach()) < 0.02
    x2 = torch.randn(3, 5, 64)
    assert relative_error(second(x2), b(x2).detach()) < 0.02 and len(runs) == 3
    x2.mul_(2)  # the same tensor written in place: a new input
    assert relative_error(second(x2), b(x2).detach()) < 0.02 and len(runs) == 4


def test_quantize_groups_layers_that_share_an_input_and_leaves_the_model_alone(tiny_model):
    model, tokenizer, _ = tiny_model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    quantized = int8.quantize(model, tokenizer)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert not any(isinstance(m, (int8.Int8Member, int8.Int8Linear)) for m in model.modules())
    assert not any(isinstance(m, torch.nn.Linear) for m in quantized.modules())
    layer = quantized.model.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    assert attn.q_proj.group is attn.k_proj.group is attn.v_proj.group
    assert mlp.gate_proj.group is mlp.up_proj.group
    assert attn.o_proj.group is not attn.q_proj.group and mlp.down_proj.group is not mlp.up_proj.group
    assert quantized.model.embed_tokens.weight is model.model.embed_tokens.weight  # shared, not copied
    ids = tokenizer("Tell me a story about a dragon.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        exact, approx = model(ids).logits, quantized(ids).logits
    assert relative_error(approx, exact) < 0.05


def test_int8_engine_outputs_do_not_depend_on_batch_size(tiny_model):
    model, tokenizer, _ = tiny_model
    runs = [
        GenerationEngine(model, tokenizer, batch_size=b, matmul="int8").generate_ids(PROMPTS, SAMPLED, SEEDS)
        for b in (1, 2, 5)
    ]
    assert all(r == runs[0] for r in runs[1:])
    assert all(len(r) > 0 for r in runs[0])
    engine = GenerationEngine(model, tokenizer, batch_size=5, matmul="int8")
    engine.generate_ids(PROMPTS, SAMPLED, SEEDS)
    groups = {m.group for m in engine.model.modules() if isinstance(m, int8.Int8Member)}
    assert all(g._input is None and not g._outputs for g in groups)  # no activations held after a call


def test_int8_is_refused_where_it_cannot_run(tiny_model):
    _, tokenizer, _ = tiny_model
    with torch.device("meta"):
        off_cpu = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1))
    with pytest.raises(ValueError, match="int8 but the model is on meta.*model.dtype: bfloat16"):
        int8.quantize(off_cpu, tokenizer)
    with pytest.raises(ValueError, match="matmul is 'int4'"):
        GenerationEngine(tiny_model[0], tokenizer, matmul="int4")


def test_matmul_is_a_result_changing_setting_that_keeps_older_stores():
    default = build_config({})
    assert default.generation.matmul == "dtype"
    assert build_config({"generation": {"matmul": "int8"}}).fingerprint_dict() != default.fingerprint_dict()
    # at its default it is what the code did before the setting existed: left out, so stores stay valid
    assert "matmul" not in default.generation.fingerprint_dict()
    assert build_config({"generation": {"matmul": "dtype"}}).fingerprint_dict() == default.fingerprint_dict()
    with pytest.raises(Exception, match="matmul"):
        build_config({"generation": {"matmul": "int4"}})


def test_int8_on_the_default_model_moves_a_token_less_than_plain_int8(default_model_store, monkeypatch):
    """Teacher-forced on held-apart built-in prompts: mean KL(float32 || int8) per token, in nats."""
    model, tokenizer = load_model_and_tokenizer(resolve_model(DEFAULT_MODEL, default_model_store))
    texts = int8.calibration_texts(tokenizer, int8.CALIBRATION_PROMPTS + 6)[int8.CALIBRATION_PROMPTS :]
    batch = [tokenizer(t + " Sure, here is a short answer to that.")["input_ids"] for t in texts]

    def mean_kl(other) -> float:
        kls = []
        with torch.no_grad():
            for ids in batch:
                ref = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
                got = torch.log_softmax(other(torch.tensor([ids])).logits[0], -1)
                kls.append((ref.exp() * (ref - got)).sum(-1).mean())
        return torch.stack(kls).mean().item()

    calibrated = mean_kl(int8.quantize(model, tokenizer))
    monkeypatch.setattr(int8, "ALPHA", 0.0)
    monkeypatch.setattr(int8, "OUTLIERS", 0)
    plain = mean_kl(int8.quantize(model, tokenizer))
    assert calibrated < 0.02
    assert plain > 2 * calibrated


def test_precision_benchmark_prints_each_candidate_against_float32(model_store):
    lines = run_benchmark(
        "precision.py",
        "--storage",
        str(model_store),
        "--model",
        "builtin:tiny-random",
        "--prompts",
        "4",
        "--new-tokens",
        "4",
        "--batch-size",
        "4",
        "--repeats",
        "1",
    )
    text = "\n".join(lines)
    for name in ("bfloat16", "int8"):
        assert re.search(rf"^{name} +greedy: \d+% of rows identical.*KL [\d.]+ nats/token", text, re.M)
        assert re.search(rf"^engine {name} +median +[\d.]+ tokens/s = [\d.]+x float32", text, re.M)
        assert re.search(rf"^verdict: {name} (within|OUTSIDE) the tolerance", text, re.M)
