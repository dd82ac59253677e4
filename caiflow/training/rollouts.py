"""RL rollouts through caiflow's generation engine instead of TRL's ``model.generate`` (``rl.rollouts``).

TRL 1.16 generates RLOO/GRPO completions with ``generate`` on the policy as it trains: a PEFT
model whose every projection runs its LoRA branch (and its dropout) beside the base weight, one
token at a time for the whole batch until the longest completion ends. With ``rollouts: engine``
the trainer subclass below overrides that one method (``_generate_single_turn``):

- with float32 weights, the adapter's current update is added into copies of the base weights and
  the adapter is switched off while sampling (the policy's function without its per-layer detour
  and without LoRA dropout); the original weights are put back untouched afterwards, so training
  never sees the copies. 16-bit weights would round a small update away in such copies (RL's first
  steps would sample the SL policy), so there, and on a GPU without room for the copies, the
  engine samples with the adapter live;
- :class:`caiflow.generation.GenerationEngine` decodes (continuous batching, the prompts' shared
  prefix run once, an in-place KV cache) with per-row seeds from the run seed, the optimiser step,
  the process and the row's place in the generation batch, so a run repeats itself, and a row's
  completion does not depend on how TRL slices the batch into per-device passes;
- completions keep the EOS token they ended on (TRL scores and trains on it) and stop at
  ``max_completion_length`` as TRL's do;
- under bf16 autocast (``rl.bf16_autocast``) the trainer's passes compute in bfloat16 and the
  sampling in the model's own dtype (:func:`model_precision`; TRL's ``generate`` samples under
  the trainer's autocast, every product in bfloat16 with the weights cast per call).

Where that cannot stand in for TRL's own path (vLLM, multimodal prompts, top-k / min-p /
repetition penalty, 4-bit base weights, DoRA, LoRA on embeddings, modules trained whole, a model
the engine's loop cannot decode) the trainer generates TRL's way. The choice is made at the first
rollout, logged, and reported in the RL step's metrics (``rollouts``). `caiflow memory` counts the
copies in the RL step's sampling phase.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

from caiflow.seeds import row_seed

log = logging.getLogger(__name__)


@contextmanager
def merged_adapter(model: Any) -> Iterator[None]:
    """The active LoRA update added into copies of the base weights, the adapter switched off.

    The base layers' own weight tensors are set aside, never written, and restored on exit.
    """
    import torch

    swapped: list[tuple[Any, Any]] = []
    try:
        with torch.no_grad():
            for module in _lora_layers(model):
                adapters = [a for a in module.active_adapters if a in module.lora_A]
                if not adapters:
                    continue
                base = module.get_base_layer()
                weight = base.weight
                merged = weight + sum(module.get_delta_weight(a) for a in adapters).to(weight.dtype)
                swapped.append((base, weight))
                base.weight = torch.nn.Parameter(merged, requires_grad=False)
        with model.disable_adapter():
            yield
    finally:
        for base, weight in swapped:
            base.weight = weight


@contextmanager
def model_precision(model: Any) -> Iterator[None]:
    """Inside: the model computes in its own dtype, without the autocast that accelerate wraps a
    trained model's forward in under mixed precision (`bf16_autocast`).

    The trainer's autocast is for its passes; sampling under it would run every product in
    bfloat16 with the weights cast on each call (and off the CPU kernels' packed products). The
    wrapped forward is set aside and put back on exit.
    """
    original = model.__dict__.get("_original_forward")
    wrapped = model.__dict__.get("forward")
    if original is None or wrapped is None:
        yield
        return
    model.forward = original
    try:
        yield
    finally:
        model.forward = wrapped


def fallback_reason(trainer: Any, images: Any, multimodal_fields: Any) -> str | None:
    """Why this trainer must generate TRL's way, or None when the engine can stand in."""
    from caiflow.decoding import supports

    args = trainer.args
    if getattr(trainer, "use_vllm", False) or getattr(trainer, "use_transformers_continuous_batching", False):
        return "vLLM or transformers' continuous batching is configured"
    if images is not None and any(i is not None for i in images) or multimodal_fields:
        return "the prompts carry images"
    if (trainer.top_k or 0) > 0 or trainer.min_p is not None or trainer.repetition_penalty != 1.0:
        return "top_k, min_p or repetition_penalty is set"
    if getattr(args, "generation_kwargs", None):
        return "generation_kwargs is set"
    model = trainer.accelerator.unwrap_model(trainer.model)
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        return "the base weights are quantised (the adapter's update cannot be added into them)"
    if not hasattr(model, "disable_adapter") or not supports(model):
        return "the model is not a LoRA model the engine's loop can decode"
    return adapter_problem(model)


def adapter_problem(model: Any) -> str | None:
    """Why the adapter's update cannot be added into plain weight copies (None: it can): only LoRA on
    linear layers, without DoRA or LoRA biases, and no modules PEFT trains or swaps whole."""
    from peft.tuners.lora import Linear
    from peft.utils import ModulesToSaveWrapper

    for name, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper) or type(module).__name__.startswith("TrainableTokens"):
            return f"{name} is trained whole (modules_to_save or trainable tokens)"
    for module in _lora_layers(model):
        if not isinstance(module, Linear):
            return f"LoRA on a {type(module).__name__} layer (only linear layers merge here)"
        if any(module.use_dora.values()) or any(getattr(module, "lora_bias", {}).values()):
            return "the adapter uses DoRA or LoRA biases"
    return None


def can_merge(model: Any) -> str | None:
    """Why the engine keeps the adapter live instead of sampling from merged copies (None: it merges).

    16-bit weights would round a small update away (bfloat16 keeps 8 significant bits: RL's first
    steps would sample the SL policy), and a GPU needs room for the copies.
    """
    import torch

    weights = [m.get_base_layer().weight for m in _lora_layers(model)]
    if any(w.dtype != torch.float32 for w in weights):
        return "the base weights are 16-bit (the update would round away in merged copies)"
    device = weights[0].device if weights else torch.device("cpu")
    if device.type == "cuda":
        need, free = sum(w.nbytes for w in weights), torch.cuda.mem_get_info(device)[0]
        if need > 0.9 * free:
            gib = 2**30
            return f"the merged weight copies ({need / gib:.1f} GiB) do not fit ({free / gib:.1f} GiB free)"
    return None


def _lora_layers(model: Any) -> list[Any]:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def with_engine_rollouts(trainer_cls: type, seed: int, fast_cpu: bool = True) -> type:
    """`trainer_cls` (TRL's RLOOTrainer or GRPOTrainer) with its rollouts sampled by caiflow's engine.

    The choice (engine merged, engine with the adapter live, or TRL's way and why) is made at the first
    rollout, logged, and kept in `rollouts_used` for the step's metrics.
    """

    class EngineRollouts(trainer_cls):
        rollouts_used: str | None = None
        _engine: Any = None
        _merge = False

        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, *args, **kwargs):
            if self.rollouts_used is None:
                self._choose(images, multimodal_fields)
            if self._engine is None:
                return super()._generate_single_turn(prompt_ids, images, multimodal_fields, *args, **kwargs)
            completions = self._engine_completions([list(p) for p in prompt_ids])
            # GRPO also returns sampling log-probabilities (None: it computes them itself)
            return completions if trainer_cls.__name__.startswith("RLOO") else (completions, None)

        def _choose(self, images, multimodal_fields) -> None:
            from caiflow.generation import GenerationEngine

            reason = fallback_reason(self, images, multimodal_fields)
            if reason is not None:
                self.rollouts_used = f"trl ({reason})"
                log.warning("rl.rollouts: engine: sampling TRL's way instead, because %s", reason)
                return
            model = self.accelerator.unwrap_model(self.model)
            live = can_merge(model)
            self._merge = live is None
            self.rollouts_used = "engine, merged" if live is None else f"engine, adapter live ({live})"
            log.info("rl.rollouts: %s", self.rollouts_used)
            self._engine = GenerationEngine(model, self._tokenizer, batch_size=64, fast_cpu=fast_cpu)
            self._engine.eos_token_ids = list(self.eos_token_ids)

        def _engine_completions(self, prompts: list[list[int]]) -> list[list[int]]:
            from caiflow.generation import Sampling

            sampling = Sampling(
                max_new_tokens=self.max_completion_length,
                temperature=self.temperature,
                top_p=self.top_p if self.top_p is not None else 1.0,
            )
            step, rank = int(self.state.global_step), self.accelerator.process_index
            calls = self._rollout_calls = getattr(self, "_rollout_calls", {})
            call = calls[step] = calls.get(step, -1) + 1
            first = rank * len(prompts)  # each process's rows get their own numbers
            seeds = [row_seed(seed, f"rollout-{step}-{call}-{first + i}", "rl") for i in range(len(prompts))]
            model = self.accelerator.unwrap_model(self.model)
            with model_precision(model), merged_adapter(model) if self._merge else nullcontext():
                return self._engine.generate_tokens(prompts, sampling, seeds, keep_stop=True)

    EngineRollouts.__name__ = f"EngineRollouts{trainer_cls.__name__}"
    return EngineRollouts
