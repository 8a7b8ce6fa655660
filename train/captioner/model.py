"""The captioner's training forward: a Qwen2-VL on packed rows (train.captioner.data), and its loss.

The vision tower runs once per image; its merged tokens replace the <|image_pad|> embeddings; the language
model runs on rows whose turns share the image prefix (a branch mask instead of the causal one) with each
turn's own 3D rope positions, so the result equals running every turn alone (tests/train/captioner).
Loss: cross-entropy on the answer tokens and their end token only, averaged over those tokens.

Grounding (optional, synthetic data): small linear heads read the vision tower's merged tokens and predict,
per token, the colour / shape / size class of the object under it, the background and the written word; a
`cell` head reads the language model's hidden state at the image tokens after layer `cell_layer` and
predicts the 3x3 cell of the token (the vision tower has no absolute positions; the LM's 3D rope has);
`read_*` heads read the same layer's state at every answer position and predict what the image holds (its
colours, shapes, pairs): they teach the language model to gather the image's content where it writes.
The heads are training aids: they are not part of the exported model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from train.captioner.data import GROUND_HEADS, IGNORE, IMAGE_SETS, MERGE, branch_mask

VISION_HEADS = ("colour", "shape", "size", "background", "word")
READ_SETS = ("image_colours", "image_shapes", "image_pairs")
# every grounding loss a step can report (which ones a batch has depends on its content): the trainer agrees
# on all of them in one fixed layout, the same on every rank
PART_NAMES = (
    *VISION_HEADS,
    "object_colour",
    "object_shape",
    "object_size",
    *IMAGE_SETS,
    "image_total",
    "cell",
    *(f"read_{name}" for name in READ_SETS),
)


class GroundingHeads(nn.Module):
    def __init__(self, hidden: int, heads: dict[str, int] = GROUND_HEADS):
        super().__init__()
        heads = {**heads, **{f"read_{k}": heads[k] for k in READ_SETS}}
        self.heads = nn.ModuleDict({k: nn.Linear(hidden, n) for k, n in heads.items()})

    def forward(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return self.heads[name](x)


class CaptionerModule(nn.Module):
    """The Qwen2-VL being trained and (optionally) its grounding heads, as one module for DeepSpeed."""

    def __init__(self, vlm: nn.Module, grounding: bool = False, cell_layer: int = 0):
        super().__init__()
        self.vlm = vlm
        hidden = vlm.config.text_config.hidden_size
        self.ground = GroundingHeads(hidden) if grounding else None
        self.cell_layer = cell_layer

    def forward(self, batch: dict, ground_only: bool = False) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        if ground_only:
            return None, ground_only_loss(self.vlm, self.ground, batch)
        return packed_loss(self.vlm, batch, self.ground, self.cell_layer)


def packed_forward(vlm, batch: dict, cell_layer: int = -1):
    """-> (final hidden states (B, L, D), vision tokens (sum N, D), hidden states after layer `cell_layer`
    (B, L, D) or None)."""
    inner = vlm.model
    lm = inner.language_model
    dtype = lm.embed_tokens.weight.dtype
    vision = inner.visual(batch["pixel_values"].to(dtype), grid_thw=batch["image_grid_thw"]).pooler_output
    ids = batch["input_ids"]
    image = ids == vlm.config.image_token_id
    emb = lm.embed_tokens(ids)
    emb = emb.masked_scatter(image[..., None], vision.to(emb.dtype))
    pe = lm.rotary_emb(emb, batch["positions"])
    mask = branch_mask(batch["segment"]).to(emb.device)
    h, at_cell = emb, None
    for i, layer in enumerate(lm.layers):
        h = layer(h, attention_mask=mask, position_embeddings=pe)
        if i == cell_layer:
            at_cell = h
    return lm.norm(h), vision, at_cell


def vision_ground_losses(ground: GroundingHeads, vision: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
    """Per-token heads on the merged vision tokens, and the image-level heads on every token of the image
    (multi-label for the sets, positives weighted up: most of the 72 groups are absent from any image)."""
    targets = {k: v.to(vision.device) for k, v in batch["ground"].items()}
    parts = {name: F.cross_entropy(ground(name, vision).float(), targets[name]) for name in VISION_HEADS}
    # per object: the mean of its tokens names its colour, shape and size (a cleaner signal than edge tokens)
    owner = targets["object"]
    n_objects = targets["object_shape"].shape[0]
    mine = owner >= 0
    if mine.any():
        sums = torch.zeros(n_objects, vision.shape[-1], device=vision.device, dtype=vision.dtype)
        sums = sums.index_add(0, owner[mine], vision[mine])
        counts = torch.bincount(owner[mine], minlength=n_objects)
        seen = counts > 0
        pooled = sums[seen] / counts[seen, None].to(vision.dtype)
        for name in ("colour", "shape", "size"):
            parts[f"object_{name}"] = F.cross_entropy(ground(name, pooled).float(), targets[f"object_{name}"][seen])
    sizes = (batch["image_grid_thw"].prod(-1) // MERGE**2).to(vision.device)
    image_of_token = torch.repeat_interleave(torch.arange(len(sizes), device=vision.device), sizes)
    for name in IMAGE_SETS:
        target = targets[name][image_of_token]
        pos_weight = torch.tensor(float(target.shape[-1]) / 4, device=vision.device)
        parts[name] = F.binary_cross_entropy_with_logits(ground(name, vision).float(), target, pos_weight=pos_weight)
    parts["image_total"] = F.cross_entropy(
        ground("image_total", vision).float(), targets["image_total"][image_of_token]
    )
    return parts


def ground_only_loss(vlm, ground: GroundingHeads, batch: dict) -> dict[str, torch.Tensor]:
    """The vision tower's grounding losses alone (no language model): the cheap first phase."""
    dtype = vlm.model.language_model.embed_tokens.weight.dtype
    vision = vlm.model.visual(batch["pixel_values"].to(dtype), grid_thw=batch["image_grid_thw"]).pooler_output
    return vision_ground_losses(ground, vision, batch)


def packed_loss(vlm, batch: dict, ground: GroundingHeads | None = None, cell_layer: int = 0):
    """Mean cross-entropy over answer tokens (+ their end token), and the grounding losses (a dict)."""
    use_cell = ground is not None and "ground" in batch
    h, vision, at_cell = packed_forward(vlm, batch, cell_layer if use_cell else -1)
    labels = batch["labels"]
    sel = labels != IGNORE
    logits = vlm.lm_head(h[sel]).float()
    caption = F.cross_entropy(logits, labels[sel])
    parts: dict[str, torch.Tensor] = {}
    if use_cell:
        targets = batch["ground"]
        parts.update(vision_ground_losses(ground, vision, batch))
        if at_cell is not None:
            image = batch["input_ids"] == vlm.config.image_token_id
            parts["cell"] = F.cross_entropy(ground("cell", at_cell[image]).float(), targets["cell"].to(vision.device))
            # reading: at every answer position, what the image holds (its sets), from the mid-layer state
            rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(labels)[sel]
            for name in READ_SETS:
                target = targets[name].to(vision.device)[rows]
                pos_weight = torch.tensor(float(target.shape[-1]) / 4, device=vision.device)
                parts[f"read_{name}"] = F.binary_cross_entropy_with_logits(
                    ground(f"read_{name}", at_cell[sel]).float(), target, pos_weight=pos_weight
                )
    return caption, parts
