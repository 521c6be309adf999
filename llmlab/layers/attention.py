"""Causal self-attention: multi-head (MHA), grouped-query (GQA) and multi-query (MQA).

Taught in notebook 04 (attention) and notebook 05 (causal mask).

    scores  = Q @ K^T / sqrt(head_dim)       how much each token asks of each other token
    scores  = -inf above the diagonal        a token may not look at later tokens (notebook 05)
    weights = softmax(scores)                each row sums to 1
    out     = weights @ V                    the context vectors

``scaled_dot_product_attention_reference`` spells this out; the module uses
PyTorch's fused ``scaled_dot_product_attention`` (same numbers, less memory)
unless you ask to see the weights.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from llmlab.cache import KVCache
from llmlab.config import ModelConfig
from llmlab.layers.norm import RMSNorm
from llmlab.layers.positional import RotaryEmbedding


def causal_mask(
    n_queries: int, n_keys: int | None = None, device: torch.device | None = None
) -> torch.Tensor:
    """Boolean ``[n_queries, n_keys]`` mask, True where a query may look (notebook 05).

    With ``n_keys == n_queries`` (the default) it is lower-triangular: row ``i``
    sees columns ``0..i``.  With more keys than queries (the queries are the
    *last* ``n_queries`` tokens, as when decoding with a KV cache), query ``i``
    sees keys ``0 .. n_keys - n_queries + i``.
    """
    n_keys = n_queries if n_keys is None else n_keys
    ones = torch.ones(n_queries, n_keys, dtype=torch.bool, device=device)
    return ones.tril(diagonal=n_keys - n_queries)


def attention_mask(
    n_queries: int, n_keys: int, key_mask: torch.Tensor | None = None, device: torch.device | None = None
) -> torch.Tensor:
    """Where each query may look: causal, and (with ``key_mask``) never at padding (notebook 09).

    ``key_mask`` is ``[batch, n_keys]``, True for real tokens (left-padding in a
    batch is False; so are the empty slots of a fixed-shape cache step).  The
    result is ``[n_queries, n_keys]`` without ``key_mask`` and
    ``[batch, 1, n_queries, n_keys]`` with it.  A query that may see nothing (a
    padding query before the first real token) sees itself, so no row is empty.
    """
    allowed = causal_mask(n_queries, n_keys, device=device)
    if key_mask is None:
        return allowed
    allowed = allowed & key_mask.bool()[:, None, None, :]
    itself = torch.zeros(n_queries, n_keys, dtype=torch.bool, device=device)
    rows = torch.arange(n_queries, device=device)
    itself[rows, n_keys - n_queries + rows] = True
    return allowed | (itself & ~allowed.any(dim=-1, keepdim=True))


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """``[batch, kv_heads, seq, d]`` -> ``[batch, kv_heads * n_rep, seq, d]`` (notebook 04).

    Each key/value head is copied for the ``n_rep`` query heads of its group.
    Only the reference path does this; the fast path shares the heads without copying.
    """
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def scaled_dot_product_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention written out step by step; returns ``(out, weights)`` (notebooks 04 and 05).

    ``q`` is ``[batch, heads, n_queries, head_dim]``; ``k`` and ``v`` are
    ``[batch, kv_heads, n_keys, head_dim]`` where ``kv_heads`` divides ``heads``
    (fewer key/value heads = GQA/MQA).  ``weights`` is ``[batch, heads, n_queries, n_keys]``.
    ``mask`` (boolean, True = may look, broadcastable to the weights) replaces the causal mask.
    """
    n_rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is None and causal:
        mask = causal_mask(q.shape[-2], k.shape[-2], device=q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return weights @ v, weights


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with optional GQA, RoPE and QK-norm (notebook 04).

    Parameters are named like Hugging Face's Llama (``q_proj``, ``k_proj``,
    ``v_proj``, ``o_proj``), so checkpoints can be mapped onto them.  Queries
    have ``n_heads`` heads and keys/values ``n_kv_heads`` heads of size
    ``head_dim``.  With ``positional == "rope"`` queries and keys are rotated
    here; pass a shared ``rope`` module to avoid one table per layer.
    """

    def __init__(self, config: ModelConfig, rope: RotaryEmbedding | None = None) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.dropout = config.dropout
        qkv_bias = config.bias or config.qkv_bias  # Qwen2: biases on q, k, v only
        self.q_proj = nn.Linear(config.d_model, config.attention_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(config.d_model, config.kv_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(config.d_model, config.kv_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(config.attention_dim, config.d_model, bias=config.bias)
        if config.qk_norm:  # Qwen3: RMSNorm over each head's query and key, before RoPE
            self.q_norm = RMSNorm(config.head_dim, eps=config.norm_eps)
            self.k_norm = RMSNorm(config.head_dim, eps=config.norm_eps)
        else:
            self.q_norm = self.k_norm = None
        if config.positional == "rope" and rope is None:
            rope = RotaryEmbedding.from_config(config)
        self.rope = rope if config.positional == "rope" else None
        self.layer_idx = 0  # which layer of a KV cache this module reads and writes (set by Transformer)
        # A decoder is always causal.  Notebook 05 sets this to False on purpose, to show
        # what a model learns when every token can read the future.
        self.causal = True

    def split_heads(self, x: torch.Tensor, n_heads: int) -> torch.Tensor:
        """``[batch, seq, n_heads * head_dim]`` -> ``[batch, n_heads, seq, head_dim]``."""
        batch, seq, _ = x.shape
        return x.view(batch, seq, n_heads, self.head_dim).transpose(1, 2)

    def merge_heads(self, x: torch.Tensor) -> torch.Tensor:
        """``[batch, n_heads, seq, head_dim]`` -> ``[batch, seq, n_heads * head_dim]``."""
        batch, _, seq, _ = x.shape
        return x.transpose(1, 2).reshape(batch, seq, self.n_heads * self.head_dim)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor | None = None,
        return_weights: bool = False,
        cache: KVCache | None = None,
        key_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``x`` ``[batch, seq, d_model]`` -> ``(out [batch, seq, d_model], weights or None)``.

        ``positions`` (``[seq]`` or ``[batch, seq]``, default ``0..seq-1``) only
        matter with RoPE.  ``return_weights=True`` takes the reference path, so
        the returned ``[batch, heads, seq, n_keys]`` weights are the real ones
        (attention dropout is skipped on that path).  With a ``cache`` (notebook
        09) the new keys/values are stored in layer ``self.layer_idx`` and the
        queries attend to every stored position; ``key_mask`` ``[batch, n_keys]``
        marks real tokens (False for left-padding).
        """
        q = self.split_heads(self.q_proj(x), self.n_heads)
        k = self.split_heads(self.k_proj(x), self.n_kv_heads)
        v = self.split_heads(self.v_proj(x), self.n_kv_heads)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None:
            if positions is None:
                positions = torch.arange(x.shape[1], device=x.device)
            q, k = self.rope(q, positions), self.rope(k, positions)
        attend = functools.partial(self.attend, key_mask=key_mask, return_weights=return_weights)
        if cache is None:
            out, weights = attend(q, k, v)
        else:  # the cache stores k, v and attends over everything it holds (notebooks 09 and 11)
            out, weights = cache.attention(self.layer_idx, q, k, v, attend)
        return self.o_proj(self.merge_heads(out)), weights

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None,
               return_weights: bool = False, mask: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Queries ``q`` over keys ``k`` and values ``v``: causal, never at padding; ``(out, weights or None)``.

        The queries are the *last* ``q.shape[-2]`` of the ``k.shape[-2]`` positions.
        ``key_mask`` ``[batch, n_keys]`` marks real keys (False for left-padding).
        ``mask`` is a ready boolean mask (True = may look) used as it is: a caller that
        attends many layers with the same mask builds it once (notebook 11's paged cache).
        """
        if mask is None:
            mask = self.mask_for(q.shape[-2], k.shape[-2], key_mask, q.device)
        if return_weights:
            return scaled_dot_product_attention_reference(q, k, v, causal=self.causal, mask=mask)
        return self._fused_attention(q, k, v, mask), None

    def mask_for(self, n_queries: int, n_keys: int, key_mask: torch.Tensor | None,
                 device: torch.device) -> torch.Tensor | None:
        """Where each query may look; None when nothing needs hiding (or SDPA's own causal flag does it)."""
        if not self.causal:  # notebook 05's deliberate break: the future is visible
            return None if key_mask is None else key_mask.bool()[:, None, None, :]
        if key_mask is not None or 1 < n_queries != n_keys:
            # (one query, the newest token, may see every key: no mask needed)
            return attention_mask(n_queries, n_keys, key_mask, device=device)
        return None

    def _fused_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         mask: torch.Tensor | None) -> torch.Tensor:
        """PyTorch's fused attention; ``enable_gqa`` shares K/V heads without copying them."""
        return F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=mask,
            is_causal=self.causal and mask is None and q.shape[-2] > 1,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )
