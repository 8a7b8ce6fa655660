"""Unified Next-DiT (Lumina-Image 2.0): one stream of [text tokens ; image tokens], joint attention.

Parameter names follow the original Lumina-Image 2.0 release (`attention.qkv`, `feed_forward.w1`,
`adaLN_modulation.1`, `final_layer`, ...), so its checkpoints load as they are; train/convert.py
maps them to and from diffusers' Lumina2Transformer2DModel.

Per block (sandwich RMSNorm, timestep-only adaLN with scale and tanh gate, QK-norm, GQA, SwiGLU):
    h = attention_norm1(x) * (1 + scale_msa)
    x = x + tanh(gate_msa) * attention_norm2(Attn(h))
    x = x + tanh(gate_mlp) * ffn_norm2(FFN(ffn_norm1(x) * (1 + scale_mlp)))
Context-refiner blocks (text only) have no modulation; noise-refiner blocks (image only) have it.
Multi-axis RoPE over (axis0, row, col), head_dim = sum(axes_dims): text token i at (i, 0, 0),
image token (r, c) at (L_text, r, c), L_text being the sample's own (unpadded) caption length.
Images of any size and aspect ratio can share one batch: pass a list of (C, H, W) latents.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from train.attention import BACKENDS, SeqBatch, resolve_backend
from train.rope import RopeND, apply_rope, frame_code  # noqa: F401  (frame_code: a public name of this module)

# ---------------------------------------------------------------- configs


@dataclass(frozen=True)
class NextDiTConfig:
    dim: int = 2304
    n_layers: int = 26
    n_refiner_layers: int = 2
    n_heads: int = 24
    n_kv_heads: int = 8
    patch_size: int = 2
    in_channels: int = 16
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    cap_feat_dim: int = (
        2304  # the text encoder's width: Gemma-2-2B's hidden size (the trainer sets it from its encoder)
    )
    axes_dims: tuple[int, int, int] = (32, 32, 32)
    axes_lens: tuple[int, int, int] = (300, 512, 512)
    rope_theta: float = 10_000.0
    # + a fixed sin-cos code of each image token's place in the frame (not in the release: off there; see frame_code)
    frame_pos: bool = False

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_dim(self) -> int:
        inner = 4 * self.dim
        if self.ffn_dim_multiplier is not None:
            inner = int(self.ffn_dim_multiplier * inner)
        return self.multiple_of * ((inner + self.multiple_of - 1) // self.multiple_of)

    def __post_init__(self):
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"NextDiTConfig: dim {self.dim} must divide into n_heads {self.n_heads}, and n_heads "
                f"into n_kv_heads {self.n_kv_heads}"
            )
        if sum(self.axes_dims) != self.head_dim:
            raise ValueError(f"NextDiTConfig: axes_dims {self.axes_dims} must sum to head_dim {self.head_dim}")
        if any(d % 2 for d in self.axes_dims):
            raise ValueError(f"NextDiTConfig: every RoPE axis needs an even size, got {self.axes_dims}")


# The release: 2,609,769,152 parameters with Gemma-2-2B (cap_feat_dim 2304); 2.6B.
NextDiT_configs: dict[str, NextDiTConfig] = {
    "NextDiT_2B": NextDiTConfig(),
    # CPU-sized: tests, demo, overfitting checks
    "NextDiT_S": NextDiTConfig(dim=384, n_layers=6, n_heads=6, n_kv_heads=2, cap_feat_dim=64,
                               axes_dims=(16, 24, 24), multiple_of=64),
    # the CPU trainer configs and the demo: fits the tiny offline codecs (16 latent channels, 32-d text)
    "NextDiT_tiny": NextDiTConfig(dim=128, n_layers=4, n_refiner_layers=1, n_heads=4, n_kv_heads=2, cap_feat_dim=32,
                                  axes_dims=(8, 12, 12), multiple_of=64, in_channels=16),
    "NextDiT_XS": NextDiTConfig(dim=96, n_layers=2, n_refiner_layers=1, n_heads=3, n_kv_heads=1,
                                cap_feat_dim=32, axes_dims=(8, 12, 12), multiple_of=32, in_channels=4),
}  # fmt: skip  # the model table: one config an entry, its sizes side by side


# ---------------------------------------------------------------- building blocks


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5, affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch's rms_norm: one fused kernel on CUDA, fp32 accumulation for bf16/fp16 inputs
        w = None if self.weight is None else self.weight.to(x.dtype)
        return F.rms_norm(x, (x.shape[-1],), w, self.eps)


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10_000.0) -> torch.Tensor:
    """(B,) float timesteps -> (B, dim) [cos, sin] features."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, out_dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype))


class Attention(nn.Module):
    def __init__(self, cfg: NextDiTConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.dim, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, bias=False)
        self.out = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, eps=1e-5)
        self.k_norm = RMSNorm(cfg.head_dim, eps=1e-5)

    def forward(self, x, seqs: SeqBatch, rot):
        B, S, _ = x.shape  # (B, S, D)
        q, k, v = self.qkv(x).split([self.n_heads * self.hd, self.n_kv * self.hd, self.n_kv * self.hd], dim=-1)
        q = apply_rope(self.q_norm(q.view(B, S, self.n_heads, self.hd)), rot)
        k = apply_rope(self.k_norm(k.view(B, S, self.n_kv, self.hd)), rot)
        o = seqs.attend(q, k, v.view(B, S, self.n_kv, self.hd))  # (B, S, H, Dh)
        return self.out(o.reshape(B, S, self.n_heads * self.hd))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # in the input dtype, as the release and diffusers


class JointBlock(nn.Module):
    def __init__(self, cfg: NextDiTConfig, modulation: bool):
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_dim)
        self.attention_norm1 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention_norm2 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm1 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm2 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.modulation = modulation
        if modulation:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(min(cfg.dim, 1024), 4 * cfg.dim))

    def modulated_input(self, x, adaln) -> torch.Tensor:
        """What the attention of a modulated block reads: attention_norm1(x) * (1 + scale_msa), (B, S, D). The
        step cache (train/step_cache.py) watches it on the first block of the stack."""
        scale_msa = self.adaLN_modulation(adaln).unsqueeze(1).chunk(4, dim=-1)[0]
        return self.attention_norm1(x) * (1 + scale_msa)

    def forward(self, x, seqs: SeqBatch, rot, adaln=None):
        if not self.modulation:
            x = x + self.attention_norm2(self.attention(self.attention_norm1(x), seqs, rot))
            return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))
        scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(adaln).unsqueeze(1).chunk(4, dim=-1)
        h = self.attention(self.attention_norm1(x) * (1 + scale_msa), seqs, rot)
        x = x + gate_msa.tanh() * self.attention_norm2(h)
        h = self.feed_forward(self.ffn_norm1(x) * (1 + scale_mlp))
        return x + gate_mlp.tanh() * self.ffn_norm2(h)


class FinalLayer(nn.Module):
    def __init__(self, cfg: NextDiTConfig):
        super().__init__()
        self.norm_final = nn.LayerNorm(cfg.dim, eps=1e-6, elementwise_affine=False)
        self.linear = nn.Linear(cfg.dim, cfg.patch_size**2 * cfg.in_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(min(cfg.dim, 1024), cfg.dim))

    def forward(self, x, adaln):
        scale = self.adaLN_modulation(adaln)[:, None]
        return self.linear(self.norm_final(x) * (1 + scale))


# ---------------------------------------------------------------- the model


@dataclass
class Layout:
    """The t-independent part of a forward (NextDiT.layout): a sampler's steps share it."""

    cap: torch.Tensor  # (B, L, D) the context-refined caption
    cap_lens: list[int]
    grids: list[tuple[int, int]]  # image tokens (rows, cols) per sample
    img_lens: list[int]
    N: int  # image tokens, padded
    img_rot: torch.Tensor
    img_seqs: SeqBatch
    S: int  # joint tokens, padded
    rot: torch.Tensor
    seqs: SeqBatch


class NextDiT(nn.Module):
    def __init__(self, cfg: NextDiTConfig):
        super().__init__()
        self.cfg = cfg
        p, d = cfg.patch_size, cfg.dim
        self.x_embedder = nn.Linear(p * p * cfg.in_channels, d)
        self.t_embedder = TimestepEmbedder(min(d, 1024))
        self.cap_embedder = nn.Sequential(RMSNorm(cfg.cap_feat_dim, cfg.norm_eps), nn.Linear(cfg.cap_feat_dim, d))
        self.noise_refiner = nn.ModuleList(JointBlock(cfg, modulation=True) for _ in range(cfg.n_refiner_layers))
        self.context_refiner = nn.ModuleList(JointBlock(cfg, modulation=False) for _ in range(cfg.n_refiner_layers))
        self.layers = nn.ModuleList(JointBlock(cfg, modulation=True) for _ in range(cfg.n_layers))
        self.final_layer = FinalLayer(cfg)
        self.rope = RopeND(cfg.axes_dims, cfg.rope_theta)
        self.checkpoint_blocks: set[int] = set()  # indices into self.layers run with activation checkpointing
        self.attention_backend = "auto"  # see train/attention.py
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier linears; adaLN and final projections zeroed, so every block starts as the identity."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for block in [*self.noise_refiner, *self.layers]:
            nn.init.zeros_(block.adaLN_modulation[1].weight)
            nn.init.zeros_(block.adaLN_modulation[1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def set_activation_checkpointing(self, blocks: bool | list[int] = True) -> None:
        n = len(self.layers)
        self.checkpoint_blocks = set(range(n)) if blocks is True else set() if blocks is False else set(blocks)

    def compile_blocks(self, **compile_kwargs) -> None:
        """torch.compile each block in place (regional compilation: one compiled graph serves all the
        identical blocks, and compiles in seconds instead of minutes for the whole model). Defaults:
        fullgraph (the blocks have no graph breaks with sdpa; tested) and dynamic shapes (sequence
        lengths change every batch). torch_varlen is data-dependent and not meant to be compiled."""
        kw = {"fullgraph": True, "dynamic": True, **compile_kwargs}
        for blk in [*self.context_refiner, *self.noise_refiner, *self.layers]:
            blk.compile(**kw)

    def set_attention_backend(self, backend: str) -> None:
        """'auto' (flash-attn varlen on CUDA bf16/fp16 when installed, else SDPA), 'sdpa', 'flash_varlen',
        'torch_varlen'; all give the same output."""
        if backend not in BACKENDS:
            raise ValueError(f"attention backend {backend!r} not one of {BACKENDS}")
        self.attention_backend = backend

    # ---- patchify: (C, H, W) -> (h*w, p*p*C), features ordered (p_row, p_col, C) as in the release
    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        C, H, W = x.shape
        p = self.cfg.patch_size
        if H % p or W % p:
            raise ValueError(f"latent {H}x{W} not divisible by patch size {p}")
        return x.view(C, H // p, p, W // p, p).permute(1, 3, 2, 4, 0).reshape((H // p) * (W // p), p * p * C)

    def unpatchify(self, tokens: torch.Tensor, H: int, W: int) -> torch.Tensor:
        p, C = self.cfg.patch_size, self.cfg.in_channels
        return tokens.view(H // p, W // p, p, p, C).permute(4, 0, 2, 1, 3).reshape(C, H, W)

    def forward(
        self,
        x: torch.Tensor | list[torch.Tensor],
        t: torch.Tensor,
        cap_feats: torch.Tensor,
        cap_mask: torch.Tensor,
        cache=None,
    ) -> torch.Tensor | list[torch.Tensor]:
        """x: (B, C, H, W) or a list of (C, H_i, W_i); t: (B,); cap_feats: (B, L, cap_feat_dim);
        cap_mask: (B, L) bool, a prefix mask (valid length = sum). Returns the velocity, shaped as x.
        cache: a train.step_cache.BranchCache (sampling only): it keeps what does not depend on t (the refined
        caption, positions, rotations) across steps and may reuse the block stack's residual."""
        as_list = isinstance(x, list | tuple)
        xs = list(x) if as_list else list(x.unbind(0))
        B, dev = len(xs), cap_feats.device
        sizes = [tuple(xi.shape[-2:]) for xi in xs]
        if cache is None:
            lay = self.layout(cap_feats, cap_mask, sizes)
        else:  # the same caption tensors and sizes as the last step: the same layout, computed once
            lay = cache.memo((cap_feats, cap_mask, tuple(sizes)), lambda: self.layout(cap_feats, cap_mask, sizes))
        cap = lay.cap

        adaln = self.t_embedder(t)  # (B, min(D, 1024))
        # image tokens, right-padded to N (B, N, D)
        # ONE x_embedder call for the whole batch: every module runs once per forward whatever B is, so ZeRO-3
        # gathers the same parameters on every rank even when a bucket's last micro-batch is smaller on one
        # of them (a call per image made the ranks' collectives differ: a gloo size mismatch, an NCCL hang)
        tokens = self.x_embedder(torch.cat([self.patchify(xi) for xi in xs]).to(cap.dtype))  # (sum n_i, D)
        img = torch.zeros(B, lay.N, self.cfg.dim, device=dev, dtype=cap.dtype)
        for i, (part, (gh, gw)) in enumerate(zip(tokens.split(lay.img_lens), lay.grids, strict=True)):
            n = gh * gw
            img[i, :n] = part + frame_code(gh, gw, self.cfg.dim, dev).to(part.dtype) if self.cfg.frame_pos else part
        for blk in self.noise_refiner:
            img = blk(img, lay.img_seqs, lay.img_rot, adaln)

        # joint sequence [caption (valid) ; image (valid)], right-padded (B, S, D)
        h = torch.zeros(B, lay.S, self.cfg.dim, device=dev, dtype=cap.dtype)
        for i, (c, n) in enumerate(zip(lay.cap_lens, lay.img_lens, strict=True)):
            h[i, :c], h[i, c : c + n] = cap[i, :c], img[i, :n]
        h = self.run_layers(h, lay.seqs, lay.rot, adaln) if cache is None else cache.run_layers(self, h, lay, adaln)
        h = self.final_layer(h, adaln)  # (B, S, p*p*C)

        pairs = zip(lay.cap_lens, lay.img_lens, strict=True)
        out = [self.unpatchify(h[i, c : c + n], *sizes[i]) for i, (c, n) in enumerate(pairs)]
        return out if as_list else torch.stack(out)

    def run_layers(self, h: torch.Tensor, seqs: SeqBatch, rot, adaln) -> torch.Tensor:
        """The joint block stack, (B, S, D) -> (B, S, D)."""
        for j, blk in enumerate(self.layers):
            if j in self.checkpoint_blocks and torch.is_grad_enabled():
                h = checkpoint(blk, h, seqs, rot, adaln, use_reentrant=False)
            else:
                h = blk(h, seqs, rot, adaln)
        return h

    def layout(self, cap_feats: torch.Tensor, cap_mask: torch.Tensor, sizes: list[tuple[int, int]]) -> Layout:
        """Everything of a forward that does not depend on the image or t: the embedded and context-refined
        caption, the image and joint sequences' lengths, positions, rotations and attention layouts."""
        dev = cap_feats.device
        cap_mask = cap_mask.bool()
        cap_lens = cap_mask.sum(1).tolist()
        prefix = torch.arange(cap_mask.shape[1], device=dev)[None] < cap_mask.sum(1, keepdim=True)
        if not torch.equal(cap_mask, prefix):
            raise ValueError("cap_mask must be a prefix mask: valid tokens first, padding after")
        p = self.cfg.patch_size
        grids = [(h // p, w // p) for h, w in sizes]
        img_lens = [gh * gw for gh, gw in grids]
        B = len(sizes)

        cap = self.cap_embedder(cap_feats)  # (B, L, D)
        L, N = cap.shape[1], max(img_lens)
        backend = resolve_backend(self.attention_backend, cap.device, cap.dtype)
        # image token positions (L_text_i, row, col)
        img_pos = torch.zeros(B, N, 3, dtype=torch.long, device=dev)
        for i, (gh, gw) in enumerate(grids):
            rows = torch.arange(gh, device=dev).repeat_interleave(gw)
            cols = torch.arange(gw, device=dev).repeat(gh)
            img_pos[i, : gh * gw] = torch.stack([torch.full_like(rows, cap_lens[i]), rows, cols], dim=-1)
        cap_pos = torch.zeros(B, L, 3, dtype=torch.long, device=dev)
        cap_pos[..., 0] = torch.arange(L, device=dev)[None] * cap_mask  # padding positions: (0, 0, 0)

        rot = self.rope(cap_pos)
        seqs = SeqBatch.build(cap_lens, L, dev, backend)
        for blk in self.context_refiner:
            cap = blk(cap, seqs, rot)

        seq_lens = [c + n for c, n in zip(cap_lens, img_lens, strict=True)]
        S = max(seq_lens)
        pos = torch.zeros(B, S, 3, dtype=torch.long, device=dev)
        for i, (c, n) in enumerate(zip(cap_lens, img_lens, strict=True)):
            pos[i, :c], pos[i, c : c + n] = cap_pos[i, :c], img_pos[i, :n]
        img_seqs = SeqBatch.build(img_lens, N, dev, backend)
        seqs = SeqBatch.build(seq_lens, S, dev, backend)
        return Layout(cap, cap_lens, grids, img_lens, N, self.rope(img_pos), img_seqs, S, self.rope(pos), seqs)


def build_model(name_or_cfg: str | NextDiTConfig, **overrides) -> NextDiT:
    cfg = NextDiT_configs[name_or_cfg] if isinstance(name_or_cfg, str) else name_or_cfg
    if overrides:
        cfg = NextDiTConfig(**{**asdict(cfg), **overrides})
    return NextDiT(cfg)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":
    with torch.device("meta"):
        m = build_model("NextDiT_2B")
    print(f"NextDiT_2B: {count_parameters(m):,} parameters")  # 2,609,769,152
