import pytest
import torch
from torch import nn

from offset.swd import sliced_wasserstein, snapshot_parameters, swd_penalty


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_identical_sets_give_zero() -> None:
    a = torch.randn(7, 5, generator=_gen())
    assert sliced_wasserstein(a, a.clone(), generator=_gen()).item() == 0.0


def test_one_dimensional_points_are_exact() -> None:
    # D = 1: every projection is ±1, so sorting gives the exact W2² = Σ over matched pairs.
    a = torch.tensor([[3.0], [1.0], [2.0]])
    b = torch.tensor([[0.0], [5.0], [1.0]])
    # sorted a = 1, 2, 3; sorted b = 0, 1, 5 → 1 + 1 + 4
    assert sliced_wasserstein(a, b, generator=_gen()).item() == pytest.approx(6.0)


def test_permuted_rows_give_zero() -> None:
    a = torch.randn(6, 4, generator=_gen())
    b = a[torch.tensor([5, 3, 1, 0, 2, 4])]
    assert sliced_wasserstein(a, b, generator=_gen()).item() == pytest.approx(0.0, abs=1e-10)


def test_shift_gives_shift_squared_per_row() -> None:
    a = torch.randn(4, 1, generator=_gen())
    assert sliced_wasserstein(a, a + 0.5, generator=_gen()).item() == pytest.approx(4 * 0.25)
    # A 1-D parameter is one row; E[(θ·c1)²] = c² for unit θ, so many projections get close.
    v = torch.randn(64, generator=_gen())
    swd = sliced_wasserstein(v, v + 0.5, projections=20_000, generator=_gen()).item()
    assert swd == pytest.approx(0.25, rel=0.05)


def test_seeded_and_differentiable() -> None:
    a = torch.randn(8, 3, generator=_gen(1))
    b = torch.randn(8, 3, generator=_gen(2), requires_grad=True)
    first = sliced_wasserstein(a, b, projections=10, generator=_gen(3))
    again = sliced_wasserstein(a, b, projections=10, generator=_gen(3))
    assert first.item() == again.item()
    first.backward()
    assert b.grad is not None and b.grad.abs().sum() > 0


def test_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError):
        sliced_wasserstein(torch.zeros(2, 3), torch.zeros(3, 3))


def test_penalty_sums_parameters_and_filters() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    initial = snapshot_parameters(model)
    assert swd_penalty(initial, model, generator=_gen()).item() == 0.0
    with torch.no_grad():
        model[1].bias.add_(1.0)  # one row (1, 1): E[(θ·v)²] = |v|² / D = 1
    full = swd_penalty(initial, model, projections=5000, generator=_gen()).item()
    assert full == pytest.approx(1.0, rel=0.1)
    weights_only = snapshot_parameters(model, param_filter=lambda name, p: p.dim() > 1)
    assert set(weights_only) == {"0.weight", "1.weight"}
    sub = swd_penalty(initial, model, max_rows=1, generator=_gen())
    sub.backward()
    assert model[1].bias.grad is not None
