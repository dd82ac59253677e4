"""RLOO's old log-probabilities taken from the pass that trains, instead of a pass of their own.

TRL 1.16's RLOO runs the policy three times over each generation batch: a no-grad pass for the
"old" log-probabilities (the KL term of the reward, and the denominator of the clipped ratio), a
no-grad pass with the adapter off for the reference, and the pass that trains. With one
optimiser step per generation batch (``steps_per_generation == 1``, one iteration) and dropout
off (``rl.disable_dropout``), the old pass and the trained pass are the same function of the same
weights on the same rows: TRL's ratio exp(logp - old_logp) is 1 up to rounding, and the KL takes
the same numbers.

The trainer subclass below therefore runs the old pass *with* gradients, keeps its graph, hands
TRL the detached log-probabilities for the KL and the advantages, and gives the same tensors,
graph and all, to the loss when it asks for the trained pass on those rows (TRL shuffles the rows
in between; a row index travels with them). The gradient is the one TRL's own path computes; the
policy runs twice per batch instead of three times. The graph's activations stay alive while the
reference pass and the reward model run.

Where the passes are not one function (dropout on, several optimiser steps or iterations per
generation batch, gradient checkpointing, evaluation, MoE aux losses) the trainer keeps TRL's
own pass; the step's metrics say which (``old_logps``).
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

ROW_KEY = "_old_pass_row"  # each row's place in the generation batch, shuffled with the rows


def own_pass_reason(trainer: Any) -> str | None:
    """Why `trainer` must compute the old log-probabilities in a pass of their own (None: it need not)."""
    args = trainer.args
    if not args.disable_dropout:
        return "dropout is on (the old pass draws its own dropout masks)"
    if args.steps_per_generation != 1 or trainer.num_iterations != 1:
        return "a generation batch is trained in several passes or iterations"
    if args.gradient_checkpointing:
        return "gradient checkpointing is on"
    if getattr(trainer, "aux_loss_enabled", False):
        return "the model adds an auxiliary loss"
    return None


def with_old_logps_from_trained_pass(trainer_cls: type) -> type:
    """`trainer_cls` (TRL's RLOOTrainer or a subclass) with the old pass and the trained pass as one.

    `old_logps_used` says which way the run went: "trained pass" or "own pass (why)".
    """
    import torch

    class OldLogpsFromTrainedPass(trainer_cls):
        old_logps_used: str | None = None
        _pending = False  # the next no-grad policy pass is the old pass to keep
        _kept: tuple | None = None  # (input_ids, per-token log-probs with graph, entropies)
        _rows: Any = None  # the rows the loss asks for, in their shuffled order

        def _generate_and_score_completions(self, inputs):
            if self.old_logps_used is None:
                reason = own_pass_reason(self)
                self.old_logps_used = "trained pass" if reason is None else f"own pass ({reason})"
                log.info("rl: old log-probabilities from the %s", self.old_logps_used)
            self._pending = self.model.training and self.old_logps_used == "trained pass"
            self._kept = None
            try:
                output = super()._generate_and_score_completions(inputs)
            finally:
                self._pending = False
            if self._kept is not None:
                ids = output["completion_ids"]
                output[ROW_KEY] = torch.arange(ids.size(0), device=ids.device)
            return output

        def _get_per_token_logps_and_entropies(
            self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
        ):
            if self._pending and not torch.is_grad_enabled():
                # TRL's old pass (the first policy pass of the batch): run it as the trained pass
                self._pending = False
                kwargs.update(batch_size=None, compute_entropy=True)
                with torch.enable_grad():
                    logps, entropies, aux = super()._get_per_token_logps_and_entropies(
                        model, input_ids, attention_mask, logits_to_keep, **kwargs
                    )
                self._kept = (input_ids, logps, entropies)
                return logps.detach(), None, aux
            if self._rows is not None and torch.is_grad_enabled():
                kept_ids, logps, entropies = self._kept
                rows, self._rows, self._kept = self._rows, None, None
                if torch.equal(kept_ids[rows], input_ids):
                    return logps[rows], entropies[rows], None
                log.warning("rl: the loss's rows are not the old pass's; computing the trained pass anew")
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
            )

        def _compute_loss(self, model, inputs):
            rows = inputs.pop(ROW_KEY, None)
            self._rows = rows if self._kept is not None else None
            try:
                return super()._compute_loss(model, inputs)
            finally:
                self._rows = None

    OldLogpsFromTrainedPass.__name__ = f"OldLogpsFromTrainedPass{trainer_cls.__name__}"
    return OldLogpsFromTrainedPass
