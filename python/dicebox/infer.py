"""``dicebox infer``: a classifier on the broker (also ``python -m dicebox.infer``).

``dicebox infer --model ID --input QUEUE --output EXCHANGE [--broker URL] [--server URL]
[--prefetch N] [--dataset NAME] [--cache DIR]`` fetches model ``ID`` from the server (``GET
/v1/models/{id}/weights`` and ``/model.json``, once, into the cache directory shared with the
processors: ``DICEBOX_HOME/cache/models/<id>/``), then consumes encoded images (PNG/JPEG
message bodies) from ``QUEUE`` and publishes one JSON prediction per image to ``EXCHANGE``
until SIGTERM/SIGINT (see :mod:`dicebox.rabbitmq.streams` for the message formats). ``--model
best --dataset NAME`` takes the dataset's best model at start. Run as many replicas as needed
on one queue: the broker spreads the images over them.

The broker URL comes from ``--broker`` or ``DICEBOX_BROKER_URL``, the server from ``--server``
or ``DICEBOX_SERVER_URL`` (with ``DICEBOX_API_KEY``). A server that cannot be reached at
start is retried with back-off; so is the broker, at start and whenever it goes away.
Exit codes: 0 stopped by a signal, 2 bad usage or an unknown model.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from dicebox.client import Client, ServerUnavailable
from dicebox.errors import ServiceError
from dicebox.settings import Settings

__all__ = ["DESCRIPTION", "add_arguments", "fetch_model", "main", "run"]

log = logging.getLogger("dicebox.infer")

BACKOFF_FIRST, BACKOFF_MAX = 0.5, 30.0
BEST = "best"


DESCRIPTION = ("Classify the images of a RabbitMQ queue and publish the predictions to an "
               "exchange (several replicas may share one queue).")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``dicebox infer`` (for the ``dicebox`` command's sub-parser)."""
    p.add_argument("--model", required=True, metavar="ID",
                   help="model id (32 hex characters), or 'best' with --dataset")
    p.add_argument("--input", required=True, metavar="QUEUE",
                   help="queue of images (message body: PNG or JPEG); declared durable if missing")
    p.add_argument("--output", required=True, metavar="EXCHANGE",
                   help="exchange the predictions go to; declared fanout if missing")
    p.add_argument("--broker", metavar="URL", help="RabbitMQ URL (default DICEBOX_BROKER_URL)")
    p.add_argument("--server", metavar="URL",
                   help="server to fetch the model from (default DICEBOX_SERVER_URL)")
    p.add_argument("--prefetch", type=int, default=32, metavar="N",
                   help="images held unacknowledged at once, the largest batch (default 32)")
    p.add_argument("--dataset", help="dataset whose best model --model best means")
    p.add_argument("--cache", help="model cache directory (default DICEBOX_HOME/cache)")
    p.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dicebox infer", description=DESCRIPTION)
    add_arguments(p)
    return p


def fetch_model(client: Client, model_ref: str, cache_dir: str | Path, dataset: str | None = None,
                stop: threading.Event | None = None) -> tuple[str, Path]:
    """Resolve ``model_ref`` (an id, or ``"best"`` of ``dataset``) on the server and download
    the model into ``cache_dir`` (once: a cached copy is reused). Retries with back-off while
    the server cannot be reached (until ``stop`` is set: then ServerUnavailable). Returns
    ``(model id, directory)``; NotFound/InvalidInput/Unauthorized from the server propagate."""
    from dicebox.processor import DiskCache

    cache = DiskCache(cache_dir)
    stop = stop or threading.Event()
    delay = BACKOFF_FIRST
    while True:
        try:
            model_id = (client.models.get(BEST, dataset=dataset)["id"] if model_ref == BEST
                        else model_ref)
            return model_id, cache.model(client, model_id)
        except ServerUnavailable as exc:
            log.warning("server unavailable (%s); retrying in %.1f s", exc, delay)
            if stop.wait(delay):
                raise
            delay = min(delay * 2, BACKOFF_MAX)


def main(argv: list[str] | None = None) -> int:
    """Run ``dicebox infer`` until SIGTERM/SIGINT; see the module docstring."""
    return run(_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """``dicebox infer`` with parsed flags (:func:`add_arguments`): 0 after SIGTERM/SIGINT,
    2 for bad usage or an unknown model. Installs SIGTERM/SIGINT handlers: call it on the
    main thread."""
    from dicebox.rabbitmq.streams import MAX_PREFETCH, InferWorker, StreamError
    from dicebox.registry import check_model_id

    level = getattr(logging, args.log_level.upper())
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(level)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("pika").setLevel(logging.WARNING)

    def usage(message: str) -> int:
        print(f"dicebox infer: {message}", file=sys.stderr)
        return 2

    flags = {"server_url": args.server, "broker_url": args.broker}
    try:
        settings = Settings(**{k: v for k, v in flags.items() if v is not None})
    except ValidationError as exc:
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ())) or "settings"
            print(f"dicebox infer: {where}: {err.get('msg')}", file=sys.stderr)
        return 2
    if not settings.broker_url:
        return usage("no broker: give --broker amqp://... or set DICEBOX_BROKER_URL")
    if not 1 <= args.prefetch <= MAX_PREFETCH:
        return usage(f"--prefetch must be in 1..{MAX_PREFETCH}, got {args.prefetch}")
    if args.model == BEST:
        if not args.dataset:
            return usage("--model best needs --dataset NAME")
    else:
        try:
            check_model_id(args.model)
        except ServiceError as exc:
            return usage(f"--model: {exc}")
    try:
        client = Client.from_settings(settings)
    except ValueError as exc:
        return usage(str(exc))

    stop = threading.Event()
    worker: InferWorker | None = None
    signals = 0

    def on_signal(signum: int, _frame: Any) -> None:
        nonlocal signals
        signals += 1
        if signals > 1:
            log.warning("second signal: exiting at once")
            raise SystemExit(1)
        log.info("%s: stopping (the batch in progress is finished first)",
                 signal.Signals(signum).name)
        stop.set()
        if worker is not None:
            worker.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    cache = Path(args.cache).expanduser() if args.cache else settings.home / "cache"
    try:
        with client:
            model_id, directory = fetch_model(client, args.model, cache, args.dataset, stop)
    except ServerUnavailable:
        return 0  # stopped by a signal while the server was away
    except ServiceError as exc:
        return usage(str(exc))
    try:
        worker = InferWorker(settings.broker_url, directory, args.input, args.output,
                             args.prefetch, model_id=model_id, settings=settings)
    except StreamError as exc:
        return usage(str(exc))
    if stop.is_set():
        return 0
    log.info("model %s: classifying %r -> %r", model_id, args.input, args.output)
    worker.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
