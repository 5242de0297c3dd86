"""/v1/fine_tuning/jobs: thin HTTP mapping onto FineTuningService."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request

from service.deps import GradersDep, JobsDep, ModelsDep, TenantDep
from service.fine_tuning.schemas import (
    CheckpointList,
    CreateFineTuningJobRequest,
    EventList,
    FineTuningJobObject,
    JobList,
)

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"])


@router.post("", response_model=FineTuningJobObject)
def create_job(
    tenant: TenantDep,
    jobs: JobsDep,
    graders: GradersDep,
    models: ModelsDep,
    request: CreateFineTuningJobRequest,
) -> FineTuningJobObject:
    return jobs.create(
        tenant, request, lambda raw: graders.check_training_grader(tenant, raw, models)
    )


@router.get("", response_model=JobList)
def list_jobs(
    tenant: TenantDep,
    jobs: JobsDep,
    raw: Request,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> JobList:
    # The SDK sends metadata as `metadata[key]=value` pairs (deepObject style).
    metadata = {
        key[len("metadata[") : -1]: value
        for key, value in raw.query_params.items()
        if key.startswith("metadata[") and key.endswith("]")
    }
    data, has_more = jobs.list(tenant, after, limit, metadata)
    return JobList(data=data, has_more=has_more)


@router.get("/{job_id}", response_model=FineTuningJobObject)
def retrieve_job(tenant: TenantDep, jobs: JobsDep, job_id: str) -> FineTuningJobObject:
    return jobs.retrieve(tenant, job_id)


@router.post("/{job_id}/cancel", response_model=FineTuningJobObject)
def cancel_job(tenant: TenantDep, jobs: JobsDep, job_id: str) -> FineTuningJobObject:
    return jobs.cancel(tenant, job_id)


@router.post("/{job_id}/pause", response_model=FineTuningJobObject)
def pause_job(tenant: TenantDep, jobs: JobsDep, job_id: str) -> FineTuningJobObject:
    return jobs.pause(tenant, job_id)


@router.post("/{job_id}/resume", response_model=FineTuningJobObject)
def resume_job(tenant: TenantDep, jobs: JobsDep, job_id: str) -> FineTuningJobObject:
    return jobs.resume(tenant, job_id)


@router.get("/{job_id}/events", response_model=EventList)
def list_events(
    tenant: TenantDep,
    jobs: JobsDep,
    job_id: str,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
) -> EventList:
    data, has_more = jobs.events(tenant, job_id, after, limit)
    return EventList(data=data, has_more=has_more)


@router.get(
    "/{job_id}/checkpoints", response_model=CheckpointList, response_model_exclude_none=True
)
def list_checkpoints(
    tenant: TenantDep,
    jobs: JobsDep,
    job_id: str,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 10,
) -> CheckpointList:
    data, has_more = jobs.checkpoints(tenant, job_id, after, limit)
    return CheckpointList(
        data=data,
        has_more=has_more,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
    )
