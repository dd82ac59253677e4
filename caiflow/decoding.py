"""caiflow's own decode loop: continuous batching, a shared-prefix KV cache and an exact, cheap sampler.

What :class:`caiflow.generation.GenerationEngine` runs instead of ``model.generate`` (its
``decoding="continuous"``, the default), for models whose cache is a plain ``DynamicCache``:

- Continuous batching. Up to ``batch_size`` rows decode together; a row leaves the batch at EOS
  or at ``max_new_tokens`` (``generate`` keeps decoding padding until the longest row ends), and
  pending prompts take the free slots (one prefill, merged into the running cache). Each row's
  cache is right-aligned: its last token sits in the last column, left of it are its own tokens
  and masked-out padding; positions are per row, so a row computes what it would alone, up to
  float noise (like any batch).
- Shared prefix. Prompts of one call that start with the same tokens (system prompt, few-shot
  turns, the chat template's preamble) have that prefix run once; every row starts from a copy
  of its key/value cache and only its own suffix is prefilled (the padding sits between prefix
  and suffix, masked out).
- An in-place cache (:class:`caiflow.kv_cache.GrowingCache`): a decode step writes its one new
  column into spare room of each layer's buffer instead of ``torch.cat``-ing the whole cache,
  which ``DynamicCache`` does every token. Batch surgery (retiring rows, merging new ones,
  copying the prefix) still copies, but only when rows leave or join.
- The sampler (:func:`pick_tokens`) returns exactly the token ``PerRowSampler`` picks (Gumbel-max
  over per-row hashed noise) without hashing the whole vocabulary: Gumbel noise from 24-bit
  uniforms lies within [GUMBEL_MIN, GUMBEL_MAX], so only tokens whose log-probability is within
  GUMBEL_MAX - GUMBEL_MIN of the best can win; the nucleus (top-p) comes from a growing top-k
  instead of a full-vocabulary sort.

A row's sampling step is the number of tokens it has generated, so its noise, and its text,
do not depend on when it entered the batch or which rows share it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from caiflow.faults import free_accelerator_memory, inject_oom, is_out_of_memory
from caiflow.kv_cache import GROW_COLUMNS, GrowingCache
from caiflow.sampling import pick_tokens

# ---------------------------------------------------------------- the loop


@dataclass
class _Batch:
    """The rows decoding together: each row's cache is right-aligned to the last column."""

    rows: list[int]  # request index of each row
    cache: Any  # GrowingCache (or a DynamicCache), (rows, heads, width, dim) per layer
    mask: torch.Tensor  # (rows, width) 1 where the cache column is one of the row's tokens
    positions: torch.Tensor  # (rows,) position id of the row's next token
    last: torch.Tensor  # (rows,) the token to feed next
    done: list[bool]


def supports(model: Any) -> bool:
    """Whether the loop can run this model: a plain DynamicCache (no sliding window, no static cache)."""
    try:
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        cache = DynamicCache(config=model.config)
    except Exception:  # an exotic config: let generate() handle it
        return False
    return all(type(layer) is DynamicLayer for layer in cache.layers) and not getattr(
        model.config, "is_encoder_decoder", False
    )


def cache_kwarg(model: Any) -> str:
    """The name the model's forward takes its KV cache by: `cache` in newer transformers, else
    `past_key_values`."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # past a PEFT wrapper
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def output_cache(out: Any) -> Any:
    """A forward's KV cache: `out.cache` in newer transformers (reading `past_key_values` warns there)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def common_prefix(prompts: Sequence[Sequence[int]]) -> int:
    """Length of the token prefix every prompt shares, leaving each at least one token of its own."""
    first, n = prompts[0], min(len(p) for p in prompts) - 1
    for p in prompts[1:]:
        k = 0
        while k < n and p[k] == first[k]:
            k += 1
        n = k
    return max(n, 0)


def prefix_kv(
    model: Any, ids: Sequence[int], cache_kwarg: str, last_logits: bool = True
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every layer's (keys, values) of one token prefix at positions 0..len-1 (batch 1).

    `last_logits`: ask a causal LM for its last position's logits only (a classifier takes no such flag).
    """
    from transformers import DynamicCache

    t = torch.tensor([list(ids)], device=model.device)
    out = model(
        input_ids=t,
        attention_mask=torch.ones_like(t),
        position_ids=torch.arange(t.shape[1], device=model.device).unsqueeze(0),
        use_cache=True,
        **({"logits_to_keep": 1} if last_logits else {}),
        **{cache_kwarg: DynamicCache(config=model.config)},
    )
    return [(layer.keys, layer.values) for layer in output_cache(out).layers]


def shared_prefix(
    model: Any, contexts: Sequence[Sequence[int]], min_tokens: int | None, cache_kwarg: str, last_logits=True
) -> tuple[int, list[tuple[torch.Tensor, torch.Tensor]]] | None:
    """(length, key/value cache) of the token prefix every context of a call shares, run once; None for
    fewer than two contexts or a prefix shorter than `min_tokens` (None: never)."""
    if min_tokens is None or len(contexts) < 2:
        return None
    p = common_prefix(contexts)
    if p < min_tokens:
        return None
    with torch.no_grad():
        return p, prefix_kv(model, contexts[0][:p], cache_kwarg, last_logits)


def start_from_prefix(cache: Any, kv: list[tuple[torch.Tensor, torch.Tensor]], rows: int) -> Any:
    """An empty cache made to hold a prefix's keys and values in each of `rows` rows.

    The rows are stride-0 views of the prefix: the next forward's update copies the prefix into
    each row's own buffer (torch.cat for a DynamicCache), and nothing writes into the views.
    """
    for layer, (k, v) in zip(cache.layers, kv):
        layer.lazy_initialization(k, v)
        layer.keys, layer.values = k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1)
    return cache


# What one more prefill forward pass costs, in prompt tokens: its Python and per-layer overhead, the
# merge of its cache into the batch, and smaller products running below the CPU's rate.
PREFILL_GROUP_COST = 64


def prefill_groups(lengths: Sequence[int]) -> list[list[int]]:
    """Indices of `lengths` in runs of similar length, each run padded to its longest row.

    The runs (of the lengths sorted longest first) minimise the tokens run, padding included, plus
    PREFILL_GROUP_COST per run: one long prompt among short ones no longer pads all of them to its
    length, and near-equal lengths still run together.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    n = len(order)
    best = [0.0] + [float("inf")] * n  # best[j]: cheapest split of the first j rows
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):  # rows i..j-1 as one run, padded to row i's length
            cost = best[i] + (j - i) * lengths[order[i]] + PREFILL_GROUP_COST
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups: list[list[int]] = []
    j = n
    while j > 0:
        groups.append(order[cut[j] : j])
        j = cut[j]
    return groups[::-1]


class ContinuousDecoder:
    """One generate call of the engine: `run(order)` decodes every prompt, in slots of engine.batch_size."""

    def __init__(
        self,
        engine: Any,
        prompts: list[list[int]],
        seeds: list[int],
        sampling: Any,
        prefix_min_tokens: int,
        on_done: Callable[[int], None],
    ):
        self.engine, self.model = engine, engine.model
        self.prompts, self.sampling, self.on_done = prompts, sampling, on_done
        self.device = self.model.device
        self.seeds = torch.tensor([int(s) % (1 << 62) for s in seeds], dtype=torch.int64)
        self.eos = torch.tensor(engine.eos_token_ids, device=self.device)
        self.out: list[list[int] | None] = [None] * len(prompts)
        self.tokens: dict[int, list[int]] = {}
        self.stops: dict[int, int] = {}  # the EOS token each row that ended on one picked
        p = common_prefix(prompts) if len(prompts) > 1 else 0
        self.prefix_len = p if p >= prefix_min_tokens else 0
        self.prefix_cache = None
        self.prefill_tokens = 0  # prompt tokens run through the model (shared prefix counted once)

    # -------------------------------------------------------- model calls

    def _forward(self, ids, mask, positions, cache):
        kwargs = {self.engine._cache_kwarg: cache}
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **kwargs,
        )
        return out.logits[:, -1], output_cache(out)

    def _new_cache(self) -> Any:
        """An empty cache whose decode steps write in place (no per-token copy of the whole cache).

        Its spare columns come `max_new_tokens` (at most GROW_COLUMNS) at a time: short answers
        never grow a fresh batch's buffers, and a long run moves them once per GROW_COLUMNS tokens.
        """
        return GrowingCache(self.model.config, grow=min(GROW_COLUMNS, self.sampling.max_new_tokens))

    def _prefix(self):
        if self.prefix_cache is None:
            ids = torch.tensor([self.prompts[0][: self.prefix_len]], device=self.device)
            cache = self._new_cache()
            pos = torch.arange(self.prefix_len, device=self.device).unsqueeze(0)
            self._forward(ids, torch.ones_like(ids), pos, cache)
            self.prefix_cache = [(layer.keys, layer.values) for layer in cache.layers]
            self.prefill_tokens += self.prefix_len
        return self.prefix_cache

    def _prefill(self, rows: list[int]) -> _Batch:
        """Run new rows' prompts (after the shared prefix) and pick each row's first token.

        Rows of similar length run together (`prefill_groups`), so short prompts are not padded to
        the longest one; the groups' caches are then merged into one batch.
        """
        inject_oom(len(rows))
        batch = None
        for group in prefill_groups([len(self.prompts[r]) - self.prefix_len for r in rows]):
            fresh = self._prefill_group([rows[i] for i in group])
            batch = fresh if batch is None else self._merge(batch, fresh)
        assert batch is not None
        return batch

    def _prefill_group(self, rows: list[int]) -> _Batch:
        p = self.prefix_len
        suffixes = [self.prompts[r][p:] for r in rows]
        width = max(len(s) for s in suffixes)
        ids = torch.full((len(rows), width), self.engine.pad_token_id, dtype=torch.long)
        smask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, s in enumerate(suffixes):
            ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            smask[i, width - len(s) :] = 1
        ids, smask = ids.to(self.device), smask.to(self.device)
        cache = self._new_cache()
        if p:
            start_from_prefix(cache, self._prefix(), len(rows))
            mask = torch.cat([torch.ones((len(rows), p), dtype=torch.long, device=self.device), smask], 1)
        else:
            mask = smask
        positions = (p + smask.cumsum(-1) - 1).clamp(min=0)
        self.prefill_tokens += sum(len(s) for s in suffixes)
        logits, cache = self._forward(ids, mask, positions, cache)
        batch = _Batch(
            rows=list(rows),
            cache=cache,
            mask=mask,
            positions=torch.tensor([len(self.prompts[r]) for r in rows], device=self.device),
            last=torch.zeros(len(rows), dtype=torch.long, device=self.device),
            done=[False] * len(rows),
        )
        for r in rows:
            self.tokens[r] = []
        self._take(batch, logits)
        return batch

    def _step(self, batch: _Batch) -> None:
        mask = torch.cat([batch.mask, batch.mask.new_ones((len(batch.rows), 1))], 1)
        logits, batch.cache = self._forward(
            batch.last.unsqueeze(1), mask, batch.positions.unsqueeze(1), batch.cache
        )
        batch.mask = mask
        batch.positions = batch.positions + 1
        self._take(batch, logits)

    def _take(self, batch: _Batch, logits: torch.Tensor) -> None:
        """Pick each live row's next token; EOS or the length limit ends the row."""
        s = self.sampling
        if s.greedy:
            picks = logits.argmax(dim=-1)
        else:
            steps = torch.tensor([len(self.tokens.get(r, ())) for r in batch.rows], dtype=torch.int64)
            picks = pick_tokens(
                logits, self.seeds[batch.rows].to(self.device), steps.to(self.device), s.temperature, s.top_p
            )
        batch.last = picks
        is_eos = torch.isin(picks, self.eos).tolist()
        for i, (r, tok) in enumerate(zip(batch.rows, picks.tolist())):
            if batch.done[i]:
                continue
            if is_eos[i]:
                batch.done[i] = True
                self.stops[r] = tok
            else:
                self.tokens[r].append(tok)
                batch.done[i] = len(self.tokens[r]) >= s.max_new_tokens
            if batch.done[i]:
                self.out[r] = self.tokens.pop(r)
                self.on_done(len(self.out[r]))

    # -------------------------------------------------------- batch surgery

    def _select(self, batch: _Batch, keep: list[int]) -> _Batch:
        """The rows `keep` of a batch, with padding columns no row uses trimmed off the left."""
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        mask = batch.mask[index]
        used = mask.any(dim=0).nonzero()
        start = int(used[0]) if used.numel() else mask.shape[1]
        for layer in batch.cache.layers:
            layer.keys, layer.values = layer.keys[index, :, start:], layer.values[index, :, start:]
        return _Batch(
            [batch.rows[i] for i in keep],
            batch.cache,
            mask[:, start:],
            batch.positions[index],
            batch.last[index],
            [batch.done[i] for i in keep],
        )

    @staticmethod
    def _merge(a: _Batch, b: _Batch) -> _Batch:
        """Two batches as one: the narrower one's cache is padded on the left (masked out)."""
        wa, wb = a.mask.shape[1], b.mask.shape[1]
        w = max(wa, wb)

        def stacked(ta: torch.Tensor, tb: torch.Tensor) -> torch.Tensor:
            """a's rows over b's, each right-aligned in `w` columns on dim -2 or -1 (zeros on the left)."""
            dim = 2 if ta.dim() == 4 else 1
            shape = list(ta.shape)
            shape[0], shape[dim] = ta.shape[0] + tb.shape[0], w
            out = ta.new_zeros(shape)
            out[: ta.shape[0]].narrow(dim, w - wa, wa).copy_(ta)
            out[ta.shape[0] :].narrow(dim, w - wb, wb).copy_(tb)
            return out

        for la, lb in zip(a.cache.layers, b.cache.layers):
            la.keys, la.values = stacked(la.keys, lb.keys), stacked(la.values, lb.values)
        return _Batch(
            a.rows + b.rows,
            a.cache,
            stacked(a.mask, b.mask),
            torch.cat([a.positions, b.positions]),
            torch.cat([a.last, b.last]),
            a.done + b.done,
        )

    # -------------------------------------------------------- driver

    def run(self, order: list[int]) -> list[list[int]]:
        """Decode every prompt (longest first as given); halve the slots on out-of-memory."""
        engine = self.engine
        pending = deque(order)
        batch: _Batch | None = None
        while pending or batch is not None:
            failed = False
            try:
                with torch.inference_mode():
                    batch = self._advance(batch, pending)
            except Exception as exc:
                if not is_out_of_memory(exc) or engine.batch_size == 1:
                    raise
                failed = True
            if failed:
                # Outside the except block, so the failed batch's frames and tensors are released.
                # Unfinished rows start again (their tokens depend only on their seeds).
                batch = None
                self.tokens.clear()
                pending = deque(r for r in order if self.out[r] is None)
                free_accelerator_memory()
                engine.batch_size = max(1, engine.batch_size // 2)
                engine.backoffs += 1
                engine.log_backoff()
        return [o if o is not None else [] for o in self.out]

    def _advance(self, batch: _Batch | None, pending: deque) -> _Batch | None:
        """One move: retire finished rows, refill free slots, or decode one token."""
        slots = self.engine.batch_size
        if batch is not None:
            finished = sum(batch.done)
            # Retiring copies the cache: wait until it frees a few slots (or all rows are done).
            if finished == len(batch.rows) or (finished and finished >= max(1, len(batch.rows) // 8)):
                keep = [i for i, d in enumerate(batch.done) if not d]
                batch = self._select(batch, keep) if keep else None
        live = 0 if batch is None else len(batch.rows)
        free = slots - live
        if pending and (batch is None or free >= max(1, slots // 4)):
            new = [pending.popleft() for _ in range(min(free, len(pending)))]
            fresh = self._prefill(new)
            if all(fresh.done):  # every new row ended at its first token
                return batch
            if any(fresh.done):
                fresh = self._select(fresh, [i for i, d in enumerate(fresh.done) if not d])
            return fresh if batch is None else self._merge(batch, fresh)
        if batch is not None:
            self._step(batch)
        return batch
