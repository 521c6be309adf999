"""Start and join tensor-parallel ranks: under ``torchrun``, or spawned from a notebook or a test.

Taught in notebook 12 (tensor parallelism).  Each rank is a real process with
its own memory; they meet at a **rendezvous** (랑데부) address and port (the
``MASTER_ADDR`` / ``MASTER_PORT`` of ``torch.distributed``) and then talk over
gloo (CPU) or NCCL (GPUs).  Everything here fails with a message instead of
waiting forever: a rendezvous that nobody joins times out after ``timeout_s``,
and when one spawned rank dies the others are stopped.
"""

from __future__ import annotations

import datetime
import os
import queue
import socket
import tempfile
import time
import traceback
import weakref
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from llmlab.errors import LlmlabError, require_int


class ParallelSetupError(LlmlabError, RuntimeError):
    """Ranks that could not meet or could not finish; the message names the address, port and what to try."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on now, so two runs on one machine do not collide."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def init_distributed(rank: int | None = None, world_size: int | None = None, *, addr: str | None = None,
                     port: int | None = None, backend: str | None = None, timeout_s: float = 60.0) -> None:
    """Join the process group (notebook 12).

    Without arguments it reads what ``torchrun`` sets (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT``).  ``backend`` defaults to NCCL when CUDA is
    available and gloo otherwise.  ``timeout_s`` bounds the rendezvous and every
    collective.
    """
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    addr = os.environ.get("MASTER_ADDR", "127.0.0.1") if addr is None else addr
    port = int(os.environ.get("MASTER_PORT", 29500)) if port is None else port
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if not 0 <= rank < world_size:
        raise ParallelSetupError(f"rank {rank} is not in 0..{world_size - 1} (world size {world_size}).")
    try:
        dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError, OSError) as err:
        raise ParallelSetupError(
            f"rank {rank} of {world_size} could not meet the others at {addr}:{port} within {timeout_s:g} s "
            f"({type(err).__name__}: {err}). Check that every rank was started with the same address, port and "
            "world size, that the port is free and reachable, or raise the timeout.") from err


class RankGroup:
    """``world_size`` ranks started once and kept, so that many functions run on them without paying each
    start again (a notebook's cells, a test module); notebook 12 (tensor parallelism).

    Each rank is a spawned process (gloo on 127.0.0.1, one thread) that joins the group
    and then waits for work.  :meth:`run` runs ``fn(*args, **kwargs)`` on every rank
    and returns each rank's result.  When a rank raises or dies, every rank is
    stopped and :class:`ParallelSetupError` says which rank failed first and what it
    raised; a hang is impossible: a collective nobody answers fails after
    ``timeout_s``.  Use it as a context manager, or call :meth:`close`; processes left
    over are stopped when the interpreter exits.
    """

    def __init__(self, world_size: int, *, port: int | None = None, timeout_s: float = 60.0) -> None:
        require_int("world_size", world_size, minimum=1, error=ParallelSetupError)
        self.world_size, self.timeout_s = world_size, timeout_s
        self.port = free_port() if port is None else port
        self._folder = tempfile.TemporaryDirectory(prefix="llmlab-ranks-")
        context = mp.get_context("spawn")
        self._done = context.Queue()
        self._tasks = [context.Queue() for _ in range(world_size)]
        self._processes = [context.Process(target=_serve_rank, daemon=True,
                                           args=(rank, world_size, self.port, timeout_s, self._folder.name,
                                                 self._tasks[rank], self._done))
                           for rank in range(world_size)]
        self._calls, self._closed = 0, False
        self._finalizer = weakref.finalize(self, _stop, self._processes, self._tasks, self._folder)
        for process in self._processes:
            process.start()
        self._wait(-1)  # every rank has joined the group

    def run(self, fn: Callable, *args, **kwargs) -> list:
        """``fn(*args, **kwargs)`` on every rank; each rank's result, in rank order.

        ``fn`` must be importable (a module-level function of a package or module): the
        ranks are fresh interpreters.  Inside it, ``llmlab.parallel.Comm()`` is the group.
        """
        if self._closed:
            raise ParallelSetupError("this RankGroup is closed (after close(), or after a rank failed): "
                                     "start a new one.")
        call, self._calls = self._calls, self._calls + 1
        torch.save((fn, args, kwargs), self._path(f"call{call}.pt"))
        for tasks in self._tasks:
            tasks.put(call)
        self._wait(call)
        results = [torch.load(self._path(f"call{call}.rank{rank}.pt"), weights_only=False)
                   for rank in range(self.world_size)]
        for name in [f"call{call}.pt"] + [f"call{call}.rank{rank}.pt" for rank in range(self.world_size)]:
            os.remove(self._path(name))
        return results

    def close(self, grace_s: float = 5.0) -> None:
        """Let every rank leave the group and exit; those still running after ``grace_s`` are stopped by force."""
        self._closed = True
        stop = self._finalizer.detach()  # None once it has run
        if stop is not None:
            _, function, args, _ = stop
            function(*args, grace_s=grace_s)

    def __enter__(self) -> RankGroup:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _path(self, name: str) -> str:
        return os.path.join(self._folder.name, name)

    def _wait(self, call: int) -> None:
        """Until every rank reports ``call`` done; on the first failure, stop them all and raise."""
        pending = set(range(self.world_size))
        while pending:
            try:
                rank, _, error = self._done.get(timeout=0.2)
            except queue.Empty:
                if any(process.exitcode is not None for process in self._processes):
                    self._fail([])
                continue
            pending.discard(rank)
            if error is not None:
                self._fail([(rank, error)])

    def _fail(self, errors: list[tuple[int, str]], grace_s: float = 0.5) -> None:
        """Stop every rank and raise: ranks that vanished first (the likely cause: their peers then fail with
        "connection closed"), then what each failed rank raised, in the order they reported it."""
        try:
            while True:  # other ranks' errors that arrive within the grace period
                rank, _, error = self._done.get(timeout=grace_s)
                if error is not None:
                    errors.append((rank, error))
        except queue.Empty:
            pass
        vanished = [f"-- rank {rank} exited with code {process.exitcode} before finishing (no Python error: "
                    "killed, out of memory, or os._exit)\n"
                    for rank, process in enumerate(self._processes) if process.exitcode is not None]
        self.close(grace_s=0)  # the others may wait in a collective the failed rank never joins
        raised = [f"-- rank {rank} raised:\n{text}" for rank, text in errors]
        what = "\n".join(vanished + raised)
        raise ParallelSetupError(f"a rank failed, so every rank was stopped (port {self.port}). What happened "
                                 f"to each failed rank, the first to fail first:\n\n{what}")


def _serve_rank(rank: int, world_size: int, port: int, timeout_s: float, folder: str, tasks, done) -> None:
    """One rank of a :class:`RankGroup`: join the group, then run each call it is sent until told to stop."""
    torch.set_num_threads(1)  # ranks share the machine's cores; one thread each avoids oversubscription
    try:
        init_distributed(rank, world_size, addr="127.0.0.1", port=port, timeout_s=timeout_s)
    except BaseException:
        done.put((rank, -1, traceback.format_exc()))
        return
    done.put((rank, -1, None))
    try:
        while (call := tasks.get()) is not None:
            try:
                # Files, not the queue: a large result would fill the queue's pipe, and tensors sent as
                # shared memory would die with this process.
                fn, args, kwargs = torch.load(os.path.join(folder, f"call{call}.pt"), weights_only=False)
                torch.save(fn(*args, **kwargs), os.path.join(folder, f"call{call}.rank{rank}.pt"))
                done.put((rank, call, None))
            except BaseException:
                done.put((rank, call, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


def _stop(processes: list, tasks: list, folder: tempfile.TemporaryDirectory, grace_s: float = 5.0) -> None:
    """Ask every live rank to leave, wait ``grace_s``, stop the rest by force; remove the files."""
    for process, queue_ in zip(processes, tasks):
        if process.is_alive():
            queue_.put(None)
    deadline = time.monotonic() + grace_s
    for process in processes:
        if process.pid is not None:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join()
    folder.cleanup()


def run_parallel(fn: Callable, world_size: int, *args, port: int | None = None, timeout_s: float = 60.0,
                 **kwargs) -> list:
    """Run ``fn(*args, **kwargs)`` once on ``world_size`` fresh ranks (gloo on 127.0.0.1); each rank's result.

    A :class:`RankGroup` started for this one call.  ``fn`` must be importable (a
    module-level function of a package or module); inside it, ``llmlab.parallel.Comm()``
    is the group.  If one rank raises, the others are stopped and the error is raised
    here as :class:`ParallelSetupError`.
    """
    with RankGroup(world_size, port=port, timeout_s=timeout_s) as group:
        return group.run(fn, *args, **kwargs)
