"""The trainable CPT context: its embeddings, their offsets and the balls that bound them.

The context's embeddings are ``base + delta``: ``base`` holds the model's word embeddings of
``config.cpt_token_ids`` (float32, fixed), ``delta`` (float32, trainable, zero at start) moves only
on input-template, input and output-template rows, each row inside its own L2 ball
(`cpt.projection`). Besides the tensors, a `Context` keeps the facts of the fixed context that the
passes and the loss read as Python values (reading them off a GPU between two passes would stall
the launch queue).
"""

from __future__ import annotations

import torch
from torch import nn

from cpt import plan
from cpt._fields import check_vocabulary, is_finite, show
from cpt.config import IGNORE_INDEX, CPTConfig, is_label, is_trainable
from cpt.projection import epsilons, project_


class Context(nn.Module):
    """The N context rows of a `cpt.model.CPTModel`.

    Args:
        config: the context.
        embeddings: the base model's input embeddings (read once, for ``base``).
        compile_projection: fuse the projection with ``torch.compile``: ``"auto"``, ``"on"`` or
            ``"off"`` (`cpt.plan.compiles_projection` decides ``"auto"``).

    Raises:
        ValueError: if a context id lies outside the vocabulary, or ``compile_projection`` is not
            one of its choices.
    """

    def __init__(self, config: CPTConfig, embeddings: nn.Embedding, compile_projection: plan.Choice = "auto") -> None:
        super().__init__()
        vocab_size, hidden_size = embeddings.weight.shape
        check_vocabulary(config.cpt_token_ids, vocab_size, "cpt_token_ids")
        self.config = config
        self.compile_projection = plan.choice("compile_projection", compile_projection)
        device = embeddings.weight.device
        ids = torch.tensor(config.cpt_token_ids, dtype=torch.long, device=device)  # (N,)
        codes = torch.tensor(config.cpt_tokens_type_mask, dtype=torch.long, device=device)  # (N,)
        with torch.no_grad():
            base = embeddings(ids).detach().to(torch.float32).clone()  # (N, d)
        self.register_buffer("base", base)
        self.delta = nn.Parameter(torch.zeros_like(base))  # (N, d)
        self.register_buffer("ids", ids, persistent=False)
        self.register_buffer("codes", codes, persistent=False)
        self.register_buffer("mask", torch.tensor(config.cpt_mask, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("trainable_rows", is_trainable(codes).unsqueeze(1), persistent=False)  # (N, 1)
        self.register_buffer("epsilon", epsilons(config, hidden_size).to(device), persistent=False)  # (N,)
        self.num_tokens = config.num_virtual_tokens
        self.hidden_size = hidden_size
        self.fully_visible = all(config.cpt_mask)
        self.max_code = max(config.cpt_tokens_type_mask)  # samples' codes start above it
        positions = target_mask(codes.unsqueeze(0), ids.unsqueeze(0))[0].nonzero(as_tuple=True)[0]  # (Mc,)
        self.cpu_codes, self.cpu_target_positions = codes.cpu(), positions.cpu()  # read by the loss's plan
        self.register_buffer("target_ids", ids[positions], persistent=False)  # (Mc,) the context's labels
        last = positions.new_tensor([self.num_tokens - 1])
        self.register_buffer("keep", torch.cat([positions - 1, last]), persistent=False)  # (Mc + 1,)

    def values(self) -> torch.Tensor:
        """(N, d) float32: ``base + delta``."""
        return self.base + self.delta

    def embeddings(self, dtype: torch.dtype) -> torch.Tensor:
        """(N, d) context embeddings for a forward pass, in ``dtype``: the values of `values`,
        with the gradient reaching only the trainable rows."""
        delta = torch.where(self.trainable_rows, self.delta, self.delta.detach())
        return (self.base + delta).to(dtype)

    def attention_mask(self) -> torch.Tensor | None:
        """(N,) 0/1 mask of the context's rows, or None where every row is visible."""
        return None if self.fully_visible else self.mask

    def is_projected(self, rtol: float = 1e-5) -> bool:
        """Whether every row of ``delta`` is inside its ball (up to float rounding, ``rtol``)."""
        if not (is_finite(rtol) and rtol >= 0):
            raise ValueError(f"rtol must be a finite number >= 0, got {show(rtol)}")
        norms = torch.linalg.vector_norm(self.delta.detach(), dim=1)
        return bool(torch.all(norms <= self.epsilon * (1 + rtol)))

    def project_(self) -> None:
        """Puts every row of ``delta`` back into its L2 ball."""
        compile = plan.compiles_projection(self.compile_projection, self.delta.device.type)
        project_(self.delta, self.epsilon, compile=compile)

    def _apply(self, fn, recurse: bool = True):  # type: ignore[no-untyped-def]
        # `.to(dtype)` reaches the model around the context; the context stays float32, only moves.
        base, delta = self.base, self.delta.data
        super()._apply(fn, recurse)
        device = self.ids.device
        self.base = base.to(device)
        self.delta.data = delta.to(device)
        return self


def target_mask(codes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, T) True where position p is a label with a target; position 0 has no predictor."""
    targets = is_label(codes) & (labels != IGNORE_INDEX)
    targets[:, 0] = False
    return targets
