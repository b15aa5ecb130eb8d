"""Tensor parallelism on CPU: 2 processes on the gloo backend, each holding half of the KV heads.

A random-init Llama config with 4 KV heads (8 query heads) is saved once; every rank loads it with
transformers' ``tp_plan="auto"`` (q/k/v column-sharded, o_proj row-sharded with an all-reduce), and
separately a plain copy sharded by ``pagedkv.tp.shard_heads`` (heads and MLP, all-reduced) runs a
hand-written decode loop. Each run uses a
``PagedKVCache(tp_size="auto")`` holding the rank's 2 heads. Checked against one process holding all
4 heads: bf16 storage gives the same greedy tokens (sdpa and the fused "pagedkv" attention), int8
agrees >= 95%; block tables, prefix-cache hits and hash salts are identical on both ranks (nothing
but token ids decides them); a byte budget counts the rank's own pages.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import pagedkv
from pagedkv.tp import shard_heads

WORLD = 2
NEW = 24
CONFIG = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=8,
              num_key_value_heads=4, head_dim=16, max_position_embeddings=1024, initializer_range=0.1,
              eos_token_id=None)  # no early stop: the hand-written loop runs every step


def _prompts() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, 256, (2, 40), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding on the second row
    return ids, mask


def _generate(model, fmt: str, impl: str, tp_size) -> tuple[list[list[int]], list[list[int]]]:
    """Greedy tokens and layer 0's block table."""
    ids, mask = _prompts()
    model.set_attn_implementation(impl)
    cache = pagedkv.PagedKVCache(model.config, fmt, tp_size=tp_size)
    out = model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=NEW, do_sample=False,
                         pad_token_id=0)
    table = cache._group_of[0].block_table(torch.device("cpu"))
    return out[:, ids.shape[1]:].tolist(), table.tolist()


def _hand_loop(model, fmt: str) -> list[list[int]]:
    """Hand-written greedy decode with the fused attention, one token per step."""
    ids, mask = _prompts()
    cache = pagedkv.PagedKVCache(model.config, fmt, tp_size="auto")
    model.set_attn_implementation("pagedkv")
    out, cur, attn = [], ids, mask
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        for _ in range(NEW):
            logits = model(input_ids=cur, attention_mask=attn, position_ids=pos, past_key_values=cache,
                           use_cache=True).logits
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            out.append(nxt)
            cur, attn = nxt, torch.cat([attn, torch.ones_like(nxt)], 1)
            pos = pos[:, -1:] + 1
    return torch.cat(out, 1).tolist()


def _prefix(model) -> dict:
    """Two requests sharing a 64-token prompt on a prefix-caching store: what the second one reuses."""
    model.set_attn_implementation("pagedkv")
    store = pagedkv.KVStore(model.config, "int8", prefix_caching=True, tp_size="auto", block_size=16)
    g = torch.Generator().manual_seed(3)
    shared = torch.randint(3, 256, (1, 64), generator=g)
    outs = []
    for suffix in (torch.tensor([[5, 6, 7]]), torch.tensor([[9, 10]])):
        stats: dict = {}
        out = pagedkv.generate(model, torch.cat([shared, suffix], 1), store, max_new_tokens=4, stats=stats)
        outs.append((out.tolist(), stats["reused_tokens"]))
    s = store.prefix_stats()
    return dict(outs=outs, salt=store.hash_salt(), hits=s["hit_blocks"], cached=s["cached_blocks"],
                heads=store.num_kv_heads)


def _budgeted(model, budget: int | None, tp_size) -> tuple[str, int]:
    """A 192-token prompt under a byte budget: ("ok", page bytes used) or ("exhausted", 0)."""
    model.set_attn_implementation("pagedkv")
    ids = torch.randint(3, 256, (1, 192), generator=torch.Generator().manual_seed(5))
    cache = pagedkv.PagedKVCache(model.config, "int8", tp_size=tp_size, block_size=16, max_memory_bytes=budget)
    try:
        pagedkv.generate(model, ids, cache, max_new_tokens=2)
    except pagedkv.BudgetExhaustedError:
        return "exhausted", 0
    return "ok", cache.store.memory_bytes()["used_bytes"]


def _load_tp(path: str):
    try:
        from transformers import DistributedConfig
    except ImportError:  # transformers releases with only the tp_plan argument
        return AutoModelForCausalLM.from_pretrained(path, tp_plan="auto", dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(path, distributed_config=DistributedConfig(tp_plan="auto"),
                                                dtype=torch.float32)


def _worker(rank: int, path: str, port: int, result_path: str, budget: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        tp = _load_tp(path)
        res = {"tp_size": pagedkv.tensor_parallel_size(tp)}
        for fmt in ("bf16", "int8"):
            for impl in ("sdpa", "pagedkv"):
                res[f"plan/{fmt}/{impl}"] = _generate(tp, fmt, impl, "auto")
        res["prefix"] = _prefix(tp)
        res["budget"] = _budgeted(tp, budget, "auto")
        hand = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        shard_heads(hand, rank, WORLD)
        for fmt in ("bf16", "int8"):
            res[f"hand/{fmt}"] = _hand_loop(hand, fmt)
        gathered = [None] * WORLD
        dist.all_gather_object(gathered, res)
        if rank == 0:
            torch.save(gathered, result_path)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    path = tmp_path_factory.mktemp("tp")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG)).eval()
    model.save_pretrained(path / "ckpt")
    single = {}
    for fmt in ("bf16", "int8"):
        for impl in ("sdpa", "pagedkv"):
            single[f"{fmt}/{impl}"] = _generate(model, fmt, impl, None)
    single["prefix"] = _prefix(model)
    single["free"] = _budgeted(model, None, None)
    budget = single["free"][1] * 3 // 4  # too small for 4 heads, enough for a rank's 2
    single["budget"] = _budgeted(model, budget, None)
    mp.spawn(_worker, args=(str(path / "ckpt"), _free_port(), str(path / "result.pt"), budget), nprocs=WORLD)
    return single, torch.load(path / "result.pt", weights_only=False)


def _agreement(a: list[list[int]], b: list[list[int]]) -> float:
    pairs = [(x, y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
    return sum(x == y for x, y in pairs) / len(pairs)


def test_ranks_hold_half_the_heads(runs):
    single, ranks = runs
    assert [r["tp_size"] for r in ranks] == [WORLD, WORLD]
    assert [r["prefix"]["heads"] for r in ranks] == [2, 2] and single["prefix"]["heads"] == 4
    # Budgets are per rank: 3/4 of what one process holding all heads needs exhausts it, while each
    # rank stores half the bytes and fits.
    assert single["budget"] == ("exhausted", 0)
    for r in ranks:
        assert r["budget"] == ("ok", single["free"][1] // 2)


@pytest.mark.parametrize("impl", ["sdpa", "pagedkv"])
def test_tp_plan_bf16_matches_single_process(runs, impl):
    single, ranks = runs
    for r in ranks:
        assert r[f"plan/bf16/{impl}"][0] == single[f"bf16/{impl}"][0]


@pytest.mark.parametrize("impl", ["sdpa", "pagedkv"])
def test_tp_plan_int8_agrees(runs, impl):
    single, ranks = runs
    for r in ranks:
        assert _agreement(r[f"plan/int8/{impl}"][0], single[f"int8/{impl}"][0]) >= 0.95


def test_hand_sharded_loop(runs):
    single, ranks = runs
    for r in ranks:
        assert r["hand/bf16"] == single["bf16/pagedkv"][0]
        assert _agreement(r["hand/int8"], single["int8/pagedkv"][0]) >= 0.95


def test_block_tables_and_prefix_hits_identical_across_ranks(runs):
    single, ranks = runs
    for key in ("plan/bf16/sdpa", "plan/int8/pagedkv"):
        assert ranks[0][key][1] == ranks[1][key][1]
    p0, p1 = ranks[0]["prefix"], ranks[1]["prefix"]
    assert p0["salt"] == p1["salt"] == single["prefix"]["salt"]
    assert p0["outs"] == p1["outs"]
    assert p0["hits"] == p1["hits"] == single["prefix"]["hits"] > 0
    assert p0["outs"][1][1] == 64 and p0["cached"] == p1["cached"]


def test_shard_heads_rejects_uneven_split():
    model = LlamaForCausalLM(LlamaConfig(**CONFIG))
    with pytest.raises(ValueError, match="world size 3 must divide"):
        shard_heads(model, 0, 3)
    with pytest.raises(ValueError, match="rank must be in"):
        shard_heads(model, 2, 2)


def test_bad_tp_size():
    cfg = LlamaConfig(**CONFIG)
    with pytest.raises(ValueError, match="tp_size=3 does not divide"):
        pagedkv.PagedKVCache(cfg, "int8", tp_size=3)
    with pytest.raises(ValueError, match="tp_size must be"):
        pagedkv.PagedKVCache(cfg, "int8", tp_size=0)
    cache = pagedkv.PagedKVCache(cfg, "bf16")
    k = torch.randn(1, 2, 3, 16)
    with pytest.raises(ValueError, match="tp_size=2"):
        cache.update(k, k, 0)
