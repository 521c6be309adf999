"""Tensor parallelism (llmlab.parallel): split layers on real gloo ranks equal the single process.

Spawned ranks are real processes on 127.0.0.1; each run takes a few seconds, so
each spawned test checks several things of one run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from llmlab.config import get_config
from llmlab.parallel import (Comm, ParallelConfigError, ParallelSetupError, check_tp, free_port, init_distributed,
                             local_heads, RankGroup, ring_wire_bytes, run_parallel, shard_model, vocab_shard)
from llmlab.parallel.runs import build_model, sharded_engine, sharded_generate, sharded_logits

ROOT = Path(__file__).resolve().parents[1]
IDS = torch.randint(0, 1024, (2, 12), generator=torch.Generator().manual_seed(1))


# -- one process: the arithmetic of the split ------------------------------------------------------


def test_ring_wire_bytes_follow_the_ring_formulas():
    assert ring_wire_bytes("all_reduce", 1000, 4) == 1500  # 2·(N−1)/N
    assert ring_wire_bytes("all_gather", 1000, 4) == 3000  # (N−1) pieces
    assert ring_wire_bytes("broadcast", 1000, 4) == 1000
    assert ring_wire_bytes("all_reduce", 1000, 1) == 0
    with pytest.raises(ValueError, match="unknown collective"):
        ring_wire_bytes("scatter", 1, 2)


def test_vocab_shards_cover_an_uneven_vocabulary_once():
    shards = [vocab_shard(50257, rank, 4) for rank in range(4)]
    assert [s[2] for s in shards] == [12565] * 4  # every shard the same size (the all-gather needs it)
    assert [(s[0], s[1]) for s in shards] == [(0, 12565), (12565, 25130), (25130, 37695), (37695, 50257)]


@pytest.mark.parametrize(("n_kv_heads", "tp", "expected"), [
    (4, 2, [(range(0, 2), range(0, 2)), (range(2, 4), range(2, 4))]),  # MHA: split
    (2, 2, [(range(0, 2), range(0, 1)), (range(2, 4), range(1, 2))]),  # GQA: split
    (2, 4, [(range(0, 1), range(0, 1)), (range(1, 2), range(0, 1)),  # fewer KV heads than ranks: replicated
            (range(2, 3), range(1, 2)), (range(3, 4), range(1, 2))]),
    (1, 4, [(range(r, r + 1), range(0, 1)) for r in range(4)]),  # MQA: the one KV head everywhere
])
def test_local_heads_split_or_replicate_kv_heads(n_kv_heads, tp, expected):
    config = get_config("course-tiny-llama", n_kv_heads=n_kv_heads)
    assert [local_heads(config, rank, tp) for rank in range(tp)] == expected


def test_sizes_that_do_not_split_are_refused_with_the_sizes_that_would():
    with pytest.raises(ParallelConfigError, match=r"n_heads=4 .* does not divide by tp=3: .*\[1, 2, 4\]"):
        check_tp(get_config("course-tiny"), 3)
    with pytest.raises(ParallelConfigError, match="n_kv_heads=3 and tp=2"):
        check_tp(get_config("course-tiny-llama", n_heads=6, n_kv_heads=3, head_dim=64, d_ff=690), 2)


def test_one_rank_is_the_unsplit_model():
    model = build_model("course-tiny-llama")
    want = model(IDS).logits
    comm = Comm.single()
    shard_model(model, comm)
    torch.testing.assert_close(model(IDS).logits, want, atol=1e-6, rtol=0)
    assert comm.stats.total("calls") == 0


def test_a_rendezvous_nobody_joins_times_out_naming_address_and_port():
    port = free_port()
    with pytest.raises(ParallelSetupError, match=rf"rank 0 of 2 could not meet the others at 127.0.0.1:{port} "
                                                 r"within 2 s"):
        init_distributed(0, 2, addr="127.0.0.1", port=port, timeout_s=2)


# -- real ranks ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def groups():
    """``groups(tp)``: a RankGroup of ``tp`` ranks shared by this module's tests (each start costs seconds)."""
    started = {}

    def group(tp: int) -> RankGroup:
        if tp not in started:
            started[tp] = RankGroup(tp)
        return started[tp]

    yield group
    for group in started.values():
        group.close()


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize(("preset", "overrides"), [("course-tiny", {}), ("course-tiny-llama", {}),
                                                   ("course-tiny-llama", {"n_kv_heads": 1}), ("checkpoint", {})],
                         ids=["MHA", "GQA+RoPE", "MQA-replicated", "trained-checkpoint"])
def test_split_model_gives_the_single_process_logits(preset, overrides, tp, groups):
    reference = build_model(preset, **overrides)
    with torch.no_grad():
        want = reference(IDS).logits
    ranks = groups(tp).run(sharded_logits, preset, IDS, **overrides)
    config = reference.config
    tokens = IDS.numel()
    for result in ranks:
        torch.testing.assert_close(result["logits"], want, atol=1e-5, rtol=0)
        # one all-reduce after attention and one after the MLP per layer, one for the embedding lookup
        assert result["calls"] == {"all_reduce": 2 * config.n_layers + 1, "all_gather": 1}
        hidden_bytes = tokens * config.d_model * 4
        assert result["payload_bytes"]["all_reduce"] == (2 * config.n_layers + 1) * hidden_bytes
        assert result["wire_bytes"]["all_reduce"] == (2 * config.n_layers + 1) * hidden_bytes * 2 * (tp - 1) / tp
        shard_vocab = vocab_shard(config.vocab_size, 0, tp)[2]
        assert result["payload_bytes"]["all_gather"] == tokens * shard_vocab * 4  # each rank's slice of the logits
        assert result["seconds"].keys() == result["calls"].keys() and min(result["seconds"].values()) > 0
    held = [result["parameters"] for result in ranks]
    assert len(set(held)) == 1  # every rank holds the same share
    if config.n_kv_heads % tp == 0:
        assert held[0] < ranks[0]["full_parameters"] / tp * 1.1  # about 1/tp (norms and positions are whole)
    else:
        assert held[0] > ranks[0]["full_parameters"] / tp  # replicated KV heads are held on several ranks


def test_bytes_sent_grow_with_the_tokens_exactly_as_the_formula_says(groups):
    from llmlab.parallel.runs import collectives_by_length

    config = get_config("course-tiny-llama")
    lengths = [1, 5, 12]
    for rank in groups(2).run(collectives_by_length, "course-tiny-llama", lengths):
        assert [counted["tokens"] for counted in rank] == lengths
        for n, counted in zip(lengths, rank):
            assert counted["calls"] == {"all_reduce": 2 * config.n_layers + 1, "all_gather": 1}
            assert counted["payload_bytes"]["all_reduce"] == (2 * config.n_layers + 1) * n * config.d_model * 4


def test_decode_steps_are_timed_with_their_collectives(groups):
    from llmlab.parallel.runs import decode_seconds

    single, = run_parallel(decode_seconds, 1, "course-tiny", 3)
    assert len(single["step_seconds"]) == 3 and single["comm_seconds"] == [0.0] * 3
    for rank in groups(2).run(decode_seconds, "course-tiny", 3):
        assert len(rank["step_seconds"]) == 3
        assert all(0 < comm < step for comm, step in zip(rank["comm_seconds"], rank["step_seconds"]))
        assert rank["parameters"] < single["parameters"]


@pytest.mark.parametrize(("preset", "tp"), [("course-tiny", 2), ("course-tiny-llama", 2), ("course-tiny-llama", 4)])
def test_split_model_generates_the_same_tokens(preset, tp, groups):
    prompts = [[5, 17, 300, 2], [900, 4, 4, 81, 13, 7, 1]]
    from llmlab.generate import generate_many
    from llmlab.sampling import SamplingParams

    want = generate_many(build_model(preset), prompts, SamplingParams(temperature=0, max_new_tokens=10))
    for got in groups(tp).run(sharded_generate, preset, prompts, 10):
        assert got == want


def fail_on_rank_one() -> int:
    """A run where rank 1 dies: rank 0 must not wait for it forever."""
    comm = Comm()
    if comm.rank == 1:
        raise RuntimeError("rank 1 broke on purpose")
    comm.all_reduce(torch.ones(4))  # would wait for rank 1 forever without the launcher stopping it
    return comm.rank


def test_a_rank_that_dies_stops_the_others_with_an_error():
    with pytest.raises(ParallelSetupError, match="a rank failed, so every rank was stopped") as caught:
        run_parallel(fail_on_rank_one, 2, timeout_s=30)
    # Rank 0 may fail too ("connection closed by peer"); the message leads with the rank that caused it.
    first = str(caught.value).split("-- rank ")[1]
    assert first.startswith("1 raised") and "rank 1 broke on purpose" in first


def rank_pid() -> int:
    return os.getpid()


def exit_on_rank_one() -> int:
    """Rank 1 vanishes without raising (a crash, an OOM kill): rank 0 waits in the all-reduce."""
    comm = Comm()
    if comm.rank == 1:
        os._exit(3)
    comm.all_reduce(torch.ones(4))
    return comm.rank


def test_a_rank_group_runs_many_calls_on_the_same_processes_and_leaves_none_behind():
    group = RankGroup(2)
    first = group.run(rank_pid)
    assert group.run(rank_pid) == first and len(set(first)) == 2 and os.getpid() not in first
    processes = list(group._processes)
    group.close()
    assert not any(process.is_alive() for process in processes)
    with pytest.raises(ParallelSetupError, match="this RankGroup is closed"):
        group.run(rank_pid)


def test_a_rank_that_vanishes_stops_the_others_with_its_exit_code():
    with pytest.raises(ParallelSetupError, match="a rank failed, so every rank was stopped") as caught:
        run_parallel(exit_on_rank_one, 2, timeout_s=30)
    assert str(caught.value).split("-- ")[1].startswith("rank 1 exited with code 3 before finishing")


def test_two_runs_at_once_on_their_own_ports():
    results, errors = {}, []

    def run(name):
        try:
            results[name] = run_parallel(sharded_logits, 2, "course-tiny", IDS)
        except Exception as err:  # noqa: BLE001 - surfaced by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(name,)) for name in ("first", "second")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors and set(results) == {"first", "second"}
    torch.testing.assert_close(results["first"][0]["logits"], results["second"][0]["logits"], atol=0, rtol=0)



def test_a_packed_batch_survives_the_broadcast_encoding():
    from llmlab.engine.paged_cache import Span
    from llmlab.engine.runner import PackedBatch
    from llmlab.parallel.engine import decode, encode

    batch = PackedBatch(items=[], ids=[7, 8, 9, 4], positions=[0, 1, 2, 40], slots=[16, 17, -1, 99],
                        spans=[Span(0, 3, 3, [4]), Span(3, 1, 41, [0, 2, 9])], last=[3])
    assert decode(encode(batch)) == (batch.ids, batch.positions, batch.slots, batch.spans, batch.last)


def _engine_tokens(preset, prompts, n, options, **overrides):
    from llmlab.engine import Engine
    from llmlab.sampling import SamplingParams

    engine = Engine(build_model(preset, **overrides), **options)
    ids = [engine.add_request(p, SamplingParams(temperature=0, max_new_tokens=n)) for p in prompts]
    done = {}
    while engine.has_unfinished_requests:
        for out in engine.step():
            done[out.request_id] = out.token_ids
    return [done[rid] for rid in ids], engine.stats()["steps"]


@pytest.mark.parametrize(("preset", "tp"), [("course-tiny", 2), ("course-tiny-llama", 4)])
def test_engine_on_split_ranks_equals_the_single_process_engine(preset, tp, groups):
    """Rank 0 schedules (chunked prefill, block size 4) and broadcasts each batch; every rank runs it."""
    prompts = [[5, 17, 300, 2], [900, 4, 4, 81, 13, 7, 1] * 5, [3] * 20]
    options = {"block_size": 4, "max_num_batched_tokens": 16}
    want, steps = _engine_tokens(preset, prompts, 8, options)
    ranks = groups(tp).run(sharded_engine, preset, prompts, 8, engine_options=options)
    assert ranks[0]["tokens"] == want
    assert [r["passes"] for r in ranks] == [steps] * tp  # every rank ran every pass
    assert ranks[0]["calls"]["broadcast"] == 1 + 2 * steps + 1  # the pool's shape, (length, batch) per step, stop
    assert 0 < ranks[0]["payload_bytes"]["broadcast"] < ranks[0]["payload_bytes"]["all_reduce"] / 20


def test_data_parallel_all_reduces_every_gradient_once_per_step(groups):
    """Two ranks, different data, DistributedDataParallel: each step moves exactly the gradients' bytes,
    and the ranks end with the same weights."""
    from llmlab.parallel.runs import ddp_gradient_bytes

    ranks = groups(2).run(ddp_gradient_bytes, "course-tiny", 3)
    config_bytes = build_model("course-tiny").num_parameters() * 4
    for result in ranks:
        assert result["gradient_bytes"] == config_bytes
        assert result["bytes_per_step"] == [config_bytes] * 3
        assert result["wire_bytes"]["all_reduce"] == 3 * config_bytes * 2 * (2 - 1) / 2
    assert ranks[0]["loss"] != ranks[1]["loss"]  # each rank trained on its own batch
    torch.testing.assert_close(ranks[0]["weights"], ranks[1]["weights"], atol=0, rtol=0)


def test_an_engine_on_a_following_rank_says_to_follow_instead():
    from llmlab.parallel.runs import engine_on_every_rank

    with pytest.raises(ParallelSetupError, match=r"on rank 1, run llmlab.parallel.engine.follow\(model, comm\)") as caught:
        run_parallel(engine_on_every_rank, 2, "course-tiny", timeout_s=30)
    assert str(caught.value).split("-- rank ")[1].startswith("1 raised")

# -- the command line under torchrun ---------------------------------------------------------------

GENERATE = ["-m", "llmlab", "generate", "ROMEO:", "--temperature", "0", "--max-new-tokens", "12", "--precision", "fp32"]


def generate(*more_prompts: str) -> list[str]:
    """The ``llmlab generate`` arguments for "ROMEO:" and ``more_prompts`` (prompts come before the options)."""
    return [*GENERATE[:4], *more_prompts, *GENERATE[4:]]


def _cli(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=timeout,
                          cwd=ROOT)


def test_tp_without_torchrun_says_how_to_start_it():
    result = _cli(*GENERATE, "--tp", "2")
    assert result.returncode == 2
    assert "--tp 2 needs 2 ranks, but this process is one of 1" in result.stderr
    assert "torchrun --nproc-per-node 2 -m llmlab generate PROMPT --tp 2" in result.stderr


@pytest.fixture(scope="module")
def single_process_text() -> dict[tuple[str, ...], str]:
    """What one process prints, per prompt list: what every torchrun launch below must print once."""
    cached: dict[tuple[str, ...], str] = {}

    def text(*more: str) -> str:
        if more not in cached:
            single = _cli(*generate(*more))
            assert single.returncode == 0, single.stderr
            cached[more] = single.stdout
        return cached[more]

    return text


def test_torchrun_two_ranks_run_the_engine_and_print_once_the_single_process_text(single_process_text):
    """Two prompts go through the engine, split over 2 ranks (rank 1 follows rank 0's engine, printing nothing).
    One prompt under torchrun is the two-node test below."""
    split = _cli("-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
                 *generate("JULIET:"), "--tp", "2")
    assert split.returncode == 0, split.stderr[-2000:]
    assert split.stdout == single_process_text("JULIET:")


def test_two_nodes_meet_over_c10d_on_localhost(single_process_text):
    """``torchrun --nnodes 2 --rdzv-backend c10d``: two launchers, one process each, as two machines would."""
    port = free_port()
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
              "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "llmlab-test",
              *GENERATE, "--tp", "2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    nodes = [subprocess.Popen(launch, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
             for _ in range(2)]
    try:
        outputs = [node.communicate(timeout=240) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert [node.returncode for node in nodes] == [0, 0], [err[-1500:] for _, err in outputs]
    printed = [out for out, _ in outputs if out]
    assert printed == [single_process_text()]  # exactly one node holds rank 0


def test_all_reduce_timings_on_real_ranks_fit_the_alpha_beta_model(groups):
    from llmlab.network import fit_latency_bandwidth
    from llmlab.parallel.runs import all_reduce_seconds

    sizes = [64, 4096, 262144, 4 * 2**20]
    timings = groups(2).run(all_reduce_seconds, sizes, 3)
    assert len(timings) == 2 and all(len(t) == len(sizes) and min(t) > 0 for t in timings)
    assert timings[0][-1] > timings[0][0]  # 4 MiB takes longer than 64 B on any machine
    alpha, beta = fit_latency_bandwidth(sizes, timings[0])
    assert alpha >= 0 and beta > 0
