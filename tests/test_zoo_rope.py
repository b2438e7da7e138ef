"""2D RoPE for the DiT (vision_eff/zoo/rope.py): the rotation and the attention against float64 references
built from explicit rotation matrices, the relative-position property, and the model around it."""
import math

import pytest
import torch

import vision_eff as ve
from vision_eff import zoo
from vision_eff.zoo import weights
from vision_eff.zoo.rope import ROPE_THETA, RoPE2DAttnProcessor, apply_rope, rope_2d_angles


def _rotation_matrices(grid: int, head_dim: int, theta: float = ROPE_THETA) -> torch.Tensor:
    """float64 [tokens, head_dim, head_dim]: for token (row, col), the pair (i, i + head_dim/2) turned by
    row * f_i for the first head_dim/4 pairs and col * f_j for the rest, f_k = theta ** (-k / (head_dim/4))."""
    quarter, half = head_dim // 4, head_dim // 2
    mats = torch.zeros(grid * grid, head_dim, head_dim, dtype=torch.float64)
    for token in range(grid * grid):
        row, col = divmod(token, grid)
        for i in range(half):
            pos, k = (row, i) if i < quarter else (col, i - quarter)
            ang = pos * theta ** (-k / quarter)
            c, s = math.cos(ang), math.sin(ang)
            mats[token, i, i], mats[token, i, i + half] = c, -s
            mats[token, i + half, i], mats[token, i + half, i + half] = s, c
    return mats


def test_rotation_equals_explicit_rotation_matrices_in_float64():
    grid, d = 4, 8
    x = torch.randn(2, 3, grid * grid, d, dtype=torch.float64)
    want = torch.einsum("tij,bhtj->bhti", _rotation_matrices(grid, d), x)
    got = apply_rope(x, rope_2d_angles(grid, d, dtype=torch.float64))
    assert torch.allclose(got, want, atol=1e-12)
    # rotations keep lengths, and token (0, 0) is not turned at all
    assert torch.allclose(got.norm(dim=-1), x.norm(dim=-1), atol=1e-12) and torch.equal(got[..., 0, :], x[..., 0, :])


def test_scores_depend_only_on_the_offset_between_tokens():
    grid, d = 6, 16
    ang = rope_2d_angles(grid, d, dtype=torch.float64)
    q, k = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)

    def score(a, b):  # query at token a=(row, col), key at token b
        ta, tb = a[0] * grid + a[1], b[0] * grid + b[1]
        return (apply_rope(q[None], ang[ta:ta + 1]) @ apply_rope(k[None], ang[tb:tb + 1]).T).item()

    base = score((1, 2), (3, 0))
    assert score((2, 4), (4, 2)) == pytest.approx(base, abs=1e-12)  # both moved by (1, 2)
    assert score((0, 3), (2, 1)) == pytest.approx(base, abs=1e-12)  # both moved by (-1, 1)
    assert abs(score((1, 2), (3, 1)) - base) > 1e-3  # another offset, another score


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="multiple of 4"):
        rope_2d_angles(4, 6)
    with pytest.raises(ValueError, match="do not fit"):
        apply_rope(torch.randn(1, 5, 8), rope_2d_angles(2, 8))


def _attention_layer():
    transformer = zoo.build("shapes-dit-rope")["transformer"]
    torch.manual_seed(0)
    for p in transformer.parameters():
        p.data.normal_(0, 0.1)
    return transformer.eval(), transformer.transformer_blocks[0].attn1


def test_every_attention_layer_of_the_rope_dit_has_the_processor_and_the_plain_dit_none():
    rope, plain = zoo.build("shapes-dit-rope")["transformer"], zoo.build("shapes-dit")["transformer"]
    procs = [b.attn1.processor for b in rope.transformer_blocks]
    assert len(procs) == 6 and all(isinstance(p, RoPE2DAttnProcessor) and p.grid == 16 for p in procs)
    assert not any(isinstance(b.attn1.processor, RoPE2DAttnProcessor) for b in plain.transformer_blocks)


def test_attention_equals_a_float64_reference():
    _, attn = _attention_layer()
    x = torch.randn(2, 256, 128)
    got = attn(x)

    h, d = attn.heads, 32

    def reference(xx, dtype):  # plain PyTorch: explicit rotation matrices, softmax attention
        def lin(m, v):
            return v @ m.weight.to(dtype).T + m.bias.to(dtype)

        def heads(v):
            return v.view(2, 256, h, d).transpose(1, 2)

        rot = _rotation_matrices(16, d).to(dtype)
        q, k, v = (heads(lin(m, xx.to(dtype))) for m in (attn.to_q, attn.to_k, attn.to_v))
        rq, rk = torch.einsum("tij,bhtj->bhti", rot, q), torch.einsum("tij,bhtj->bhti", rot, k)
        out = [lin(attn.to_out[0], (torch.softmax(a @ b.transpose(-1, -2) / math.sqrt(d), -1) @ v)
                   .transpose(1, 2).reshape(2, 256, h * d)) for a, b in ((rq, rk), (q, k))]
        return out  # with the rotation, and without it

    want, unrotated = reference(x, torch.float64)
    plain32, _ = reference(x, torch.float32)
    err = (got.double() - want).abs().max().item()
    plain_err = (plain32.double() - want).abs().max().item()
    assert err <= 2 * plain_err + 1e-7, (err, plain_err)  # flash-attention's rule, against float32 PyTorch
    assert (unrotated - want).abs().max().item() > 100 * err  # RoPE is really applied


def test_a_subset_of_tokens_at_given_positions_equals_a_float64_reference():
    _, attn = _attention_layer()
    pos = torch.stack([torch.randperm(256)[:40].sort().values for _ in range(2)])  # [2, 40] grid indices
    x = torch.randn(2, 40, 128)
    attn.processor.positions = pos
    try:
        got = attn(x).double()
    finally:
        attn.processor.positions = None
    h, d, x64 = attn.heads, 32, x.double()
    rot = _rotation_matrices(16, d)[pos]  # [2, 40, d, d]

    def lin(m, v):
        return v @ m.weight.double().T + m.bias.double()

    q, k, v = (lin(m, x64).view(2, 40, h, d).transpose(1, 2) for m in (attn.to_q, attn.to_k, attn.to_v))
    q, k = torch.einsum("btij,bhtj->bhti", rot, q), torch.einsum("btij,bhtj->bhti", rot, k)
    want = lin(attn.to_out[0], (torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), -1) @ v)
               .transpose(1, 2).reshape(2, 40, h * d))
    assert (got - want).abs().max().item() < 1e-4
    with pytest.raises(ValueError, match="do not fit"):
        attn.processor.positions = pos[:, :10]
        try:
            attn(x)
        finally:
            attn.processor.positions = None


def test_fewer_tokens_than_the_grid_are_refused_with_the_reason():
    _, attn = _attention_layer()
    with pytest.raises(ValueError, match="full 16x16 token grid .* token merging or pruning cannot run"):
        attn(torch.randn(1, 200, 128))


def test_token_merging_on_the_rope_dit_fails_loudly_and_removes_cleanly():
    transformer, _ = _attention_layer()
    x, t, y = torch.randn(1, 3, 32, 32), torch.tensor([500]), torch.tensor([2])
    before = transformer(x, t, class_labels=y).sample
    handle = ve.apply(transformer, ve.TokenMerge(ratio=0.5))
    with pytest.raises(ValueError, match="token merging or pruning cannot run"):
        transformer(x, t, class_labels=y)
    handle.remove()
    assert torch.equal(transformer(x, t, class_labels=y).sample, before)


def test_rope_dit_trains_saves_and_loads_with_its_processor(tmp_path):
    from vision_eff.zoo.pipeline import ShapesDiTPipeline
    from vision_eff.zoo.train import train

    out = train("shapes-dit-rope", steps=2, batch_size=4, out=tmp_path / "rope.safetensors", progress=False)
    meta = weights.read_metadata(out)
    assert meta["model"] == "shapes-dit-rope" and meta["recipe"]["shared_label_dropout"] is True
    pipe = zoo.load_pipeline("shapes-dit-rope", weights=out)
    assert type(pipe) is ShapesDiTPipeline
    assert all(isinstance(b.attn1.processor, RoPE2DAttnProcessor) for b in pipe.transformer.transformer_blocks)
    img = pipe(class_labels=[1, 5], num_inference_steps=2, guidance_scale=3.0,
               generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert img.shape == (2, 3, 32, 32) and torch.isfinite(img).all()
    with pytest.raises(weights.WeightsError, match="vision-eff zoo train shapes-dit-rope"):
        zoo.load_pipeline("shapes-dit-rope")
