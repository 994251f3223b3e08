"""Prometheus metrics of one server: jobs by status and queue depth (read from the database
at scrape time), training throughput reported by processors, classification latency, and
images ingested. Each app has its own registry, so several apps in one process (tests)
never collide."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

from dicebox.jobqueue import JobQueue


class _QueueCollector:
    def __init__(self, queue: JobQueue) -> None:
        self.queue = queue

    def collect(self):
        jobs = GaugeMetricFamily("dicebox_jobs", "Jobs by status.", labels=["status"])
        for status, count in self.queue.counts().items():
            jobs.add_metric([status], count)
        yield jobs
        depth = GaugeMetricFamily("dicebox_queue_depth", "Queued jobs by priority.", labels=["priority"])
        total = 0
        for priority, count in self.queue.depth().items():
            depth.add_metric([str(priority)], count)
            total += count
        yield depth
        yield GaugeMetricFamily("dicebox_queue_depth_total", "Queued jobs.", value=total)


class Metrics:
    def __init__(self, queue: JobQueue) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_QueueCollector(queue))
        self.training_samples_per_second = Gauge(
            "dicebox_training_samples_per_second",
            "Training throughput of the last epoch a processor reported.",
            ["worker"], registry=self.registry)
        self.epochs = Counter("dicebox_training_epochs", "Epochs reported by processors.",
                              registry=self.registry)
        self.classify_latency = Histogram(
            "dicebox_classify_latency_seconds", "Time to answer a classification request.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=self.registry)
        self.classified_images = Counter("dicebox_classified_images", "Images classified.",
                                         registry=self.registry)
        self.ingested_images = Counter("dicebox_ingested_images", "Images added to datasets.",
                                       registry=self.registry)
        self.jobs_submitted = Counter("dicebox_jobs_submitted", "Jobs submitted.", ["kind"],
                                      registry=self.registry)


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


MetricsDep = Annotated[Metrics, Depends(get_metrics)]
