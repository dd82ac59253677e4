"""Section 2 of the GPU check: peak accelerator memory of the memory-heavy parts of a 7B pipeline
(weights, LoRA SFT steps, the KV cache of generation, a LoRA reward-model step, a judge loaded and
deleted next to the policy), each row next to the estimate of the project's memory plan
(``caiflow.memory``) and to the bare arithmetic of this module's ``n_params``, ``n_lora`` and
``kv_cache_bytes``.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from transformers import GenerationConfig, LlamaForCausalLM, LlamaForSequenceClassification

from caiflow import memory as planner  # the memory plan's arithmetic (standard library only)

from .common import (
    GIB,
    Clock,
    ModelShape,
    Plan,
    Report,
    _cell,
    alloc_gib,
    build_model,
    count,
    free,
    is_oom,
    llama_config,
    peak_gib,
    reset_peak,
    sync,
)

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---------------------------------------------------------------- arithmetic (what a planner computes)


def n_params(shape: ModelShape, head: str = "lm") -> int:
    """Parameter count of a Llama model from its shape; head "lm" (vocab outputs) or "score" (1 output)."""
    h, i, kv = shape.hidden, shape.intermediate, shape.kv_heads * shape.head_dim
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * i + 2 * h  # q,o + k,v + gate,up,down + 2 norms
    total = shape.vocab * h + shape.layers * per_layer + h  # embeddings, layers, final norm
    if head == "lm" and not shape.tie_embeddings:
        total += shape.vocab * h
    elif head == "score":
        total += h
    return total


def n_lora(shape: ModelShape, r: int) -> int:
    """LoRA parameters: r * (in + out) for each targeted projection of each layer."""
    h, i, kv = shape.hidden, shape.intermediate, shape.kv_heads * shape.head_dim
    per_layer = r * ((h + h) * 2 + (h + kv) * 2 + (h + i) * 2 + (i + h))  # q,o; k,v; gate,up; down
    return shape.layers * per_layer


def kv_cache_bytes(shape: ModelShape, batch: int, seq: int, elem: int = 2) -> int:
    return 2 * shape.layers * batch * seq * shape.kv_heads * shape.head_dim * elem


# ---------------------------------------------------------------- 2. memory of a 7B pipeline


class MemoryRows:
    """The memory table: part | measured peak GiB | plan GiB (caiflow.memory) | arithmetic GiB | note.

    "plan" is what `caiflow memory` estimates for the same work (its runtime reserve left out: the
    measured figure is torch's own peak counter, which does not see the CUDA context).
    """

    def __init__(self, rep: Report):
        self.rep = rep
        self.rows: list[list[Any]] = []
        rep.data.setdefault("memory", {})

    def add(
        self,
        part: str,
        measured: float | str | None,
        arithmetic: float | None,
        note: str,
        planned: float | None = None,
    ) -> None:
        self.rows.append([part, measured, planned, arithmetic, note])
        unit = " GiB" if isinstance(measured, float) else ""
        self.rep.line(
            f"  {part}: measured {_cell(measured)}{unit}, plan {_cell(planned)} GiB, "
            f"arithmetic {_cell(arithmetic)} GiB"
        )
        self.rep.data["memory"][part] = {
            "measured_gib": measured,
            "plan_gib": planned,
            "arithmetic_gib": arithmetic,
            "note": note,
        }
        self.rep.save()


def plan_shape(shape: ModelShape) -> planner.Shape:
    return planner.Shape(
        vocab=shape.vocab,
        hidden=shape.hidden,
        intermediate=shape.intermediate,
        layers=shape.layers,
        heads=shape.heads,
        kv_heads=shape.kv_heads,
        tie_embeddings=shape.tie_embeddings,
    )


def planned_training(plan: Plan, head: str, rows: int, seq: int, logit_tokens: int | None) -> float:
    """caiflow.memory's estimate of one LoRA step (bf16 base, fp32 adapters, checkpointing), GiB."""
    shape = plan_shape(plan.mem_model)
    lora = shape.lora_params(plan.lora_r) + (shape.hidden if head == "score" else 0)
    return (
        planner.weight_bytes(shape, 2, head)
        + planner.training_state_bytes(lora, 4)
        + planner.activation_bytes(shape, 2, rows, seq, True, logit_tokens)
    ) / GIB


def lora_config(plan: Plan, task_type: str) -> LoraConfig:
    return LoraConfig(
        r=plan.lora_r,
        lora_alpha=plan.lora_alpha,
        lora_dropout=0.05,
        target_modules=LORA_TARGETS,
        task_type=task_type,
    )


def prepare_for_training(model) -> None:
    """What the SFT and reward trainers do: checkpointing without reentrancy, input grads for the adapters."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.config.use_cache = False


def adapter_bytes(model) -> tuple[int, int]:
    """(trainable params, their bytes: weight + grad in the param's dtype + AdamW's two fp32 moments).

    peft keeps LoRA weights in fp32 on a bf16 base by default (16 bytes a param); a copied head stays bf16.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    return sum(p.numel() for p in trainable), sum(p.numel() * (2 * p.element_size() + 8) for p in trainable)


def part_weights_and_sft(plan: Plan, device: torch.device, clock: Clock, mem: MemoryRows) -> None:
    shape = plan.mem_model
    weights = n_params(shape) * 2
    reset_peak(device)
    model = build_model(LlamaForCausalLM, llama_config(shape), device)
    sync(device)
    actual = count(model)
    mem.add(
        "a. weights",
        peak_gib(device),
        weights / GIB,
        f"n_params*2; n_params {actual:,} (formula {n_params(shape):,})",
        planner.weight_bytes(plan_shape(shape), 2) / GIB,
    )

    prepare_for_training(model)
    model = get_peft_model(model, lora_config(plan, "CAUSAL_LM"))
    model.train()
    lora, lora_bytes = adapter_bytes(model)
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    for batch in plan.sft_batches:
        part = f"b. LoRA SFT step {batch}x{plan.sft_seq}"
        planned = planned_training(plan, "lm", batch, plan.sft_seq, None)
        if clock.over():
            mem.add(part, "skipped", None, "time guard", planned)
            continue
        ckpt = shape.layers * batch * plan.sft_seq * shape.hidden * 2  # one bf16 hidden state saved per layer
        logits = batch * plan.sft_seq * shape.vocab * 4  # the loss upcasts logits to fp32
        arith = weights + lora_bytes + ckpt + logits
        note = (
            f"weights + LoRA {lora:,} (formula {n_lora(shape, plan.lora_r):,}) x "
            f"{lora_bytes / lora:.0f}B (w+grad+AdamW {_cell(lora_bytes / GIB)}) "
            f"+ ckpt L*B*S*H*2 {_cell(ckpt / GIB)} + fp32 logits {_cell(logits / GIB)}; "
            "excl. 1-layer recompute"
        )
        try:
            reset_peak(device)
            x = torch.randint(1, shape.vocab, (batch, plan.sft_seq), device=device)
            loss = model(input_ids=x, labels=x, use_cache=False).loss
            loss.backward()
            optim.step()
            optim.zero_grad(set_to_none=True)
            sync(device)
            mem.add(part, peak_gib(device), arith / GIB, note, planned)
        except Exception as exc:
            if not is_oom(exc):
                raise
            mem.add(part, "OOM", arith / GIB, note, planned)
        loss = x = None
        optim.zero_grad(set_to_none=True)  # an OOM mid-step may leave gradients behind
        free(device)  # outside the except block: the failed step's tensors are unreachable by now


def part_kv_cache(plan: Plan, device: torch.device, clock: Clock, mem: MemoryRows) -> None:
    shape = plan.mem_model
    seq = plan.kv_prompt + plan.kv_new
    kv = kv_cache_bytes(shape, plan.kv_batch, seq)
    part = f"c. greedy generate KV {plan.kv_batch}x({plan.kv_prompt}+{plan.kv_new})"
    note = f"peak - weights; 2*L*B*S*kv_heads*head_dim*2, S={seq}"
    planned = planner.generation_bytes(plan_shape(shape), 2, plan.kv_batch, seq) / GIB
    reset_peak(device)
    model = build_model(LlamaForCausalLM, llama_config(shape), device)
    sync(device)
    base = alloc_gib(device)
    config = GenerationConfig(
        max_new_tokens=plan.kv_new,
        min_new_tokens=plan.kv_new,  # no early EOS stop
        do_sample=False,
        num_beams=1,
        use_cache=True,
        eos_token_id=2,
        pad_token_id=0,
    )
    try:
        reset_peak(device)
        x = torch.randint(3, shape.vocab, (plan.kv_batch, plan.kv_prompt), device=device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), generation_config=config)
        sync(device)
        secs = time.perf_counter() - t0
        if out.shape[1] != seq:
            raise RuntimeError(f"generated {out.shape[1] - plan.kv_prompt} of {plan.kv_new} tokens")
        peak = peak_gib(device)
        measured = None if peak is None else peak - base
        speed = f"{plan.kv_batch * plan.kv_new / secs:.0f} tok/s ({secs:.1f}s)"
        mem.add(part, measured, kv / GIB, f"{note}; {speed}", planned)
    except Exception as exc:
        if not is_oom(exc):
            raise
        mem.add(part, "OOM", kv / GIB, note, planned)


def part_reward(plan: Plan, device: torch.device, clock: Clock, mem: MemoryRows) -> None:
    shape = plan.mem_model
    rows = 2 * plan.rm_pairs
    part = f"d. LoRA reward step {plan.rm_pairs}+{plan.rm_pairs}x{plan.rm_seq}"
    weights = n_params(shape, head="score") * 2
    reset_peak(device)
    config = llama_config(shape)
    config.num_labels = 1
    model = build_model(LlamaForSequenceClassification, config, device)
    prepare_for_training(model)
    # SEQ_CLS also trains the score head (peft's modules_to_save), as a reward trainer does.
    model = get_peft_model(model, lora_config(plan, "SEQ_CLS"))
    model.train()
    lora, lora_bytes = adapter_bytes(model)
    ckpt = shape.layers * rows * plan.rm_seq * shape.hidden * 2
    arith = weights + lora_bytes + ckpt
    note = (
        f"weights (no LM head) + trainable {lora:,} (LoRA formula {n_lora(shape, plan.lora_r):,} + score "
        f"head {shape.hidden}) {_cell(lora_bytes / GIB)} + ckpt L*B*S*H*2 {_cell(ckpt / GIB)}; B={rows}; "
        "excl. 1-layer recompute"
    )
    planned = planned_training(plan, "score", rows, plan.rm_seq, 0)
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    try:
        reset_peak(device)
        # No pad id (0) in the rows, so the score is read at the last position.
        x = torch.randint(1, shape.vocab, (rows, plan.rm_seq), device=device)
        scores = model(input_ids=x, use_cache=False).logits.float().squeeze(-1)
        loss = -torch.nn.functional.logsigmoid(scores[: plan.rm_pairs] - scores[plan.rm_pairs :]).mean()
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        sync(device)
        mem.add(part, peak_gib(device), arith / GIB, note, planned)
    except Exception as exc:
        if not is_oom(exc):
            raise
        mem.add(part, "OOM", arith / GIB, note, planned)


def part_judge(plan: Plan, device: torch.device, clock: Clock, mem: MemoryRows) -> None:
    """A second 7B (the judge) loaded next to the policy, then deleted: its memory must come back."""
    shape = plan.mem_model
    weights = n_params(shape) * 2
    planned = planner.weight_bytes(plan_shape(shape), 2) / GIB  # the plan holds one model at a time
    policy = build_model(LlamaForCausalLM, llama_config(shape), device)
    sync(device)
    reset_peak(device)
    before = alloc_gib(device)
    try:
        judge = build_model(LlamaForCausalLM, llama_config(shape), device)
        sync(device)
        loaded = alloc_gib(device)
        peak = peak_gib(device)
        del judge
        free(device)
        after = alloc_gib(device)
        if before is None:
            mem.add(
                "e. judge load (2 models)",
                None,
                2 * weights / GIB,
                f"policy ({count(policy):,} params) + judge (no accelerator)",
                2 * planned,
            )
        else:
            back = abs(after - before) < 0.01
            mem.add(
                "e. judge load (2 models)",
                peak,
                2 * weights / GIB,
                f"policy ({count(policy):,} params) + judge; judge adds {loaded - before:.2f}",
                2 * planned,
            )
            mem.add(
                "e. judge after del",
                after,
                weights / GIB,
                f"policy only; before judge {before:.2f}; returned={back}; "
                f"reserved {torch.cuda.memory_reserved(device) / GIB:.2f}",
                planned,
            )
    except Exception as exc:
        if not is_oom(exc):
            raise
        mem.add("e. judge load (2 models)", "OOM", 2 * weights / GIB, "policy + judge", 2 * planned)
