"""The CPT loss (SPEC §4): weighted cross-entropy over the label tokens of context and sample.

Targets are the label tokens (type code > 0 and a multiple of 4) anywhere in ``[context ;
sample]``, each predicted from the position before it. With ``opt_weighted_loss_type="decay"`` the
distinct label codes of a row are ranked from the end: the sample's label weighs 1, the last
context example gamma, the one before gamma**2, ... The loss is the mean over all target
positions of ``weight * cross_entropy``: not divided by the sum of weights (PEFT's reduction).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cpt.config import CPTConfig, is_label


def label_weights(codes: torch.Tensor, config: CPTConfig) -> torch.Tensor:
    """Loss weight of every position, by the rank of its label code within its row.

    Args:
        codes: (B, T) type codes of the whole sequence ``[context ; sample]`` (sample shifted).
        config: supplies ``opt_weighted_loss_type`` and ``opt_loss_decay_factor``.

    Returns:
        (B, T) float32 weights; only the values at label positions matter.
    """
    weights = torch.ones(codes.shape, dtype=torch.float32, device=codes.device)
    if config.opt_weighted_loss_type != "decay":
        return weights
    labels = is_label(codes)
    labels[:, 0] = False  # position 0 predicts nothing: its code takes no rank (as in PEFT)
    num_codes = int(codes.max()) + 1
    present = torch.zeros(codes.shape[0], num_codes + 1, dtype=torch.long, device=codes.device)  # (B, C+1)
    present.scatter_(1, torch.where(labels, codes, num_codes), 1)
    present[:, num_codes] = 0  # the dump column for non-label positions
    # rank of code c in row b: how many distinct label codes above c the row holds
    above = present.flip(1).cumsum(1).flip(1) - present  # (B, C+1)
    rank = above.gather(1, codes.clamp(max=num_codes))  # (B, T)
    return torch.pow(torch.tensor(config.opt_loss_decay_factor, dtype=torch.float64), rank).float()


def weighted_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum(weights * cross_entropy(logits, targets))`` in float32.

    Args:
        logits: (M, V) logits that predict the targets.
        targets: (M,) token ids.
        weights: (M,) weight of each term.

    Returns:
        0-dim float32 tensor.
    """
    ce = F.cross_entropy(logits.float(), targets, reduction="none")  # (M,)
    return (ce * weights.to(ce.device)).sum()


@dataclass
class LossTerms:
    """A sum of weighted cross-entropy terms and how many positions it stands for.

    Adding `LossTerms` from different parts of the sequence and taking `mean` once gives exactly
    PEFT's reduction, however the terms were computed.
    """

    total: torch.Tensor
    count: int

    @classmethod
    def of(
        cls,
        logits: torch.Tensor,
        targets: torch.Tensor,
        weights: torch.Tensor,
        count: int | None = None,
    ) -> LossTerms:
        """Terms from logits rows and their targets.

        Args:
            logits: (M, V) logits that predict the targets.
            targets: (M,) token ids.
            weights: (M,) weight of each term (already summed over rows for shared terms).
            count: positions these terms stand for; M by default.
        """
        total = weighted_cross_entropy(logits, targets, weights)
        return cls(total, targets.numel() if count is None else count)

    def __add__(self, other: LossTerms) -> LossTerms:
        return LossTerms(self.total + other.total, self.count + other.count)

    def mean(self) -> torch.Tensor:
        """The loss: total / count.

        Raises:
            ValueError: if no position is a target.
        """
        if self.count == 0:
            raise ValueError("the batch has no label token: no position is a loss target")
        return self.total / self.count
