"""RL rollouts: TRL's way (``generate`` on the live LoRA policy) against caiflow's engine (``rl.rollouts``).

    python benchmarks/rollouts.py [--storage DIR] [--batch 8,32] [--new-tokens 48] [--repeats 2]
    python benchmarks/rollouts.py --shape 1.7b --batch 8,64 --new-tokens 128   # GPU: bf16, random weights

Each batch is RL's: batch / 4 prompts, each 4 times (num_generations 4), sampled at temperature
0.9 with no top-p or top-k, as the RL step samples. The policy is the model with a fresh LoRA
adapter (r 16 on every projection, B drawn at random so the update is not zero) in training mode,
as TRL holds it while sampling. Sides:

- ``generate (TRL)``: ``model.generate`` on the PEFT model, left-padded, what TRL 1.16's RLOO/GRPO
  trainers do without vLLM (LoRA branches and their dropout on every token);
- ``engine, live adapter``: caiflow's engine on the same PEFT model;
- ``engine, merged``: the engine with the adapter's update added into copies of the weights and
  the adapter switched off (``caiflow.training.rollouts.merged_adapter``), what ``rl.rollouts:
  engine`` runs.

Every side first runs one untimed batch; then the sides run interleaved ``--repeats`` times and
the medians are printed: real new tokens (up to EOS), seconds, tokens/s and the ratio to TRL's
way. Default: the CPU default model with its tokenizer and the built-in prompts; ``--shape 1.7b``
builds SmolLM2-1.7B's shape with random bf16 weights and synthetic prompts on the accelerator
(the GPU check's builders, ``benchmarks/gpu/common.py``), needing only torch, transformers and
peft there.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import GenerationConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's caiflow

from caiflow.generation import GenerationEngine, Sampling
from caiflow.training.rollouts import merged_adapter

GROUP = 4  # completions per prompt, the demo's rl.num_generations
TEMPERATURE = 0.9  # RLConfig's default


def load_policy(args) -> tuple[torch.nn.Module, object, list[list[int]], torch.device]:
    """(LoRA policy in training mode, tokenizer-like object with pad/eos ids, prompt token ids, device)."""
    from peft import LoraConfig, get_peft_model

    if args.shape == "1.7b":
        from gpu import common as g

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        shape = g.TINY if args.smoke else g.SMOLLM2_1_7B
        tok = g.build_tokenizer(min(shape.vocab, 4096))
        special = {
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
        }
        model = g.build_model(g.LlamaForCausalLM, g.llama_config(shape, special), device)
        model.generation_config = GenerationConfig(**special)
        prompts = g.hf_encode(tok, g.make_prompts(tok, 64, 20, 200))
    else:
        from benchmarks.generation import load_prompts
        from caiflow.models import DEFAULT_MODEL, load_model_and_tokenizer, resolve_model

        device = torch.device("cpu")
        model, tok = load_model_and_tokenizer(resolve_model(DEFAULT_MODEL, args.storage), dtype="float32")
        prompts = [
            tok(tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True)).input_ids
            for c in load_prompts(64)
        ]
    torch.manual_seed(0)
    policy = get_peft_model(
        model,
        LoraConfig(
            r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"
        ),
    )
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.02)
    ids = SimpleNamespace(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return policy.train(), ids, prompts, device


def trl_generate(policy, ids, rows: list[list[int]], new_tokens: int, device) -> int:
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), ids.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r) :], mask[i, width - len(r) :] = torch.tensor(r), 1
    config = GenerationConfig(
        max_new_tokens=new_tokens,
        do_sample=True,
        temperature=TEMPERATURE,
        top_p=1.0,
        top_k=0,
        pad_token_id=ids.pad_token_id,
        eos_token_id=ids.eos_token_id,
        disable_compile=True,
    )
    with torch.no_grad():
        out = policy.generate(
            input_ids=input_ids.to(device), attention_mask=mask.to(device), generation_config=config
        )
    new = out[:, width:].tolist()
    return sum(next((k + 1 for k, t in enumerate(row) if t == ids.eos_token_id), len(row)) for row in new)


def engine_generate(policy, ids, rows, new_tokens: int, merged: bool) -> int:
    engine = GenerationEngine(policy, ids, batch_size=len(rows))
    sampling = Sampling(max_new_tokens=new_tokens, temperature=TEMPERATURE)
    seeds = list(range(len(rows)))
    if merged:
        with merged_adapter(policy):
            out = engine.generate_tokens(rows, sampling, seeds, keep_stop=True)
    else:
        out = engine.generate_tokens(rows, sampling, seeds, keep_stop=True)
    return sum(map(len, out))


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", default="storage", help="artifact root holding the cached default model")
    parser.add_argument("--shape", choices=("default", "1.7b"), default="default")
    parser.add_argument(
        "--smoke", action="store_true", help="with --shape 1.7b: a tiny shape (checks the code)"
    )
    parser.add_argument("--batch", default="8,32", help="comma-separated batch sizes (multiples of 4)")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    policy, ids, prompts, device = load_policy(args)
    print(
        f"rollouts: {args.shape} model on {device.type}, {GROUP} completions per prompt, {args.new_tokens} "
        f"new tokens at most, temperature {TEMPERATURE}, medians of {args.repeats} interleaved runs"
    )
    results: dict[str, dict[str, float]] = {}
    for batch in (int(b) for b in args.batch.split(",")):
        rows = [p for p in prompts[: batch // GROUP] for _ in range(GROUP)]
        sides = {
            "generate (TRL)": partial(trl_generate, policy, ids, rows, args.new_tokens, device),
            "engine, live adapter": partial(engine_generate, policy, ids, rows, args.new_tokens, False),
            "engine, merged": partial(engine_generate, policy, ids, rows, args.new_tokens, True),
        }
        runs: dict[str, list[tuple[int, float]]] = {name: [] for name in sides}
        for side in sides.values():  # warm-up
            side()
        for _ in range(args.repeats):
            for name, side in sides.items():
                sync(device)
                start = time.perf_counter()
                tokens = side()
                sync(device)
                runs[name].append((tokens, time.perf_counter() - start))
        base = None
        for name, r in runs.items():
            tokens = statistics.median(t for t, _ in r)
            seconds = statistics.median(s for _, s in r)
            rate = tokens / seconds
            base = base or rate
            results[f"{name} B={batch}"] = {"tokens": tokens, "seconds": seconds, "tokens_per_s": rate}
            print(
                f"B={batch:<4} {name:<22} {tokens:8.0f} tokens {seconds:7.2f} s {rate:8.1f} tokens/s "
                f"{rate / base:5.2f}x"
            )
    return results


if __name__ == "__main__":
    main()
