"""The base of every config section: strict keys, and a fingerprint of the result-changing fields.

Kept apart from `caiflow.config` so step configs living next to their code (for instance
`caiflow.training.config`) can build on it without an import cycle.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


def _nofp(default: Any, **kwargs: Any) -> Any:
    """A field that does not change results, so it is not part of any fingerprint."""
    return Field(default, json_schema_extra={"fingerprint": False}, **kwargs)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def fingerprint_dict(self) -> dict[str, Any]:
        """The fields that determine results (recursively), for fingerprints."""
        out: dict[str, Any] = {}
        for name, field in type(self).model_fields.items():
            extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
            if extra.get("fingerprint") is False:
                continue
            value = getattr(self, name)
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
