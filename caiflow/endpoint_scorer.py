"""Multiple-choice scoring through an OpenAI-compatible chat endpoint (OpenAI, vLLM, TGI, llama.cpp).

:class:`EndpointChoiceScorer` has the same ``score_choices_chat`` method as
:class:`caiflow.generation.GenerationEngine`, so AI feedback and evaluation can use a remote
model as the feedback model or judge. It asks for one token with ``logprobs=True,
top_logprobs=20`` and reads the probability of each option from the first token's top
log-probabilities: an option matches a token when both, stripped of spaces and parentheses,
are the same letter(s) case-insensitively (option ``" (A)"`` matches tokens ``"A"``, ``" A"``,
``"(A"``), and the probabilities of all matching tokens add up.

Failure policy (as in :mod:`caiflow.categorize`): bounded concurrency, retries with exponential
backoff and jitter on 429, 5xx, timeouts, connection errors and unusable answers (no logprobs,
or none of the options among the top tokens), then an :class:`EndpointError` naming the
endpoint. No row is ever dropped or filled in silently. The API key is read from the
environment variable named by ``api_key_env`` and goes nowhere else (not into errors, logs
or outputs).
"""

from __future__ import annotations

import logging
import math
import os
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from caiflow.step_config import OpenAIEndpointConfig

log = logging.getLogger(__name__)

TOP_LOGPROBS = 20  # the most alternatives OpenAI returns per token; vLLM and llama.cpp accept it too

# Chat endpoints cannot portably continue a half-written assistant turn, so instead of an
# assistant prefix the scorer tells the model to reply with the option's letter alone: then
# the first generated token is the choice.
SYSTEM_PROMPT = (
    "You are a careful evaluator. Reply with only the letter of the option you choose "
    "(for example A or B), with no other text."
)


class EndpointError(RuntimeError):
    """The endpoint could not score the choices; the message names the endpoint and what to do."""


def option_key(text: str) -> str:
    """What identifies an option or a token: its text without spaces and parentheses, upper-cased."""
    return text.strip().strip("()").strip().upper()


def option_logprobs(top_logprobs: list[tuple[str, float]], options: list[str]) -> np.ndarray:
    """Each option's log-probability from one token's (token, logprob) alternatives.

    Tokens that match the same option add up (logsumexp). An option missing from the list gets
    the lowest listed log-probability: its true value is at most that, so the result is never
    more certain than the evidence. Raises ValueError when no option is listed at all.
    """
    keys = [option_key(o) for o in options]
    if len(set(keys)) != len(keys) or not all(keys):
        raise ValueError(f"options {options!r} do not have distinct letters once spaces and parentheses go")
    found: list[list[float]] = [[] for _ in options]
    for token, lp in top_logprobs:
        key = option_key(token)
        if key in keys:
            found[keys.index(key)].append(float(lp))
    if not any(found):
        listed = ", ".join(repr(t) for t, _ in top_logprobs[:8])
        raise ValueError(f"none of the options {keys} among the top tokens ({listed})")
    floor = min(float(lp) for _, lp in top_logprobs)
    return np.array([_logsumexp(f) if f else floor for f in found], dtype=np.float64)


def _logsumexp(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def _normalise(logps: np.ndarray) -> np.ndarray:
    shifted = np.exp(logps - logps.max())
    return shifted / shifted.sum()


class EndpointChoiceScorer:
    """``score_choices_chat`` through an OpenAI-compatible chat endpoint that returns logprobs."""

    def __init__(
        self,
        endpoint: OpenAIEndpointConfig,
        backoff: float = 0.5,
        on_done: Callable[[int], None] | None = None,
    ):
        self.endpoint = endpoint
        self.backoff = (
            backoff  # seconds before the first retry; doubles each retry (capped at 30 s), with jitter
        )
        self.on_done = on_done  # on_done(rows_finished) after each answered row, for progress reporting
        self.requests = 0  # HTTP requests sent (retries included), for metrics
        self.prompt_tokens = 0  # tokens the server reports reading (usage.prompt_tokens)
        self.completion_tokens = 0  # tokens the server reports writing (usage.completion_tokens)
        self._lock = threading.Lock()  # guards the counters above across worker threads
        key = os.environ.get(endpoint.api_key_env)
        if not key:
            raise EndpointError(
                f"environment variable {endpoint.api_key_env} is not set: export it with the API key for "
                f"{endpoint.base_url} (any non-empty value for a local server without authentication)."
            )
        from openai import OpenAI

        # Our own retry loop decides what is retryable, so the client's is off.
        self._client = OpenAI(
            base_url=endpoint.base_url, api_key=key, timeout=endpoint.timeout, max_retries=0
        )

    def score_choices_chat(
        self, conversations: list[list[dict]], options: list[str], assistant_prefix: str = ""
    ) -> np.ndarray:
        """P(option) per conversation: a (len(conversations), len(options)) array whose rows sum to 1.

        ``assistant_prefix`` is accepted for interface compatibility and not sent: the system
        prompt asks for the bare letter instead (see module docstring).
        """
        if len(options) < 2:
            raise ValueError("score_choices_chat needs at least two options, e.g. [' (A)', ' (B)'].")
        if not conversations:
            return np.zeros((0, len(options)), dtype=np.float64)
        finished = 0

        def one(conv: list[dict]) -> np.ndarray:
            nonlocal finished
            probs = self._score_one(conv, options)
            if self.on_done is not None:
                with self._lock:
                    finished += 1
                    self.on_done(finished)
            return probs

        with ThreadPoolExecutor(max_workers=self.endpoint.max_concurrency) as pool:
            rows = list(pool.map(one, conversations))  # in input order; the first error propagates
        return np.vstack(rows)

    def _score_one(self, conv: list[dict], options: list[str]) -> np.ndarray:
        def ask() -> np.ndarray:
            with self._lock:
                self.requests += 1
            resp = self._client.chat.completions.create(
                model=self.endpoint.model,
                messages=[{"role": "system", "content": SYSTEM_PROMPT}, *conv],
                max_tokens=1,
                temperature=0,
                logprobs=True,
                top_logprobs=TOP_LOGPROBS,
            )
            self.count_usage(resp)
            return _normalise(option_logprobs(_first_token_alternatives(resp), options))

        return with_retries(self.endpoint, self.backoff, ask, "scoring choices", "returns logprobs")

    def count_usage(self, resp: Any) -> None:
        """Add a response's token usage (what a hosted API bills) to the counters."""
        usage = getattr(resp, "usage", None)
        with self._lock:
            self.prompt_tokens += int(getattr(usage, "prompt_tokens", 0) or 0)
            self.completion_tokens += int(getattr(usage, "completion_tokens", 0) or 0)

    def usage(self) -> dict[str, int]:
        """Requests and tokens so far, for a step's metrics."""
        return {
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
        }


def with_retries(
    endpoint: OpenAIEndpointConfig, backoff: float, call: Callable[[], Any], what: str, hint: str
):
    """call() with retries and exponential backoff (jitter, capped at 30 s) on 429, 5xx, timeouts,
    connection errors and unusable answers (ValueError); an EndpointError naming the endpoint after the
    last try, or at once for a request the server refuses (4xx)."""
    last: BaseException | None = None
    for attempt in range(endpoint.max_retries + 1):
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - classified just below
            if not _retryable(exc):
                raise EndpointError(
                    f"endpoint {endpoint.base_url} (model {endpoint.model}) refused the request: "
                    f"{_describe(exc)}"
                ) from None
            last = exc
            if attempt < endpoint.max_retries:
                delay = min(30.0, backoff * 2**attempt) * (0.5 + random.random() / 2)
                log.debug("endpoint %s: %s; retrying in %.2fs", endpoint.base_url, _describe(exc), delay)
                time.sleep(delay)
    raise EndpointError(
        f"endpoint {endpoint.base_url} (model {endpoint.model}) failed {endpoint.max_retries + 1} times "
        f"{what} (last: {_describe(last)}); check that the server is up and {hint}, then run again "
        "(finished shards are kept), or raise max_retries."
    )


def _first_token_alternatives(resp: Any) -> list[tuple[str, float]]:
    """(token, logprob) alternatives of the answer's first token; ValueError when the answer has none."""
    try:
        content = resp.choices[0].logprobs.content
        first = content[0]
        alts = [(str(t.token), float(t.logprob)) for t in (first.top_logprobs or [])]
        if not alts:  # a server that ignores top_logprobs still gives the chosen token's logprob
            alts = [(str(first.token), float(first.logprob))]
    except (AttributeError, IndexError, TypeError, ValueError):
        raise ValueError("the answer has no logprobs (does the server support logprobs=True?)") from None
    return alts


def _retryable(exc: BaseException) -> bool:
    import openai

    if isinstance(
        exc, (openai.RateLimitError, openai.APITimeoutError, openai.APIConnectionError, ValueError)
    ):
        return True
    return isinstance(exc, openai.APIStatusError) and exc.status_code >= 500


def _describe(exc: BaseException | None) -> str:
    """The error without anything secret: type and status, no request headers."""
    if exc is None:
        return "unknown error"
    status = getattr(exc, "status_code", None)
    text = str(exc).splitlines()[0][:160] if str(exc) else ""
    return f"{type(exc).__name__}{f' {status}' if status else ''}: {text}"
