"""The latent cache: the same latents as encoding every batch, each sample encoded once, bounded by bytes."""

import pytest
import torch

from train.config import TrainConfig
from train.latent_cache import LatentCache
from train.trainer import Codecs, flow_batch


class CountingEncoder:
    """A deterministic per-sample 'VAE': 2x2 mean pooling, recording how many images it encoded."""

    def __init__(self):
        self.images = 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.images += images.shape[0]
        return torch.nn.functional.avg_pool2d(images, 2)


def images_for(keys: list[str], size: int = 8) -> torch.Tensor:
    return torch.stack([torch.full((3, size, size), float(int(k[1:]))) / 10 for k in keys])


def test_cached_latents_equal_encoding_and_each_sample_is_encoded_once():
    enc, cache = CountingEncoder(), LatentCache(1 << 20)
    batches = [["k1", "k2", "k3"], ["k2", "k4", "k1"], ["k3", "k1", "k4"]]
    for keys in batches:
        got = cache.encode(enc, images_for(keys), keys, (8, 8))
        assert torch.equal(got, torch.nn.functional.avg_pool2d(images_for(keys), 2))
    assert enc.images == 4 and (cache.hits, cache.misses) == (5, 4) and len(cache) == 4
    cache.encode(enc, images_for(["k1"], 16), ["k1"], (16, 16))  # another bucket: another latent
    assert enc.images == 5 and len(cache) == 5


def test_the_cache_keeps_to_its_bytes_and_drops_the_least_recently_used():
    enc = CountingEncoder()
    per = 3 * 4 * 4 * 4  # one latent: (3, 4, 4) float32
    cache = LatentCache(2 * per)
    cache.encode(enc, images_for(["k1", "k2"]), ["k1", "k2"], (8, 8))
    cache.encode(enc, images_for(["k1"]), ["k1"], (8, 8))  # k1 used last: k2 goes first
    cache.encode(enc, images_for(["k3"]), ["k3"], (8, 8))
    assert cache.bytes <= 2 * per and len(cache) == 2
    before = enc.images
    cache.encode(enc, images_for(["k1", "k3"]), ["k1", "k3"], (8, 8))
    assert enc.images == before  # both kept
    cache.encode(enc, images_for(["k2"]), ["k2"], (8, 8))
    assert enc.images == before + 1  # k2 had been dropped


@pytest.mark.parametrize("keys", [[], ["k1"], ["k1", "k1"]])
def test_a_batch_whose_keys_do_not_name_its_images_is_encoded_as_it_is(keys):
    enc, cache = CountingEncoder(), LatentCache(1 << 20)
    images = images_for(["k1", "k2"])
    got = cache.encode(enc, images, keys, (8, 8))
    assert torch.equal(got, torch.nn.functional.avg_pool2d(images, 2)) and len(cache) == 0


def test_flow_batch_with_the_cache_gives_the_batch_without_it():
    class Text(torch.nn.Module):
        def forward(self, captions):
            return torch.ones(len(captions), 3, 4), torch.ones(len(captions), 3, dtype=torch.bool)

    class Vae(torch.nn.Module):
        def encode(self, images):
            return CountingEncoder()(images)

    cfg = TrainConfig()
    batch = {"images": images_for(["k1", "k2"], 16), "captions": ["a", "b"], "keys": ["k1", "k2"], "g": 3}
    plain = flow_batch(Codecs(Text(), Vae()), batch, cfg, "cpu")
    cached = Codecs(Text(), Vae(), LatentCache(1 << 20))
    for _ in range(2):  # a miss, then a hit
        again = flow_batch(cached, batch, cfg, "cpu")
        assert all(torch.equal(a, b) for a, b in zip(plain, again, strict=True))
    assert (cached.latents.hits, cached.latents.misses) == (2, 2)


def test_a_non_finite_latent_is_returned_but_not_kept():
    enc, cache = CountingEncoder(), LatentCache(1 << 20)
    images = images_for(["k1", "k2"])
    images[0, 0, 0, 0] = float("nan")
    got = cache.encode(enc, images, ["k1", "k2"], (8, 8))
    assert got[0].isnan().any() and len(cache) == 1  # only k2 kept
    again = cache.encode(enc, images_for(["k1"]), ["k1"], (8, 8))
    assert torch.isfinite(again).all() and enc.images == 3


def test_a_batch_s_hits_are_not_evicted_by_its_own_misses():
    enc = CountingEncoder()
    per = 3 * 4 * 4 * 4
    cache = LatentCache(2 * per)
    cache.encode(enc, images_for(["k1", "k2"]), ["k1", "k2"], (8, 8))  # k1 is the least recently used
    cache.encode(enc, images_for(["k1", "k3"]), ["k1", "k3"], (8, 8))  # k1 hit first: k3 evicts k2, not k1
    before = enc.images
    cache.encode(enc, images_for(["k1", "k3"]), ["k1", "k3"], (8, 8))
    assert enc.images == before and len(cache) == 2
