"""The serving engine end to end: same tokens and logits as the plain generator, the known traps, bad input.

Token-for-token comparisons run the models in float64: the engine (paged cache, chunks,
prefix hits, batching) sums in another order than ``generate_many`` (contiguous cache,
one request), and float64 keeps those differences near 1e-15, so no near-tie in the
argmax of a random-weight model can flip a token.  Logits are compared in float32,
within 1e-4, against the plain model run on the whole sequence without any cache.
"""

from __future__ import annotations

import random

import pytest
import torch

from llmlab import Transformer, get_config
from llmlab.engine import (
    LLM,
    Engine,
    EngineError,
    FinishReason,
    RequestNotFoundError,
    Sequence,
    SequenceStatus,
)
from llmlab.engine.runner import sample_rows
from llmlab.errors import LlmlabError
from llmlab.generate import PromptError, generate_many
from llmlab.sampling import SamplingError, SamplingParams, make_generator, sample_next, top_p_filter

CONTEXT = 64
VOCAB = 97


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny matrices: one thread is ~30x faster than two fighting over a busy machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_config(name: str, context: int = CONTEXT, **extra):
    cfg = get_config(name, **extra)
    kv = 4 if cfg.n_kv_heads == cfg.n_heads else 2
    return cfg.replace(vocab_size=VOCAB, context_length=context, d_model=32, n_layers=2, n_heads=4,
                       n_kv_heads=kv, head_dim=8, d_ff=48)


VARIANTS = {
    "course-tiny": lambda: small_config("course-tiny"),  # MHA, learned positions, LayerNorm
    "course-tiny-llama": lambda: small_config("course-tiny-llama"),  # GQA, RoPE, RMSNorm
    "llama-qk-norm": lambda: small_config("course-tiny-llama", qk_norm=True),  # + QK-norm (Qwen3)
}
_MODELS: dict = {}


def model_for(variant: str, dtype=torch.float64, context: int = CONTEXT) -> Transformer:
    key = (variant, dtype, context)
    if key not in _MODELS:
        torch.manual_seed(0)
        cfg = VARIANTS[variant]().replace(context_length=context)
        _MODELS[key] = Transformer(cfg).to(dtype).eval()
    return _MODELS[key]


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_new_tokens=n, **kw)


def expected_length(prompt, params, context=CONTEXT) -> int:
    """Tokens the engine gives: max_new_tokens, or up to prompt + output = context + 1."""
    return min(params.max_new_tokens, context + 1 - len(prompt))


_REFS: dict = {}


def reference(model, prompt, params) -> list[int]:
    """``generate_many`` alone, capped where the engine stops (before the window would slide)."""
    context = model.config.context_length
    capped = SamplingParams(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                            max_new_tokens=expected_length(prompt, params, context), seed=params.seed,
                            stop_ids=params.stop_ids)
    key = (id(model), tuple(prompt), capped)
    if key not in _REFS:
        _REFS[key] = generate_many(model, [list(prompt)], capped)[0]
    return _REFS[key]


def run_all(engine: Engine, check=True) -> dict[str, list[int]]:
    """Step to the end, checking the blocks after every step; every finished request's tokens."""
    streamed: dict[str, list[int]] = {}
    done: dict[str, list[int]] = {}
    for _ in range(5000):  # far more steps than any test here needs: no progress is a failure, not a hang
        if not engine.has_unfinished_requests:
            break
        for out in engine.step():
            assert out.new_token_ids == out.token_ids[-1:]
            if out.request_id in streamed:  # (steps before this call are not seen here)
                streamed[out.request_id] += out.new_token_ids
                assert out.token_ids == streamed[out.request_id]
            else:
                streamed[out.request_id] = list(out.token_ids)
            if out.finished:
                done[out.request_id] = out.token_ids
        if check:
            engine.blocks.check_consistent(list(engine.requests.values()))
    assert not engine.has_unfinished_requests, "the engine stopped making progress"
    assert engine.is_idle_and_clean()
    return done


def prompts_with_shared_prefixes(seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    rand = lambda n: [rng.randrange(1, VOCAB) for _ in range(n)]  # noqa: E731
    base = rand(40)
    return [
        rand(1),
        rand(5),
        base[:16],  # a multiple of 1 and of 16
        base[:30] + rand(3),  # shares 30 tokens with the one below
        base[:35],  # 35: a multiple of 7
        rand(23),
        base[:14] + rand(2),  # 14: a multiple of 7; 16 tokens
        rand(60),  # 60 + 12 > 64: stops at the context
        base[:16],  # the same prompt again
    ]


# -- (1) same tokens as generate_many, same logits as the plain model -------------------------------


@pytest.mark.parametrize("block_size", [1, 16, 7])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_tokens_equal_generate_many(variant, block_size):
    model = model_for(variant)
    prompts = prompts_with_shared_prefixes()
    params = [greedy(12), greedy(9), greedy(12), greedy(6), greedy(12), greedy(3), greedy(12), greedy(12), greedy(5)]
    engine = Engine(model, block_size=block_size, max_num_batched_tokens=24)  # 60-token prompt: 3 chunks
    passes = []
    forward = engine.runner.forward
    engine.runner.forward = lambda items: passes.append(sorted(n for _, n in items)) or forward(items)
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts[:5], params[:5])]
    for _ in range(4):  # the rest arrive later, while the first ones run (prefix hits on registered blocks)
        engine.step()
    ids += [engine.add_request(p, sp) for p, sp in zip(prompts[5:], params[5:])]
    done = run_all(engine)
    for rid, prompt, sp in zip(ids, prompts, params):
        want = reference(model, prompt, sp)
        assert done[rid] == want, (rid, len(prompt))
        assert len(want) == expected_length(prompt, sp)
    assert engine.stats()["prefix_hit_tokens"] > 0
    assert engine.stats()["forward_passes"] == engine.stats()["steps"] == len(passes)  # one packed pass per step
    assert any(ns[0] == 1 and ns[-1] > 1 for ns in passes)  # some pass decoded and prefilled together


@pytest.mark.parametrize("block_size", [1, 7, 16])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_equal_the_plain_model(variant, block_size):
    model = model_for(variant, dtype=torch.float32)
    engine = Engine(model, block_size=block_size, max_num_batched_tokens=20)
    records = []
    forward = engine.runner.forward

    def recording(items):
        ends = {seq: seq.all_ids[:seq.num_computed + n] for seq, n in items}  # what each last logit follows
        finishing, logits = forward(items)
        records.extend(zip([ends[seq] for seq in finishing], logits))
        return finishing, logits

    engine.runner.forward = recording
    prompts = prompts_with_shared_prefixes(1)
    for p in prompts[:5]:
        engine.add_request(p, greedy(4))
    engine.step()
    for p in prompts[5:]:
        engine.add_request(p, greedy(4))
    run_all(engine)
    assert len(records) > 30
    worst = 0.0
    with torch.no_grad():
        for ids, got in records:
            want = model(torch.tensor([ids])).logits[0, -1]
            worst = max(worst, float((got - want).abs().max()))
    assert worst < 1e-4, worst


def test_a_step_is_packed_into_one_row_without_padding():
    model = model_for("course-tiny")
    engine = Engine(model, block_size=4, max_num_batched_tokens=40)
    rng = random.Random(2)
    for length in (3, 9, 5):
        engine.add_request([rng.randrange(1, VOCAB) for _ in range(length)], greedy(8))
    engine.step()
    engine.add_request([rng.randrange(1, VOCAB) for _ in range(60)], greedy(2))  # chunked: 40 - 3 decodes
    batches, computed, expected_slots = [], {}, {}
    pack = engine.runner.pack

    def packing(items):
        for seq, n in items:  # the state the pass starts from (the step then moves it on)
            computed[seq] = seq.num_computed
            expected_slots[seq] = [engine.blocks.slot_of(seq, p) for p in range(seq.num_computed, seq.num_computed + n)]
        batches.append(pack(items))
        return batches[-1]

    engine.runner.pack = packing
    engine.step()
    batch = batches[0]
    news = [n for _, n in batch.items]
    assert news == [37, 1, 1, 1]  # the prompt chunk first, then the decodes
    decoding = [computed[seq] for seq, _ in batch.items[1:]]
    assert decoding == sorted(decoding)  # shortest context first
    assert len(batch.ids) == len(batch.positions) == len(batch.slots) == sum(news)  # no padding
    assert [(span.start, span.n) for span in batch.spans] == [(0, 37), (37, 1), (38, 1), (39, 1)]
    assert batch.positions[:37] == list(range(37))
    assert batch.finishing == [seq for seq, _ in batch.items[1:]]  # the chunk is mid-prompt: no logits
    assert batch.last == [37, 38, 39]
    for (seq, n), span in zip(batch.items, batch.spans):
        assert span.context_len == computed[seq] + n
        assert batch.slots[span.start:span.start + n] == expected_slots[seq]


def test_a_packed_pass_may_hold_more_tokens_than_the_context():
    """Several prompts in one pass add up to more than context_length; each is still within it."""
    model = model_for("course-tiny", context=64)
    engine = Engine(model, block_size=8, max_num_batched_tokens=256)
    rng = random.Random(5)
    prompts = [[rng.randrange(1, VOCAB) for _ in range(50)] for _ in range(4)]  # 200 tokens in the first pass
    ids = [engine.add_request(p, greedy(6)) for p in prompts]
    done = run_all(engine)
    for rid, p in zip(ids, prompts):
        assert done[rid] == reference(model, p, greedy(6))


def test_long_prompt_is_chunked_beside_decoding_requests():
    model = model_for("course-tiny", context=320)
    engine = Engine(model, block_size=16, max_num_batched_tokens=64)
    rng = random.Random(3)
    short = [[rng.randrange(1, VOCAB) for _ in range(4)] for _ in range(3)]
    long = [rng.randrange(1, VOCAB) for _ in range(300)]
    ids = [engine.add_request(p, greedy(12)) for p in short]
    engine.step()
    long_id = engine.add_request(long, greedy(3))
    got: dict[str, list[int]] = {}
    for _ in range(5):  # 5 chunks of the long prompt; the short ones get a token in each
        outs = {o.request_id: o for o in engine.step()}
        assert set(ids) <= set(outs)
        for rid, o in outs.items():
            got[rid] = o.token_ids
    assert got[long_id] == reference(model, long, greedy(3))[:1]
    done = run_all(engine)
    for rid, p in zip(ids, short):
        assert done[rid] == reference(model, p, greedy(12))
    assert done[long_id] == reference(model, long, greedy(3))


# -- (2) the known traps ----------------------------------------------------------------------------


@pytest.mark.parametrize("block_size", [8, 1])
@pytest.mark.parametrize("variant", ["course-tiny", "course-tiny-llama"])
def test_prompt_entirely_from_the_prefix_cache(variant, block_size):
    model = model_for(variant)
    prompt = prompts_with_shared_prefixes()[2]  # 16 tokens: 2 blocks of 8, 16 blocks of 1
    params = greedy(10)
    want = reference(model, prompt, params)
    engine = Engine(model, block_size=block_size)
    engine.add_request(prompt, params, request_id="first")
    assert run_all(engine)["first"] == want
    before = engine.stats()["computed_tokens"]
    engine.add_request(prompt, params, request_id="again")
    out = engine.step()
    assert engine.stats()["computed_tokens"] - before == 1  # only the last token recomputed, for its logits
    assert [o.token_ids for o in out] == [want[:1]]
    seq = out[0].sequence
    assert seq.prefix_hit_tokens == 16 and seq.num_cached == 16
    assert run_all(engine)["again"] == want


def test_prompt_entirely_cached_while_its_first_owner_still_runs():
    model = model_for("course-tiny-llama")
    prompt = prompts_with_shared_prefixes()[2]
    engine = Engine(model, block_size=8)
    engine.add_request(prompt, greedy(20), request_id="owner")
    engine.step()
    engine.step()
    before = engine.stats()["computed_tokens"]
    engine.add_request(prompt, greedy(10), request_id="twin")
    engine.step()
    assert engine.stats()["computed_tokens"] - before == 2  # owner's decode + twin's last prompt token
    twin = engine.requests["twin"]
    assert twin.num_cached == 16
    owner_blocks = engine.requests["owner"].block_table[:2]
    assert twin.block_table[:2] == owner_blocks and all(engine.blocks.ref_counts[b] == 2 for b in owner_blocks)
    done = run_all(engine)
    assert done["owner"] == reference(model, prompt, greedy(20))
    assert done["twin"] == reference(model, prompt, greedy(10))


def test_preempted_sequence_with_prefix_hits_resumes_with_the_same_tokens():
    model = model_for("course-tiny-llama")
    rng = random.Random(5)
    shared = [rng.randrange(1, VOCAB) for _ in range(16)]
    # 8 blocks of 8 = one full context: the requests below cannot all keep growing.
    engine = Engine(model, block_size=8, num_blocks=8, max_num_batched_tokens=64)
    engine.add_request(shared + [3], greedy(1), request_id="warm")  # puts the shared prefix in the cache
    run_all(engine)
    prompts = {f"r{i}": shared + [rng.randrange(1, VOCAB) for _ in range(2 + i)] for i in range(3)}
    params = {rid: greedy(30) for rid in prompts}
    for rid, p in prompts.items():
        engine.add_request(p, params[rid], request_id=rid)
    engine.step()
    first_hits = {rid: seq.num_cached for rid, seq in engine.requests.items()}
    assert first_hits == {rid: 16 for rid in prompts}  # all admitted at once, each hit the 2 shared blocks
    seqs = dict(engine.requests)
    done = run_all(engine)
    preempted = [rid for rid, seq in seqs.items() if seq.num_preemptions > 0]
    assert preempted, "the pool was meant to run out"
    assert engine.num_preemptions >= len(preempted)
    for rid, p in prompts.items():
        assert done[rid] == reference(model, p, params[rid]), rid
        assert seqs[rid].finish_reason is FinishReason.LENGTH


@pytest.mark.parametrize("prefix_caching", [True, False])
@pytest.mark.parametrize("offset", [-1, 0, 1])
def test_re_prefill_at_a_block_boundary(offset, prefix_caching):
    """Preempt a sequence when prompt + output is 4 blocks + ``offset`` tokens; it resumes exactly."""
    model = model_for("course-tiny")
    block_size = 8
    prompt = prompts_with_shared_prefixes()[5][:13]
    params = greedy(30)
    engine = Engine(model, block_size=block_size, enable_prefix_caching=prefix_caching)
    rid = engine.add_request(prompt, params)
    seq = engine.requests[rid]
    for _ in range(40):
        if seq.num_tokens >= 4 * block_size + offset:
            break
        engine.step()
    assert seq.num_tokens == 32 + offset and seq.num_computed == seq.num_tokens - 1
    engine.scheduler._preempt(seq)  # what the scheduler does when the pool runs out
    assert seq.status is SequenceStatus.PREEMPTED and engine.blocks.num_free == engine.blocks.num_blocks
    computed = engine.stats()["computed_tokens"]
    engine.step()
    # Cached: every block full and computed before the preemption (the last token was not computed).
    hits = (32 + offset - 1) // block_size * block_size if prefix_caching else 0
    assert seq.num_cached == hits
    assert engine.stats()["computed_tokens"] - computed == 32 + offset - hits
    assert run_all(engine)[rid] == reference(model, prompt, params)


def test_re_prefill_entirely_from_the_cache_of_a_twin():
    """A preempted sequence whose prompt + output is all cached (a twin went ahead): 1 token recomputed."""
    model = model_for("course-tiny-llama")
    prompt = prompts_with_shared_prefixes()[5][:13]
    engine = Engine(model, block_size=8)
    ahead = engine.add_request(prompt, greedy(30))
    for _ in range(4):
        engine.step()
    behind = engine.add_request(prompt, greedy(25))
    seq = engine.requests[behind]
    for _ in range(40):
        if seq.num_tokens >= 24:  # 3 blocks, the last token not computed yet
            break
        engine.step()
    assert engine.requests[ahead].num_computed > 24  # the twin has cached block 2 (positions 16..23)
    assert seq.num_cached == 8  # its first admission hit the twin's first block
    engine.scheduler._preempt(seq)
    assert seq.num_cached == seq.num_computed == 0 and seq.block_table == []
    computed = engine.stats()["computed_tokens"]
    engine.step()
    assert seq.status is SequenceStatus.RUNNING and seq.num_cached == 24
    assert engine.stats()["computed_tokens"] - computed == 2  # the twin's decode + behind's last token
    assert seq.output_ids == reference(model, prompt, greedy(25))[:12]
    done = run_all(engine)
    assert done[ahead] == reference(model, prompt, greedy(30))
    assert done[behind] == reference(model, prompt, greedy(25))


def fake_sequences(params_list) -> list[Sequence]:
    return [Sequence(f"s{i}", [1], sp) for i, sp in enumerate(params_list)]


def test_top_p_keeps_the_token_that_crosses_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()[None]
    kept = top_p_filter(logits, 0.6)[0].isfinite().tolist()
    assert kept == [True, True, False, False]  # 0.5 < 0.6, 0.5 + 0.3 crosses it: the crossing token stays
    seen = []
    for seed in range(300):
        [seq] = fake_sequences([SamplingParams(temperature=1.0, top_p=0.6, seed=seed)])
        seen += sample_rows(logits, [seq])
    counts = [seen.count(t) for t in range(4)]
    assert counts[2] == counts[3] == 0
    assert 0.25 < counts[1] / 300 < 0.5, counts  # 0.3 / 0.8 = 0.375 after renormalising
    # A top_p the first token alone reaches keeps only it.
    [seq] = fake_sequences([SamplingParams(temperature=1.0, top_p=0.5, seed=0)])
    assert {sample_rows(logits, [seq])[0] for _ in range(50)} == {0}


def test_each_row_of_a_mixed_batch_samples_like_it_alone():
    gen = torch.Generator().manual_seed(0)
    params = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=0.7, seed=11),
        SamplingParams(temperature=1.3, top_k=3, seed=12),
        SamplingParams(temperature=1.0, top_p=0.5, seed=13),
        SamplingParams(temperature=0.9, top_k=10, top_p=0.8, seed=14),
        SamplingParams(temperature=2.0, seed=15),
    ]
    batched = fake_sequences(params)
    alone = [make_generator(sp.seed) for sp in params]
    got_rows = [[] for _ in params]
    want_rows = [[] for _ in params]
    for _ in range(40):
        logits = torch.randn(len(params), VOCAB, generator=gen) * 3
        for row, token in enumerate(sample_rows(logits, batched)):
            got_rows[row].append(token)
        for row, sp in enumerate(params):
            want_rows[row].append(int(sample_next(logits[row:row + 1], sp, alone[row])[0]))
        top3 = set(logits[2].topk(3).indices.tolist())
        assert got_rows[2][-1] in top3
        assert got_rows[0][-1] == int(logits[0].argmax())
    assert got_rows == want_rows
    assert len({tuple(r) for r in got_rows}) == len(params)


def test_seeded_request_gives_the_same_tokens_alone_and_in_a_crowd():
    model = model_for("course-tiny-llama")
    prompts = prompts_with_shared_prefixes(2)
    mine = SamplingParams(temperature=0.9, top_k=20, max_new_tokens=15, seed=5)
    alone = Engine(model, block_size=4)
    rid = alone.add_request(prompts[3], mine)
    got_alone = run_all(alone)[rid]
    assert got_alone == reference(model, prompts[3], mine)

    crowd = Engine(model, block_size=4, max_num_batched_tokens=16)
    crowd.add_request(prompts[0], SamplingParams(temperature=1.0, max_new_tokens=20))  # unseeded: global generator
    crowd.step()
    crowd.add_request(prompts[1], SamplingParams(temperature=0.9, top_k=20, max_new_tokens=15, seed=6))
    me = crowd.add_request(prompts[3], mine)
    twin = crowd.add_request(prompts[3], SamplingParams(temperature=0.9, top_k=20, max_new_tokens=15, seed=5))
    crowd.add_request(prompts[4], greedy(15))
    done = run_all(crowd)
    assert done[me] == got_alone
    assert done[twin] == got_alone  # same prompt, same seed, its own generator (and prefix hits)


def test_abort_frees_blocks_at_once():
    model = model_for("course-tiny")
    prompts = prompts_with_shared_prefixes()
    engine = Engine(model, block_size=4)
    a = engine.add_request(prompts[3], greedy(20))  # 33 tokens, shares 30 with b
    engine.step()
    b = engine.add_request(prompts[4], greedy(20))  # hits a's first 7 blocks
    third = engine.add_request(prompts[5], greedy(20))
    for _ in range(2):
        engine.step()
    seq_a, seq_b = engine.requests[a], engine.requests[b]
    shared = [blk for blk in seq_a.block_table if blk in seq_b.block_table]
    own = [blk for blk in seq_a.block_table if blk not in seq_b.block_table]
    assert shared and own
    free_before = engine.blocks.num_free
    aborted = engine.abort(a)
    assert aborted is seq_a and aborted.finish_reason is FinishReason.ABORT
    assert aborted.status is SequenceStatus.FINISHED
    assert engine.blocks.num_free == free_before + len(own)
    assert all(engine.blocks.ref_counts[blk] == 0 for blk in own)
    assert all(engine.blocks.ref_counts[blk] == 1 for blk in shared)  # b still reads them
    assert a not in engine.requests
    assert seq_a not in engine.scheduler.running
    engine.blocks.check_consistent(list(engine.requests.values()))
    with pytest.raises(RequestNotFoundError):
        engine.abort(a)
    done = run_all(engine)
    assert done[b] == reference(model, prompts[4], greedy(20))
    assert done[third] == reference(model, prompts[5], greedy(20))


def test_abort_a_waiting_request():
    model = model_for("course-tiny")
    engine = Engine(model, block_size=4, max_num_seqs=1)
    first = engine.add_request([1, 2, 3], greedy(5))
    second = engine.add_request([4, 5, 6], greedy(5))
    engine.step()
    assert engine.requests[second].status is SequenceStatus.WAITING
    engine.abort(second)
    assert list(engine.scheduler.waiting) == []
    assert run_all(engine)[first] == reference(model, [1, 2, 3], greedy(5))


def test_closing_a_stream_early_frees_its_blocks_at_once():
    model = model_for("course-tiny-llama")
    prompts = prompts_with_shared_prefixes()
    engine = Engine(model, block_size=4)
    other = engine.add_request(prompts[5], greedy(30))
    stream = engine.stream(prompts[3], greedy(30))
    tokens = [next(stream) for _ in range(3)]
    assert tokens == reference(model, prompts[3], greedy(30))[:3]
    [mine] = [seq for rid, seq in engine.requests.items() if rid != other]
    assert mine.block_table
    other_blocks = len(engine.requests[other].block_table)
    stream.close()
    assert mine.request_id not in engine.requests and mine.finish_reason is FinishReason.ABORT
    assert engine.blocks.num_free == engine.blocks.num_blocks - other_blocks
    engine.blocks.check_consistent(list(engine.requests.values()))
    assert run_all(engine)[other] == reference(model, prompts[5], greedy(30))


def test_aborting_a_streamed_request_ends_its_stream():
    model = model_for("course-tiny")
    engine = Engine(model, block_size=4)
    stream = engine.stream([1, 2, 3], greedy(30))
    assert next(stream) == reference(model, [1, 2, 3], greedy(30))[0]
    [rid] = list(engine.requests)
    engine.abort(rid)  # e.g. a timeout elsewhere in the server
    assert engine.is_idle_and_clean()
    step, calls = engine.step, []

    def guarded_step():
        calls.append(1)
        if len(calls) > 100:  # (without this guard the stream would spin forever)
            raise AssertionError("stream() keeps stepping an idle engine for a request that was aborted")
        return step()

    engine.step = guarded_step
    assert list(stream) == []  # the stream ends: its request is gone
    assert engine.is_idle_and_clean()


def test_a_full_stream_yields_the_reference_tokens_beside_other_requests():
    model = model_for("course-tiny")
    prompts = prompts_with_shared_prefixes()
    engine = Engine(model, block_size=7)
    other = engine.add_request(prompts[1], greedy(40))
    assert list(engine.stream(prompts[6], greedy(10))) == reference(model, prompts[6], greedy(10))
    assert other in engine.requests  # still running
    assert run_all(engine)[other] == reference(model, prompts[1], greedy(40))


def test_stop_id_ends_a_request_and_is_included():
    model = model_for("course-tiny")
    prompt = prompts_with_shared_prefixes()[5]
    full = reference(model, prompt, greedy(12))
    stop = full[4]
    first = full.index(stop)
    engine = Engine(model, block_size=4)
    rid = engine.add_request(prompt, greedy(12, stop_ids=(stop,)))
    outs = []
    for _ in range(100):
        if not engine.has_unfinished_requests:
            break
        outs += engine.step()
    assert outs[-1].token_ids == full[: first + 1]
    assert outs[-1].finish_reason is FinishReason.STOP and outs[-1].request_id == rid
    assert engine.is_idle_and_clean()


def test_a_prompt_of_the_whole_context_gets_one_token():
    model = model_for("course-tiny")
    prompt = [(5 * i) % VOCAB for i in range(CONTEXT)]
    engine = Engine(model, block_size=16)
    rid = engine.add_request(prompt, greedy(10))
    outs = []
    for _ in range(100):
        if not engine.has_unfinished_requests:
            break
        outs += engine.step()
    assert outs[-1].finish_reason is FinishReason.LENGTH
    assert outs[-1].token_ids == reference(model, prompt, greedy(1)) and outs[-1].request_id == rid


# -- (3) bad input ------------------------------------------------------------------------------------


def test_prompt_longer_than_the_context_is_refused_and_others_complete():
    model = model_for("course-tiny")
    engine = Engine(model, block_size=8)
    a = engine.add_request([1, 2, 3], greedy(6))
    engine.step()
    with pytest.raises(PromptError) as err:
        engine.add_request(list(range(1, CONTEXT + 2)), greedy(6))
    assert isinstance(err.value, LlmlabError)
    with pytest.raises(PromptError):
        engine.add_request([], greedy(6))
    with pytest.raises(PromptError):
        engine.add_request("ROMEO:", greedy(6))
    b = engine.add_request([4, 5], greedy(6))
    assert set(engine.requests) == {a, b}
    done = run_all(engine)
    assert done == {a: reference(model, [1, 2, 3], greedy(6)), b: reference(model, [4, 5], greedy(6))}


@pytest.mark.parametrize("options", [
    dict(block_size=16, num_blocks=3),  # a context of 64 needs 4 blocks of 16
    dict(block_size=1, num_blocks=63),
    dict(block_size=0),
    dict(num_blocks=0),
    dict(max_num_seqs=0),
    dict(max_num_batched_tokens=0),
    dict(block_size=2.5),
    dict(kv_cache_bytes=10),  # holds no block at all
])
def test_engine_settings_that_cannot_work(options):
    with pytest.raises(EngineError) as err:
        Engine(model_for("course-tiny"), **options)
    assert isinstance(err.value, LlmlabError)


def test_a_pool_that_just_holds_one_context_is_accepted():
    model = model_for("course-tiny")
    engine = Engine(model, block_size=16, num_blocks=4)
    rid = engine.add_request(list(range(1, 40)), greedy(40))
    assert run_all(engine)[rid] == reference(model, list(range(1, 40)), greedy(40))


@pytest.mark.parametrize("bad", [[1, VOCAB, 3], [1, -1, 3]])
def test_token_ids_outside_the_vocabulary_are_refused_at_add_request(bad):
    # add_request promises "everything is checked here, before the request touches any state".
    model = model_for("course-tiny")
    engine = Engine(model, block_size=4)
    good = engine.add_request([1, 2, 3], greedy(5))
    with pytest.raises(LlmlabError):
        engine.add_request(bad, greedy(5))
    assert list(engine.requests) == [good]
    assert run_all(engine)[good] == reference(model, [1, 2, 3], greedy(5))


def test_not_a_model_is_refused():
    with pytest.raises(EngineError):
        Engine(torch.nn.Linear(2, 2))


def test_bad_params_and_request_ids_are_refused_at_add_request():
    engine = Engine(model_for("course-tiny"), block_size=8)
    for bad in ({"temperature": 0}, "greedy", 0.5):
        with pytest.raises(EngineError) as err:
            engine.add_request([1, 2], bad)
        assert isinstance(err.value, LlmlabError)
    for kwargs in (dict(temperature=-1), dict(top_p=0.0), dict(top_k=0), dict(max_new_tokens=0),
                   dict(seed=-3), dict(stop_ids="a")):
        with pytest.raises(SamplingError) as err:
            engine.add_request([1, 2], SamplingParams(**kwargs))
        assert isinstance(err.value, LlmlabError)
    engine.add_request([1, 2], greedy(3), request_id="mine")
    with pytest.raises(EngineError, match="already"):
        engine.add_request([3, 4], greedy(3), request_id="mine")
    for bad_id in ("", 7):
        with pytest.raises(EngineError):
            engine.add_request([3, 4], greedy(3), request_id=bad_id)
    assert list(engine.requests) == ["mine"] and len(engine.scheduler.waiting) == 1
    done = run_all(engine)
    assert list(done) == ["mine"]
    again = engine.add_request([1, 2], greedy(3), request_id="mine")  # a finished id may be used again
    assert run_all(engine)[again] == done["mine"]


def test_unknown_request_id_to_abort():
    engine = Engine(model_for("course-tiny"), block_size=8)
    for bad in ("nope", None, 3):
        with pytest.raises(RequestNotFoundError) as err:
            engine.abort(bad)
        assert isinstance(err.value, LlmlabError) and isinstance(err.value, EngineError)
    rid = engine.add_request([1], greedy(2))
    run_all(engine)
    with pytest.raises(RequestNotFoundError):
        engine.abort(rid)  # finished


# -- (4) LLM ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    import warnings

    from llmlab.tokenizer import BPETokenizer, VocabSizeWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", VocabSizeWarning)  # a small text: fewer ids than asked, fine here
        return BPETokenizer.train("to be or not to be, that is the question " * 20, 300)


def test_llm_returns_completions_in_prompt_order(tok):
    torch.manual_seed(1)
    cfg = get_config("course-tiny").replace(vocab_size=tok.vocab_size, context_length=CONTEXT, d_model=32,
                                            n_layers=2, n_heads=4, d_ff=48)
    model = Transformer(cfg).double().eval()
    llm = LLM(model=model, tokenizer=tok, block_size=4, max_num_batched_tokens=8)
    prompts = ["to be or not to be, that is", "the", "question"]
    params = [greedy(14), greedy(2), greedy(7)]  # the first prompt finishes last
    got = llm.generate(prompts, params, progress=False)
    assert len(got) == 3
    for completion, text, sp in zip(got, prompts, params):
        ids = tok.encode(text)
        want = generate_many(model, [ids], sp)[0]
        assert completion.prompt_ids == ids
        assert completion.token_ids == want
        assert completion.text == tok.decode(want)
        assert completion.finish_reason is FinishReason.LENGTH
    assert llm.engine.is_idle_and_clean()
    # a stop id ends the text before it
    stop = got[2].token_ids[2]
    [c] = llm.generate(["question"], greedy(7, stop_ids=(stop,)), progress=False)
    cut = got[2].token_ids.index(stop)
    assert c.token_ids == got[2].token_ids[:cut + 1] and c.text == tok.decode(got[2].token_ids[:cut])
    assert c.finish_reason is FinishReason.STOP
    with pytest.raises(EngineError):
        llm.generate("to be", progress=False)
    with pytest.raises(EngineError):
        llm.generate(["a", "b"], [greedy(2)], progress=False)
    with pytest.raises(PromptError):
        llm.generate(["a", "x" * 400], greedy(2), progress=False)
    assert llm.engine.is_idle_and_clean() and not llm.engine.requests  # nothing queued by a refused batch


def test_llm_default_params_with_a_tokenizer_without_end_of_text():
    import warnings

    from llmlab.tokenizer import BPETokenizer, VocabSizeWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", VocabSizeWarning)
        plain = BPETokenizer.train("to be or not to be " * 20, 270, special_tokens=())
    torch.manual_seed(2)
    cfg = get_config("course-tiny").replace(vocab_size=plain.vocab_size, context_length=CONTEXT, d_model=32,
                                            n_layers=2, n_heads=4, d_ff=48)
    llm = LLM(model=Transformer(cfg).eval(), tokenizer=plain, block_size=8)
    [completion] = llm.generate(["to be"], progress=False)  # default params: no stop id to add
    assert len(completion.token_ids) == min(200, CONTEXT + 1 - len(plain.encode("to be")))
    assert completion.finish_reason is FinishReason.LENGTH


def test_llm_with_token_ids_and_no_tokenizer():
    model = model_for("course-tiny")
    llm = LLM(model=model, block_size=8)
    prompts = [[5, 6, 7], [8]]
    got = llm.generate(prompts, greedy(4), progress=False)
    assert [c.token_ids for c in got] == [reference(model, p, greedy(4)) for p in prompts]
    assert all(c.text is None for c in got)
    with pytest.raises(EngineError):
        llm.generate(["text needs a tokenizer"], greedy(4), progress=False)
    with pytest.raises(EngineError):
        LLM(model=model, checkpoint="somewhere")


def test_llm_with_the_built_in_checkpoint():
    llm = LLM()
    params = SamplingParams(temperature=0, max_new_tokens=8)
    [completion] = llm.generate(["ROMEO:"], params, progress=False)
    ids = llm.tokenizer.encode("ROMEO:")
    assert completion.prompt_ids == ids
    assert completion.token_ids == generate_many(llm.engine.model, [ids], params)[0]
    assert len(completion.token_ids) == 8 and completion.finish_reason is FinishReason.LENGTH
    assert completion.text == llm.tokenizer.decode(completion.token_ids) and completion.text.strip()
    assert completion.ttft is not None and completion.ttft >= 0 and completion.tpot is not None


def test_stream_queues_and_checks_its_request_when_called():
    engine = Engine(model_for("course-tiny"), block_size=8)
    with pytest.raises(PromptError):
        engine.stream([], greedy(3))  # refused at the call, not at the first next()
    tokens = engine.stream([1, 2, 3], greedy(3))
    assert len(engine.requests) == 1  # queued before anything is read
    assert list(tokens) == reference(engine.model, [1, 2, 3], greedy(3))
