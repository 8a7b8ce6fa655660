"""CLIP scoring with open_clip: image and text embeddings, long captions, the aesthetic head.

Model specs: "tiny" (random small config built offline, `tiny_clip` below), "NAME:TAG" (an
open_clip pretrained tag, e.g. ViT-L-14:datacomp_xl_s13b_b90k; downloads, so not on these
machines), "NAME:/path/to/checkpoint.(pt|safetensors)" (local weights), "NAME" (random), or a folder
(open_clip's `local-dir:`: open_clip_config.json, weights, tokenizer; the tiny CLIP trained here,
train.tiny_clip, is one).

Long captions: CLIP's text tower reads 77 tokens. A caption longer than that is split at sentence
boundaries (and, for an over-long sentence, at word boundaries) into chunks that each fit; every
chunk is embedded, the unit embeddings are averaged weighted by chunk token count and renormalised.
The score is the cosine between that and the image embedding, so every part of a long caption
counts and nothing is silently cut off.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from unicap import runtime
from unicap.tiny_build import DONE_MARK, cached

SENTENCE = re.compile(r"(?<=[.!?。！？;；])\s*")


class AestheticHead(torch.nn.Module):
    """LAION aesthetic-predictor MLP over a unit CLIP image embedding -> a score (about 1-10 when trained)."""

    def __init__(self, dim: int):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(dim, 1024),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(1024, 128),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64),
            torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1),
        )

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.layers(emb).squeeze(-1)


def load_clip(spec: str, device: str = "cpu"):
    """(model, preprocess, tokenizer, name) for a model spec (see module docstring)."""
    import open_clip

    if spec == "tiny":
        folder = tiny_clip()
        open_clip.add_model_config(folder)
        name, pretrained = TINY_CLIP_NAME, str(folder / "open_clip_model.safetensors")
    elif spec.startswith("local-dir:") or Path(spec).is_dir():  # config, weights and tokenizer in one folder
        name = f"local-dir:{Path(spec.removeprefix('local-dir:')).resolve()}"
        model, _, preprocess = open_clip.create_model_and_transforms(name, device=device)
        return model.eval(), preprocess, open_clip.get_tokenizer(name), name
    else:
        name, _, pretrained = spec.partition(":")
        pretrained = pretrained or None
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=device)
    return model.eval(), preprocess, open_clip.get_tokenizer(name), name


class ClipScorer:
    def __init__(self, spec: str = "tiny", aesthetic: str | None = None, device: str = "cpu", autocast: bool = True):
        self.model, self.preprocess, self.tokenizer, self.name = load_clip(spec, device)
        self.spec, self.device = spec, device
        self.context = getattr(self.model, "context_length", 77) or 77
        # bf16 autocast: on CUDA always when asked; on CPU where oneDNN can run it (AMX)
        self.autocast = runtime.autocast_enabled(device, autocast)
        dim = self.model.text_projection.shape[-1] if hasattr(self.model, "text_projection") else None
        self.aesthetic = None
        if aesthetic:
            state = torch.load(aesthetic, map_location="cpu", weights_only=True)
            dim = state["layers.0.weight"].shape[1]
            self.aesthetic = AestheticHead(dim).eval()
            self.aesthetic.load_state_dict(state)

    def _ctx(self):
        kind = torch.device(self.device).type
        return torch.autocast(kind, dtype=torch.bfloat16) if self.autocast else torch.autocast(kind, enabled=False)

    @torch.no_grad()
    def embed_images(self, images: list[Image.Image]) -> np.ndarray:
        if not images:
            return np.zeros((0, 0), np.float32)
        x = torch.stack([self.preprocess(im) for im in images]).to(self.device)
        with self._ctx():
            e = self.model.encode_image(x).float()
        return torch.nn.functional.normalize(e, dim=-1).cpu().numpy()

    def n_tokens(self, text: str) -> int:
        ids = self.tokenizer([text], context_length=10_000)[0] if _takes_context(self.tokenizer) else None
        if ids is None:
            return len(text.split()) + 2
        return int((ids != 0).sum())

    def chunks(self, text: str) -> list[str]:
        """Split a caption into pieces that each fit the text tower (sentence, then word boundaries)."""
        limit = self.context - 2  # start / end tokens
        if self.n_tokens(text) - 2 <= limit:
            return [text]
        pieces, out, cur = [s for s in SENTENCE.split(text) if s.strip()], [], ""
        for s in pieces:
            if self.n_tokens(s) - 2 > limit:  # one sentence too long on its own: split by words
                words, part = s.split(), ""
                for w in words:
                    cand = f"{part} {w}".strip()
                    if part and self.n_tokens(cand) - 2 > limit:
                        out.append(part)
                        cand = w
                    part = cand
                s = part
            cand = f"{cur} {s}".strip()
            if cur and self.n_tokens(cand) - 2 > limit:
                out.append(cur)
                cand = s
            cur = cand
        if cur:
            out.append(cur)
        return out

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """Unit text embeddings; long texts are chunked and the chunk embeddings averaged (module docstring)."""
        if not texts:
            return np.zeros((0, 0), np.float32)
        all_chunks, owner, weight = [], [], []
        for i, t in enumerate(texts):
            for c in self.chunks(t):
                all_chunks.append(c)
                owner.append(i)
                weight.append(max(self.n_tokens(c) - 2, 1))
        tok = self.tokenizer(all_chunks).to(self.device)
        with self._ctx():
            e = torch.nn.functional.normalize(self.model.encode_text(tok).float(), dim=-1)
        w = torch.tensor(weight, dtype=torch.float32)[:, None]
        out = torch.zeros(len(texts), e.shape[1])
        out.index_add_(0, torch.tensor(owner), e.cpu() * w)
        return torch.nn.functional.normalize(out, dim=-1).numpy()

    @torch.no_grad()
    def aesthetic_scores(self, image_emb: np.ndarray) -> np.ndarray | None:
        if self.aesthetic is None or len(image_emb) == 0:
            return None
        return self.aesthetic(torch.from_numpy(image_emb).float()).numpy()


def _takes_context(tokenizer) -> bool:
    try:
        tokenizer(["a"], context_length=8)
        return True
    except TypeError:
        return False


# ---------------------------------------------------------------- offline tiny builds (unicap.tiny_build)

TINY_CLIP_VERSION = "2"  # bump when a build below changes
TINY_AESTHETIC_VERSION = "1"
TINY_CLIP_NAME = "unicap-tiny-clip"
TINY_CLIP_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def _build_clip(out: Path, seed: int) -> None:
    import open_clip
    from safetensors.torch import save_file

    (out / f"{TINY_CLIP_NAME}.json").write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(out)
    torch.manual_seed(seed)
    model = open_clip.create_model(TINY_CLIP_NAME, pretrained=None)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "open_clip_model.safetensors"))
    (out / DONE_MARK).write_text(json.dumps({"kind": "tiny-clip", "version": TINY_CLIP_VERSION, "seed": seed}))


def tiny_clip(seed: int = 0, root: Path | None = None) -> Path:
    """Folder with an open_clip model config (`unicap-tiny-clip.json`) and random weights."""
    return cached(f"tiny-clip-{TINY_CLIP_VERSION}-{seed}", lambda p: _build_clip(p, seed), root)


def tiny_aesthetic_head(dim: int, seed: int = 0, root: Path | None = None) -> Path:
    """A LAION-style aesthetic MLP head with random weights, saved as a state_dict file."""

    def build(p: Path) -> None:
        torch.manual_seed(seed)
        torch.save(AestheticHead(dim).state_dict(), p / "aesthetic.pt")
        mark = {"kind": "tiny-aesthetic", "version": TINY_AESTHETIC_VERSION, "dim": dim, "seed": seed}
        (p / DONE_MARK).write_text(json.dumps(mark))

    return cached(f"tiny-aesthetic-{TINY_AESTHETIC_VERSION}-{dim}-{seed}", build, root) / "aesthetic.pt"
