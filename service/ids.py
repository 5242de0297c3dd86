"""Ids in OpenAI's shapes: `file-…`, `ftjob-…`, `ftevent-…`, `ftckpt_…`, `upload_…`, `part_…`."""

from __future__ import annotations

import secrets
import string

_ALPHABET = string.ascii_letters + string.digits


def random_id(prefix: str, length: int = 24) -> str:
    return prefix + "".join(secrets.choice(_ALPHABET) for _ in range(length))


def file_id() -> str:
    return random_id("file-")


def job_id() -> str:
    return random_id("ftjob-")


def event_id() -> str:
    return random_id("ftevent-")


def upload_id() -> str:
    return random_id("upload_")


def upload_part_id() -> str:
    return random_id("part_")


def checkpoint_id() -> str:
    return random_id("ftckpt_")


def model_short_id() -> str:
    """The 8-character id that ends a fine-tuned model's name."""
    return random_id("", 8)
