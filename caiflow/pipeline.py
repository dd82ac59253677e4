"""The pipeline, declared once: its steps, what each reads, and the order they run in.

The plan (fingerprints), the flow, the CLI, `caiflow status` and the deployments all read this
table; nothing else lists the steps. Importing it is cheap (no torch, no Prefect), so the CLI's
`--help` stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepSpec:
    name: str
    # Bump when the step's code changes what it writes: its artifacts (and everything downstream) re-run.
    version: int
    # The steps whose artifacts this one reads; each comes earlier in PIPELINE.
    inputs: tuple[str, ...]
    # Runs a model on the accelerator: the task takes a slot of the `gpu` concurrency limit.
    gpu: bool
    summary: str


PIPELINE: tuple[StepSpec, ...] = (
    # prompts 6, critique_revision 7, sft 4, preferences 6, reward_model 4, rl 6, baseline 3, evaluate 9:
    # on the CPU, inference multiplies through oneDNN with packed weights and a decode step's attention
    # is two batched products (caiflow.cpu_kernels, model.cpu_kernels); generation prefills rows of
    # similar length together; LoRA training's frozen weights multiply on packed copies too: logits,
    # rewards and gradients move at float-rounding level
    # prompts 5, preferences 5, evaluate 7: a prefix shared by a scoring call's contexts runs once
    # (categorising, AI feedback, the judge), which moves choice probabilities at float-rounding level
    StepSpec("prompts", 6, (), False, "load, normalise, dedupe, split, categorise by principle"),
    # critique_revision 5: under an inverted constitution prefer_refusals prefers compliant samples; 6: the
    # sampler fix below
    StepSpec("critique_revision", 7, ("prompts",), True, "answer, critique, revise: SL-CAI data"),
    # sft 3, rl 5: TRL's output head scores only the labelled positions on the CPU too
    # (`training.common.score_labelled_positions_only`): the same values up to the product's rounding
    # sft 5, reward_model 6 (and rl 8): on the CPU, training's attention is two float32 batched products
    # per key/value head (caiflow.cpu_kernels._training_attention) instead of SDPA's flash kernel:
    # gradients move at rounding level
    StepSpec("sft", 5, ("critique_revision",), True, "supervised fine-tuning on the revisions"),
    # preferences 4, baseline 2 (and critique_revision 6): the sampler's largest uniform rounded to 1.0
    # (infinite noise: a rare token won outright, or a pick outside the nucleus failed)
    StepSpec("preferences", 6, ("prompts", "sft"), True, "AI-feedback preference pairs"),
    # reward_model 3, rl 4, evaluate 8: reward scoring runs the sequences' shared prefix once (rewards move at
    # float-rounding level); rl 4 also: completions sampled by caiflow's engine (rl.rollouts)
    # reward_model 5, rl 7: a float32 reward model that trained under bf16 autocast is scored with bfloat16
    # products (ensemble.json's `products`; rewards move by ~3% of their spread, pair probabilities by at
    # most 0.012 on the demo); rl 7 also: rl.disable_dropout (on by default)
    StepSpec("reward_model", 6, ("preferences",), True, "reward model on the soft AI labels"),
    # rl 3, evaluate 5: the reward model scores in model.dtype (it loaded in float32 before)
    # rl 8: RLOO's old log-probabilities come from the trained pass (the same numbers); in float32 on the
    # CPU, TRL's no-grad passes multiplied the adapter by a stale packing of its first weights (torch's
    # fused AdamW writes without bumping the version the cache checked), so the KL term read zero
    StepSpec(
        "rl", 8, ("prompts", "sft", "reward_model"), True, "RL from the SL model against the reward model"
    ),
    # The base model's answers depend on no constitution: a constitution and its inversion share them.
    StepSpec(
        "baseline", 3, ("prompts",), True, "the evaluation prompts and the base model's answers to them"
    ),
    # evaluate 6: the stages answer shard by shard (batches end at shard boundaries, as in every
    # generation step), so an answer can differ from 5's by float noise
    StepSpec(
        "evaluate", 9, ("sft", "reward_model", "rl", "baseline"), True, "base vs SL vs RL: metrics, report"
    ),
)

STEPS: tuple[str, ...] = tuple(s.name for s in PIPELINE)
SPECS: dict[str, StepSpec] = {s.name: s for s in PIPELINE}


def spec(step: str) -> StepSpec:
    """The declaration of one step; an unknown name is a ValueError listing the valid ones."""
    try:
        return SPECS[step]
    except KeyError:
        raise ValueError(f"unknown step '{step}': choose one of {', '.join(STEPS)}") from None


def steps_until(until: str) -> tuple[StepSpec, ...]:
    """The steps up to and including `until`, in order."""
    return PIPELINE[: STEPS.index(spec(until).name) + 1]


def downstream(step: str) -> set[str]:
    """Every step that reads `step`'s artifact, directly or through other steps (not `step` itself)."""
    out: set[str] = set()
    for s in PIPELINE:
        if step in s.inputs or out.intersection(s.inputs):
            out.add(s.name)
    return out
