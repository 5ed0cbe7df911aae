import math

import pytest
import torch
from contexts import context_config

from cpt.config import FROZEN_EPSILON
from cpt.projection import epsilons, project, project_, project_fn


def test_epsilons_follow_roles_and_scale_with_hidden_size() -> None:
    config = context_config(1, opt_projection_epsilon=0.2, opt_projection_format_epsilon=0.1)
    eps = epsilons(config, hidden_size=512)
    scale = math.sqrt(512 / 2048)
    codes = config.cpt_tokens_type_mask  # [1, 2, 2, 2, 0, 3, 3, 4, 4, 0]
    for code, value in zip(codes, eps.tolist()):
        if code in (1, 3):
            assert value == pytest.approx(0.1 * scale, rel=1e-6)
        elif code == 2:
            assert value == pytest.approx(0.2 * scale, rel=1e-6)
        else:
            assert value == pytest.approx(FROZEN_EPSILON)


def test_rows_end_inside_their_ball_and_inside_rows_do_not_change() -> None:
    delta = torch.randn(6, 16)
    eps = torch.tensor([10.0, 0.5, 0.5, 100.0, 1e-10, 0.0])
    out = project(delta, eps)
    norms = out.norm(dim=1)
    assert torch.all(norms <= eps * (1 + 1e-6))
    assert torch.equal(out[0], delta[0]) and torch.equal(out[3], delta[3])  # already inside
    assert norms[1].item() == pytest.approx(0.5, rel=1e-6)  # pulled onto the surface
    assert torch.equal(out[5], torch.zeros(16))  # radius 0: no NaN, exactly zero
    assert torch.equal(project(torch.zeros(2, 4), torch.zeros(2)), torch.zeros(2, 4))


def test_in_place_projection() -> None:
    delta = torch.randn(4, 8) * 10
    eps = torch.full((4,), 0.3)
    project_(delta, eps)
    assert torch.all(delta.norm(dim=1) <= 0.3 * (1 + 1e-6))


def test_compiled_projection_has_no_graph_break_and_matches_eager() -> None:
    torch._dynamo.reset()
    delta = torch.randn(64, 32)
    eps = torch.rand(64)
    explanation = torch._dynamo.explain(project)(delta, eps)
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1
    compiled = project_fn(compile=True)
    torch.testing.assert_close(compiled(delta, eps), project(delta, eps), rtol=1e-6, atol=1e-7)


def test_rows_that_arithmetic_would_spoil_land_on_their_sphere() -> None:
    inf = float("inf")
    delta = torch.tensor([
        [1e30, 1e30, 0.0],  # the norm overflows float32
        [3e38, 1.0, -3e38],  # so does this one
        [inf, 1.0, 0.0],  # an infinite entry: points along it
        [-inf, inf, 5.0],
        [1e38, 0.0, 0.0],  # eps / norm underflows to zero
        [0.3, 0.4, 0.0],  # ordinary rows: the plain formula, bit for bit
        [3.0, 4.0, 0.0],
        [0.0, 0.0, 0.0],
    ])
    eps = torch.tensor([1.0, 2.0, 1.0, 2.0, 1e-10, 1.0, 1.0, 1.0])
    out = project(delta, eps)
    assert bool(torch.isfinite(out).all())
    norms = torch.linalg.vector_norm(out.double(), dim=1)
    torch.testing.assert_close(norms[:5], eps[:5].double(), rtol=1e-6, atol=0)
    torch.testing.assert_close(out[0], torch.tensor([0.70710677, 0.70710677, 0.0]))
    torch.testing.assert_close(out[2], torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(out[3], torch.tensor([-2**0.5, 2**0.5, 0.0]))
    assert torch.equal(out[5], delta[5])  # inside: unchanged
    plain = delta[6] * (eps[6] / torch.linalg.vector_norm(delta[6]))
    assert torch.equal(out[6], plain) and torch.equal(out[7], delta[7])


def test_a_nan_row_is_not_hidden() -> None:
    out = project(torch.tensor([[float("nan"), 1.0], [3.0, 4.0]]), torch.tensor([1.0, 1.0]))
    assert bool(torch.isnan(out[0]).all()) and bool(torch.isfinite(out[1]).all())


def test_compiled_projection_handles_the_extremes_like_eager() -> None:
    torch._dynamo.reset()
    delta = torch.tensor([[1e30, 1e30], [float("inf"), 1.0], [0.3, 0.4], [1e38, 0.0]])
    eps = torch.tensor([1.0, 1.0, 1.0, 1e-10])
    torch.testing.assert_close(project_fn(compile=True)(delta, eps), project(delta, eps), rtol=1e-6, atol=0)
