"""ftaas's API as a Ray Serve application: the form it takes on a KubeRay RayService
(deploy/kuberay/), where the head pod runs Ray and nothing else.

Serve's proxy takes the HTTP traffic and hands it to this deployment, which runs the very
app `python -m service serve` runs: the files, jobs and chat API, the scheduler (under
its lease in the job store), and the gateway that deploys each base model's engine as a
Serve application of its own beside this one. The app is built in the replica (Serve
calls `build_api` there), so its settings come from the replica's environment: the
head pod's variables (database, store, Ray token from Secrets) and the serve config's
`runtime_env`.

    serveConfigV2:
      applications:
        - name: ftaas-api
          import_path: service.serve_app:app
          route_prefix: /
"""

from __future__ import annotations

from fastapi import FastAPI
from ray import serve

from service.app import create_app
from service.config import Settings


def cluster_settings() -> Settings:
    """The service's settings inside the cluster: it joins the cluster this replica runs
    in (RAY_ADDRESS, when set, still wins), with the cluster's token from the environment."""
    import ray

    settings = Settings()
    if settings.ray_address is None:
        settings = settings.model_copy(
            update={"ray_address": ray.get_runtime_context().gcs_address}
        )
    return settings


def build_api() -> FastAPI:
    settings = cluster_settings()
    if not settings.keys_configured:  # Serve's proxy listens beyond this machine
        raise RuntimeError(
            "FTAAS_API_KEYS (or FTAAS_ADMIN_KEYS) is not set: ftaas will not serve a cluster "
            "without API keys (comma-separated key:organization pairs, e.g. from a Secret)"
        )
    return create_app(settings)


# Chats stream for as long as they generate and uploads take as long as the client sends:
# Serve's default of 5 requests in flight per replica would queue the sixth user.
MAX_ONGOING_REQUESTS = 1000


@serve.deployment(name="ftaas-api", num_replicas=1, max_ongoing_requests=MAX_ONGOING_REQUESTS)
@serve.ingress(build_api)
class FtaasAPI:
    pass


app = FtaasAPI.bind()  # type: ignore[attr-defined]  # the decorator makes a Deployment
