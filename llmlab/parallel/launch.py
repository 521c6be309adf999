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
import socket
import tempfile
import traceback
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from llmlab.errors import LlmlabError


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


def _run_rank(rank: int, fn: Callable, world_size: int, port: int, timeout_s: float, args: tuple, kwargs: dict,
              folder: str) -> None:
    torch.set_num_threads(1)  # ranks share the machine's cores; one thread each avoids oversubscription
    joined = False
    try:
        init_distributed(rank, world_size, addr="127.0.0.1", port=port, timeout_s=timeout_s)
        joined = True
        # A file, not a queue: a queue's pipe fills up and blocks the rank from exiting while the
        # parent waits for it to exit; and tensors sent as shared memory would die with this process.
        torch.save(fn(*args, **kwargs), os.path.join(folder, f"rank{rank}.pt"))
    except BaseException:
        # Written before this rank leaves the group, so the parent can say which rank failed first:
        # the moment it leaves, its peers fail with "connection closed", and spawn reports whichever
        # process it happens to poll first.
        with open(os.path.join(folder, f"rank{rank}.error"), "w") as out:
            out.write(traceback.format_exc())
        raise
    finally:
        if joined:
            dist.destroy_process_group()


def _rank_errors(folder: str) -> str:
    """Every failed rank's traceback, the first to fail first."""
    names = sorted((n for n in os.listdir(folder) if n.endswith(".error")),
                   key=lambda n: os.stat(os.path.join(folder, n)).st_mtime_ns)
    parts = []
    for name in names:
        with open(os.path.join(folder, name)) as error:
            parts.append(f"-- {name.removesuffix('.error').replace('rank', 'rank ')} raised:\n{error.read()}")
    return "\n".join(parts)


def run_parallel(fn: Callable, world_size: int, *args, port: int | None = None, timeout_s: float = 60.0,
                 **kwargs) -> list:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` spawned ranks (gloo on 127.0.0.1); return each rank's result.

    ``fn`` must be importable (a module-level function of a package or module), as
    ``spawn`` starts fresh interpreters; inside it, ``llmlab.parallel.Comm()`` is
    the group.  If one rank raises, the others are stopped and the error is raised
    here as :class:`ParallelSetupError`.
    """
    port = free_port() if port is None else port
    with tempfile.TemporaryDirectory(prefix="llmlab-ranks-") as folder:
        _spawn(fn, world_size, port, timeout_s, args, kwargs, folder)
        return [torch.load(os.path.join(folder, f"rank{rank}.pt"), weights_only=False) for rank in range(world_size)]


def _spawn(fn: Callable, world_size: int, port: int, timeout_s: float, args: tuple, kwargs: dict, folder: str) -> None:
    try:
        mp.start_processes(_run_rank, args=(fn, world_size, port, timeout_s, args, kwargs, folder),
                           nprocs=world_size, join=True, start_method="spawn")
    except mp.ProcessRaisedException as err:
        raise ParallelSetupError(f"a rank failed, so every rank was stopped (port {port}). What each failed rank "
                                 f"raised, the first to fail first:\n\n{_rank_errors(folder) or err}") from None
    except mp.ProcessExitedException as err:
        raise ParallelSetupError(f"a rank exited with code {err.exit_code} before finishing, so every rank was "
                                 f"stopped (port {port}).") from None
