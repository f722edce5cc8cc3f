"""What every section of the job and cluster files shares: unknown keys refused, and the shape of a
problem that involves several fields."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict
from pydantic_core import PydanticCustomError


class Strict(BaseModel):
    """Every section rejects unknown keys, so a typo is an error, not a silent default."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def rule_error(*messages: str) -> PydanticCustomError:
    """A cross-field problem, already phrased with full field paths (one line per message)."""
    return PydanticCustomError("spec_rule", "{message}", {"message": "\n".join(messages)})
