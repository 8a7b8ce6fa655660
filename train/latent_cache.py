"""Latents of the samples a rank has encoded before, so that a multi-epoch run encodes each image once.

The VAE is frozen and the trainer encodes the latent distribution's mean of an un-augmented image, so a sample's
latent is the same every time it is drawn: a cache of it changes what the model sees only by the float rounding
of encoding it in another batch. It pays where a small stage is read for many epochs (the CPU demo: 80 epochs of
160 images, where encoding was ~12% of a step); a one-pass run over a large pool gets no hits, so it is off by
default (`data.latent_cache_mb: 0`). Entries stay on the latents' device, least recently used first out.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch


class LatentCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max(0, int(max_bytes))
        self.bytes = 0
        self.hits = self.misses = 0
        self._entries: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def encode(
        self,
        encode: Callable[[torch.Tensor], torch.Tensor],
        images: torch.Tensor,
        keys: Sequence[str],
        bucket: tuple[int, int],
    ) -> torch.Tensor:
        """`encode(images)` for the samples not cached, the cache for the rest: (B, C, h, w) in the batch's order.
        A batch whose keys do not name its images one to one (a placeholder batch, an empty one) is encoded as it is."""
        if not self.max_bytes or not keys or len(keys) != images.shape[0] or len(set(keys)) != len(keys):
            return encode(images)
        bucket = tuple(bucket)
        found = []
        for k in keys:
            z = self._entries.get((k, bucket))
            if z is not None:
                self._entries.move_to_end((k, bucket))  # used now: the batch's misses must not evict it
            found.append(z)
        missing = [i for i, z in enumerate(found) if z is None]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            fresh = encode(images[missing] if len(missing) < len(keys) else images)
            finite = torch.isfinite(fresh.flatten(1)).all(1).tolist()  # one host sync, on misses only
            for j, i in enumerate(missing):
                found[i] = fresh[j].clone()  # not a view: the batch tensor is freed
                if finite[j]:  # a non-finite latent is the trainer's to skip, not to serve again
                    self._put((keys[i], bucket), found[i])
        return torch.stack(found)

    def _put(self, key: tuple, z: torch.Tensor) -> None:
        size = z.numel() * z.element_size()
        if size > self.max_bytes:
            return
        self._entries[key] = z
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()
