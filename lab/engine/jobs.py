# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Engine jobs: one per command, found by id or by correlation id.

A command's job exists before the command's reply is sent: the SDK example
``jobs_completed()`` treats an empty job list as "finished", so a job created
later would make clients think the work was done. Descriptions use the
engine's templates (ExecutionMessages.properties), or the command name when
the engine has none, as it does.
"""

from __future__ import annotations

import time
import uuid

from lab.engine import errors, search

STARTED = "started"
FINISHED = "finished"
FAILED = "failed"

# The engine clears succeeded jobs after 10 minutes and failed ones after an
# hour (SucceededJobCleanupTimeInMinutes, FailedJobCleanupTimeInMinutes).
SUCCEEDED_RETENTION = 10 * 60
FAILED_RETENTION = 60 * 60

FIELDS = {
    "id": search.Field(lambda j: j["id"]),
    "correlation_id": search.Field(lambda j: j["correlation_id"]),
    "description": search.Field(lambda j: j["description"]),
    "status": search.Field(lambda j: j["status"], enum=True),
}


class Jobs:
    def __init__(self, db, owner_id: str):
        self.db = db
        self.owner_id = owner_id

    def start(self, description: str, correlation_id: str | None) -> str:
        job_id = str(uuid.uuid4())
        now = time.time()
        with self.db.transaction():
            self.db.insert(
                "jobs",
                {
                    "id": job_id,
                    "description": description,
                    "status": STARTED,
                    "correlation_id": correlation_id,
                    "owner_id": self.owner_id,
                    "start_time": now,
                    "end_time": None,
                    "last_updated": now,
                },
            )
            self.db.record("job", job_id, STARTED)
        return job_id

    def end(self, job_id: str | None, succeeded: bool) -> None:
        if job_id is None:
            return
        status = FINISHED if succeeded else FAILED
        now = time.time()
        with self.db.transaction():
            changed = self.db.run(
                "UPDATE jobs SET status = ?, end_time = ?, last_updated = ? "
                "WHERE id = ? AND status = ?",
                (status, now, now, job_id, STARTED),
            )
            if changed:
                self.db.record("job", job_id, status)

    def add_step(self, job_id: str, description: str, step_type: str = "executing") -> str:
        """A step of a running job (step.EXECUTING and its kind), started now."""
        step_id = str(uuid.uuid4())
        with self.db.transaction():
            number = self.db.one("SELECT COUNT(*) AS n FROM steps WHERE job_id = ?", (job_id,))["n"]
            self.db.insert(
                "steps",
                {
                    "id": step_id,
                    "job_id": job_id,
                    "number": number,
                    "type": step_type,
                    "description": description,
                    "status": STARTED,
                    "progress": None,
                    "start_time": time.time(),
                    "end_time": None,
                },
            )
            self._touch(job_id)
        return step_id

    def step_progress(self, step_id: str, percent: int) -> None:
        with self.db.transaction():
            self.db.update("steps", step_id, progress=max(0, min(100, percent)))

    def end_step(self, step_id: str, succeeded: bool) -> None:
        status = FINISHED if succeeded else FAILED
        with self.db.transaction():
            self.db.run(
                "UPDATE steps SET status = ?, end_time = ? WHERE id = ? AND status = ?",
                (status, time.time(), step_id, STARTED),
            )

    def steps(self, job_id: str) -> list[dict]:
        return self.db.all("SELECT * FROM steps WHERE job_id = ? ORDER BY number", (job_id,))

    def get(self, job_id: str) -> dict:
        job = self.db.get("jobs", job_id)
        if job is None:
            raise errors.not_found()
        return job

    def list(self, query: str | None, case_sensitive: bool, limit: int | None) -> list[dict]:
        jobs = self.db.all("SELECT * FROM jobs ORDER BY start_time")
        return search.select(jobs, query, FIELDS, "jobs", case_sensitive, limit)

    def started_ids(self) -> list[str]:
        return [j["id"] for j in self.db.all("SELECT id FROM jobs WHERE status = ?", (STARTED,))]

    def fail_unfinished(self, keep: set[str]) -> None:
        """At start-up: a job still running belonged to an engine that died,
        unless its command goes on (keep), as an open image transfer does."""
        for job_id in self.started_ids():
            if job_id not in keep:
                self.end(job_id, succeeded=False)

    def cleanup(self, now: float) -> None:
        self.db.run(
            "DELETE FROM jobs WHERE (status = ? AND end_time < ?) OR (status = ? AND end_time < ?)",
            (FINISHED, now - SUCCEEDED_RETENTION, FAILED, now - FAILED_RETENTION),
        )
        self.db.run("DELETE FROM steps WHERE job_id NOT IN (SELECT id FROM jobs)")

    def _touch(self, job_id: str) -> None:
        self.db.run("UPDATE jobs SET last_updated = ? WHERE id = ?", (time.time(), job_id))
