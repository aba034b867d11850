"""``nn.MultiheadAttention`` after pruning: heads narrower than the embedding, the old scale.

Torch's attention forward takes every width from ``embed_dim``: the query must be that wide,
q/k/v are projected to it and split into ``num_heads`` heads of ``embed_dim // num_heads``, and
the scores are scaled by ``1/sqrt(head_dim)``. Pruning breaks all three: the residual stream
(query width, output width) and the heads' inner width shrink separately, and the pruned scores
equal those of the masked original only with the *original* scale.

Surgery therefore swaps a changed ``nn.MultiheadAttention`` to this subclass (its class only:
the parameters, their names and the state dict stay). Its forward takes every width from the
tensors it is given, splits heads by the projections' own widths, and scales by ``self.scale``.
It accepts the same arguments and returns the same values as torch's. Being a subclass,
``isinstance(m, nn.MultiheadAttention)`` still holds; ``_qkv_same_embed_dim`` is set False so
fused inference kernels that assume torch's layout (``nn.TransformerEncoderLayer``'s fast path)
are not taken.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["PrunedMultiheadAttention", "as_pruned"]


def _float_mask(mask: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """A boolean mask (True = do not attend) as an additive float mask, as torch reads it."""
    if mask is None:
        return None
    if mask.is_floating_point():
        return mask.to(dtype)
    return torch.zeros_like(mask, dtype=dtype).masked_fill(mask, float("-inf"))


class PrunedMultiheadAttention(nn.MultiheadAttention):
    """Multi-head attention whose widths come from its parameters, not from ``embed_dim``.

    Attributes (besides torch's): ``scale``, the score scale of the unpruned module.
    """

    scale: float

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Optional[Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        batched = query.dim() == 3
        packed = query is key and key is value  # self-attention: one projection matmul
        if not batched:  # (L, E): one sequence
            query, key, value = (t.unsqueeze(0) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:  # (L, B, E) -> (B, L, E)
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        bsz, tgt_len = query.shape[:2]
        heads = self.num_heads

        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint (as "
                               "nn.MultiheadAttention)")
        causal = is_causal and key_padding_mask is None and not need_weights
        mask = None if causal else _float_mask(attn_mask, query.dtype)
        padding = _float_mask(key_padding_mask, query.dtype)

        q, k, v = self._project(query, key, value, packed)
        extra = 0  # key positions appended after the projection
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.reshape(1, 1, -1).expand(bsz, 1, -1)], dim=1)
            v = torch.cat([v, self.bias_v.reshape(1, 1, -1).expand(bsz, 1, -1)], dim=1)
            extra += 1
        q, k, v = (t.reshape(bsz, t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(bsz, heads, 1, k.shape[-1])], dim=2)
            v = torch.cat([v, v.new_zeros(bsz, heads, 1, v.shape[-1])], dim=2)
            extra += 1
        if extra:  # the appended keys are attended to
            mask = None if mask is None else F.pad(mask, (0, extra))
            padding = None if padding is None else F.pad(padding, (0, extra))
        src_len = k.shape[2]
        if mask is not None:  # (L, S) or (B * heads, L, S)
            mask = (mask.reshape(1, 1, tgt_len, src_len) if mask.dim() == 2
                    else mask.reshape(bsz, heads, tgt_len, src_len))
        if padding is not None:
            padding = padding.reshape(bsz, 1, 1, src_len)
            mask = padding if mask is None else mask + padding
        dropout = self.dropout if self.training else 0.0

        weights: Optional[Tensor] = None
        if need_weights:
            scores = torch.matmul(q * self.scale, k.transpose(-2, -1))
            weights = torch.softmax(scores if mask is None else scores + mask, dim=-1)
            if dropout:
                weights = F.dropout(weights, dropout)
            out = torch.matmul(weights, v)
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not batched:
                weights = weights.squeeze(0)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                 is_causal=causal, scale=self.scale)
        out = self.out_proj(out.transpose(1, 2).reshape(bsz, tgt_len, -1))
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def _project(self, query: Tensor, key: Tensor, value: Tensor, packed: bool
                 ) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v in (B, L, width): one packed matmul for self-attention, as torch does."""
        bias = self.in_proj_bias
        if self.in_proj_weight is not None:
            if packed:
                qkv = F.linear(query, self.in_proj_weight, bias)
                return qkv.unflatten(-1, (3, -1)).unbind(-2)
            ws = self.in_proj_weight.chunk(3)
        else:
            ws = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
        bs = (None, None, None) if bias is None else bias.chunk(3)
        return tuple(F.linear(t, w, b) for t, w, b in zip((query, key, value), ws, bs))


def as_pruned(module: nn.MultiheadAttention) -> dict[str, object]:
    """The attributes that turn ``module`` (about to be resized) into a pruned one: its class,
    and the scale of the unpruned module (kept when it was pruned before)."""
    return {"__class__": PrunedMultiheadAttention, "_qkv_same_embed_dim": False,
            "scale": getattr(module, "scale", None) or float(module.head_dim) ** -0.5}
