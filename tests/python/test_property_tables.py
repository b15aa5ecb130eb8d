"""Stateful property test of the block pool and block tables against a small pure-Python model.

The model tracks each sequence's tokens, start and its list of *logical* blocks (a fork shares them,
an append into a shared partial block gets a fresh one, as copy-on-write must). After every step:
the pool's own invariants hold, each sequence's physical blocks map one-to-one onto the model's
logical blocks (shared exactly when the model shares), reference counts equal the uses, the used
count equals the distinct blocks held (nothing leaked, nothing free and referenced), and a refused
append (budget) changed nothing. 250 examples of up to 50 steps (about 11k steps, counted) in CI; PAGEDKV_LONG_FUZZ=1 runs
16x more.
"""

from __future__ import annotations

import itertools
import os
from collections import Counter

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule  # noqa: E402

from pagedkv import _C  # noqa: E402

BS = 4
MAX_BLOCKS = 24
LONG = os.environ.get("PAGEDKV_LONG_FUZZ") == "1"
_logical = itertools.count()


class TablesMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.budget = _C.MemoryBudget(-1)
        self.pool = _C.BlockPool(64, 5, MAX_BLOCKS, self.budget)
        self.tables = _C.BlockTables(self.pool, BS)
        self.model: dict[int, dict] = {}  # seq -> {"tokens", "start", "blocks": [logical ids]}

    # ----------------------------------------------------------------------------------- helpers
    def _holders(self, logical: int) -> int:
        return sum(m["blocks"].count(logical) for m in self.model.values())

    def _snapshot(self):
        return ({s: (self.tables.num_tokens(s), self.tables.start(s), list(self.tables.blocks(s)))
                 for s in self.model}, self.pool.num_used)

    def _seq(self, data) -> int:
        return data.draw(st.sampled_from(sorted(self.model)))

    # ------------------------------------------------------------------------------------- rules
    @precondition(lambda self: len(self.model) < 6)
    @rule()
    def add(self):
        s = self.tables.add_sequence()
        self.model[s] = {"tokens": 0, "start": 0, "blocks": []}

    @precondition(lambda self: self.model and len(self.model) < 6)
    @rule(data=st.data())
    def fork(self, data):
        s = self._seq(data)
        c = self.tables.fork(s)
        m = self.model[s]
        self.model[c] = {"tokens": m["tokens"], "start": m["start"], "blocks": list(m["blocks"])}

    @precondition(lambda self: self.model)
    @rule(data=st.data(), n=st.integers(1, 9))
    def append(self, data, n):
        s = self._seq(data)
        m = self.model[s]
        before = self._snapshot()
        try:
            self.tables.append([s], n)
        except _C.BudgetExhaustedError:
            assert self._snapshot() == before, "a refused append changed the tables"
            return
        t = m["tokens"]
        if t % BS and m["blocks"] and self._holders(m["blocks"][-1]) > 1:
            m["blocks"][-1] = next(_logical)  # copy-on-write of the shared partial block
        kept_before = -(-t // BS) - m["start"] // BS
        kept_after = -(-(t + n) // BS) - m["start"] // BS
        m["blocks"].extend(next(_logical) for _ in range(kept_after - max(kept_before, 0)))
        m["tokens"] = t + n

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def truncate(self, data):
        s = self._seq(data)
        m = self.model[s]
        new_len = data.draw(st.integers(m["start"], m["tokens"]))
        self.tables.truncate(s, new_len)
        keep = -(-new_len // BS) - m["start"] // BS
        m["blocks"] = m["blocks"][:max(keep, 0)]
        m["tokens"] = new_len

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def drop_front(self, data):
        s = self._seq(data)
        m = self.model[s]
        new_start = data.draw(st.integers(m["start"], m["tokens"]))
        self.tables.drop_front(s, new_start)
        dropped = new_start // BS - m["start"] // BS
        m["blocks"] = m["blocks"][dropped:]
        m["start"] = new_start

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def free(self, data):
        s = self._seq(data)
        self.tables.free_sequence(s)
        del self.model[s]

    @rule(limit=st.integers(4, MAX_BLOCKS))
    def set_budget(self, limit):
        self.pool.max_blocks = max(limit, self.pool.capacity)  # cannot shrink below grown chunks

    # -------------------------------------------------------------------------------- invariants
    @invariant()
    def consistent(self):
        self.pool.check_invariants()
        assert self.budget.reserved_bytes == self.pool.reserved_bytes == 64 * self.pool.capacity  # bytes accounted = held
        to_phys: dict[int, int] = {}
        uses: Counter = Counter()
        for s, m in self.model.items():
            assert self.tables.num_tokens(s) == m["tokens"]
            assert self.tables.start(s) == m["start"]
            phys = list(self.tables.blocks(s))
            assert len(phys) == len(m["blocks"]), (s, phys, m)
            for logical, p in zip(m["blocks"], phys):
                assert to_phys.setdefault(logical, p) == p, "one logical block in two physical blocks"
                uses[p] += 1
        assert len(set(to_phys.values())) == len(to_phys), "two logical blocks share a physical block"
        assert self.pool.num_used == len(uses), "leaked block (used but unreferenced)"
        for p, n in uses.items():
            assert self.pool.refcount(p) == n


TablesMachine.TestCase.settings = settings(max_examples=4000 if LONG else 250, stateful_step_count=50,
                                           deadline=None, derandomize=not LONG)
test_tables_state_machine = TablesMachine.TestCase
