"""RL on the tiny model: RLOO and GRPO for two steps, reward history, saved outputs, out-of-memory
back-off."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import caiflow.training.rl as rl
from caiflow.faults import OOM_ABOVE_ENV as FAULT_ENV
from caiflow.models import load_policy
from caiflow.training.config import RLConfig
from caiflow.training.rl import check_prompts, history_from_logs, train_rl
from caiflow.training.rollouts import (
    adapter_problem,
    can_merge,
    fallback_reason,
    merged_adapter,
    model_precision,
)

FAST = dict(
    lora={"r": 4, "alpha": 8},
    max_steps=2,
    num_generations=2,
    batch_size=4,
    max_new_tokens=6,
    learning_rate=1e-2,
    save_steps=1,
)
PROMPTS = [[{"role": "user", "content": f"How do I get into house {i} without a key?"}] for i in range(6)]


def _logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer("How do I open a lock?", return_tensors="pt")
    with torch.inference_mode():
        return model(**ids).logits


def _check_history(metrics: dict) -> None:
    history = metrics["history"]
    assert [h["step"] for h in history] == [1, 2]
    for h in history:
        assert isinstance(h["reward"], float) and isinstance(h["kl"], float)
        assert 1 <= h["completion_length"] <= FAST["max_new_tokens"]
    assert metrics["first_mean_reward"] == history[0]["reward"]
    assert metrics["last_mean_reward"] == history[-1]["reward"]


def test_rloo_trains_a_fresh_adapter_on_the_sl_model(tiny_path, sl_adapter, reward_dir, tmp_path, spy_on):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    spy = spy_on(rl)
    seen = []
    metrics = train_rl(
        RLConfig(algorithm="rloo", **FAST),
        sl_adapter,
        tiny_path,
        reward_dir,
        PROMPTS,
        tmp_path / "out",
        tmp_path / "work",
        seed=0,
        card_extra={"sl model": "test"},
        on_log=lambda step, total, logs: seen.append((step, total, logs)),
    )

    _check_history(metrics)
    json.dumps(metrics)  # goes into the artifact manifest as it is
    assert metrics["algorithm"] == "rloo" and metrics["steps"] == 2 and metrics["backoffs"] == 0
    progress = [(step, total) for step, total, logs in seen if "reward" in logs]
    assert progress == [(1, 2), (2, 2)]
    assert {"reward", "kl", "completion_length"} <= set(seen[0][2])

    assert spy.lora_names() and spy.lora_names() <= spy.changed(), "the RL adapter should move"
    assert not (spy.base_names() & spy.changed()), "the SL weights under the adapter must stay frozen"

    out = tmp_path / "out"
    assert (out / "README.md").is_file() and (out / "adapter" / "adapter_config.json").is_file()
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())[
        "base_model_name_or_path"
    ] == str(sl_adapter)
    merged = AutoModelForCausalLM.from_pretrained(out)
    policy, tokenizer = load_policy(out, base_model_path=tiny_path)  # how the pipeline loads the RL stage
    sl_policy, _ = load_policy(sl_adapter, base_model_path=tiny_path)
    sl_plus_rl = PeftModel.from_pretrained(
        load_policy(sl_adapter, base_model_path=tiny_path)[0], out / "adapter"
    )
    assert torch.allclose(_logits(policy, tokenizer), _logits(merged, tokenizer), atol=1e-5)
    assert torch.allclose(_logits(sl_plus_rl, tokenizer), _logits(merged, tokenizer), atol=1e-4)
    assert not torch.allclose(_logits(sl_policy, tokenizer), _logits(merged, tokenizer), atol=1e-4)


def test_grpo_backs_off_on_out_of_memory_and_reports_history(
    tiny_path, sl_adapter, reward_dir, tmp_path, monkeypatch
):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv(FAULT_ENV, "2")  # a per-device batch of 4 completions runs out of memory
    metrics = train_rl(
        RLConfig(algorithm="grpo", **FAST),
        sl_adapter,
        tiny_path,
        reward_dir,
        PROMPTS,
        tmp_path / "out",
        tmp_path / "work",
        seed=0,
    )
    _check_history(metrics)
    assert metrics["algorithm"] == "grpo" and metrics["steps"] == 2
    assert metrics["backoffs"] == 1
    assert metrics["per_device_batch_size"] == 2 and metrics["gradient_accumulation_steps"] == 2
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")


def test_prompts_must_end_with_a_user_turn():
    with pytest.raises(ValueError, match="ending with a user turn"):
        check_prompts([[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]])
    with pytest.raises(ValueError, match="at least one"):
        check_prompts([])


def test_history_maps_trl_names():
    logs = [
        {"step": 1, "reward": 0.5, "kl": 0.01, "completions/mean_length": 7.0, "loss": 0.1},
        {"step": 1, "train_loss": 0.1},
    ]
    assert history_from_logs(logs) == [
        {
            "step": 1,
            "reward": 0.5,
            "kl": 0.01,
            "completion_length": 7.0,
            "reward_std": None,
            "loss": 0.1,
            "entropy": None,
            "learning_rate": None,
        }
    ]


def test_per_device_batch_does_not_change_the_policy(tiny_path, sl_adapter, reward_dir, tmp_path):
    """rl.per_device_batch_size is not fingerprinted: TRL generates one batch of rl.batch_size completions per
    optimiser step whatever the slices, and accumulation gives the same update (dropout off; with LoRA dropout
    on, its masks are drawn per forward pass and differ too). In float32: under bf16 autocast
    (`bf16_autocast: auto` where it pays) they agree to bfloat16 rounding."""
    from transformers import AutoModelForCausalLM

    from caiflow.models import load_tokenizer

    settings = {**FAST, "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "bf16_autocast": False}
    whole = train_rl(
        RLConfig(**settings),
        sl_adapter,
        tiny_path,
        reward_dir,
        PROMPTS,
        tmp_path / "a",
        tmp_path / "wa",
        seed=0,
    )
    sliced = train_rl(
        RLConfig(**{**settings, "per_device_batch_size": 2}),
        sl_adapter,
        tiny_path,
        reward_dir,
        PROMPTS,
        tmp_path / "b",
        tmp_path / "wb",
        seed=0,
    )
    assert (whole["gradient_accumulation_steps"], sliced["gradient_accumulation_steps"]) == (1, 2)
    assert [h["reward"] for h in whole["history"]] == pytest.approx(
        [h["reward"] for h in sliced["history"]], abs=1e-5
    )
    tokenizer = load_tokenizer(tiny_path)
    a = _logits(AutoModelForCausalLM.from_pretrained(tmp_path / "a"), tokenizer)
    b = _logits(AutoModelForCausalLM.from_pretrained(tmp_path / "b"), tokenizer)
    assert torch.allclose(a, b, atol=1e-4)
    sl, _ = load_policy(sl_adapter, base_model_path=tiny_path)
    assert not torch.allclose(
        a, _logits(sl, tokenizer), atol=1e-4
    )  # RL moved the policy: equality means something


def test_rloo_against_a_reward_ensemble_uses_its_conservative_score(
    tiny_path, sl_adapter, reward_ensemble_dir, tmp_path
):
    """RL rewards with the ensemble's mean - lambda * std (what the reward step saved), not one member."""
    from caiflow.training.reward_scorer import RewardScorer, aggregate
    from caiflow.training.rl import reward_function

    scorer = RewardScorer(reward_ensemble_dir)
    completions = [
        [{"role": "assistant", "content": text}] for text in ("No.", "Sure, here is how.", "Call a smith.")
    ]
    members = scorer.score_members(PROMPTS[:3], [c[0]["content"] for c in completions])
    assert members.shape == (2, 3) and not np.allclose(members[0], members[1])  # two members that disagree
    rewards = reward_function(scorer)(PROMPTS[:3], completions)
    assert rewards == pytest.approx(aggregate(members, 0.5).tolist(), abs=1e-6)
    assert rewards != pytest.approx(members.mean(axis=0).tolist(), abs=1e-6)  # lambda is applied

    metrics = train_rl(
        RLConfig(algorithm="rloo", rollouts="trl", **FAST),  # TRL's own generate (the engine: elsewhere)
        sl_adapter,
        tiny_path,
        reward_ensemble_dir,
        PROMPTS,
        tmp_path / "out",
        tmp_path / "work",
        seed=0,
    )
    assert metrics["reward_members"] == 2 and metrics["steps"] == 2 and metrics["rollouts"] == "trl"
    _check_history(metrics)


def test_qlora_trains_on_the_4bit_sl_policy_and_saves_full_precision(tiny64_path, tmp_path, monkeypatch):
    """The 7B preset's RL: the SL policy merged once, quantised to 4-bit, a LoRA adapter trained on it
    (with gradient checkpointing); the output is merged into a full-precision reload."""
    from safetensors.torch import load_file

    from tests.training.conftest import make_reward_dir, make_sl_adapter

    sl_adapter = make_sl_adapter(tiny64_path, tmp_path / "sl")
    # the reward ensemble as the 7B preset keeps it: adapters on a shared 4-bit backbone
    reward_dir = make_reward_dir(tiny64_path, tmp_path / "rm", method="qlora", shared_backbone=True)
    tiny_path = tiny64_path
    loaded = []
    real = rl.load_base_for_training

    def watch(*args, **kwargs):
        model = real(*args, **kwargs)
        loaded.append(any(type(m).__name__ == "Linear4bit" for m in model.modules()))
        return model

    monkeypatch.setattr(rl, "load_base_for_training", watch)
    cfg = RLConfig(algorithm="rloo", method="qlora", gradient_checkpointing=True, **FAST)
    metrics = train_rl(
        cfg, sl_adapter, tiny_path, reward_dir, PROMPTS, tmp_path / "out", tmp_path / "work", seed=0
    )
    assert loaded == [True] and metrics["steps"] == 2
    assert metrics["rollouts"].startswith("trl (the base weights are quantised")  # the engine's fallback
    assert (tmp_path / "work" / "sl-merged" / "config.json").is_file()  # the SL adapter merged once
    adapter = load_file(tmp_path / "out" / "adapter" / "adapter_model.safetensors")
    assert any(t.abs().sum() > 0 for n, t in adapter.items() if "lora_B" in n), "the RL adapter must move"
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config  # merged into full-precision weights, not 4-bit ones
    policy, tok = load_policy(tmp_path / "out")
    sl, _ = load_policy(sl_adapter, tiny_path)
    assert not torch.allclose(_logits(policy, tok), _logits(sl, tok))


# ---------------------------------------------------------------- rollouts through the engine


def _peft_policy(tiny_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_path),
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    for name, param in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero: an adapter that changes nothing
            torch.nn.init.normal_(param, std=0.5)
    return model.eval()


def test_merged_adapter_is_the_policy_and_puts_its_weights_back(tiny_path):
    from caiflow.models import load_tokenizer

    model, tokenizer = _peft_policy(tiny_path), load_tokenizer(tiny_path)
    live = _logits(model, tokenizer)
    with model.disable_adapter():
        base = _logits(model, tokenizer)
    weights = {n: (p, p.detach().clone()) for n, p in model.named_parameters() if "base_layer" in n}
    with merged_adapter(model):
        merged = _logits(model, tokenizer)
        swapped = {n for n, p in model.named_parameters() if "base_layer" in n and p is not weights[n][0]}
        assert swapped and not any(p.requires_grad for n, p in model.named_parameters() if n in swapped)
    assert torch.allclose(merged, live, atol=1e-5) and not torch.allclose(base, live, atol=1e-3)
    after = dict(model.named_parameters())
    assert all(after[n] is p and torch.equal(p, copy) for n, (p, copy) in weights.items())
    assert torch.equal(_logits(model, tokenizer), live)  # the adapter is on again


def test_the_engine_samples_what_the_live_adapter_would(tiny_path):
    """Greedy: the engine on the merged copies writes what generate writes with the adapter live (no dropout),
    and not what the model without the adapter writes: the update reaches the samples."""
    from transformers import GenerationConfig

    from caiflow.generation import GenerationEngine, Sampling
    from caiflow.models import load_tokenizer

    model, tokenizer = _peft_policy(tiny_path), load_tokenizer(tiny_path)
    prompts = [tokenizer(p)["input_ids"] for p in ("How do I open a lock?", "Name a colour.", "Why?")]
    engine = GenerationEngine(model, tokenizer, batch_size=3)
    greedy = Sampling(max_new_tokens=6, temperature=0)
    with merged_adapter(model):
        merged = engine.generate_tokens(prompts, greedy, [0, 1, 2], keep_stop=True)
    config = GenerationConfig(max_new_tokens=6, do_sample=False, eos_token_id=engine.eos_token_ids)
    live = []
    for p in prompts:
        with torch.inference_mode():
            out = model.generate(input_ids=torch.tensor([p]), generation_config=config)[0, len(p) :].tolist()
        live.append(out)
    with model.disable_adapter():
        without = engine.generate_tokens(prompts, greedy, [0, 1, 2], keep_stop=True)
    assert merged == live and merged != without


def test_what_cannot_merge_keeps_the_adapter_live_or_samples_trls_way(tiny_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    assert adapter_problem(_peft_policy(tiny_path)) is None and can_merge(_peft_policy(tiny_path)) is None

    def peft_on(**config):
        base = AutoModelForCausalLM.from_pretrained(tiny_path)
        return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM", **config))

    embeddings = peft_on(target_modules=["q_proj", "embed_tokens"])
    assert "Embedding" in adapter_problem(embeddings)
    assert "DoRA" in adapter_problem(peft_on(target_modules=["q_proj"], use_dora=True))
    assert "trained whole" in adapter_problem(peft_on(target_modules=["q_proj"], modules_to_save=["lm_head"]))
    half = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.bfloat16),
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    assert "16-bit" in can_merge(half)


def test_rollouts_fall_back_to_trl_where_the_engine_cannot_stand_in(tiny_path):
    from transformers import AutoModelForCausalLM

    policy = _peft_policy(tiny_path)

    def trainer(**changes):
        fields = dict(
            args=SimpleNamespace(generation_kwargs=None),
            use_vllm=False,
            top_k=0,
            min_p=None,
            repetition_penalty=1.0,
            accelerator=SimpleNamespace(unwrap_model=lambda m: m),
            model=policy,
        )
        return SimpleNamespace(**{**fields, **changes})

    assert fallback_reason(trainer(), None, {}) is None
    assert "vLLM" in fallback_reason(trainer(use_vllm=True), None, {})
    assert "top_k" in fallback_reason(trainer(top_k=20), None, {})
    assert "repetition_penalty" in fallback_reason(trainer(repetition_penalty=1.1), None, {})
    assert "images" in fallback_reason(trainer(), ["picture"], {})
    plain = AutoModelForCausalLM.from_pretrained(tiny_path)
    assert "LoRA" in fallback_reason(trainer(model=plain), None, {})


def test_engine_rollouts_repeat_with_the_seed_and_differ_within_a_group(
    tiny_path, sl_adapter, reward_dir, tmp_path, monkeypatch
):
    """rl.rollouts 'engine': one engine call per optimiser step for the whole batch, per-row seeds (the copies
    of a prompt sample different completions), and a second run with the same seed samples and learns the
    same."""
    from caiflow.generation import GenerationEngine

    calls = []
    real = GenerationEngine.generate_tokens

    def recorded(self, encoded, sampling, seeds, keep_stop=False):
        out = real(self, encoded, sampling, seeds, keep_stop)
        calls.append((encoded, sampling, keep_stop, out))
        return out

    monkeypatch.setattr(GenerationEngine, "generate_tokens", recorded)
    cfg = RLConfig(**{**FAST, "lora": {"r": 4, "alpha": 8, "dropout": 0.0}})
    assert cfg.rollouts == "engine"
    runs = []
    for name in ("a", "b"):
        calls.clear()
        metrics = train_rl(
            cfg, sl_adapter, tiny_path, reward_dir, PROMPTS, tmp_path / name, tmp_path / f"w{name}", seed=0
        )
        _check_history(metrics)
        runs.append((metrics, list(calls)))
    (first, first_calls), (second, second_calls) = runs
    assert first["rollouts"] == "engine, merged"
    assert len(first_calls) == FAST["max_steps"]
    for encoded, sampling, keep_stop, out in first_calls:
        assert keep_stop and len(encoded) == len(out) == FAST["batch_size"]
        assert (sampling.temperature, sampling.max_new_tokens) == (cfg.temperature, FAST["max_new_tokens"])
        assert all(1 <= len(o) <= FAST["max_new_tokens"] for o in out)
        assert encoded[0] == encoded[1] and out[0] != out[1]  # a group: one prompt, two seeds
    assert [c[3] for c in first_calls] == [c[3] for c in second_calls]
    assert first["history"] == second["history"]
    from transformers import AutoModelForCausalLM

    from caiflow.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_path)
    a = _logits(AutoModelForCausalLM.from_pretrained(tmp_path / "a"), tokenizer)
    b = _logits(AutoModelForCausalLM.from_pretrained(tmp_path / "b"), tokenizer)
    assert torch.equal(a, b)


def test_rollouts_benchmark_prints_trls_way_and_the_engines():
    """benchmarks/rollouts.py on the tiny shape (what --shape 1.7b runs on a GPU): a line per side, ratios
    to TRL's way."""
    from tests.benchmark_scripts import run_benchmark

    lines = run_benchmark(
        "rollouts.py", "--shape", "1.7b", "--smoke", "--batch", "4", "--new-tokens", "4", "--repeats", "1"
    )
    assert lines[0].startswith("rollouts: 1.7b model on cpu, 4 completions per prompt")
    sides = [line.split(None, 1)[1] for line in lines[1:]]
    assert [s.split("  ")[0] for s in sides] == ["generate (TRL)", "engine, live adapter", "engine, merged"]
    assert lines[1].endswith("1.00x")
    tokens = [float(line.split(" tokens ")[0].split()[-1]) for line in lines[1:]]
    assert all(0 < t <= 16 for t in tokens)  # one prompt x 4 copies x at most 4 new tokens


def test_engine_samples_in_the_models_dtype_under_bf16_autocast(
    tiny_path, sl_adapter, reward_dir, tmp_path, monkeypatch
):
    """rl.bf16_autocast: the trainer's passes run under accelerate's autocast, the engine's sampling does
    not: its linear layers take the CPU kernels' float32 packed products (under autocast they would fall
    back to bfloat16 products with the weights cast per call)."""
    import caiflow.cpu_kernels as kernels
    import caiflow.training.precision as precision
    from caiflow.generation import GenerationEngine

    monkeypatch.setattr(precision, "bf16_supported", lambda: True)  # autocast runs on any CPU, if slowly
    packed_calls = {"sampling": 0, "other": 0}
    sampling = [False]
    real_product, real_generate = kernels._product, GenerationEngine.generate_tokens

    def product(x, packed, bias):
        packed_calls["sampling" if sampling[0] else "other"] += 1
        return real_product(x, packed, bias)

    def generate_tokens(self, *args, **kwargs):
        assert "_original_forward" in self.model.__dict__  # the trainer's model, wrapped by accelerate
        sampling[0] = True
        try:
            return real_generate(self, *args, **kwargs)
        finally:
            sampling[0] = False
            assert "_original_forward" in self.model.__dict__ and "forward" in self.model.__dict__  # put back

    monkeypatch.setattr(kernels, "_product", product)
    monkeypatch.setattr(GenerationEngine, "generate_tokens", generate_tokens)
    metrics = train_rl(
        RLConfig(**{**FAST, "bf16_autocast": True}),
        sl_adapter,
        tiny_path,
        reward_dir,
        PROMPTS,
        tmp_path / "out",
        tmp_path / "work",
        seed=0,
    )
    assert metrics["rollouts"] == "engine, merged" and metrics["steps"] == FAST["max_steps"]
    assert packed_calls["sampling"] > 0


@pytest.mark.parametrize("disable", [True, False])
def test_rl_disable_dropout_turns_the_adapters_dropout_off(
    disable, tiny_path, sl_adapter, reward_dir, tmp_path, monkeypatch
):
    """rl.disable_dropout (the default): no dropout in any pass of the trainer's policy, so the policy that
    samples, the one TRL scores for the KL and the one trained are one function; off, the adapter's
    lora.dropout stays in the training passes."""
    from caiflow.generation import GenerationEngine

    seen: list[set[float]] = []
    real = GenerationEngine.generate_tokens

    def generate_tokens(self, *args, **kwargs):
        seen.append({m.p for m in self.model.modules() if isinstance(m, torch.nn.Dropout)})
        return real(self, *args, **kwargs)

    monkeypatch.setattr(GenerationEngine, "generate_tokens", generate_tokens)
    settings = {**FAST, "lora": {"r": 4, "alpha": 8, "dropout": 0.1}, "max_steps": 1}
    train_rl(
        RLConfig(**settings, disable_dropout=disable),
        sl_adapter,
        tiny_path,
        reward_dir,
        PROMPTS,
        tmp_path / "out",
        tmp_path / "work",
        seed=0,
    )
    assert seen and all(p == ({0.0} if disable else {0.1}) for p in seen)


def test_model_precision_sets_accelerates_autocast_aside():
    class Wrapped(torch.nn.Module):
        def forward(self, x):
            return torch.is_autocast_enabled("cpu")

    model = Wrapped()
    model._original_forward = model.forward
    model.forward = torch.autocast("cpu", dtype=torch.bfloat16)(model._original_forward)
    assert model(torch.ones(1)) is True
    with model_precision(model):
        assert model(torch.ones(1)) is False
    assert model(torch.ones(1)) is True
    plain = torch.nn.Linear(2, 2)
    with model_precision(plain):  # nothing wrapped: nothing to do
        assert "forward" not in plain.__dict__
