"""Tensor parallelism helpers: shard a Llama-style transformers model by hand over torch.distributed.

transformers' own ``tp_plan="auto"`` (``from_pretrained``) is the usual way; this is the hand-written
alternative for models built in memory (random-init benchmarks) or loops that own their sharding.
Attention heads are split evenly: rank r keeps query heads and KV heads ``[r * n / world, (r + 1) * n /
world)`` of q/k/v_proj (output rows) and the matching input columns of o_proj, whose output is summed
over ranks (all-reduce); with ``mlp=True`` gate/up_proj keep a slice of the intermediate rows and
down_proj the matching columns, again all-reduced. Build the cache with ``tp_size=world`` (or "auto").
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def _keep_rows(linear: torch.nn.Linear, begin: int, end: int) -> None:
    linear.weight = torch.nn.Parameter(linear.weight.data[begin:end].clone())
    if linear.bias is not None:
        linear.bias = torch.nn.Parameter(linear.bias.data[begin:end].clone())
    linear.out_features = end - begin


def _keep_cols(linear: torch.nn.Linear, begin: int, end: int, rank: int) -> None:
    linear.weight = torch.nn.Parameter(linear.weight.data[:, begin:end].clone())
    if linear.bias is not None and rank != 0:  # the bias is added once, by rank 0
        linear.bias = torch.nn.Parameter(torch.zeros_like(linear.bias.data))
    linear.in_features = end - begin


def _all_reduce_output(_module: Any, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(output)
    return output


def shard_heads(model: Any, rank: int | None = None, world: int | None = None, mlp: bool = True) -> Any:
    """Shard ``model`` (decoder layers at ``model.model.layers``, attention at ``self_attn``) in place
    for this rank of the default process group; returns the model."""
    rank = dist.get_rank() if rank is None else rank
    world = dist.get_world_size() if world is None else world
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    hq, hk = cfg.num_attention_heads, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // hq
    if hq % world or hk % world:
        raise ValueError(f"world size {world} must divide num_attention_heads={hq} and num_key_value_heads={hk}")
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, {world}), got {rank}")
    q, k = hq // world * d, hk // world * d
    for layer in model.model.layers:
        a = layer.self_attn
        _keep_rows(a.q_proj, rank * q, (rank + 1) * q)
        _keep_rows(a.k_proj, rank * k, (rank + 1) * k)
        _keep_rows(a.v_proj, rank * k, (rank + 1) * k)
        _keep_cols(a.o_proj, rank * q, (rank + 1) * q, rank)
        a.o_proj.register_forward_hook(_all_reduce_output)
        if mlp:
            m = layer.mlp
            inter = m.gate_proj.out_features
            if inter % world:
                raise ValueError(f"world size {world} must divide intermediate_size={inter}")
            n = inter // world
            _keep_rows(m.gate_proj, rank * n, (rank + 1) * n)
            _keep_rows(m.up_proj, rank * n, (rank + 1) * n)
            _keep_cols(m.down_proj, rank * n, (rank + 1) * n, rank)
            m.down_proj.register_forward_hook(_all_reduce_output)
    return model
