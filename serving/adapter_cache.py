"""Adapters on this serving node's disk, fetched from the artifact store on first use.

vLLM loads an adapter from a local folder (and again from it after evicting the adapter
from host memory), so each replica keeps a copy of the adapters it serves. A folder is
fetched whole and checked against its manifest (every file, every size) before vLLM sees
it; the cache holds at most `max_bytes`, evicting the least recently used adapters, except
those the caller pins (the ones its engine has registered, which vLLM may reload from
here at any time). A local store needs no copy: its folders are served where they are.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from training.node_cache import cached_name, locked, node_cache_dir
from training.storage import ArtifactStore, IncompleteFolder

KEY_FILE = ".ftaas-key"


@dataclass
class Fetched:
    path: Path
    from_store: bool  # False: found on this node's disk (or served in place)
    evicted: list[str] = field(default_factory=list)  # keys deleted to make room


class AdapterCache:
    def __init__(self, store: ArtifactStore, max_bytes: int, root: Path | None = None):
        self.store, self.max_bytes = store, max_bytes
        self.root = root or node_cache_dir() / "adapters"
        self.root.mkdir(parents=True, exist_ok=True)

    def fetch(self, key: str, pinned: Collection[str] = ()) -> Fetched:
        """The adapter's local folder; making room never evicts the `pinned` keys."""
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
        keep = {target} | {self._folder(k) for k in pinned}
        return Fetched(target, from_store=True, evicted=self._evict(keep))

    def forget(self, key: str) -> None:
        """Delete this node's copy (the model was deleted)."""
        if self.store.local_folder(key) is None:
            target = self._folder(key)
            with locked(target):
                shutil.rmtree(target, ignore_errors=True)

    def _folder(self, key: str) -> Path:
        return self.root / cached_name(self.store.location(key))

    def _evict(self, keep: set[Path]) -> list[str]:
        folders = [p for p in self.root.iterdir() if p.is_dir() and (p / KEY_FILE).exists()]
        sizes = {p: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) for p in folders}
        total, evicted = sum(sizes.values()), []
        for folder in sorted(folders, key=lambda p: p.stat().st_mtime):
            if total <= self.max_bytes:
                break
            if folder in keep:
                continue
            evicted.append((folder / KEY_FILE).read_text())
            shutil.rmtree(folder, ignore_errors=True)
            total -= sizes[folder]
        return evicted
