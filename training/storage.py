"""The artifact store: every byte that passes between roles, by key, under one URL.

Uploaded files and upload parts, training specs, the trainer's progress records and
control requests, checkpoints, adapters and result files all live here, so the API, the
trainers and the serving replicas share no disk: on a cluster they run on different nodes.

`FTAAS_STORAGE_URL` picks the backend:
- a local folder (a path or `file://`), the default, under `FTAAS_HOME`;
- `s3://bucket/prefix`, reached with boto3 and configured the standard AWS way (the
  credential chain, `AWS_REGION`, `AWS_ENDPOINT_URL` for MinIO, Ceph or moto).

Writes are atomic as seen by readers: an object appears whole or not at all (a local file
is written beside and renamed; an S3 PUT or multipart completion is atomic). A folder of
objects (a checkpoint, an adapter, a base model) is whole once its manifest exists: the
manifest is written last and lists every file with its size, so a reader never takes a
half-uploaded folder for a finished one.

Keys are built by ftaas from generated ids only; `check_key` refuses anything else, so no
user input can name a path or an object outside the store.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlparse

CHUNK_BYTES = 1024 * 1024
# S3 multipart: parts of this size, this many in flight: an upload of any size holds at
# most their product in memory.
MULTIPART_CHUNK_BYTES = 8 * 1024 * 1024
MULTIPART_CONCURRENCY = 2
MANIFEST = ".ftaas-folder.json"
_KEY = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")


class BlobTooLarge(Exception):
    pass


class IncompleteFolder(Exception):
    """A folder without its manifest, or whose files do not match it."""


def check_key(key: str) -> str:
    if not _KEY.match(key) or any(part in (".", "..") for part in key.split("/")):
        raise ValueError(f"invalid artifact key {key!r}")
    return key


def join(*parts: str) -> str:
    return "/".join(part.strip("/") for part in parts if part.strip("/"))


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int
    modified: float  # seconds since the epoch


class _Reader(io.RawIOBase):
    """A raw stream defined by its `read`: buffered readers, `with` and boto3 take it."""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


class _Limited(_Reader):
    """A stream that raises BlobTooLarge once more than `limit` bytes were read."""

    def __init__(self, stream: BinaryIO, limit: int | None):
        self.stream, self.limit, self.count = stream, limit, 0

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.count += len(data)
        if self.limit is not None and self.count > self.limit:
            raise BlobTooLarge(f"larger than {self.limit} bytes")
        return data


class _Concatenation(_Reader):
    """The objects at `keys`, read one after the other as one stream, hashed on the way."""

    def __init__(self, store: ArtifactStore, keys: Sequence[str]):
        self.store, self.keys = store, list(keys)
        self.current: BinaryIO | None = None
        self.md5 = hashlib.md5(usedforsecurity=False)

    def read(self, size: int = -1) -> bytes:
        size = CHUNK_BYTES if size is None or size < 0 else size
        while True:
            if self.current is None:
                if not self.keys:
                    return b""
                self.current = self.store.open(self.keys.pop(0))
            data = self.current.read(size)
            if data:
                self.md5.update(data)
                return data
            self.current.close()
            self.current = None

    def close(self) -> None:
        if self.current is not None:
            self.current.close()
        super().close()


class ArtifactStore:
    """What every backend offers; folders and concatenation are built on the primitives."""

    url: str

    # --- primitives, per backend
    def put_file(self, key: str, stream: BinaryIO, max_bytes: int | None = None) -> int:
        """Copy `stream` to `key` atomically; refuse (keeping nothing) past `max_bytes`."""
        raise NotImplementedError

    def open(self, key: str) -> BinaryIO:
        """A stream of the object (FileNotFoundError when there is none)."""
        raise NotImplementedError

    def list(self, prefix: str, after: str | None = None) -> Iterator[StoredObject]:
        """Every object under the folder `prefix`, in key order (only those whose key
        sorts after `after`, when given)."""
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def delete(self, key: str) -> None:
        """The object at `key` and everything under the folder `key`."""
        raise NotImplementedError

    def location(self, key: str) -> str:
        """A URL of `key` another process can open with `fetch_folder` / `open_store`."""
        raise NotImplementedError

    def check(self) -> None:
        """Raise, naming the problem, unless the store can be reached."""

    def local_folder(self, key: str) -> Path | None:
        """The folder itself when it is on this machine's disk (no copy needed)."""
        return None

    def local_file(self, key: str, scratch: Path) -> Path:
        """A local path of the object: a download into `scratch`, unless it is local."""
        target = scratch / "objects" / key.replace("/", "_")
        target.parent.mkdir(parents=True, exist_ok=True)
        with self.open(key) as source, open(target, "wb") as out:
            shutil.copyfileobj(source, out, CHUNK_BYTES)
        return target

    # --- built on them
    def put_bytes(self, key: str, data: bytes) -> int:
        return self.put_file(key, io.BytesIO(data))

    def get_bytes(self, key: str) -> bytes:
        with self.open(key) as stream:
            return stream.read()

    def put_concatenation(
        self, key: str, parts: Sequence[str], max_bytes: int | None = None
    ) -> tuple[int, str]:
        """Write the parts, in order, as one object; returns its size and MD5 (hex)."""
        with _Concatenation(self, parts) as stream:
            size = self.put_file(key, stream, max_bytes)  # type: ignore[arg-type]
            return size, stream.md5.hexdigest()

    def put_folder(self, local: str | Path, key: str) -> None:
        """Upload a local folder. Each folder's manifest (every file under it, with its
        size) goes after its files, so a folder, and each folder in it, counts as written
        only once everything in it is."""
        local = Path(local)
        sizes: dict[str, int] = {}
        for path in sorted(local.iterdir()):
            if path.is_dir():
                self.put_folder(path, join(key, path.name))
                nested = self.manifest(join(key, path.name)) or {}
                sizes.update({f"{path.name}/{name}": size for name, size in nested.items()})
            elif path.name != MANIFEST:
                with open(path, "rb") as stream:
                    sizes[path.name] = self.put_file(join(key, path.name), stream)
        self.put_bytes(join(key, MANIFEST), json.dumps({"files": sizes}).encode())

    def manifest(self, key: str) -> dict[str, int] | None:
        """The folder's files and sizes, or None while it is not whole."""
        try:
            data = self.get_bytes(join(key, MANIFEST))
        except FileNotFoundError:
            return None
        return dict(json.loads(data)["files"])

    def folder_complete(self, key: str) -> bool:
        return self.exists(join(key, MANIFEST))

    def get_folder(self, key: str, local: str | Path) -> Path:
        """Download a whole folder to `local` (replaced atomically), checking every size."""
        sizes = self.manifest(key)
        if sizes is None:
            raise IncompleteFolder(f"{self.location(key)} is missing or not completely written")
        local = Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=local.name + ".", dir=local.parent))
        try:
            for relative, size in sizes.items():
                target = partial / check_key(relative)
                target.parent.mkdir(parents=True, exist_ok=True)
                with self.open(join(key, relative)) as source, open(target, "wb") as out:
                    shutil.copyfileobj(source, out, CHUNK_BYTES)
                if target.stat().st_size != size:
                    raise IncompleteFolder(
                        f"{self.location(join(key, relative))} has {target.stat().st_size} "
                        f"bytes, its manifest says {size}"
                    )
            shutil.rmtree(local, ignore_errors=True)
            partial.rename(local)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        return local

    def folder_bytes(self, key: str) -> int:
        return sum((self.manifest(key) or {}).values())


class LocalStore(ArtifactStore):
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.url = str(self.root)

    def _path(self, key: str) -> Path:
        path = (self.root / check_key(key)).resolve()
        if not path.is_relative_to(self.root) or path == self.root:
            raise ValueError(f"artifact key {key!r} escapes the store")
        return path

    def location(self, key: str) -> str:
        return str(self._path(key))

    def local_folder(self, key: str) -> Path | None:
        return self._path(key)

    def local_file(self, key: str, scratch: Path) -> Path:
        return self._path(key)

    @contextmanager
    def _atomic_write(self, key: str) -> Iterator[BinaryIO]:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        try:
            with open(partial, "wb") as out:
                yield out
                out.flush()
                os.fsync(out.fileno())
            os.replace(partial, path)
            _fsync_folder(path.parent)  # the rename itself survives a power cut (review L22)
        finally:
            partial.unlink(missing_ok=True)

    def put_file(self, key: str, stream: BinaryIO, max_bytes: int | None = None) -> int:
        written = 0
        with self._atomic_write(key) as out:
            while chunk := stream.read(CHUNK_BYTES):
                written += len(chunk)
                if max_bytes is not None and written > max_bytes:
                    raise BlobTooLarge(f"larger than {max_bytes} bytes")
                out.write(chunk)
        return written

    def open(self, key: str) -> BinaryIO:
        return open(self._path(key), "rb")

    def list(self, prefix: str, after: str | None = None) -> Iterator[StoredObject]:
        top = self._path(prefix)
        if not top.is_dir():
            return
        for path in sorted(top.rglob("*")):
            key = path.relative_to(self.root).as_posix()
            if path.is_file() and (after is None or key > after):
                stat = path.stat()
                yield StoredObject(key, stat.st_size, stat.st_mtime)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        path = self._path(key)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


class _Body(_Reader):
    """boto3's StreamingBody as a file object (buffered line reads, `with`)."""

    def __init__(self, body: Any):
        self.body = body

    def read(self, size: int = -1) -> bytes:
        return bytes(self.body.read(None if size is None or size < 0 else size))

    def close(self) -> None:
        self.body.close()
        super().close()


class S3Store(ArtifactStore):
    def __init__(self, bucket: str, prefix: str = "", client: Any = None):
        from boto3.s3.transfer import TransferConfig

        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.client = client or s3_client()
        self.transfer = TransferConfig(
            multipart_threshold=MULTIPART_CHUNK_BYTES,
            multipart_chunksize=MULTIPART_CHUNK_BYTES,
            max_concurrency=MULTIPART_CONCURRENCY,
        )

    def _key(self, key: str) -> str:
        return join(self.prefix, check_key(key))

    def location(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def check(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except (BotoCoreError, ClientError) as error:
            raise RuntimeError(f"cannot reach bucket {self.bucket}: {error}") from error

    def put_file(self, key: str, stream: BinaryIO, max_bytes: int | None = None) -> int:
        limited = _Limited(stream, max_bytes)
        # Multipart past one part: memory stays flat whatever the size; a failure (the
        # limit included) aborts the upload, so nothing half-written is ever visible.
        self.client.upload_fileobj(limited, self.bucket, self._key(key), Config=self.transfer)
        return limited.count

    def open(self, key: str) -> BinaryIO:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
        except self.client.exceptions.NoSuchKey:
            raise FileNotFoundError(self.location(key)) from None
        return io.BufferedReader(_Body(response["Body"]), CHUNK_BYTES)

    def list(self, prefix: str, after: str | None = None) -> Iterator[StoredObject]:
        folder = self._key(prefix) + "/"
        strip = len(self.prefix) + 1 if self.prefix else 0
        extra = {"StartAfter": self._key(after)} if after else {}
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=folder, **extra
        )
        for page in pages:
            for item in page.get("Contents", []):
                yield StoredObject(
                    item["Key"][strip:], int(item["Size"]), item["LastModified"].timestamp()
                )

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        return True

    def delete(self, key: str) -> None:
        keys = [self._key(key)] + [self._key(item.key) for item in self.list(key)]
        for start in range(0, len(keys), 1000):  # DeleteObjects takes 1000 keys a call
            batch = [{"Key": k} for k in keys[start : start + 1000]]
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})


def s3_client() -> Any:
    """An S3 client configured the standard AWS way (credential chain, AWS_REGION,
    AWS_ENDPOINT_URL, AWS_ENDPOINT_URL_S3), retrying with backoff."""
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        "s3",
        config=Config(retries={"mode": "standard", "max_attempts": 5}, max_pool_connections=16),
    )


def parse_s3_url(url: str) -> tuple[str, str]:
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"not an s3://bucket/prefix URL: {url!r}")
    return parsed.netloc, parsed.path.strip("/")


def open_store(url: str | Path) -> ArtifactStore:
    """The store at `url`: `s3://bucket/prefix`, or a local folder (path or file://)."""
    text = str(url)
    if text.startswith("s3://"):
        return S3Store(*parse_s3_url(text))
    if text.startswith("file://"):
        text = urlparse(text).path
    if "://" in text:
        raise ValueError(f"unsupported storage URL {text!r}: use a local folder or s3://")
    return LocalStore(text)


def is_remote(location: str) -> bool:
    return location.startswith("s3://")


def _fsync_folder(folder: Path) -> None:
    """Flush a folder's entries (a rename into it) to disk; a no-op where folders cannot
    be opened (Windows)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
