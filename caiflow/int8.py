"""int8 matrix products for generation on the CPU (``generation.matmul: int8``).

On CPUs with AVX-512 VNNI or AMX an int8 matrix product (``torch._int_mm``, int32 accumulation)
runs 3-5x faster than float32 at the shapes of batched decoding (README, "int8 products"), and
float32 GEMMs are most of the engine's time. `quantize` returns a copy of a model whose linear
layers do their products in int8 (W8A8): weights per output channel, activations per token at run
time. Everything else (embeddings, norms, attention, the KV cache, sampling) stays in the model's
dtype and is shared with the original, not copied.

Plain W8A8 moves a small model's next-token distribution too far (the default model's mean KL to
float32 is 0.04 nats per token, greedy tokens agree 89% of the time under teacher forcing), because
a few input channels carry activations 10-100x larger than the rest. Two standard fixes, whose
settings below were chosen in a sweep on built-in prompts (README, "int8 products"):

- smoothing (SmoothQuant, Xiao et al. 2023): divide each input channel by
  s = max|x|^ALPHA / max|w|^(1 - ALPHA) and multiply the weight's column by it, so activations and
  weights share the range;
- the OUTLIERS input channels with the largest activations stay in float32 (LLM.int8,
  Dettmers et al. 2022): their columns are zero in the int8 product and added by a small float one.

The per-channel activation maxima come from one forward pass over CALIBRATION_PROMPTS of the
package's built-in prompts (chat-formatted), so the result depends only on the model. A changed
output distribution is a result-changing setting: `generation.matmul` is fingerprinted.
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import time
from typing import Any

import torch

from caiflow.chat import chat_prompt
from caiflow.prompts import BUILTIN_PATH

log = logging.getLogger(__name__)

ALPHA = 0.5  # smoothing strength: 0 leaves activations as they are, 1 moves their whole range to the weights
OUTLIERS = 16  # input channels kept in float32 per layer (fewer on narrow layers: at most 1/32 of them)
CALIBRATION_PROMPTS = 32  # built-in prompts whose activations set the smoothing and the outlier channels


class Int8Linear(torch.nn.Module):
    """Linear layers that read the same input (q/k/v, gate/up), multiplied as one in int8.

    y = x W^T + b over the layers' weights stacked, with x smoothed, its outlier channels in float32
    and the rest of both operands in int8. One layer is a group of one.
    """

    def __init__(self, linears: list[torch.nn.Linear], act_max: torch.Tensor):
        super().__init__()
        w = torch.cat([lin.weight.detach().float() for lin in linears])
        self.in_features, self.out_features = w.shape[1], w.shape[0]
        self.splits = [lin.out_features for lin in linears]
        scale = act_max.float().clamp_min(1e-5) ** ALPHA / w.abs().amax(0).clamp_min(1e-5) ** (1 - ALPHA)
        scale = scale.clamp_min(1e-5)
        outliers = act_max.topk(min(OUTLIERS, self.in_features // 32)).indices
        inv_scale = 1 / scale
        inv_scale[outliers] = 0  # these channels skip the int8 product ...
        self.register_buffer("outliers", outliers)
        self.register_buffer("w_outliers", w[:, outliers].t().contiguous())  # ... and take this float one
        w_smooth = w * scale  # W * s per input column
        w_smooth[:, outliers] = 0
        w_scale = w_smooth.abs().amax(1).clamp_min(1e-12) / 127
        w_int8 = torch.round(w_smooth / w_scale[:, None]).to(torch.int8)
        self.register_buffer("w_int8", w_int8.t().contiguous())  # (in, out): torch._int_mm's layout
        self.register_buffer("w_scale", w_scale)
        self.register_buffer("inv_scale", inv_scale)
        biases = [lin.bias.detach().float() if lin.bias is not None else None for lin in linears]
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat([b if b is not None else torch.zeros(n) for b, n in zip(biases, self.splits)])
        self.register_buffer("bias", bias)
        # the last input and its product split by layer, until every layer has taken its part
        self._input: torch.Tensor | None = None
        self._version = -1
        self._outputs: dict[int, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).float()
        smooth = rows * self.inv_scale
        x_scale = smooth.abs().amax(-1, keepdim=True).clamp_min_(1e-12).div_(127)
        x_int8 = smooth.div_(x_scale).round_().to(torch.int8)
        y = torch._int_mm(x_int8, self.w_int8).float().mul_(x_scale).mul_(self.w_scale)
        if len(self.outliers):
            y.addmm_(rows[:, self.outliers], self.w_outliers)
        if self.bias is not None:
            y += self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def output_of(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Layer `index`'s output for input x; the group's product runs once per input tensor and is
        let go as soon as every layer has its part (held, a prefill's products would pile up)."""
        if len(self.splits) == 1:
            return self(x)
        if self._input is not x or self._version != _version(x) or index not in self._outputs:
            self._input, self._version = x, _version(x)
            self._outputs = dict(enumerate(self(x).split(self.splits, -1)))
        out = self._outputs.pop(index)
        if not self._outputs:
            self._input = None
        return out

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.splits}, float32 channels={len(self.outliers)}"


class Int8Member(torch.nn.Module):
    """Stands in for one linear layer of an `Int8Linear` group (holds it once per model, unregistered)."""

    def __init__(self, group: Int8Linear, index: int):
        super().__init__()
        self.index = index
        self.in_features, self.out_features = group.in_features, group.splits[index]
        object.__setattr__(self, "group", group)  # not a submodule: the group's buffers count once

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.output_of(self.index, x)

    def extra_repr(self) -> str:
        return f"{self.index} of Int8Linear({self.group.extra_repr()})"


def _version(x: torch.Tensor) -> int:
    """x's in-place write counter (inference tensors have none: 0)."""
    return 0 if x.is_inference() else x._version


def unsupported(model: Any) -> str | None:
    """Why this model cannot take int8 products here (None: it can)."""
    device = next(model.parameters()).device
    if device.type != "cpu":
        return (
            f"the model is on {device.type}: int8 products are for CPUs; on a GPU use model.dtype: "
            "bfloat16 and generation.matmul: dtype"
        )
    if not hasattr(torch, "_int_mm"):
        return f"torch {torch.__version__} has no int8 matrix product (torch._int_mm): upgrade torch"
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        return "the model is already quantized (bitsandbytes): load it in float32 for generation.matmul: int8"
    return None


def calibration_texts(tokenizer: Any, n: int = CALIBRATION_PROMPTS) -> list[str]:
    """The first n built-in prompts, formatted as the engine formats a chat."""
    lines = [line for line in BUILTIN_PATH.read_text().splitlines() if line.strip()][:n]
    return [
        chat_prompt(tokenizer, [{"role": "user", "content": json.loads(line)["prompt"]}]) for line in lines
    ]


@torch.no_grad()
def calibrate(
    model: Any, tokenizer: Any, texts: list[str]
) -> tuple[dict[str, torch.Tensor], list[list[str]]]:
    """Per linear layer, the largest |input| per input channel over the tokens of `texts`; and the
    groups of layers that read the same input tensor (one module's q/k/v, gate/up), in call order."""
    maxima: dict[str, torch.Tensor] = {}
    calls: list[tuple[str, int, int]] = []  # (layer, id of its input, its version) in the first pass
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):

            def hook(_module, inputs, _output, name=name):
                x = inputs[0].detach()
                seen = x.reshape(-1, x.shape[-1]).abs().amax(0).float()
                maxima[name] = torch.maximum(maxima[name], seen) if name in maxima else seen
                if not first_pass_done:
                    calls.append((name, id(inputs[0]), _version(inputs[0])))

            hooks.append(module.register_forward_hook(hook))
    # the output layer sees each row's last position only (all of them would cost rows x width x vocab)
    takes_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
    last_logits = {"logits_to_keep": 1} if takes_keep else {}
    first_pass_done = False
    try:
        for text in texts:  # one at a time: padding would add the pad token's activations
            ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
            model(input_ids=ids, use_cache=False, **last_logits)
            first_pass_done = True
    finally:
        for h in hooks:
            h.remove()
    # consecutive calls on the same live tensor, by layers of the same parent module
    groups: list[list[str]] = []
    for (name, tensor, version), prev in zip(calls, [None, *calls[:-1]]):
        same = (
            prev is not None
            and prev[1:] == (tensor, version)
            and prev[0].rsplit(".", 1)[0] == name.rsplit(".", 1)[0]
        )
        if same and name not in groups[-1]:
            groups[-1].append(name)
        elif not any(name in g for g in groups):
            groups.append([name])
    return maxima, groups


def quantize(model: Any, tokenizer: Any) -> Any:
    """A copy of `model` whose linear layers multiply in int8; other weights are shared, not copied."""
    problem = unsupported(model)
    if problem:
        raise ValueError(f"generation.matmul is int8 but {problem}.")
    started = time.perf_counter()
    maxima, groups = calibrate(model, tokenizer, calibration_texts(tokenizer))
    modules = dict(model.named_modules())
    memo: dict[int, Any] = {}
    for names in groups:
        linears = [modules[n] for n in names]
        group = Int8Linear(linears, maxima[names[0]])
        for i, linear in enumerate(linears):
            memo[id(linear)] = Int8Member(group, i)
    for p in model.parameters():  # shared: deepcopy takes these as they are
        memo.setdefault(id(p), p)
    for b in model.buffers():
        memo.setdefault(id(b), b)
    quantized = copy.deepcopy(model, memo)
    log.info(
        "int8 products: %d linear layers in %d groups, calibrated on %d built-in prompts, in %.1f s",
        sum(len(g) for g in groups),
        len(groups),
        CALIBRATION_PROMPTS,
        time.perf_counter() - started,
    )
    return quantized
