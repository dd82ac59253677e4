"""The generation engine: batched, per-row seeded sampling and multiple-choice scoring.

Every generation step (answers, critiques, revisions, preference samples, evaluation answers)
goes through :class:`GenerationEngine`. What it guarantees:

- Batched, left-padded generation; batches are sorted by prompt length, longest first (less
  padding, and an out-of-memory error shows up in the first batch rather than an hour in);
  results come back in input order.
- Per-row seeds: the text for row ``i`` depends only on its prompt, its seed and the sampling
  settings, not on which rows share its batch or on the batch size (up to float noise from
  padded attention). A resumed or re-batched run therefore reproduces an uninterrupted one.
- Out of memory: the failing batch is halved and redone, and the smaller size is kept for the
  rest of the call (``batch_size``, ``backoffs``); at one row the error is re-raised.
  ``CAIFLOW_FAULT_OOM_ABOVE_BATCH=N`` injects a real ``torch.OutOfMemoryError`` into any batch
  of more than N rows, so tests exercise the genuine recovery path.
- :meth:`GenerationEngine.score_choices` turns a multiple-choice question into probabilities
  from the log-probability of each option's tokens (the AI-feedback method of the design).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from transformers import GenerationConfig, LogitsProcessorList

from caiflow import cpu_kernels, int8
from caiflow.chat import chat_prompt
from caiflow.choice_scoring import ChoiceScoring
from caiflow.decoding import cache_kwarg
from caiflow.decoding import supports as supports_continuous
from caiflow.faults import free_accelerator_memory, inject_oom, is_out_of_memory
from caiflow.sampling import PerRowSampler, row_uniforms

log = logging.getLogger(__name__)

__all__ = ["GenerationEngine", "PerRowSampler", "Sampling", "row_uniforms"]

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Sampling:
    """How to sample one completion."""

    max_new_tokens: int = 128  # upper bound on generated tokens; generation stops earlier at EOS
    temperature: float = 0.7  # softmax temperature; 0 means greedy (argmax) decoding
    top_p: float = 1.0  # nucleus sampling: keep the smallest token set with this much mass; 1.0 = off

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens is {self.max_new_tokens}: set it to 1 or more.")
        if self.temperature < 0:
            raise ValueError(
                f"temperature is {self.temperature}: use 0 for greedy decoding or a positive value."
            )
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p is {self.top_p}: it must be in (0, 1]; 1.0 turns nucleus sampling off.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


# ---------------------------------------------------------------- engine

# A shared prefix shorter than this is not worth copying its cache into every row.
PREFIX_MIN_TOKENS = 16


def join_opening(opening: str, rest: str) -> str:
    """An answer's given opening (a conversation's final assistant message) joined to what the model
    wrote after it, which is decoded and stripped: a space between them unless the model went on
    with punctuation or the opening ends in whitespace. Openings should end on a word boundary."""
    if not rest or rest[0] in ".,;:!?)" or opening.endswith((" ", "\n")):
        return opening + rest
    return f"{opening} {rest}"


def engine_options(generation: Any, model: Any = None) -> dict[str, Any]:
    """GenerationEngine keyword arguments from a config's `generation` section (and `model`: its
    cpu_kernels; None: the default)."""
    return {
        **({"fast_cpu": model.cpu_kernels} if model is not None else {}),
        "decoding": generation.decoding,
        "prefix_min_tokens": PREFIX_MIN_TOKENS if generation.prefix_cache else None,
        "matmul": generation.matmul,
    }


class GenerationEngine(ChoiceScoring):
    """Batched generation and option scoring for one loaded causal LM and its tokenizer."""

    def __init__(
        self,
        model,
        tokenizer,
        batch_size: int = 16,
        max_input_tokens: int | None = None,
        progress: Callable[[int, int], None] | None = None,
        decoding: str = "continuous",
        prefix_min_tokens: int | None = PREFIX_MIN_TOKENS,
        matmul: str = "dtype",
        fast_cpu: bool = True,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size is {batch_size}: set it to 1 or more.")
        if matmul not in ("dtype", "int8"):
            raise ValueError(f"matmul is {matmul!r}: use 'dtype' (the model's own) or 'int8' (caiflow.int8).")
        # 'int8': a copy of the model whose linear layers multiply in int8 (CPU), sharing its other weights
        self.model = model if matmul == "dtype" else int8.quantize(model, tokenizer)
        # On the CPU: packed linear layers and decode attention (caiflow.cpu_kernels)
        why_not = cpu_kernels.unsupported(self.model) if fast_cpu else "model.cpu_kernels is false"
        self.fast_cpu = why_not is None
        self._packed: dict = {}  # module id -> packed weight, for this engine's lifetime
        if fast_cpu and why_not is not None:
            log.debug("caiflow's CPU kernels not used: %s", why_not)
        self.tokenizer = tokenizer
        self.batch_size = batch_size  # current batch size; halves on out-of-memory and stays halved
        self.max_input_tokens = max_input_tokens  # longer prompts are an error (drop them upstream)
        self.progress = progress  # progress(done_rows, total_rows) after every batch
        self.backoffs = 0  # how many times batch_size was halved
        self.generated_tokens = 0  # new tokens produced so far (EOS excluded), for throughput figures
        self.pad_token_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
        if self.pad_token_id is None:
            raise ValueError(
                "the tokenizer has neither a pad nor an EOS token: set tokenizer.pad_token first."
            )
        self.eos_token_ids = _eos_ids(model, tokenizer)
        self._cache_kwarg = cache_kwarg(model)
        self._logits_to_keep = True  # cleared if the model's forward does not take logits_to_keep
        if decoding not in ("continuous", "generate"):
            raise ValueError(f"decoding is {decoding!r}: use 'continuous' (caiflow's loop) or 'generate'.")
        # 'continuous': caiflow.decoding's loop (continuous batching, shared prefix, exact fast sampler),
        # where the model's cache allows it; 'generate': transformers' generate, one batch at a time.
        self.decoding = decoding if decoding == "generate" or supports_continuous(model) else "generate"
        # A prefix shared by every prompt of a call runs once when it has at least this many tokens
        # (None: never); shorter ones are not worth the copies.
        self.prefix_min_tokens = prefix_min_tokens
        self.prefill_tokens = 0  # prompt tokens run through the model (a shared prefix once), for figures

    def engine_metrics(self, start_batch_size: int) -> dict[str, Any]:
        """For a step's metrics: what out-of-memory back-off did, and the tokens this engine ran."""
        return {
            "oom_backoffs": self.backoffs,
            "final_batch_size": self.batch_size,
            "start_batch_size": start_batch_size,
            "generated_tokens": self.generated_tokens,  # new tokens, EOS excluded (throughput figures)
            "prefill_tokens": self.prefill_tokens,  # prompt tokens run; a shared prefix counted once
            "decoding": self.decoding,
        }

    # ------------------------------------------------------------ prompts

    def format_chat(self, conversation: list[dict]) -> str:
        return chat_prompt(self.tokenizer, conversation)

    def _encode(self, text: str) -> list[int]:
        # A chat template already writes the BOS token as text; do not add a second one.
        bos = self.tokenizer.bos_token
        add_special = not (bos and text.startswith(bos))
        return self.tokenizer(text, add_special_tokens=add_special)["input_ids"]

    def _encode_prompts(self, prompts: Sequence[str]) -> list[list[int]]:
        encoded = [self._encode(p) for p in prompts]
        for i, ids in enumerate(encoded):
            if not ids:
                raise ValueError(f"prompt {i} is empty (0 tokens): drop empty prompts before generating.")
            if self.max_input_tokens is not None and len(ids) > self.max_input_tokens:
                raise ValueError(
                    f"prompt {i} has {len(ids)} tokens, more than max_input_tokens={self.max_input_tokens}: "
                    "drop over-long prompts first (the prompts step drops them with a reason) "
                    "or raise the limit."
                )
        return encoded

    def _pad_left(self, rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            if r:
                ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
                mask[i, width - len(r) :] = 1
        device = self.model.device
        return ids.to(device), mask.to(device)

    def _kernels(self) -> Any:
        """How the model's forward passes run: caiflow's CPU kernels, or the model as it is."""
        return cpu_kernels.cpu_kernels(self.model, self._packed, enabled=self.fast_cpu)

    # ------------------------------------------------------------ batching with OOM backoff

    def _run_batched(self, items: Sequence[T], run: Callable[[list[T]], list[R]]) -> list[R]:
        """run() over consecutive batches of items; halve the batch on out-of-memory and redo it."""
        results: list[R] = []
        total, start = len(items), 0
        while start < total:
            batch = list(items[start : start + self.batch_size])
            out: list[R] | None = None
            try:
                inject_oom(len(batch))
                with torch.inference_mode():
                    out = run(batch)
            except Exception as exc:
                if not is_out_of_memory(exc) or len(batch) == 1:
                    raise
            if out is None:
                # Outside the except block, so the failed batch's frames and tensors are released.
                free_accelerator_memory()
                self.batch_size = max(1, len(batch) // 2)
                self.backoffs += 1
                log.warning(
                    "out of memory on a batch of %d rows: retrying with batch_size=%d (backoff %d)",
                    len(batch),
                    self.batch_size,
                    self.backoffs,
                )
                continue
            results.extend(out)
            start += len(batch)
            if self.progress is not None:
                self.progress(start, total)
        return results

    # ------------------------------------------------------------ generation

    def generate(self, conversations: list[list[dict]], sampling: Sampling, seeds: list[int]) -> list[str]:
        """One assistant answer per conversation (chat template applied), in input order."""
        return self.generate_text([self.format_chat(c) for c in conversations], sampling, seeds)

    def generate_text(self, prompts: list[str], sampling: Sampling, seeds: list[int]) -> list[str]:
        """One completion per already formatted prompt string, decoded and stripped, in input order."""
        ids = self.generate_ids(prompts, sampling, seeds)
        return [self.tokenizer.decode(r, skip_special_tokens=True).strip() for r in ids]

    def generate_ids(self, prompts: list[str], sampling: Sampling, seeds: list[int]) -> list[list[int]]:
        """The new token ids of each completion (up to, not including, EOS), in input order."""
        if len(seeds) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds: pass one seed per prompt.")
        return self.generate_tokens(self._encode_prompts(prompts), sampling, seeds) if prompts else []

    def generate_tokens(
        self, encoded: list[list[int]], sampling: Sampling, seeds: list[int], keep_stop: bool = False
    ) -> list[list[int]]:
        """generate_ids for prompts already tokenized; with `keep_stop`, a completion that ended on an EOS
        token ends with it (what a trainer scores), one cut off by max_new_tokens does not."""
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))  # longest first
        if self.decoding == "continuous":
            with self._kernels():
                return self._decode_continuous(encoded, seeds, sampling, order, keep_stop)

        def run(rows: list[int]) -> list[list[int]]:
            picked = [seeds[i] for i in rows]
            return self._generate_batch([encoded[i] for i in rows], picked, sampling, keep_stop)

        result: list[list[int]] = [[] for _ in encoded]
        with self._kernels():
            for i, out in zip(order, self._run_batched(order, run)):
                result[i] = out
        return result

    def _decode_continuous(
        self, encoded: list[list[int]], seeds: list[int], sampling: Sampling, order: list[int], keep: bool
    ) -> list[list[int]]:
        from caiflow.decoding import ContinuousDecoder

        total, done = len(encoded), [0]

        def finished(tokens: int) -> None:
            self.generated_tokens += tokens
            done[0] += 1
            if self.progress is not None and (done[0] % self.batch_size == 0 or done[0] == total):
                self.progress(done[0], total)

        no_prefix = self.prefix_min_tokens is None
        decoder = ContinuousDecoder(
            self, encoded, seeds, sampling, 1 << 30 if no_prefix else self.prefix_min_tokens, finished
        )
        out = decoder.run(order)
        self.prefill_tokens += decoder.prefill_tokens
        if keep:  # the EOS a row ended on
            out = [o + [decoder.stops[i]] if i in decoder.stops else o for i, o in enumerate(out)]
        return out

    def log_backoff(self) -> None:
        log.warning(
            "out of memory: retrying unfinished rows with batch_size=%d (backoff %d)",
            self.batch_size,
            self.backoffs,
        )

    def _generation_config(self, sampling: Sampling) -> GenerationConfig:
        # Sampling happens in PerRowSampler; the model's own generation settings (repetition
        # penalty, temperature, ...) are neutralised so Sampling alone decides the output.
        return GenerationConfig(
            max_new_tokens=sampling.max_new_tokens,
            do_sample=False,
            num_beams=1,
            temperature=1.0,
            top_k=None,
            top_p=1.0,
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            eos_token_id=self.eos_token_ids,
            pad_token_id=self.pad_token_id,
        )

    def _generate_batch(
        self, rows: list[list[int]], seeds: list[int], sampling: Sampling, keep_stop: bool = False
    ) -> list[list[int]]:
        input_ids, attention_mask = self._pad_left(rows)
        processors = LogitsProcessorList()
        if not sampling.greedy:
            processors.append(PerRowSampler(seeds, sampling.temperature, sampling.top_p, input_ids.device))
        out = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=self._generation_config(sampling),
            logits_processor=processors,
        )
        new = out[:, input_ids.shape[1] :].tolist()
        eos = set(self.eos_token_ids)
        result = []
        for toks in new:
            end = next((k for k, t in enumerate(toks) if t in eos), len(toks))
            result.append(toks[: end + 1] if keep_stop and end < len(toks) else toks[:end])
            self.generated_tokens += end
        return result


def _eos_ids(model, tokenizer) -> list[int]:
    """Every token that ends an answer: the tokenizer's EOS and the model's generation EOS ids."""
    ids: list[int] = []
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (tokenizer.eos_token_id, gen_eos):
        for t in value if isinstance(value, (list, tuple)) else [value]:
            if t is not None and t not in ids:
                ids.append(int(t))
    if not ids:
        raise ValueError(
            "neither the tokenizer nor the model defines an EOS token: generation could not stop."
        )
    return ids
