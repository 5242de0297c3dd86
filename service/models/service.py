"""Models: the configured base models and each organization's fine-tuned ones."""

from __future__ import annotations

from dataclasses import dataclass

from openai.types import Model, ModelDeleted
from sqlalchemy import delete, select

from service.auth import Tenant
from service.config import BaseModelConfig
from service.db import CheckpointRow, Database, JobRow, ModelRow, changed_rows
from service.errors import InvalidRequest, NotFound
from service.fine_tuning.naming import is_checkpoint, is_fine_tuned
from training.spec import checkpoint_adapter_key

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


class ModelService:
    def __init__(
        self,
        db: Database,
        base_models: dict[str, BaseModelConfig],
        started_at: int,
    ):
        self.db = db
        self.base_models = base_models
        self.started_at = started_at

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
        return self._tuned(self._row(tenant, model))

    def delete(self, tenant: Tenant, model: str) -> tuple[ModelDeleted, ModelRow]:
        if model in self.base_models:
            raise InvalidRequest(
                f"Base model `{model}` cannot be deleted; only fine-tuned models can.",
                param="model",
            )
        row = self._row(tenant, model)
        with self.db.session() as session:
            if not changed_rows(session.execute(delete(ModelRow).where(ModelRow.id == row.id))):
                raise _not_found(model)
        return ModelDeleted(id=row.id, object="model", deleted=True), row

    def inference_target(self, tenant: Tenant, model: str) -> InferenceTarget:
        if model in self.base_models:
            return InferenceTarget(base_model=model)
        if not is_fine_tuned(model):
            raise _not_found(model)
        if is_checkpoint(model):
            with self.db.session() as session:
                checkpoint = session.scalar(
                    select(CheckpointRow).where(CheckpointRow.model_name == model)
                )
                job = session.get(JobRow, checkpoint.job_id) if checkpoint else None
            if checkpoint is None or job is None or checkpoint.organization != tenant.organization:
                raise _not_found(model)
            return InferenceTarget(job.model, model, checkpoint_adapter_key(checkpoint.path))
        row = self._row(tenant, model)
        return InferenceTarget(row.base_model, row.id, row.adapter_dir)
