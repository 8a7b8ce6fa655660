import pytest
import torch

from train.model import NextDiT_configs, NextDiTConfig, build_model, count_parameters

SMALL = NextDiTConfig(dim=96, n_layers=2, n_refiner_layers=1, n_heads=3, n_kv_heads=1, cap_feat_dim=32,
                      axes_dims=(8, 12, 12), multiple_of=32, in_channels=4)  # fmt: skip


def randomised(cfg: NextDiTConfig, seed: int = 0):
    torch.manual_seed(seed)
    m = build_model(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.1)  # the zero-initialised gates would hide most of the network
    return m


def test_2b_config_has_the_release_parameter_count():
    with torch.device("meta"):
        m = build_model("NextDiT_2B")
    assert count_parameters(m) == 2_609_769_152  # Lumina-Image 2.0 with Gemma-2-2B features
    cfg = NextDiT_configs["NextDiT_2B"]
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.patch_size, cfg.in_channels) == (
        2304,
        26,
        24,
        8,
        2,
        16,
    )


def test_padding_text_tokens_changes_nothing():
    m = randomised(SMALL)
    x, t = torch.randn(2, 4, 6, 8), torch.rand(2)
    cap = torch.randn(2, 5, 32)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    longer = torch.cat([cap, torch.randn(2, 4, 32) * 100], dim=1)  # extra padding holding garbage
    longer_mask = torch.cat([mask, torch.zeros(2, 4, dtype=torch.bool)], dim=1)
    garbage = cap.clone()
    garbage[1, 3:] = 1e3  # the padded slots of sample 1
    with torch.no_grad():
        a = m(x, t, cap, mask)
        b = m(x, t, longer, longer_mask)
        c = m(x, t, garbage, mask)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


def test_permuting_the_batch_permutes_the_outputs():
    m = randomised(SMALL)
    x, t, cap = torch.randn(3, 4, 6, 8), torch.rand(3), torch.randn(3, 6, 32)
    mask = torch.tensor([[1] * 6, [1] * 2 + [0] * 4, [1] * 4 + [0] * 2], dtype=torch.bool)
    perm = torch.tensor([2, 0, 1])
    with torch.no_grad():
        a = m(x, t, cap, mask)
        b = m(x[perm], t[perm], cap[perm], mask[perm])
    torch.testing.assert_close(a[perm], b, rtol=1e-5, atol=1e-5)


def test_mixed_resolutions_in_one_batch_equal_separate_calls():
    m = randomised(SMALL)
    xs = [torch.randn(4, 6, 8), torch.randn(4, 10, 4), torch.randn(4, 2, 2)]
    t, cap = torch.rand(3), torch.randn(3, 5, 32)
    mask = torch.tensor([[1] * 5, [1] * 3 + [0] * 2, [1] * 1 + [0] * 4], dtype=torch.bool)
    with torch.no_grad():
        joint = m(xs, t, cap, mask)
        alone = [m([xs[i]], t[i : i + 1], cap[i : i + 1], mask[i : i + 1])[0] for i in range(3)]
    for j, a in zip(joint, alone, strict=True):
        assert j.shape == a.shape
        torch.testing.assert_close(j, a, rtol=1e-5, atol=1e-5)


def test_activation_checkpointing_gives_the_same_gradients():
    m = randomised(SMALL).train()
    x, t, cap = torch.randn(2, 4, 6, 8), torch.rand(2), torch.randn(2, 5, 32)
    mask = torch.ones(2, 5, dtype=torch.bool)

    def grads():
        m.zero_grad()
        m(x, t, cap, mask).square().mean().backward()
        return [p.grad.clone() for p in m.parameters()]

    plain = grads()
    m.set_activation_checkpointing([0])
    ckpt = grads()
    for a, b in zip(plain, ckpt, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fresh_model_starts_as_zero_velocity():
    m = build_model(SMALL)
    out = m(torch.randn(1, 4, 4, 4), torch.rand(1), torch.randn(1, 3, 32), torch.ones(1, 3, dtype=torch.bool))
    assert torch.count_nonzero(out) == 0  # zero-initialised final layer, identity blocks


def test_bad_latent_size_is_a_clear_error():
    m = build_model(SMALL)
    with pytest.raises(ValueError, match="not divisible by patch size"):
        m(torch.randn(1, 4, 5, 4), torch.rand(1), torch.randn(1, 3, 32), torch.ones(1, 3, dtype=torch.bool))


def test_blocks_compile_as_whole_graphs():
    """torch.compile of every block with fullgraph=True: a graph break (a .tolist(), a data-dependent
    branch) added to a block fails here. aot_eager traces like inductor without compiling C++."""
    m = randomised(SMALL).train()
    xs = [torch.randn(4, 6, 8), torch.randn(4, 10, 4)]
    t, cap = torch.rand(2), torch.randn(2, 5, 32)
    mask = torch.tensor([[1] * 5, [1] * 3 + [0] * 2], dtype=torch.bool)
    m.set_attention_backend("sdpa")
    ref = m(xs, t, cap, mask)
    m.compile_blocks(backend="aot_eager")
    out = m(xs, t, cap, mask)
    sum(o.square().mean() for o in out).backward()
    for a, b in zip(out, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert all(p.grad is not None for p in m.layers.parameters())


def test_every_module_runs_as_often_for_any_batch_size():
    """ZeRO-3 gathers a module's parameters each time it runs: ranks whose micro-batches differ in size (a
    bucket's last batch) must still make the same calls, or their collectives mismatch (a per-image
    x_embedder call did: gloo 'Received data size doesn't match', an NCCL hang on GPUs)."""
    torch.manual_seed(0)
    model = build_model("NextDiT_tiny").eval()

    def calls(batch: int) -> dict[str, int]:
        seen: dict[str, int] = {}
        hooks = [m.register_forward_pre_hook(lambda mod, args, name=n: seen.__setitem__(name, seen.get(name, 0) + 1))
                 for n, m in model.named_modules() if list(m.parameters(recurse=False))]  # fmt: skip
        x = torch.randn(batch, 16, 8, 8)
        cap, mask = torch.randn(batch, 6, model.cfg.cap_feat_dim), torch.ones(batch, 6, dtype=torch.bool)
        with torch.no_grad():
            model(x, torch.rand(batch), cap, mask)
        for h in hooks:
            h.remove()
        return seen

    one, three = calls(1), calls(3)
    assert one == three and one["x_embedder"] == 1, {
        k: (one.get(k), three.get(k)) for k in one.keys() | three.keys()
    }
