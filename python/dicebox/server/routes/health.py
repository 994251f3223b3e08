"""Liveness, readiness and Prometheus metrics (open: no API key)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from dicebox.server.deps import ServicesDep
from dicebox.server.errors import error_response
from dicebox.server.metrics import MetricsDep
from dicebox.server.openapi import error_responses

router = APIRouter(tags=["health"], responses=error_responses())


@router.get("/healthz")
async def healthz() -> dict:
    """The process is up and serving requests."""
    return {"status": "ok"}


@router.get("/readyz", responses=error_responses(503))
async def readyz(services: ServicesDep):
    """Ready for work: the database answers and the coordinator runs."""

    def check() -> dict[str, bool]:
        with services.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        return {"database": True, "coordinator": services.coordinator.alive}

    try:
        checks = await run_in_threadpool(check)
    except Exception as exc:  # noqa: BLE001 - any database error means not ready
        return error_response(503, "not ready", {"database": False, "reason": type(exc).__name__})
    if not all(checks.values()):
        return error_response(503, "not ready", checks)
    return {"status": "ready", **checks}


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {}},
                             "description": "Prometheus text exposition format"}})
async def metrics(m: MetricsDep) -> Response:
    body = await run_in_threadpool(generate_latest, m.registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
