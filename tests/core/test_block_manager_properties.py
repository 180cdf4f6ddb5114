"""Property test: random operation sequences against the block manager, checked after each step.

A model of physical memory (what token each slot of each block holds) replays every copy and
swap the manager asks for, so a wrong copy-on-write, swap mapping or prefix hit shows up as a
sequence reading a token it never wrote.
"""

from __future__ import annotations

from collections import Counter

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pagedllm.core.block_hash import extend_block_hashes
from pagedllm.core.block_manager import BlockManager

BLOCK_SIZE = 4
NUM_BLOCKS = 12
NUM_CPU_BLOCKS = 8


class BlockManagerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.manager = BlockManager(NUM_BLOCKS, BLOCK_SIZE, num_cpu_blocks=NUM_CPU_BLOCKS,
                                    enable_prefix_caching=True)
        self.device = {b: [None] * BLOCK_SIZE for b in range(NUM_BLOCKS)}
        self.host = {b: [None] * BLOCK_SIZE for b in range(NUM_CPU_BLOCKS)}
        # seq id -> (token ids, number computed); swapped sequences keep theirs.
        self.seqs: dict[str, tuple[list[int], int]] = {}
        self.next_id = 0

    # ---- helpers --------------------------------------------------------------------------

    def _new_id(self) -> str:
        self.next_id += 1
        return f"s{self.next_id}"

    def _write(self, seq_id: str, tokens: list[int], start: int, end: int) -> None:
        table = self.manager.get_block_table(seq_id)
        for pos in range(start, end):
            self.device[table[pos // BLOCK_SIZE]][pos % BLOCK_SIZE] = tokens[pos]

    def _copy(self, pairs, src, dst) -> None:
        for s, d in pairs:
            dst[d] = list(src[s])

    def _on_device(self) -> list[str]:
        return [s for s in self.seqs if self.manager.has_blocks(s)]

    def _swapped(self) -> list[str]:
        return [s for s in self.seqs if self.manager.is_swapped(s)]

    def _register(self, seq_id: str) -> None:
        tokens, computed = self.seqs[seq_id]
        hashes: list[int] = []
        extend_block_hashes(hashes, tokens, BLOCK_SIZE, len(tokens))
        self.manager.cache_full_blocks(seq_id, hashes, tokens, computed)

    # ---- operations -----------------------------------------------------------------------

    @rule(prefix=st.sampled_from([[], [1, 2, 3, 4], [1, 2, 3, 4, 5, 6, 7, 8]]),
          suffix=st.lists(st.integers(1, 6), min_size=1, max_size=9))
    def add(self, prefix, suffix):
        """A new sequence: attach its cached prefix, compute the rest."""
        tokens = prefix + suffix
        seq_id = self._new_id()
        hashes: list[int] = []
        extend_block_hashes(hashes, tokens, BLOCK_SIZE, len(tokens))
        hit = self.manager.find_prefix(hashes, tokens, len(tokens))
        start = hit.num_blocks * BLOCK_SIZE
        if not self.manager.can_allocate(seq_id, start, len(tokens) - start, hit):
            return
        self.manager.attach_prefix(seq_id, hit)
        copies = self.manager.allocate_slots(seq_id, start, len(tokens) - start)
        self._copy(copies, self.device, self.device)
        self._write(seq_id, tokens, start, len(tokens))
        self.seqs[seq_id] = (tokens, len(tokens))
        self._register(seq_id)

    @precondition(lambda self: self._on_device())
    @rule(data=st.data(), new=st.lists(st.integers(1, 6), min_size=1, max_size=6))
    def append(self, data, new):
        """Decode or chunk: copy-on-write if the block written is shared."""
        seq_id = data.draw(st.sampled_from(self._on_device()))
        tokens, computed = self.seqs[seq_id]
        if not self.manager.can_allocate(seq_id, computed, len(new)):
            return
        copies = self.manager.allocate_slots(seq_id, computed, len(new))
        self._copy(copies, self.device, self.device)
        tokens = tokens + new
        self._write(seq_id, tokens, computed, len(tokens))
        self.seqs[seq_id] = (tokens, len(tokens))
        self._register(seq_id)

    @precondition(lambda self: self._on_device())
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(self._on_device()))
        child = self._new_id()
        self.manager.fork(parent, child)
        tokens, computed = self.seqs[parent]
        self.seqs[child] = (list(tokens), computed)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def free(self, data):
        """Finish or abort, on the device or while swapped."""
        seq_id = data.draw(st.sampled_from(sorted(self.seqs)))
        self.manager.free(seq_id)
        del self.seqs[seq_id]

    @precondition(lambda self: self._on_device())
    @rule(data=st.data())
    def swap_out(self, data):
        group = data.draw(st.lists(st.sampled_from(self._on_device()), min_size=1, max_size=3,
                                   unique=True))
        if self.manager.can_swap_out(group):
            self._copy(self.manager.swap_out(group), self.device, self.host)

    @precondition(lambda self: self._swapped())
    @rule(data=st.data())
    def swap_in(self, data):
        group = data.draw(st.lists(st.sampled_from(self._swapped()), min_size=1, max_size=3,
                                   unique=True))
        if self.manager.can_swap_in(group):
            self._copy(self.manager.swap_in(group), self.host, self.device)

    # ---- invariants -----------------------------------------------------------------------

    @invariant()
    def reference_counts_match_tables(self):
        for pool, tables in ((self.manager.pool, self.manager._block_tables),
                             (self.manager.cpu_pool, self.manager._cpu_tables)):
            counts = Counter(b for table in tables.values() for b in table)
            free = pool.free_block_ids()
            assert len(free) == len(set(free))
            for block_id in range(pool.num_blocks):
                assert pool.ref_count(block_id) == counts[block_id]
                assert (block_id in free) == (counts[block_id] == 0)
            assert pool.num_free_blocks + pool.num_used_blocks == pool.num_blocks

    @invariant()
    def every_sequence_reads_its_own_tokens(self):
        for seq_id, (tokens, computed) in self.seqs.items():
            if self.manager.has_blocks(seq_id):
                table, memory = self.manager.get_block_table(seq_id), self.device
            else:
                table, memory = self.manager._cpu_tables[seq_id], self.host
            for pos in range(computed):
                assert memory[table[pos // BLOCK_SIZE]][pos % BLOCK_SIZE] == tokens[pos], (
                    f"{seq_id} position {pos}"
                )

    @invariant()
    def cache_entries_point_back(self):
        pool = self.manager.pool
        for block_hash, block_id in pool.hash_to_block.items():
            assert pool.block_hash[block_id] == block_hash

    def teardown(self):
        for seq_id in list(self.seqs):
            self.manager.free(seq_id)
        assert self.manager.num_free_blocks == NUM_BLOCKS
        assert self.manager.cpu_pool.num_free_blocks == NUM_CPU_BLOCKS


BlockManagerMachine.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestBlockManagerProperties = BlockManagerMachine.TestCase
