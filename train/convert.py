"""Weights to and from diffusers' Lumina2Transformer2DModel and the original Lumina-Image 2.0 release.

unicap's NextDiT uses the original release's parameter names, so a release checkpoint loads with
`from_original` (which only strips a ComfyUI prefix and the release's unused `norm_final.weight`).
diffusers renames most keys and splits the fused qkv projection into to_q / to_k / to_v.

    python -m train.convert --to diffusers runs/stage3/final out_dir/   # a diffusers model folder
    python -m train.convert --to diffusers release.safetensors out_dir/ --config NextDiT_2B
    python -m train.convert --to unicap diffusers_dir/ weights_dir/

Sources are read without unpickling: weights folders and .safetensors files as they are, a release
`.pth` with torch.load(weights_only=True) (tensors only; a file that needs more is refused).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import uuid
from pathlib import Path

import torch
from safetensors.torch import save_file

from train.checkpoint import load_weights, save_weights
from train.model import NextDiT, NextDiTConfig
from train.run_store import is_uri, local_weights
from unicap.contract import checkpoint as contract

# (ours, diffusers) key fragments, applied in order; block-level renames work for every block kind
_TOP = [
    ("t_embedder.mlp.0.", "time_caption_embed.timestep_embedder.linear_1."),
    ("t_embedder.mlp.2.", "time_caption_embed.timestep_embedder.linear_2."),
    ("cap_embedder.", "time_caption_embed.caption_embedder."),
    ("final_layer.adaLN_modulation.1.", "norm_out.linear_1."),
    ("final_layer.linear.", "norm_out.linear_2."),
]
_BLOCK = [
    (".attention.out.", ".attn.to_out.0."),
    (".attention.q_norm.", ".attn.norm_q."),
    (".attention.k_norm.", ".attn.norm_k."),
    (".feed_forward.w1.", ".feed_forward.linear_1."),
    (".feed_forward.w2.", ".feed_forward.linear_2."),
    (".feed_forward.w3.", ".feed_forward.linear_3."),
    (".adaLN_modulation.1.", ".norm1.linear."),
    (".attention_norm2.", ".norm2."),
]
_BLOCK_RE = re.compile(r"^(noise_refiner|context_refiner|layers)\.(\d+)\.")


DIFFUSERS_ROPE_THETA = 10_000.0  # Lumina2Transformer2DModel's, fixed (not in its config)


def not_in_diffusers(cfg: NextDiTConfig) -> str | None:
    """Why Lumina2Transformer2DModel cannot hold NextDiT(cfg), or None when it can."""
    if cfg.rope_theta != DIFFUSERS_ROPE_THETA:
        return f"rope_theta {cfg.rope_theta:g}: diffusers' Lumina2 fixes the RoPE base at {DIFFUSERS_ROPE_THETA:g}"
    if cfg.frame_pos:
        return "frame_pos: diffusers' Lumina2 has no frame position code"
    return None


def diffusers_config(cfg: NextDiTConfig) -> dict:
    """Lumina2Transformer2DModel(**this) has the same architecture as NextDiT(cfg)."""
    if reason := not_in_diffusers(cfg):
        raise ValueError(f"no diffusers export: {reason}")
    return dict(
        sample_size=128,
        patch_size=cfg.patch_size,
        in_channels=cfg.in_channels,
        out_channels=None,
        hidden_size=cfg.dim,
        num_layers=cfg.n_layers,
        num_refiner_layers=cfg.n_refiner_layers,
        num_attention_heads=cfg.n_heads,
        num_kv_heads=cfg.n_kv_heads,
        multiple_of=cfg.multiple_of,
        ffn_dim_multiplier=cfg.ffn_dim_multiplier,
        norm_eps=cfg.norm_eps,
        scaling_factor=1.0,
        axes_dim_rope=tuple(cfg.axes_dims),
        axes_lens=tuple(cfg.axes_lens),
        cap_feat_dim=cfg.cap_feat_dim,
    )


def config_from_diffusers(config) -> NextDiTConfig:
    c = dict(config)
    if c.get("out_channels") not in (None, c["in_channels"]):
        raise ValueError(
            f"out_channels {c['out_channels']} != in_channels {c['in_channels']}: NextDiT predicts "
            "as many channels as it reads"
        )
    return NextDiTConfig(
        dim=c["hidden_size"],
        n_layers=c["num_layers"],
        n_refiner_layers=c["num_refiner_layers"],
        n_heads=c["num_attention_heads"],
        n_kv_heads=c["num_kv_heads"],
        patch_size=c["patch_size"],
        in_channels=c["in_channels"],
        multiple_of=c["multiple_of"],
        ffn_dim_multiplier=c["ffn_dim_multiplier"],
        norm_eps=c["norm_eps"],
        cap_feat_dim=c["cap_feat_dim"],
        axes_dims=tuple(c["axes_dim_rope"]),
        axes_lens=tuple(c["axes_lens"]),
    )


def _rename(key: str, to_diffusers: bool) -> str:
    pairs = [*_TOP, *_BLOCK]
    if not to_diffusers:
        pairs = [(b, a) for a, b in pairs]
    block = _BLOCK_RE.match(key)
    # attention_norm1 is norm1.norm in modulated blocks, norm1 itself in the context refiner
    if block:
        modulated = block.group(1) != "context_refiner"
        n1_ours, n1_diff = ".attention_norm1.", ".norm1.norm." if modulated else ".norm1."
        if to_diffusers and n1_ours in key:
            return key.replace(n1_ours, n1_diff)
        if not to_diffusers and n1_diff in key and ".norm1.linear." not in key:
            return key.replace(n1_diff, n1_ours)
    for a, b in pairs:
        if a in key:
            return key.replace(a, b)
    return key


def to_diffusers(state: dict[str, torch.Tensor], cfg: NextDiTConfig) -> dict[str, torch.Tensor]:
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    out = {}
    for k, v in state.items():
        if k.endswith(".attention.qkv.weight"):
            base = k[: -len("attention.qkv.weight")]
            out[base + "attn.to_q.weight"], out[base + "attn.to_k.weight"], out[base + "attn.to_v.weight"] = v.split(
                [q, kv, kv], dim=0
            )
        else:
            out[_rename(k, True)] = v
    return out


def from_diffusers(state: dict[str, torch.Tensor], cfg: NextDiTConfig) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        if k.endswith(".attn.to_q.weight"):
            base = k[: -len("attn.to_q.weight")]
            out[base + "attention.qkv.weight"] = torch.cat(
                [v, state[base + "attn.to_k.weight"], state[base + "attn.to_v.weight"]], dim=0
            )
        elif k.endswith((".attn.to_k.weight", ".attn.to_v.weight")):
            continue
        else:
            out[_rename(k, False)] = v
    return out


def from_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Lumina-Image 2.0 release state dict (or a ComfyUI one) -> NextDiT's."""
    out = {k.replace("model.diffusion_model.", ""): v for k, v in state.items()}
    out.pop("norm_final.weight", None)  # present in the release, used by nothing
    return out


def diffusers_model_from(model: NextDiT):
    from diffusers import Lumina2Transformer2DModel

    ref = Lumina2Transformer2DModel(**diffusers_config(model.cfg))
    ref.load_state_dict(to_diffusers(model.state_dict(), model.cfg), strict=True)
    return ref


def nextdit_from_diffusers(ref) -> NextDiT:
    cfg = config_from_diffusers(ref.config)
    model = NextDiT(cfg)
    model.load_state_dict(from_diffusers(ref.state_dict(), cfg), strict=True)
    return model


def diffusers_velocity(transformer, branches: dict[bool, tuple[torch.Tensor, torch.Tensor]]):
    """A train.sampler VelocityFn over diffusers' Lumina2Transformer2DModel: the solvers of train/sampler.py drive
    an exported (or any Lumina2) transformer as they drive NextDiT (the same time and velocity convention, tested).
    branches: {conditional: (caption features, prefix mask)}. The step cache hooks NextDiT's block stack and does
    not apply here; cache-dit does that for diffusers' pipeline."""

    def velocity(x, t, conditional):
        feats, mask = branches[bool(conditional)]
        return transformer(x, t, feats, mask, return_dict=False)[0]

    return velocity


def export_diffusers(folder: str | Path, weights: str = contract.MODEL_FILE) -> Path:
    """`folder`/diffusers: a Lumina2Transformer2DModel folder (config.json + safetensors), written atomically
    beside the weights folder's own files; what `Lumina2Transformer2DModel.from_pretrained` loads."""
    folder = Path(folder)
    model, _ = load_weights(folder, weights)
    out = folder / contract.DIFFUSERS_DIR
    tmp = folder / f".{contract.DIFFUSERS_DIR}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    config = {"_class_name": "Lumina2Transformer2DModel", **diffusers_config(model.cfg)}
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    tensors = {k: v.contiguous() for k, v in to_diffusers(model.state_dict(), model.cfg).items()}
    save_file(tensors, str(tmp / "diffusion_pytorch_model.safetensors"))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def _release_state(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("model", state) if isinstance(state, dict) else state


def main(argv: list[str] | None = None) -> int:
    from train.model import NextDiT_configs

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--to", choices=["diffusers", "unicap"], required=True)
    p.add_argument(
        "--config",
        default="NextDiT_2B",
        choices=sorted(NextDiT_configs),
        help="model config of a release weights file (weights folders carry their own)",
    )
    p.add_argument("--weights", default="model.safetensors", help="file inside a weights folder")
    p.add_argument("--text-encoder", default="google/gemma-2-2b", help="recorded with --to unicap")
    p.add_argument("--vae", default="black-forest-labs/FLUX.1-dev", help="recorded with --to unicap")
    p.add_argument("src")
    p.add_argument("dst")
    args = p.parse_args(argv)
    if args.to == "diffusers":
        if is_uri(args.src) or Path(args.src).is_dir():  # a weights folder; a URI is downloaded first
            model, _ = load_weights(local_weights(args.src), args.weights)
        else:
            state = from_original(_release_state(args.src))  # refused here, before a 2.6B model is built
            model = NextDiT(NextDiT_configs[args.config])
            model.load_state_dict(state)
        if reason := not_in_diffusers(model.cfg):
            print(f"{args.src}: no diffusers export: {reason}", file=sys.stderr)
            return 2
        diffusers_model_from(model).save_pretrained(args.dst)
    else:
        from diffusers import Lumina2Transformer2DModel

        model = nextdit_from_diffusers(Lumina2Transformer2DModel.from_pretrained(args.src))
        save_weights(args.dst, model, args.text_encoder, args.vae)
    print(f"wrote {args.dst}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
