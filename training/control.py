"""Requests from the service to a running trainer, as files beside its progress log.

The progress log carries news from the trainer to the service; this is the other
direction. Only one request exists: pause (save a checkpoint at the next step, then stop).
Cancel needs no cooperation: the service stops the Ray job outright.
"""

from __future__ import annotations

from pathlib import Path


def _pause_flag(output_dir: str | Path) -> Path:
    return Path(output_dir) / "control" / "pause"


def request_pause(output_dir: str | Path) -> None:
    flag = _pause_flag(output_dir)
    flag.parent.mkdir(parents=True, exist_ok=True)
    flag.touch()


def pause_requested(output_dir: str | Path) -> bool:
    return _pause_flag(output_dir).exists()
