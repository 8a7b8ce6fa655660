"""Text and image codecs of Lumina-Image 2.0: a Gemma-2 text encoder and the FLUX VAE.

Real ids (google/gemma-2-2b, black-forest-labs/FLUX.1-dev's vae) and local folders go through the
same code as the tiny offline builds: "tiny" (train.tiny_codecs: random weights, for tests of the
plumbing); for the text, "tiny-clip" (the text tower of the tiny CLIP trained here on synthetic image-caption
pairs, train.tiny_clip; the CPU stage configs use it, bench/results/text_encoder.json says why) and
"tiny-captioner" (the language model of the tiny UniCap trained here); for the VAE, "tiny-trained"
(train.tiny_vae: trained here on the synthetic images, so a Next-DiT trained on its latents samples images a
person can judge). The trained ones ship in models/.

Text (a language model): system prompt + " <Prompt Start> " + caption, right padding, the second-to-last hidden
state; an empty caption (CFG dropout / unconditional) is encoded the same way, with an empty caption. Text (an
open_clip folder: ClipTextEncoder): the caption alone, the text tower's token states after its final LayerNorm.
Latents: z = (vae.encode(image).mean - shift) * scale, the VAE config's shift_factor / scaling_factor
(FLUX: 0.1159, 0.3611; tiny-trained: measured on held-out images, so z is ~zero-mean, unit-variance).
"""

from __future__ import annotations

from pathlib import Path

import torch

from train.text_format import PROMPT_START, SYSTEM_PROMPT, format_prompt

__all__ = ["PROMPT_START", "SYSTEM_PROMPT", "ClipTextEncoder", "TextEncoder", "VAE", "format_prompt", "text_encoder"]
MIN_CAPTION_TOKENS = 32  # what model.text_max_length must leave for the caption after the system prompt
FLUX_SHIFT, FLUX_SCALE = 0.1159, 0.3611


TINY_NAMES = {"text": ("tiny", "tiny-captioner", "tiny-clip"), "vae": ("tiny", "tiny-trained")}


def _resolve(name: str, kind: str) -> str:
    """A model name -> what from_pretrained loads: the tiny offline builds' cached folders, else `name`."""
    if name == "tiny":
        from train import tiny_codecs

        return str(tiny_codecs.tiny_gemma2() if kind == "text" else tiny_codecs.tiny_flux_vae())
    if name == "tiny-captioner":
        if kind != "text":
            raise ValueError(f"{name!r} is a text encoder (the tiny captioner's language model)")
        from train.captioner import tiny

        return str(tiny.tiny_captioner())  # shipped in models/ (pipelines.tiny_models)
    if name == "tiny-clip":
        if kind != "text":
            raise ValueError(f"{name!r} is a text encoder (the text tower of the tiny CLIP trained here)")
        from train import tiny_clip

        return str(tiny_clip.tiny_clip())  # shipped in models/ (pipelines.tiny_models)
    if name == "tiny-trained":
        if kind != "vae":
            raise ValueError(f"{name!r} is a VAE (train.tiny_vae); the text encoder's tiny build is 'tiny'")
        from train import tiny_vae

        return str(tiny_vae.tiny_vae())  # trained on first use (~3.5 min on 2 cores), then cached
    return name


def text_encoder(
    name: str = "tiny", max_length: int = 256, system_prompt: str = SYSTEM_PROMPT, dtype: torch.dtype = torch.float32
) -> torch.nn.Module:
    """The text encoder `name` names: a CLIP text tower for an open_clip folder ("tiny-clip" is one), else a
    language model (transformers AutoModel: Gemma-2, the tiny captioner's). Both give (features, prefix mask)."""
    path = _resolve(name, "text")
    if (Path(path) / "open_clip_config.json").is_file():
        return ClipTextEncoder(name, path, max_length, dtype)
    return TextEncoder(name, max_length, system_prompt, dtype, path=path)


class TextEncoder(torch.nn.Module):
    def __init__(
        self,
        name: str = "tiny",
        max_length: int = 256,
        system_prompt: str = SYSTEM_PROMPT,
        dtype: torch.dtype = torch.float32,
        path: str | None = None,
    ):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        path = path or _resolve(name, "text")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokenizer.padding_side = "right"
        self.model = AutoModel.from_pretrained(path, dtype=dtype).eval().requires_grad_(False)
        self.max_length = max_length
        self.system_prompt = system_prompt
        self.name = name
        # the system prompt comes first and truncation cuts the end: a prompt that fills max_length leaves the
        # model blind to every caption (it trains on the marginal and ignores prompts), so refuse it here
        self.prefix_tokens = len(self.tokenizer(format_prompt("", system_prompt))["input_ids"])
        if max_length - self.prefix_tokens < MIN_CAPTION_TOKENS:
            raise ValueError(
                f"text encoder {name}: the system prompt takes {self.prefix_tokens} of model.text_max_length "
                f"{max_length} tokens, leaving {max_length - self.prefix_tokens} for the caption (at least "
                f"{MIN_CAPTION_TOKENS} needed): raise model.text_max_length"
            )

    @property
    def dim(self) -> int:
        return self.model.config.get_text_config().hidden_size  # a VLM's (the tiny captioner's) language model

    @torch.no_grad()
    def forward(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """captions -> features (B, L, dim) from the second-to-last layer, mask (B, L) bool (prefix)."""
        tok = self.tokenizer(
            [format_prompt(c, self.system_prompt) for c in captions],
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        dev = next(self.model.parameters()).device
        out = self.model(
            input_ids=tok.input_ids.to(dev), attention_mask=tok.attention_mask.to(dev), output_hidden_states=True
        )
        return out.hidden_states[-2], tok.attention_mask.to(dev).bool()


class ClipTextEncoder(torch.nn.Module):
    """The text tower of an open_clip CLIP as the DiT's text encoder (as Stable Diffusion uses CLIP's): the
    per-token states after the final LayerNorm. The caption is read bare: a CLIP trained without Lumina's system
    prompt has nothing to gain from it, and the prompt would take a third of its context."""

    def __init__(self, name: str, path: str, max_length: int = 256, dtype: torch.dtype = torch.float32):
        super().__init__()
        import open_clip

        spec = f"local-dir:{Path(path).resolve()}"
        self.model = open_clip.create_model(spec).eval().requires_grad_(False).to(dtype)
        self.tokenizer = open_clip.get_tokenizer(spec)
        self.context = self.model.positional_embedding.shape[0]
        self.max_length = min(max_length, self.context)
        self.pad_id = self.tokenizer.tokenizer.pad_token_id
        self.name, self.prefix_tokens, self.system_prompt = name, 0, ""

    @property
    def dim(self) -> int:
        return self.model.token_embedding.embedding_dim

    @torch.no_grad()
    def forward(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """captions -> features (B, L, dim), mask (B, L) bool (prefix: the caption's tokens and its <eos>)."""
        m = self.model
        dev = m.token_embedding.weight.device
        ids = self.tokenizer(list(captions)).to(dev)  # (B, context), padded, ends with <eos> (truncated first)
        x = m.token_embedding(ids) + m.positional_embedding
        x = m.ln_final(m.transformer(x, attn_mask=m.attn_mask))
        mask = ids != self.pad_id
        n = min(int(mask.sum(1).max()), self.max_length)
        return x[:, :n], mask[:, :n]


class VAE(torch.nn.Module):
    def __init__(self, name: str = "tiny", dtype: torch.dtype = torch.float32):
        super().__init__()
        from diffusers import AutoencoderKL

        path = _resolve(name, "vae")
        # a VAE folder itself, or a pipeline repo / folder holding it under vae/ (as FLUX.1 does)
        sub = {} if (Path(path) / "config.json").exists() else {"subfolder": "vae"}
        self.vae = AutoencoderKL.from_pretrained(path, dtype=dtype, **sub)
        self.vae.eval().requires_grad_(False)
        self.shift = self.vae.config.shift_factor if self.vae.config.shift_factor is not None else FLUX_SHIFT
        self.scale = self.vae.config.scaling_factor or FLUX_SCALE
        self.channels = self.vae.config.latent_channels
        self.factor = 2 ** (len(self.vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> latents (B, C, H/f, W/f), shifted and scaled."""
        z = self.vae.encode(images.to(self.vae.device, self.vae.dtype)).latent_dist.mean
        return (z - self.shift) * self.scale

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.to(self.vae.device, self.vae.dtype) / self.scale + self.shift
        return self.vae.decode(z).sample.clamp(-1, 1)
