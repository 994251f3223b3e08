"""``dicebox jobs ...``: list, show, watch and cancel jobs, and the watcher that ``train`` and
``evolve --submit`` use to follow the job they queued.

Watching follows the job's Server-Sent Events (``GET /v1/jobs/{id}/events``): every event from
the job's start, then live ones, until the job ends. A dropped connection (a server restart)
is picked up again after the last event seen, for up to RECONNECT_SECONDS. A watch exits 0 when
the job succeeded and 1 when it failed or was canceled. Ctrl-C stops watching, not the job.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from dicebox.commands.common import (
    EXIT_FAILED,
    EXIT_OK,
    Output,
    ProgressBar,
    add_output_options,
    connect,
    describe_genome,
    fmt_float,
    fmt_pct,
    fmt_time,
    positive_int,
)

STATUSES = ("queued", "running", "succeeded", "failed", "canceled")
FINISHED = ("succeeded", "failed", "canceled")
# How long a watch keeps trying to reconnect to a server that went away, and the pause between
# two attempts (doubling up to the last).
RECONNECT_SECONDS = 60.0
RECONNECT_PAUSES = (0.5, 1.0, 2.0, 5.0)


def add_parser(sub: argparse._SubParsersAction) -> None:
    group = sub.add_parser("jobs", help="train and evolve jobs on the server: list, show, watch, cancel",
                           description="Jobs queued on the server by `dicebox train --submit`, "
                                       "`dicebox evolve --submit` or the REST API.")
    actions = group.add_subparsers(dest="action", required=True, metavar="ACTION")

    lst = actions.add_parser("list", help="list jobs, newest first",
                             description="Jobs, newest first, optionally with one status.")
    lst.add_argument("--status", choices=STATUSES, help="only jobs with this status")
    lst.add_argument("--limit", type=positive_int, default=20, help="at most this many (default 20)")
    lst.add_argument("--cursor", help="continue after a previous page (its 'next')")
    add_output_options(lst)
    lst.set_defaults(func=cmd_list)

    show = actions.add_parser("show", help="one job: status, progress, epochs, result",
                              description="A job's status, progress, attempts, the epochs so far "
                                          "(train) or the leaderboard (evolve), and its result.")
    show.add_argument("job_id", metavar="ID")
    add_output_options(show)
    show.set_defaults(func=cmd_show)

    watch = actions.add_parser(
        "watch", help="follow a job live until it ends (exit 0 succeeded, 1 failed/canceled)",
        description="Follow a job's progress live (epochs of a train job; individuals and "
                    "generations of an evolve job) until it ends. A finished job is replayed. "
                    "With --json, one JSON line per event ({id, event, data}); the last has "
                    "event 'end' and the job. Exit code: 0 succeeded, 1 failed or canceled.")
    watch.add_argument("job_id", metavar="ID")
    add_output_options(watch)
    watch.set_defaults(func=cmd_watch)

    cancel = actions.add_parser(
        "cancel", help="cancel a queued or running job",
        description="A queued job ends canceled at once; a running one stops within one epoch "
                    "(an evolve job cancels its children). A finished job is left as it is.")
    cancel.add_argument("job_id", metavar="ID")
    cancel.add_argument("--wait", action="store_true", help="wait until the job has ended")
    add_output_options(cancel)
    cancel.set_defaults(func=cmd_cancel)


# -- commands ------------------------------------------------------------------------------------

def cmd_list(args: argparse.Namespace, out: Output) -> int:
    with connect(args) as client:
        page = client.jobs.list(status=args.status, limit=args.limit, cursor=args.cursor)
    if out.json:
        out.result(page)
        return EXIT_OK
    items = page["items"]
    if not items:
        out.say("no jobs" + (f" with status {args.status}" if args.status else ""))
        return EXIT_OK
    out.table(["ID", "KIND", "STATUS", "PROGRESS", "DATASET", "CREATED", "ERROR"],
              [[j["id"], j["kind"], j["status"], fmt_pct(j.get("progress")), j.get("dataset"),
                fmt_time(j.get("created_at")), _short(j.get("error"))] for j in items],
              right=["PROGRESS"])
    if page.get("next"):
        out.say(f"more: dicebox jobs list --cursor {page['next']}")
    return EXIT_OK


def cmd_show(args: argparse.Namespace, out: Output) -> int:
    with connect(args) as client:
        job = client.jobs.get(args.job_id)
    if out.json:
        out.result(job)
        return EXIT_OK
    show_job(out, job)
    return EXIT_OK


def cmd_watch(args: argparse.Namespace, out: Output) -> int:
    with connect(args) as client:
        job = watch(client, out, args.job_id, json_lines=True)
    return exit_code(out, job)


def cmd_cancel(args: argparse.Namespace, out: Output) -> int:
    with connect(args) as client:
        job = client.jobs.cancel(args.job_id)
        if args.wait and job["status"] not in FINISHED:
            job = wait_quietly(client, args.job_id)
    if out.json:
        out.result(job)
    elif job["status"] in FINISHED:
        out.say(f"job {job['id']} is {job['status']}")
    else:
        out.say(f"job {job['id']}: cancel requested ({job['status']}); it stops within one epoch")
    return EXIT_OK


# -- following a job ------------------------------------------------------------------------------

def _events_with_reconnect(client, job_id: str, note):
    """The job's events; reconnects after the last one seen when the stream drops."""
    from dicebox.client import ServerUnavailable

    after, failing_since, failures = 0, None, 0
    while True:
        try:
            for event in client.jobs.events(job_id, after=after):
                failing_since, failures = None, 0
                if event.get("id"):
                    try:
                        after = int(event["id"])
                    except ValueError:
                        pass
                yield event
                if event.get("event") == "end":
                    return
            problem = "the event stream ended before the job did"
        except ServerUnavailable as exc:
            problem = str(exc)
        now = time.monotonic()
        failing_since = failing_since or now
        if now - failing_since > RECONNECT_SECONDS:
            raise ServerUnavailable(f"lost the job's event stream for {RECONNECT_SECONDS:.0f} s: {problem}")
        pause = RECONNECT_PAUSES[min(failures, len(RECONNECT_PAUSES) - 1)]
        failures += 1
        note(f"connection lost ({problem}); reconnecting in {pause:g} s")
        time.sleep(pause)


def wait_quietly(client, job_id: str) -> dict[str, Any]:
    """The job once it has ended, following its events without showing them."""
    for event in _events_with_reconnect(client, job_id, lambda _text: None):
        if event.get("event") == "end":
            return event["data"]
    return client.jobs.get(job_id)


def watch(client, out: Output, job_id: str, json_lines: bool = False) -> dict[str, Any]:
    """Follow job ``job_id`` until it ends, showing its progress; returns the ended job. With
    ``json_lines`` (and --json) every event is also printed as one JSON line."""
    job = client.jobs.get(job_id)
    view = _JobView(job)
    try:
        with out.progress(view.title, view.total, view.unit) as bar:
            for event in _events_with_reconnect(client, job_id, bar.note):
                if json_lines:
                    out.json_line({"id": event.get("id"), "event": event.get("event"), "data": event.get("data")})
                if event.get("event") == "end":
                    job = event["data"]
                    view.finish(bar, job)
                    break
                view.show(bar, event.get("event"), event.get("data"))
    except KeyboardInterrupt:
        out.error(f"stopped watching; job {job_id} goes on: dicebox jobs watch {job_id} (or cancel it: "
                  f"dicebox jobs cancel {job_id})")
        raise
    if not out.json or not json_lines:
        summarize_job(out, job)
    return job


def exit_code(out: Output, job: dict[str, Any]) -> int:
    """0 when the job succeeded, else 1 with the reason on stderr."""
    if job["status"] == "succeeded":
        return EXIT_OK
    reason = f": {job['error']}" if job.get("error") else ""
    out.error(f"job {job['id']} {job['status']}{reason}")
    return EXIT_FAILED


class _JobView:
    """How one job's events move a progress bar: epochs for a train job, individuals scored
    for an evolve job."""

    def __init__(self, job: dict[str, Any]) -> None:
        self.kind = job["kind"]
        spec = job.get("spec") or {}
        params = spec.get("params") or {}
        if self.kind == "evolve":
            evolution = spec.get("evolution") or {}
            population, generations = evolution.get("population"), evolution.get("generations")
            self.total = population * generations if population and generations else None
            self.unit = "individuals"
        else:
            self.total = params.get("epochs")
            self.unit = "epochs"
        self.title = f"{self.kind} {job['id'][:8]}"
        self.attempt = None
        self.scored = 0

    def show(self, bar: ProgressBar, kind: str | None, data: Any) -> None:
        data = data if isinstance(data, dict) else {}
        if kind == "status":
            status = data.get("status")
            attempts = data.get("attempts")
            extra = f" (attempt {attempts})" if status == "running" and attempts and attempts > 1 else ""
            bar.note(f"status: {status}{extra}" + (f": {data['error']}" if data.get("error") else ""))
        elif kind == "epoch":
            attempt = data.get("attempt")
            if self.attempt is not None and attempt != self.attempt:
                bar.note(f"attempt {attempt}: training resumes from the last checkpoint")
            self.attempt = attempt
            bar.update(data.get("epoch") or 0, _epoch_status(data))
        elif kind == "individual":
            self.scored += 1
            line = (f"generation {data.get('generation')} individual {data.get('id')}: fitness "
                    f"{fmt_float(data.get('fitness'))} after {data.get('epochs')} epochs"
                    + (" (seen before)" if data.get("cached") else ""))
            if bar.out.rich:
                bar.note(line)
                bar.update(self.scored, f"last fitness {fmt_float(data.get('fitness'))}")
            else:
                bar.update(self.scored, line)
        elif kind == "generation":
            bar.note(f"generation {data.get('generation')} done: best fitness "
                     f"{fmt_float(data.get('best_fitness'))}, mean {fmt_float(data.get('mean_fitness'))}")
        elif kind == "model":
            bar.note(f"model {data.get('model_id')} stored")
        elif kind == "log":
            bar.note(str(data.get("message", data)))
        elif kind == "cancel_requested":
            bar.note("cancel requested")

    def finish(self, bar: ProgressBar, job: dict[str, Any]) -> None:
        """A succeeded job fills its bar (a train job that stopped early: at its last epoch)."""
        if job["status"] != "succeeded" or not bar.out.rich:
            return
        if self.kind == "evolve":
            done = max(self.scored, self.total or 0)
        else:
            done = len((job.get("result") or {}).get("history") or []) or self.total
        if done:
            bar.update(done, "done", total=done)


def _epoch_status(epoch: dict[str, Any]) -> str:
    parts = [f"loss {fmt_float(epoch.get('loss'))}", f"accuracy {fmt_float(epoch.get('accuracy'))}"]
    if epoch.get("val_loss") is not None:
        parts += [f"val_loss {fmt_float(epoch.get('val_loss'))}",
                  f"val_accuracy {fmt_float(epoch.get('val_accuracy'))}"]
    return "  ".join(parts)


def _short(text: Any, width: int = 60) -> str:
    if not text:
        return ""
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[:width - 3] + "..."


# -- showing a job -------------------------------------------------------------------------------

def summarize_job(out: Output, job: dict[str, Any]) -> None:
    """The end of a job in a few lines: status, the model and its test accuracy, and for
    evolve the leaderboard and the best genome."""
    status = job["status"]
    took = _duration(job.get("started_at"), job.get("finished_at"))
    out.say(f"job {job['id']} {status}" + (f" after {took}" if took else ""),
            style="green" if status == "succeeded" else "red" if status == "failed" else None)
    result = job.get("result") or {}
    if status != "succeeded" or not result:
        return
    if job["kind"] == "evolve":
        _leaderboard(out, result.get("leaderboard") or [])
        out.say(f"best genome: {describe_genome(result.get('genome'))}")
    metrics = result.get("metrics") or {}
    out.say(f"model {result.get('model_id')}: test accuracy {fmt_pct(metrics.get('accuracy'))}, "
            f"validation accuracy {fmt_pct(result.get('fitness'))}")


def show_job(out: Output, job: dict[str, Any]) -> None:
    out.say(f"job {job['id']} ({job['kind']}, dataset {job.get('dataset')}): {job['status']}, "
            f"{fmt_pct(job.get('progress'))} done, attempt {job.get('attempts')} of {job.get('max_attempts')}")
    out.say(f"created {fmt_time(job.get('created_at'))}, started {fmt_time(job.get('started_at'))}, "
            f"finished {fmt_time(job.get('finished_at'))}"
            + (f", worker {job['worker']}" if job.get("worker") else "")
            + (f", parent {job['parent_id']}" if job.get("parent_id") else ""))
    if job.get("cancel_requested") and job["status"] not in FINISHED:
        out.say("cancel requested")
    if job.get("error"):
        out.say(f"error: {job['error']}", style="red")
    spec = job.get("spec") or {}
    if spec.get("params"):
        out.say("params: " + ", ".join(f"{k} {v}" for k, v in spec["params"].items()))
    if spec.get("genome"):
        out.say(f"genome: {describe_genome(spec['genome'])}")
    if spec.get("evolution"):
        evo = spec["evolution"]
        out.say("evolution: " + ", ".join(f"{k} {evo[k]}" for k in
                                           ("population", "generations", "retain", "random_select",
                                            "mutate_chance", "schedule", "time_budget") if k in evo))
    history = job.get("history") or []
    if history:
        out.table(["EPOCH", "LOSS", "ACCURACY", "VAL_LOSS", "VAL_ACCURACY", "SAMPLES/S"],
                  [[e.get("epoch"), fmt_float(e.get("loss")), fmt_float(e.get("accuracy")),
                    fmt_float(e.get("val_loss")), fmt_float(e.get("val_accuracy")),
                    fmt_float(e.get("samples_per_second"), 0)] for e in history],
                  right=["EPOCH", "LOSS", "ACCURACY", "VAL_LOSS", "VAL_ACCURACY", "SAMPLES/S"])
    result = job.get("result") or {}
    if job["kind"] == "evolve" and result:
        generations = result.get("generations") or []
        if generations:
            out.table(["GENERATION", "BEST", "MEAN"],
                      [[g.get("generation"), fmt_float(g.get("best_fitness")), fmt_float(g.get("mean_fitness"))]
                       for g in generations], right=["GENERATION", "BEST", "MEAN"])
        _leaderboard(out, result.get("leaderboard") or [])
        if result.get("genome"):
            out.say(f"best genome: {describe_genome(result['genome'])}")
    if result.get("model_id"):
        metrics = result.get("metrics") or {}
        out.say(f"model {result['model_id']}: test accuracy {fmt_pct(metrics.get('accuracy'))}, "
                f"validation accuracy {fmt_pct(result.get('fitness'))}")


def _leaderboard(out: Output, board: list[dict[str, Any]], top: int = 5) -> None:
    if not board:
        return
    out.table(["RANK", "FITNESS", "EPOCHS", "GENERATION", "GENOME"],
              [[rank, fmt_float(entry.get("fitness")), entry.get("epochs"), entry.get("generation"),
                describe_genome(entry.get("genome"))] for rank, entry in enumerate(board[:top], 1)],
              title=f"leaderboard (top {min(top, len(board))} of {len(board)})",
              right=["RANK", "FITNESS", "EPOCHS", "GENERATION"])


def _duration(start: Any, end: Any) -> str:
    from datetime import datetime

    try:
        seconds = (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()
    except (TypeError, ValueError):
        return ""
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
