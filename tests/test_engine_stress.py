"""500 requests through a deliberately small pool: preemptions, prefix hits, aborts, and still every
request gets exactly the tokens it gets alone, the blocks stay consistent after every step, and
nothing is left behind at the end.

float64 model (see tests/test_engine.py): the engine and the one-request reference must agree token
for token, greedy and seeded sampling alike.
"""

from __future__ import annotations

import random

import pytest
import torch

from llmlab import Transformer, get_config
from llmlab.engine import Engine, FinishReason, SequenceStatus
from llmlab.generate import generate_many
from llmlab.sampling import SamplingParams

VOCAB, CONTEXT = 97, 64
N_REQUESTS = 500


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_requests(rng: random.Random) -> list[tuple[list[int], SamplingParams]]:
    rand = lambda n: [rng.randrange(1, VOCAB) for _ in range(n)]  # noqa: E731
    prefixes = [rand(8), rand(13), rand(21)]
    requests = []
    for i in range(N_REQUESTS):
        roll = rng.random()
        if roll < 0.35:  # a shared prefix (a system prompt) and a suffix of its own
            prompt = rng.choice(prefixes) + rand(rng.randint(0, 20))
        elif roll < 0.45 and requests:  # the very same prompt as an earlier request
            prompt = list(rng.choice(requests)[0])
        else:
            prompt = rand(rng.randint(1, 48))
        stop = (rng.randrange(1, VOCAB),) if rng.random() < 0.25 else ()
        max_new = rng.randint(1, 30)
        if rng.random() < 0.5:
            params = SamplingParams(temperature=0, max_new_tokens=max_new, stop_ids=stop)
        else:
            params = SamplingParams(temperature=rng.choice([0.7, 1.0, 1.3]), top_k=rng.choice([None, 5, 20]),
                                    top_p=rng.choice([None, 0.9]), max_new_tokens=max_new, stop_ids=stop,
                                    seed=rng.randrange(2**32))
        requests.append((prompt, params))
    return requests


def cap(prompt, params) -> int:
    """Tokens the engine may give: max_new_tokens, or up to prompt + output = context + 1."""
    return min(params.max_new_tokens, CONTEXT + 1 - len(prompt))


def cut_at_stop(tokens: list[int], stop_ids) -> list[int]:
    for i, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[:i + 1]
    return tokens


def references(model, requests) -> list[list[int]]:
    """What each request gives without the engine, through generate_many.

    Seeded sampling runs each request alone (its own generator).  Greedy requests run as
    left-padded batches of similar lengths to save time — tests/test_cache.py shows a
    left-padded batch gives each prompt exactly its tokens alone — for the longest cap of the
    batch, without stop ids; each row is then cut at its own cap and at its first stop id
    (greedy tokens before a stop do not depend on the stop).  A row is never cut by the
    window sliding before its cap: the window slides by the longest row, and a row within
    its cap still fits the context, so only padding leaves the window.
    """
    out: list[list[int] | None] = [None] * len(requests)
    greedy_rows = sorted((i for i, (_, sp) in enumerate(requests) if sp.greedy), key=lambda i: len(requests[i][0]))
    for start in range(0, len(greedy_rows), 32):
        rows = greedy_rows[start:start + 32]
        longest = max(cap(*requests[i]) for i in rows)
        batch = generate_many(model, [requests[i][0] for i in rows],
                              SamplingParams(temperature=0, max_new_tokens=longest))
        for i, tokens in zip(rows, batch):
            prompt, params = requests[i]
            out[i] = cut_at_stop(tokens[:cap(prompt, params)], params.stop_ids)
    for i, (prompt, params) in enumerate(requests):
        if not params.greedy:
            capped = SamplingParams(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                                    max_new_tokens=cap(prompt, params), seed=params.seed, stop_ids=params.stop_ids)
            out[i] = generate_many(model, [prompt], capped)[0]
    return out


def test_500_requests_under_memory_pressure():
    torch.manual_seed(0)
    cfg = get_config("course-tiny-llama").replace(vocab_size=VOCAB, context_length=CONTEXT, d_model=32, n_layers=2,
                                                  n_heads=4, n_kv_heads=2, head_dim=8, d_ff=48)
    model = Transformer(cfg).double().eval()
    rng = random.Random(2024)
    requests = make_requests(rng)
    # 24 blocks of 4 = 96 slots, 1.5 contexts, for up to 12 sequences: preemptions are certain.
    engine = Engine(model, block_size=4, num_blocks=24, max_num_seqs=12, max_num_batched_tokens=40)
    budget = 40

    ids: dict[str, int] = {}
    seqs = {}
    streamed: dict[str, list[int]] = {}
    finished: dict[str, list[int]] = {}
    aborted = []
    pending = list(enumerate(requests))
    steps = 0

    def step():
        nonlocal steps
        before = engine.stats()["computed_tokens"]
        outs = engine.step()
        steps += 1
        assert engine.stats()["computed_tokens"] - before <= budget
        assert len(engine.scheduler.running) <= 12
        engine.blocks.check_consistent(list(engine.requests.values()))
        for out in outs:
            if out.request_id not in ids:
                continue
            streamed.setdefault(out.request_id, []).extend(out.new_token_ids)
            assert out.token_ids == streamed[out.request_id]
            if out.finished:
                assert out.request_id not in finished
                finished[out.request_id] = out.token_ids
        assert steps < 8_000, "the engine stopped making progress"

    while pending or engine.has_unfinished_requests:
        for _ in range(rng.choice([0, 0, 1, 1, 2, 4])):  # requests keep arriving while others run
            if pending:
                index, (prompt, params) = pending.pop(0)
                rid = engine.add_request(prompt, params)
                ids[rid] = index
                seqs[rid] = engine.requests[rid]
        if rng.random() < 0.02:  # now and then a client goes away (an extra request, aborted at once or later)
            victim = engine.add_request(requests[rng.randrange(N_REQUESTS)][0],
                                        SamplingParams(temperature=0, max_new_tokens=30))
            for _ in range(rng.randint(0, 6)):
                step()
            if victim in engine.requests:
                free_before, held = engine.blocks.num_free, set(engine.requests[victim].block_table)
                engine.abort(victim)
                only_victim = [b for b in held if engine.blocks.ref_counts[b] == 0]
                assert engine.blocks.num_free == free_before + len(only_victim)
                engine.blocks.check_consistent(list(engine.requests.values()))
                aborted.append(victim)
        step()

    assert engine.is_idle_and_clean()
    assert engine.blocks.leaked_blocks() == [] and engine.blocks.num_free == engine.blocks.num_blocks
    assert all(engine.blocks.ref_counts[b] == 0 for b in range(engine.blocks.num_blocks))
    stats = engine.stats()
    assert stats["preemptions"] > 0 and stats["prefix_hit_tokens"] > 0, stats
    assert sum(s.num_preemptions > 0 for s in seqs.values()) >= 5
    assert sum(s.num_preemptions > 0 and s.prefix_hit_tokens > 0 for s in seqs.values()) >= 1
    assert len(finished) == N_REQUESTS

    assert len(aborted) > 0
    wanted = references(model, requests)
    mismatches = []
    for rid, index in ids.items():
        prompt, params = requests[index]
        seq = seqs[rid]
        got = finished[rid]
        assert seq.status is SequenceStatus.FINISHED and seq.block_table == []
        want = wanted[index]
        if got != want:
            mismatches.append((rid, len(prompt), params, seq.num_preemptions, seq.prefix_hit_tokens, got, want))
            continue
        if got[-1] in params.stop_ids:
            assert seq.finish_reason is FinishReason.STOP and got.index(got[-1]) == len(got) - 1
        else:
            assert seq.finish_reason is FinishReason.LENGTH
            assert len(got) == cap(prompt, params)
    assert not mismatches, f"{len(mismatches)} requests differ from running alone, first: {mismatches[0]}"
