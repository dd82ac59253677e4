"""Multiple-choice scoring for the generation engine: P(option | prompt) from the options' token
log-probabilities (categorising prompts, AI feedback, the judge).

:class:`ChoiceScoring` is a mixin of :class:`caiflow.generation.GenerationEngine`: it uses the
engine's model, tokenizer, encoding, OOM-halving batches (`_run_batched`) and CPU kernels.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from transformers import DynamicCache

from caiflow.decoding import output_cache, shared_prefix, start_from_prefix


class ChoiceScoring:
    """score_choices / score_choices_chat of GenerationEngine."""

    def score_choices(self, prompts: list[str], options: list[str]) -> np.ndarray:
        """P(option | prompt) over the given options, from each option's total token log-probability.

        Returns a (len(prompts), len(options)) float64 array whose rows sum to 1.
        """
        if len(options) < 1:
            raise ValueError("score_choices needs at least one option, e.g. ['(A)', '(B)'].")
        if not prompts:
            return np.zeros((0, len(options)), dtype=np.float64)
        contexts = self._encode_prompts(prompts)
        option_ids = [[self._option_ids(p, ctx, o) for o in options] for p, ctx in zip(prompts, contexts)]
        order = sorted(range(len(prompts)), key=lambda i: -len(contexts[i]))  # similar lengths batch together

        def run(batch: list[int]) -> list[list[float]]:
            return self._score_batch([contexts[i] for i in batch], [option_ids[i] for i in batch], prefix)

        with self._kernels():
            prefix = self._shared_prefix(contexts)
            logps = self._run_batched(order, run)
        totals = np.empty((len(prompts), len(options)), dtype=np.float64)
        for i, lp in zip(order, logps):
            totals[i] = lp
        totals -= totals.max(axis=1, keepdims=True)
        probs = np.exp(totals)
        return probs / probs.sum(axis=1, keepdims=True)

    def score_choices_chat(
        self, conversations: list[list[dict]], options: list[str], assistant_prefix: str = ""
    ) -> np.ndarray:
        """score_choices on each conversation formatted for the assistant's turn, plus a prefix."""
        return self.score_choices([self.format_chat(c) + assistant_prefix for c in conversations], options)

    def _option_ids(self, prompt: str, ctx: list[int], option: str) -> list[int]:
        """The option's tokens as they follow the prompt's tokens in prompt+option."""
        full = self._encode(prompt + option)
        if full[: len(ctx)] == ctx and len(full) > len(ctx):
            return full[len(ctx) :]
        # The tokenizer merged across the boundary: keep the prompt's tokens and append the
        # option tokenized alone, so every option is scored after the same context.
        opt = self.tokenizer(option, add_special_tokens=False)["input_ids"]
        if not opt:
            raise ValueError(f"option {option!r} has no tokens: options must be non-empty text.")
        return opt

    def _shared_prefix(self, contexts: list[list[int]]) -> tuple[int, list] | None:
        """decoding.shared_prefix for this engine (not on the `generate` path)."""
        if self.decoding != "continuous":
            return None
        return shared_prefix(self.model, contexts, self.prefix_min_tokens, self._cache_kwarg)

    def _score_batch(self, contexts: list[list[int]], options: list, prefix=None) -> list[list[float]]:
        """Total log-probability of each prompt's option tokens after its context.

        A prefix every context shares (`_shared_prefix`: a question's instructions) runs once per
        call. Each context runs once; its key/value cache is repeated for the K options, which then
        run together (a few tokens each): about one context forward instead of K.
        """
        k = len(options[0])
        p = prefix[0] if prefix else 0
        ids, mask = self._pad_left([c[p:] for c in contexts])
        positions = (p + mask.cumsum(-1) - 1).clamp(min=0)  # left padding: each row's own tokens follow p
        kwargs: dict[str, Any] = dict(input_ids=ids, position_ids=positions, use_cache=True)
        if prefix:
            cache = DynamicCache(config=self.model.config)
            kwargs[self._cache_kwarg] = start_from_prefix(cache, prefix[1], len(contexts))
            mask = torch.cat([mask.new_ones((len(contexts), p)), mask], 1)
        out = self._forward_last(attention_mask=mask, **kwargs)
        first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # (B, vocab): each option's first token
        flat = [o for row in options for o in row]  # B*K option token lists, prompt-major
        rows = torch.arange(len(contexts), device=first.device).repeat_interleave(k)
        firsts = torch.tensor([o[0] for o in flat], device=first.device)
        total = first[rows, firsts]
        width = max(len(o) for o in flat)
        if width > 1:  # later option tokens: run the options on the repeated cache
            cache = output_cache(out)
            cache.batch_repeat_interleave(k)
            opt = torch.full((len(flat), width), self.pad_token_id, dtype=torch.long)
            opt_mask = torch.zeros((len(flat), width), dtype=torch.long)
            for j, o in enumerate(flat):
                opt[j, : len(o)] = torch.tensor(o, dtype=torch.long)
                opt_mask[j, : len(o)] = 1
            opt, opt_mask = opt.to(ids.device), opt_mask.to(ids.device)
            lengths = mask.sum(-1).repeat_interleave(k).unsqueeze(1)
            logits = (
                self.model(
                    input_ids=opt,
                    attention_mask=torch.cat([mask.repeat_interleave(k, dim=0), opt_mask], dim=1),
                    position_ids=lengths + torch.arange(width, device=ids.device).unsqueeze(0),
                    use_cache=True,
                    **{self._cache_kwarg: cache},
                )
                .logits[:, :-1]
                .float()
            )
            logp = torch.log_softmax(logits, dim=-1).gather(-1, opt[:, 1:].unsqueeze(-1)).squeeze(-1)
            total = total + (logp * opt_mask[:, 1:]).sum(-1)
        return total.double().view(len(contexts), k).tolist()

    def _forward_last(self, **kwargs: Any) -> Any:
        """Forward pass keeping only the last position's logits when the model allows it."""
        if self._logits_to_keep:
            try:  # a (batch, length, vocab) logits tensor can be huge; only the last row is needed
                return self.model(**kwargs, logits_to_keep=1)
            except TypeError:
                self._logits_to_keep = False
        return self.model(**kwargs)
