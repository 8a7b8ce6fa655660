import pytest
import torch

from train.model import NextDiT_configs, NextDiTConfig, build_model, count_parameters, frame_code

# the smallest registered model (GQA 3:1, 4 latent channels): fast enough for every property test here
SMALL = NextDiT_configs["NextDiT_XS"]


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
        hooks = [
            m.register_forward_pre_hook(lambda mod, args, name=n: seen.__setitem__(name, seen.get(name, 0) + 1))
            for n, m in model.named_modules()
            if list(m.parameters(recurse=False))
        ]
        x = torch.randn(batch, 16, 8, 8)
        cap, mask = torch.randn(batch, 6, model.cfg.cap_feat_dim), torch.ones(batch, 6, dtype=torch.bool)
        with torch.no_grad():
            model(x, torch.rand(batch), cap, mask)
        for h in hooks:
            h.remove()
        return seen

    one, three = calls(1), calls(3)
    assert one == three and one["x_embedder"] == 1, {k: (one.get(k), three.get(k)) for k in one.keys() | three.keys()}


def test_the_trainer_config_sets_the_rope_base_and_the_checkpoint_keeps_it():
    from train.config import load
    from train.trainer import build_model as build_from_config

    default = build_from_config(load(None, ["model.name=NextDiT_tiny"]), text_dim=32)
    assert default.rope.theta == NextDiT_configs["NextDiT_tiny"].rope_theta == 10_000
    m = build_from_config(load(None, ["model.name=NextDiT_tiny", "model.rope_theta=100"]), text_dim=32)
    assert m.rope.theta == m.cfg.rope_theta == 100  # m.cfg is what the checkpoint's state.json records
    pos = torch.tensor([[[0, 0, 0], [0, 3, 5]]])
    assert not torch.allclose(m.rope(pos), default.rope(pos))


def test_the_frame_code_tells_each_place_apart_rows_then_columns():
    code = frame_code(3, 5, 64)
    assert code.shape == (15, 64) and len({tuple(r.tolist()) for r in code}) == 15
    grid = code.view(3, 5, 64)
    assert torch.equal(grid[:, :1, :32].expand(3, 5, 32), grid[..., :32])  # first half: the row's only
    assert torch.equal(grid[:1, :, 32:].expand(3, 5, 32), grid[..., 32:])  # second half: the column's only
    centre = frame_code(1, 1, 8)
    assert torch.allclose(centre, frame_code(3, 3, 8)[4:5])  # the frame's centre, at any grid size
    with pytest.raises(ValueError, match="multiple of 4"):
        frame_code(2, 2, 6)


def test_frame_pos_adds_the_code_to_the_image_tokens_and_the_config_sets_it():
    from train.config import load
    from train.trainer import build_model as build_from_config

    torch.manual_seed(0)
    off = build_model("NextDiT_tiny", cap_feat_dim=32)
    on = build_model("NextDiT_tiny", cap_feat_dim=32, frame_pos=True)
    on.load_state_dict(off.state_dict())  # no parameters of its own
    for m in (off, on):  # a non-zero output layer, so the forward pass shows the input
        torch.nn.init.normal_(m.final_layer.linear.weight, std=0.02)
    on.final_layer.load_state_dict(off.final_layer.state_dict())
    x, t = torch.randn(1, 16, 8, 8), torch.rand(1)
    feats, mask = torch.randn(1, 5, 32), torch.ones(1, 5, dtype=torch.bool)
    seen = {}

    def keep(name):
        def hook(module, args):
            seen[name] = args[0]  # the image tokens entering the first noise-refiner block

        return hook

    on.noise_refiner[0].register_forward_pre_hook(keep("on"))
    off.noise_refiner[0].register_forward_pre_hook(keep("off"))
    assert not torch.allclose(on(x, t, feats, mask), off(x, t, feats, mask))
    assert torch.allclose(seen["on"][0] - seen["off"][0], frame_code(4, 4, 128), atol=1e-6)
    cfg = load(None, ["model.name=NextDiT_tiny", "model.frame_pos=true"])
    assert build_from_config(cfg, text_dim=32).cfg.frame_pos and not off.cfg.frame_pos
