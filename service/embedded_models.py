"""The embedded base models: built on this machine, never downloaded, once per FTAAS_HOME (or
artifact store), in the background after the server is up.

Each is built by its own module (`python -m MODULE FOLDER`, in a child process: the API
process never imports torch), which reuses a complete build of its version and writes a new
one beside its place before renaming it in, so a half-written folder is never used; each
stage it reports goes to the server's log. With a remote store the build is uploaded under
a key naming its version, and trainers and engines on other nodes fetch it from there: the
API's disk keeps no weights. Until a model is built its jobs wait in the queue, its engine
is not deployed and its chat answers 503.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import tempfile
from dataclasses import dataclass

from service.config import BaseModelConfig, Settings
from service.startup import trace_logger
from training.node_cache import locked
from training.smollm2 import SMOLLM2_BUILD, SMOLLM2_ID
from training.storage import ArtifactStore
from training.tiny_model import TINY_MODEL_BUILD, TINY_MODEL_ID

logger = logging.getLogger("ftaas")


@dataclass(frozen=True)
class Builder:
    module: str  # `python -m module FOLDER` writes the model into FOLDER
    version: int  # a new version is a new build (and a new key in a remote store)

    def store_key(self, model_id: str) -> str:
        return f"models/{model_id}-build{self.version}"


BUILDERS = {
    SMOLLM2_ID: Builder("training.smollm2", SMOLLM2_BUILD),
    TINY_MODEL_ID: Builder("training.tiny_model", TINY_MODEL_BUILD),
}


def resolve_base_models(settings: Settings, store: ArtifactStore) -> dict[str, BaseModelConfig]:
    """The configured base models; with a remote store, the embedded ones at their keys."""
    base_models = {m.id: m for m in settings.load_base_models()}
    for model_id in embedded_ids(settings, base_models):
        key = BUILDERS[model_id].store_key(model_id)
        if store.local_folder(key) is None:
            base_models[model_id] = base_models[model_id].model_copy(
                update={"path": store.location(key)}
            )
    return base_models


def embedded_ids(settings: Settings, base_models: dict[str, BaseModelConfig]) -> list[str]:
    return (
        [] if settings.base_models_file is not None else [m for m in base_models if m in BUILDERS]
    )


class ModelBuilds:
    """Which embedded models are built; `ensure` builds one (blocking)."""

    def __init__(
        self, settings: Settings, store: ArtifactStore, base_models: dict[str, BaseModelConfig]
    ):
        self.store, self.base_models = store, base_models
        self.pending = set(embedded_ids(settings, base_models))
        self.home = settings.home

    def ready(self, model_id: str) -> bool:
        return model_id not in self.pending

    def ensure(self, model_id: str) -> None:
        """Build `model_id` unless it is built (a configured model: nothing to do)."""
        if self.ready(model_id):
            return
        # One build of a model at a time on this machine (two API processes may share
        # FTAAS_HOME, as `uvicorn --workers 2` does); a second finds it built.
        with locked(self.home / "models" / model_id):
            builder, base = BUILDERS[model_id], self.base_models[model_id]
            key = builder.store_key(model_id)
            if self.store.local_folder(key) is None:  # the trainers' and engines' copy
                if not self.store.folder_complete(key):
                    with tempfile.TemporaryDirectory(prefix=f"{model_id}-") as folder:
                        _run(builder.module, folder)
                        self.store.put_folder(folder, key)
            else:
                _run(builder.module, base.path)
            self.pending.discard(model_id)
        logger.info("model %s: built", model_id)

    def ensure_all(self) -> None:
        for model_id in sorted(self.pending):
            try:
                self.ensure(model_id)
            except Exception as error:
                logger.error("building %s failed: %s", model_id, error)


def _run(module: str, folder: str) -> None:
    with tempfile.TemporaryFile("w+") as errors:
        with subprocess.Popen(
            [sys.executable, "-m", module, folder], stdout=subprocess.PIPE, stderr=errors, text=True
        ) as child:
            assert child.stdout is not None
            for line in child.stdout:  # the builder's stages
                logger.info("%s", line.rstrip())
        if child.returncode != 0:
            errors.seek(0)
            text = errors.read()
            trace_logger.error("building with %s:\n%s", module, text)
            lines = text.strip().splitlines() or [f"exit status {child.returncode}"]
            raise RuntimeError(lines[-1])
