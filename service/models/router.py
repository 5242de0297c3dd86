"""/v1/models: thin HTTP mapping onto ModelService (ids contain `:` and `/`)."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from openai.types import Model, ModelDeleted
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from service.deps import GatewayDep, HeavyDep, ModelsDep, TenantDep
from service.models.service import ImportAdapterRequest

router = APIRouter(prefix="/v1/models", tags=["models"])


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


@router.get("", response_model=ModelList)
def list_models(tenant: TenantDep, models: ModelsDep) -> ModelList:
    return ModelList(data=models.list(tenant))


@router.post("", response_model=Model)
async def import_adapter(
    tenant: TenantDep, models: ModelsDep, heavy: HeavyDep, body: ImportAdapterRequest
) -> Model:
    """An ftaas extension: register an uploaded PEFT LoRA adapter archive (tar or zip of
    adapter_config.json and adapter_model.safetensors) as a model of a base model."""
    return await heavy.imports.run(tenant.organization, models.import_adapter, tenant, body)


# Before the catch-all route below, which would otherwise take `.../adapter` as a model id.
@router.get("/{model:path}/adapter", response_class=StreamingResponse)
def download_adapter(tenant: TenantDep, models: ModelsDep, model: str) -> StreamingResponse:
    """An ftaas extension: a tuned model's or checkpoint's adapter as a PEFT folder in a
    .tar.gz (peft's PeftModel.from_pretrained loads the folder it unpacks to)."""
    chunks, filename = models.adapter_archive(tenant, model)
    return StreamingResponse(
        chunks,
        media_type="application/gzip",
        headers={"content-disposition": f'attachment; filename="{filename}"'},
    )


@router.get("/{model:path}", response_model=Model)
def retrieve_model(tenant: TenantDep, models: ModelsDep, model: str) -> Model:
    return models.retrieve(tenant, model)


@router.delete("/{model:path}", response_model=ModelDeleted)
async def delete_model(
    tenant: TenantDep, models: ModelsDep, gateway: GatewayDep, model: str
) -> ModelDeleted:
    # Serving first, files last: no longer routed to, then dropped by every replica (its
    # requests aborted), and only then are its files deleted, which vLLM may read until then.
    deletion = await run_in_threadpool(models.delete, tenant, model)
    await gateway.retire_adapters(deletion.base_model, deletion.names)
    await run_in_threadpool(models.delete_files, deletion)
    return deletion.answer
