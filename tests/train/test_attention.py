import pytest
import torch

from tests.train.test_model import SMALL, randomised
from train.attention import SeqBatch, flash_varlen_kernel, resolve_backend


def qkv(lens, S, H=4, H_kv=2, Dh=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    B = len(lens)
    return (
        torch.randn(B, S, H, Dh, generator=g),
        torch.randn(B, S, H_kv, Dh, generator=g),
        torch.randn(B, S, H_kv, Dh, generator=g),
    )


@pytest.mark.parametrize("lens", [[7, 3, 5], [6, 6]])
def test_packed_attention_equals_masked_sdpa_at_valid_tokens(lens):
    S = max(lens)
    q, k, v = qkv(lens, S)
    masked = SeqBatch.build(lens, S, "cpu", "sdpa").attend(q, k, v)
    packed = SeqBatch.build(lens, S, "cpu", "torch_varlen").attend(q, k, v)
    for i, n in enumerate(lens):
        torch.testing.assert_close(packed[i, :n], masked[i, :n], rtol=1e-5, atol=1e-6)
        assert torch.count_nonzero(packed[i, n:]) == 0  # padded query rows are zero
        # and each sequence alone (no padding at all) gives the same
        alone = SeqBatch.build([n], n, "cpu", "sdpa").attend(q[i : i + 1, :n], k[i : i + 1, :n], v[i : i + 1, :n])
        torch.testing.assert_close(packed[i, :n], alone[0], rtol=1e-5, atol=1e-6)


def test_packed_indices_and_offsets():
    sb = SeqBatch.build([3, 1, 2], 4, "cpu", "torch_varlen")
    assert sb.cu_seqlens.tolist() == [0, 3, 4, 6] and sb.cu_seqlens.dtype == torch.int32
    assert sb.indices.tolist() == [0, 1, 2, 4, 8, 9]
    assert sb.mask.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0]]
    full = SeqBatch.build([4, 4], 4, "cpu", "torch_varlen")
    assert full.mask is None and full.indices is None and full.cu_seqlens.tolist() == [0, 4, 8]


def test_model_outputs_and_gradients_agree_across_backends():
    """Mixed resolutions and caption lengths: every stage (context, noise refiner, joint) is ragged."""
    m = randomised(SMALL).train()
    xs = [torch.randn(4, 6, 8), torch.randn(4, 10, 4), torch.randn(4, 2, 2)]
    t, cap = torch.rand(3), torch.randn(3, 5, 32)
    mask = torch.tensor([[1] * 5, [1] * 3 + [0] * 2, [1] * 1 + [0] * 4], dtype=torch.bool)

    def run(backend):
        m.set_attention_backend(backend)
        m.zero_grad()
        out = m(xs, t, cap, mask)
        sum(o.square().mean() for o in out).backward()
        return out, [p.grad.clone() for p in m.parameters()]

    ref_out, ref_grads = run("sdpa")
    out, grads = run("torch_varlen")
    for a, b in zip(out, ref_out, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_backend_choice_and_errors():
    assert resolve_backend("auto", torch.device("cpu"), torch.bfloat16) == "sdpa"
    with pytest.raises(ValueError, match="not one of"):
        resolve_backend("xformers", torch.device("cpu"), torch.float32)
    m = randomised(SMALL)
    with pytest.raises(ValueError, match="not one of"):
        m.set_attention_backend("flash")
    with pytest.raises(ValueError, match="prefix mask"):
        m(torch.randn(1, 4, 4, 4), torch.rand(1), torch.randn(1, 3, 32), torch.tensor([[0, 1, 1]], dtype=torch.bool))
    if flash_varlen_kernel() is None:
        m.set_attention_backend("flash_varlen")
        with pytest.raises(RuntimeError, match="needs flash-attn"):
            m(torch.randn(1, 4, 4, 4), torch.rand(1), torch.randn(1, 3, 32), torch.ones(1, 3, dtype=torch.bool))


@pytest.mark.skipif(
    not torch.cuda.is_available() or flash_varlen_kernel() is None,
    reason="GPU-only: flash-attn varlen needs CUDA and flash-attn installed",
)
def test_flash_varlen_matches_sdpa_on_gpu():
    m = randomised(SMALL).cuda().to(torch.bfloat16)
    xs = [
        torch.randn(4, 6, 8, device="cuda", dtype=torch.bfloat16),
        torch.randn(4, 10, 4, device="cuda", dtype=torch.bfloat16),
    ]
    t, cap = torch.rand(2, device="cuda"), torch.randn(2, 5, 32, device="cuda", dtype=torch.bfloat16)
    mask = torch.tensor([[1] * 5, [1] * 3 + [0] * 2], dtype=torch.bool, device="cuda")
    with torch.no_grad():
        m.set_attention_backend("sdpa")
        ref = m(xs, t, cap, mask)
        m.set_attention_backend("flash_varlen")
        out = m(xs, t, cap, mask)
    for a, b in zip(out, ref, strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)
