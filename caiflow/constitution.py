"""Constitutions: the written principles that steer critique, revision and feedback.

A constitution is a YAML file (``constitutions/*.yaml``)::

    name: harmless
    version: "1.0"
    principles:
      - id: non-violence                # lowercase-dashes, unique
        name: Non-violence
        critique_request: Identify specific ways in which ...
        revision_request: Please rewrite the assistant response ...
        feedback_question: Which of these assistant responses is less harmful? ...
        inverted:                       # the negation, for the inverted-constitution control
          critique_request: ...
          revision_request: ...
          feedback_question: ...
    few_shot:                           # optional worked examples shown before requests
      - prompt: ...
        answer: ...
        critique: ...
        revision: ...
        principle: non-violence         # optional; must name a principle above
        inverted:                       # optional; the critique under the inverted constitution
          critique: ...

It is validated on load (every error is one line naming the file, the problem and the fix)
and content-hashed: the hash covers every text and the inverted flag, so it travels into
artifact fingerprints and a changed word re-runs everything downstream of its first use.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

# Principle ids end up in artifact columns and UI keys: lowercase words joined by dashes.
ID_PATTERN = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")

_TOP_KEYS = ("name", "version", "principles", "few_shot", "system_prompt", "inverted_system_prompt")
_TEXT_FIELDS = ("critique_request", "revision_request", "feedback_question")
_PRINCIPLE_KEYS = ("id", "name", *_TEXT_FIELDS, "inverted")
_FEW_SHOT_FIELDS = ("prompt", "answer", "critique", "revision")
_FEW_SHOT_KEYS = (*_FEW_SHOT_FIELDS, "principle", "inverted")
_INVERTED_SUFFIX = " (inverted)"


class ConstitutionError(ValueError):
    """A constitution that cannot be used; the one-line message names the file, the problem and the fix."""


@dataclass(frozen=True)
class Principle:
    id: str  # lowercase-dashes, e.g. "non-violence"
    name: str  # human label, e.g. "Non-violence"
    critique_request: str  # asks the model to point out what is wrong with its last answer
    revision_request: str  # asks the model to rewrite the answer without those problems
    feedback_question: str  # multiple-choice question for picking the better of two answers
    inverted_critique_request: str  # the negations, used by the inverted-constitution control
    inverted_revision_request: str
    inverted_feedback_question: str

    def answer_prompt(self) -> str:
        """This principle as a system prompt to answer under (RLCD's positive side; on the inverted
        principle, its negative side)."""
        return (
            f"You are an assistant guided by one principle, {self.name}. Whatever you answer must "
            f"already meet this request: {self.revision_request}"
        )

    def inverted(self) -> Principle:
        """This principle with its texts and their negations swapped."""
        return dataclasses.replace(
            self,
            critique_request=self.inverted_critique_request,
            revision_request=self.inverted_revision_request,
            feedback_question=self.inverted_feedback_question,
            inverted_critique_request=self.critique_request,
            inverted_revision_request=self.revision_request,
            inverted_feedback_question=self.feedback_question,
        )


@dataclass(frozen=True)
class FewShot:
    prompt: str
    answer: str
    critique: str
    revision: str
    principle: str | None = None  # the principle the critique applies, if any
    # The critique as the inverted constitution would write it. Under inversion the example's
    # answer and revision swap places (the "revision" makes the answer worse), so the example
    # demonstrates the negated principle instead of quietly teaching the original one.
    inverted_critique: str | None = None

    def inverted(self) -> FewShot:
        return dataclasses.replace(
            self,
            answer=self.revision,
            revision=self.answer,
            critique=self.inverted_critique or "",
            inverted_critique=self.critique,
        )


@dataclass(frozen=True)
class Constitution:
    name: str
    version: str
    principles: tuple[Principle, ...]
    few_shot: tuple[FewShot, ...] = field(default_factory=tuple)
    inverted: bool = False
    source: str = field(default="<memory>", compare=False)  # where it was read from; not hashed
    # The constitution as one system prompt (context distillation, contrastive preferences, the
    # prompted reference arm) and its negation; None: rendered from the principles.
    system_prompt: str | None = None
    inverted_system_prompt: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """All content (what the hash covers), as plain JSON-able data."""
        return {
            "name": self.name,
            "version": self.version,
            "inverted": self.inverted,
            "principles": [dataclasses.asdict(p) for p in self.principles],
            "few_shot": [dataclasses.asdict(f) for f in self.few_shot],
            "system_prompt": self.system_prompt,
            "inverted_system_prompt": self.inverted_system_prompt,
        }

    def as_system_prompt(self) -> str:
        """The constitution rendered as a system prompt (its negation when inverted).

        The constitution's own `system_prompt` when it has one, else its principles' revision
        requests as rules (these are the negated ones in the inverted constitution).
        """
        if self.system_prompt:
            return self.system_prompt
        rules = "\n".join(f"- {p.name}: {p.revision_request}" for p in self.principles)
        return f"Follow these principles in every answer you give.\n{rules}"

    def opposite_system_prompt(self) -> str:
        """The system prompt of this constitution's inversion (the negative of contrastive pairs)."""
        return self.invert().as_system_prompt()

    @property
    def content_hash(self) -> str:
        """sha256 (first 16 hex) of canonical JSON of all content, the inverted flag included."""
        blob = json.dumps(self.to_dict(), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]

    def principle_ids(self) -> list[str]:
        return [p.id for p in self.principles]

    def principle(self, pid: str) -> Principle:
        for p in self.principles:
            if p.id == pid:
                return p
        raise ConstitutionError(
            f"constitution '{self.name}' ({self.source}) has no principle '{pid}': "
            f"use one of {', '.join(self.principle_ids())}."
        )

    def invert(self) -> Constitution:
        """The control constitution: every principle (and few-shot example) negated.

        Inverting twice gives back the original (same content hash).
        """
        if self.inverted:
            name = self.name[: -len(_INVERTED_SUFFIX)] if self.name.endswith(_INVERTED_SUFFIX) else self.name
        else:
            name = self.name + _INVERTED_SUFFIX
        few = []
        for ex in self.few_shot:
            if ex.inverted_critique is None:
                # Without a negated critique the example would still teach the original
                # principle, which would blur the control; leave it out instead.
                log.warning(
                    "few-shot example %r has no inverted critique; left out of the inverted constitution",
                    ex.prompt[:40],
                )
                continue
            few.append(ex.inverted())
        return dataclasses.replace(
            self,
            name=name,
            principles=tuple(p.inverted() for p in self.principles),
            few_shot=tuple(few),
            inverted=not self.inverted,
            system_prompt=self.inverted_system_prompt,
            inverted_system_prompt=self.system_prompt,
        )

    def select(self, ids: list[str]) -> Constitution:
        """Keep only these principles (in the constitution's order); an empty list keeps all.

        Few-shot examples tied to a dropped principle are dropped too; if that would leave
        none, all examples are kept (a small model needs at least one to follow the format).
        """
        if not ids:
            return self
        valid = self.principle_ids()
        unknown = [i for i in ids if i not in valid]
        if unknown:
            raise ConstitutionError(
                f"constitution '{self.name}' ({self.source}) has no principle "
                f"{', '.join(repr(u) for u in unknown)}: "
                f"choose among {', '.join(valid)}."
            )
        keep = set(ids)
        principles = tuple(p for p in self.principles if p.id in keep)
        few = tuple(f for f in self.few_shot if f.principle is None or f.principle in keep)
        return dataclasses.replace(self, principles=principles, few_shot=few or self.few_shot)


# ---------------------------------------------------------------- loading


def _err(path: Path, problem: str, fix: str) -> ConstitutionError:
    return ConstitutionError(f"constitution '{path}': {problem}; {fix}.")


def _text(path: Path, where: str, key: str, value: Any) -> str:
    """A required non-empty string value, or a one-line error."""
    if value is None:
        raise _err(path, f"{where} is missing '{key}'", f"add a '{key}:' text to it")
    if not isinstance(value, str):
        raise _err(
            path,
            f"{where} '{key}' must be text, got {type(value).__name__} {value!r}",
            "quote the value in the YAML",
        )
    if not value.strip():
        raise _err(path, f"{where} '{key}' is empty", f"write the {key} text")
    return value.strip()


def _check_keys(path: Path, where: str, data: dict[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = [str(k) for k in data if k not in allowed]
    if unknown:
        raise _err(
            path,
            f"{where} has unknown key(s) {', '.join(repr(k) for k in unknown)}",
            f"remove or rename them (allowed: {', '.join(allowed)})",
        )


def _mapping(path: Path, where: str, value: Any, fix: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _err(path, f"{where} must be a mapping, got {type(value).__name__}", fix)
    return value


def _parse_principle(path: Path, index: int, raw: Any) -> Principle:
    where = f"principle #{index + 1}"
    data = _mapping(path, where, raw, "write it as 'id: ..., name: ..., critique_request: ...' keys")
    pid = data.get("id")
    if isinstance(pid, str) and pid:
        where = f"principle #{index + 1} ('{pid}')"
    _check_keys(path, where, data, _PRINCIPLE_KEYS)
    pid = _text(path, where, "id", pid)
    if not ID_PATTERN.match(pid):
        raise _err(path, f"{where} has id '{pid}' which is not lowercase-dashes", "use e.g. 'non-violence'")
    name = _text(path, where, "name", data.get("name"))
    texts = {k: _text(path, where, k, data.get(k)) for k in _TEXT_FIELDS}
    if data.get("inverted") is None:
        raise _err(
            path,
            f"{where} is missing 'inverted'",
            "add an 'inverted:' mapping with the negated critique_request, revision_request "
            "and feedback_question",
        )
    inv = _mapping(
        path,
        f"{where} 'inverted'",
        data["inverted"],
        "give critique_request, revision_request, feedback_question",
    )
    _check_keys(path, f"{where} 'inverted'", inv, _TEXT_FIELDS)
    inv_texts = {k: _text(path, f"{where} 'inverted'", k, inv.get(k)) for k in _TEXT_FIELDS}
    return Principle(
        id=pid,
        name=name,
        **texts,
        **{f"inverted_{k}": v for k, v in inv_texts.items()},
    )


def _parse_few_shot(path: Path, index: int, raw: Any, ids: list[str]) -> FewShot:
    where = f"few_shot example #{index + 1}"
    data = _mapping(
        path, where, raw, "write it as 'prompt: ..., answer: ..., critique: ..., revision: ...' keys"
    )
    _check_keys(path, where, data, _FEW_SHOT_KEYS)
    texts = {k: _text(path, where, k, data.get(k)) for k in _FEW_SHOT_FIELDS}
    principle = data.get("principle")
    if principle is not None:
        principle = _text(path, where, "principle", principle)
        if principle not in ids:
            raise _err(
                path,
                f"{where} names unknown principle '{principle}'",
                f"use one of {', '.join(ids)} or leave 'principle' out",
            )
    inverted_critique = None
    if data.get("inverted") is not None:
        inv = _mapping(path, f"{where} 'inverted'", data["inverted"], "give it a 'critique:' text")
        _check_keys(path, f"{where} 'inverted'", inv, ("critique",))
        inverted_critique = _text(path, f"{where} 'inverted'", "critique", inv.get("critique"))
    return FewShot(**texts, principle=principle, inverted_critique=inverted_critique)


def parse_constitution(data: Any, path: str | Path = "<memory>") -> Constitution:
    """Validate an already-parsed YAML mapping; ``path`` only labels the errors."""
    path = Path(path)
    if not isinstance(data, dict):
        raise _err(
            path,
            f"the top level must be a mapping, got {type(data).__name__}",
            "start the file with 'name:', 'version:' and 'principles:' keys",
        )
    _check_keys(path, "the top level", data, _TOP_KEYS)
    name = _text(path, "the top level", "name", data.get("name"))
    version = _text(path, "the top level", "version", data.get("version"))
    raw_principles = data.get("principles")
    if not raw_principles:
        raise _err(path, "no principles", "add a 'principles:' list with at least one principle")
    if not isinstance(raw_principles, list):
        raise _err(path, "'principles' must be a list", "write each principle as a '- id: ...' item")
    principles = [_parse_principle(path, i, raw) for i, raw in enumerate(raw_principles)]
    seen: set[str] = set()
    for p in principles:
        if p.id in seen:
            raise _err(path, f"duplicate principle id '{p.id}'", "give every principle a unique id")
        seen.add(p.id)
    ids = [p.id for p in principles]
    raw_few = data.get("few_shot") or []
    if not isinstance(raw_few, list):
        raise _err(path, "'few_shot' must be a list", "write each example as a '- prompt: ...' item")
    few = [_parse_few_shot(path, i, raw, ids) for i, raw in enumerate(raw_few)]
    prompts = {
        key: _text(path, "the top level", key, data[key]) if data.get(key) is not None else None
        for key in ("system_prompt", "inverted_system_prompt")
    }
    if (prompts["system_prompt"] is None) != (prompts["inverted_system_prompt"] is None):
        raise _err(
            path,
            "it has only one of 'system_prompt' and 'inverted_system_prompt'",
            "give both (the inverted control needs the negation) or neither",
        )
    return Constitution(
        name=name,
        version=version,
        principles=tuple(principles),
        few_shot=tuple(few),
        inverted=False,
        source=str(path),
        **prompts,
    )


def load_constitution(
    path: str | Path, invert: bool = False, principles: list[str] | None = None
) -> Constitution:
    """Read and validate a constitution file; optionally keep some principles, then invert."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise _err(
            path,
            "file does not exist",
            "point constitution.path at an existing YAML file, e.g. constitutions/harmless.yaml",
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise _err(path, "file is not UTF-8 text", "re-save it as UTF-8") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise _err(path, f"not valid YAML{where}", "fix the syntax there") from None
    constitution = parse_constitution(data, path).select(list(principles or []))
    return constitution.invert() if invert else constitution
