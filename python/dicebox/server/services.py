"""Everything the routers work with, built once from the settings: the database, the job
queue, the sensory store, the model registry, the classifier, the evolution coordinator
and the wake-up notifier."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine

from dicebox.classifier import Classifier
from dicebox.coordinator import Coordinator
from dicebox.db import make_engine, migrate
from dicebox.jobqueue import JobQueue
from dicebox.registry import ModelRegistry
from dicebox.sensory import SensoryStore
from dicebox.server.notify import Notifier
from dicebox.settings import Settings


@dataclass
class Services:
    settings: Settings
    engine: Engine
    queue: JobQueue
    sensory: SensoryStore
    registry: ModelRegistry
    classifier: Classifier
    coordinator: Coordinator
    notifier: Notifier

    @classmethod
    def from_settings(cls, settings: Settings) -> Services:
        home = settings.home
        home.mkdir(parents=True, exist_ok=True)
        engine = make_engine(settings.database_url)
        migrate(engine)
        queue = JobQueue(engine)
        notifier = Notifier()
        sensory = SensoryStore(engine, home / "datasets", settings)
        registry = ModelRegistry(engine, home / "models")
        classifier = Classifier(registry, capacity=settings.model_cache_size, settings=settings)
        coordinator = Coordinator(queue, sensory, registry, settings, notifier)
        return cls(settings=settings, engine=engine, queue=queue, sensory=sensory,
                   registry=registry, classifier=classifier, coordinator=coordinator,
                   notifier=notifier)

    def start(self) -> None:
        self.coordinator.start()

    def stop(self) -> None:
        self.coordinator.stop()
        self.engine.dispose()
