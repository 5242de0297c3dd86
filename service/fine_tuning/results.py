"""A finished job's result file: its metrics as CSV, stored as a `fine-tune-results` file.

Columns are OpenAI's (`step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy`)
followed by the full-validation pair, then any other metric the method reports (DPO's
rewards, for one) in the order first seen; cells are empty where a step has no such value.
The file is plain CSV, not the base64 OpenAI's live API has been seen to return. With a
validation file, the last step's row also holds the tuned model's evaluation
(training/evaluation.py); the figures of the model the job started from are in the
job's "Before training" event.
"""

from __future__ import annotations

import csv
import io

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db import EventRow, FileRow, JobRow, now
from service.ids import file_id
from training.storage import ArtifactStore

RESULT_PURPOSE = "fine-tune-results"
RESULT_FILENAME = "step_metrics.csv"
# CSV column ← metrics event field
COLUMNS = {
    "step": "step",
    "train_loss": "train_loss",
    "train_accuracy": "train_mean_token_accuracy",
    "valid_loss": "valid_loss",
    "valid_mean_token_accuracy": "valid_mean_token_accuracy",
    "full_valid_loss": "full_valid_loss",
    "full_valid_mean_token_accuracy": "full_valid_mean_token_accuracy",
}


METRIC_PREFIXES = ("train_", "valid_", "full_valid_")


def results_csv(rows: list[dict]) -> bytes:
    columns = dict(COLUMNS)
    for data in rows:
        for field in data:
            if field.startswith(METRIC_PREFIXES) and field not in columns.values():
                columns[field] = field
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(columns)
    for data in rows:
        writer.writerow(_cell(data.get(field)) for field in columns.values())
    return text.getvalue().encode()


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.5f}"
    return str(value)


def write_result_file(session: Session, blobs: ArtifactStore, job: JobRow) -> str:
    """Store the job's result CSV as a file of its organization; returns the file id."""
    events = session.scalars(
        select(EventRow)
        .where(EventRow.job_id == job.id, EventRow.type.in_(("metrics", "message")))
        .order_by(EventRow.seq)
    ).all()
    by_step: dict[int, dict] = {}
    for event in events:  # a step re-run after a resume without checkpoint: the last wins
        data = dict(event.data or {})
        if event.type == "message" and data.pop("stage", None) != "end":
            continue  # only the tuned model's evaluation joins its step's row
        by_step.setdefault(int(data["step"]), {}).update(data)
    content = results_csv([by_step[step] for step in sorted(by_step)])
    new_id = file_id()
    key = f"files/{new_id}"
    size = blobs.put_bytes(key, content)
    session.add(
        FileRow(
            id=new_id,
            organization=job.organization,
            filename=RESULT_FILENAME,
            purpose=RESULT_PURPOSE,
            bytes=size,
            created_at=now(),
            status="processed",
            blob_key=key,
        )
    )
    return new_id
