"""/v1/models: thin HTTP mapping onto ModelService (ids contain `:` and `/`)."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from openai.types import Model, ModelDeleted
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from service.deps import GatewayDep, ModelsDep, TenantDep

router = APIRouter(prefix="/v1/models", tags=["models"])


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


@router.get("", response_model=ModelList)
def list_models(tenant: TenantDep, models: ModelsDep) -> ModelList:
    return ModelList(data=models.list(tenant))


@router.get("/{model:path}", response_model=Model)
def retrieve_model(tenant: TenantDep, models: ModelsDep, model: str) -> Model:
    return models.retrieve(tenant, model)


@router.delete("/{model:path}", response_model=ModelDeleted)
async def delete_model(
    tenant: TenantDep, models: ModelsDep, gateway: GatewayDep, model: str
) -> ModelDeleted:
    deleted, row = await run_in_threadpool(models.delete, tenant, model)
    await gateway.unload_adapter(row.base_model, row.id)
    return deleted
