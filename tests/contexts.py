"""Hand-made contexts and batches with the type-code pattern of rendered examples."""

from __future__ import annotations

import torch

from cpt import CPTConfig
from cpt.data import Example

# one example: input template, input, input, input, separator, output template x2, label x2, end
EXAMPLE_CODES = [1, 2, 2, 2, 0, 3, 3, 4, 4, 0]
SAMPLE_CODES = [1, 2, 2, 0, 3, 4, 4, 0, 0]
SHORT_SAMPLE_CODES = [1, 2, 0, 3, 4, 4, 4, 0]  # one token shorter, a three-token label

FEW_SHOT_LABELS = ["negative", "positive"]
FEW_SHOT_EXAMPLES = [  # two distinct texts of each label: leave-one-out can score every one
    Example("a great film", "positive"),
    Example("an awful story", "negative"),
    Example("a fine movie", "positive"),
    Example("boring and long", "negative"),
]


def context_config(num_examples: int = 2, **kwargs) -> CPTConfig:
    """A context of ``num_examples`` examples of EXAMPLE_CODES, ids from 10 up."""
    codes = []
    for k in range(num_examples):
        codes += [c + 4 * k if c > 0 else 0 for c in EXAMPLE_CODES]
    ids = [10 + i for i in range(len(codes))]
    return CPTConfig(cpt_token_ids=ids, cpt_mask=[1] * len(ids), cpt_tokens_type_mask=codes, **kwargs)


def sample_batch(batch_size: int, seed: int = 1) -> dict[str, torch.Tensor]:
    """Right-padded samples: odd rows are shorter, so labels sit at different positions per row."""
    g = torch.Generator().manual_seed(seed)
    seq_len = len(SAMPLE_CODES)
    ids = torch.randint(3, 90, (batch_size, seq_len), generator=g)
    codes = torch.zeros(batch_size, seq_len, dtype=torch.long)
    mask = torch.zeros(batch_size, seq_len, dtype=torch.long)
    for row in range(batch_size):
        row_codes = SAMPLE_CODES if row % 2 == 0 else SHORT_SAMPLE_CODES
        codes[row, : len(row_codes)] = torch.tensor(row_codes)
        mask[row, : len(row_codes)] = 1
    ids[mask == 0] = 0
    labels = ids.clone()
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "input_type_mask": codes}


def plain_forward(base_model: torch.nn.Module, context: torch.Tensor, embeds: torch.Tensor,
                  attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The reference the passes must reproduce: (B, N + S, V) logits of one forward of the model
    over ``[context ; sample]`` embeddings, every position, no cache.

    Args:
        context: (N, d) context embeddings.
        embeds: (B, S, d) sample embeddings.
        attention_mask: (B, N + S) mask of both, or None.
    """
    batch_size = embeds.shape[0]
    full = torch.cat([context.to(embeds.dtype).unsqueeze(0).expand(batch_size, -1, -1), embeds], dim=1)
    with torch.no_grad():
        return base_model(inputs_embeds=full, attention_mask=attention_mask).logits


def moved_model(arch: str = "llama", scale: float = 0.05, seed: int = 0):  # type: ignore[no-untyped-def]
    """A `CPTModel` over a tiny ``arch`` model whose delta was drawn (seeded) and projected: an
    adapter as training leaves one, for the tests that save and load it."""
    from tiny_models import make_model

    from cpt import CPTModel

    model = CPTModel(make_model(arch), context_config())
    with torch.no_grad():
        model.delta.normal_(0, scale, generator=torch.Generator().manual_seed(seed))
    model.project_()
    return model
