"""Tests of cpt/numerics.py: the training guard against NaN and infinity."""

from __future__ import annotations

import math

import pytest
import torch

from cpt.numerics import NonFiniteError, check_finite_step, finite_flags


def _param(*values: float) -> torch.nn.Parameter:
    param = torch.nn.Parameter(torch.zeros(len(values)))
    param.grad = torch.tensor(values)
    return param


def test_a_finite_step_passes() -> None:
    check_finite_step(0.5, [_param(1.0, -2.0), _param(3.0)], step=1)
    check_finite_step(0.5, [torch.nn.Parameter(torch.zeros(2))], step=1)  # no gradient yet: nothing to check


@pytest.mark.parametrize("loss", [math.nan, math.inf, -math.inf])
def test_a_non_finite_loss_stops_the_step_and_names_it(loss: float) -> None:
    with pytest.raises(NonFiniteError, match=rf"training stopped at step 7: the loss is {loss}"):
        check_finite_step(loss, [_param(1.0)], step=7)


def test_a_non_finite_gradient_is_counted_in_the_message() -> None:
    params = [_param(1.0, 2.0), _param(math.nan, math.inf, 0.0)]
    with pytest.raises(NonFiniteError, match="step 2: the gradient holds 2 NaN or infinite values"):
        check_finite_step(1.0, params, step=2)


def test_flags_from_tensors_on_several_devices_are_gathered_on_one() -> None:
    """The class of bug that crashed training on CUDA (flags from two devices stacked together):
    the flags of tensors on two device types come back as one tensor on the first one's device."""
    tensors = [torch.empty(3, device="meta"), torch.tensor([1.0, math.nan]), torch.tensor([2.0])]
    flags = finite_flags(tensors)
    assert flags.device.type == "meta" and flags.shape == (3,) and flags.dtype == torch.bool
    assert finite_flags(tensors[1:]).tolist() == [False, True]
