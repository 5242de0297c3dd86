"""Adapters in and out: a tuned model's PEFT folder as an archive, and an external PEFT
LoRA adapter checked against what the serving engine can load.

Out: `adapter_config.json` and `adapter_model.safetensors` as a gzipped tar with one
folder, streamed from the artifact store as it is read (no temporary copy, bounded memory).

In: a tar (any compression) or zip archive holding those two files, anywhere in it. Only
those two names are read, each as a regular file within its size bound; nothing in the
archive names a path on this machine. The weights' safetensors header is checked against
the base model before the rest of them is read, so an archive's work is bounded by what
a servable adapter of that base can hold. What the engine can load is decided by
serving/servable.py, as for a job before it trains (`check_job`): LoRA of a rank the base
model's engine accepts, with no `modules_to_save`, no DoRA and no biases, on linear layers
the base model has, with their shapes, that vLLM applies LoRA to for its architecture.
"""

from __future__ import annotations

import functools
import json
import lzma
import re
import tarfile
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from service.config import BaseModelConfig
from service.errors import InvalidRequest
from service.models.weights_header import (
    LENGTH_BYTES,
    MAX_HEADER_BYTES,
    NotSafetensors,
    Tensor,
    file_header,
    read_header,
)
from serving.servable import DORA, RANK, TARGETS, EngineBase, Unservable, servable
from serving.servable import check_weights as check_servable_weights
from training.hyperparameters import SupervisedHyperparameters, default_lora_alpha
from training.spec import ADAPTER_CONFIG, ADAPTER_FILES, ADAPTER_WEIGHTS
from training.storage import CHUNK_BYTES, ArtifactStore, S3Store, is_remote, join, parse_s3_url

CONFIG, WEIGHTS = ADAPTER_CONFIG, ADAPTER_WEIGHTS
MAX_CONFIG_BYTES = 1024 * 1024


def archive_folder_name(model: str) -> str:
    """The archive's folder: the model name with what file systems dislike replaced."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", model).strip("-") or "adapter"


def adapter_archive(store: ArtifactStore, key: str, folder: str) -> Iterator[bytes]:
    """The adapter folder at `key` as a .tar.gz, produced while it streams: each file's
    tar header, its bytes from the store, its padding, then the end of the archive."""
    sizes = store.manifest(key) or {}
    gzip = zlib.compressobj(6, zlib.DEFLATED, 31)  # wbits 31: the gzip format
    for name in ADAPTER_FILES:
        info = tarfile.TarInfo(f"{folder}/{name}")
        info.size, info.mode, info.mtime = sizes[name], 0o644, int(time.time())
        yield gzip.compress(info.tobuf(format=tarfile.PAX_FORMAT))
        with store.open(join(key, name)) as stream:
            while chunk := stream.read(CHUNK_BYTES):
                yield gzip.compress(chunk)
        yield gzip.compress(b"\0" * (-info.size % tarfile.BLOCKSIZE))
    yield gzip.compress(b"\0" * (2 * tarfile.BLOCKSIZE))
    yield gzip.flush()


def _bad(message: str) -> InvalidRequest:
    return InvalidRequest(message, param="adapter_file", code="invalid_adapter")


# An adapter archive holds two files: more members than this is not one.
MAX_ARCHIVE_MEMBERS = 1000
MAX_ZIP_DIRECTORY_BYTES = 1024 * 1024
ARCHIVE_ERRORS = (
    tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, zlib.error, lzma.LZMAError,
    RuntimeError, NotImplementedError, ValueError, KeyError,
)  # fmt: skip


HeaderCheck = Callable[[dict[str, Tensor]], None]


def unpack_adapter(
    archive: Path, target: Path, check_header: HeaderCheck, max_weights_bytes: int
) -> Path:
    """The archive's two adapter files, found by name anywhere in it, copied into `target`.

    One pass over the archive, bounded in members and in bytes read (decompressed), so
    no archive can make the API do unbounded work; the weights' header passes
    `check_header` before the rest of them is read; nothing else in it is written."""
    bounds = {CONFIG: MAX_CONFIG_BYTES, WEIGHTS: max_weights_bytes}
    target.mkdir(parents=True, exist_ok=True)
    try:
        if zipfile.is_zipfile(archive):
            _unpack_zip(archive, target, bounds, check_header)
        else:
            _unpack_tar(archive, target, bounds, check_header)
    except InvalidRequest:
        raise
    except ARCHIVE_ERRORS as error:
        raise _bad(f"The adapter file is not a readable tar or zip archive ({error})") from None
    missing = [name for name in ADAPTER_FILES if not (target / name).exists()]
    if missing:
        raise _bad(
            f"The archive has no {' or '.join(missing)}: export the adapter with peft's "
            "save_pretrained(..., safe_serialization=True)"
        )
    return target


def _copy_member(
    stream: IO[bytes], size: int, out: Path, name: str, bound: int, check_header: HeaderCheck
) -> None:
    if size > bound:
        raise _bad(f"{name} is {size} bytes, more than {bound}")
    with open(out, "wb") as file:
        if name == WEIGHTS:  # its header first: checked before the data is read

            def read(count: int) -> bytes:
                data = stream.read(count)
                file.write(data)
                return data

            try:
                tensors = read_header(read, size)
            except NotSafetensors as error:
                raise _bad(f"{WEIGHTS} is not a safetensors file ({error})") from None
            check_header(tensors)
        copied = file.tell()
        while chunk := stream.read(CHUNK_BYTES):
            copied += len(chunk)
            if copied > bound:
                raise _bad(f"{name} is more than {bound} bytes")
            file.write(chunk)


def _unpack_tar(
    archive: Path, target: Path, bounds: dict[str, int], check_header: HeaderCheck
) -> None:
    budget = sum(bounds.values()) + MAX_ARCHIVE_MEMBERS * tarfile.BLOCKSIZE
    read = 0
    with tarfile.open(archive, mode="r|*") as tar:  # a stream: each member read once
        for count, member in enumerate(tar):
            tar.members = []  # type: ignore[attr-defined]  # else the stream keeps every header
            name = member.name.rsplit("/", 1)[-1]
            wanted = name in bounds and member.isreg() and not (target / name).exists()
            if wanted and member.size > bounds[name]:  # told before any of it is read
                raise _bad(f"{name} is {member.size} bytes, more than {bounds[name]}")
            read += member.size
            if count >= MAX_ARCHIVE_MEMBERS or read > budget:
                raise _bad("The archive holds far more than an adapter's two files")
            if wanted:
                stream = tar.extractfile(member)
                assert stream is not None  # a regular file
                with stream:
                    _copy_member(
                        stream, member.size, target / name, name, bounds[name], check_header
                    )


def _zip_entries(archive: Path) -> int:
    """The entry count a zip's end record declares, read before Python's zipfile loads
    its whole directory."""
    with open(archive, "rb") as file:
        file.seek(0, 2)
        file.seek(max(0, file.tell() - (65536 + 22)))
        tail = file.read()
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) < at + 22:
        raise _bad("The adapter file is not a readable zip archive")
    entries = int.from_bytes(tail[at + 10 : at + 12], "little")
    directory = int.from_bytes(tail[at + 12 : at + 16], "little")
    if entries > MAX_ARCHIVE_MEMBERS or directory > MAX_ZIP_DIRECTORY_BYTES:
        raise _bad("The archive holds far more than an adapter's two files")
    return entries


def _unpack_zip(
    archive: Path, target: Path, bounds: dict[str, int], check_header: HeaderCheck
) -> None:
    _zip_entries(archive)
    with zipfile.ZipFile(archive) as zipped:
        for entry in zipped.infolist():
            name = entry.filename.rsplit("/", 1)[-1]
            if name in bounds and not entry.is_dir() and not (target / name).exists():
                with zipped.open(entry) as stream:
                    _copy_member(
                        stream, entry.file_size, target / name, name, bounds[name], check_header
                    )


def base_architecture(base_path: str) -> str | None:
    """The base model's architecture (its config.json's first `architectures`), or None
    while it cannot be read (an embedded model still being built). Remembered once read."""
    if base_path in _architectures:
        return _architectures[base_path]
    try:
        if is_remote(base_path):
            bucket, prefix = parse_s3_url(base_path)
            with S3Store(bucket, "").open(join(prefix, "config.json")) as stream:
                config = json.loads(stream.read(MAX_CONFIG_BYTES))
        else:
            config = json.loads((Path(base_path) / "config.json").read_text())
        architecture = str((config.get("architectures") or [None])[0] or "") or None
    except Exception:  # not there (yet), unreadable: the check uses its fallback list
        return None
    _architectures[base_path] = architecture
    return architecture


_architectures: dict[str, str | None] = {}


def engine_base(base: BaseModelConfig, layers: bool = True) -> EngineBase:
    """What serving/servable.py knows of `base`'s engine; its linear layers when `layers`
    and its weights can be read now (else the check goes by names alone)."""
    found: dict[str, tuple[int, int]] | None = None
    if layers:
        try:
            found = linear_layers(base.path)
        except (InvalidRequest, OSError):  # not built yet, or no safetensors
            found = None
    return EngineBase(base.id, base.max_lora_rank, base_architecture(base.path), found)


JOB_PARAMS = {RANK: "lora_r", DORA: "use_dora", TARGETS: "target_modules"}


def check_job(
    base: BaseModelConfig, hyperparameters: SupervisedHyperparameters, prefix: str
) -> None:
    """Refuse now, with a 400 naming the hyperparameter, the adapter a job would train
    that the engine for `base` could not load when the job is done."""
    lora_alpha = hyperparameters.lora_alpha or default_lora_alpha(hyperparameters.lora_r)
    config = {
        "peft_type": "LORA",
        "r": hyperparameters.lora_r,
        "lora_alpha": lora_alpha,
        "target_modules": hyperparameters.target_modules,
        "use_dora": hyperparameters.use_dora,
        "bias": "none",
    }
    try:
        servable(engine_base(base), config)
    except Unservable as error:
        name = JOB_PARAMS.get(error.field, error.field)
        raise InvalidRequest(f"{name}: {error.message}", param=f"{prefix}.{name}") from None


@functools.lru_cache(maxsize=16)
def linear_layers(base_path: str) -> dict[str, tuple[int, int]]:
    """The base model's linear layers (name → (in, out features)): its weights' matrices,
    read from the safetensors headers alone (from an s3:// base, only their first bytes)."""
    layers: dict[str, tuple[int, int]] = {}
    for tensors in _base_headers(base_path):
        for name, tensor in tensors.items():
            if name.endswith(".weight") and len(tensor.shape) == 2:
                out_features, in_features = tensor.shape
                layers[name.removesuffix(".weight")] = (in_features, out_features)
    if not layers:
        raise _bad("The base model's weights are not in safetensors files: no import for it")
    return layers


def _base_headers(base_path: str) -> Iterator[dict[str, Tensor]]:
    if not is_remote(base_path):
        for path in sorted(Path(base_path).glob("*.safetensors")):
            yield file_header(path)
        return
    bucket, prefix = parse_s3_url(base_path)
    store = S3Store(bucket, "")
    for item in store.list(prefix):
        if "/" not in item.key[len(prefix) :].strip("/") and item.key.endswith(".safetensors"):
            with store.open(item.key) as stream:
                yield read_header(stream.read, item.size)


def weights_bound(layers: dict[str, tuple[int, int]], max_rank: int) -> int:
    """The most bytes a servable adapter's weights file can take: both LoRA matrices of
    every linear layer at the engine's largest rank, in fp32, and a header."""
    matrices = max_rank * sum(i + o for i, o in layers.values())
    return LENGTH_BYTES + MAX_HEADER_BYTES + 4 * matrices


def check_weights(tensors: dict[str, Tensor], engine: EngineBase, rank: int | None = None) -> None:
    """Refuse weights the engine cannot serve (serving/servable.py), from their header."""
    try:
        check_servable_weights(
            engine, {key: (list(t.shape), t.dtype) for key, t in tensors.items()}, rank
        )
    except Unservable as error:
        raise _bad(error.message) from None


def check_adapter(folder: Path, base: BaseModelConfig) -> dict[str, Any]:
    """Refuse, with a 400 naming the problem, an adapter the engine for `base` cannot
    serve; returns its config."""
    try:
        config = json.loads((folder / CONFIG).read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise _bad(f"{CONFIG} is not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise _bad(f"{CONFIG} must be a JSON object")
    if config.get("peft_type") != "LORA":  # none at all is no peft adapter either
        raise _bad(f"Only LoRA adapters can be served (peft_type is {config.get('peft_type')!r})")
    try:
        tensors = file_header(folder / WEIGHTS)
    except NotSafetensors as error:
        raise _bad(f"{WEIGHTS} is not a safetensors file ({error})") from None
    try:
        servable(
            engine_base(base),
            config,
            {key: (list(t.shape), t.dtype) for key, t in tensors.items()},
        )
    except Unservable as error:
        raise _bad(error.message) from None
    return config
