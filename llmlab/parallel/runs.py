"""Small whole runs for spawned ranks: what notebook 12 and the tests execute on 2 and 4 real processes.

Taught in notebook 12 (tensor parallelism).  Each function runs *inside* one
rank (started by :func:`llmlab.parallel.run_parallel`): it builds the same model
from the same seed as a single process would, splits it with
:func:`llmlab.parallel.shard_model`, runs it, and returns plain tensors and
numbers (they travel back to the caller through a file).
"""

from __future__ import annotations

import torch

from llmlab.config import get_config
from llmlab.model import Transformer
from llmlab.parallel.comm import Comm
from llmlab.parallel.shard import shard_model


CHECKPOINT = "checkpoint"
"""Pass as ``preset`` to load the course's built-in trained model (notebook 07) instead of random weights."""


def build_model(preset: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> Transformer:
    """The model every rank (and the single-process reference) builds identically, in eval mode.

    ``preset`` names a configuration (``get_config``): random weights from ``seed``, and
    biases and norm gains random too — the usual init (0 and 1) would hide a bias added
    on every rank instead of once after the all-reduce.  ``preset="checkpoint"``
    (:data:`CHECKPOINT`) loads the built-in trained model from its ordinary, unsharded
    checkpoint instead, the way a real deployment shards at load time.
    """
    if preset == CHECKPOINT:
        if overrides:
            raise ValueError(f"the built-in checkpoint has a fixed configuration; drop {sorted(overrides)}.")
        from llmlab.checkpoint import load_checkpoint

        return load_checkpoint().model.to(dtype).eval()
    torch.manual_seed(seed)
    model = Transformer(get_config(preset, **overrides)).to(dtype).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 1:
                parameter.add_(0.1 * torch.randn_like(parameter))
    return model


def sharded_logits(preset: str, ids: torch.Tensor, seed: int = 0, dtype: torch.dtype = torch.float32,
                   **overrides) -> dict:
    """This rank's view of one forward pass of the split model: logits, its parameter count, what it sent."""
    model = build_model(preset, seed, dtype, **overrides)
    full_parameters = sum(p.numel() for p in model.parameters())
    comm = Comm()
    shard_model(model, comm)
    with torch.no_grad():
        logits = model(ids).logits
    return {"logits": logits, "parameters": sum(p.numel() for p in model.parameters()),
            "full_parameters": full_parameters, **_counted(comm)}


def collectives_by_length(preset: str, lengths: list[int], seed: int = 0, **overrides) -> list[dict]:
    """What one forward pass of ``n`` tokens sends, for each ``n`` in ``lengths`` (notebook 12's bytes per token)."""
    comm = Comm()
    model = shard_model(build_model(preset, seed, **overrides), comm)
    generator = torch.Generator().manual_seed(seed)
    counted = []
    with torch.no_grad():
        for n in lengths:
            model(torch.randint(0, model.config.vocab_size, (1, n), generator=generator))
            counted.append({"tokens": n, **_counted(comm)})
    return counted


def _counted(comm: Comm) -> dict:
    """What ``comm`` counted since its last reset, as plain dicts (and start counting afresh)."""
    stats = comm.reset()
    return {"calls": dict(stats.calls), "payload_bytes": dict(stats.payload_bytes),
            "wire_bytes": dict(stats.wire_bytes), "seconds": dict(stats.seconds)}


def sharded_generate(preset: str, prompts: list[list[int]], max_new_tokens: int, seed: int = 0,
                     dtype: torch.dtype = torch.float32, **overrides) -> list[list[int]]:
    """Greedy continuations of ``prompts`` by the split model, through the ordinary generator and its KV cache."""
    from llmlab.generate import generate_many
    from llmlab.sampling import SamplingParams

    model = shard_model(build_model(preset, seed, dtype, **overrides), Comm())
    return generate_many(model, prompts, SamplingParams(temperature=0, max_new_tokens=max_new_tokens))


def all_reduce_seconds(sizes: list[int], repeats: int = 5) -> list[float]:
    """Median seconds of one all-reduce of each size in bytes (float32 messages), on this rank (notebook 12).

    Each size is warmed up once; the ranks start each timing together (a barrier).
    """
    import statistics
    import time

    import torch.distributed as dist

    comm = Comm()
    medians = []
    for size in sizes:
        message = torch.ones(max(size // 4, 1))
        comm.all_reduce(message)
        times = []
        for _ in range(repeats):
            dist.barrier()
            start = time.perf_counter()
            comm.all_reduce(message)
            times.append(time.perf_counter() - start)
        medians.append(statistics.median(times))
    return medians


def decode_seconds(preset: str, steps: int = 16, prompt_len: int = 16, seed: int = 0, **overrides) -> dict:
    """Time greedy decode steps of the split model on this rank: each step's seconds, and the part of it
    spent inside collectives (notebook 12's compute vs communication).

    A KV cache holds the prompt; every step feeds one token.  The ranks start each
    step together (a barrier, not timed), so a step's time is this rank's compute plus
    its waits on the all-reduces (which include waiting for the slowest rank).
    """
    import time

    import torch.distributed as dist

    from llmlab.cache import KVCache

    comm = Comm()
    model = shard_model(build_model(preset, seed, **overrides), comm)
    cache = KVCache.for_model(model.config, batch_size=1, max_len=prompt_len + steps + 1)
    token = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(seed))
    step_seconds, comm_seconds = [], []
    with torch.no_grad():
        token = model(token, cache=cache).logits[:, -1:].argmax(-1)
        for _ in range(steps):
            dist.barrier()
            comm.reset()
            start = time.perf_counter()
            token = model(token, cache=cache).logits[:, -1:].argmax(-1)
            step_seconds.append(time.perf_counter() - start)
            comm_seconds.append(comm.stats.total("seconds"))
    return {"step_seconds": step_seconds, "comm_seconds": comm_seconds,
            "parameters": sum(p.numel() for p in model.parameters())}


def sharded_engine(preset: str, prompts: list[list[int]], max_new_tokens: int, seed: int = 0,
                   dtype: torch.dtype = torch.float32, engine_options: dict | None = None, **overrides) -> dict:
    """The serving engine over the split model: rank 0 schedules, samples and returns the tokens and what
    it broadcast; the other ranks follow (``llmlab.parallel.engine.follow``) and return their pass count."""
    from llmlab.engine import Engine
    from llmlab.parallel.engine import follow
    from llmlab.sampling import SamplingParams

    comm = Comm()
    model = shard_model(build_model(preset, seed, dtype, **overrides), comm)
    if comm.rank != 0:
        return {"passes": follow(model, comm)}
    engine = Engine(model, **(engine_options or {}))
    try:
        ids = [engine.add_request(p, SamplingParams(temperature=0, max_new_tokens=max_new_tokens)) for p in prompts]
        tokens = {rid: [] for rid in ids}
        while engine.has_unfinished_requests:
            for out in engine.step():
                tokens[out.request_id] = out.token_ids
    finally:
        engine.close()
    return {"tokens": [tokens[rid] for rid in ids], "passes": engine.runner.forward_passes, **_counted(comm)}


def ddp_gradient_bytes(preset: str, steps: int = 3, batch_size: int = 2, seq_len: int = 16, seed: int = 0,
                       **overrides) -> dict:
    """Data parallelism for real: train ``steps`` steps with ``DistributedDataParallel`` on this rank's own
    random batch, counting the gradient bytes DDP all-reduces (a communication hook sees every bucket).

    Returns the bytes per step, the trainable parameters' bytes (what the formula says goes
    over the wire once per step: every gradient) and the final loss (notebook 12).
    """
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    model = build_model(preset, seed, **overrides).train()
    comm = Comm()
    counted = []

    def counting_all_reduce(_, bucket):  # DDP's comm hook: average this bucket of gradients over the ranks
        buffer = bucket.buffer()
        counted.append(buffer.numel() * buffer.element_size())
        comm.record("all_reduce", counted[-1])
        future = dist.all_reduce(buffer.div_(comm.world_size), async_op=True).get_future()
        return future.then(lambda done: done.value()[0])

    ddp = DistributedDataParallel(model)
    ddp.register_comm_hook(None, counting_all_reduce)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.01)
    generator = torch.Generator().manual_seed(seed + 1 + comm.rank)  # each rank its own data
    per_step, loss = [], None
    for _ in range(steps):
        ids = torch.randint(0, model.config.vocab_size, (batch_size, seq_len + 1), generator=generator)
        before = sum(counted)
        loss = ddp(ids[:, :-1], targets=ids[:, 1:]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        per_step.append(sum(counted) - before)
    gradient_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    with torch.no_grad():
        weights = torch.cat([p.flatten() for p in model.parameters()])
    return {"bytes_per_step": per_step, "gradient_bytes": gradient_bytes, "loss": loss.item(),
            "wire_bytes": dict(comm.stats.wire_bytes), "weights": weights}


def engine_on_every_rank(preset: str) -> None:
    """A mistake on purpose: every rank builds an Engine (only rank 0 may; the others follow)."""
    from llmlab.engine import Engine

    Engine(shard_model(build_model(preset), Comm()))
