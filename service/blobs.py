"""The blob store: uploaded files and training outputs, by key, in a local folder.

Keys are built by the services from generated ids only; `_path` still refuses anything
that would leave the root, so no user input can name a path.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

CHUNK_BYTES = 1024 * 1024


class BlobTooLarge(Exception):
    pass


class LocalBlobStore:
    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root) or path == self.root:
            raise ValueError(f"blob key {key!r} escapes the store")
        return path

    def local_path(self, key: str) -> Path:
        """A path the trainer can read; for a remote store this would be a cached copy."""
        return self._path(key)

    @contextmanager
    def _atomic_write(self, key: str) -> Iterator[BinaryIO]:
        """A file that appears at `key` whole, and only if the block completes."""
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        try:
            with open(partial, "wb") as out:
                yield out
                out.flush()
                os.fsync(out.fileno())
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)

    def put_file(self, key: str, stream: BinaryIO, max_bytes: int) -> int:
        """Copy `stream` to `key` atomically; refuse (and keep nothing) past `max_bytes`."""
        written = 0
        with self._atomic_write(key) as out:
            while chunk := stream.read(CHUNK_BYTES):
                written += len(chunk)
                if written > max_bytes:
                    raise BlobTooLarge(f"larger than {max_bytes} bytes")
                out.write(chunk)
        return written

    def put_bytes(self, key: str, data: bytes) -> int:
        with self._atomic_write(key) as out:
            out.write(data)
        return len(data)

    def put_concatenation(self, key: str, parts: list[str]) -> tuple[int, str]:
        """Write the parts, in order, as one blob; returns its size and MD5 (hex)."""
        digest, size = hashlib.md5(usedforsecurity=False), 0
        with self._atomic_write(key) as out:
            for part in parts:
                with self.open(part) as stream:
                    while chunk := stream.read(CHUNK_BYTES):
                        digest.update(chunk)
                        size += len(chunk)
                        out.write(chunk)
        return size, digest.hexdigest()

    def keys(self, prefix: str) -> Iterator[tuple[str, float]]:
        """Every blob under `prefix` (unfinished `.partial` writes included), with the
        time it was last written."""
        top = self._path(prefix)
        if not top.is_dir():
            return
        for path in top.rglob("*"):
            if path.is_file():
                yield path.relative_to(self.root).as_posix(), path.stat().st_mtime

    def open(self, key: str) -> BinaryIO:
        return open(self._path(key), "rb")

    def delete(self, key: str) -> None:
        path = self._path(key)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
