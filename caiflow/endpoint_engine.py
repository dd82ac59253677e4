"""Generation through an OpenAI-compatible chat endpoint, and the start-up check of each endpoint.

:class:`EndpointEngine` has the engine's ``generate(conversations, sampling, seeds)`` and the
scorer's ``score_choices_chat``, so a role served by vLLM, TGI, SGLang, llama.cpp or a hosted API
drops in where the in-process :class:`caiflow.generation.GenerationEngine` goes. Each row is one
chat-completion request carrying its own ``seed`` (the row's seed, as in-process), ``temperature``,
``top_p`` and ``max_tokens``; up to ``max_concurrency`` requests are in flight (a server batches
them); 429, 5xx, timeouts and dropped connections are retried with backoff
(:func:`caiflow.endpoint_scorer.with_retries`). Rows come back in input order; a step writes
each shard as it finishes, so a killed run or a server that went away loses at most the open
shard.

Reproducibility depends on the server. Same seed, same text: llama.cpp (``llama-cpp-python``'s
server, one request at a time; tested here) and vLLM (per-request seeded sampling; float noise of
batching aside). TGI takes a seed too. Hosted APIs (OpenAI) treat the seed as best effort only, so
a resumed run may differ from an uninterrupted one there.

:func:`check_endpoint` is run for every endpoint role before any step (`caiflow.roles_runtime`):
the server answers, serves the model, and returns logprobs where the role scores choices.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

from caiflow.endpoint_scorer import EndpointChoiceScorer, EndpointError, _describe, with_retries
from caiflow.step_config import OpenAIEndpointConfig


class EndpointEngine(EndpointChoiceScorer):
    """``generate`` and ``score_choices_chat`` through one OpenAI-compatible endpoint."""

    def generate(self, conversations: list[list[dict]], sampling: Any, seeds: list[int]) -> list[str]:
        """One assistant answer per conversation, in input order; `sampling` is a generation.Sampling."""
        if len(seeds) != len(conversations):
            raise ValueError(
                f"got {len(conversations)} conversations but {len(seeds)} seeds: pass one seed per row."
            )
        if any(conv and conv[-1]["role"] == "assistant" for conv in conversations):
            raise ValueError(
                "a conversation ends with an assistant message (an answer's opening, e.g. "
                "preferences.benign_refusal_opener): chat endpoints cannot portably continue one; "
                "generate it with a local model, or leave the opening out."
            )

        def one(job: tuple[list[dict], int]) -> str:
            conv, seed = job

            def ask() -> str:
                with self._lock:
                    self.requests += 1
                resp = self._client.chat.completions.create(
                    model=self.endpoint.model,
                    messages=conv,
                    max_tokens=sampling.max_new_tokens,
                    temperature=sampling.temperature,
                    top_p=sampling.top_p,
                    seed=int(seed) % (1 << 31),  # servers take a 32-bit seed
                )
                self.count_usage(resp)
                text = resp.choices[0].message.content
                if text is None:
                    raise ValueError("the answer has no text")
                return text.strip()

            return with_retries(self.endpoint, self.backoff, ask, "generating", "serves chat completions")

        with ThreadPoolExecutor(max_workers=self.endpoint.max_concurrency) as pool:
            return list(pool.map(one, zip(conversations, seeds)))

    def engine_metrics(self, start_batch_size: int) -> dict[str, int]:
        """No out-of-memory back-off on this side of an endpoint; what it did instead: requests and tokens."""
        return {}


def check_endpoint(endpoint: OpenAIEndpointConfig, who: str, needs_logprobs: bool) -> None:
    """Raise EndpointError (one line, naming the setting) unless the endpoint answers, lists its model and,
    where `needs_logprobs`, returns top logprobs. `who` names the role for the message."""
    probe = EndpointEngine(endpoint.model_copy(update={"max_retries": 1}), backoff=0.2)
    place = f"{who}: endpoint {endpoint.base_url}"
    try:
        served = [m.id for m in probe._client.models.list()]
    except Exception as exc:  # noqa: BLE001 - any failure here means the server cannot be used
        raise EndpointError(
            f"{place} does not answer ({_describe(exc)}): start the server or fix {who}.endpoint.base_url."
        ) from None
    if endpoint.model not in served:
        raise EndpointError(
            f"{place} does not serve model '{endpoint.model}': set {who}.endpoint.model to one of "
            f"{', '.join(served) or '(none listed)'}."
        )
    if needs_logprobs:
        try:
            probe.score_choices_chat([[{"role": "user", "content": "(A) or (B)?"}]], [" (A)", " (B)"])
        except EndpointError:
            raise EndpointError(
                f"{place} (model {endpoint.model}) returns no usable logprobs, which {who} needs to score "
                "(A) vs (B): use a server that supports logprobs=True and top_logprobs (vLLM, llama.cpp, "
                "OpenAI)."
            ) from None
