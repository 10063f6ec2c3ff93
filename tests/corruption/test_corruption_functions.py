from functools import partial

import pytest
import torch

from corruption import (
    CORRUPTION_METHODS,
    CorruptionSpec,
    add_constant_first_n,
    add_noise_first_n,
    add_noise_random_n,
    add_noise_top_k,
    apply_corruption,
    flip_sign_first_n,
    flip_sign_top_k,
    replace_with_noise_first_n,
    reverse_positions,
    shuffle_positions,
    zero_first_n,
    zero_top_k,
)

B, T, H = 2, 5, 8


@pytest.fixture
def embeds() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, T, H, generator=g)


@pytest.fixture
def mask() -> torch.Tensor:
    m = torch.zeros(B, T, dtype=torch.bool)
    m[0, 1:3] = True
    m[1, [0, 2, 4]] = True
    return m


def gen(seed: int = 1) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# Functions whose change stays inside the first `dims` hidden dims.
FIRST_N = {
    "add_noise_first_n": lambda e, m: add_noise_first_n(e, m, sigma=1.0, dims=3, generator=gen()),
    "zero_first_n": lambda e, m: zero_first_n(e, m, dims=3),
    "flip_sign_first_n": lambda e, m: flip_sign_first_n(e, m, dims=3),
    "add_constant_first_n": lambda e, m: add_constant_first_n(e, m, value=2.5, dims=3),
    "replace_with_noise_first_n": lambda e, m: replace_with_noise_first_n(
        e, m, sigma=1.0, dims=3, generator=gen()
    ),
}
TOP_K = {
    "add_noise_top_k": lambda e, m: add_noise_top_k(e, m, sigma=1.0, dims=2, generator=gen()),
    "zero_top_k": lambda e, m: zero_top_k(e, m, dims=2),
    "flip_sign_top_k": lambda e, m: flip_sign_top_k(e, m, dims=2),
}
OTHERS = {
    "add_noise_random_n": lambda e, m: add_noise_random_n(e, m, sigma=1.0, dims=3, generator=gen()),
    "reverse_positions": reverse_positions,
    "shuffle_positions": lambda e, m: shuffle_positions(e, m, generator=gen()),
}
ALL = {**FIRST_N, **TOP_K, **OTHERS}


@pytest.mark.parametrize("name", sorted(ALL))
def test_only_masked_positions_change_and_input_untouched(name, embeds, mask):
    before = embeds.clone()
    out = ALL[name](embeds, mask)
    assert torch.equal(embeds, before)
    assert out.shape == embeds.shape and out.dtype == embeds.dtype
    assert torch.equal(out[~mask], embeds[~mask])
    assert not torch.equal(out[mask], embeds[mask])


@pytest.mark.parametrize("name", sorted(FIRST_N))
def test_first_n_touches_only_first_dims(name, embeds, mask):
    out = FIRST_N[name](embeds, mask)
    assert torch.equal(out[..., 3:], embeds[..., 3:])
    assert not torch.equal(out[mask][:, :3], embeds[mask][:, :3])


def test_first_n_exact_values(embeds, mask):
    assert torch.equal(zero_first_n(embeds, mask, dims=3)[mask][:, :3], torch.zeros(5, 3))
    flipped = flip_sign_first_n(embeds, mask, dims=3)
    assert torch.equal(flipped[mask][:, :3], -embeds[mask][:, :3])
    shifted = add_constant_first_n(embeds, mask, value=-1.5, dims=3)
    torch.testing.assert_close(shifted[mask][:, :3], embeds[mask][:, :3] - 1.5)


@pytest.mark.parametrize("name", sorted(TOP_K))
def test_top_k_touches_only_largest_abs_dims(name, embeds, mask):
    out = TOP_K[name](embeds, mask)
    rows, new = embeds[mask], out[mask]  # (M, H)
    top = rows.abs().topk(2, dim=-1).indices  # (M, 2)
    keep = torch.ones_like(rows, dtype=torch.bool).scatter(-1, top, False)
    assert torch.equal(new[keep], rows[keep])
    assert (new.gather(-1, top) != rows.gather(-1, top)).all()


def test_top_k_exact_values(embeds, mask):
    rows = embeds[mask]
    top = rows.abs().topk(2, dim=-1).indices
    assert (zero_top_k(embeds, mask, dims=2)[mask].gather(-1, top) == 0).all()
    flipped = flip_sign_top_k(embeds, mask, dims=2)[mask]
    assert torch.equal(flipped.gather(-1, top), -rows.gather(-1, top))


def test_random_n_uses_same_dims_everywhere(embeds, mask):
    out = add_noise_random_n(embeds, mask, sigma=1.0, dims=3, generator=gen())
    changed = (out != embeds).any(dim=(0, 1))  # (H,)
    assert int(changed.sum()) == 3
    expected = torch.randperm(H, generator=gen())[:3]
    assert set(changed.nonzero().squeeze(-1).tolist()) == set(expected.tolist())


def test_noise_scale(embeds):
    m = torch.ones(B, T, dtype=torch.bool)
    big = embeds.new_zeros(64, 64, H)
    out = add_noise_first_n(
        big, torch.ones(64, 64, dtype=torch.bool), sigma=3.0, dims=None, generator=gen()
    )
    assert abs(float(out.std()) - 3.0) < 0.1
    assert torch.equal(add_noise_first_n(embeds, m, sigma=0.0, dims=None, generator=gen()), embeds)


def test_dims_none_means_all(embeds, mask):
    out = zero_first_n(embeds, mask, dims=None)
    assert (out[mask] == 0).all()


def test_sequence_reorders(embeds, mask):
    rev = reverse_positions(embeds, mask)
    assert torch.equal(rev[0, 1], embeds[0, 2]) and torch.equal(rev[0, 2], embeds[0, 1])
    assert torch.equal(rev[1, 0], embeds[1, 4]) and torch.equal(rev[1, 4], embeds[1, 0])
    assert torch.equal(rev[1, 2], embeds[1, 2])
    shuf = shuffle_positions(embeds, mask, generator=gen(3))
    for b in range(B):
        got = sorted(map(tuple, shuf[b][mask[b]].tolist()))
        assert got == sorted(map(tuple, embeds[b][mask[b]].tolist()))


@pytest.mark.parametrize(
    "fn",
    [
        partial(add_noise_first_n, sigma=1.0, dims=3),
        partial(add_noise_random_n, sigma=1.0, dims=3),
        partial(add_noise_top_k, sigma=1.0, dims=2),
        partial(replace_with_noise_first_n, sigma=1.0, dims=3),
        shuffle_positions,
    ],
)
def test_random_functions_are_seeded(fn, embeds):
    full = torch.ones(B, T, dtype=torch.bool)
    a, b = fn(embeds, full, generator=gen(7)), fn(embeds, full, generator=gen(7))
    c = fn(embeds, full, generator=gen(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("name", sorted(ALL))
def test_two_dim_input_and_empty_mask(name, embeds, mask):
    out = ALL[name](embeds[0], mask[0])
    assert out.shape == (T, H)
    torch.testing.assert_close(out, ALL[name](embeds, mask)[0])
    none = torch.zeros(T, dtype=torch.bool)
    assert torch.equal(ALL[name](embeds[0], none), embeds[0])


def test_bfloat16_keeps_dtype(embeds, mask):
    e = embeds.bfloat16()
    out = add_noise_first_n(e, mask, sigma=0.5, dims=None, generator=gen())
    assert out.dtype == torch.bfloat16
    assert torch.equal(out[~mask], e[~mask])


def test_bad_inputs(embeds, mask):
    with pytest.raises(ValueError, match="mask shape"):
        zero_first_n(embeds, mask[:, :3], dims=1)
    with pytest.raises(ValueError, match="bool"):
        zero_first_n(embeds, mask.long(), dims=1)
    with pytest.raises(ValueError, match="dims"):
        zero_first_n(embeds, mask, dims=H + 1)


def test_every_method_applies_through_spec(embeds, mask):
    for name, method in CORRUPTION_METHODS.items():
        spec = CorruptionSpec(method=name, strength=1.0, dims=3, seed=5)
        out = apply_corruption(embeds, mask, spec)
        assert torch.equal(out[~mask], embeds[~mask]), name
        assert not torch.equal(out[mask], embeds[mask]), name
        assert torch.equal(out, apply_corruption(embeds, mask, spec)), name
        if method.random:
            other = apply_corruption(embeds, mask, CorruptionSpec(name, 1.0, 3, seed=6))
            assert not torch.equal(out, other), name


def test_spec_validation_and_round_trip():
    spec = CorruptionSpec(method="add_noise_top_k", strength=0.2, dims=16, seed=3)
    assert CorruptionSpec.from_dict(spec.to_dict()) == spec
    assert spec.with_strength(0.5).strength == 0.5
    with pytest.raises(ValueError, match="unknown corruption method"):
        CorruptionSpec(method="nope", strength=1.0)
    with pytest.raises(ValueError, match=">= 0"):
        CorruptionSpec(method="add_noise_first_n", strength=-1.0)
    with pytest.raises(ValueError, match="finite"):
        CorruptionSpec("add_noise_first_n", strength=float("nan"))
    with pytest.raises(ValueError, match="missing CorruptionSpec fields"):
        CorruptionSpec.from_dict({"method": "zero_top_k"})
    recommended = CorruptionSpec.recommended(0.1)
    assert recommended.method == "add_noise_first_n" and recommended.dims is None
    assert recommended.strength == pytest.approx(0.4)
    with pytest.raises(ValueError, match="unknown CorruptionSpec fields"):
        CorruptionSpec.from_dict({"method": "zero_top_k", "sigma": 1})
    # Subtracting a constant may use any sign.
    assert CorruptionSpec("subtract_constant_first_n", -1.0).strength == -1.0
