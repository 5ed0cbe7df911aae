"""`cpt.context`: the context's values (``base + delta``), what a forward pass sees of them and
where their gradient goes, the balls that bound them, its masks and the facts the passes and the
loss read (its labels, their positions). A context of 2 examples of `contexts.EXAMPLE_CODES`:
ids 10..29; label rows 7, 8, 17, 18; separators 4, 9, 14, 19."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from contexts import context_config
from tiny_models import HIDDEN, make_model

from cpt import CPTModel
from cpt.config import IGNORE_INDEX
from cpt.context import Context, target_mask
from cpt.projection import epsilons

LABEL_ROWS = [7, 8, 17, 18]
TRAINABLE_ROWS = [0, 1, 2, 3, 5, 6, 10, 11, 12, 13, 15, 16]  # input template, inputs, output template


def _context(base_model: torch.nn.Module | None = None, **config) -> Context:  # type: ignore[no-untyped-def]
    base_model = make_model("llama") if base_model is None else base_model
    return Context(context_config(**config), base_model.get_input_embeddings())


def _moved(context: Context, scale: float = 0.05) -> torch.Tensor:
    """Moves every row of ``delta`` at random; returns the new delta."""
    with torch.no_grad():
        context.delta.copy_(torch.randn(context.delta.shape, generator=torch.Generator().manual_seed(4)) * scale)
    return context.delta.detach().clone()


def test_the_context_starts_at_the_word_embeddings_of_its_ids() -> None:
    base_model = make_model("llama")
    context = _context(base_model)
    words = base_model.get_input_embeddings().weight.detach()[10:30]
    assert context.num_tokens == 20 and context.hidden_size == HIDDEN
    assert torch.equal(context.ids, torch.arange(10, 30))
    assert context.base.dtype == context.delta.dtype == torch.float32
    assert torch.equal(context.base, words) and torch.count_nonzero(context.delta) == 0
    assert isinstance(context.delta, torch.nn.Parameter)
    assert torch.equal(context.values(), words)


def test_half_precision_embeddings_give_a_float32_base() -> None:
    base_model = make_model("llama", dtype=torch.bfloat16)
    context = _context(base_model)
    assert context.base.dtype == torch.float32
    assert torch.equal(context.base, base_model.get_input_embeddings().weight.detach()[10:30].float())
    assert context.embeddings(torch.bfloat16).dtype == torch.bfloat16


def test_values_are_base_plus_delta_and_embeddings_are_the_values_in_the_passes_dtype() -> None:
    context = _context()
    delta = _moved(context)
    assert torch.equal(context.values(), context.base + delta)
    assert torch.equal(context.embeddings(torch.float32), context.values())
    assert torch.equal(context.embeddings(torch.float16), context.values().to(torch.float16))


def test_the_gradient_reaches_only_the_trainable_rows() -> None:
    context = _context()
    _moved(context)
    weights = torch.randn(20, HIDDEN, generator=torch.Generator().manual_seed(5))
    (context.embeddings(torch.float32) * weights).sum().backward()
    trainable = torch.zeros(20, dtype=torch.bool)
    trainable[TRAINABLE_ROWS] = True
    assert torch.equal(context.trainable_rows.squeeze(1), trainable)
    assert torch.equal(context.delta.grad[trainable], weights[trainable])
    assert torch.count_nonzero(context.delta.grad[~trainable]) == 0  # labels and separators


def test_the_facts_of_the_fixed_context() -> None:
    context = _context()
    assert context.max_code == 8  # the samples' codes start above it
    assert context.cpu_codes.device.type == "cpu" and context.cpu_codes.tolist() == context.config.cpt_tokens_type_mask
    assert context.cpu_target_positions.tolist() == LABEL_ROWS
    assert context.target_ids.tolist() == [10 + p for p in LABEL_ROWS]  # the labels the loss scores
    assert context.keep.tolist() == [6, 7, 16, 17, 19]  # each label's predictor, then the last row


def test_the_masks_of_a_visible_and_of_a_partly_masked_context() -> None:
    visible = _context()
    assert visible.fully_visible and visible.attention_mask() is None
    assert torch.equal(visible.mask, torch.ones(20, dtype=torch.long))
    mask = [1] * 20
    mask[3] = mask[12] = 0
    masked = Context(replace(context_config(), cpt_mask=mask), make_model("llama").get_input_embeddings())
    assert not masked.fully_visible
    assert masked.attention_mask().tolist() == mask


def test_the_radii_follow_the_configs_epsilons() -> None:
    context = _context(opt_projection_epsilon=0.3, opt_projection_format_epsilon=0.1)
    assert torch.equal(context.epsilon, epsilons(context.config, HIDDEN))
    assert context.epsilon.shape == (20,)


def test_projection_puts_every_row_back_in_its_ball_and_leaves_rows_inside_alone() -> None:
    context = _context(opt_projection_epsilon=0.3, opt_projection_format_epsilon=0.1)
    delta = _moved(context, scale=1.0)  # every row far outside its ball
    with torch.no_grad():
        context.delta[0] = 0.5 * context.epsilon[0] * delta[0] / delta[0].norm()  # one row inside
    inside = context.delta.detach()[0].clone()
    assert not context.is_projected()
    context.project_()
    assert context.is_projected()
    norms = torch.linalg.vector_norm(context.delta.detach(), dim=1)
    torch.testing.assert_close(norms[1:], context.epsilon[1:], rtol=1e-5, atol=0)  # on the sphere
    assert torch.equal(context.delta.detach()[0], inside)
    directions = context.delta.detach()[1:] / norms[1:, None]
    torch.testing.assert_close(directions, delta[1:] / delta[1:].norm(dim=1, keepdim=True), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rtol", [-1e-3, float("nan"), float("inf"), "0.1", True])
def test_is_projected_needs_a_finite_tolerance(rtol) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=r"^rtol must be a finite number >= 0, got "):
        _context().is_projected(rtol)


def test_is_projected_allows_float_rounding_within_its_tolerance() -> None:
    context = _context()
    row = torch.zeros(HIDDEN)
    row[0] = float(context.epsilon[0]) * (1 + 1e-6)
    with torch.no_grad():
        context.delta[0] = row
    assert context.is_projected() and not context.is_projected(rtol=0)


def test_an_id_outside_the_vocabulary_is_refused() -> None:
    config = context_config()
    config.cpt_token_ids[3] = 500
    message = r"^cpt_token_ids holds token id 500, outside the model's vocabulary of 96"
    with pytest.raises(ValueError, match=message):
        Context(config, make_model("llama").get_input_embeddings())
    with pytest.raises(ValueError, match=message):  # and so the model that would hold it
        CPTModel(make_model("llama"), config)


def test_moving_to_another_dtype_keeps_the_context_float32() -> None:
    context = _context()
    delta = _moved(context)
    parameter = context.delta
    context.to(torch.bfloat16)
    context.double()
    assert context.base.dtype == context.delta.dtype == torch.float32
    assert context.delta is parameter and torch.equal(context.delta.detach(), delta)


def test_only_base_and_delta_are_saved() -> None:
    assert set(_context().state_dict()) == {"base", "delta"}  # the rest is derived from the config


def test_target_mask_marks_labels_with_a_target_after_position_0() -> None:
    codes = torch.tensor([[4, 1, 2, 0, 3, 4, 4, 0], [1, 2, 3, 4, 8, 0, 0, 0]])
    labels = torch.tensor([[5, 6, 7, 8, 9, 10, IGNORE_INDEX, 0], [5, 6, 7, 8, 9, 0, 0, 0]])
    expected = torch.tensor([
        [False, False, False, False, False, True, False, False],  # row 0: position 0 has no predictor
        [False, False, False, True, True, False, False, False],
    ])
    assert torch.equal(target_mask(codes, labels), expected)
