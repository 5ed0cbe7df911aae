"""The projection step of CPT's projected gradient descent.

Every row i of the trainable offset ``delta`` lives in an L2 ball of radius ``eps_i``; after each
optimizer step the rows that left their ball are scaled back onto its surface:

    delta_i <- delta_i * eps_i / max(||delta_i||_2, eps_i)

Input rows use ``opt_projection_epsilon``, template rows ``opt_projection_format_epsilon``, both
scaled by ``sqrt(d / 2048)``; labels and separators get a radius of ``1e-10`` (they never move).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from cpt.config import EPSILON_REFERENCE_DIM, FROZEN_EPSILON, CPTConfig, TokenRole, token_roles
from cpt.warning import CPTWarning


def epsilons(config: CPTConfig, hidden_size: int) -> torch.Tensor:
    """Ball radius of every context row.

    Args:
        config: the context's config (type codes and the two epsilons).
        hidden_size: d, the model's embedding size.

    Returns:
        (N,) float32 tensor on the CPU.
    """
    roles = token_roles(torch.tensor(config.cpt_tokens_type_mask, dtype=torch.long))  # (N,)
    eps = torch.full(roles.shape, FROZEN_EPSILON, dtype=torch.float32)
    # sqrt(d / 2048) and the products are taken in float32, so they round as PEFT's do.
    scale_t = torch.sqrt(torch.tensor([hidden_size / EPSILON_REFERENCE_DIM], dtype=torch.float32))
    format_rows = (roles == TokenRole.INPUT_TEMPLATE) | (roles == TokenRole.OUTPUT_TEMPLATE)
    eps[format_rows] = (config.opt_projection_format_epsilon * scale_t).item()
    eps[roles == TokenRole.INPUT] = (config.opt_projection_epsilon * scale_t).item()
    if not bool(torch.isfinite(eps).all()):  # CPTConfig bounds the epsilons; a huge d could not
        raise ValueError(f"the projection radii are not finite for hidden size {hidden_size}")
    return eps


def project(delta: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Projects each row of ``delta`` onto the L2 ball of its radius.

    Rows already inside their ball are returned unchanged (bit for bit); the others are scaled by
    ``eps_i / ||delta_i||``. Rows that arithmetic would spoil land on their sphere all the same:
    a row whose norm overflows float32 (it is scaled by its largest entry before the norm is
    taken), a row holding +-inf (it points along its infinite entries), and a row so long that
    ``eps_i / ||delta_i||`` underflows to zero. A row holding NaN stays NaN.

    Args:
        delta: (N, d) float32 offsets.
        eps: (N,) float32 radii, >= 0 and finite.

    Returns:
        (N, d) projected offsets.
    """
    norm = torch.linalg.vector_norm(delta, dim=1)  # (N,)
    scale = torch.where(norm > eps, eps / norm, torch.ones_like(norm))  # (N,)
    projected = delta * scale.unsqueeze(1)
    # Rows the plain formula spoils: norm inf (overflow, or an inf entry), or a scale below the
    # smallest normal float (the row would come out zero or denormal instead of on its sphere).
    spoiled = ~torch.isfinite(norm) | ((norm > eps) & (scale < torch.finfo(delta.dtype).tiny) & (eps > 0))
    infinite = torch.isinf(delta)
    has_inf = infinite.any(dim=1, keepdim=True)  # (N, 1)
    largest = delta.abs().amax(dim=1, keepdim=True)  # (N, 1)
    direction = torch.where(has_inf, torch.where(infinite, torch.sign(delta), 0.0), delta / largest)
    unit = direction / torch.linalg.vector_norm(direction, dim=1, keepdim=True)
    return torch.where(spoiled.unsqueeze(1), unit * eps.unsqueeze(1), projected)


_compiled_project: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
_compile_failed = False


def project_fn(compile: bool) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Returns `project`, fused into one kernel by ``torch.compile(fullgraph=True)`` if asked.

    Compilation is attempted once per process; if it fails (no compiler, unsupported platform),
    the eager function is used from then on and a warning says why.
    """
    global _compiled_project, _compile_failed
    if not compile or _compile_failed:
        return project
    if _compiled_project is None:
        _compiled_project = torch.compile(project, fullgraph=True, dynamic=False)
    return _compiled_project


def project_(delta: torch.Tensor, eps: torch.Tensor, compile: bool = False) -> None:
    """Projects ``delta`` in place (no autograd). See `project`."""
    global _compile_failed
    with torch.no_grad():
        fn = project_fn(compile)
        try:
            projected = fn(delta, eps)
        except Exception as error:  # compile is best effort; eager gives the same numbers
            if fn is project:
                raise
            _compile_failed = True
            warnings.warn(f"torch.compile of the projection failed, using eager: {error}", CPTWarning, stacklevel=2)
            projected = project(delta, eps)
        delta.copy_(projected)
