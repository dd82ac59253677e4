"""What the three trainers share: LoRA configs, model loading, checkpoints, out-of-memory back-off.

Training adapts to memory within a step: on out-of-memory the per-device batch is halved and
gradient accumulation doubled (the effective batch, and so the result, stays the same), and the
run resumes from its last checkpoint. ``CAIFLOW_FAULT_OOM_ABOVE_BATCH=N`` makes any step with a
per-device batch above N raise the real ``torch.OutOfMemoryError``, so that path can be tested;
``CAIFLOW_FAULT_KILL=<step>:checkpoint:<n>`` SIGKILLs the process right after checkpoint n is saved.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from caiflow.faults import free_accelerator_memory, is_out_of_memory
from caiflow.training.config import LoraSettings

log = logging.getLogger(__name__)

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


# ---------------------------------------------------------------- devices and seeds


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def seed_everything(seed: int) -> None:
    from transformers import set_seed

    set_seed(seed)


# ---------------------------------------------------------------- LoRA and models


def lora_config(
    settings: LoraSettings, task_type: str = "CAUSAL_LM", modules_to_save: list[str] | None = None
):
    """A peft LoraConfig from our settings ('all-linear' leaves the output head alone)."""
    from peft import LoraConfig

    targets = settings.target_modules
    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets if isinstance(targets, str) else list(targets),
        task_type=task_type,
        modules_to_save=modules_to_save,
        bias="none",
    )


def quantization_config(dtype: str = "float32"):
    """4-bit nf4 with double quantisation: the QLoRA recipe."""
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=getattr(torch, dtype),
    )


def load_base_for_training(
    path: Path,
    method: str = "lora",
    dtype: str = "float32",
    auto_class=None,
    gradient_checkpointing: bool = False,
    **kwargs: Any,
):
    """The model a trainer starts from: full precision, or 4-bit and prepared for k-bit training ('qlora').

    ``auto_class`` defaults to AutoModelForCausalLM; the reward model passes
    AutoModelForSequenceClassification.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from caiflow.models import quiet_transformers

    quiet_transformers()
    auto_class = auto_class or AutoModelForCausalLM
    load_kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype), **kwargs}
    if method == "qlora":
        from peft import prepare_model_for_kbit_training

        load_kwargs["quantization_config"] = quantization_config(dtype)
        load_kwargs["device_map"] = {"": 0} if has_cuda() else {"": "cpu"}
        model = auto_class.from_pretrained(path, **load_kwargs)
        # Casts norms to fp32 and enables input gradients (and checkpointing when asked for).
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
        return model
    model = auto_class.from_pretrained(path, **load_kwargs)
    if has_cuda():
        model.to("cuda")
    return model


# ---------------------------------------------------------------- checkpoints


def last_checkpoint(folder: Path) -> Path | None:
    """The highest-numbered complete ``checkpoint-N`` in folder, for ``resume_from_checkpoint``."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = []
    for p in folder.iterdir():
        m = _CHECKPOINT.match(p.name)
        if m and p.is_dir() and (p / "trainer_state.json").is_file():
            found.append((int(m.group(1)), p))
    return max(found)[1] if found else None


def trainer_args(
    cls,
    work_dir: Path,
    *,
    seed: int,
    learning_rate: float,
    per_device: int,
    accumulation: int,
    max_steps: int | None,
    epochs: float = 1.0,
    save_steps: int = 50,
    logging_steps: int = 10,
    gradient_checkpointing: bool = False,
    bf16_autocast: bool | str = False,
    **extra: Any,
):
    """TrainingArguments (or a TRL config subclass) with this project's defaults: local, quiet,
    checkpointed."""
    from caiflow.training.precision import check_bf16

    return cls(
        output_dir=str(work_dir),
        seed=seed,
        data_seed=seed,
        learning_rate=learning_rate,
        per_device_train_batch_size=per_device,
        per_device_eval_batch_size=per_device,
        gradient_accumulation_steps=accumulation,
        max_steps=max_steps if max_steps is not None else -1,
        num_train_epochs=epochs,
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=2,
        logging_steps=logging_steps,
        report_to="none",
        push_to_hub=False,
        disable_tqdm=True,  # metrics go to the log and the returned dict instead
        use_cpu=not has_cuda(),
        # precision is the model's dtype; `bf16_autocast` (true, or 'auto' where it pays) adds bf16 autocast
        bf16=check_bf16(bf16_autocast),
        fp16=False,
        # off unless the config asks (tiny and CPU runs); the new name keeps TRL's default (True) away
        activation_checkpointing=gradient_checkpointing,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,  # under accelerate launch: every parameter takes part
        **extra,
    )


# ---------------------------------------------------------------- logging


def quiet_libraries() -> None:
    """No progress bars from datasets or transformers: progress goes to the log and to callbacks."""
    import datasets

    from caiflow.models import quiet_transformers

    quiet_transformers()
    datasets.disable_progress_bars()
    # TRL still calls a transformers property that warns on every trainer; nothing to act on here
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    # bitsandbytes looks for optional CPU kernels (the `kernels` package) and warns when absent;
    # the 4-bit path works without them
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def score_labelled_positions_only(enabled: bool = True) -> bool:
    """Make TRL's fused LM head score only the positions that carry a label, on every device.

    SFT (completion-only loss) and RLOO/GRPO (log-probabilities of the completion) run the output
    head through ``trl.kernels.ChunkedLogProbFunction``. TRL hands it only the labelled positions
    on Triton devices; elsewhere every position, prompt and padding included, so that compiled
    tile shapes stay fixed on devices such as Neuron, and the unlabelled ones are zeroed after.
    On the CPU nothing is compiled and those positions are pure waste: more than half of the
    head's work in the demo's SFT and RL (the prompts, the chat preamble, the padding), which
    is itself a fifth of a step (``benchmarks/training.py --variants fp32,all-positions``). The
    labelled positions' values are the same either way, up to the matrix product's rounding.
    TRL's own choice stays where it decides by Triton (CUDA, XPU). Returns whether the switch is
    in place (False when this TRL has no such decision to make).
    """
    try:
        import trl.trainer.utils as trl_utils
    except ImportError:  # pragma: no cover - TRL is a dependency
        return False
    original = getattr(trl_utils, "_use_triton", None)
    if original is None:
        return False
    original = getattr(original, "_caiflow_original", original)
    if not enabled:
        trl_utils._use_triton = original
        return False

    def compact(device) -> bool:
        return device.type == "cpu" or original(device)

    compact._caiflow_original = original  # type: ignore[attr-defined]
    trl_utils._use_triton = compact
    return True


def log_to_logger(trainer):
    """Swap the Trainer's print-based log callback (used when tqdm is off) for one that uses `logging`."""
    from transformers import PrinterCallback, TrainerCallback

    class _LogCallback(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                # 4 significant digits, not 4 decimals: a learning rate of 1e-5 stays visible
                shown = {k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in logs.items()}
                log.info("step %d/%d %s", state.global_step, state.max_steps, shown)

    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(_LogCallback())
    return trainer


# ---------------------------------------------------------------- out-of-memory back-off


def fault_callback(step: str | None = None):
    """A TrainerCallback for the test fault switches (both off unless their environment variable is set).

    - ``CAIFLOW_FAULT_OOM_ABOVE_BATCH=N``: raise the real torch.OutOfMemoryError at the start of any
      optimiser step whose per-device batch is above N.
    - ``CAIFLOW_FAULT_KILL=<step>:checkpoint:<n>``: SIGKILL the process right after checkpoint n of
      the pipeline step ``step`` ("sft", "reward_model", "rl") is saved (see `caiflow.faults`).
    """
    from transformers import TrainerCallback

    from caiflow.faults import inject_oom, kill_point

    class _Faults(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            inject_oom(args.per_device_train_batch_size, "per-device batch")

        def on_save(self, args, state, control, **kwargs):
            if step:
                kill_point(f"{step}:checkpoint:{state.global_step}")

    return _Faults()


@dataclass
class RunOutcome:
    trainer: Any
    train_output: Any
    per_device_batch_size: int
    gradient_accumulation_steps: int
    backoffs: int = 0
    resumed_from: str | None = None
    attempts: list[dict] = field(default_factory=list)


def _smaller_batch(batch: int, per_device: int) -> int:
    """The largest divisor of the effective batch at most half the current per-device batch."""
    for d in range(per_device // 2, 0, -1):
        if batch % d == 0:
            return d
    return 0


def train_with_backoff(
    build: Callable[[int, int], Any],
    batch_size: int,
    per_device: int,
    checkpoints: Path,
    fast_cpu: bool = True,
) -> RunOutcome:
    """Build a trainer for (per_device, accumulation) and train it, resuming from the last checkpoint.

    On out-of-memory: halve the per-device batch, double accumulation, rebuild, resume. Gives up
    (re-raises) when the per-device batch is already 1. `fast_cpu`: on the CPU, frozen linear layers
    (LoRA's base weights) and passes that record no gradient run on packed weights
    (caiflow.cpu_kernels), kept for the whole run.
    """
    from caiflow.cpu_kernels import cpu_kernels

    backoffs = 0
    attempts: list[dict] = []
    from caiflow.training.launch import process_count

    while True:
        # under `accelerate launch` every process takes per_device of each optimiser step's batch
        accumulation = max(1, batch_size // (per_device * process_count()))
        resume = last_checkpoint(checkpoints)
        trainer = build(per_device, accumulation)
        try:
            with cpu_kernels(trainer.model, enabled=fast_cpu):
                output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        except BaseException as exc:  # noqa: BLE001 - filtered just below
            if not is_out_of_memory(exc):
                raise
            smaller = _smaller_batch(batch_size, per_device)
            attempts.append({"per_device_batch_size": per_device, "error": str(exc)[:200]})
            del trainer
            free_accelerator_memory()
            if smaller < 1:
                log.error("out of memory with a per-device batch of 1: nothing left to shrink")
                raise
            log.warning(
                "out of memory at per-device batch %d: retrying with %d (accumulation %d), resuming from %s",
                per_device,
                smaller,
                batch_size // smaller,
                last_checkpoint(checkpoints),
            )
            per_device = smaller
            backoffs += 1
            continue
        return RunOutcome(
            trainer, output, per_device, accumulation, backoffs, resume.name if resume else None, attempts
        )


def write_card(
    out_dir: Path,
    title: str,
    method: str,
    config: dict,
    seed: int,
    extra: dict | None,
    metrics: dict | None = None,
) -> None:
    """A short model card: what was trained, how, and from which inputs."""
    import json

    lines = [f"# {title}", "", f"- method: `{method}`", f"- seed: `{seed}`"]
    for key, value in (extra or {}).items():
        lines.append(f"- {key}: `{value}`")
    lines += [
        "",
        "## Config",
        "",
        "```json",
        json.dumps(config, indent=2, sort_keys=True, default=str),
        "```",
    ]
    if metrics:
        shown = {
            k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)
        }
        lines += ["", "## Metrics", "", "```json", json.dumps(shown, indent=2, sort_keys=True), "```"]
    (Path(out_dir) / "README.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def log_history_value(trainer, key: str) -> float | None:
    """The last logged value of key in the trainer's history (e.g. 'train_loss')."""
    for entry in reversed(trainer.state.log_history):
        if key in entry:
            return float(entry[key])
    return None
