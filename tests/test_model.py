"""The script's model: patchify, masking, positional embeddings, the loss, a tiny MAE that learns,
NVFP4 layers on CPU, regional compilation."""
import pytest
import torch

import asmae_minimal
from workbench import evaluate


def test_patchify_unpatchify_inverse():
    imgs = torch.randn(2, 3, 32, 32)
    patches = asmae_minimal.patchify(imgs, 4)
    assert patches.shape == (2, 64, 48)
    assert torch.equal(patches[0, 1], imgs[0, :, 0:4, 4:8].permute(1, 2, 0).reshape(-1))  # row-major patches
    assert torch.equal(asmae_minimal.unpatchify(patches, 4), imgs)
    with pytest.raises(ValueError, match="contiguous"):
        asmae_minimal.patchify(imgs.transpose(2, 3), 4)


def tiny_config(**overrides):
    cfg = dict(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32,
               decoder_depth=1, decoder_num_heads=2, mask_ratio=0.75)
    cfg.update(overrides)
    return asmae_minimal.MAEConfig(**cfg)


def test_masking_is_per_sample_and_exact():
    model = asmae_minimal.MAE(tiny_config())
    noise = torch.rand(8, 16)
    _, pred, mask = model(torch.randn(8, 3, 16, 16), noise)
    assert mask.shape == (8, 16) and ((mask == 0) | (mask == 1)).all()
    assert torch.equal(mask.sum(1), torch.full((8,), 12.0))  # exactly 12 of 16 patches masked in each sample
    kept = torch.argsort(noise, 1)[:, :4]
    assert torch.equal(mask.gather(1, kept), torch.zeros(8, 4))  # the 4 lowest-noise patches stay visible
    assert len({tuple(m.tolist()) for m in mask}) > 1  # masks differ between samples


def test_sincos_pos_embed_matches_float64_formula():
    import math
    dim, grid = 16, 4
    emb = asmae_minimal.sincos_pos_embed_2d(dim, grid)[0]
    assert emb.shape == (1 + grid * grid, dim) and torch.equal(emb[0], torch.zeros(dim))
    for pos in range(grid * grid):
        w, h = pos % grid, pos // grid  # MAE: the first half of the channels encodes the column
        for half, coord in ((0, w), (1, h)):
            for i in range(dim // 4):
                omega = 1.0 / 10000 ** (i / (dim / 4))
                base = 1 + pos, half * dim // 2
                assert abs(emb[base[0], base[1] + i].item() - math.sin(coord * omega)) < 1e-6
                assert abs(emb[base[0], base[1] + dim // 4 + i].item() - math.cos(coord * omega)) < 1e-6


def test_loss_only_on_masked_patches():
    model = asmae_minimal.MAE(tiny_config())
    imgs, noise = torch.randn(4, 3, 16, 16), torch.rand(4, 16)
    loss, pred, mask = model(imgs, noise)
    target = asmae_minimal.patchify(imgs, 4)
    expected = (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()
    assert torch.allclose(loss, expected)
    # changing the image on visible patches changes the encoder input but not the target of the loss:
    # the loss is exactly the masked-patch MSE computed above, never a full-image MSE
    full = ((pred - target) ** 2).mean()
    assert not torch.allclose(loss, full)


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = asmae_minimal.MAE(tiny_config())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    imgs, noise = torch.randn(8, 3, 16, 16), torch.rand(8, 16)
    losses = []
    for _ in range(150):
        loss, _, _ = model(imgs, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]


def test_nvfp4_model_trains_on_cpu():
    torch.manual_seed(0)
    layers = asmae_minimal.nvfp4.LayerFactory(asmae_minimal.nvfp4.NVFP4Recipe(), keep_high_precision=("patch_embed", "decoder_pred"))
    model = asmae_minimal.MAE(tiny_config(embed_dim=64, decoder_embed_dim=64), layers)
    assert any(g[3] for g in model.gemms)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    imgs, noise = torch.randn(16, 3, 16, 16), torch.rand(16, 16)
    first = model(imgs, noise)[0].item()
    for _ in range(120):
        loss, _, _ = model(imgs, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_regional_compile_shares_graphs_and_evaluation_stays_eager(monkeypatch):
    """One graph per block shape and per piece of glue, whatever the depth (a per-layer guard,
    e.g. on a layer's name, would compile every block); eval passes never compile; same loss
    and gradients as the eager model. Dynamo's "eager" backend: what is tested is the tracing."""
    from functools import partial
    from torch._dynamo.utils import counters
    monkeypatch.setattr(torch, "compile", partial(torch.compile, backend="eager"))
    torch._dynamo.reset()
    counters.clear()
    layers = lambda: asmae_minimal.nvfp4.LayerFactory(asmae_minimal.nvfp4.NVFP4Recipe())
    torch.manual_seed(0)
    eager = asmae_minimal.MAE(tiny_config(embed_dim=32, decoder_embed_dim=32, depth=3, decoder_depth=2), layers())
    compiled = asmae_minimal.MAE(eager.cfg, layers())
    compiled.load_state_dict(eager.state_dict())
    asmae_minimal.compile_model(compiled, model_graphs=False)
    imgs, noise = torch.randn(16, 3, 16, 16), torch.rand(16, 16)
    for model in (eager, compiled):
        torch.manual_seed(1)  # the same stochastic-rounding bits
        model(imgs, noise)[0].backward()
    assert counters["stats"]["unique_graphs"] == 2 + 3  # encoder and decoder blocks, three glue pieces
    for a, b in zip(eager.parameters(), compiled.parameters()):
        assert torch.equal(a.grad, b.grad)
    precision = asmae_minimal.nvfp4.Precision.resolve("fp32", torch.device("cpu"), amp=False)
    evaluate.reconstruct(compiled, imgs[:3], noise[:3], precision, "fake")
    evaluate.extract_features(compiled, torch.zeros(5, 3, 16, 16, dtype=torch.uint8), precision, "fake")
    assert counters["stats"]["unique_graphs"] == 5
