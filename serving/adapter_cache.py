"""Adapters on this serving node's disk, fetched from the artifact store on first use.

vLLM loads an adapter from a local folder (and again from it after evicting the adapter
from host memory), so each replica keeps a copy of the adapters it serves. A folder is
fetched whole and checked against its manifest (every file, every size) before vLLM sees
it; the cache holds at most `max_bytes`, evicting the least recently used adapters, which
the caller must then unload from its engine. A local store needs no copy: its folders are
served where they are.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from training.node_cache import cached_name, locked, node_cache_dir
from training.storage import ArtifactStore, IncompleteFolder

KEY_FILE = ".ftaas-key"


class AdapterCache:
    def __init__(self, store: ArtifactStore, max_bytes: int, root: Path | None = None):
        self.store, self.max_bytes = store, max_bytes
        self.root = root or node_cache_dir() / "adapters"
        self.root.mkdir(parents=True, exist_ok=True)

    def fetch(self, key: str) -> tuple[Path, list[str]]:
        """The adapter's local folder, and the keys of adapters evicted to make room."""
        local = self.store.local_folder(key)
        if local is not None:
            if not self.store.folder_complete(key):
                raise IncompleteFolder(f"{local} is missing or not completely written")
            return local, []
        target = self.root / cached_name(self.store.location(key))
        with locked(target):
            if (target / KEY_FILE).exists():
                os.utime(target)  # recently used
                return target, []
            self.store.get_folder(key, target)
            (target / KEY_FILE).write_text(key)
        return target, self._evict(keep=target)

    def _evict(self, keep: Path) -> list[str]:
        folders = [p for p in self.root.iterdir() if p.is_dir() and (p / KEY_FILE).exists()]
        sizes = {p: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) for p in folders}
        total, evicted = sum(sizes.values()), []
        for folder in sorted(folders, key=lambda p: p.stat().st_mtime):
            if total <= self.max_bytes:
                break
            if folder == keep:
                continue
            evicted.append((folder / KEY_FILE).read_text())
            shutil.rmtree(folder, ignore_errors=True)
            total -= sizes[folder]
        return evicted
