"""What every part of the GPU check builds on: the sizes (ModelShape, Plan; FULL for the GPU, SMOKE
for a CPU pass), the Llama config and random-weight models built on the device, the device and
memory helpers, the time guard (Clock), the report that prints and saves the tables, and the
offline tokenizer and synthetic chat prompts. ``setup_generation`` builds what sections 1 and 1b
share; ``benchmarks/rollouts.py --shape 1.7b`` uses the builders too.
"""

from __future__ import annotations

import gc
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from caiflow.generation import GenerationEngine

DTYPE = torch.bfloat16
GIB = float(1 << 30)
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


# ---------------------------------------------------------------- model, tokenizer and prompts of 1 and 1b


def hf_encode(tok, prompts: list[str]) -> list[list[int]]:
    # The chat text already starts with BOS (the template writes it), so no second one: the engine's rule.
    return [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]


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
