"""Grouped-query attention without copying keys and values, for the engine on CPU.

Transformers' SDPA path expands a GQA model's keys and values to every query head
(``repeat_kv``) whenever an attention mask is given, because CUDA's fused kernels cannot take
both. Our decode loop always passes a mask (rows are left-padded to one width), so on CPU every
layer of every step copied the whole KV cache: for SmolLM2-135M (9 query heads, 3 KV heads) at
32 rows x 450 positions that was 8 ms of a layer's 9 ms. PyTorch's CPU kernel takes
``enable_gqa=True`` with a mask and gives the same numbers, so CPU engines use it.
"""
from __future__ import annotations

from typing import Any

import torch

NAME = "sdpa_gqa_cpu"


def sdpa_gqa_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Transformers' SDPA attention, except that a masked GQA call on CPU lets the kernel share
    each KV head across its query heads instead of copying it; anything else is handed to
    transformers' own function unchanged."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    plain = (attention_mask is None or groups <= 1 or query.device.type != "cpu"
             or kwargs.get("position_bias") is not None or kwargs.get("cache") is not None
             or kwargs.get("output_attentions", False))
    if plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    # with a mask transformers never sets is_causal (the mask carries causality)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                           dropout_p=dropout, scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def use_gqa_sdpa_on_cpu(model: torch.nn.Module) -> bool:
    """Switch a CPU model that uses SDPA with grouped-query attention to :func:`sdpa_gqa_forward`.
    Returns whether it was switched (other models, devices and attention kinds are left alone)."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "_attn_implementation", None) != "sdpa":
        return False
    heads, kv = getattr(cfg, "num_attention_heads", None), getattr(cfg, "num_key_value_heads", None)
    if not heads or not kv or kv >= heads or next(model.parameters()).device.type != "cpu":
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, sdpa_gqa_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # the same masks as SDPA (else none: not causal)
    try:
        model.set_attn_implementation(NAME)
    except (ValueError, AttributeError, KeyError):  # an older transformers or a model that cannot switch
        return False
    return cfg._attn_implementation == NAME
