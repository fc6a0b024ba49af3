"""Every Redis key Neeko uses, in one place (prefix `neeko:`)."""

from __future__ import annotations

PREFIX = "neeko:"

TURNS = PREFIX + "turns"
"""Stream of turns waiting for a worker (consumer group `WORKERS`)."""
WORKERS = "workers"
"""Consumer group of the inference workers on `TURNS`."""
DEAD = PREFIX + "dead"
"""Stream of turns that failed too many times (dead letters)."""
DEAD_JOBS = PREFIX + "dead-jobs"
"""Stream of expansion jobs whose payload is not a valid job (dropped, with the error)."""
TRAIN = PREFIX + "train"
"""Stream of expansion jobs (consumer group `TRAINERS`)."""
TRAINERS = "trainers"
"""Consumer group of the trainers on `TRAIN`."""
EVENTS = PREFIX + "events"
"""Stream of catalog events (a character got its block); every worker reads all of it."""
ALIVE = PREFIX + "alive"
"""Sorted set: worker name -> time of its last heartbeat."""
STATS = PREFIX + "stats"
"""Hash of counters: turns, steps, step_rows, failed, dead, jobs_done, jobs_queued,
jobs_failed."""


def reply(turn_id: str) -> str:
    """Stream of one turn's reply events (chunks, then `done` or `error`); it expires."""
    return f"{PREFIX}reply:{turn_id}"


def sent(turn_id: str) -> str:
    """Hash: delivery tag -> chunks of it in the reply stream (a retried publish adds none).

    It expires with the reply stream.
    """
    return f"{PREFIX}sent:{turn_id}"


def result(turn_id: str) -> str:
    """A turn's final event, written once (`SET NX`); a redelivered turn re-publishes it."""
    return f"{PREFIX}result:{turn_id}"


def submitted(turn_id: str) -> str:
    """Marks a turn id as queued, so a re-submitted turn is not queued twice."""
    return f"{PREFIX}submitted:{turn_id}"


def attempts(item_id: str) -> str:
    """How many times a worker started on a turn or job."""
    return f"{PREFIX}attempts:{item_id}"


def job(job_id: str) -> str:
    """Hash: an expansion job's status, progress, loss, attempts and error."""
    return f"{PREFIX}job:{job_id}"


def job_events(job_id: str) -> str:
    """Stream of an expansion job's progress events."""
    return f"{PREFIX}job:{job_id}:events"


def block(key: str) -> str:
    """A trained character's block (safetensors bytes), for workers on any machine."""
    return f"{PREFIX}block:{key}"


def applied(token: str) -> str:
    """Marks a write that a retry must not repeat (counters) as done; it expires."""
    return f"{PREFIX}applied:{token}"
