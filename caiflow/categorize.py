"""Categorise prompts into the constitution's principles (plus "other").

Two backends:
- local: the normalised probability of each label after a classification question, scored by
  the configured model (the same choice-scoring machinery AI feedback uses);
- openai: any OpenAI-compatible chat endpoint, asked for JSON ``{"principle": ..., "confidence": ...}``,
  with bounded concurrency and retries with backoff on 429, 5xx, timeouts and unparseable answers.
  The API key is read from the environment variable named in the config and goes nowhere else.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from caiflow.constitution import Constitution

log = logging.getLogger(__name__)

OTHER = "other"


class CategorizeError(RuntimeError):
    """Categorisation could not finish; the message names the endpoint and what to do."""


def labels(constitution: Constitution) -> list[str]:
    return constitution.principle_ids() + [OTHER]


def category_question(constitution: Constitution, prompt: str) -> str:
    lines = [f"- {p.id}: {p.name}" for p in constitution.principles]
    lines.append(f"- {OTHER}: none of the above (an ordinary, harmless request)")
    return (
        "Which of these principles is most at stake in the request below?\n"
        + "\n".join(lines)
        + f"\n\nRequest: {prompt}\n\nAnswer with the principle id only."
    )


# Content-free requests: what the model answers when the request says nothing. Small models
# lean hard towards some labels whatever the request (SmolLM2-135M picks "non-violence" for
# two thirds of prompts); dividing by the label distribution on these inputs ("contextual
# calibration", Zhao et al. 2021) removes that lean. On 60 built-in red-team prompts with the
# default model, agreement with the prompt's intended principle went from 0.20 to 0.55.
CONTENT_FREE = ("N/A", "", "[request]")


def label_probabilities(engine, constitution: Constitution, prompts: list[str]) -> np.ndarray:
    """P(label) per prompt, one column per `labels(constitution)`, from the model's log-probabilities."""
    convs = [[{"role": "user", "content": category_question(constitution, p)}] for p in prompts]
    options = [f" {label}" for label in labels(constitution)]
    return engine.score_choices_chat(convs, options, assistant_prefix="Principle:")


def categorize_local(
    engine, constitution: Constitution, prompts: list[str], calibrate: bool = True
) -> list[tuple[str, float]]:
    """(label, probability) per prompt from the model's log-probability of each label."""
    names = labels(constitution)
    if not prompts:
        return []
    probs = label_probabilities(engine, constitution, prompts)
    if calibrate:
        prior = label_probabilities(engine, constitution, list(CONTENT_FREE)).mean(axis=0)
        probs = probs / np.maximum(prior, 1e-12)
        probs = probs / probs.sum(axis=1, keepdims=True)
    return [(names[int(np.argmax(row))], float(np.max(row))) for row in probs]


# ---------------------------------------------------------------- OpenAI-compatible endpoint


def _client(base_url: str, api_key_env: str, timeout: float):
    from openai import OpenAI

    key = os.environ.get(api_key_env)
    if not key:
        raise CategorizeError(
            f"environment variable {api_key_env} is not set: export it with the API key for {base_url} "
            f"(any non-empty value for a local server without authentication)."
        )
    # Our own retry loop below decides what is retryable, so the client's is off.
    return OpenAI(base_url=base_url, api_key=key, timeout=timeout, max_retries=0)


def _retryable(exc: BaseException) -> bool:
    import openai

    if isinstance(
        exc, (openai.RateLimitError, openai.APITimeoutError, openai.APIConnectionError, ValueError)
    ):
        return True
    return isinstance(exc, openai.APIStatusError) and exc.status_code >= 500


def _parse(text: str, valid: list[str]) -> tuple[str, float]:
    """The JSON answer -> (label, confidence); ValueError when it is not usable."""
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        raise ValueError(f"answer is not JSON: {str(text)[:80]!r}") from None
    if not isinstance(data, dict) or "principle" not in data:
        raise ValueError(f"answer has no 'principle' field: {str(text)[:80]!r}")
    label = str(data["principle"]).strip().lower()
    if label not in valid:
        label = OTHER
    try:
        conf = float(data.get("confidence", 1.0))
    except (TypeError, ValueError):
        conf = 1.0
    return label, min(max(conf, 0.0), 1.0)


def categorize_openai(
    constitution: Constitution,
    prompts: list[str],
    *,
    base_url: str,
    model: str,
    api_key_env: str,
    max_concurrency: int = 4,
    max_retries: int = 5,
    timeout: float = 60.0,
    backoff: float = 0.5,
    on_done: Callable[[int], None] | None = None,
) -> list[tuple[str, float]]:
    """(label, confidence) per prompt from an OpenAI-compatible chat endpoint; fails loudly, drops nothing."""
    client = _client(base_url, api_key_env, timeout)
    valid = labels(constitution)
    system = (
        "You classify requests to an AI assistant by the principle most at stake. Reply with JSON only: "
        '{"principle": "<one id from the list>", "confidence": <0..1>}.'
    )

    def one(prompt: str) -> tuple[str, float]:
        last: BaseException | None = None
        for attempt in range(max_retries + 1):
            try:
                resp = client.chat.completions.create(
                    model=model,
                    messages=[
                        {"role": "system", "content": system},
                        {"role": "user", "content": category_question(constitution, prompt)},
                    ],
                    response_format={"type": "json_object"},
                    temperature=0,
                )
                return _parse(resp.choices[0].message.content, valid)
            except Exception as exc:  # noqa: BLE001 - classified just below
                if not _retryable(exc):
                    raise CategorizeError(
                        f"endpoint {base_url} refused the request: {_describe(exc)}"
                    ) from None
                last = exc
                if attempt < max_retries:
                    # exponential backoff with jitter, capped at 30 s
                    time.sleep(min(30.0, backoff * 2**attempt) * (0.5 + random.random() / 2))
        raise CategorizeError(
            f"endpoint {base_url} failed {max_retries + 1} times (last: {_describe(last)}); check the server "
            f"or raise roles.<role>.endpoint.max_retries."
        )

    results: list[tuple[str, float]] = []
    with ThreadPoolExecutor(max_workers=max_concurrency) as pool:
        for i, res in enumerate(pool.map(one, prompts)):
            results.append(res)
            if on_done:
                on_done(i + 1)
    return results


def _describe(exc: BaseException | None) -> str:
    """The error without anything secret: type and status, no request headers."""
    if exc is None:
        return "unknown error"
    status = getattr(exc, "status_code", None)
    text = str(exc).splitlines()[0][:160] if str(exc) else ""
    return f"{type(exc).__name__}{f' {status}' if status else ''}: {text}"
