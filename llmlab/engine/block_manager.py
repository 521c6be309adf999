"""Which KV block holds which tokens: allocation, reference counts, a free list and the prefix cache.

Taught in notebook 11 (serving engine).  The paged cache is a fixed pool of
``num_blocks`` blocks of ``block_size`` token slots (:class:`~llmlab.engine.paged_cache.PagedKVCache`);
this module only does the bookkeeping, with plain Python ints:

* a sequence's **block table** maps its logical blocks to physical ones, so
  its tokens need not be contiguous in memory and no slot is reserved for a
  length the sequence may never reach;
* a **reference count** per block lets several sequences share a block;
* **prefix caching**: a full block is named by the hash of its tokens chained
  with its parent block's hash, so equal hashes mean an equal prefix up to
  and including that block.  A new request reuses every cached block its
  prompt starts with (reference count + 1) instead of recomputing it;
* a freed block keeps its content and its hash: it waits in the free list,
  least recently freed first, until a new allocation evicts it — until then a
  later request can still hit it.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence as Seq

from llmlab.engine.sequence import Sequence
from llmlab.errors import LlmlabError, require_int

ROOT_HASH = b"llmlab-prefix-root"
"""The parent hash of a sequence's first block."""


class NoFreeBlocksError(LlmlabError, RuntimeError):
    """Allocation asked for more blocks than are free (the scheduler asks ``can_append`` first)."""


def block_hash(parent: bytes, tokens: Seq[int]) -> bytes:
    """The name of a full block: a hash of its parent's name and its token ids (notebook 11).

    Chaining makes the name depend on the whole prefix, not only on this block's tokens.
    """
    digest = hashlib.blake2b(parent, digest_size=16)
    digest.update(b",".join(str(t).encode() for t in tokens))
    return digest.digest()


class BlockManager:
    """Allocate, share and free the blocks of a paged KV cache (notebook 11).

    ``num_blocks`` blocks of ``block_size`` slots; ``enable_prefix_caching`` turns the
    prefix cache on (on by default).
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = require_int("num_blocks", num_blocks, minimum=1)
        self.block_size = require_int("block_size", block_size, minimum=1)
        self.enable_prefix_caching = bool(enable_prefix_caching)
        self.ref_counts = [0] * num_blocks
        self.hash_of: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}
        """Hash → block, for every full block whose content is still in the pool."""
        self.free_blocks: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        """Blocks nobody uses, in eviction order (first = reused first)."""
        self.hit_tokens = 0
        self.query_tokens = 0

    # -- questions the scheduler asks -------------------------------------------------------

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """New blocks ``seq`` needs so that ``num_new_tokens`` more tokens have a slot."""
        total = -(-(seq.num_computed + num_new_tokens) // self.block_size)
        return max(0, total - len(seq.block_table))

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq, num_new_tokens) <= self.num_free

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks a sequence of ``num_tokens`` tokens occupies."""
        return -(-num_tokens // self.block_size)

    # -- allocation ---------------------------------------------------------------------------

    def allocate_prefix(self, seq: Sequence) -> int:
        """Give a sequence with no blocks every cached block its tokens start with; return the tokens hit.

        ``seq.num_computed`` becomes the tokens hit — but at most all tokens but the last,
        because the last token must still run through the model to give the next token's
        logits (its K/V are already cached: its slot is skipped, see ``slot_of``).
        """
        if seq.block_table:
            raise NoFreeBlocksError(f"request {seq.request_id} already holds blocks; free it first.")
        hits = 0
        if self.enable_prefix_caching:
            self._hash_full_blocks(seq)
            for digest in seq.block_hashes:
                block = self.cached.get(digest)
                if block is None:
                    break
                self._take(block)
                seq.block_table.append(block)
                hits += 1
        hit_tokens = hits * self.block_size
        seq.num_registered_blocks = hits
        seq.num_cached = hit_tokens
        seq.num_computed = min(hit_tokens, seq.num_tokens - 1)
        return hit_tokens

    def count_admission(self, seq: Sequence) -> None:
        """Count an admitted sequence's prefix-cache hits (a failed admission is not counted)."""
        seq.prefix_hit_tokens += seq.num_cached
        self.hit_tokens += seq.num_cached
        self.query_tokens += seq.num_tokens

    def append_slots(self, seq: Sequence, num_new_tokens: int) -> None:
        """Allocate the blocks ``seq`` needs for ``num_new_tokens`` more tokens."""
        needed = self.blocks_needed(seq, num_new_tokens)
        if needed > self.num_free:
            raise NoFreeBlocksError(
                f"request {seq.request_id} needs {needed} blocks but {self.num_free} are free."
            )
        for _ in range(needed):
            block, _ = self.free_blocks.popitem(last=False)
            self._evict(block)
            self.ref_counts[block] = 1
            seq.block_table.append(block)

    def slot_of(self, seq: Sequence, position: int) -> int:
        """Where the K/V of ``seq``'s token at ``position`` go: ``block * block_size + offset``, or −1 (skip).

        −1 for a token whose K/V came from the prefix cache (it is only recomputed for its logits).
        """
        if position < seq.num_cached:
            return -1
        block = seq.block_table[position // self.block_size]
        return block * self.block_size + position % self.block_size

    def register_full_blocks(self, seq: Sequence) -> None:
        """Offer every block that is now full and computed to the prefix cache."""
        if not self.enable_prefix_caching:
            return
        full = seq.num_computed // self.block_size
        if full <= seq.num_registered_blocks:
            return
        self._hash_full_blocks(seq, upto=full)
        for index in range(seq.num_registered_blocks, full):
            block, digest = seq.block_table[index], seq.block_hashes[index]
            if digest not in self.cached and self.hash_of[block] is None:
                self.cached[digest] = block
                self.hash_of[block] = digest
        seq.num_registered_blocks = full

    def free(self, seq: Sequence) -> None:
        """Give back every block of ``seq`` (last block first, so it is evicted first); cached content stays."""
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_blocks[block] = None
                if self.hash_of[block] is None:  # nothing worth keeping: reuse it before cached blocks
                    self.free_blocks.move_to_end(block, last=False)
        seq.forget_cache()

    # -- inside ---------------------------------------------------------------------------------

    def _take(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self.free_blocks[block]
        self.ref_counts[block] += 1

    def _evict(self, block: int) -> None:
        digest = self.hash_of[block]
        if digest is not None:
            del self.cached[digest]
            self.hash_of[block] = None

    def _hash_full_blocks(self, seq: Sequence, upto: int | None = None) -> None:
        """Extend ``seq.block_hashes`` to its first ``upto`` full blocks (default: all full blocks)."""
        ids = seq.all_ids
        upto = len(ids) // self.block_size if upto is None else upto
        parent = seq.block_hashes[-1] if seq.block_hashes else ROOT_HASH
        for index in range(len(seq.block_hashes), upto):
            parent = block_hash(parent, ids[index * self.block_size:(index + 1) * self.block_size])
            seq.block_hashes.append(parent)

    # -- for tests and the notebook -------------------------------------------------------------

    @property
    def num_cached_blocks(self) -> int:
        return len(self.cached)

    def leaked_blocks(self) -> list[int]:
        """Blocks with a reference but no sequence should hold any (call when every request is done)."""
        return [b for b, count in enumerate(self.ref_counts) if count != 0]

    def check_consistent(self, live: list[Sequence]) -> None:
        """Reference counts equal the live sequences' uses; the free list holds exactly the unused blocks."""
        uses = [0] * self.num_blocks
        for seq in live:
            for block in seq.block_table:
                uses[block] += 1
        if uses != self.ref_counts:
            bad = [b for b in range(self.num_blocks) if uses[b] != self.ref_counts[b]]
            raise AssertionError(f"reference counts disagree with the block tables at blocks {bad[:10]}")
        unused = {b for b in range(self.num_blocks) if uses[b] == 0}
        if unused != set(self.free_blocks):
            raise AssertionError("the free list is not exactly the unused blocks")
        for digest, block in self.cached.items():
            if self.hash_of[block] != digest:
                raise AssertionError(f"block {block} is cached under a hash it does not carry")
