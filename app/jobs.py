"""Background jobs for "Add example": run the live model on a new pair and store the result.

Why threads and not Dash background callbacks: a background callback runs in a separate worker
process (diskcache / Celery manager), which would have to load the model again, and the model is
the expensive part (seconds and gigabytes). The model is loaded once, in the server process, and a
small :class:`~concurrent.futures.ThreadPoolExecutor` runs jobs next to the request threads.
PyTorch releases the GIL during the forward pass, so the page keeps answering meanwhile; reads go
through the database's own short read transactions and are unaffected by the write.

A job: reserve an id (``db.reserve_example_id()``, atomic, so concurrent adds get distinct ids),
run ``model.data_setup`` ("running the model…"), then ``db.add_record`` ("preprocessing…"), which
validates the record before writing anything. Any exception (the image is unreadable, the model
raises, the record is invalid) ends the job in state "error" with a one-line message, and the
database is unchanged. The page polls :meth:`JobRunner.status` with a ``dcc.Interval``.

A job's state is a small JSON file in ``DB/jobs/`` (:class:`JobBoard`, written atomically), not
process memory, so that with several server processes (``gunicorn -w 4``, each with the model loaded)
the page's poll may be answered by any of them: the job runs in the process that took the request,
and every process reads its state from the same file. The database itself is safe to write from
several processes (LMDB's write lock; ``reserve_example_id`` is atomic).
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import re
import threading
import time
import traceback
import uuid
from concurrent.futures import ThreadPoolExecutor

from app.database.models.vl_model import run_data_setup
from app.database.tsne import wait_until_compiled

MESSAGE_CHARS = 300  # longest message shown in the page or written in one log line
LOG_LINES = 60  # longest traceback kept in a log record (its first and last lines)

QUEUED = "queued"
RUNNING = "running the model…"
PREPROCESSING = "preprocessing…"
DONE = "done"
ERROR = "error"
FINISHED = (DONE, ERROR)


def shorten(text: str, limit: int = MESSAGE_CHARS) -> str:
    """``text`` cut to ``limit`` characters with "…": a message may quote what a user typed or
    sent (megabytes), and the page and the logs must stay readable."""
    text = str(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error)[: 4 * MESSAGE_CHARS].split())
    return shorten(f"{type(error).__name__}: {text}" if text else type(error).__name__)


class BoundedLogRecords(logging.Filter):
    """Bounds every line of a log record, its traceback included (each line to
    :data:`MESSAGE_CHARS`, at most :data:`LOG_LINES` lines): Flask's error handler logs the
    exception of a failing request, whose message may hold the whole request body."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed call: logging reports it when it formats
            return True
        record.msg, record.args = _bounded_lines(message), ()
        if record.exc_info:
            record.exc_text = _bounded_lines("".join(traceback.format_exception(*record.exc_info)))
            record.exc_info = None
        elif record.exc_text:
            record.exc_text = _bounded_lines(record.exc_text)
        return True


def _bounded_lines(text: str) -> str:
    lines = text.rstrip("\n").split("\n")
    if len(lines) > LOG_LINES:
        half = LOG_LINES // 2
        lines = [*lines[:half], f"… ({len(lines) - 2 * half} lines left out)", *lines[-half:]]
    return "\n".join(shorten(line) for line in lines)


BOUNDED_LOG_RECORDS = BoundedLogRecords()  # one instance: adding it to a logger twice is a no-op
log = logging.getLogger(__name__)
log.addFilter(BOUNDED_LOG_RECORDS)


class JobBoard:
    """Job states as JSON files in one folder, shared by every server process on a database.

    A file is replaced atomically (written beside, then renamed), so a reader sees the old state or
    the new one, never half of one. Finished jobs beyond ``keep`` (the oldest first) are removed."""

    NAME = re.compile(r"job-\d+-\d+-[0-9a-f]{12}")  # the ids JobRunner makes: safe as file names

    def __init__(self, folder: str, keep: int = 200):
        self.folder, self.keep = folder, keep
        os.makedirs(folder, exist_ok=True)

    def write(self, job_id: str, state: dict) -> None:
        path = os.path.join(self.folder, job_id + ".json")
        scratch = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
        with open(scratch, "w", encoding="utf-8") as f:
            json.dump(state, f)
        os.replace(scratch, path)

    def read(self, job_id) -> dict | None:
        """The state of ``job_id`` (a value the page sends: anything not shaped like an id is None)."""
        if not isinstance(job_id, str) or not self.NAME.fullmatch(job_id):
            return None
        try:
            with open(os.path.join(self.folder, job_id + ".json"), encoding="utf-8") as f:
                return json.load(f)
        except (FileNotFoundError, ValueError):
            return None

    def forget_old(self) -> None:
        finished = []
        for name in os.listdir(self.folder):
            if name.endswith(".json"):
                state = self.read(name[:-5])
                if state is not None and state["state"] in FINISHED:
                    finished.append((state.get("finished", 0), name))
        for _, name in sorted(finished)[: max(0, len(finished) - self.keep)]:
            try:
                os.unlink(os.path.join(self.folder, name))
            except FileNotFoundError:  # another process removed it first
                pass


class JobRunner:
    """Runs live adds in 1-2 worker threads; see the module docstring.

    ``db``: a writable ``VliLmdb`` (``reserve_example_id``, ``add_record``).
    ``model``: a ``VL_Model``.
    ``keep``: how many finished jobs to remember for :meth:`status` (in ``DB/jobs/``).
    """

    def __init__(self, db, model, workers: int = 1, keep: int = 200):
        if not 1 <= workers <= 2:
            raise ValueError("workers must be 1 or 2 (the model runs in this process)")
        self.db = db
        self.model = model
        self.keep = keep
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vli-add")
        self._lock = threading.Lock()
        self._board = JobBoard(os.path.join(db.path, "jobs"), keep=keep)
        self._counter = itertools.count(1)
        self._done_events: dict[str, threading.Event] = {}  # jobs of this process, for wait()

    # ------------------------------------------------------------------------------------------
    def submit(self, image_path: str, text: str, label: str | None = None, delete_image: bool = False) -> str:
        """Queue a job and return its id. ``delete_image``: remove the file when the job ends."""
        job_id = f"job-{os.getpid()}-{next(self._counter)}-{uuid.uuid4().hex[:12]}"
        with self._lock:
            self._board.write(job_id, {"state": QUEUED, "message": "waiting for the model…", "ex_id": None,
                                       "submitted": time.time()})
            self._done_events[job_id] = threading.Event()
            self._board.forget_old()
            finished = [j for j, event in self._done_events.items() if event.is_set()]
            for old in finished[: max(0, len(finished) - self.keep)]:
                del self._done_events[old]
        self._pool.submit(self._run, job_id, image_path, text, label, delete_image)
        return job_id

    def status(self, job_id: str) -> dict:
        """``{"state", "message", "ex_id"}``; an unknown id is an "error" state."""
        job = self._board.read(job_id)  # whichever server process started it
        if job is None:
            return {"state": ERROR, "ex_id": None, "message": (
                f"unknown job {shorten(repr(job_id), 60)}: it was forgotten (only the last {self.keep} "
                f"finished jobs are kept) or never started")}
        return {"state": job["state"], "message": job["message"], "ex_id": job["ex_id"]}

    def wait(self, job_id: str, timeout: float | None = None) -> dict:
        """Block until the job ends (or ``timeout`` seconds) and return its status."""
        event = self._done_events.get(job_id)
        if event is not None:
            event.wait(timeout)
        return self.status(job_id)

    def shutdown(self, wait: bool = True) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=True)

    # ------------------------------------------------------------------------------------------
    def _set(self, job_id: str, state: str, message: str, ex_id=None) -> None:
        with self._lock:
            job = self._board.read(job_id) or {}
            job.update(state=state, message=message, ex_id=ex_id)
            if state in FINISHED:
                job["finished"] = time.time()
            self._board.write(job_id, job)

    def _run(self, job_id, image_path, text, label, delete_image) -> None:
        ex_id = None
        try:
            ex_id = int(self.db.reserve_example_id())
            self._set(job_id, RUNNING, f"running the model on example {ex_id}…", ex_id)
            record = run_data_setup(self.model, ex_id, image_path, text, label=label)
            self._set(job_id, PREPROCESSING, f"preprocessing example {ex_id}…", ex_id)
            wait_until_compiled(lambda message: self._set(job_id, PREPROCESSING, message, ex_id))
            stored = self.db.add_record(record)
            self._set(job_id, DONE, f"example {stored} added", stored)
        except Exception as error:  # noqa: BLE001 - every failure is reported to the page
            message = _one_line(error)
            log.warning("add example %s failed: %s", job_id, message, exc_info=True)
            self._set(job_id, ERROR, message, None)
        finally:
            if delete_image:
                try:
                    os.unlink(image_path)
                except OSError:
                    pass
            event = self._done_events.get(job_id)
            if event is not None:
                event.set()

