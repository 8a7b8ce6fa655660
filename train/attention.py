"""Attention kernels for Next-DiT over a right-padded batch of variable-length sequences.

Next-DiT's sequences differ in length inside a batch (caption lengths, image sizes), so the model
keeps them right-padded as (B, S, ...) and a `SeqBatch` says which tokens exist. It is built once
per forward and stage (context refiner, noise refiner, joint layers) and shared by every block, so
masks and varlen indices are computed once, not once per layer. Backends:

- "sdpa": `F.scaled_dot_product_attention` over the padded batch with a key-padding mask (or no
  mask when every sequence is full). Works everywhere; with a mask, CUDA SDPA cannot use its flash
  kernel and padded positions cost FLOPs.
- "flash_varlen": flash-attn's `flash_attn_varlen_func` (FA3 `flash_attn_interface` when installed,
  else FA2 `flash_attn`) over the packed valid tokens: no padding FLOPs, no mask, GQA native.
  CUDA with fp16/bf16 only.
- "torch_varlen": the same packing with one unmasked SDPA call per sequence. The reference for the
  flash path (tests pin the packing logic with it on CPU) and a fallback on GPUs without flash-attn
  (each call can take SDPA's flash kernel, since it has no mask).
- "auto": flash_varlen when flash-attn imports and the tensors are CUDA fp16/bf16, else sdpa.

All backends give the same output at valid positions; padded query rows are zero in the varlen
backends and unspecified (finite) in sdpa. Nothing downstream reads them.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "sdpa", "flash_varlen", "torch_varlen")

# kernel(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) -> (T, H, Dh),
# q (T, H, Dh), k and v (T, H_kv, Dh), H a multiple of H_kv; flash-attn's varlen signature.
VarlenKernel = Callable[..., torch.Tensor]


@functools.cache
def flash_varlen_kernel() -> VarlenKernel | None:
    """flash-attn's varlen function (FA3 preferred), or None when it is not installed."""
    try:
        from flash_attn_interface import flash_attn_varlen_func as fa3  # Hopper build (FA3)

        def kernel(q, k, v, cu_q, cu_k, max_q, max_k):
            out = fa3(q, k, v, cu_q, cu_k, max_q, max_k)
            return out[0] if isinstance(out, tuple) else out  # some FA3 versions also return the LSE

        return kernel
    except ImportError:
        pass
    try:
        from flash_attn import flash_attn_varlen_func as fa2

        return lambda q, k, v, cu_q, cu_k, max_q, max_k: fa2(q, k, v, cu_q, cu_k, max_q, max_k)
    except ImportError:
        return None


def torch_varlen_kernel(q, k, v, cu_q, cu_k, max_q, max_k) -> torch.Tensor:
    """Reference varlen attention: one unmasked SDPA per sequence, same signature as flash-attn's."""
    bounds_q, bounds_k = cu_q.tolist(), cu_k.tolist()
    outs = []
    for i in range(len(bounds_q) - 1):
        qi = q[bounds_q[i] : bounds_q[i + 1]].transpose(0, 1)[None]  # (1, H, T_i, Dh)
        ki = k[bounds_k[i] : bounds_k[i + 1]].transpose(0, 1)[None]
        vi = v[bounds_k[i] : bounds_k[i + 1]].transpose(0, 1)[None]
        outs.append(F.scaled_dot_product_attention(qi, ki, vi, enable_gqa=True)[0].transpose(0, 1))
    return torch.cat(outs)


@dataclass
class SeqBatch:
    """B right-padded sequences of lengths `lens` in a (B, S) layout, and how to attend over them."""

    lens: list[int]
    S: int
    backend: str
    mask: torch.Tensor | None  # (B, S) bool, True where a token exists; None when all are full
    cu_seqlens: torch.Tensor | None  # (B + 1,) int32, varlen backends only
    indices: torch.Tensor | None  # (T,) positions of the valid tokens in the flattened (B * S)

    @classmethod
    def build(cls, lens: list[int], S: int, device, backend: str = "sdpa") -> SeqBatch:
        assert backend in BACKENDS and backend != "auto", f"unresolved attention backend {backend!r}"
        assert max(lens) <= S and min(lens) > 0, f"sequence lengths {lens} must lie in 1..{S}"
        full = all(n == S for n in lens)
        mask = cu = idx = None
        if not full:
            mask = torch.arange(S, device=device)[None] < torch.tensor(lens, device=device)[:, None]
        if backend != "sdpa":
            cu = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=device)
            idx = None if full else torch.cat([torch.arange(n, device=device) + i * S for i, n in enumerate(lens)])
        return cls(lens, S, backend, mask, cu, idx)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (B, S, H, Dh), k and v (B, S, H_kv, Dh) -> (B, S, H, Dh)."""
        B, S, H, Dh = q.shape
        if self.backend == "sdpa":
            attn_mask = None if self.mask is None else self.mask[:, None, None, :]  # keys that exist
            o = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask, enable_gqa=True
            )
            return o.transpose(1, 2)
        kernel = torch_varlen_kernel if self.backend == "torch_varlen" else flash_varlen_kernel()
        if kernel is None:
            raise RuntimeError(
                "attention backend 'flash_varlen' needs flash-attn: pip install flash-attn "
                "(CUDA), or use backend 'sdpa' / 'torch_varlen'"
            )
        if self.indices is None:  # every sequence full: packing is a reshape
            o = kernel(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), self.cu_seqlens, self.cu_seqlens, S, S)
            return o.view(B, S, H, Dh)
        pack = lambda x: x.flatten(0, 1).index_select(0, self.indices)  # noqa: E731  (T, H, Dh)
        m = max(self.lens)
        o = kernel(pack(q), pack(k), pack(v), self.cu_seqlens, self.cu_seqlens, m, m)
        return q.new_zeros(B * S, H, Dh).index_copy(0, self.indices, o).view(B, S, H, Dh)


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """'auto' -> flash_varlen on CUDA fp16/bf16 with flash-attn installed, else sdpa."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} not one of {BACKENDS}")
    if backend != "auto":
        return backend
    fast = device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
    return "flash_varlen" if fast and flash_varlen_kernel() is not None else "sdpa"
