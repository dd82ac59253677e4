"""Faster CPU kernels (``model.cpu_kernels``): packed linear layers, attention.

Two swaps, both inside the :func:`cpu_kernels` context:

- linear layers through oneDNN with prepacked weights (below);
- single-token attention (a decode step) as two batched products on the key/value heads, where
  SDPA's CPU flash kernel, made for long queries, took 0.61 ms for what the products do in 0.29 ms
  (64 rows, 9 query heads on 3 key/value heads, 70 cached columns: the default model's decoding);
  masked attention over several tokens with no gradient (prefill, choice and reward scoring)
  through SDPA's `enable_gqa`, without transformers' `repeat_kv` copies of every key/value head
  (categorising 150 prompts: 18.0-18.2 s against 26.5-27.6 s); and attention in training (a
  gradient to record, or a model in training mode) as two float32 batched products per key/value
  head, where the flash kernel's backward pass is slow at training's short sequences
  (:func:`_training_attention`: 8.2 against 16.3 ms per layer for 8 rows x 110 tokens in bfloat16).

Packed linear layers
--------------------

torch multiplies a float32 ``nn.Linear`` on the CPU through MKL's sgemm. On AMD EPYC (Zen 4) that
runs at 40-70% of what oneDNN's own kernel reaches on the same cores once the weight is reordered
into oneDNN's blocked layout, and the gap is widest at decoding's shapes: a (64 x 576) @ (576 x
49152) output layer ran at 108 against 206 GFLOP/s, (32 x 576) @ (576 x 49152) at 78 against 186
(README, "Packed weights"). Both are float32 products with float32 accumulation; they differ only
in the order of the additions, so logits move by float noise (a few 1e-6), as a different batch
size moves them.

:func:`packed_linears` is a context manager: inside it, every plain ``nn.Linear`` of a model on
the CPU in float32 or bfloat16 multiplies through ``torch.ops.mkldnn._linear_pointwise`` with a
copy of its weight reordered once (``_reorder_linear_weight``) and kept in a cache the caller
owns, keyed by the weight tensor and its version: a weight written in place or swapped (RL's
merged adapter copies) is packed again at its next use. In training, a frozen layer (LoRA's base
weights) also takes its input's gradient through a packed copy of W^T; a layer that trains (a
trainable weight in a module in training mode) runs torch's own product, with or without a
gradient to record, as does anything under autocast: torch's fused optimisers (the Trainer's
default) write the weights in place without bumping the version, so a packing of them could go
stale unseen. Outside the context the model is untouched.

``cpu_kernels(..., products=torch.bfloat16)`` has a float32 model's layers multiply in bfloat16
where no gradient is recorded, on bfloat16 packed copies (the input rounded to bfloat16, the output
returned in float32): what a reward model that trained under bf16 autocast is scored with
(`caiflow.training.reward_scorer`).

A packed copy costs one more copy of the linear layers' weights in (CPU) memory while the cache
lives (an engine's, a reward scorer's or a trainer's lifetime), two in training (W and W^T), and
RL keeps the merged copies' too. `caiflow memory` plans accelerator memory and leaves it out.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

DTYPES = (torch.float32, torch.bfloat16)
# the dtype packed layers multiply in when no gradient is recorded (None: the weights' own); `cpu_kernels`
# sets it for its duration
_PRODUCTS: ContextVar[torch.dtype | None] = ContextVar("caiflow_cpu_products", default=None)


def unsupported(model: Any) -> str | None:
    """Why this model's linear layers cannot be packed here (None: they can)."""
    try:
        param = next(model.parameters())
    except StopIteration:
        return "the model has no parameters"
    if param.device.type != "cpu":
        return f"the model is on {param.device.type} (packing is for the CPU)"
    if param.dtype not in DTYPES:
        return f"the model's dtype is {param.dtype} (oneDNN packing here is for float32 and bfloat16)"
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return f"torch {torch.__version__} was built without oneDNN's linear kernel"
    return None


def pack(weight: torch.Tensor) -> torch.Tensor:
    """A weight (out, in) reordered into oneDNN's layout for `_linear_pointwise`."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


class _Packed:
    """One weight packed, and what it was packed from: the tensor (weakly: a freed weight's successor
    may reuse its id and memory), its storage and its in-place write count. Its transpose, which a
    backward pass multiplies by, is packed on first use."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype | None = None):
        self.source = weakref.ref(weight)
        self.ptr, self.version = weight.data_ptr(), weight._version
        self.dtype = dtype or weight.dtype
        self.packed = pack(weight.detach().to(self.dtype))
        self._transposed: torch.Tensor | None = None

    def holds(self, weight: torch.Tensor, dtype: torch.dtype | None = None) -> bool:
        return (
            self.source() is weight
            and self.ptr == weight.data_ptr()
            and self.version == weight._version
            and self.dtype == (dtype or weight.dtype)
        )

    def transposed(self) -> torch.Tensor:
        if self._transposed is None:
            weight = self.source()
            assert weight is not None  # only called while the layer holds it
            self._transposed = pack(weight.detach().t().contiguous())
        return self._transposed


# Packed weights kept per layer: its own and, in RL, the merged copy the rollouts sample with.
KEEP_PER_LAYER = 2


def _lookup(
    cache: dict[int, list[_Packed]],
    module: torch.nn.Module,
    weight: torch.Tensor,
    dtype: torch.dtype | None = None,
) -> _Packed:
    entries = cache.get(id(module), [])
    for entry in entries:
        if entry.holds(weight, dtype):
            return entry
    # a stale packing of this very tensor (written since, or in another dtype) or of a freed one is let go
    kept = [e for e in entries if e.source() is not None and e.source() is not weight]
    entry = _Packed(weight, dtype)
    cache[id(module)] = [entry, *kept][:KEEP_PER_LAYER]
    return entry


def _product(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), packed, bias, "none", [], "")
    return y.view(*x.shape[:-1], y.shape[-1])


class _FrozenLinear(torch.autograd.Function):
    """x W^T + b for a frozen W (and b): both the forward and the input's gradient (grad W) through
    packed weights. No gradient for W or b: they take none."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, entry: _Packed, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.entry = entry
        return _product(x, entry.packed, bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return _product(grad.contiguous(), ctx.entry.transposed(), None), None, None


def _packed_forward(module: torch.nn.Linear, cache: dict[int, list[_Packed]]):
    def forward(x: torch.Tensor) -> torch.Tensor:
        weight, bias = module.weight, module.bias
        if x.dtype != weight.dtype or torch.is_autocast_enabled(x.device.type):
            return F.linear(x, weight, bias)  # autocast picks the product's dtype: leave it to torch
        trainable = weight.requires_grad or (bias is not None and bias.requires_grad)
        if module.training and trainable:
            # a layer in training: its optimiser writes the weight in place, and torch's fused optimisers
            # (the Trainer's default adamw_torch_fused) do so without bumping the version the cache checks
            return F.linear(x, weight, bias)
        recording = torch.is_grad_enabled() and (x.requires_grad or trainable)
        products = _PRODUCTS.get()
        if not recording and products is not None and products != x.dtype:
            entry = _lookup(cache, module, weight, products)
            low = None if bias is None else bias.to(products)
            return _product(x.to(products), entry.packed, low).to(x.dtype)
        if not recording:
            return _product(x, _lookup(cache, module, weight).packed, bias)
        if trainable:
            return F.linear(x, weight, bias)  # a trained layer: torch's product and its gradients
        return _FrozenLinear.apply(x, _lookup(cache, module, weight), bias)

    return forward


# ---------------------------------------------------------------- decode attention

ATTENTION = "caiflow_cpu_sdpa"  # registered with transformers beside "sdpa", with sdpa's masks
# training's attention keeps its float32 scores for the backward pass (flash attention keeps none): above
# this many scores per layer (256 MiB of them) it stays on SDPA's kernel
TRAINING_ATTENTION_MAX_SCORES = 2**26
# keyword arguments only SDPA's own path handles (attention sinks, soft-capping, biases, windows)
_SDPA_ONLY = ("s_aux", "sinks", "softcap", "position_bias", "sliding_window")


def decode_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, with a single query token on the CPU as two batched products.

    The query heads that share a key/value head are stacked as that head's rows (no `repeat_kv`
    copy of the cache), the boolean mask sends masked columns to -inf before the softmax, as SDPA
    does. Several query tokens in training (a gradient recorded, or the module in training mode) go
    to :func:`_training_attention`; otherwise, under a boolean mask, to SDPA with `enable_gqa` (no
    `repeat_kv` copies either). Anything else (dropout, a float mask, the arguments in _SDPA_ONLY)
    goes to transformers' SDPA path as before.
    """
    simple = (
        query.device.type == "cpu"
        and not dropout
        and (attention_mask is None or attention_mask.dtype == torch.bool)
        and not any(kwargs.get(k) is not None for k in _SDPA_ONLY)
        and query.shape[1] % key.shape[1] == 0
    )
    recording = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    score_count = query.shape[0] * query.shape[1] * query.shape[2] * key.shape[2]
    training = recording or getattr(module, "training", False)
    if simple and query.shape[2] > 1 and training and score_count <= TRAINING_ATTENTION_MAX_SCORES:
        # training, and a trainer's passes without a gradient (RL's old and reference log-probabilities):
        # one attention for all of them, so those passes and the trained one take the same kernels
        return _training_attention(module, query, key, value, attention_mask, scaling, is_causal), None
    if simple and query.shape[2] > 1 and attention_mask is not None and not recording:
        # a prompt's tokens under a padding mask (prefill, scoring): SDPA reads each key/value head
        # for its group of query heads (enable_gqa) instead of transformers' repeat_kv copies
        out = F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=attention_mask,
            scale=scaling,
            enable_gqa=key.shape[1] != query.shape[1],
        )
        return out.transpose(1, 2).contiguous(), None
    if not simple or query.shape[2] != 1:
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=is_causal,
            **kwargs,
        )
    rows, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    q = query.reshape(rows, kv_heads, heads // kv_heads, dim)  # (rows, kv heads, group, dim)
    scores = torch.matmul(q, key.transpose(-1, -2))  # (rows, kv heads, group, columns)
    scores.mul_(dim**-0.5 if scaling is None else scaling)
    if attention_mask is not None:  # (rows, 1, 1, columns): True where a column is attended
        scores.masked_fill_(~attention_mask, float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), value)  # (rows, kv heads, group, value dim)
    return out.reshape(rows, 1, heads, value.shape[-1]), None


def _training_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    is_causal: bool | None,
) -> torch.Tensor:
    """Attention over several tokens in training (a gradient to record, or the module in training
    mode): (rows, tokens, heads, value dim).

    Two batched float32 products per key/value head, its query heads' tokens stacked as rows, and
    a softmax between them. SDPA's CPU flash kernel, made for long sequences, took 16.3 ms for the
    forward and backward pass of one layer of a training batch (8 rows x 110 tokens, 9 query heads
    on 3 key/value heads, bfloat16 under autocast) where these take 8.2 ms; in float32 throughout,
    they are at least as exact as the kernel's float32 accumulation. A masked column gets the
    lowest float32 instead of -inf, so a padding row that sees no column stays finite (uniform),
    as transformers' own fix for such rows does.
    """
    rows, heads, tokens, dim = query.shape
    kv_heads, columns = key.shape[1], key.shape[2]
    group = heads // kv_heads
    if attention_mask is None:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        attention_mask = torch.ones(tokens, columns, dtype=torch.bool, device=query.device)
        attention_mask = attention_mask.tril(columns - tokens) if causal else attention_mask
    bias = torch.zeros(attention_mask.shape, dtype=torch.float32, device=query.device)
    bias.masked_fill_(~attention_mask, torch.finfo(torch.float32).min)
    scale = dim**-0.5 if scaling is None else scaling
    q = (query.float() * scale).reshape(rows, kv_heads, group * tokens, dim)
    scores = torch.matmul(q, key.float().transpose(-1, -2)).view(rows, kv_heads, group, tokens, columns)
    weights = torch.softmax(scores + bias.view(-1, 1, 1, tokens, columns), dim=-1)
    out = torch.matmul(weights.view(rows, kv_heads, group * tokens, columns), value.float())
    return out.view(rows, heads, tokens, -1).transpose(1, 2).contiguous().to(query.dtype)


ALL_ATTENTION_FUNCTIONS.register(ATTENTION, decode_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)


@contextmanager
def _decode_attention(model: Any) -> Iterator[bool]:
    """Inside: a model on SDPA attention takes `decode_attention` instead; yields whether it did."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        yield False
        return
    config._attn_implementation = ATTENTION
    try:
        yield True
    finally:
        config._attn_implementation = "sdpa"


# ---------------------------------------------------------------- the context


@contextmanager
def packed_linears(model: Any, cache: dict | None = None) -> Iterator[int]:
    """Inside: the model's plain ``nn.Linear`` layers multiply through oneDNN with packed weights.

    `cache` (module id -> its packed weights) outlives the context so repeated calls pack once; None: a
    fresh one, let go on exit. Yields the number of layers switched (0 when the model cannot be
    packed: nothing changes). Layers that already carry their own forward (accelerate's hooks) and
    subclasses of ``nn.Linear`` (quantised layers, int8 members) are left alone, and so is a layer
    already switched by an enclosing context.
    """
    if unsupported(model) is not None:
        yield 0
        return
    cache = {} if cache is None else cache
    layers = [
        m
        for m in model.modules()
        if type(m) is torch.nn.Linear and "forward" not in m.__dict__ and m.weight.dtype in DTYPES
    ]
    for m in layers:
        m.forward = _packed_forward(m, cache)
    try:
        yield len(layers)
    finally:
        for m in layers:
            m.__dict__.pop("forward", None)


@contextmanager
def cpu_kernels(
    model: Any, cache: dict | None = None, enabled: bool = True, products: torch.dtype | None = None
) -> Iterator[int]:
    """Both swaps for a model on the CPU (packed linear layers, decode attention); nothing elsewhere,
    nor when not `enabled` (``model.cpu_kernels: false``).

    Yields the number of linear layers packed.
    """
    if not enabled or unsupported(model) is not None:
        yield 0
        return
    with packed_linears(model, cache) as layers, _decode_attention(model), _products(products):
        yield layers


@contextmanager
def _products(dtype: torch.dtype | None) -> Iterator[None]:
    """Inside: packed layers with no gradient to record multiply in `dtype` (None: an enclosing
    context's choice, else the weights' dtype), layers an enclosing context switched included (RL
    scores its rewards inside the trainer's context)."""
    if dtype is None:
        yield
        return
    token = _PRODUCTS.set(dtype)
    try:
        yield
    finally:
        _PRODUCTS.reset(token)
