"""The engine's parts on their own: blocks and the prefix cache, the paged cache, the scheduler.

No model runs here: the block manager and the scheduler are plain bookkeeping, so
"computing" a scheduled step is simulated (``num_computed`` moves on, a token is
appended when a sequence reaches its end), and the paged cache is fed random tensors.
"""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
import torch.nn.functional as F

from llmlab.engine import (
    BlockManager,
    NoFreeBlocksError,
    PagedKVCache,
    PagedStep,
    Scheduler,
    SchedulerConfig,
    Sequence,
    SequenceStatus,
    Span,
    block_hash,
    paged_attention_reference,
)
from llmlab.config import get_config
from llmlab.engine.block_manager import ROOT_HASH
from llmlab.engine.paged_cache import group_by_length
from llmlab.errors import LlmlabError
from llmlab.layers.attention import CausalSelfAttention, causal_mask, scaled_dot_product_attention_reference
from llmlab.sampling import SamplingParams


def make_seq(ids, rid="r", max_new_tokens=1000) -> Sequence:
    return Sequence(rid, list(ids), SamplingParams(temperature=0, max_new_tokens=max_new_tokens))


def compute_all(bm: BlockManager, seq: Sequence) -> None:
    """Allocate and "compute" every token of ``seq`` (as a step does), then offer its full blocks."""
    bm.append_slots(seq, seq.num_to_compute)
    seq.num_computed = seq.num_tokens
    bm.register_full_blocks(seq)


# -- BlockManager: allocation, reference counts ----------------------------------------------------


def test_allocate_append_free_reference_counts():
    bm = BlockManager(8, 4)
    a = make_seq(range(10))
    assert bm.blocks_needed(a, 10) == 3
    bm.append_slots(a, 10)
    assert a.block_table == [0, 1, 2]
    assert [bm.ref_counts[b] for b in range(8)] == [1, 1, 1, 0, 0, 0, 0, 0]
    assert bm.num_free == 5
    a.num_computed = 10
    assert bm.blocks_needed(a, 2) == 0  # positions 10, 11 still fit block 2
    assert bm.blocks_needed(a, 3) == 1  # position 12 opens a 4th block
    bm.append_slots(a, 3)
    assert len(a.block_table) == 4 and bm.num_free == 4
    bm.check_consistent([a])
    bm.free(a)
    assert bm.ref_counts == [0] * 8 and bm.num_free == 8
    assert a.block_table == [] and a.num_computed == 0
    assert bm.leaked_blocks() == []
    bm.check_consistent([])


def test_allocation_that_does_not_fit_changes_nothing():
    bm = BlockManager(4, 4)
    a = make_seq(range(9))
    bm.append_slots(a, 9)  # 3 blocks
    b = make_seq(range(100, 108), "b")
    assert not bm.can_append(b, 8)
    with pytest.raises(NoFreeBlocksError) as err:
        bm.append_slots(b, 8)
    assert isinstance(err.value, LlmlabError)
    assert b.block_table == [] and bm.num_free == 1  # no half allocation
    bm.check_consistent([a, b])
    with pytest.raises(NoFreeBlocksError):  # a sequence that already holds blocks cannot be given a prefix
        bm.allocate_prefix(a)


def test_blocks_without_hash_are_reused_before_cached_ones():
    bm = BlockManager(6, 2)
    a = make_seq([1, 2, 3, 4, 5], "a")  # blocks 0, 1 full (cached), block 2 half full (no hash)
    compute_all(bm, a)
    b = make_seq([7, 8, 9], "b")  # block 3 full (cached), block 4 no hash
    compute_all(bm, b)
    assert a.block_table == [0, 1, 2] and b.block_table == [3, 4]
    assert bm.num_cached_blocks == 3
    bm.free(a)
    bm.free(b)
    # No-hash blocks first (the last freed first), then the cached ones, least recently freed first,
    # and of one sequence its last block first.
    assert list(bm.free_blocks) == [4, 2, 5, 1, 0, 3]
    hashed = [bm.hash_of[blk] is not None for blk in bm.free_blocks]
    assert hashed == sorted(hashed)  # every block without a hash precedes every cached one
    c = make_seq([50, 51, 52, 53, 54, 55], "c")
    bm.append_slots(c, 6)  # 3 blocks: all the unhashed ones, no cached content lost
    assert c.block_table == [4, 2, 5]
    assert bm.num_cached_blocks == 3
    d = make_seq([60, 61], "d")
    bm.append_slots(d, 2)  # evicts a's last full block (block 1), not its first
    assert d.block_table == [1]
    assert bm.num_cached_blocks == 2 and bm.hash_of[1] is None and bm.hash_of[0] is not None
    again = make_seq([1, 2, 3, 4, 5], "a2")
    assert bm.allocate_prefix(again) == 2  # only a's first block is left
    assert again.block_table == [0]
    bm.check_consistent([c, d, again])


def test_cached_blocks_are_evicted_least_recently_used_first():
    bm = BlockManager(4, 2)
    a = make_seq([1, 2], "a")
    b = make_seq([3, 4], "b")
    compute_all(bm, a)
    compute_all(bm, b)
    a_blk, b_blk = a.block_table[0], b.block_table[0]
    bm.free(a)
    bm.free(b)
    assert list(bm.free_blocks) == [2, 3, a_blk, b_blk]  # unhashed first, then a's (freed first), then b's
    # A hit makes a's block the most recently used: b's goes first now.
    a2 = make_seq([1, 2, 9], "a2")
    assert bm.allocate_prefix(a2) == 2 and a2.block_table == [a_blk]
    bm.free(a2)
    assert list(bm.free_blocks)[-2:] == [b_blk, a_blk]
    fresh = make_seq(range(20, 26), "fresh")
    bm.append_slots(fresh, 6)  # 2 unhashed blocks, then the LRU cached block: b's
    assert fresh.block_table[-1] == b_blk
    assert bm.allocate_prefix(make_seq([3, 4, 5], "b2")) == 0
    assert bm.allocate_prefix(make_seq([1, 2, 5], "a3")) == 2


def test_last_block_of_a_freed_sequence_is_evicted_first():
    bm = BlockManager(3, 2)
    a = make_seq([1, 2, 3, 4, 5, 6], "a")
    compute_all(bm, a)
    assert bm.num_cached_blocks == 3
    table = list(a.block_table)
    bm.free(a)
    assert list(bm.free_blocks) == table[::-1]
    x = make_seq([9, 9], "x")
    bm.append_slots(x, 2)
    assert x.block_table == [table[2]]  # a's last block: the other two still serve a's prefix
    bm.free(x)
    assert bm.allocate_prefix(make_seq([1, 2, 3, 4, 5, 6, 7], "a2")) == 4


@settings(max_examples=80, deadline=None)
@given(st.data())
def test_random_traffic_keeps_counts_consistent_and_cached_content_right(data):
    """Random admissions, growth, preemptions and frees over a small pool.

    A fake pool records what each slot's K/V would be computed from (the token there and every
    token before it): every prefix hit must find exactly this sequence's tokens up to that slot.
    """
    block_size = data.draw(st.integers(1, 4), label="block_size")
    bm = BlockManager(data.draw(st.integers(3, 10), label="num_blocks"), block_size)
    pool: dict[int, tuple[int, ...]] = {}
    live: list[Sequence] = []
    token = st.integers(0, 2)  # a tiny alphabet: prefixes are shared often

    def compute(seq: Sequence, n: int) -> None:
        for p in range(seq.num_computed, seq.num_computed + n):
            slot = bm.slot_of(seq, p)
            if slot >= 0:
                pool[slot] = tuple(seq.all_ids[:p + 1])
        seq.num_computed += n
        bm.register_full_blocks(seq)

    for i in range(data.draw(st.integers(1, 30), label="operations")):
        op = data.draw(st.sampled_from(["add", "add", "grow", "grow", "free"]))
        if op == "add":
            seq = make_seq(data.draw(st.lists(token, min_size=1, max_size=3 * block_size + 1)), f"s{i}")
            bm.allocate_prefix(seq)
            for p in range(seq.num_cached):  # every hit slot holds this sequence's prefix
                slot = seq.block_table[p // block_size] * block_size + p % block_size
                assert pool.get(slot) == tuple(seq.all_ids[:p + 1])
            n = seq.num_to_compute
            if bm.can_append(seq, n):
                bm.append_slots(seq, n)
                compute(seq, n)
                live.append(seq)
            else:
                bm.free(seq)
        elif live:
            seq = data.draw(st.sampled_from(live))
            grew = False
            if op == "grow":
                seq.output_ids.append(data.draw(token))
                grew = bm.can_append(seq, 1)
                if grew:
                    bm.append_slots(seq, 1)
                    compute(seq, 1)
            if not grew:  # a finish, or a preemption when the pool is full
                bm.free(seq)
                live.remove(seq)
        bm.check_consistent(live)
    for seq in live:
        bm.free(seq)
    assert bm.leaked_blocks() == [] and bm.num_free == bm.num_blocks


# -- the prefix hash chain ---------------------------------------------------------------------


def test_block_hash_chains_the_parent():
    first = block_hash(ROOT_HASH, [1, 2])
    assert block_hash(ROOT_HASH, [1, 2]) == first  # a name, not a random id
    other_parent = block_hash(ROOT_HASH, [5, 6])
    assert block_hash(first, [3, 4]) != block_hash(other_parent, [3, 4])
    assert block_hash(ROOT_HASH, [1, 23]) != block_hash(ROOT_HASH, [12, 3])  # token boundaries count
    assert block_hash(ROOT_HASH, [3, 4]) != block_hash(first, [3, 4])


def test_same_block_tokens_after_a_different_prefix_are_no_hit():
    bm = BlockManager(8, 2)
    a = make_seq([1, 2, 3, 4, 5], "a")
    compute_all(bm, a)
    b = make_seq([7, 8, 3, 4, 5], "b")  # its second block holds a's second block's tokens
    assert bm.allocate_prefix(b) == 0
    assert b.block_table == [] and b.num_computed == 0
    assert b.block_hashes[1] != a.block_hashes[1]
    c = make_seq([1, 2, 3, 9, 9], "c")  # same first block, different second
    assert bm.allocate_prefix(c) == 2
    assert c.block_table == a.block_table[:1]


# -- allocate_prefix, register_full_blocks, slot_of -------------------------------------------------


def test_allocate_prefix_counts_hits_and_caps_at_the_last_token():
    bm = BlockManager(12, 4)
    a = make_seq(range(12), "a")
    compute_all(bm, a)
    assert bm.num_cached_blocks == 3
    bm.free(a)

    partial = make_seq(list(range(8)) + [50, 51], "partial")
    assert bm.allocate_prefix(partial) == 8
    assert partial.num_computed == 8 and partial.num_cached == 8 and partial.num_to_compute == 2
    assert partial.block_table == [0, 1]
    assert bm.ref_counts[0] == bm.ref_counts[1] == 1
    bm.count_admission(partial)
    assert partial.prefix_hit_tokens == 8 and bm.hit_tokens == 8 and bm.query_tokens == 10

    whole = make_seq(range(12), "whole")  # entirely cached: the last token still runs, for its logits
    assert bm.allocate_prefix(whole) == 12
    assert whole.num_cached == 12 and whole.num_computed == 11 and whole.num_to_compute == 1
    assert whole.block_table == [0, 1, 2]
    assert bm.ref_counts[0] == bm.ref_counts[1] == 2 and bm.ref_counts[2] == 1
    assert bm.blocks_needed(whole, 1) == 0
    assert bm.slot_of(whole, 11) == -1  # its K/V are cached: never written again
    assert bm.slot_of(whole, 0) == -1

    longer = make_seq(list(range(12)) + [99], "longer")
    assert bm.allocate_prefix(longer) == 12
    assert longer.num_computed == 12 and longer.num_to_compute == 1
    bm.append_slots(longer, 1)
    new_block = longer.block_table[3]
    assert bm.ref_counts[new_block] == 1 and new_block not in (0, 1, 2)
    assert bm.slot_of(longer, 12) == new_block * 4
    bm.check_consistent([partial, whole, longer])
    bm.free(whole)  # (as a preemption does) nothing of it is cached for it any more
    assert whole.num_cached == whole.num_computed == whole.num_registered_blocks == 0 and whole.block_table == []
    assert bm.ref_counts[0] == bm.ref_counts[1] == 2 and bm.ref_counts[2] == 1  # the others still hold theirs


def test_prefix_caching_off_never_hits():
    bm = BlockManager(8, 2, enable_prefix_caching=False)
    a = make_seq([1, 2, 3, 4], "a")
    compute_all(bm, a)
    assert bm.num_cached_blocks == 0
    bm.free(a)
    b = make_seq([1, 2, 3, 4], "b")
    assert bm.allocate_prefix(b) == 0 and b.num_computed == 0


def test_register_full_blocks_only_computed_full_blocks():
    bm = BlockManager(8, 4)
    a = make_seq(range(10), "a")
    bm.append_slots(a, 6)  # a chunk of 6 tokens: block 0 full, block 1 half
    a.num_computed = 6
    bm.register_full_blocks(a)
    assert bm.num_cached_blocks == 1 and a.num_registered_blocks == 1
    assert bm.hash_of[a.block_table[0]] == a.block_hashes[0] and bm.hash_of[a.block_table[1]] is None
    bm.append_slots(a, 4)
    a.num_computed = 10
    bm.register_full_blocks(a)
    assert bm.num_cached_blocks == 2 and a.num_registered_blocks == 2
    assert bm.hash_of[a.block_table[2]] is None  # 2 of 4 slots: never cached
    # The same tokens computed again elsewhere (no prefix lookup) do not replace the cached blocks.
    b = make_seq(range(10), "b")
    compute_all(bm, b)
    assert bm.num_cached_blocks == 2
    assert all(bm.hash_of[blk] is None for blk in b.block_table)
    assert set(bm.cached.values()) == set(a.block_table[:2])
    bm.check_consistent([a, b])


def test_slot_of_maps_positions_through_the_block_table():
    bm = BlockManager(8, 4)
    s = make_seq(range(7))
    s.block_table = [5, 2]
    assert [bm.slot_of(s, p) for p in range(7)] == [20, 21, 22, 23, 8, 9, 10]
    s.num_cached = 4
    assert [bm.slot_of(s, p) for p in range(7)] == [-1, -1, -1, -1, 8, 9, 10]


# -- the paged cache --------------------------------------------------------------------------


def test_gather_index_right_aligns_and_pads_with_the_null_slot():
    cache = PagedKVCache(n_layers=1, num_blocks=4, block_size=2, n_kv_heads=1, head_dim=2)
    null = cache.null_block * cache.block_size
    assert null == 8 and cache.keys[0].shape == (10, 1, 2)
    tables = torch.tensor([[3, 1, 4], [0, 2, 1]])
    lengths = torch.tensor([3, 5])
    got = cache.gather_index(tables, lengths, width=6)
    assert got.tolist() == [
        [null, null, null, 6, 7, 2],  # positions 0, 1 in block 3; position 2 in block 1
        [null, 0, 1, 4, 5, 2],
    ]


def test_paged_step_writes_skip_minus_one_slots_and_reads_through_the_gather():
    cache = PagedKVCache(n_layers=2, num_blocks=3, block_size=2, n_kv_heads=1, head_dim=2)
    k = torch.arange(1.0, 9.0).view(1, 1, 4, 2)  # one packed row: [1, kv_heads, N, head_dim]
    v = -k
    step = cache.step(torch.tensor([-1, 3, 5, -1]), [])
    step.write(1, k, v)
    pool = cache.keys[1][:, 0]
    written = {3: k[0, 0, 1], 5: k[0, 0, 2]}
    for slot in range(pool.shape[0]):
        expected = written.get(slot, torch.zeros(2))
        assert torch.equal(pool[slot], expected), slot
    assert torch.equal(cache.values[1][3, 0], -k[0, 0, 1])
    assert torch.count_nonzero(cache.keys[0]) == 0  # another layer untouched
    keys, values = step.read(1, torch.tensor([[2, 3], [5, 6]]))  # 6 is the null slot
    assert keys.shape == (2, 1, 2, 2)
    assert torch.equal(keys[0, 0], torch.stack([torch.zeros(2), k[0, 0, 1]]))
    assert torch.equal(keys[1, 0], torch.stack([k[0, 0, 2], torch.zeros(2)]))
    assert torch.equal(values[1, 0, 0], -k[0, 0, 2])


def test_paged_step_reads_into_one_reused_buffer():
    cache = PagedKVCache(n_layers=2, num_blocks=8, block_size=4, n_kv_heads=2, head_dim=4)
    step = cache.step(torch.tensor([], dtype=torch.long), [])
    first = step.read(0, torch.arange(12).view(3, 4))[0].data_ptr()
    assert step.read(1, torch.arange(8).view(2, 4))[0].data_ptr() == first  # smaller: same memory
    assert cache.scratch(30).shape == (30, 2, 2, 4)  # larger: grown once, then kept
    assert cache.scratch(20).data_ptr() == cache.scratch(30).data_ptr()


@pytest.mark.parametrize("group_cost", [0, 3, 10**6])  # one group per decode row, a few, one for all
@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_paged_step_attention_equals_each_sequence_alone(n_kv_heads, group_cost):
    """A packed pass — a fresh prompt, a chunk after cached tokens, three decodes — equals per-sequence attention."""
    gen = torch.Generator().manual_seed(n_kv_heads)
    n_heads, head_dim, block_size = 4, 8, 4
    cache = PagedKVCache(1, 16, block_size, n_kv_heads, head_dim)
    cache.keys[0].copy_(torch.randn(cache.keys[0].shape, generator=gen))  # the null block too: only masks hide it
    cache.values[0].copy_(torch.randn(cache.values[0].shape, generator=gen))
    # (new tokens, tokens already cached, block table)
    plan = [(6, 0, [3, 9]), (5, 7, [0, 12, 5]), (1, 10, [8, 1, 14]), (1, 1, [2]), (1, 4, [6, 11])]
    spans, slots, start = [], [], 0
    for n, cached, table in plan:
        spans.append(Span(start, n, cached + n, table))
        slots += [table[p // block_size] * block_size + p % block_size for p in range(cached, cached + n)]
        start += n
    q = torch.randn(1, n_heads, start, head_dim, generator=gen)
    k = torch.randn(1, n_kv_heads, start, head_dim, generator=gen)
    v = torch.randn(1, n_kv_heads, start, head_dim, generator=gen)
    attention = CausalSelfAttention(get_config("course-tiny", n_heads=n_heads, n_kv_heads=n_kv_heads,
                                               d_model=n_heads * head_dim))
    step = PagedStep(cache, torch.tensor(slots), spans, group_cost_slots=group_cost)
    assert len(step.decode_groups) == {0: 3, 3: 2, 10**6: 1}[group_cost]  # decode lengths 2, 5, 11
    out, weights = step.attention(0, q, k, v, attention.attend)
    assert weights is None and out.shape == q.shape
    for span in spans:
        mine = [span.block_table[p // block_size] * block_size + p % block_size for p in range(span.context_len)]
        keys = cache.keys[0][mine].transpose(0, 1)[None]  # [1, kv_heads, context, head_dim], after the writes
        values = cache.values[0][mine].transpose(0, 1)[None]
        new = slice(span.start, span.start + span.n)
        assert torch.equal(keys[:, :, -span.n:], k[:, :, new])  # the new K were written where the table says
        want, _ = scaled_dot_product_attention_reference(q[:, :, new], keys, values,
                                                         mask=causal_mask(span.n, span.context_len))
        torch.testing.assert_close(out[:, :, new], want, atol=1e-5, rtol=0)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=7), st.integers(0, 50))
def test_group_by_length_is_the_cheapest_split(lengths, group_cost):
    lengths = sorted(lengths)
    groups = group_by_length(lengths, group_cost)
    assert groups[0][0] == 0 and groups[-1][1] == len(lengths)
    assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(groups, groups[1:] + [(len(lengths), None)]))

    def cost(split):
        return sum(group_cost + (end - start) * lengths[end - 1] for start, end in split)

    def every_split(start):  # all ways to cut lengths[start:] into consecutive groups
        if start == len(lengths):
            yield []
        for end in range(start + 1, len(lengths) + 1):
            for rest in every_split(end):
                yield [(start, end)] + rest

    assert cost(groups) == min(cost(split) for split in every_split(0))


def test_group_by_length_refuses_unsorted_lengths():
    with pytest.raises(ValueError, match="sorted, shortest first"):
        group_by_length([3, 1], 4)


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_paged_attention_reference_equals_plain_attention(n_kv_heads):
    gen = torch.Generator().manual_seed(n_kv_heads)
    n_heads, head_dim, block_size, num_blocks = 4, 8, 4, 12
    cache = PagedKVCache(2, num_blocks, block_size, n_kv_heads, head_dim)
    for layer in range(2):  # every slot random, the null block too: only the mask may hide them
        cache.keys[layer].copy_(torch.randn(cache.keys[layer].shape, generator=gen))
        cache.values[layer].copy_(torch.randn(cache.values[layer].shape, generator=gen))
    lengths = [5, 9, 1, 16]
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables = []
    for length in lengths:
        need = -(-length // block_size)
        tables.append([order.pop() for _ in range(need)])
    width = max(len(t) for t in tables)
    padded = torch.tensor([t + [cache.null_block] * (width - len(t)) for t in tables])
    q = torch.randn(len(lengths), n_heads, head_dim, generator=gen)
    layer = 1
    got = paged_attention_reference(q, cache, layer, padded, torch.tensor(lengths))
    assert got.shape == (len(lengths), n_heads, head_dim)
    for row, (length, table) in enumerate(zip(lengths, tables)):
        slots = [table[p // block_size] * block_size + p % block_size for p in range(length)]
        k = cache.keys[layer][slots].transpose(0, 1)[None]  # [1, kv_heads, length, head_dim]
        v = cache.values[layer][slots].transpose(0, 1)[None]
        want = F.scaled_dot_product_attention(q[row][None, :, None, :], k, v,
                                              enable_gqa=n_kv_heads != n_heads)[0, :, 0]
        assert torch.allclose(got[row], want, atol=1e-5), (row, (got[row] - want).abs().max())


# -- the scheduler (steps simulated without a model) -------------------------------------------------


def simulate(sched: Scheduler):
    """Schedule one step and "run" it: tokens become computed, a finished prompt gets a token."""
    step = sched.schedule()
    for seq, n in step.items:
        seq.num_computed += n
        sched.blocks.register_full_blocks(seq)
        if seq.num_computed == seq.num_tokens:
            seq.append_token(7, 0.0)
            if len(seq.output_ids) >= seq.params.max_new_tokens:
                sched.finish(seq)
    return step


def live(sched: Scheduler):
    return list(sched.running) + list(sched.waiting)


def test_token_budget_and_max_num_seqs_are_respected():
    rng = random.Random(0)
    bm = BlockManager(200, 4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=3, max_num_batched_tokens=20), bm)
    seqs = [make_seq([rng.randrange(50) for _ in range(rng.randint(1, 45))], f"s{i}", rng.randint(1, 8))
            for i in range(12)]
    for s in seqs:
        sched.add(s)
    budget_filled = 0
    for _ in range(500):
        if not sched.has_work:
            break
        step = simulate(sched)
        assert 0 < step.num_tokens <= 20
        assert len(step.items) <= 3 and len(sched.running) <= 3
        assert len({id(s) for s, _ in step.items}) == len(step.items)
        budget_filled += step.num_tokens == 20
        bm.check_consistent(live(sched))
    assert not sched.has_work
    assert budget_filled > 0  # the budget was the limit at times (long prompts were split)
    assert all(len(s.output_ids) == s.params.max_new_tokens for s in seqs)
    assert bm.leaked_blocks() == [] and bm.num_free == 200


def test_chunked_prefill_runs_beside_decodes():
    bm = BlockManager(200, 16)
    sched = Scheduler(SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=64), bm)
    decoders = [make_seq([i, i + 1, i + 2, i + 3], f"d{i}", max_new_tokens=50) for i in range(3)]
    for s in decoders:
        sched.add(s)
    simulate(sched)
    assert all(len(s.output_ids) == 1 for s in decoders)  # all decoding now
    long = make_seq([(7 * i) % 101 for i in range(300)], "long")
    sched.add(long)
    chunks = []
    while not long.output_ids:
        assert len(chunks) < 20, "the long prompt makes no progress"
        step = simulate(sched)
        work = dict((s.request_id, n) for s, n in step.items)
        assert step.num_tokens <= 64
        for s in decoders:  # every step: each decoding sequence gets its token, beside the chunk
            assert work[s.request_id] == 1
        chunks.append(work["long"])
    assert chunks == [61, 61, 61, 61, 56]
    assert all(len(s.output_ids) == 1 + len(chunks) for s in decoders)
    step = simulate(sched)
    assert dict((s.request_id, n) for s, n in step.items)["long"] == 1  # decoding too now


def test_long_prompt_first_is_chunked_within_the_budget():
    bm = BlockManager(100, 16)
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64), bm)
    long = make_seq(range(300), "long")
    sched.add(long)
    sizes = []
    while not long.output_ids:
        assert len(sizes) < 20, "the long prompt makes no progress"
        sizes.append(simulate(sched).num_tokens)
    assert sizes == [64, 64, 64, 64, 44]


def test_preemption_takes_the_newest_running_sequence_and_it_resumes():
    bm = BlockManager(4, 4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=3, max_num_batched_tokens=100), bm)
    a = make_seq([1, 2, 3, 4], "a", max_new_tokens=5)
    b = make_seq([5, 6, 7, 8], "b", max_new_tokens=5)
    c = make_seq([9, 10, 11, 12], "c", max_new_tokens=8)
    w = make_seq([13, 14], "w", max_new_tokens=2)
    for s in (a, b, c, w):
        sched.add(s)
    first = simulate(sched)  # a, b, c: one block each; w waits (max_num_seqs)
    assert [s.request_id for s, _ in first.items] == ["a", "b", "c"]
    assert bm.num_free == 1
    second = simulate(sched)  # a takes the last block; b needs one: c (newest), not b, gives its block
    assert second.preempted == [c]
    assert [s.request_id for s, _ in second.items] == ["a", "b"]
    assert c.status is SequenceStatus.PREEMPTED and c.block_table == []
    assert c.num_computed == 0 and c.num_cached == 0 and c.num_registered_blocks == 0
    assert c.num_preemptions == 1 and sched.num_preemptions == 1
    assert list(sched.waiting) == [c, w]  # at the front of the queue, before w
    assert sched.running == [a, b]  # nothing admitted in a step that preempted
    assert c.output_ids == [7]  # its token so far is kept
    bm.check_consistent(live(sched))
    for _ in range(10):
        if a.status is SequenceStatus.FINISHED:
            break
        simulate(sched)
        bm.check_consistent(live(sched))
    assert a.status is SequenceStatus.FINISHED and b.status is SequenceStatus.FINISHED
    resumed = simulate(sched)
    items = dict((s.request_id, n) for s, n in resumed.items)
    # c resumes first and re-prefills prompt + its output so far (b reused its freed block: no hit).
    assert [s.request_id for s, _ in resumed.items] == ["c", "w"]
    assert c.status is SequenceStatus.RUNNING and items["c"] == 5 and items["w"] == 2
    for _ in range(50):
        if not sched.has_work:
            break
        simulate(sched)
        bm.check_consistent(live(sched))
    assert c.output_ids == [7] * 8 and c.num_preemptions == 1
    assert bm.leaked_blocks() == [] and bm.num_free == 4


def test_nothing_is_admitted_in_a_step_that_preempted():
    # Without prefix caching, so that the preempted sequence's blocks are plain free blocks.
    bm = BlockManager(9, 2, enable_prefix_caching=False)
    sched = Scheduler(SchedulerConfig(max_num_seqs=3, max_num_batched_tokens=100), bm)
    a = make_seq([1, 2, 3], "a")
    b = make_seq([4, 5, 6], "b")
    v = make_seq(range(10, 19), "v")
    for s in (a, b, v):
        sched.add(s)
    simulate(sched)  # 2 + 2 + 5 blocks: the pool is full
    simulate(sched)
    assert bm.num_free == 0
    sched.config = SchedulerConfig(max_num_seqs=3, max_num_batched_tokens=3)  # a and b decode, 1 token left
    step = simulate(sched)  # a and b need a block each: v (newest) gives back 5, 3 stay free
    assert step.preempted == [v]
    assert [s.request_id for s, _ in step.items] == ["a", "b"]  # v's 1-token chunk would fit: still not now
    assert bm.num_free == 3 and list(sched.waiting) == [v]
    step = simulate(sched)
    assert [(s.request_id, n) for s, n in step.items] == [("a", 1), ("b", 1), ("v", 1)]  # resumes next step
    bm.check_consistent(live(sched))


def test_waiting_sequence_that_does_not_fit_gives_its_prefix_hits_back():
    bm = BlockManager(4, 2)
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=100), bm)
    cached = make_seq([1, 2, 3, 4], "cached")
    compute_all(bm, cached)
    kept = list(cached.block_table)
    bm.free(cached)  # two cached blocks in the free list
    hog = make_seq([9, 9, 9], "hog", max_new_tokens=100)
    sched.add(hog)
    simulate(sched)  # hog takes the 2 blocks without a hash; the cached ones stay
    assert all(bm.hash_of[blk] is not None and bm.ref_counts[blk] == 0 for blk in kept)
    late = make_seq([1, 2, 3, 4, 5, 6, 7], "late")  # hits 2 blocks but needs 2 more: only 0 free after
    sched.add(late)
    before_hits, before_query = bm.hit_tokens, bm.query_tokens
    simulate(sched)
    assert list(sched.waiting) == [late] and late.block_table == [] and late.num_computed == 0
    assert bm.hit_tokens == before_hits and bm.query_tokens == before_query  # a failed admission is not counted
    bm.check_consistent(live(sched))
    sched.finish(hog)
    simulate(sched)
    assert late.status is SequenceStatus.RUNNING and late.num_cached == 4 and bm.hit_tokens == before_hits + 4
