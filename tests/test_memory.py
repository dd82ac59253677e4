"""The memory plan: hand-computed figures for a small shape, the 7B preset fits 24 GB by its own
plan, and a run stops before a step that does not fit, naming the setting."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from caiflow.config import build_config, load_config
from caiflow.memory import (
    GIB,
    NF4_BYTES,
    RUNTIME_RESERVE,
    Shape,
    Shapes,
    activation_bytes,
    kv_cache_bytes,
    step_memory,
    weight_bytes,
)
from caiflow.memory_check import MemoryPlanError, check_step
from caiflow.pipeline import STEPS

ROOT = Path(__file__).resolve().parents[1]
# 2 layers, hidden 8, 2 heads of 4, one KV head (GQA), MLP 16, vocab 100, untied head
SMALL = Shape(vocab=100, hidden=8, intermediate=16, layers=2, heads=2, kv_heads=1)


def test_parameter_counts_by_hand():
    # q 8x8, k 8x4, v 8x4, o 8x8, gate 8x16, up 8x16, down 16x8 = 576 a layer
    assert SMALL.linear_params() == 2 * 576
    # embeddings 800 + 2 norms a layer (2 x 2 x 8) + final norm 8 + LM head 800
    assert SMALL.other_params("lm") == 1640 and SMALL.params("lm") == 2792
    assert SMALL.params("score") == 1152 + 840 + 8
    # r=2 x (in + out) of each projection: 2 x (16+12+12+16+24+24+24) = 256 a layer
    assert SMALL.lora_params(2) == 512
    assert SMALL.lora_params(2, ["q_proj", "v_proj"]) == 2 * 2 * (16 + 12)
    # Mistral-7B from its config fields: 7.248B
    mistral = Shape.from_config(
        {
            "vocab_size": 32768,
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 128,
        }
    )
    assert mistral.params() == 7_248_023_552


def test_bytes_by_hand():
    assert weight_bytes(SMALL, 2) == 2792 * 2
    # 4-bit: linear layers at 4.127 bits; embeddings, head and norms in fp32 for training
    assert weight_bytes(SMALL, 2, four_bit=True, training=True) == pytest.approx(1152 * NF4_BYTES + 1640 * 4)
    assert NF4_BYTES == pytest.approx(0.5159, abs=1e-4)
    # K and V: 2 x layers 2 x batch 3 x seq 10 x 1 head x 4 x 2 bytes
    assert kv_cache_bytes(SMALL, 2, 3, 10) == 960
    # 10 tokens, bf16: layer term (2 x (7x8 + 4x16) + 8x8) x 10 = 3040; logits 10 x 100 x (2 + 8) = 10000
    # checkpointed: hidden states 2 x 8 x 2 x 10 = 320 + max(2 x 3040, 10000); x 1.1 slack
    assert activation_bytes(SMALL, 2, 2, 5, True) == pytest.approx((320 + 10000) * 1.1)
    # not checkpointed: every layer (2 x 3040) + max(3040, 10000)
    assert activation_bytes(SMALL, 2, 2, 5, False) == pytest.approx((6080 + 10000) * 1.1)


def _cfg(**sections) -> dict:
    data = {"model": {"dtype": "bfloat16"}, **sections}
    return build_config(data).model_dump()


def test_sft_step_by_hand():
    cfg = _cfg(sft={"lora": {"r": 2}, "batch_size": 4, "per_device_batch_size": 2, "max_length": 8})
    m = step_memory("sft", cfg, Shapes(SMALL))
    # weights 2792 x 2 + LoRA 512 x 16 + activations of 2 x 8 tokens (not checkpointed):
    # layer term 304 x 16 = 4864, logits 16 x 100 x 10 = 16000 -> (2 x 4864 + 16000) x 1.1
    assert m.peak == pytest.approx(5584 + 8192 + 25728 * 1.1 + RUNTIME_RESERVE)
    assert [h.role for h in m.models] == ["policy"]


def test_rl_engine_rollouts_count_the_merged_weight_copies():
    """rl.rollouts 'engine' samples from float32 copies of the projections with the adapter merged in:
    the sampling phase holds them beside the KV cache (not with 16-bit weights, which keep the adapter
    live, nor with a 4-bit policy, which samples TRL's way)."""
    # a sampling batch large enough that the KV cache, not reward scoring, sets the phase's size
    rl = {"lora": {"r": 2}, "batch_size": 16, "num_generations": 2, "max_new_tokens": 64}
    rl["scoring_batch_size"] = 1

    def plan(dtype: str, **changes):
        cfg = build_config({"model": {"dtype": dtype}, "rl": {**rl, **changes}}).model_dump()
        return step_memory("rl", cfg, Shapes(SMALL))

    engine, trl = plan("float32", rollouts="engine"), plan("float32", rollouts="trl")
    assert engine.peak - trl.peak == pytest.approx(SMALL.linear_params() * 4)  # float32 copies
    assert any("merged weight copies" in k for k in engine.parts)
    assert plan("bfloat16", rollouts="engine").peak == plan("bfloat16", rollouts="trl").peak
    four_bit = plan("float32", rollouts="engine", method="qlora")
    assert not any("merged weight copies" in k for k in four_bit.parts)


def test_int8_generation_counts_its_copy_of_the_linear_layers():
    plain = {s: step_memory(s, _cfg(), Shapes(SMALL)) for s in ("critique_revision", "baseline")}
    for step, before in plain.items():
        after = step_memory(step, _cfg(generation={"matmul": "int8"}), Shapes(SMALL))
        assert after.peak - before.peak == pytest.approx(SMALL.linear_params())  # one byte a weight
    sft = _cfg(sft={"lora": {"r": 2}}, generation={"matmul": "int8"})
    assert (
        step_memory("sft", sft, Shapes(SMALL)).peak
        == step_memory("sft", _cfg(sft={"lora": {"r": 2}}), Shapes(SMALL)).peak
    )


def test_rl_holds_policy_and_reward_ensemble_and_a_shared_backbone_holds_one():
    rl = {
        "lora": {"r": 2},
        "batch_size": 4,
        "num_generations": 2,
        "max_new_tokens": 8,
        "scoring_batch_size": 2,
    }
    merged = step_memory(
        "rl", _cfg(rl=rl, reward_model={"lora": {"r": 2}, "ensemble_size": 3}), Shapes(SMALL)
    )
    assert [h.role for h in merged.models] == ["policy (SL + RL adapter)"] + [
        f"reward member {i}" for i in range(3)
    ]
    assert sum(h.bytes for h in merged.models[1:]) == 3 * SMALL.params("score") * 2
    shared = step_memory(
        "rl",
        _cfg(
            rl=rl,
            reward_model={"lora": {"r": 2}, "ensemble_size": 3, "method": "qlora", "shared_backbone": True},
        ),
        Shapes(SMALL),
    )
    backbone = shared.models[1]
    assert backbone.quant == "nf4" and backbone.bytes == pytest.approx(
        1152 * NF4_BYTES + 848 * 2
    )  # embeddings, norms, score head in bf16
    # three adapters: LoRA 512 + score head 8, fp32
    assert shared.parts["reward adapters: 3 x 520 params x 4 B"] == 3 * 520 * 4


def test_the_decode_loops_spare_cache_columns_are_planned():
    from caiflow.kv_cache import GROW_COLUMNS
    from caiflow.memory import SPARE_COLUMNS, engine_seq

    assert SPARE_COLUMNS == GROW_COLUMNS
    cfg = load_config(ROOT / "configs" / "7b-qlora.yaml").model_dump()
    assert engine_seq(cfg, 300, 256) == 300 + 64 and engine_seq(cfg, 300, 16) == 316  # min(64, new)
    cfg["generation"]["decoding"] = "generate"  # transformers' own loop: a cache of the tokens only
    assert engine_seq(cfg, 300, 256) == 300
    from caiflow.memory import KNOWN_SHAPES

    shapes = Shapes(KNOWN_SHAPES[cfg["model"]["name"]])
    loop = step_memory("baseline", load_config(ROOT / "configs" / "7b-qlora.yaml").model_dump(), shapes)
    plain = step_memory("baseline", cfg, shapes)
    assert loop.peak > plain.peak


def test_the_7b_preset_fits_24_gb_by_its_own_plan():
    from caiflow.memory import KNOWN_SHAPES

    cfg = load_config(ROOT / "configs" / "7b-qlora.yaml")
    shapes = Shapes(KNOWN_SHAPES[cfg.model.name])  # the plan needs no weights
    peaks = {s: step_memory(s, cfg.model_dump(), shapes).peak for s in STEPS}
    # a 24 GB card shows ~23.6 GiB (an L4 22.5): the preset stays under 22
    assert max(peaks.values()) < 22 * GIB, {s: round(p / GIB, 2) for s, p in peaks.items()}
    # the preset's header states the plan's figures
    header = (ROOT / "configs" / "7b-qlora.yaml").read_text().split("\nrun:")[0]
    for step, peak in peaks.items():
        assert f"{step} {peak / GIB:.1f}" in header, f"7b-qlora.yaml header lacks '{step} {peak / GIB:.1f}'"
    # without the shared 4-bit backbone and QLoRA policy, RL would not fit
    merged = load_config(
        ROOT / "configs" / "7b-qlora.yaml",
        ["reward_model.method=lora", "reward_model.shared_backbone=false", "rl.method=lora"],
    )
    assert step_memory("rl", merged.model_dump(), shapes).peak > 40 * GIB
    # the accelerate config it names for several GPUs is shipped
    launch = yaml.safe_load((ROOT / "configs" / cfg.launch.accelerate_config).read_text())
    assert launch["distributed_type"] == "DEEPSPEED" and launch["deepspeed_config"]["zero_stage"] == 2


def test_a_step_that_does_not_fit_stops_naming_the_setting():
    cfg = _cfg(sft={"lora": {"r": 2}, "batch_size": 8, "per_device_batch_size": 8, "max_length": 512})
    need = step_memory("sft", cfg, Shapes(SMALL)).peak
    with_ckpt = step_memory(
        "sft", {**cfg, "sft": {**cfg["sft"], "gradient_checkpointing": True}}, Shapes(SMALL)
    ).peak
    limit = (need + with_ckpt) / 2
    with pytest.raises(MemoryPlanError) as err:
        check_step("sft", cfg, Shapes(SMALL), limit)
    message = str(err.value)
    assert "\n" not in message and "set sft.gradient_checkpointing=true" in message
    assert check_step("sft", cfg, Shapes(SMALL), None).peak == need  # CPU only: never stops


def test_the_harness_stops_before_the_step(model_store, monkeypatch):
    from caiflow.constitution import load_constitution
    from caiflow.models import resolve_model
    from tasks.harness import run_step

    data = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    cfg = build_config(data, base_dir=ROOT / "configs")
    model = resolve_model(cfg.model.name, model_store, tiny=cfg.model.tiny.model_dump())
    constitution = load_constitution(cfg.constitution_path())
    monkeypatch.setenv("CAIFLOW_GPU_MEMORY_GIB", "1.1")  # tiny SFT plans ~1.16 GiB
    with pytest.raises(
        MemoryPlanError, match=r"step 'sft' needs ~1.2 GiB but the GPU shows 1.1 GiB: set sft\."
    ):
        run_step("sft", cfg, constitution, model, str(model_store), "f" * 16, upstream={})
    monkeypatch.setenv("CAIFLOW_GPU_MEMORY_GIB", "0.5")  # below the runtime reserve: nothing fits
    with pytest.raises(MemoryPlanError, match="no single setting fits it"):
        run_step("critique_revision", cfg, constitution, model, str(model_store), "f" * 16, upstream={})


def test_cli_prints_the_plan(model_store, capsys):
    from flows.cli import main

    assert (
        main(
            [
                "memory",
                "--config",
                str(ROOT / "configs" / "tiny.yaml"),
                "--storage",
                str(model_store),
                "--gpu-gib",
                "24",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    for step in STEPS:
        assert f"\n{step}: peak ~" in out
    assert "model  policy: 0.002B params, float32" in out and "fits" in out
