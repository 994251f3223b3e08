"""The ``dicebox`` command (also ``python -m dicebox``).

``serve`` runs the server (with ``--workers N`` local processors), ``worker`` a processor,
``demo`` the embedded demo. Flags win over the environment; everything else comes from the
one Settings object. Exit codes: 0 ok, 1 the work failed, 2 bad usage or input.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from pydantic import ValidationError

from dicebox.settings import Settings


def _settings(**flags: Any) -> Settings:
    """Settings from the environment with the given (non-None) flags on top."""
    return Settings(**{k: v for k, v in flags.items() if v is not None})


def _settings_error(exc: ValidationError) -> int:
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ())) or "settings"
        print(f"dicebox: {where}: {err.get('msg')}", file=sys.stderr)
    return 2


def cmd_serve(args: argparse.Namespace) -> int:
    from dicebox.serving import serve

    try:
        settings = _settings(host=args.host, port=args.port, home=args.home, broker_url=args.broker)
    except ValidationError as exc:
        return _settings_error(exc)
    if not settings.embedded:
        print("dicebox: --broker / DICEBOX_BROKER_URL: RabbitMQ mode is not available in this version; "
              "unset it to use the embedded queue", file=sys.stderr)
        return 2
    if args.workers < 0:
        print(f"dicebox: --workers must be >= 0, got {args.workers}", file=sys.stderr)
        return 2
    serve(settings, workers=args.workers, log_level=args.log_level)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from dicebox import processor

    argv = []
    for flag, value in (("--server", args.server), ("--broker", args.broker),
                        ("--concurrency", args.concurrency), ("--name", args.name)):
        if value is not None:
            argv += [flag, str(value)]
    return processor.main(argv)


def cmd_demo(_args: argparse.Namespace) -> int:
    from dicebox import demo

    return demo.main()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dicebox", description="Train, evolve and serve image classifiers.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the server (REST API, queue, evolution coordinator)",
                           description="Run the dicebox server. Without an API key it listens on "
                                       "loopback only.")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 8000)")
    serve.add_argument("--home", help="data directory (default ~/.dicebox or DICEBOX_HOME)")
    serve.add_argument("--workers", type=int, default=0, metavar="N",
                       help="start N local processors beside the server (default 0)")
    serve.add_argument("--broker", help="RabbitMQ URL (amqp://...); default: the embedded queue")
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    serve.set_defaults(func=cmd_serve)

    worker = sub.add_parser("worker", help="run a training processor (same as python -m dicebox.processor)",
                            description="Take train jobs from a dicebox server and run them.")
    worker.add_argument("--server", help="server URL (default DICEBOX_SERVER_URL or http://127.0.0.1:8000)")
    worker.add_argument("--broker", help="RabbitMQ URL (amqp://...)")
    worker.add_argument("--concurrency", type=int, help="jobs run at once (default 1)")
    worker.add_argument("--name", help="name shown in job records (default host:pid)")
    worker.set_defaults(func=cmd_worker)

    demo = sub.add_parser("demo", help="embedded end-to-end demo; exits when done")
    demo.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
