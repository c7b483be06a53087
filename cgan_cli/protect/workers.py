"""Worker processes for the protect pipeline: a process pool that survives crashing decoders.

Two kinds of pools run here (pipeline.py picks):
- *protect* workers (CPU): each process decodes, runs its own copy of the generator, encodes and
  writes. Pixels never cross a process boundary: pickling a 12 MP image to the main process and back
  cost more CPU than the generator itself (docs/performance.md).
- *decode* workers (GPU): processes that only decode; the main process batches the pixels onto its
  one device.

Both start from one fork server that imported torch and cgan once, so a worker costs a fork, not a
second one-second torch import. This module imports neither: the CLI calls `start_fork_server()`
before it imports torch itself, so the two imports overlap.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

FORK_SERVER_PRELOAD = ["cgan_cli.protect.pipeline"]  # what every protect worker needs: torch, the engine, Pillow


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def start_method() -> str:
    """forkserver where the platform has it (Linux, macOS), else spawn.

    Not fork: the main process may already run torch / OpenMP threads, and a forked copy of those can
    deadlock. The fork server is a fresh single-threaded process that imports FORK_SERVER_PRELOAD once.
    """
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


def start_fork_server() -> None:
    """Start the fork server (and its torch import) now, in the background; idempotent."""
    if start_method() != "forkserver":
        return
    from multiprocessing import forkserver

    multiprocessing.get_context("forkserver").set_forkserver_preload(FORK_SERVER_PRELOAD)
    with sigint_ignored():  # inherited through exec: the server's torch import and every worker ignore Ctrl-C
        forkserver.ensure_running()


@contextmanager
def sigint_ignored() -> Iterator[None]:
    """Ignore SIGINT while starting a child process, so the child starts with it ignored.

    Why: Ctrl-C on a terminal reaches the whole process group. Only the main process should react
    (stop, write summary.json, print one line); a worker or the fork server importing torch would
    print a traceback each. Python keeps an inherited SIG_IGN instead of installing KeyboardInterrupt.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextmanager
def interrupt_once() -> Iterator[None]:
    """Ctrl-C raises KeyboardInterrupt once; further ones are ignored, also after the block once one fired.

    Why: the first Ctrl-C starts the wind-down (shut the worker pool, close the manifest, write
    summary.json) and then the exit. A second one landing there would cut the pool's shutdown short,
    leaving a worker the interpreter then waits for at exit, and print tracebacks; one landing just
    after the block, or once the interpreter has reset its handlers at exit, would end the process
    by SIGINT before its one line (a held-down Ctrl-C, 1 run in ~15).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def first_only(signum: int, frame: object) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, first_only)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGINT) is first_only:  # not fired: Ctrl-C as before the block
            signal.signal(signal.SIGINT, previous)


@contextmanager
def sigint_deferred() -> Iterator[None]:
    """Hold a Ctrl-C that lands in the block and deliver it, to the handler in place before, as the block ends.

    Why: submitting to the pool can start a worker, a handshake with the fork server. A
    KeyboardInterrupt in its middle leaves a child the pool does not know of and so does not wait
    for; it then fails to open the pool's semaphores once the main process has exited, and prints a
    traceback under the one "interrupted" line.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if held:
            signal.raise_signal(signal.SIGINT)  # ignored, KeyboardInterrupt or interrupt_once's, as before the block


def exit_with(parent: int, interval: float = 1.0) -> None:
    """Worker initializer: ignore Ctrl-C (the main process handles it) and exit when the main
    process is gone (a SIGKILL, an OOM kill).

    Why: a pool worker waits on its task queue forever, and a killed parent never sends the
    shutdown; the orphans (and the fork server they keep alive) would hold a torch process each.
    POSIX only: on Windows `os.kill(pid, 0)` would terminate the parent instead of probing it.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if os.name == "nt":
        return

    def watch() -> None:
        while True:
            time.sleep(interval)
            try:
                os.kill(parent, 0)
            except ProcessLookupError:
                os._exit(1)
            except PermissionError:
                pass  # the pid exists, under another user: not ours to judge; keep waiting

    threading.Thread(target=watch, name="cgan-exit-with-parent", daemon=True).start()


class InlineExecutor(Executor):
    """--workers 0: run tasks in the calling process (debugging, tiny runs, no fork/spawn available)."""

    def submit(self, fn, /, *args, **kwargs) -> Future:  # type: ignore[override]
        fut: Future = Future()
        try:
            fut.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001
            fut.set_exception(exc)
        return fut


CRASHED = "the decoder process crashed on this file (corrupt or hostile data)"


@dataclass(eq=False)
class Task:
    """A group of jobs submitted to the pool; `future` is replaced when a crash forces a resubmit."""

    jobs: list[tuple]
    future: Future


class WorkerPool:
    """Processes that run `task(jobs) -> results` (one result per job) and survive a crashing decoder.

    Work goes to the workers in groups of jobs (one round trip each). A malformed file can kill a
    worker process (a native decoder bug); the pool then breaks and every pending future fails. The
    pool is replaced, every task still pending is resubmitted to the new one, and the broken group's
    jobs are rerun one at a time: one that breaks that pool too is the culprit and gets
    `crashed(job, CRASHED)`.
    """

    def __init__(self, workers: int, task: Callable[[list[tuple]], list], crashed: Callable[[tuple, str], Any]) -> None:
        self.workers, self.task, self.crashed = workers, task, crashed
        if workers > 0:
            start_fork_server()
        self.pool = self._new()
        self._pending: dict[int, Task] = {}  # submitted, result not yet taken

    def _new(self) -> Executor:
        if self.workers <= 0:
            return InlineExecutor()
        return ProcessPoolExecutor(max_workers=self.workers, mp_context=multiprocessing.get_context(start_method()),
                                   initializer=exit_with, initargs=(os.getpid(),))

    def submit(self, jobs: list[tuple]) -> Task:
        with sigint_deferred():  # a submit can start a worker
            task = Task(jobs, self.pool.submit(self.task, jobs))
        self._pending[id(task)] = task
        return task

    def result(self, task: Task) -> list:
        """The task's results; after a crash, computed again job by job on a fresh pool."""
        del self._pending[id(task)]
        try:
            return task.future.result()
        except BrokenProcessPool:
            self._restart()
            return [self._alone(job) for job in task.jobs]

    def _restart(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.pool = self._new()
        with sigint_deferred():
            for task in self._pending.values():
                task.future = self.pool.submit(self.task, task.jobs)

    def _alone(self, job: tuple) -> Any:
        try:
            with sigint_deferred():
                future = self.pool.submit(self.task, [job])
            return future.result()[0]
        except BrokenProcessPool:
            self._restart()
            return self.crashed(job, CRASHED)

    def shutdown(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
