"""Models: the configured base models and each organization's fine-tuned ones."""

from __future__ import annotations

import builtins
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from openai.types import Model, ModelDeleted
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from service.auth import Tenant
from service.config import BaseModelConfig
from service.db import CheckpointRow, Database, FileRow, JobRow, ModelRow, changed_rows, now
from service.errors import Conflict, InvalidRequest, NotFound, ServiceUnavailable
from service.fine_tuning.lifecycle import TERMINAL, JobStatus
from service.fine_tuning.naming import (
    SUFFIX_PATTERN,
    fine_tuned_model_name,
    is_checkpoint,
    is_fine_tuned,
)
from service.ids import model_short_id
from service.models.adapters import (
    adapter_archive,
    archive_folder_name,
    check_adapter,
    check_weights,
    engine_base,
    linear_layers,
    unpack_adapter,
    weights_bound,
)
from service.organization.limits import Limits
from training.spec import checkpoint_adapter_key, job_folder
from training.storage import ArtifactStore, join

BASE_MODEL_OWNER = "ftaas"


@dataclass(frozen=True)
class InferenceTarget:
    """What serving needs to answer a request: the base model and, maybe, an adapter."""

    base_model: str
    adapter_name: str | None = None
    adapter_key: str | None = None  # the adapter's folder in the artifact store


def _not_found(model: str) -> NotFound:
    return NotFound(
        f"The model `{model}` does not exist or you do not have access to it.",
        param="model",
        code="model_not_found",
    )


def tuned_adapter(session: Session, tenant: Tenant, model: str) -> tuple[str, str] | None:
    """(base model, adapter key in the artifact store) of a tuned model or checkpoint name
    of this tenant; None for any other name (another tenant's included)."""
    if is_checkpoint(model):
        checkpoint = session.scalar(select(CheckpointRow).where(CheckpointRow.model_name == model))
        job = session.get(JobRow, checkpoint.job_id) if checkpoint else None
        if checkpoint is None or job is None or checkpoint.organization != tenant.organization:
            return None
        return job.model, checkpoint_adapter_key(checkpoint.path)
    if not is_fine_tuned(model):
        return None
    row = session.get(ModelRow, model)
    if row is None or row.organization != tenant.organization:
        return None
    return row.base_model, row.adapter_dir


@dataclass(frozen=True)
class Deletion:
    """A deleted model's answer, and what is left to do: serving drops `names` on
    `base_model`, then `folders` are deleted from the store (serving first, files last)."""

    answer: ModelDeleted
    base_model: str
    names: list[str]
    folders: list[str]
    job_id: str | None = None  # the job whose outputs shrink


class ImportAdapterRequest(BaseModel):
    """POST /v1/models: a PEFT LoRA adapter (an uploaded archive) as a model of a base."""

    model_config = ConfigDict(extra="forbid")
    base_model: str = Field(min_length=1, max_length=256)
    adapter_file: str = Field(min_length=1, max_length=64, description="an uploaded file's id")
    suffix: Annotated[str, Field(pattern=SUFFIX_PATTERN)] | None = None


class ModelService:
    def __init__(
        self,
        db: Database,
        base_models: dict[str, BaseModelConfig],
        started_at: int,
        store: ArtifactStore | None = None,
        max_adapter_bytes: int = 8 * 1024**3,
        model_ready: Callable[[str], bool] = lambda model_id: True,
        limits: Limits | None = None,
    ):
        self.db = db
        self.limits = limits  # quotas per organization; None: unlimited
        self.model_ready = model_ready  # an embedded base model is built in the background
        self.base_models = base_models
        self.started_at = started_at
        self.store = store
        self.max_adapter_bytes = max_adapter_bytes

    def _base(self, model_id: str) -> Model:
        return Model(
            id=model_id, object="model", created=self.started_at, owned_by=BASE_MODEL_OWNER
        )

    @staticmethod
    def _tuned(row: ModelRow) -> Model:
        return Model(id=row.id, object="model", created=row.created_at, owned_by=row.organization)

    def _row(self, tenant: Tenant, model: str) -> ModelRow:
        with self.db.session() as session:
            row = session.get(ModelRow, model)
        if row is None or row.organization != tenant.organization:
            raise _not_found(model)
        return row

    def list(self, tenant: Tenant) -> list[Model]:
        with self.db.session() as session:
            rows = session.scalars(
                select(ModelRow)
                .where(ModelRow.organization == tenant.organization)
                .order_by(ModelRow.created_at)
            ).all()
        return [self._base(m) for m in self.base_models] + [self._tuned(r) for r in rows]

    def retrieve(self, tenant: Tenant, model: str) -> Model:
        if model in self.base_models:
            return self._base(model)
        if is_checkpoint(model):  # served by that name, so retrievable by it too
            checkpoint = self._checkpoint(tenant, model)
            return Model(
                id=model,
                object="model",
                created=checkpoint.created_at,
                owned_by=checkpoint.organization,
            )
        return self._tuned(self._row(tenant, model))

    def _checkpoint(self, tenant: Tenant, model: str) -> CheckpointRow:
        with self.db.session() as session:
            row = session.scalar(select(CheckpointRow).where(CheckpointRow.model_name == model))
        if row is None or row.organization != tenant.organization:
            raise _not_found(model)
        return row

    def delete(self, tenant: Tenant, model: str) -> Deletion:
        """Delete a tuned model (and its job's checkpoints) or one checkpoint: from now on
        it is no longer listed or routed to; a job keeps its record. Its files stay until
        `delete_files`, which the caller runs once serving has dropped every name."""
        if model in self.base_models:
            raise InvalidRequest(
                f"Base model `{model}` cannot be deleted; only fine-tuned models can.",
                param="model",
            )
        if is_checkpoint(model):
            return self._delete_checkpoint(tenant, model)
        row = self._row(tenant, model)
        with self.db.session() as session:
            if not changed_rows(session.execute(delete(ModelRow).where(ModelRow.id == row.id))):
                raise _not_found(model)
            checkpoints: builtins.list[str] = []
            if row.job_id is not None:
                checkpoints = list(
                    session.scalars(
                        select(CheckpointRow.model_name).where(CheckpointRow.job_id == row.job_id)
                    )
                )
                session.execute(delete(CheckpointRow).where(CheckpointRow.job_id == row.job_id))
        # An import's folder, or every output of the job that made it (all attempts).
        folder = row.adapter_dir if row.job_id is None else job_folder(row.job_id)
        return Deletion(
            ModelDeleted(id=row.id, object="model", deleted=True),
            row.base_model,
            [row.id, *checkpoints],
            [folder],
            row.job_id,
        )

    def _delete_checkpoint(self, tenant: Tenant, model: str) -> Deletion:
        """One checkpoint of a finished job (a running or paused job may resume from it)."""
        checkpoint = self._checkpoint(tenant, model)
        with self.db.session() as session:
            job = session.get(JobRow, checkpoint.job_id)
            if job is None or JobStatus(job.status) not in TERMINAL:
                raise Conflict(
                    f"The checkpoint `{model}` belongs to a job that has not finished, which "
                    "may still continue from it; cancel the job first.",
                    param="model",
                    code="job_not_finished",
                )
            deleted = delete(CheckpointRow).where(CheckpointRow.id == checkpoint.id)
            if not changed_rows(session.execute(deleted)):
                raise _not_found(model)
            base_model = job.model
            # Measured again from now: a crash before `delete_files` leaves the folder to
            # housekeeping, which finds it unlisted when it measures (review L4).
            job.output_bytes = None
        return Deletion(
            ModelDeleted(id=model, object="model", deleted=True),
            base_model,
            [model],
            [checkpoint.path],
            checkpoint.job_id,
        )

    def delete_files(self, deletion: Deletion) -> None:
        if self.store is not None:
            for folder in deletion.folders:
                self.store.delete(folder)
        if deletion.job_id is not None:  # its outputs are measured again, or are gone
            with self.db.session() as session:
                job = session.get(JobRow, deletion.job_id)
                if job is not None and deletion.folders == [job_folder(job.id)]:
                    job.outputs_expired_at, job.output_bytes = now(), 0
                elif job is not None:
                    job.output_bytes = None

    def inference_target(self, tenant: Tenant, model: str) -> InferenceTarget:
        if model in self.base_models:
            return InferenceTarget(base_model=model)
        with self.db.session() as session:
            found = tuned_adapter(session, tenant, model)
        if found is None:
            raise _not_found(model)
        return InferenceTarget(found[0], model, found[1])

    # --- adapters out and in
    def adapter_archive(self, tenant: Tenant, model: str) -> tuple[Iterator[bytes], str]:
        """A tuned model's (or checkpoint's) adapter as a .tar.gz stream, and its file name."""
        target = self.inference_target(tenant, model)
        if target.adapter_key is None:
            raise InvalidRequest(
                f"`{model}` is a base model: only fine-tuned models have an adapter",
                param="model",
            )
        assert self.store is not None
        if not self.store.folder_complete(target.adapter_key):
            raise _not_found(model)
        folder = archive_folder_name(model)
        return adapter_archive(self.store, target.adapter_key, folder), f"{folder}.tar.gz"

    def import_adapter(self, tenant: Tenant, request: ImportAdapterRequest) -> Model:
        """Check an uploaded adapter archive against its base model's engine, store it and
        register it as a model of that base (served, listed and deleted like tuned ones)."""
        base = self.base_models.get(request.base_model)
        if base is None:
            raise InvalidRequest(
                f"Base model {request.base_model} is not configured. "
                f"Available: {', '.join(sorted(self.base_models))}",
                param="base_model",
                code="model_not_available",
            )
        if not self.model_ready(base.id):
            raise ServiceUnavailable(
                f"The model `{base.id}` is still being built; try again shortly.",
                param="base_model",
                code="model_loading",
            )
        with self.db.session() as session:
            file = session.get(FileRow, request.adapter_file)
        if file is None or file.organization != tenant.organization:
            raise InvalidRequest(
                f"invalid adapter_file: {request.adapter_file}",
                param="adapter_file",
                code="invalid_file",
            )
        assert self.store is not None
        short_id = model_short_id()
        key = join("imported", short_id, "adapter")
        layers = linear_layers(base.path)
        engine = engine_base(base)
        bound = min(self.max_adapter_bytes, weights_bound(layers, base.max_lora_rank))
        with tempfile.TemporaryDirectory(prefix="ftaas-import-") as scratch:
            archive = self.store.local_file(file.blob_key, Path(scratch))
            folder = unpack_adapter(
                archive,
                Path(scratch) / "adapter",
                lambda tensors: check_weights(tensors, engine),
                bound,
            )
            check_adapter(folder, base)
            size = sum(path.stat().st_size for path in folder.iterdir() if path.is_file())
            self._check_storage(tenant, size)  # before the copy: refused without one
            self.store.put_folder(folder, key)
        name = fine_tuned_model_name(base.id, tenant.organization, request.suffix, short_id)
        row = ModelRow(
            id=name,
            organization=tenant.organization,
            base_model=base.id,
            job_id=None,
            adapter_dir=key,
            created_at=now(),
            bytes=size,
        )
        try:
            with self.db.session() as session:
                # Again with the insert, in its transaction: two imports racing for the
                # last room take turns (review L9).
                self._check_storage(tenant, size, session)
                session.add(row)
        except Exception:
            self.store.delete(key)  # not registered: not kept
            raise
        return self._tuned(row)

    def _check_storage(self, tenant: Tenant, size: int, session: Session | None = None) -> None:
        if self.limits is None:
            return
        if session is not None:
            self.limits.check_storage(session, tenant.organization, size, "adapter_file")
            return
        with self.db.session() as own:
            self.limits.check_storage(own, tenant.organization, size, "adapter_file")
