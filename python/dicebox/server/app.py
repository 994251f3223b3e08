"""The FastAPI application: services, middleware, error mapping and routers assembled here.

``create_app(settings)`` builds everything from one Settings object; ``dicebox serve`` runs
it under uvicorn. The evolution coordinator runs on a thread for the app's lifetime.
"""

from __future__ import annotations

import asyncio
import gc
from contextlib import asynccontextmanager

from fastapi import FastAPI

from dicebox import __version__
from dicebox.server import errors
from dicebox.server.limits import BodyLimitMiddleware
from dicebox.server.metrics import Metrics
from dicebox.server.routes import compat, dashboard, datasets, health, jobs, models, worker
from dicebox.server.services import Services
from dicebox.settings import Settings


def create_app(settings: Settings | None = None, services: Services | None = None) -> FastAPI:
    settings = settings if settings is not None else Settings()
    services = services if services is not None else Services.from_settings(settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        services.notifier.bind(asyncio.get_running_loop())
        services.start()
        # Move everything allocated at start-up out of the collector's reach: full collections
        # over those objects otherwise pause request handling for tens of milliseconds.
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            services.stop()

    app = FastAPI(title="dicebox", version=__version__, lifespan=lifespan,
                  description="Train, evolve and serve image classifiers.")
    app.state.services = services
    app.state.metrics = Metrics(services.queue)
    if services.ingest is not None:
        services.ingest.metrics = app.state.metrics  # images from the broker count as ingested
    errors.install(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes,
                       overrides={"/v1/worker/": settings.max_artifact_bytes})
    for module in (health, datasets, jobs, models, worker, compat, dashboard):
        app.include_router(module.router)
    return app
