"""The ``dicebox`` command (also ``python -m dicebox``).

Commands (``dicebox COMMAND --help`` explains each):

    dicebox demo                                  embedded end-to-end demo
    dicebox serve [--host --port --home --workers N --broker URL]
    dicebox worker [--broker URL --server URL --concurrency N]
    dicebox dataset import DIR --name NAME [--size WxH] [--channels 1|3]
    dicebox dataset import-idx IMAGES LABELS --name NAME
    dicebox dataset make-dice --name NAME [--count N --size S]
    dicebox dataset list | show NAME | export NAME FILE
    dicebox train --dataset NAME --genome FILE [--epochs ...] [--submit]
    dicebox evolve --dataset NAME [--population --generations ...] [--submit]
    dicebox classify --model ID IMAGE...
    dicebox jobs list | show ID | watch ID | cancel ID
    dicebox models list | show ID | export ID DIR

The dataset, jobs, models and classify commands (and train/evolve with ``--submit``) talk to
the server at ``--server`` or DICEBOX_SERVER_URL (default http://127.0.0.1:8000) with the API
key in DICEBOX_API_KEY (or API_ACCESS_KEY). ``train`` and ``evolve`` without ``--submit`` run
in this process, on a server dataset's export or on a local packed file (``--dataset ./x.dbx``).

Output: on a terminal, rich progress bars (imports, uploads, epochs, individuals) and tables;
in a pipe, plain lines without escape codes. ``--json`` (every command but serve, worker and
demo, which run until stopped and log) prints one JSON document on stdout, or for ``jobs
watch`` one JSON line per event; the human story then goes to stderr, and only on a terminal.

Exit codes:
    0    done (a followed job succeeded)
    1    the job or the in-process work failed, or was canceled
    2    bad usage or input: flags, files, names, an unknown dataset/model/job, a request the
         server refused (4xx, its message on stderr), a missing or wrong API key
    3    the server could not be reached or failed (5xx): nothing is wrong with the request,
         try again later (a separate code so scripts can retry on it alone)
    130  interrupted (Ctrl-C); a job on the server goes on
"""

from __future__ import annotations

import argparse
import logging
import sys

from dicebox import infer as infer_command
from dicebox.commands import datasets, jobs, learn, models
from dicebox.commands.common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    CommandError,
    Output,
    UsageError,
    load_settings,
    use_formatter,
)


def cmd_serve(args: argparse.Namespace, _out: Output) -> int:
    from dicebox.serving import serve

    if args.workers < 0:
        raise UsageError(f"--workers must be >= 0, got {args.workers}")
    settings = load_settings(host=args.host, port=args.port, home=args.home, broker_url=args.broker)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve(settings, workers=args.workers, log_level=args.log_level)
    return 0


def cmd_worker(args: argparse.Namespace, _out: Output) -> int:
    from dicebox import processor

    argv = []
    for flag, value in (("--server", getattr(args, "server", None)), ("--broker", args.broker),
                        ("--concurrency", args.concurrency), ("--name", args.name),
                        ("--threads", args.threads), ("--cache", args.cache),
                        ("--log-level", args.log_level)):
        if value is not None:
            argv += [flag, str(value)]
    return processor.main(argv)


def cmd_infer(args: argparse.Namespace, _out: Output) -> int:
    return infer_command.run(args)


def cmd_demo(_args: argparse.Namespace, _out: Output) -> int:
    from dicebox import demo

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return demo.main()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dicebox", description="Train, evolve and serve image classifiers.",
        epilog="Exit codes: 0 ok, 1 the job or work failed (or was canceled), 2 bad usage or "
               "input (also an unknown name, a refused request, a wrong API key), 3 the server is "
               "unreachable or failing (try again), 130 interrupted.\n"
               "Server commands use --server or DICEBOX_SERVER_URL, and the API key in "
               "DICEBOX_API_KEY. See `dicebox COMMAND --help` (and `dicebox dataset --help`, ...).")
    p.add_argument("--json", action="store_true", default=False,
                   help="machine-readable JSON on stdout (also accepted after the command)")
    p.add_argument("--server", metavar="URL", default=None,
                   help="server URL (default DICEBOX_SERVER_URL or http://127.0.0.1:8000)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="embedded end-to-end demo; exits when done",
                          description="Make a dice dataset, train and evolve networks, show the "
                                      "results; needs no setup and exits by itself.")
    demo.set_defaults(func=cmd_demo)

    serve = sub.add_parser("serve", help="run the server (REST API, queue, evolution coordinator)",
                           description="Run the dicebox server until Ctrl-C or SIGTERM. Without an "
                                       "API key (DICEBOX_API_KEY) it listens on loopback only.")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 8000)")
    serve.add_argument("--home", help="data directory (default ~/.dicebox or DICEBOX_HOME)")
    serve.add_argument("--workers", type=int, default=0, metavar="N",
                       help="start N local processors beside the server (default 0)")
    serve.add_argument("--broker", metavar="URL",
                       help="RabbitMQ URL (amqp://...; default DICEBOX_BROKER_URL, empty = the embedded queue)")
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    serve.set_defaults(func=cmd_serve)

    worker = sub.add_parser("worker", help="run a training processor (same as python -m dicebox.processor)",
                            description="Take train jobs from a dicebox server and run them until "
                                        "SIGTERM (the running job is handed back).")
    worker.add_argument("--server", metavar="URL", default=argparse.SUPPRESS,
                        help="server URL (default DICEBOX_SERVER_URL or http://127.0.0.1:8000)")
    worker.add_argument("--broker", metavar="URL", help="RabbitMQ URL (amqp://...; default DICEBOX_BROKER_URL)")
    worker.add_argument("--concurrency", type=int, help="jobs run at once (default 1)")
    worker.add_argument("--name", help="name shown in job records (default host:pid)")
    worker.add_argument("--threads", type=int, help="training threads per job (default: the CPUs shared)")
    worker.add_argument("--cache", metavar="DIR", help="cache directory (default DICEBOX_HOME/cache)")
    worker.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"])
    worker.set_defaults(func=cmd_worker)

    infer = sub.add_parser("infer", help="classify images from a RabbitMQ queue, publish the predictions",
                           description=infer_command.DESCRIPTION)
    infer_command.add_arguments(infer)
    infer.set_defaults(func=cmd_infer)

    datasets.add_parser(sub)
    learn.add_parsers(sub)
    jobs.add_parser(sub)
    models.add_parsers(sub)
    use_formatter(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    out = Output(json_mode=bool(getattr(args, "json", False)))
    # One log line per HTTP request would drown the command's own output.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    from dicebox.client import ServerError
    from dicebox.errors import ServiceError, Unauthorized

    try:
        return int(args.func(args, out) or 0)
    except CommandError as exc:
        out.error(exc.message)
        return exc.code
    except Unauthorized as exc:
        out.error(f"{exc.message} (set DICEBOX_API_KEY to the server's API key)")
        return EXIT_USAGE
    except ServerError as exc:  # unreachable (ServerUnavailable) or 5xx
        out.error(f"the server failed or could not be reached: {exc.message}")
        return EXIT_UNAVAILABLE
    except ServiceError as exc:  # the server refused the request (4xx)
        out.error(exc.message)
        return EXIT_USAGE
    except KeyboardInterrupt:
        out.error("interrupted")
        return EXIT_INTERRUPTED
    except OSError as exc:  # a local file or folder that cannot be read or written
        out.error(str(exc))
        return EXIT_USAGE
    except RuntimeError as exc:  # the core failed while working (e.g. out of memory)
        out.error(f"failed: {exc}")
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
