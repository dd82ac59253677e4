"""Scoring with a trained reward model folder (one member or an ensemble): what RL and evaluation use.

Training (`caiflow.training.reward`) and scoring share one formatting function
(:func:`conversation_ids`: the chat template over prompt + answer, as TRL's RewardTrainer does
it) and right padding: the sequence-classification head reads the rightmost non-pad token, and
right padding keeps the position ids the model was trained with. Ensemble members' scores are
centred by their stored offsets and combined conservatively by :func:`aggregate`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

ENSEMBLE_FILE = "ensemble.json"
# ensemble.json's record of the precision the members' linear layers trained in ('bfloat16' under bf16
# autocast, else absent): scoring multiplies in it, so a member is scored as it was trained
PRODUCTS_KEY = "products"
ECE_BINS = 10  # equal-width probability bins for the expected calibration error


def aggregate(scores: np.ndarray, lam: float) -> np.ndarray:
    """Conservative ensemble score per column: mean - lam * std across members (axis 0, ddof=0)."""
    scores = np.asarray(scores, dtype=float)
    if scores.ndim != 2 or scores.shape[0] < 1:
        raise ValueError(f"aggregate expects scores of shape (members, n); got shape {scores.shape}.")
    if lam < 0:
        raise ValueError(f"ensemble lambda is {lam}: it must be >= 0 (0 = plain mean).")
    if scores.shape[0] == 1:
        return scores[0].copy()
    return scores.mean(axis=0) - lam * scores.std(axis=0, ddof=0)


def messages_of(value: Any, what: str) -> list[dict]:
    """A list of {role, content} from a list, tuple or numpy array (Parquet gives arrays)."""
    if isinstance(value, str) or not hasattr(value, "__iter__"):
        raise ValueError(f"{what} must be a list of {{role, content}} messages, got {type(value).__name__}.")
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in value]


def conversation_ids(tokenizer, prompt: list[dict], answer: str | list[dict]) -> list[int]:
    """Token ids of prompt + the assistant's answer through the chat template: the one format of
    training and scoring."""
    reply = answer if isinstance(answer, list) else [{"role": "assistant", "content": str(answer)}]
    out = tokenizer.apply_chat_template(list(prompt) + list(reply), tokenize=True, return_dict=True)
    return list(out["input_ids"])


def score_ids(
    model,
    ids: list[list[int]],
    pad_token_id: int,
    batch_size: int = 8,
    prefix_min_tokens: int | None = 16,
    fast_cpu: bool = True,
    packed: dict | None = None,
    products: str | None = None,
) -> np.ndarray:
    """Reward of each token sequence: length-sorted batches, right-padded, inference mode, input
    order kept. A token prefix every sequence shares (the chat template's preamble, a system prompt),
    of at least `prefix_min_tokens` (None: never), runs once and every row starts from its cache.

    `fast_cpu`: on the CPU, the linear layers multiply through oneDNN with packed weights
    (caiflow.cpu_kernels); `packed` keeps the packed weights between calls (None: packed per call).
    `products`: 'bfloat16' multiplies the linear layers of a float32 model in bfloat16, as the member
    trained under bf16 autocast (`PRODUCTS_KEY` in ensemble.json): on the CPU kernels' packed bfloat16
    copies, elsewhere under autocast; None: in the model's dtype.
    """
    import torch
    from transformers import DynamicCache

    from caiflow.cpu_kernels import cpu_kernels, unsupported
    from caiflow.decoding import cache_kwarg, common_prefix, shared_prefix, start_from_prefix, supports

    device = next(model.parameters()).device
    low = getattr(torch, products) if products else None
    # the CPU kernels multiply in `low` themselves; anywhere else autocast does
    autocast = low is not None and not (fast_cpu and unsupported(model) is None)
    out = np.zeros(len(ids), dtype=float)
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    # The head reads each row's last non-pad token of what it is given: a row whose own tokens after the
    # prefix are all pad ids (pad = EOS) would read the wrong one, so such calls score whole sequences.
    head = common_prefix(ids) if len(ids) > 1 else 0
    if ids and (not supports(model) or any(set(x[head:]) <= {pad_token_id} for x in ids)):
        prefix_min_tokens = None
    with (
        torch.inference_mode(),
        cpu_kernels(model, packed, enabled=fast_cpu, products=low),
        torch.autocast(device.type, dtype=low or torch.bfloat16, enabled=autocast),
    ):
        name = cache_kwarg(model)
        prefix = shared_prefix(model, ids, prefix_min_tokens, name, last_logits=False)
        p = prefix[0] if prefix else 0
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            width = max(len(ids[i]) for i in rows) - p
            input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
            mask = torch.ones((len(rows), p + width), dtype=torch.long)
            for j, i in enumerate(rows):
                input_ids[j, : len(ids[i]) - p] = torch.tensor(ids[i][p:])
                mask[j, len(ids[i]) :] = 0
            kwargs: dict = {"use_cache": False}
            if prefix:  # the rows continue the prefix's cache, at positions p, p+1, ...
                cache = start_from_prefix(DynamicCache(config=model.config), prefix[1], len(rows))
                positions = torch.arange(p, p + width).expand(len(rows), -1)
                kwargs = {"use_cache": True, name: cache, "position_ids": positions.to(device)}
            logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), **kwargs).logits
            out[rows] = logits[:, 0].float().cpu().numpy()
    return out


class RewardScorer:
    """Scores (prompt, completion) pairs with a trained reward model folder (one member or an ensemble).

    Members are loaded in ``dtype``; an ensemble saved as adapters (``shared_backbone``) is one
    backbone (``backbone``, default the one ensemble.json names) with an adapter per member.

    ``score_members`` gives the centred reward of every member, shape (K, n); ``score`` aggregates
    them as mean - lam * std (``lam`` None = the lambda saved in ensemble.json).
    """

    def __init__(
        self,
        reward_dir: str | Path,
        device: str = "cpu",
        batch_size: int = 8,
        lam: float | None = None,
        dtype: str = "float32",
        backbone: str | Path | None = None,
        fast_cpu: bool = True,
    ):
        from caiflow.models import load_tokenizer, pick_device, quiet_transformers

        quiet_transformers()
        self.reward_dir = Path(reward_dir)
        spec_file = self.reward_dir / ENSEMBLE_FILE
        if not spec_file.is_file():
            raise FileNotFoundError(
                f"{self.reward_dir} is not a reward model folder: {ENSEMBLE_FILE} is missing. "
                "Point at the reward_model artifact's model/ folder written by train_reward_model."
            )
        self.spec = json.loads(spec_file.read_text())
        self.fast_cpu = fast_cpu  # caiflow's CPU kernels (model.cpu_kernels)
        # bfloat16 products where the members trained under bf16 autocast, for a float32 load
        self.products = self.spec.get(PRODUCTS_KEY) if dtype == "float32" else None
        self._packed: dict = {}  # the members' packed weights, kept while the scorer lives
        self.lam = float(self.spec.get("lambda", 0.0) if lam is None else lam)
        self.batch_size = max(1, int(batch_size))
        self.max_length = self.spec.get("max_length")
        self.offsets = np.asarray(self.spec.get("offsets") or [0.0] * len(self.spec["members"]), dtype=float)
        self.device = pick_device(device)
        self.tokenizer = load_tokenizer(self.reward_dir)
        self.members = list(self.spec["members"])
        if self.spec.get("layout") == "adapters":
            self.models = [self._shared(Path(backbone or self.spec["backbone"]), dtype)]
        else:
            self.models = [self._load(self.reward_dir / name, dtype) for name in self.members]

    def _load(self, path: Path, dtype: str, **kwargs):
        import torch
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=getattr(torch, dtype), num_labels=1, **kwargs
        )
        if model.config.pad_token_id is None:
            model.config.pad_token_id = self.tokenizer.pad_token_id
        return model if kwargs.get("device_map") else model.to(self.device)

    def _shared(self, backbone: Path, dtype: str):
        """One backbone (4-bit when the members were trained on one) carrying every member's adapter."""
        from peft import PeftModel

        kwargs = {}
        if self.spec.get("quantized"):
            from caiflow.training.common import quantization_config

            kwargs = {
                "quantization_config": quantization_config(dtype),
                "device_map": {"": 0} if self.device == "cuda" else {"": "cpu"},
            }
        model = self._load(backbone, dtype, **kwargs)
        model.config.pad_token_id = (
            self.tokenizer.pad_token_id
        )  # as in training: the head reads the last non-pad
        first, *rest = self.members
        model = PeftModel.from_pretrained(model, str(self.reward_dir / first), adapter_name=first)
        for name in rest:
            model.load_adapter(str(self.reward_dir / name), adapter_name=name)
        return model.eval()

    def _member_models(self):
        """(member name, model scoring as that member): switching adapters on a shared backbone."""
        if len(self.models) == len(self.members):
            yield from zip(self.members, self.models)
            return
        shared = self.models[0]
        for name in self.members:
            shared.set_adapter(name)
            yield name, shared

    @property
    def size(self) -> int:
        return len(self.members)

    def encode(self, prompts: list[list[dict]], completions: list[str]) -> list[list[int]]:
        if len(prompts) != len(completions):
            raise ValueError(
                f"{len(prompts)} prompts but {len(completions)} completions: pass one completion per prompt."
            )
        ids = [
            conversation_ids(self.tokenizer, messages_of(p, "prompt"), c)
            for p, c in zip(prompts, completions)
        ]
        if (
            self.max_length
        ):  # keep the end: the head reads the last token (training dropped longer pairs instead)
            ids = [x[-self.max_length :] for x in ids]
        return ids

    def score_members(self, prompts: list[list[dict]], completions: list[str]) -> np.ndarray:
        """Centred rewards, shape (K members, n)."""
        ids = self.encode(prompts, completions)
        if not ids:
            return np.zeros((self.size, 0))
        raw = np.stack(
            [
                score_ids(
                    m,
                    ids,
                    m.config.pad_token_id,
                    self.batch_size,
                    fast_cpu=self.fast_cpu,
                    packed=self._packed,
                    products=self.products,
                )
                for _, m in self._member_models()
            ]
        )
        return raw - self.offsets[:, None]

    def score(self, prompts: list[list[dict]], completions: list[str]) -> np.ndarray:
        """Aggregated reward per completion: mean - lam * std across members, shape (n,)."""
        return aggregate(self.score_members(prompts, completions), self.lam)


def pair_metrics(margin: np.ndarray, label: np.ndarray) -> dict:
    """Held-out accuracy (plain), soft-label agreement, Brier score, ECE and loss of reward margins
    against labels."""
    margin, label = np.asarray(margin, dtype=float), np.asarray(label, dtype=float)
    if len(margin) == 0:
        return {
            "pairs": 0,
            "accuracy": None,
            "soft_agreement": None,
            "brier": None,
            "ece": None,
            "loss": None,
        }
    p = 0.5 * (1.0 + np.tanh(margin / 2.0))  # sigmoid(margin), without overflow for large margins
    decided = label != 0.5
    accuracy = float(np.mean((margin[decided] > 0) == (label[decided] > 0.5))) if decided.any() else None
    bins = np.minimum((p * ECE_BINS).astype(int), ECE_BINS - 1)
    ece = sum(
        np.sum(bins == b) / len(p) * abs(p[bins == b].mean() - label[bins == b].mean())
        for b in range(ECE_BINS)
        if np.any(bins == b)
    )
    log_p, log_q = -np.logaddexp(0.0, -margin), -np.logaddexp(0.0, margin)  # stable log sigmoid(+-margin)
    return {
        "pairs": int(len(margin)),
        "accuracy": accuracy,
        "soft_agreement": float(np.mean(p * label + (1 - p) * (1 - label))),
        "brier": float(np.mean((p - label) ** 2)),
        "ece": float(ece),
        "loss": float(-np.mean(label * log_p + (1 - label) * log_q)),
    }
