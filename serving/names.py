"""Names Ray Serve knows a base model's engine by (no Ray import: the API's configuration
checks them at start-up)."""

from __future__ import annotations


def app_name(base_model_id: str) -> str:
    """The Serve application name of a base model (Serve names avoid `/`)."""
    return "llm-" + "".join(c if c.isalnum() or c in "-_." else "-" for c in base_model_id)
