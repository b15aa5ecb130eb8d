"""Stateful property test of the prefix index with the pool and block tables.

Requests draw token ids from a tiny alphabet so prefixes collide often. Rules: a request attaches the
longest cached prefix then appends its own tokens, sequences append, fork, truncate and get released,
their blocks get registered, the index evicts and expires (injected clock), the budget changes. The
model records what every physical block holds (writes follow the append plans, copy-on-write copies
included). After every step: pool and index invariants; each block's reference count equals its
sequence uses plus one if cached; nothing leaked; every cached block still holds exactly the tokens it
was registered with (no write ever reached a cached block); and an attach only hands out blocks whose
content equals the requested tokens. A refused append changes nothing, index included.
"""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule  # noqa: E402

from pagedkv import _C  # noqa: E402

BS = 4
MAX_BLOCKS = 20
SALT = 11
LONG = os.environ.get("PAGEDKV_LONG_FUZZ") == "1"
tokens_st = st.lists(st.integers(0, 2), min_size=1, max_size=14)
STATS: Counter = Counter()  # what the run exercised (checked by the last test)


class PrefixMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.budget = _C.MemoryBudget(-1)
        self.pool = _C.BlockPool(64, 3, MAX_BLOCKS, self.budget)
        self.tables = _C.BlockTables(self.pool, BS)
        self.index = _C.PrefixIndex(self.pool, BS, "lru", 20.0)
        self.now = 0.0
        self.seqs: dict[int, list[int]] = {}  # seq -> its token ids
        self.content: dict[int, list[int | None]] = {}  # physical block -> token at each offset
        self.registered: dict[int, tuple[int, ...]] = {}  # cached block -> tokens at registration
        self.history: list[list[int]] = []  # token ids of earlier requests

    # ----------------------------------------------------------------------------------- helpers
    def _write(self, seq: int, new: list[int]) -> None:
        """Append ``new`` tokens to ``seq`` in the tables and the model (all-or-nothing)."""
        before = self._snapshot()
        try:
            slots, copies = self.tables.append([seq], len(new))
        except _C.BudgetExhaustedError:
            assert self._snapshot() == before, "a refused append changed the state"
            raise
        STATS["copies"] += len(copies)
        for src, dst in copies:
            self.content[int(dst)] = list(self.content[int(src)])
        for slot, tok in zip(slots, new):
            b, off = divmod(int(slot), BS)
            self.content.setdefault(b, [None] * BS)[off] = tok
        self.seqs[seq] = self.seqs[seq] + new

    def _snapshot(self):
        return ({s: (self.tables.num_tokens(s), list(self.tables.blocks(s))) for s in self.seqs},
                self.pool.num_used, self.index.size)

    def _seq(self, data) -> int:
        return data.draw(st.sampled_from(sorted(self.seqs)))

    def _sync_registered(self) -> None:
        kept = {b: t for b, t in self.registered.items() if self.index.contains_block(b)}
        STATS["dropped"] += len(self.registered) - len(kept)
        self.registered = kept

    # ------------------------------------------------------------------------------------- rules
    @precondition(lambda self: len(self.seqs) < 6)
    @rule(data=st.data(), toks=tokens_st, reuse=st.booleans(), cache_it=st.booleans())
    def request(self, data, toks, reuse, cache_it):
        if reuse and self.history:  # a request sharing a prefix with an earlier one, as in serving
            base = data.draw(st.sampled_from(self.history))
            toks = base[:data.draw(st.integers(len(base) // 2, len(base)))] + toks
        self.history.append(toks)
        arr = np.array(toks, dtype=np.int32)
        hit = self.index.match(arr, SALT, self.now, (len(toks) - 1) // BS)
        for i, b in enumerate(hit):
            assert self.content[b] == toks[i * BS:(i + 1) * BS], "attach handed out a block with other tokens"
        STATS["attached_blocks"] += len(hit)
        s = self.tables.add_sequence_with_blocks(hit, len(hit) * BS)
        self.seqs[s] = toks[:len(hit) * BS]
        try:
            self._write(s, toks[len(hit) * BS:])
        except _C.BudgetExhaustedError:
            return
        if cache_it:
            self._register(s, 0)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data(), toks=tokens_st)
    def append(self, data, toks):
        try:
            self._write(self._seq(data), toks)
        except _C.BudgetExhaustedError:
            pass

    @precondition(lambda self: self.seqs and len(self.seqs) < 6)
    @rule(data=st.data())
    def fork(self, data):
        s = self._seq(data)
        self.seqs[self.tables.fork(s)] = list(self.seqs[s])

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def truncate(self, data):
        s = self._seq(data)
        n = data.draw(st.integers(0, len(self.seqs[s])))
        self.tables.truncate(s, n)
        self.seqs[s] = self.seqs[s][:n]

    @precondition(lambda self: self.seqs)
    @rule(data=st.data(), priority=st.integers(0, 2))
    def register(self, data, priority):
        self._register(self._seq(data), priority)

    def _register(self, s: int, priority: int) -> None:
        self._sync_registered()  # appends may have evicted (and reused) registered blocks
        toks = self.seqs[s]
        blocks = list(self.tables.blocks(s))
        self.index.insert(np.array(toks, dtype=np.int32), blocks, SALT, self.now, priority, False)
        for b in blocks[:len(toks) // BS]:
            if self.index.contains_block(b) and b not in self.registered:
                self.registered[b] = tuple(self.content[b])

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def release(self, data):
        s = self._seq(data)
        self.tables.free_sequence(s)
        del self.seqs[s]

    @rule(n=st.integers(0, 4))
    def evict(self, n):
        reclaimable = self.index.reclaimable
        assert self.index.evict(n, self.now) == min(n, reclaimable)
        self._sync_registered()

    @rule(dt=st.sampled_from([0.5, 1.0, 2.0, 3.0, 25.0]))
    def tick(self, dt):
        self.now += dt
        self.index.expire(self.now)
        self._sync_registered()

    @rule(limit=st.integers(6, MAX_BLOCKS))
    def set_budget(self, limit):
        self.pool.max_blocks = max(limit, self.pool.capacity)

    # -------------------------------------------------------------------------------- invariants
    @invariant()
    def consistent(self):
        STATS["steps"] += 1
        STATS["max_cached"] = max(STATS["max_cached"], self.index.size)
        self._sync_registered()  # appends may have evicted through the pool
        self.pool.check_invariants()
        self.index.check_invariants()
        assert self.budget.reserved_bytes == self.pool.reserved_bytes == 64 * self.pool.capacity
        uses: Counter = Counter()
        for s, toks in self.seqs.items():
            assert self.tables.num_tokens(s) == len(toks)
            blocks = list(self.tables.blocks(s))
            assert len(blocks) == -(-len(toks) // BS)
            for i, b in enumerate(blocks):
                uses[b] += 1
                n = min(BS, len(toks) - i * BS)
                assert self.content[b][:n] == toks[i * BS:i * BS + n], "a sequence reads tokens it did not write"
        cached = set(self.registered)
        assert len(cached) == self.index.size
        for b in set(uses) | cached:
            assert self.pool.refcount(b) == uses[b] + (b in cached), b
        assert self.pool.num_used == len(set(uses) | cached), "leaked block"
        for b, toks in self.registered.items():
            assert tuple(self.content[b]) == toks, "a cached block was overwritten"


PrefixMachine.TestCase.settings = settings(max_examples=2000 if LONG else 120, stateful_step_count=50,
                                           deadline=None, derandomize=not LONG)
test_prefix_state_machine = PrefixMachine.TestCase


def test_the_run_exercised_sharing_copies_and_eviction():
    """Guards against a vacuous run: attaches found cached blocks, copy-on-write happened, blocks were
    evicted or expired (counted over the state machine above, which runs first)."""
    if STATS["steps"] == 0:
        pytest.skip("the state machine did not run in this session")
    assert STATS["steps"] >= 3000, STATS
    assert STATS["attached_blocks"] > 20, STATS
    assert STATS["copies"] > 10, STATS
    assert STATS["dropped"] > 10, STATS
