"""Shared helpers of the benchmarks: start the real server in a subprocess, wait for it, stop it;
timing statistics; the machine the figures were taken on.

Nothing here asserts timings: the benchmarks print figures.
"""
from __future__ import annotations

import atexit
import os
import platform
import shutil
import shlex
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def scratch_dir(prefix: str) -> str:
    """A temporary folder removed when the benchmark exits (benchmark databases take GBs)."""
    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """A server process started by :func:`start_server` (``url`` without a trailing slash)."""

    proc: subprocess.Popen
    url: str
    port: int
    started: float                      # time.perf_counter() just before Popen
    ready_seconds: float = float("nan")  # process start to the first 200 on GET /
    log_path: Optional[str] = None
    argv: list = field(default_factory=list)

    def stop(self) -> None:
        stop_server(self)

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_server(db: str, gunicorn_workers: int = 0, timeout: float = 120.0, log_path: Optional[str] = None,
                 extra: Sequence[str] = ()) -> Server:
    """Start ``python run_app.py -d DB -p PORT`` (or gunicorn with ``gunicorn_workers`` workers on
    ``app.server:serve(db=...)``) on 127.0.0.1 and a free port; wait for GET / to answer 200.

    The process gets its own process group, so :func:`stop_server` ends it and its workers only.
    Raises RuntimeError (with the tail of the server's output) if it exits or does not answer.
    """
    port = free_port()
    if gunicorn_workers:
        argv = [sys.executable, "-m", "gunicorn", "-w", str(gunicorn_workers), "-b", f"127.0.0.1:{port}",
                "--timeout", "120", "--log-level", "warning", f"app.server:serve(db={os.path.abspath(db)!r})"]
    else:
        argv = [sys.executable, os.path.join(ROOT, "run_app.py"), "-d", db, "-p", str(port), *extra]
    if log_path is None:
        import tempfile
        log_path = tempfile.mkstemp(prefix="vli-bench-server-", suffix=".log")[1]
    log = open(log_path, "wb")  # noqa: SIM115 - closed by the child; we only read the file
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    log.close()
    server = Server(proc=proc, url=f"http://127.0.0.1:{port}", port=port, started=t0, log_path=log_path,
                    argv=argv)
    deadline = t0 + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {shlex.join(argv)}\n{tail(log_path)}")
        try:
            with urllib.request.urlopen(server.url + "/", timeout=5) as r:
                if r.status == 200:
                    server.ready_seconds = time.perf_counter() - t0
                    return server
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        if time.perf_counter() > deadline:
            stop_server(server)
            raise RuntimeError(f"server did not answer within {timeout:.0f} s\n{tail(log_path)}")
        time.sleep(0.02)


def stop_server(server: Server, grace: float = 10.0) -> None:
    """SIGTERM the server's process group (this process's child and its workers), then SIGKILL."""
    import signal

    proc = server.proc
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(5)


def tail(path: Optional[str], n: int = 20) -> str:
    if not path or not os.path.exists(path):
        return ""
    with open(path, "rb") as f:
        lines = f.read().decode("utf-8", "replace").splitlines()
    return "\n".join(lines[-n:])


def rss_mb(pid: int, children: bool = True) -> float:
    """Resident memory of a process (and its children, e.g. gunicorn workers) in MB (psutil)."""
    import psutil

    p = psutil.Process(pid)
    procs = [p] + (p.children(recursive=True) if children else [])
    total = 0
    for q in procs:
        try:
            total += q.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def anon_mb(pid: int) -> float:
    """The process's own memory (RssAnon of /proc/PID/status), in MB. Unlike RSS, it leaves out the
    pages of the memory-mapped database, which belong to the OS page cache (and, with the large page
    cache folios of recent kernels, grow by up to a MB for each small value read)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def stats_ms(seconds: Sequence[float]) -> tuple[float, float]:
    """(median, p95) in milliseconds."""
    a = np.asarray(seconds, dtype=np.float64) * 1000.0
    if a.size == 0:
        return float("nan"), float("nan")
    return float(np.median(a)), float(np.percentile(a, 95))


def machine() -> str:
    """One line: CPU cores, GPU or not, Python version, OS."""
    gpu = "no GPU"
    try:
        import torch  # noqa: PLC0415

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 - torch missing or broken: still report the rest
        pass
    return (f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), {gpu}, "
            f"Python {platform.python_version()}, {platform.system()} {platform.release()}")


def du_mb(path: str) -> float:
    """Disk use of a folder in MB (allocated blocks: LMDB's file is sparse)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            st = os.stat(os.path.join(root, name))
            total += st.st_blocks * 512
    return total / 2**20
