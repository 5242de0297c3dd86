"""This node's own disk: a cache of what was fetched from the artifact store (base models,
adapters) and scratch space for one run. Nothing here is shared with another node.

The folder is `FTAAS_NODE_CACHE_DIR` when set (the embedded head sets it under
`FTAAS_HOME`; a cluster's pods set it to a local volume), else a folder in the system's
temporary directory.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from training.storage import MANIFEST, S3Store, is_remote, parse_s3_url

ENV = "FTAAS_NODE_CACHE_DIR"


def node_cache_dir() -> Path:
    folder = os.environ.get(ENV) or os.path.join(tempfile.gettempdir(), f"ftaas-{os.getuid()}")
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


@contextmanager
def scratch_folder(prefix: str) -> Iterator[Path]:
    """A folder for one run's local files, removed when the run ends."""
    root = node_cache_dir() / "scratch"
    root.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """One process of this node at a time (two workers of one node fetch the same model)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def cached_name(location: str) -> str:
    return hashlib.sha256(location.encode()).hexdigest()[:24]


def fetch_model(location: str) -> str:
    """A base model's weights where transformers and vLLM can load them: a local path or a
    Hugging Face id as it is; an `s3://bucket/prefix` copied once into this node's cache
    (every object under the prefix: a folder uploaded with `aws s3 sync` works too)."""
    if not is_remote(location):
        return location
    target = node_cache_dir() / "models" / cached_name(location)
    done = target / ".ftaas-fetched"
    with locked(target):
        if done.exists():
            return str(target)
        bucket, prefix = parse_s3_url(location)
        parent, _, name = prefix.rpartition("/")
        store = S3Store(bucket, parent)
        partial = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
        try:
            found = False
            for item in store.list(name):
                relative = item.key[len(name) + 1 :]
                if relative.rsplit("/", 1)[-1] == MANIFEST:
                    continue
                found = True
                destination = partial / relative
                destination.parent.mkdir(parents=True, exist_ok=True)
                with store.open(item.key) as source, open(destination, "wb") as out:
                    shutil.copyfileobj(source, out, 1024 * 1024)
            if not found:
                raise FileNotFoundError(f"no model files under {location}")
            (partial / done.name).write_text(location)
            shutil.rmtree(target, ignore_errors=True)
            partial.rename(target)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return str(target)
