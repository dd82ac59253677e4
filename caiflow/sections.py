"""The base of every config section: strict keys, and a fingerprint of the result-changing fields.

Every field is in one of three fingerprint classes:

- by value (a plain ``Field``): changing it changes the fingerprint of each step that reads it
  and of the steps downstream;
- by content (``by_content``): a file path or model name; the plan fingerprints what it points
  at (file bytes, folder digest, model identity), so an identical copy elsewhere re-runs nothing
  and an edit re-runs what reads it;
- not fingerprinted (``not_fingerprinted``): batch sizes, devices, worker counts, checkpoint and
  log cadence, labels. tests/test_fingerprints.py holds every field to its class.

A by-value field added after stores were made (``added_setting``) is left out of the fingerprint
while it holds its default, which is what the code did before it existed: upgrading keeps those
stores' artifacts; setting it re-runs what reads it, as any by-value field does.

Kept apart from `caiflow.config` so step configs living next to their code (for instance
`caiflow.training.config`) can build on it without an import cycle.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


def not_fingerprinted(default: Any = ..., **kwargs: Any) -> Any:
    """A field that does not change results, so it is not part of any fingerprint."""
    return Field(default, json_schema_extra={"fingerprint": False}, **kwargs)


def by_content(default: Any = ..., **kwargs: Any) -> Any:
    """A path or model name: fingerprinted by what it points at (the plan adds that), not by its text."""
    return Field(default, json_schema_extra={"fingerprint": "content"}, **kwargs)


def added_setting(default: Any, **kwargs: Any) -> Any:
    """A by-value field whose default is the behaviour from before it existed: fingerprinted only when set
    to something else, so stores made before it keep their artifacts."""
    return Field(default, json_schema_extra={"fingerprint": True, "omit_default": True}, **kwargs)


def _marks(field: Any) -> dict[str, Any]:
    """What the helpers above put in a pydantic FieldInfo's json_schema_extra."""
    return field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}


def fingerprint_class(field: Any) -> str:
    """'value', 'content' or 'none' for a pydantic FieldInfo."""
    mark = _marks(field).get("fingerprint", True)
    return {True: "value", "content": "content", False: "none"}[mark]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def fingerprint_dict(self) -> dict[str, Any]:
        """The fields that determine results (recursively), for fingerprints."""
        out: dict[str, Any] = {}
        for name, field in type(self).model_fields.items():
            if fingerprint_class(field) != "value":
                continue
            value = getattr(self, name)
            if _marks(field).get("omit_default") and value == field.default:
                continue
            out[name] = _fp_value(value)
        return out


def _fp_value(value: Any) -> Any:
    if isinstance(value, Section):
        return value.fingerprint_dict()
    if isinstance(value, list):
        return [_fp_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _fp_value(v) for k, v in value.items()}
    return value
