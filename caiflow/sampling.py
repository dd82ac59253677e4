"""Per-row seeded sampling: each row's token is a pure function of its logits, its seed and its step.

- :func:`row_uniforms` hashes (seed, step, token) into uniforms (splitmix64, vectorised), so a
  row's draws never depend on its batch.
- :class:`PerRowSampler` is the ``transformers`` logits processor that samples with that noise
  (Gumbel-max) under ``generate``.
- :func:`pick_tokens` picks exactly the same token without hashing the whole vocabulary (what
  caiflow's own decode loop, `caiflow.decoding`, uses): only the nucleus (top-p), or without one
  only the tokens that the Gumbel noise's bound leaves able to win.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from transformers import LogitsProcessor


def _signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


# splitmix64 constants, as signed 64-bit integers (torch has no uint64 arithmetic).
_GOLDEN, _MIX1, _MIX2 = _signed(0x9E3779B97F4A7C15), _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)


def _lsr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


# The largest uniform: (2^24 - 0.5) / 2^24 rounds to 1.0 in float32, whose noise is infinite (the
# token would win outright, or turn a score outside the nucleus into NaN): it is clamped here.
U_MAX = 1.0 - 2.0**-24


def row_uniforms(seeds: torch.Tensor, step: int, vocab: int) -> torch.Tensor:
    """(rows, vocab) uniforms in (0, 1), a pure function of (row seed, step, token id).

    A counter-based hash (splitmix64) instead of one RNG per row: the whole batch's noise comes
    from a few vectorised integer operations, and a row's draws never depend on its batch.
    """
    idx = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    step_t = torch.tensor(
        step + 1, dtype=torch.int64, device=seeds.device
    )  # int64 math wraps, as a hash wants
    x = seeds.unsqueeze(1) * _GOLDEN + step_t * _MIX2 + idx.unsqueeze(0) * _MIX1
    x = (x ^ _lsr(x, 30)) * _MIX1
    x = (x ^ _lsr(x, 27)) * _MIX2
    x = x ^ _lsr(x, 31)
    return ((_lsr(x, 40).to(torch.float32) + 0.5) / float(1 << 24)).clamp_(max=U_MAX)


class PerRowSampler(LogitsProcessor):
    """Samples each row's next token with its own seeded noise, then leaves only that token.

    Gumbel-max: argmax(log p + Gumbel noise) is a draw from p. The noise of row r at step t is
    a hash of (seed_r, t, token), so a row's tokens do not depend on the other rows of the batch
    and a resumed run draws exactly what an uninterrupted one drew. Run under greedy decoding
    (``do_sample=False``): the sampled token is the only one not masked to -inf.
    """

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float, device: torch.device | str):
        if temperature <= 0:
            raise ValueError("PerRowSampler needs temperature > 0; use greedy decoding for temperature 0.")
        self.temperature = temperature
        self.top_p = top_p
        self.seeds = torch.tensor([int(s) % (1 << 62) for s in seeds], dtype=torch.int64, device=device)
        self.start: int | None = None  # prompt width: the step index is the number of tokens generated

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.start is None:
            self.start = input_ids.shape[1]
        logits = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            logits = torch.log(_top_p_filter(logits.exp(), self.top_p))  # -inf outside the nucleus
        u = row_uniforms(self.seeds, input_ids.shape[1] - self.start, scores.shape[-1])
        picks = (logits - torch.log(-torch.log(u))).argmax(dim=-1)
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(1, picks.unsqueeze(1), 0.0)
        return out


def _top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero the tail outside the nucleus; the most likely token always stays."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)


# ---------------------------------------------------------------- without hashing the whole vocabulary

# Bounds of -log(-log(u)) for the uniforms of `row_uniforms`, u in [2^-25, U_MAX].
GUMBEL_MAX = -math.log(-math.log1p(-(2.0**-24)))  # about 16.64
GUMBEL_MIN = -math.log(-math.log(2.0**-25))  # about -2.85
# Float slack on the candidate threshold: log(exp(x)) may differ from x by an ulp or two.
_SLACK = 1e-3
# Elementwise float ops on CPU take a vectorised path for whole vectors and a scalar one for the
# tail, which may round differently: candidate tensors are padded to a multiple of this.
_VEC = 64


def _noise(seeds: torch.Tensor, steps: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """-log(-log(u)) of `row_uniforms` for matching 1-D (seed, step, token) triples, bit for bit."""
    n = tokens.numel()
    pad = (-n) % _VEC
    if pad:
        z = torch.zeros(pad, dtype=torch.int64, device=tokens.device)
        seeds, steps, tokens = torch.cat([seeds, z]), torch.cat([steps, z]), torch.cat([tokens, z])
    x = seeds * _GOLDEN + (steps + 1) * _MIX2 + tokens * _MIX1
    x = (x ^ _lsr(x, 30)) * _MIX1
    x = (x ^ _lsr(x, 27)) * _MIX2
    x = x ^ _lsr(x, 31)
    u = ((_lsr(x, 40).to(torch.float32) + 0.5) / float(1 << 24)).clamp_(max=U_MAX)
    return torch.log(-torch.log(u))[:n]


# Elements hashed at once: small enough to stay in cache, large enough to keep per-op overhead low.
_CHUNK = 1 << 18
_TOKEN_TERMS: dict[tuple[int, str], torch.Tensor] = {}


def _full_vocab_pick(logp: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """argmax(logp - log(-log(row_uniforms))) per row, computed a few rows at a time and in place.

    The same integer and float operations as `row_uniforms` and PerRowSampler (so the same token),
    on buffers that stay in the CPU's cache instead of a dozen fresh (rows, vocab) int64 tensors.
    """
    rows, vocab = logp.shape
    key = (vocab, str(logp.device))
    if key not in _TOKEN_TERMS:
        _TOKEN_TERMS[key] = torch.arange(vocab, dtype=torch.int64, device=logp.device) * _MIX1
    terms = _TOKEN_TERMS[key]
    base = seeds * _GOLDEN + (steps + 1) * _MIX2  # int64 sums wrap, so the order of the terms is free
    chunk = max(1, min(rows, _CHUNK // vocab))
    x = torch.empty((chunk, vocab), dtype=torch.int64, device=logp.device)
    t = torch.empty_like(x)
    u = torch.empty((chunk, vocab), dtype=torch.float32, device=logp.device)
    picks = torch.empty(rows, dtype=torch.int64, device=logp.device)
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        xs, ts, us = x[:n], t[:n], u[:n]
        torch.add(terms, base[start : start + n].unsqueeze(1), out=xs)
        for shift, mult in ((30, _MIX1), (27, _MIX2), (31, None)):
            torch.bitwise_right_shift(xs, shift, out=ts)
            ts.bitwise_and_((1 << (64 - shift)) - 1)
            xs.bitwise_xor_(ts)
            if mult is not None:
                xs.mul_(mult)
        torch.bitwise_right_shift(xs, 40, out=ts)
        ts.bitwise_and_((1 << 24) - 1)
        us.copy_(ts)
        us.add_(0.5).div_(float(1 << 24)).clamp_(max=U_MAX)
        torch.log(us, out=us)
        us.neg_()
        torch.log(us, out=us)
        torch.sub(logp[start : start + n], us, out=us)
        picks[start : start + n] = us.argmax(dim=-1)
    return picks


def _padded_log(x: torch.Tensor) -> torch.Tensor:
    n = x.numel()
    pad = (-n) % _VEC
    return torch.log(torch.cat([x, x.new_ones(pad)]) if pad else x)[:n]


@contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run the sampler's many small elementwise ops on one thread (CPU only).

    Each op is a parallel region; on a busy machine a region waits for its slowest, preempted
    thread. Measured on two busy cores ((64, 49152) logits, load average 5): 35 ms on one thread,
    0.7 to 2.2 s on two. On a quiet machine one thread costs a few ms per step.
    """
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def pick_tokens(
    scores: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor, temperature: float, top_p: float
) -> torch.Tensor:
    """The token PerRowSampler would keep for each row of `scores` (rows, vocab), at per-row `steps`."""
    with _one_cpu_thread(scores.device):
        return _pick_tokens(scores, seeds, steps, temperature, top_p)


def _pick_tokens(
    scores: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor, temperature: float, top_p: float
) -> torch.Tensor:
    rows, vocab = scores.shape
    logp = torch.log_softmax(scores.float() / temperature, dim=-1)
    if top_p < 1.0:
        nucleus = _nucleus(logp, top_p)  # (rows, k): log(p) inside the nucleus, -inf outside
        if nucleus is None:  # PerRowSampler's own filter, then every token hashed
            return _full_vocab_pick(torch.log(_top_p_filter(logp.exp(), top_p)), seeds, steps)
        cand_idx, cand_val = nucleus
    else:
        return _bounded_pick(logp, seeds, steps)
    k = cand_idx.shape[1]
    noise = _noise(seeds.repeat_interleave(k), steps.repeat_interleave(k), cand_idx.reshape(-1)).view(rows, k)
    score = cand_val - noise
    # argmax over the vocabulary takes the lowest token id among equal scores: do the same
    top = score.max(dim=-1, keepdim=True).values
    tied = torch.where(score == top, cand_idx, torch.full_like(cand_idx, vocab))
    return tied.min(dim=-1).values


def _bounded_pick(logp: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """argmax(logp - log(-log(row_uniforms))) per row, hashing only the tokens that can still win.

    No token's noise exceeds GUMBEL_MAX, and the winner scores at least what the row's most likely
    token scores (s0): a token with log(p) below s0 - GUMBEL_MAX cannot win. With a peaked
    distribution that leaves a few hundred tokens of the vocabulary; a flat one (over a quarter of
    it left) hashes the whole vocabulary instead.
    """
    rows, vocab = logp.shape
    top_val, top_idx = logp.max(dim=-1)
    s0 = top_val - _noise(seeds, steps, top_idx)
    r, t = (logp >= (s0 - GUMBEL_MAX - _SLACK).unsqueeze(1)).nonzero(as_tuple=True)
    if r.numel() > rows * vocab // 4:
        return _full_vocab_pick(logp, seeds, steps)
    score = logp[r, t] - _noise(seeds[r], steps[r], t)
    best = torch.full((rows,), float("-inf"), device=logp.device).scatter_reduce(0, r, score, "amax")
    # argmax over the vocabulary takes the lowest token id among equal scores: do the same
    won = score == best[r]
    return torch.full((rows,), vocab, device=logp.device).scatter_reduce(0, r[won], t[won], "amin")


def _nucleus(logp: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Top-k token ids covering each row's nucleus, and log(p) there as _top_p_filter keeps it.

    None when the nucleus of some row is wider than an eighth of the vocabulary.
    """
    vocab = logp.shape[-1]
    k = min(64, vocab)
    while True:
        vals, idx = logp.topk(k, dim=-1)
        probs = vals.exp()
        mass_before = probs.cumsum(dim=-1) - probs
        # Every token past k has at least this much mass before it; once that reaches top_p, none is kept.
        if k == vocab or bool((mass_before[:, -1] + probs[:, -1] >= top_p).all()):
            break
        if k * 8 > vocab // 8:  # a wide nucleus (a flat distribution): one sort is cheaper than more top-k
            return None
        k = min(vocab, k * 8)
    kept = mass_before < top_p
    flat = _padded_log(probs[kept])
    out = torch.full_like(probs, float("-inf"))
    out[kept] = flat
    return idx, out
