"""Everything the routers work with, built once from the settings: the database, the job
queue, the sensory store, the model registry, the classifier, the evolution coordinator
and the wake-up notifier; in RabbitMQ mode (``settings.broker_url``) also the job publisher
and the outbox that publishes every queued train job through it (``dicebox.outbox``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine

from dicebox.classifier import Classifier
from dicebox.coordinator import Coordinator
from dicebox.db import make_engine, migrate
from dicebox.jobqueue import JobQueue
from dicebox.outbox import BROKERED_KINDS, Outbox, Publisher, make_publisher
from dicebox.registry import ModelRegistry
from dicebox.sensory import SensoryStore
from dicebox.server.notify import Notifier
from dicebox.settings import Settings

log = logging.getLogger("dicebox.server")

# At start-up in RabbitMQ mode, how long to wait for the first broker connection before
# serving anyway (jobs submitted meanwhile are kept and published when it is up).
BROKER_CONNECT_WAIT = 5.0


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
    # RabbitMQ mode only (None in the embedded mode).
    publisher: Publisher | None = None
    outbox: Outbox | None = None
    ingest: Any = None  # dicebox.rabbitmq.streams.SensoryIngest: images from dicebox.sensory

    @classmethod
    def from_settings(cls, settings: Settings) -> Services:
        home = settings.home
        home.mkdir(parents=True, exist_ok=True)
        engine = make_engine(settings.database_url)
        migrate(engine)
        # In RabbitMQ mode train jobs travel as messages: only claim_job may end them.
        queue = JobQueue(engine, brokered_kinds=BROKERED_KINDS if settings.broker_url else ())
        notifier = Notifier()
        sensory = SensoryStore(engine, home / "datasets", settings)
        registry = ModelRegistry(engine, home / "models")
        classifier = Classifier(registry, capacity=settings.model_cache_size, settings=settings)
        coordinator = Coordinator(queue, sensory, registry, settings, notifier)
        publisher = outbox = None
        if settings.broker_url:
            # The publisher wakes the outbox when it (re)connects: jobs kept while the broker
            # was away go out at once.
            publisher = make_publisher(settings.broker_url, on_connect=lambda: outbox.poke())
            outbox = Outbox(queue, publisher)
            # Every submit (the route's, the coordinator's children) wakes the outbox.
            notifier.add_listener(outbox.poke)
        ingest = None
        if settings.broker_url:
            from dicebox.rabbitmq.streams import SensoryIngest  # pika only in RabbitMQ mode

            ingest = SensoryIngest(settings.broker_url, sensory)
        return cls(settings=settings, engine=engine, queue=queue, sensory=sensory,
                   registry=registry, classifier=classifier, coordinator=coordinator,
                   notifier=notifier, publisher=publisher, outbox=outbox, ingest=ingest)

    @property
    def broker_mode(self) -> bool:
        """True when train jobs go through RabbitMQ (processors do not claim them)."""
        return self.outbox is not None

    def start(self) -> None:
        if self.publisher is not None and self.outbox is not None:
            self.publisher.start()
            # Give the first connection a moment, so the first submits are confirmed rather
            # than answered "published: false"; a broker that is down does not stop the server.
            if not self.publisher.wait_connected(BROKER_CONNECT_WAIT):
                log.warning("the RabbitMQ broker is not reachable yet; jobs are kept in the "
                            "database and published once it is")
            self.outbox.start()
        if self.ingest is not None:
            self.ingest.start()
        self.coordinator.start()

    def stop(self) -> None:
        self.coordinator.stop()
        if self.ingest is not None:
            self.ingest.stop()
        if self.outbox is not None:
            self.outbox.stop()
        if self.publisher is not None:
            self.publisher.stop()
        self.engine.dispose()
