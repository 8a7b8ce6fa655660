import numpy as np
import torch
from PIL import Image

from unicap.clip import ClipScorer

LONG = " ".join(f"Sentence number {i} describes a red square and a blue circle on a white page." for i in range(12))


def test_long_captions_are_chunked_not_truncated():
    s = ClipScorer("tiny", autocast=False)
    chunks = s.chunks(LONG)
    assert len(chunks) > 1
    assert all(s.n_tokens(c) <= s.context for c in chunks)
    assert " ".join(chunks).split() == LONG.split()  # every word is in exactly one chunk, in order
    # the embedding is the token-weighted mean of the chunk embeddings, renormalised
    tok = s.tokenizer(chunks)
    with torch.no_grad():
        e = torch.nn.functional.normalize(s.model.encode_text(tok).float(), dim=-1)
    w = torch.tensor([s.n_tokens(c) - 2 for c in chunks], dtype=torch.float32)[:, None]
    expected = torch.nn.functional.normalize((e * w).sum(0), dim=-1).numpy()
    np.testing.assert_allclose(s.embed_texts([LONG])[0], expected, rtol=1e-5, atol=1e-6)
    # and it differs from what a truncating scorer would see: the first 77 tokens only
    with torch.no_grad():
        truncated = torch.nn.functional.normalize(s.model.encode_text(s.tokenizer([LONG])).float(), dim=-1)[0]
    assert not np.allclose(s.embed_texts([LONG])[0], truncated.numpy(), atol=1e-3)


def test_short_captions_are_one_chunk_and_images_are_unit_vectors():
    s = ClipScorer("tiny", autocast=False)
    assert s.chunks("a red square") == ["a red square"]
    e = s.embed_images([Image.new("RGB", (80, 60), (200, 10, 10))])
    assert e.shape == (1, 64) and abs(np.linalg.norm(e) - 1) < 1e-5
