"""The fine-tuned model name format, defined once: `ft:{base}:{org}:{suffix}:{id}`, and
its checkpoints' `ft:{base}:{org}:{suffix}:{id}:ckpt-step-{N}`."""

from __future__ import annotations

import re
from dataclasses import dataclass

SUFFIX_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"
_SUFFIX_RE = re.compile(SUFFIX_PATTERN)


@dataclass(frozen=True)
class FineTunedModelName:
    base_model: str
    organization: str
    suffix: str
    short_id: str

    def __str__(self) -> str:
        return f"ft:{self.base_model}:{self.organization}:{self.suffix}:{self.short_id}"


def is_fine_tuned(model: str) -> bool:
    return model.startswith("ft:")


def is_valid_suffix(suffix: str) -> bool:
    return bool(_SUFFIX_RE.match(suffix))


def fine_tuned_model_name(
    base_model: str, organization: str, suffix: str | None, short_id: str
) -> str:
    return str(FineTunedModelName(base_model, organization, suffix or "", short_id))


CHECKPOINT_MARKER = ":ckpt-step-"


def checkpoint_model_name(fine_tuned_model: str, step: int) -> str:
    return f"{fine_tuned_model}{CHECKPOINT_MARKER}{step}"


def is_checkpoint(model: str) -> bool:
    return is_fine_tuned(model) and CHECKPOINT_MARKER in model
