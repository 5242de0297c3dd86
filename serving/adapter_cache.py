"""Adapters on this serving node's disk, fetched from the artifact store on first use.

vLLM loads an adapter from a local folder (and again from it after evicting the adapter
from host memory), so each replica keeps a copy of the adapters it serves. A folder is
fetched whole and checked against its manifest (every file, every size) before vLLM sees
it; the cache holds at most `max_bytes`, evicting the least recently used adapters, except
those the caller pins (the ones its engine has registered, which vLLM may reload from
here at any time). A local store needs no copy: its folders are served where they are.

Each replica has a folder of its own on the node: its budget, its order and its pins
cover what it alone holds, so no replica can delete a folder another's engine may
reload (which would kill that engine). A replica holds a lock on its folder while it
lives; a new one deletes the folders whose replica is gone.

Within a replica, fetches of different adapters run at once (review L13: a large cold
adapter must not hold up the others): `download` takes only its adapter's lock and makes no
room; `fetch` also makes room, and the replica calls it one registration at a time. Making
room skips a copy whose lock is held (it is being fetched, or deleted), so it never
deletes a folder under a download nor waits for one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from training.node_cache import cached_name, locked, node_cache_dir
from training.storage import ArtifactStore, IncompleteFolder

KEY_FILE = ".ftaas-key"
OWNER_LOCK = ".ftaas-owner.lock"  # held (flock) by the live replica owning the folder


@dataclass
class Fetched:
    path: Path
    from_store: bool  # False: found on this node's disk (or served in place)
    evicted: list[str] = field(default_factory=list)  # keys deleted to make room


class AdapterCache:
    def __init__(self, store: ArtifactStore, max_bytes: int, owner: str, root: Path | None = None):
        """`owner`: the replica's id, unique on the node; `root`: the node's cache."""
        self.store, self.max_bytes = store, max_bytes
        shared = root or node_cache_dir() / "adapters"
        name = f"replica-{cached_name(owner)}"
        # Locked before it has its name, so no other replica ever sees it unlocked.
        staging = shared / f".staging-{name}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        self._owner_lock = open(staging / OWNER_LOCK, "w")  # noqa: SIM115  # held while alive
        fcntl.flock(self._owner_lock, fcntl.LOCK_EX)
        self.root = shared / name
        shutil.rmtree(self.root, ignore_errors=True)
        staging.rename(self.root)
        _delete_abandoned(shared)

    def close(self) -> None:
        """Give the folder up (its files go with the next replica's start)."""
        self._owner_lock.close()

    def fetch(self, key: str, pinned: Collection[str] = ()) -> Fetched:
        """The adapter's local folder (as `download`), then room made within the budget:
        the least recently used copies go, never this one nor the `pinned` keys."""
        fetched = self.download(key)
        if fetched.path.parent == self.root:
            keep = {fetched.path} | {self._folder(k) for k in pinned}
            fetched.evicted = self._evict(keep)
        return fetched

    def download(self, key: str) -> Fetched:
        """The adapter's local folder, fetched from the store (whole, checked) unless this
        replica's disk has it; makes no room. Under the adapter's own lock only: other
        adapters' downloads go on at the same time."""
        local = self.store.local_folder(key)
        if local is not None:
            if not self.store.folder_complete(key):
                raise IncompleteFolder(f"{local} is missing or not completely written")
            return Fetched(local, from_store=False)
        target = self._folder(key)
        with locked(target):
            if (target / KEY_FILE).exists():
                os.utime(target)  # recently used
                return Fetched(target, from_store=False)
            self.store.get_folder(key, target)
            (target / KEY_FILE).write_text(key)
        return Fetched(target, from_store=True)

    def forget(self, key: str) -> None:
        """Delete this node's copy (the model was deleted)."""
        if self.store.local_folder(key) is None:
            target = self._folder(key)
            with locked(target):
                shutil.rmtree(target, ignore_errors=True)

    def _folder(self, key: str) -> Path:
        return self.root / cached_name(self.store.location(key))

    def _evict(self, keep: set[Path]) -> list[str]:
        copies = {}  # folder → (last used, bytes); a copy deleted meanwhile is left out
        for folder in self.root.iterdir():
            with contextlib.suppress(OSError):
                if folder.is_dir() and (folder / KEY_FILE).exists():
                    copies[folder] = (folder.stat().st_mtime, _bytes(folder))
        total, evicted = sum(size for _, size in copies.values()), []
        for folder in sorted(copies, key=lambda p: copies[p][0]):
            if total <= self.max_bytes:
                break
            if folder in keep:
                continue
            with _locked_now(folder) as held:
                # Held: a download (or a deletion) is under way; gone: deleted meanwhile.
                if not held or not (folder / KEY_FILE).exists():
                    continue
                key = (folder / KEY_FILE).read_text()
                shutil.rmtree(folder, ignore_errors=True)
            evicted.append(key)
            total -= copies[folder][1]
        return evicted


def _bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


@contextlib.contextmanager
def _locked_now(path: Path) -> Iterator[bool]:
    """The lock `training.node_cache.locked` takes on `path`, if it is free now: whether
    it was (and is held until the block ends)."""
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _delete_abandoned(shared: Path) -> None:
    """Delete the folders of the node's replicas that are gone: their owner lock is free."""
    for folder in shared.glob("replica-*"):
        lock_path = folder / OWNER_LOCK
        if not lock_path.exists():
            continue
        with open(lock_path, "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its replica is alive
            with contextlib.suppress(OSError):
                shutil.rmtree(folder)
