"""The memory plan: per step, the models held at once and the estimated peak accelerator memory.

Nothing is loaded: parameter counts come from the model's shape (the fields of its config.json),
sizes from the config. Pure standard library (no pydantic, no torch), so the GPU check
(benchmarks/gpu_check.py, through benchmarks/gpu/memory.py) imports it on a machine with only
torch, transformers and peft.
The step planner takes the config as a plain dict (``Config.model_dump()``).

What a step holds, in bytes (e = bytes per element of ``model.dtype``):

- weights: params x e; 4-bit (qlora): linear params x 0.516 (nf4 + double-quantised block
  scales: 4 + 8/64 + 32/(64*256) bits) plus embeddings, head and norms, upcast to fp32 for
  training by ``prepare_model_for_kbit_training``, in e for inference;
- training state: weight, gradient and AdamW's two moments in the trainable weight's dtype: LoRA
  adapters are fp32 (peft upcasts them on a 16-bit base), 16 bytes a parameter, but bf16 on a
  4-bit base (TRL casts them, after the QLoRA paper), 8 bytes; full fine-tuning 4 x e a parameter;
- activations of one training forward/backward over T = rows x length tokens: with gradient
  checkpointing, one hidden state per layer (L*H*e*T) plus the larger of the logits phase
  (T_logits*V*(e+8): the logits, their fp32 upcast and gradient) and the layer being recomputed
  and differentiated (2*(e*(7H+4I) + 8H)*T); without it every layer's activations, L times that
  layer term; x ACTIVATION_SLACK;
- generation: the KV cache, 2*L*B*S*kv_heads*head_dim*e, plus the last step's logits; caiflow's
  decode loop (``generation.decoding: continuous``) keeps up to SPARE_COLUMNS more columns a row
  (min(64, new tokens): a step writes in place, ``caiflow.kv_cache``), so S grows by those there;
- a scoring forward (reward model, multiple-choice feedback, judge): one layer's transient
  activations, e*(4H+3I) a token; no KV cache kept;
- RUNTIME_RESERVE on every step: the CUDA context and allocator fragmentation, which torch's
  own counters do not show.

Calibration (benchmarks/gpu_check.py on one H200, Llama-2-7B shape, bf16, r 16, measured peak
``torch.cuda.max_memory_allocated``): weights 12.58 GiB (this arithmetic 12.55); LoRA SFT step
1x1024 13.43 and 4x1024 15.71 (hidden states alone undershot 4x1024 by ~1.1 GiB, hence the
recompute and logits terms: 15.75 now); greedy generation KV cache 32 x (512+256) 12.19 GiB
over the weights (arithmetic 12.00); LoRA reward step 4+4 x 1024 17.83 (hidden states alone
undershot by 2.9 GiB; 18.1 now); a 7B judge next to the policy 25.17, 12.61 after ``del``.
Prompt lengths are not in the config; the plan assumes the token counts below and says so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GIB = float(1 << 30)
NF4_BYTES = (4 + 8 / 64 + 32 / (64 * 256)) / 8  # nf4 weights + double-quantised absmax per 64-block
ACTIVATION_SLACK = 1.1  # the measured 7B peaks sat 5-8% above the activation terms; kept above them
RUNTIME_RESERVE = 1.0 * GIB  # CUDA context (~0.5 GiB) + allocator fragmentation
PROMPT_TOKENS = 256  # a user prompt in the chat template (red-team prompts are short)
SYSTEM_PROMPT_TOKENS = 512  # the constitution as a system prompt (context distillation, contrastive)
FEW_SHOT_TOKENS = 512  # one worked critique-revision example shown before a request
QUESTION_TOKENS = 256  # a feedback or judge question around two answers
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Shape:
    """A Llama-style decoder (Llama, Mistral, Qwen2 without biases, SmolLM): what sizes depend on."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    tie_embeddings: bool = False
    head_dim_: int | None = None

    @property
    def head_dim(self) -> int:
        return self.head_dim_ or self.hidden // self.heads

    @classmethod
    def from_config(cls, conf: dict[str, Any]) -> Shape:
        """From a config.json mapping (transformers' field names)."""
        heads = int(conf["num_attention_heads"])
        return cls(
            vocab=int(conf["vocab_size"]),
            hidden=int(conf["hidden_size"]),
            intermediate=int(conf["intermediate_size"]),
            layers=int(conf["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(conf.get("num_key_value_heads") or heads),
            tie_embeddings=bool(conf.get("tie_word_embeddings", False)),
            head_dim_=conf.get("head_dim"),
        )

    def projections(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer of one decoder layer."""
        h, i, q, kv = (
            self.hidden,
            self.intermediate,
            self.heads * self.head_dim,
            self.kv_heads * self.head_dim,
        )
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def linear_params(self) -> int:
        """Parameters of the decoder layers' linear projections (what 4-bit quantises)."""
        return self.layers * sum(a * b for a, b in self.projections().values())

    def other_params(self, head: str = "lm") -> int:
        """Embeddings, norms and the head: 'lm' (vocab outputs), 'score' (one output) or 'none'."""
        total = self.vocab * self.hidden + self.layers * 2 * self.hidden + self.hidden
        if head == "lm" and not self.tie_embeddings:
            total += self.vocab * self.hidden
        elif head == "score":
            total += self.hidden
        return total

    def params(self, head: str = "lm") -> int:
        return self.linear_params() + self.other_params(head)

    def lora_params(self, r: int, targets: str | list[str] = "all-linear") -> int:
        """r x (in + out) for every targeted projection of every layer ('all-linear': all seven)."""
        names = LINEAR if targets == "all-linear" else [t for t in targets if t in LINEAR]
        return self.layers * sum(r * sum(self.projections()[n]) for n in names)


# Shapes of models a preset names, for a machine that does not hold them (the plan needs no weights).
KNOWN_SHAPES = {
    "mistralai/Mistral-7B-Instruct-v0.3": Shape(32768, 4096, 14336, 32, 32, 8, False, 128),
    "meta-llama/Llama-2-7b-chat-hf": Shape(32000, 4096, 11008, 32, 32, 32, False),
}


# ---------------------------------------------------------------- the parts


def weight_bytes(
    shape: Shape, e: int, head: str = "lm", four_bit: bool = False, training: bool = False
) -> float:
    if not four_bit:
        return float(shape.params(head) * e)
    # prepare_model_for_kbit_training upcasts every non-quantised parameter to fp32
    return shape.linear_params() * NF4_BYTES + shape.other_params(head) * (4 if training else e)


def training_state_bytes(trainable: int, param_bytes: int) -> float:
    """Weight, gradient and AdamW's two moments, all in the trainable parameter's dtype."""
    return float(trainable * param_bytes * 4)


def activation_bytes(
    shape: Shape, e: int, rows: int, seq: int, checkpointing: bool, logit_rows_tokens: int | None = None
) -> float:
    """One training forward and backward over rows x seq tokens (see the module docstring)."""
    tokens = rows * seq
    layer = (e * (7 * shape.hidden + 4 * shape.intermediate) + 8 * shape.hidden) * tokens
    logits = (tokens if logit_rows_tokens is None else logit_rows_tokens) * shape.vocab * (e + 8)
    if checkpointing:
        body = shape.layers * shape.hidden * e * tokens + max(2 * layer, logits)
    else:
        body = shape.layers * layer + max(layer, logits)
    return body * ACTIVATION_SLACK


SPARE_COLUMNS = 64  # caiflow.kv_cache.GROW_COLUMNS (not imported: planning loads no torch)


def kv_cache_bytes(shape: Shape, e: int, batch: int, seq: int) -> float:
    return float(2 * shape.layers * batch * seq * shape.kv_heads * shape.head_dim * e)


def generation_bytes(shape: Shape, e: int, batch: int, seq: int) -> float:
    """KV cache of batch x seq tokens plus the last step's logits (model dtype, fp32 for sampling)."""
    return kv_cache_bytes(shape, e, batch, seq) + batch * shape.vocab * (e + 8)


def engine_seq(cfg: dict[str, Any], seq: int, new_tokens: int) -> int:
    """Cache columns a row holds in a generation step of `seq` tokens: with caiflow's decode loop, plus
    its spare columns."""
    return seq + (min(SPARE_COLUMNS, new_tokens) if cfg["generation"]["decoding"] == "continuous" else 0)


def forward_bytes(shape: Shape, e: int, batch: int, seq: int) -> float:
    """A scoring forward without a KV cache: one layer's transient activations."""
    return float(e * (4 * shape.hidden + 3 * shape.intermediate) * batch * seq)


# ---------------------------------------------------------------- the plan


@dataclass
class Held:
    """A model a step holds: its role, parameters, dtype, quantisation and bytes."""

    role: str
    params: int
    dtype: str
    quant: str
    bytes: float


@dataclass
class StepMemory:
    step: str
    models: list[Held] = field(default_factory=list)
    parts: dict[str, float] = field(default_factory=dict)  # what besides weights, in bytes
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> float:
        return sum(m.bytes for m in self.models) + sum(self.parts.values()) + RUNTIME_RESERVE

    def add(
        self, role: str, shape: Shape, dtype: str, head: str = "lm", four_bit: bool = False, training=False
    ):
        e = DTYPE_BYTES[dtype]
        quant = "nf4" if four_bit else "none"
        self.models.append(
            Held(role, shape.params(head), dtype, quant, weight_bytes(shape, e, head, four_bit, training))
        )


@dataclass(frozen=True)
class Shapes:
    policy: Shape
    reward: Shape | None = None  # reward_model.backbone; None = the policy's shape
    judge: Shape | None = None  # roles.judge as a model spec; None = the policy's shape


def _lora(section: dict[str, Any], shape: Shape) -> int:
    return shape.lora_params(section["lora"]["r"], section["lora"]["target_modules"])


def _train(
    m: StepMemory,
    role: str,
    shape: Shape,
    dtype: str,
    section: dict,
    head: str,
    rows: int,
    seq: int,
    logit_tokens: int | None = None,
) -> None:
    """A model being trained: weights, training state and activations."""
    e, method = DTYPE_BYTES[dtype], section["method"]
    m.add(role, shape, dtype, head, four_bit=method == "qlora", training=True)
    if method == "full":
        m.parts[f"{role}: weights' grads + AdamW"] = (
            training_state_bytes(shape.params(head), e) - shape.params(head) * e
        )
    else:
        n = _lora(section, shape) + (shape.hidden if head == "score" else 0)
        # TRL casts a 4-bit model's adapters to bf16 (the QLoRA paper); peft keeps them fp32 otherwise
        size = 2 if method == "qlora" else 4
        m.parts[f"{role}: LoRA {n:,} params x {4 * size} B"] = training_state_bytes(n, size)
    ckpt = bool(section.get("gradient_checkpointing"))
    label = f"activations {rows}x{seq}" + (" (checkpointed)" if ckpt else "")
    m.parts[label] = activation_bytes(shape, e, rows, seq, ckpt, logit_tokens)


def _reward_models(m: StepMemory, cfg: dict, shape: Shape) -> None:
    """The trained reward model(s) for scoring: K merged members, or one backbone and K adapters."""
    rm, dtype = cfg["reward_model"], cfg["model"]["dtype"]
    k = rm["ensemble_size"]
    if rm.get("shared_backbone"):
        m.add("reward backbone (shared)", shape, dtype, "score", four_bit=rm["method"] == "qlora")
        n = _lora(rm, shape) + shape.hidden
        m.parts[f"reward adapters: {k} x {n:,} params x 4 B"] = float(k * n * 4)
    else:
        for i in range(k):
            m.add(f"reward member {i}", shape, dtype, "score")


def _generation_seq(cfg: dict) -> int:
    cr = cfg["critique_revision"]
    if cr["method"] == "context_distillation":
        return SYSTEM_PROMPT_TOKENS + PROMPT_TOKENS + cr["answer"]["max_new_tokens"]
    per_round = sum(cr[k]["max_new_tokens"] for k in ("answer", "critique", "revision"))
    return PROMPT_TOKENS + cr["few_shot"] * FEW_SHOT_TOKENS + cr["rounds"] * per_round


def step_memory(step: str, cfg: dict[str, Any], shapes: Shapes) -> StepMemory:
    """The estimated peak of one step (a config dict, as ``Config.model_dump()`` gives it)."""
    dtype = cfg["model"]["dtype"]
    e, pol = DTYPE_BYTES[dtype], shapes.policy
    rshape = shapes.reward or pol
    gen_batch, m = cfg["generation"]["batch_size"], StepMemory(step)
    if step == "prompts":
        if cfg["prompts"]["categorize"]["backend"] == "local":
            m.add("policy (categorise)", pol, dtype)
            b = cfg["prompts"]["categorize"]["batch_size"]
            m.parts[f"scoring forward {b}x{2 * PROMPT_TOKENS}"] = forward_bytes(pol, e, b, 2 * PROMPT_TOKENS)
    elif step == "critique_revision":
        cr = cfg["critique_revision"]
        new = max(cr[k]["max_new_tokens"] for k in ("answer", "critique", "revision"))
        seq = engine_seq(cfg, _generation_seq(cfg), new)
        if cfg["roles"]["teacher"]["endpoint"] is None:  # an endpoint teacher holds no memory here
            m.add("policy (teacher)", pol, dtype)
        m.parts[f"KV cache {gen_batch}x{seq}"] = generation_bytes(pol, e, gen_batch, seq)
        m.notes.append(
            f"sequence {seq} tokens assumed (prompt {PROMPT_TOKENS}, few-shot {FEW_SHOT_TOKENS} each)"
        )
    elif step == "sft":
        sft = cfg["sft"]
        _train(m, "policy", pol, dtype, sft, "lm", sft["per_device_batch_size"], sft["max_length"])
    elif step == "preferences":
        p = cfg["preferences"]
        new = p["sampling"]["max_new_tokens"]
        m.add("SL policy", pol, dtype)
        feedback = cfg["roles"]["feedback"]
        if p["method"] != "contrastive" and feedback["endpoint"] is None and feedback["model"] == "base":
            m.add("feedback (base)", pol, dtype)
        gen_seq = engine_seq(
            cfg, PROMPT_TOKENS + new + (SYSTEM_PROMPT_TOKENS if p["method"] != "feedback" else 0), new
        )
        score_seq = PROMPT_TOKENS + 2 * new + QUESTION_TOKENS
        m.parts[f"larger of KV cache {gen_batch}x{gen_seq} and scoring {gen_batch}x{score_seq}"] = max(
            generation_bytes(pol, e, gen_batch, gen_seq), forward_bytes(pol, e, gen_batch, score_seq)
        )
    elif step == "reward_model":
        rm = cfg["reward_model"]
        rows = 2 * rm["per_device_batch_size"]  # chosen and rejected in one forward
        _train(
            m, "reward model (one member at a time)", rshape, dtype, rm, "score", rows, rm["max_length"], 0
        )
    elif step == "rl":
        rl = cfg["rl"]
        seq = PROMPT_TOKENS + rl["max_new_tokens"]
        per_device = rl["per_device_batch_size"] or rl["batch_size"]
        _train(
            m,
            "policy (SL + RL adapter)",
            pol,
            dtype,
            rl,
            "lm",
            per_device,
            seq,
            per_device * rl["max_new_tokens"],
        )
        _reward_models(m, cfg, rshape)
        # rl.rollouts 'engine' samples from float32 copies of the projections with the adapter merged in
        # (16-bit weights keep the adapter live: caiflow.training.rollouts.can_merge)
        merges = rl.get("rollouts") == "engine" and rl["method"] == "lora" and dtype == "float32"
        copies = pol.linear_params() * e if merges else 0
        sampling = f"KV cache {rl['batch_size']}x{seq}" + (" + merged weight copies" if copies else "")
        m.parts[f"larger of {sampling} and reward scoring {rl['scoring_batch_size']}x{seq}"] = max(
            generation_bytes(pol, e, rl["batch_size"], seq) + copies,
            forward_bytes(rshape, e, rl["scoring_batch_size"], seq),
        )
        m.notes.append("KL reference = the policy with its adapter off (no second copy)")
    elif step in ("baseline", "evaluate"):
        ev = cfg["evaluate"]
        seq = PROMPT_TOKENS + ev["sampling"]["max_new_tokens"]
        m.add("one stage's policy at a time", pol, dtype)
        cols = engine_seq(cfg, seq, ev["sampling"]["max_new_tokens"])
        m.parts[f"KV cache {gen_batch}x{cols}"] = generation_bytes(pol, e, gen_batch, cols)
        _int8_copy(m, cfg, pol)
        if step == "evaluate":
            return _evaluate(m, cfg, shapes, seq)
    else:
        raise ValueError(f"unknown step '{step}' for the memory plan")
    if step in ("prompts", "critique_revision", "preferences"):
        _int8_copy(m, cfg, pol)
    return m


def _int8_copy(m: StepMemory, cfg: dict, shape: Shape) -> None:
    """generation.matmul 'int8': the engine's copy of the linear layers (one byte a weight), built
    beside the model it came from (caiflow.int8.quantize)."""
    if cfg["generation"].get("matmul") == "int8" and m.models:
        m.parts["int8 copy of the linear layers (generation.matmul)"] = shape.linear_params()


def _evaluate(m: StepMemory, cfg: dict, shapes: Shapes, seq: int) -> StepMemory:
    """Stages, then the reward ensemble, then the judge: one phase at a time, the peak is the largest."""
    dtype, ev, b = cfg["model"]["dtype"], cfg["evaluate"], cfg["generation"]["batch_size"]
    e, rshape, jshape = DTYPE_BYTES[dtype], shapes.reward or shapes.policy, shapes.judge or shapes.policy
    rewards = StepMemory("evaluate")
    _reward_models(rewards, cfg, rshape)
    rewards.parts[f"scoring {b}x{seq}"] = forward_bytes(rshape, e, b, seq)
    judge = StepMemory("evaluate")
    role = cfg["roles"]["judge"]
    if role["endpoint"] is None:  # a judge behind an endpoint holds no memory here
        judge.add(f"judge ({role['model']})", jshape, dtype)
        jseq = PROMPT_TOKENS + 2 * ev["sampling"]["max_new_tokens"] + QUESTION_TOKENS
        judge.parts[f"judge scoring {b}x{jseq}"] = forward_bytes(jshape, e, b, jseq)
    phases = [("stages answer", m), ("reward ensemble scores", rewards), ("judge compares", judge)]
    name, worst = max(phases, key=lambda p: p[1].peak)
    worst.notes.append(f"peak phase: {name} (phases run one after another, each unloaded before the next)")
    worst.step = "evaluate"
    return worst


def plan_memory(cfg: dict[str, Any], shapes: Shapes, steps: tuple[str, ...]) -> list[StepMemory]:
    return [step_memory(s, cfg, shapes) for s in steps]


def shape_of_folder(folder: str | Path) -> Shape:
    return Shape.from_config(json.loads((Path(folder) / "config.json").read_text()))
