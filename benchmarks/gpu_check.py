"""One prepared GPU check: engine throughput and peak memory of a 7B-shaped pipeline.

    bash benchmarks/gpu_check.sh            # on the GPU machine (about 3-4 minutes on an H100)
    bash benchmarks/gpu_check.sh --smoke    # tiny configs on CPU, to validate the code paths
    bash benchmarks/gpu_check.sh --diagnose # only 1b below: why the engine is slower (about 1.5-2 min)
    bash benchmarks/gpu_check.sh --diagnose --profile  # 1b with its micro-benchmark and profiler too
    PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh --smoke   # with this repository's venv

Everything is built offline from configs with random weights; no download, no checkpoint. The
script imports only torch, numpy, transformers (with its ``tokenizers``), peft and
``caiflow.generation`` (which itself imports only torch, numpy and transformers), so it runs where
pydantic, trl and bitsandbytes are missing.

1. Generation throughput. A ~1.7B Llama-style model (SmolLM2-1.7B's shape) in bf16 generates
   128 new tokens for 128 synthetic chat prompts of 20-200 tokens, at batch sizes 32 and 128,
   once through ``caiflow.generation.GenerationEngine.generate_text`` (per-row seeded sampling)
   and once through plain batched ``model.generate`` (left padding, do_sample, same temperature
   0.7 and top_p 0.9, the same length-sorted order and batches). Only real new tokens count (up
   to EOS, no padding). So that running first (allocator growth, kernel selection and autotuning
   for new shapes) costs neither side, each side first runs one untimed full-size warm-up batch at
   that batch size (the first B prompts, 128 new tokens); then both are timed twice over all
   prompts in alternating order (engine, generate, generate, engine). The table gives each side's
   median of its two runs, their min-max and each run's seconds.
2. Peak accelerator memory of the memory-heavy parts of a 7B pipeline (Llama-2-7B shape, bf16):
   (a) weights, (b) one LoRA SFT step at 1x1024 and 4x1024 (gradient checkpointing, AdamW),
   (c) the KV cache of greedy generation at batch 32, prompt 512, 256 new tokens, (d) a LoRA
   reward-model step at 4 chosen + 4 rejected x 1024, (e) loading and deleting a second 7B model
   (a judge) next to the policy. Each measured peak stands next to the estimate of the project's
   memory plan (``caiflow.memory``, what ``caiflow memory`` prints, without its 1 GiB runtime
   reserve) and to the bare arithmetic, so the plan's formulas can be checked against it.
   Earlier H200 figures (which calibrated the plan): weights 12.58 GiB (arithmetic 12.55),
   LoRA SFT 1x1024 13.43 and 4x1024 15.71, KV cache 12.19 over the weights (arithmetic 12.00),
   LoRA reward step 4+4x1024 17.83, judge load 25.17 and 12.61 after del.
3. Device, library versions and timings.

1b. ``--diagnose`` runs only this (no sections 1 and 2; time guard 200 s unless ``--time-limit``):
   why the engine is slower than plain ``model.generate``, on section 1's model and prompts.
   (i) Syncs per forward of each variant below, on one short batch (torch.cuda's sync debug mode).
   (ii) At B=128 only: 1 generate do_sample (the baseline: temperature 0.7, top_p 0.9, top_k off),
   2 generate greedy, 3 engine greedy (temperature 0: the engine without its sampler), 4 engine
   sampling top_p 1.0 (no sort), 5 engine sampling top_p 0.9 (as in 1), 6 generate greedy with the
   engine's PerRowSampler passed directly as logits_processor. Each variant first runs one untimed
   full-size warm-up batch (the first 128 prompts, 128 new tokens); then all are timed twice, in
   the order 1..6 and then 6..1, so the order's effects show up and cancel. Per variant: real new
   tokens, forwards (prefill + decode steps, by a forward hook), seconds, tokens/s and ms per
   forward (medians of its two runs), tokens/s over the baseline's, min-max and each run's
   seconds, the warm-up's seconds. With ``--profile`` also, first, (iii) ``PerRowSampler.__call__``
   on one (128, 49152) scores tensor, whole and part by part (log_softmax, the top-p filter,
   row_uniforms, Gumbel noise + argmax, full_like + scatter), next to what generate does instead
   (its temperature and top-p warpers, softmax, multinomial): host ms to enqueue, wall ms with a
   synchronize, syncs per call; and last (iv) torch.profiler on one B=128 batch of 16 new tokens
   of variants 5 and 1: the top 15 ops by self CUDA time (and variant 5's top 10 by self CPU time).

Output: plain-text tables on stdout; when ``$OUT`` is set, also ``$OUT/gpu_check.txt`` and the
figures as ``$OUT/gpu_check.json`` (both rewritten after every part, so a run cut short still
leaves what it measured). A global time guard (``--time-limit``, 300 s) skips the parts not
started in time; an out-of-memory error in a part is recorded as "OOM" and the next part runs; any
other error is printed with its traceback, recorded as "ERROR", and makes the exit status 1.
``--skip generation`` or ``--skip memory`` leaves a section out.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    LogitsProcessorList,
    PreTrainedTokenizerFast,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from caiflow import memory as planner  # the memory plan's arithmetic (standard library only)
from caiflow.generation import GenerationEngine, Sampling

DTYPE = torch.bfloat16
GIB = float(1 << 30)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TEMPERATURE, TOP_P = 0.7, 0.9  # the sampling settings both generation sections compare at


# ---------------------------------------------------------------- sizes


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tie_embeddings: bool

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


@dataclass(frozen=True)
class Plan:
    """Every size the check uses; FULL for the GPU, SMOKE for a quick CPU pass over the same code."""

    gen_model: ModelShape
    n_prompts: int
    prompt_tokens: tuple[int, int]  # min, max prompt length in tokens (chat template included)
    new_tokens: int
    batch_sizes: tuple[int, ...]
    mem_model: ModelShape
    sft_batches: tuple[int, ...]
    sft_seq: int
    kv_batch: int
    kv_prompt: int
    kv_new: int
    rm_pairs: int
    rm_seq: int
    lora_r: int = 16
    lora_alpha: int = 32


# SmolLM2-1.7B's shape: big enough that a decode step is real GPU work, small enough that both
# sides x two batch sizes x 128 tokens take well under a minute on an H100.
SMOLLM2_1_7B = ModelShape(
    hidden=2048, layers=24, heads=32, kv_heads=32, intermediate=8192, vocab=49152, tie_embeddings=True
)
# Llama-2-7B: the common 7B shape, full multi-head attention (no GQA), so the KV cache is the largest
# a 7B pipeline meets; ~12.6 GiB of bf16 weights, which leaves room for every part on an 80 GB card.
LLAMA2_7B = ModelShape(
    hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008, vocab=32000, tie_embeddings=False
)
TINY = ModelShape(
    hidden=64, layers=2, heads=4, kv_heads=4, intermediate=172, vocab=1024, tie_embeddings=False
)

FULL = Plan(
    gen_model=SMOLLM2_1_7B,
    n_prompts=128,  # 4 batches at B=32, one at B=128: both batch sizes see the same prompts
    prompt_tokens=(20, 200),  # chat-sized prompts; varied so padding and length sorting matter
    new_tokens=128,
    batch_sizes=(32, 128),
    mem_model=LLAMA2_7B,
    sft_batches=(1, 4),  # per-device batch 1 and 4 at the SFT sequence length of the configs
    sft_seq=1024,
    kv_batch=32,
    kv_prompt=512,
    kv_new=256,  # a generation step of the pipeline at full batch
    rm_pairs=4,
    rm_seq=1024,  # 4 chosen + 4 rejected rows in one forward
)
SMOKE = Plan(
    gen_model=TINY,
    n_prompts=12,
    prompt_tokens=(20, 60),
    new_tokens=8,
    batch_sizes=(4, 12),
    mem_model=TINY,
    sft_batches=(1, 2),
    sft_seq=64,
    kv_batch=4,
    kv_prompt=32,
    kv_new=8,
    rm_pairs=2,
    rm_seq=64,
)


def llama_config(shape: ModelShape, tok_ids: dict[str, int] | None = None) -> LlamaConfig:
    ids = tok_ids or {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    return LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=shape.tie_embeddings,
        use_cache=True,
        **ids,
    )


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


# ---------------------------------------------------------------- device and memory helpers


class Clock:
    """Wall time since start, and the global guard that skips parts not started in time."""

    def __init__(self, limit_s: float):
        self.start = time.perf_counter()
        self.limit_s = limit_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def over(self) -> bool:
        return self.elapsed() > self.limit_s


def on_cuda(device: torch.device) -> bool:
    return device.type == "cuda"


def sync(device: torch.device) -> None:
    if on_cuda(device):
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if on_cuda(device):
        torch.cuda.empty_cache()


def reset_peak(device: torch.device) -> None:
    free(device)
    if on_cuda(device):
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GIB if on_cuda(device) else None


def alloc_gib(device: torch.device) -> float | None:
    return torch.cuda.memory_allocated(device) / GIB if on_cuda(device) else None


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def build_model(cls: type, config: LlamaConfig, device: torch.device) -> torch.nn.Module:
    """Random bf16 weights made directly on the device: no fp32 copy, no CPU init of billions of params."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(DTYPE)  # parameters are born bf16; RoPE's inv_freq stays fp32 (made explicitly)
    try:
        with device:
            model = cls(config)
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():  # the usual N(0, 0.02) for every matrix, on the device; norms stay at 1
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
    return model.eval()


def count(model: torch.nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


# ---------------------------------------------------------------- report


class Report:
    """Lines printed as they come and, with $OUT set, rewritten to gpu_check.txt/json after each part."""

    def __init__(self, out_dir: str | None):
        self.out = Path(out_dir) if out_dir else None
        self.lines: list[str] = []
        self.data: dict[str, Any] = {}
        if self.out:
            self.out.mkdir(parents=True, exist_ok=True)

    def line(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)

    def table(self, header: list[str], rows: list[list[Any]]) -> None:
        cells = [[_cell(c) for c in r] for r in [header, *rows]]
        widths = [max(len(r[k]) for r in cells) for k in range(len(header))]
        for n, r in enumerate(cells):
            self.line(
                "  ".join(
                    c.ljust(w) if k == 0 or k == len(r) - 1 else c.rjust(w)
                    for k, (c, w) in enumerate(zip(r, widths, strict=True))
                ).rstrip()
            )
            if n == 0:
                self.line("  ".join("-" * w for w in widths))

    def save(self) -> None:
        if self.out:
            (self.out / "gpu_check.txt").write_text("\n".join(self.lines) + "\n")
            (self.out / "gpu_check.json").write_text(json.dumps(self.data, indent=2) + "\n")


def _cell(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.2f}" if v == 0 or abs(v) >= 0.01 else f"{v:.2g}"  # smoke sizes are tiny
    return str(v)


# ---------------------------------------------------------------- tokenizer and prompts

# Words for the tokenizer's training text and for the prompts; the role names of the chat template
# are included so the template costs a few tokens, as with a real tokenizer.
WORDS = (
    "user assistant system the a an of to and in is it that for on with as was at by this be from or "
    "have not are but what all were when we there can your which their said if do will each about how "
    "up out them then she many some so these would other into has more her two like him see time could "
    "no make than first been its who now people my made over did down only way find use may water long "
    "little very after words called just where most know get through back much before go good new write "
    "our used me man too any day same right look think also around another came come work three word must "
    "because does part even place well such here take why help put different away again off went old "
    "number great tell men say small every found still between name should home big give air line set own "
    "under read last never us left end along while might next sound below saw something thought both few "
    "those always looked show large often together asked house world going want school important until form "
    "explain please answer question describe story river mountain city garden computer music history"
).split()

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer(max_vocab: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained in a second on fixed text: offline, deterministic, with a chat template."""
    rng = random.Random(0)
    text = [" ".join(rng.choice(WORDS) for _ in range(64)) for _ in range(2000)]
    specials = ["<pad>", "<s>", "<|im_end|>", "<|im_start|>"]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=max_vocab,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    core.train_from_iterator(text, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>"
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "left"
    if len(tok) > max_vocab:
        raise RuntimeError(f"tokenizer has {len(tok)} tokens, more than the model's {max_vocab}")
    return tok


def make_prompts(tok: PreTrainedTokenizerFast, n: int, lo: int, hi: int, seed: int = 0) -> list[str]:
    """n chat prompts whose token counts are spread evenly over [lo, hi] (template tokens included)."""
    rng = random.Random(seed)
    targets = np.linspace(lo, hi, n).round().astype(int).tolist()
    rng.shuffle(targets)  # input order unsorted, as in a real run; both sides sort by length
    prompts = []
    for target in targets:
        words = [rng.choice(WORDS) for _ in range(target)]
        while True:
            text = tok.apply_chat_template(
                [{"role": "user", "content": " ".join(words)}], tokenize=False, add_generation_prompt=True
            )
            if len(tok(text, add_special_tokens=False)["input_ids"]) <= target or len(words) == 1:
                break
            words.pop()
        prompts.append(text)
    return prompts


# ---------------------------------------------------------------- 1. generation throughput


def new_token_count(rows: list[list[int]], eos: set[int]) -> int:
    """Real new tokens: each row up to (not including) its first EOS; pads only ever follow an EOS."""
    return sum(next((k for k, t in enumerate(r) if t in eos), len(r)) for r in rows)


def hf_encode(tok, prompts: list[str]) -> list[list[int]]:
    # The chat text already starts with BOS (the template writes it), so no second one: the engine's rule.
    return [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]


def hf_config(tok, new_tokens: int, sample: bool = True) -> GenerationConfig:
    """The baseline's generation config: do_sample, temperature 0.7, top_p 0.9; or greedy (sample=False)."""
    ids = {"eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    if not sample:
        return GenerationConfig(max_new_tokens=new_tokens, do_sample=False, num_beams=1, **ids)
    return GenerationConfig(
        max_new_tokens=new_tokens,
        do_sample=True,
        temperature=TEMPERATURE,
        top_p=TOP_P,
        top_k=0,  # 0 = off (None means the library default, 50); the engine has none
        num_beams=1,
        **ids,
    )


def hf_generate(
    model,
    tok,
    prompts: list[str],
    batch: int,
    new_tokens: int,
    device: torch.device,
    sample: bool = True,
    processors: Callable[[list[int]], LogitsProcessorList] | None = None,
) -> int:
    """Plain batched model.generate, left-padded, longest prompts first (the engine's order); new tokens.

    Encodes, generates and decodes, as the engine's generate_text does, so both timings cover the same work.
    ``processors(seeds)``, if given, makes the logits processors of a batch from its rows' seeds (a row's
    seed is its prompt's index in ``prompts``), as the engine makes its PerRowSampler.
    """
    encoded = hf_encode(tok, prompts)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))  # stable sort, as the engine's
    config = hf_config(tok, new_tokens, sample)
    total = 0
    for start in range(0, len(order), batch):
        batch_rows = order[start : start + batch]
        rows = [encoded[i] for i in batch_rows]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for k, r in enumerate(rows):
            ids[k, width - len(r) :] = torch.tensor(r)
            mask[k, width - len(r) :] = 1
        extra = {"logits_processor": processors(batch_rows)} if processors is not None else {}
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config, **extra
            )
        new = out[:, width:].tolist()
        tok.batch_decode(new, skip_special_tokens=True)  # the engine decodes too: same work on both sides
        total += new_token_count(new, {tok.eos_token_id})
    return total


def setup_generation(plan: Plan, device: torch.device, rep: Report) -> tuple[Any, Any, list[str], list[int]]:
    """Tokenizer, random-weight model, prompts and their lengths in tokens, as sections 1 and 1b use them."""
    shape = plan.gen_model
    tok = build_tokenizer(min(shape.vocab, 4096))
    ids = {
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    t0 = time.perf_counter()
    model = build_model(LlamaForCausalLM, llama_config(shape, ids), device)
    model.generation_config = GenerationConfig(**ids)
    sync(device)
    build_s = time.perf_counter() - t0
    prompts = make_prompts(tok, plan.n_prompts, *plan.prompt_tokens)
    encoded = GenerationEngine(model, tok)._encode_prompts(prompts)
    if encoded != hf_encode(tok, prompts):
        raise RuntimeError("the engine and the baseline encode the prompts differently")
    lengths = [len(e) for e in encoded]
    rep.line(
        f"model: {count(model):,} params, {shape}, built in {build_s:.1f}s; "
        f"attention={model.config._attn_implementation}"
    )
    rep.line(
        f"tokenizer: {len(tok)} tokens; {len(prompts)} prompts of {min(lengths)}-{max(lengths)} tokens "
        f"(mean {np.mean(lengths):.0f}); {plan.new_tokens} new tokens, temperature 0.7, top_p 0.9"
    )
    return tok, model, prompts, lengths


# A timed variant: run(prompts, batch, new_tokens) -> (real new tokens, note).
Variant = tuple[str, Callable[[list[str], int, int], tuple[int, str]]]


def time_interleaved(
    variants: list[Variant],
    prompts: list[str],
    batch: int,
    new_tokens: int,
    device: torch.device,
    clock: Clock,
    rep: Report,
    counter: ForwardCounter | None = None,
    reps: int = 2,
    tag: str = "",
) -> dict[str, dict[str, Any]]:
    """Timings of several variants at one batch size in which running first favours or costs none of them.

    First a full-size warm-up of each variant, not timed: its first ``batch`` prompts at the real
    ``new_tokens`` (the allocator's growth to this size, kernel selection and autotuning for these shapes).
    Then ``reps`` timed runs of each over all the prompts, in alternating order (A B C, C B A, A B C, ...),
    so a drift along the run falls on every variant alike. The global RNG is reseeded before every run
    (generate's do_sample draws from it), so each run of a variant makes the same tokens; no empty_cache
    between runs, so no run starts from an empty allocator. Returns per variant ``warmup_s``, ``runs``
    (tokens, forwards, seconds, peak_gib, note; in repetition order), ``error`` (a failed variant is left
    out of the later runs) and ``skipped`` (runs the time guard left out).
    """
    fns = dict(variants)
    out: dict[str, dict[str, Any]] = {
        name: {"warmup_s": None, "runs": [], "error": None, "skipped": 0} for name, _ in variants
    }

    def once(name: str, ps: list[str], label: str) -> dict[str, Any] | None:
        gc.collect()
        torch.manual_seed(0)
        sync(device)
        if on_cuda(device):
            torch.cuda.reset_peak_memory_stats(device)
        if counter is not None:
            counter.n = 0
        t0 = time.perf_counter()
        try:
            tokens, note = fns[name](ps, batch, new_tokens)
            sync(device)
        except Exception as exc:
            traceback.print_exc()
            kind = "OOM" if is_oom(exc) else "ERROR"
            out[name]["error"] = f"{kind} {type(exc).__name__}: {str(exc)[:80]}"
            rep.data.setdefault("failed", {})[f"{tag}{name} B={batch} {label}"] = kind
            rep.line(f"  B={batch} {name} {label}: {kind} {type(exc).__name__}")
            free(device)
            return None
        secs = time.perf_counter() - t0
        forwards = counter.n if counter is not None else None
        rep.line(
            f"  B={batch} {name} {label}: {tokens} tokens"
            + (f", {forwards} forwards" if forwards is not None else "")
            + f", {secs:.2f}s (total {clock.elapsed():.0f}s)"
        )
        return {
            "tokens": tokens,
            "forwards": forwards,
            "seconds": secs,
            "peak_gib": peak_gib(device),
            "note": note,
        }

    warm_ps = prompts[:batch]
    for name, _ in variants:
        if clock.over():
            out[name]["skipped"] = reps + 1
            continue
        first = once(name, warm_ps, f"warm-up ({len(warm_ps)} prompts, not timed)")
        if first is not None:
            out[name]["warmup_s"] = first["seconds"]
    ready = [name for name, _ in variants if out[name]["warmup_s"] is not None]
    for r in range(reps):
        for name in ready if r % 2 == 0 else ready[::-1]:
            if out[name]["error"] is not None:
                continue
            if clock.over():
                out[name]["skipped"] += 1
                continue
            run = once(name, prompts, f"run {r + 1}/{reps}")
            if run is not None:
                out[name]["runs"].append(run)
    return out


def _middle(values: list[float]) -> float:
    """The median; the value itself when all are equal (token counts stay integers)."""
    return values[0] if len(set(values)) == 1 else statistics.median(values)


def summarize(result: dict[str, Any]) -> dict[str, Any] | None:
    """One variant's figures from its runs: medians, the spread of its seconds, its runs; None if none ran."""
    runs = result["runs"]
    if not runs:
        return None
    secs = [r["seconds"] for r in runs]
    forwards = [r["forwards"] for r in runs if r["forwards"]]
    peaks = [r["peak_gib"] for r in runs if r["peak_gib"] is not None]
    return {
        "tokens": _middle([r["tokens"] for r in runs]),
        "forwards": _middle(forwards) if forwards else None,
        "seconds": _middle(secs),
        "tokens_per_s": _middle([r["tokens"] / r["seconds"] for r in runs]),
        "ms_per_forward": (
            _middle([r["seconds"] / r["forwards"] * 1e3 for r in runs])
            if len(forwards) == len(runs)
            else None
        ),
        "min_s": min(secs),
        "max_s": max(secs),
        "runs_s": secs,
        "warmup_s": result["warmup_s"],
        "peak_gib": max(peaks) if peaks else None,
        "note": runs[-1]["note"],
        "error": result["error"],
        "skipped_runs": result["skipped"],
    }


def spread_cells(s: dict[str, Any]) -> list[str]:
    """The min-max and runs cells of a summary: "2.31-2.45" and "2.31/2.45" (seconds, repetition order)."""
    return [f"{_cell(s['min_s'])}-{_cell(s['max_s'])}", "/".join(_cell(x) for x in s["runs_s"])]


def status_note(s: dict[str, Any] | None, result: dict[str, Any], reps: int) -> str:
    """What went short for a variant: its error, or the runs the time guard left out."""
    if result["error"]:
        return result["error"]
    if s is None:
        return "skipped (time guard)"
    return f"{len(s['runs_s'])} of {reps} runs (time guard)" if len(s["runs_s"]) < reps else ""


def part_generation(plan: Plan, device: torch.device, clock: Clock, rep: Report) -> None:
    shape = plan.gen_model
    tok, model, prompts, lengths = setup_generation(plan, device, rep)
    seeds = list(range(len(prompts)))
    reps = 2

    def engine(ps: list[str], batch: int, n: int) -> tuple[int, str]:
        eng = GenerationEngine(model, tok, batch_size=batch)
        eng.generate_text(
            ps, Sampling(max_new_tokens=n, temperature=TEMPERATURE, top_p=TOP_P), seeds[: len(ps)]
        )
        return eng.generated_tokens, f"backoffs={eng.backoffs}"

    variants: list[Variant] = [
        ("engine", engine),
        ("generate", lambda ps, b, n: (hf_generate(model, tok, ps, b, n, device), "")),
    ]
    rep.line(
        f"each side: a full-size warm-up batch (first B prompts x {plan.new_tokens} new tokens, not timed), "
        f"then {reps} timed runs over all prompts in alternating order (engine, generate, generate, engine)"
    )
    rows, figures = [], {}
    for batch in plan.batch_sizes:
        if clock.over():
            rep.line(f"B={batch}: skipped (time guard)")
            continue
        results = time_interleaved(variants, prompts, batch, plan.new_tokens, device, clock, rep, reps=reps)
        sums = {name: summarize(results[name]) for name, _ in variants}
        e, g = sums["engine"], sums["generate"]
        ratio = e["tokens_per_s"] / g["tokens_per_s"] if e and g else None
        for name, _ in variants:
            s = sums[name]
            short = status_note(s, results[name], reps)
            if s is None:
                rows.append([f"{name} B={batch}", None, None, None, None, None, None, None, short])
                continue
            note = s["note"] if name == "engine" else f"engine/generate={_cell(ratio)}"
            note = "; ".join(x for x in (note, short) if x)
            rows.append(
                [f"{name} B={batch}", s["tokens"], s["seconds"], s["tokens_per_s"], s["peak_gib"]]
                + spread_cells(s)
                + [s["warmup_s"], note]
            )
        figures[str(batch)] = {**sums, "ratio_engine_over_generate": ratio}
        rep.data["generation"] = {"by_batch": figures}
        rep.save()
    rep.line(
        f"-- {len(prompts)} prompts x {plan.new_tokens} new tokens; tokens, seconds, tokens/s: median of the "
        f"{reps} runs; runs s: each run's seconds in the order of the repetitions"
    )
    rep.table(
        ["side", "tokens", "seconds", "tokens/s", "peak GiB", "min-max s", "runs s", "warm-up s", "note"],
        rows,
    )
    rep.data["generation"] = {
        "model": asdict(shape),
        "params": count(model),
        "prompts": len(prompts),
        "prompt_tokens": [min(lengths), max(lengths), float(np.mean(lengths))],
        "new_tokens": plan.new_tokens,
        "repetitions": reps,
        "order": "full-size warm-up of each, then A B, B A",
        "by_batch": figures,
    }


# ---------------------------------------------------------------- 1b. diagnosis: why the engine is slower


class ForwardCounter:
    """Counts the model's forward calls (prefill + decode steps), to put a per-step cost next to tokens/s."""

    def __init__(self, model: torch.nn.Module):
        self.n = 0
        self.handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, module, args) -> None:
        self.n += 1

    def close(self) -> None:
        self.handle.remove()


def count_syncs(fn: Callable[[], Any], device: torch.device) -> int | None:
    """Host-device synchronisations during fn() (torch.cuda's sync debug mode); None without CUDA."""
    if not on_cuda(device):
        fn()
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sync(device)  # outside the debug mode: this one is ours, not fn's
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def time_calls(fn: Callable[[], Any], calls: int, device: torch.device) -> tuple[float, float]:
    """(host ms per call to enqueue, wall ms per call with a synchronize at the end) over `calls` calls.

    wall >> host: the device is the bottleneck and wall is its time; wall ~ host: host-bound or syncing.
    """
    fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    sync(device)
    t2 = time.perf_counter()
    return (t1 - t0) / calls * 1e3, (t2 - t0) / calls * 1e3


def diag_sampler_micro(batch: int, vocab: int, device: torch.device, rep: Report, calls: int = 50) -> None:
    """PerRowSampler.__call__ on one (batch, vocab) bf16 scores tensor, whole and part by part."""
    from caiflow import generation as cgen  # attributes read here, so a renamed helper fails only this part

    g = torch.Generator(device=device).manual_seed(0)
    scores = torch.randn(batch, vocab, device=device, generator=g).to(DTYPE)  # ~ the random model's logits
    scores32 = scores.float()  # what generate passes to logits processors (it upcasts the logits)
    input_ids = torch.randint(3, vocab, (batch, 200), device=device, generator=g)
    seeds = list(range(batch))
    sampler = cgen.PerRowSampler(seeds, TEMPERATURE, TOP_P, device)
    sampler_p1 = cgen.PerRowSampler(seeds, TEMPERATURE, 1.0, device)
    logp = torch.log_softmax(scores.float() / TEMPERATURE, dim=-1)
    try:
        u = cgen.row_uniforms(sampler.seeds, 5, vocab)
    except Exception:  # its own row below reports the error; the other parts still run
        u = torch.rand(batch, vocab, device=device, generator=g)
    picks = (logp - torch.log(-torch.log(u))).argmax(dim=-1)
    warpers = LogitsProcessorList([TemperatureLogitsWarper(TEMPERATURE), TopPLogitsWarper(TOP_P)])
    parts: list[tuple[str, Callable[[], Any]]] = [
        ("PerRowSampler.__call__ top_p=0.9, bf16 scores", lambda: sampler(input_ids, scores)),
        ("PerRowSampler.__call__ top_p=0.9, fp32 scores", lambda: sampler(input_ids, scores32)),
        ("PerRowSampler.__call__ top_p=1.0, fp32 scores", lambda: sampler_p1(input_ids, scores32)),
        ("  a. log_softmax(scores.float() / T)", lambda: torch.log_softmax(scores.float() / TEMPERATURE, -1)),
        ("  b. top-p: log(_top_p_filter(exp))", lambda: torch.log(cgen._top_p_filter(logp.exp(), TOP_P))),
        ("  c. row_uniforms", lambda: cgen.row_uniforms(sampler.seeds, 5, vocab)),
        ("  d. gumbel noise + argmax", lambda: (logp - torch.log(-torch.log(u))).argmax(dim=-1)),
        (
            "  e. full_like(-inf) + scatter_",
            lambda: torch.full_like(scores32, float("-inf")).scatter_(1, picks.unsqueeze(1), 0.0),
        ),
        (
            "generate sampling: warpers+softmax+multinomial",
            lambda: torch.multinomial(
                torch.softmax(warpers(input_ids, scores32.clone()), dim=-1), num_samples=1
            ),
        ),
        ("generate greedy: argmax", lambda: scores32.argmax(dim=-1)),
    ]
    rows, figures = [], {}
    with torch.inference_mode():
        for name, fn in parts:
            try:
                host, wall = time_calls(fn, calls, device)
                syncs = count_syncs(fn, device)
                rows.append([name, host, wall, syncs])
                figures[name.strip()] = {"host_ms": host, "wall_ms": wall, "syncs": syncs}
            except Exception as exc:
                rows.append([name, None, None, f"ERROR {type(exc).__name__}: {str(exc)[:60]}"])
                figures[name.strip()] = {"error": f"{type(exc).__name__}: {exc}"}
    rep.line(
        f"-- PerRowSampler micro-benchmark: scores ({batch}, {vocab}), {calls} calls each; host = time "
        "to enqueue, wall = with one synchronize at the end (device-bound: wall >> host)"
    )
    rep.table(["part", "host ms/call", "wall ms/call", "syncs/call"], rows)
    rep.data.setdefault("diagnose", {})["sampler_micro"] = {
        "batch": batch,
        "vocab": vocab,
        "calls": calls,
        "parts": figures,
    }
    rep.save()


def diag_variants(
    model, tok, prompts: list[str], device: torch.device
) -> list[tuple[str, Callable[[list[str], int, int], tuple[int, str]]]]:
    """The timed variants: run(prompts, batch, new_tokens) -> (real new tokens, note)."""
    from caiflow import generation as cgen

    seeds = list(range(len(prompts)))

    def engine(temperature: float, top_p: float) -> Callable[[list[str], int, int], tuple[int, str]]:
        def run(ps: list[str], batch: int, n: int) -> tuple[int, str]:
            eng = GenerationEngine(model, tok, batch_size=batch)
            eng.generate_text(
                ps, Sampling(max_new_tokens=n, temperature=temperature, top_p=top_p), seeds[: len(ps)]
            )
            return eng.generated_tokens, f"backoffs={eng.backoffs}"

        return run

    def sampler(rows: list[int]) -> LogitsProcessorList:  # rows' seeds: their prompt indices
        return LogitsProcessorList([cgen.PerRowSampler(rows, TEMPERATURE, TOP_P, device)])

    return [
        ("1 generate sample p=0.9", lambda ps, b, n: (hf_generate(model, tok, ps, b, n, device), "baseline")),
        ("2 generate greedy", lambda ps, b, n: (hf_generate(model, tok, ps, b, n, device, sample=False), "")),
        ("3 engine greedy", engine(0.0, 1.0)),
        ("4 engine sample p=1.0", engine(TEMPERATURE, 1.0)),
        ("5 engine sample p=0.9", engine(TEMPERATURE, TOP_P)),
        (
            "6 generate greedy+PerRowSampler",
            lambda ps, b, n: (
                hf_generate(model, tok, ps, b, n, device, sample=False, processors=sampler),
                "p=0.9, direct",
            ),
        ),
    ]


def diag_generation(
    variants: list[Variant],
    prompts: list[str],
    batch: int,
    new_tokens: int,
    device: torch.device,
    counter: ForwardCounter,
    clock: Clock,
    rep: Report,
    reps: int = 2,
) -> None:
    """Every variant over all prompts at one batch size: full-size warm-ups, then interleaved timed runs."""
    order = " ".join(name.split()[0] for name, _ in variants)
    rep.line(
        f"-- B={batch}: each variant warmed up on a full batch ({min(batch, len(prompts))} prompts x "
        f"{new_tokens} new tokens, not timed), then {reps} timed runs each in alternating order "
        f"({order}, then reversed)"
    )
    results = time_interleaved(
        variants, prompts, batch, new_tokens, device, clock, rep, counter=counter, reps=reps, tag="diagnose "
    )
    sums = {name: summarize(results[name]) for name, _ in variants}
    base = sums[variants[0][0]]
    rows, figures = [], {}
    for name, _ in variants:
        s = sums[name]
        short = status_note(s, results[name], reps)
        if s is None:
            rows.append([name] + [None] * 11 + [short])
            figures[name] = {"error": results[name]["error"], "skipped_runs": results[name]["skipped"]}
            continue
        ratio = s["tokens_per_s"] / base["tokens_per_s"] if base else None
        rows.append(
            [name, s["tokens"], s["forwards"], s["seconds"], s["tokens_per_s"], s["ms_per_forward"], ratio]
            + spread_cells(s)
            + [s["warmup_s"], s["peak_gib"], "; ".join(x for x in (s["note"], short) if x)]
        )
        figures[name] = {**s, "ratio_vs_baseline": ratio}
    rep.data.setdefault("diagnose", {}).setdefault("by_batch", {})[str(batch)] = {
        "repetitions": reps,
        "variants": figures,
    }
    rep.line(
        f"-- B={batch}, {len(prompts)} prompts x {new_tokens} new tokens; tokens to ms/forward: median of "
        f"the {reps} runs; ratio = tokens/s over variant 1's; runs s: each run's seconds, repetition order"
    )
    rep.table(
        [
            "variant",
            "tokens",
            "forwards",
            "seconds",
            "tokens/s",
            "ms/forward",
            "ratio",
            "min-max s",
            "runs s",
            "warm-up s",
            "peak GiB",
            "note",
        ],
        rows,
    )
    rep.save()


def diag_syncs(
    variants,
    prompts: list[str],
    batch: int,
    device: torch.device,
    counter: ForwardCounter,
    rep: Report,
    new_tokens: int = 4,
) -> None:
    """Host-device synchronisations per forward of each variant, on one short batch."""
    rows, figures = [], {}
    for name, run in variants:
        try:
            counter.n = 0
            syncs = count_syncs(lambda run=run: run(prompts[:batch], batch, new_tokens), device)
            per = syncs / counter.n if syncs is not None and counter.n else None
            rows.append([name, counter.n, syncs, per])
            figures[name] = {"forwards": counter.n, "syncs": syncs, "syncs_per_forward": per}
        except Exception as exc:
            rows.append([name, None, None, f"ERROR {type(exc).__name__}: {str(exc)[:80]}"])
    rep.line(
        f"-- host-device syncs (torch.cuda sync debug mode), one batch of {batch} x {new_tokens} new tokens"
    )
    rep.table(["variant", "forwards", "syncs", "syncs/forward"], rows)
    rep.data.setdefault("diagnose", {})["syncs"] = figures
    rep.save()


def diag_profile(
    variants,
    prompts: list[str],
    batch: int,
    new_tokens: int,
    device: torch.device,
    counter: ForwardCounter,
    rep: Report,
) -> None:
    """torch.profiler on one short batch of the engine (top_p 0.9) and of plain generate: the top ops."""
    from torch.profiler import ProfilerActivity, profile

    chosen = {name: run for name, run in variants if name[0] in "15"}
    cuda = on_cuda(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    for name in sorted(chosen, reverse=True):  # the engine (5) first
        try:
            counter.n = 0
            sync(device)
            t0 = time.perf_counter()
            with profile(activities=activities) as prof:
                chosen[name](prompts[:batch], batch, new_tokens)
                sync(device)
            wall = time.perf_counter() - t0
            avg = prof.key_averages()
            dev_ms = sum(getattr(e, "self_device_time_total", 0) or 0 for e in avg) / 1e3 if cuda else None
            cpu_ms = sum(e.self_cpu_time_total for e in avg) / 1e3
            rep.line(
                f"-- profile: {name}, one batch of {batch} x {new_tokens} new tokens: "
                f"{counter.n} forwards, wall {wall:.2f}s (profiled), "
                f"self device total {_cell(dev_ms)} ms, self CPU total {cpu_ms:.1f} ms; top 15 by {key}"
            )
            for line in avg.table(sort_by=key, row_limit=15).splitlines():
                rep.line(line)
            if cuda and name.startswith("5 "):
                rep.line(f"-- profile: {name}: top 10 by self_cpu_time_total")
                for line in avg.table(sort_by="self_cpu_time_total", row_limit=10).splitlines():
                    rep.line(line)
            rep.data.setdefault("diagnose", {}).setdefault("profile", {})[name] = {
                "wall_s": wall,
                "forwards": counter.n,
                "self_device_ms": dev_ms,
                "self_cpu_ms": cpu_ms,
            }
        except Exception as exc:  # the profiler is a nicety: never the reason the run fails
            first = (str(exc).splitlines() or [""])[0][:200]
            rep.line(f"-- profile {name} failed: {type(exc).__name__}: {first}")
        rep.save()


def part_diagnose(plan: Plan, device: torch.device, clock: Clock, rep: Report, profile: bool = False) -> None:
    tok, model, prompts, _ = setup_generation(plan, device, rep)
    variants = diag_variants(model, tok, prompts, device)
    counter = ForwardCounter(model)
    big = max(plan.batch_sizes)
    steps: list[tuple[str, Callable[[], None]]] = []
    if profile:
        steps.append(
            ("sampler micro-benchmark", lambda: diag_sampler_micro(big, plan.gen_model.vocab, device, rep))
        )
    steps.append(("syncs", lambda: diag_syncs(variants, prompts, min(big, 8), device, counter, rep)))
    steps.append(
        (
            f"variants B={big}",
            lambda: diag_generation(variants, prompts, big, plan.new_tokens, device, counter, clock, rep),
        )
    )
    if profile:  # last, so no profiler state can touch the timings above
        steps.append(
            (
                "profile",
                lambda: diag_profile(variants, prompts, big, min(16, plan.new_tokens), device, counter, rep),
            )
        )
    else:
        rep.line("(sampler micro-benchmark and profiler: only with --profile)")
    try:
        for name, step in steps:
            rep.line()
            if clock.over():
                rep.line(f"[diagnose: {name}] skipped: over the {clock.limit_s:.0f}s time guard")
                rep.data.setdefault("skipped", []).append(f"diagnose {name}")
                continue
            t0 = time.perf_counter()
            try:
                step()
            except Exception as exc:
                traceback.print_exc()
                kind = "OOM" if is_oom(exc) else "ERROR"
                rep.line(f"[diagnose: {name}] {kind}: {type(exc).__name__}: {str(exc)[:200]}")
                rep.data.setdefault("failed", {})[f"diagnose {name}"] = kind
            free(device)
            rep.line(f"[diagnose: {name}] {time.perf_counter() - t0:.1f}s (total {clock.elapsed():.1f}s)")
            rep.save()
    finally:
        counter.close()


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


# ---------------------------------------------------------------- main


def run_part(name: str, fn: Callable[[], None], clock: Clock, rep: Report) -> None:
    if clock.over():
        rep.line(f"[{name}] skipped: over the {clock.limit_s:.0f}s time guard ({clock.elapsed():.0f}s)")
        rep.data.setdefault("skipped", []).append(name)
        rep.save()
        return
    t0 = time.perf_counter()
    try:
        fn()
    except Exception as exc:  # one shot on the GPU machine: note the failure and go on to the next part
        kind = "OOM" if is_oom(exc) else "ERROR"
        if kind == "ERROR":
            traceback.print_exc()
        rep.line(f"[{name}] {kind}: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}")
        rep.data.setdefault("failed", {})[name] = kind
    free(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    secs = time.perf_counter() - t0
    rep.data.setdefault("part_seconds", {})[name] = secs
    rep.line(f"[{name}] {secs:.1f}s (total {clock.elapsed():.1f}s)")
    rep.save()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--smoke", action="store_true", help="tiny configs (CPU is fine): validates the code paths"
    )
    parser.add_argument(
        "--time-limit",
        type=float,
        default=None,
        help="seconds after which parts not yet started are skipped (default 300; 200 with --diagnose)",
    )
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: generation,memory")
    parser.add_argument(
        "--diagnose",
        action="store_true",
        help="only section 1b: why the engine is slower than model.generate (syncs, the timed "
        "variants at the largest batch size); no sections 1 and 2",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="with --diagnose, also the PerRowSampler micro-benchmark and the torch.profiler tables",
    )
    args = parser.parse_args(argv)
    if args.time_limit is None:
        args.time_limit = 200.0 if args.diagnose else 300.0

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not args.smoke and not on_cuda(device):
        print("no CUDA device: the full check needs a GPU; use --smoke to validate on CPU", file=sys.stderr)
        return 2
    # Generation-flag and checkpointing notices would drown the tables; gradient_checkpointing_* is
    # renamed in newer transformers (a FutureWarning) but is the name the GPU machine's version has.
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.manual_seed(0)
    plan = SMOKE if args.smoke else FULL
    clock = Clock(args.time_limit)
    rep = Report(os.environ.get("OUT"))
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if args.diagnose:
        skip |= {"generation", "memory"}

    name = torch.cuda.get_device_name(device) if on_cuda(device) else platform.processor() or "cpu"
    total_mem = torch.cuda.get_device_properties(device).total_memory / GIB if on_cuda(device) else None
    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "numpy": np.__version__,
    }
    mode = (
        ("smoke" if args.smoke else "full")
        + (" diagnose" if args.diagnose else "")
        + (" profile" if args.diagnose and args.profile else "")
    )
    rep.data.update(
        {
            "mode": mode,
            "device": name,
            "device_total_gib": total_mem,
            "versions": versions,
            "time_limit_s": args.time_limit,
        }
    )
    rep.line(
        f"gpu_check ({mode}): device {name}"
        + (f", {total_mem:.1f} GiB" if total_mem else "")
        + f"; time guard {args.time_limit:.0f}s"
    )
    rep.line("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))

    if args.diagnose:
        rep.line()
        g = plan.gen_model
        rep.line(
            f"== 1b. diagnosis: engine vs model.generate ({g.hidden}-hidden, {g.layers} layers, "
            f"vocab {g.vocab}, bf16; batch size {max(plan.batch_sizes)})"
        )
        run_part("diagnose", lambda: part_diagnose(plan, device, clock, rep, args.profile), clock, rep)
        free(device)

    if "generation" not in skip:
        rep.line()
        g = plan.gen_model
        rep.line(
            f"== 1. generation throughput: engine vs batched model.generate ({g.hidden}-hidden, "
            f"{g.layers} layers, vocab {g.vocab}, bf16)"
        )
        run_part("generation", lambda: part_generation(plan, device, clock, rep), clock, rep)
        free(device)

    if "memory" not in skip:
        rep.line()
        m = plan.mem_model
        rep.line(
            f"== 2. peak memory, 7B-shaped pipeline ({m.hidden}-hidden, {m.layers} layers, "
            f"vocab {m.vocab}, bf16, LoRA r={plan.lora_r} on {len(LORA_TARGETS)} projections)"
        )
        mem = MemoryRows(rep)
        # c and e before d: the KV cache and the judge swap matter most to the planner if time runs short.
        for part, fn in [
            ("a+b weights, SFT", part_weights_and_sft),
            ("c KV cache", part_kv_cache),
            ("e judge", part_judge),
            ("d reward", part_reward),
        ]:
            run_part(part, lambda fn=fn: fn(plan, device, clock, mem), clock, rep)
        rep.line()
        rep.table(
            ["part", "measured peak GiB", "plan GiB", "arithmetic GiB", "note"],
            sorted(mem.rows, key=lambda r: r[0]),
        )
        if not on_cuda(device):
            rep.line("(no accelerator: measured figures are n/a)")

    rep.line()
    rep.line(f"total {clock.elapsed():.1f}s")
    rep.data["total_s"] = clock.elapsed()
    rep.save()
    return 1 if "ERROR" in rep.data.get("failed", {}).values() else 0


if __name__ == "__main__":
    sys.exit(main())
