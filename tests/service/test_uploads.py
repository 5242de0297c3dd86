"""The Uploads API through the official SDK's own chunked-upload helper."""

from __future__ import annotations

import hashlib

import pytest
from openai import BadRequestError, NotFoundError, OpenAI

from tests.conftest import memorisation_jsonl


def test_a_file_sent_in_parts_becomes_a_validated_file(sdk: OpenAI):
    data = memorisation_jsonl()
    upload = sdk.uploads.upload_file_chunked(
        file=data,
        filename="secret.jsonl",
        bytes=len(data),
        mime_type="application/jsonl",
        purpose="fine-tune",
        part_size=400,  # several parts
        md5=hashlib.md5(data).hexdigest(),
    )
    assert upload.status == "completed" and upload.file is not None
    assert upload.file.status == "processed" and upload.file.bytes == len(data)
    assert sdk.files.content(upload.file.id).content == data
    assert upload.file.id in [f.id for f in sdk.files.list()]


def test_parts_must_add_up_and_match_the_md5(sdk: OpenAI):
    data = memorisation_jsonl()
    upload = sdk.uploads.create(
        bytes=len(data), filename="a.jsonl", mime_type="application/jsonl", purpose="fine-tune"
    )
    part = sdk.uploads.parts.create(upload_id=upload.id, data=data[:100])
    with pytest.raises(BadRequestError) as short:
        sdk.uploads.complete(upload_id=upload.id, part_ids=[part.id])
    assert short.value.body["param"] == "part_ids"  # type: ignore[index]
    rest = sdk.uploads.parts.create(upload_id=upload.id, data=data[100:])
    with pytest.raises(BadRequestError) as wrong:
        sdk.uploads.complete(upload_id=upload.id, part_ids=[part.id, rest.id], md5="0" * 32)
    assert wrong.value.body["param"] == "md5"  # type: ignore[index]
    done = sdk.uploads.complete(upload_id=upload.id, part_ids=[part.id, rest.id])
    assert done.status == "completed"


def test_a_cancelled_upload_takes_no_more_parts(sdk: OpenAI):
    upload = sdk.uploads.create(
        bytes=10, filename="a.jsonl", mime_type="application/jsonl", purpose="fine-tune"
    )
    assert sdk.uploads.cancel(upload.id).status == "cancelled"
    with pytest.raises(BadRequestError):
        sdk.uploads.parts.create(upload_id=upload.id, data=b"0123456789")
    with pytest.raises(NotFoundError):
        sdk.uploads.cancel("upload_nothere")


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"filename": "a.txt", "purpose": "fine-tune"}, "filename"),
        ({"filename": "a.jsonl", "purpose": "nonsense"}, "purpose"),
        ({"filename": "a.jsonl", "purpose": "fine-tune", "bytes": 10**12}, "bytes"),
    ],
)
def test_bad_uploads_are_refused_at_creation(sdk: OpenAI, fields, param):
    with pytest.raises(BadRequestError) as refused:
        sdk.uploads.create(**{"bytes": 10, "mime_type": "application/jsonl", **fields})
    assert refused.value.body["param"] == param  # type: ignore[index]


def test_two_completions_racing_make_one_file(sdk: OpenAI, parts):
    import threading

    data = memorisation_jsonl()
    upload = sdk.uploads.create(
        bytes=len(data), filename="a.jsonl", mime_type="application/jsonl", purpose="fine-tune"
    )
    part = sdk.uploads.parts.create(upload_id=upload.id, data=data)
    outcomes: list[str] = []

    def complete() -> None:
        try:
            outcomes.append(sdk.uploads.complete(upload_id=upload.id, part_ids=[part.id]).status)
        except BadRequestError:
            outcomes.append("refused")

    racers = [threading.Thread(target=complete) for _ in range(2)]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join()
    assert sorted(outcomes) == ["completed", "refused"]
    assert len([f for f in sdk.files.list() if f.filename == "a.jsonl"]) == 1


def test_a_file_name_longer_than_the_store_keeps_is_refused(sdk: OpenAI):
    with pytest.raises(BadRequestError) as refused:
        sdk.files.create(file=("x" * 600 + ".jsonl", memorisation_jsonl()), purpose="fine-tune")
    assert refused.value.body["param"] == "file"  # type: ignore[index]
