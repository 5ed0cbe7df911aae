"""Classifying texts with a trained CPT context, by label likelihood (generation: `cpt.generation`).

Context-aware Prompt Tuning (Blau et al., arXiv 2410.17222) trains the embeddings of a few-shot
context; at inference the context is constant. Both functions here run it through the frozen model
once (`CPTModel.context_cache`) and reuse its KV cache
for every query, instead of re-running ``[context ; query]`` from the start each time.

What `classify` scores, for a text and a candidate label: the query is ``render_query(text)``
(input template, text, intra separator, output-template prefix); the *continuation* is everything
`render_example` writes after it: the label's tokens, the output template's suffix and the end
token. A label's score is the sum of the log-probabilities of all continuation tokens given
``[context ; query ; earlier continuation tokens]``, its probability the softmax of these sums over
the candidate labels. Scoring through the suffix and end token is what keeps lengths honest: a
label that is a prefix of another ("pos" and "positive") must also make the model *stop* after it,
so it is not favoured for being short. With a template that has neither an output suffix nor an end
token, only the label's own tokens are scored, and that protection is gone.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from tqdm import tqdm

from cpt import calibration
from cpt._fields import as_list, check_bool, check_distinct, check_vocabulary
from cpt.data import (
    Template,
    as_texts,
    check_distinct_labels,
    padding_id,
    render_example,
    render_query,
    right_pad,
)
from cpt.generation import (
    TEMPERATURE_RANGE,
    NonFiniteScoresError,
    check_model,
    check_strings,
    checked_cache,
    generate,
    query_ids,
    stop_token_ids,
    template_for,
)
from cpt.graphs import SEQ_BUCKET, GraphedLogits
from cpt.passes import ContextCache
from cpt.plan import Choice

__all__ = [
    "Classification", "NonFiniteScoresError", "TEMPERATURE_RANGE", "classify", "content_free_prior", "generate",
    "stop_token_ids",
]
"""`generate`, `stop_token_ids`, `NonFiniteScoresError` and `TEMPERATURE_RANGE` live in `cpt.generation`."""

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from cpt.model import CPTModel


@dataclass
class Classification:
    """What `classify` returns, for T texts and L candidate labels.

    Attributes:
        predictions: the most likely label of each text, length T.
        probabilities: (T, L) float32, softmax of ``log_likelihoods`` over the labels; rows sum
            to 1.
        log_likelihoods: (T, L) float32, total log-likelihood (natural log) of each label's
            continuation (label tokens, output-template suffix, end token) given the context and
            the query.
        labels: the candidate labels, in column order.
        prior: with ``calibrate=True``, the (L,) content-free prior that ``probabilities`` and
            ``predictions`` were divided by (`cpt.calibration`); None otherwise.
    """

    predictions: list[str]
    probabilities: torch.Tensor
    log_likelihoods: torch.Tensor
    labels: list[str]
    prior: torch.Tensor | None = None


@torch.no_grad()
def classify(
    model: CPTModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    labels: Sequence[str],
    *,
    template: Template | None = None,
    batch_size: int = 8,
    context_cache: ContextCache | None = None,
    use_cache: bool = True,
    cuda_graphs: Choice = "auto",
    calibrate: bool = False,
    progress: bool = False,
) -> Classification:
    """Scores every candidate label for every text by its log-likelihood after the context.

    The score of a (text, label) pair is the summed log-probability of the tokens that
    ``render_example(text, label)`` writes after ``render_query(text)``: the label's tokens, the
    output template's suffix and the end token (see the module docstring). With the context's
    cache, each query runs once (``batch_size`` queries a pass, longest first) and every
    label's continuation runs against ``[context ; query]``: L labels cost one query and L short
    continuations, not L whole sequences. Without the cache (``use_cache=False``), and where
    CUDA graphs replay the batches, each pair is one sequence, ``batch_size`` sequences a pass.

    The model's train/eval mode is left as it is: call ``model.eval()`` first if it has dropout.

    Args:
        model: a trained `CPTModel`.
        tokenizer: the tokenizer the context was made with.
        texts: T >= 1 input texts.
        labels: L >= 1 distinct candidate labels, each rendering to at least one token.
        template: how examples are written out; None: the one the model's context was written
            with (``model.task``, which `fit` and saved adapters record), else the default.
        batch_size: queries (or pair sequences) per forward pass, >= 1; a query pass is
            followed by one pass over its ``batch_size * L`` continuations.
        context_cache: the context's KV cache; by default ``model.context_cache()``, which the
            model keeps while its adapter is unchanged. Must come from ``model``'s current context.
        use_cache: if False, every batch runs ``[context ; sequence]`` from the start (the plain
            path, for checking the cached one); ``context_cache`` is then ignored. (Where a
            query renders to no tokens, the label's first token is scored from a forward pass
            over the context alone, on either path.)
        cuda_graphs: replay the passes against the cached context from CUDA graphs
            (`cpt.graphs.GraphedLogits`): sequences are padded to a multiple of 8 tokens, and a
            batch shape is captured the second time it comes in the call.
            ``"auto"``: on a CUDA device with the cache; ``"on"`` requires it; ``"off"`` never.
        calibrate: divide each text's label probabilities by those the context gives
            content-free inputs (`cpt.calibration`, Zhao et al. 2021) before choosing a label;
            ``log_likelihoods`` stay uncalibrated. Costs 3 more queries.
        progress: show a bar on stderr counting the texts scored (as ``cpt eval`` and ``cpt
            predict`` do).

    Returns:
        A `Classification` with (T, L) float32 tensors on the CPU.

    Raises:
        ValueError: if ``model`` is not a `CPTModel`, ``texts`` or ``labels`` is empty or not a
            sequence of strings (each valid Unicode, `cpt._fields.check_text`), a flag is not a
            bool, ``template`` not a `Template`, ``labels`` holds one label only or a duplicate, a
            label renders to no tokens, two labels render to the same tokens
            (`cpt.data.check_distinct_labels`), a text or label holds a token id outside the
            model's vocabulary, ``batch_size`` is below 1,
            ``context_cache`` has the wrong length, a text's query with its longest continuation
            does not fit the model's maximum number of positions (naming the text), or
            ``cuda_graphs="on"`` where graphs cannot run (not on CUDA, or ``use_cache=False``).
        NonFiniteScoresError: a ValueError naming the first text with a NaN or infinite score.
    """
    check_model(model)
    texts = check_strings("texts", as_texts(texts))
    labels = check_strings("labels", labels)
    if len(labels) < 2:  # the one label would win every text, with probability 1
        raise ValueError(f"labels holds {len(labels)} label: a classification needs at least two, got {labels!r}")
    check_distinct(labels, "labels")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    check_bool(use_cache, "use_cache")
    check_bool(calibrate, "calibrate")
    check_bool(progress, "progress")
    template = template_for(model, template)

    queries = [query_ids(model, tokenizer, template, text, i) for i, text in enumerate(texts)]
    continuations = [_continuation(model, tokenizer, template, label, j) for j, label in enumerate(labels)]
    check_distinct_labels(labels, continuations)
    longest = max(len(ids) for ids in continuations)
    i = max(range(len(queries)), key=lambda j: len(queries[j]))  # the first of the longest texts
    what = f"text {i} with the longest label"
    model.check_fits(len(queries[i]) + longest, what)

    cached: Choice = "on" if use_cache else "off"
    how = model.execution_plan("infer", batch_size, longest, context_cache=cached, cuda_graphs=cuda_graphs)
    cache = checked_cache(model, context_cache) if how.cached else None
    graphed = GraphedLogits(model, capture_after=2) if how.graphs else None  # a shape used once: no capture
    pad_id = padding_id(tokenizer, model.vocab_size)
    with tqdm(total=len(texts), desc="scoring", unit="text", file=sys.stderr, disable=not progress) as bar:
        job = _Job(queries, continuations, batch_size, pad_id, bar.update)
        scores = _score_by_query(model, cache, job) if how.query_once else _score_pairs(model, cache, graphed, job)
    _check_finite_scores(scores, texts)

    probabilities = scores.softmax(dim=-1)  # (T, L)
    prior = None
    if calibrate:
        prior = content_free_prior(
            model, tokenizer, labels, template=template, batch_size=batch_size,
            context_cache=cache, use_cache=use_cache, cuda_graphs=cuda_graphs,
        )
        probabilities = calibration.calibrate(probabilities, prior)
    chosen = (probabilities if calibrate else scores).argmax(dim=-1)  # (T,)
    predictions = [labels[j] for j in chosen.tolist()]
    return Classification(predictions, probabilities, scores, list(labels), prior)


def content_free_prior(
    model: CPTModel,
    tokenizer: PreTrainedTokenizerBase,
    labels: Sequence[str],
    *,
    template: Template | None = None,
    inputs: Sequence[str] = calibration.CONTENT_FREE_INPUTS,
    **classify_kwargs: Any,
) -> torch.Tensor:
    """The context's label probabilities for content-free inputs, averaged.

    Args:
        model: the `CPTModel` whose context is calibrated.
        tokenizer: its tokenizer.
        labels: the candidate labels, in column order.
        template: the template the context was written with; the default `Template` if None.
        inputs: the content-free texts, at least one.
        **classify_kwargs: passed to `classify` (``batch_size``, ``context_cache``...).

    Returns:
        (L,) float32 on the CPU, positive, summing to 1.
    """
    result = classify(model, tokenizer, as_list(inputs, "inputs", "strings"), labels, template=template, **classify_kwargs)
    return result.probabilities.mean(dim=0)




@dataclass(frozen=True)
class _Job:
    """What a scorer scores: T queries and L continuations (token ids), ``batch_size`` a pass,
    right-padded with ``pad_id``; ``on_scored(n)`` hears of every n texts a pass finishes."""

    queries: list[list[int]]
    continuations: list[list[int]]
    batch_size: int
    pad_id: int
    on_scored: Callable[[int], object]


def _score_pairs(model: CPTModel, cache: ContextCache | None, graphed: GraphedLogits | None, job: _Job) -> torch.Tensor:
    """(T, L) scores with one sequence ``query + continuation`` per (text, label) pair,
    ``batch_size`` sequences per pass, longest first. The reference path (``cache`` None: the
    context runs again with every batch) and the one CUDA graphs replay (sequences padded to
    `SEQ_BUCKET` tokens, so that batch shapes repeat)."""
    queries, continuations, batch_size, pad_id = job.queries, job.continuations, job.batch_size, job.pad_id
    device = model.delta.device
    bucket = SEQ_BUCKET if graphed is not None else 1
    # The first token of a sequence is predicted at the context's last position: needed only
    # where a query is empty (the label starts the sequence).
    first_log_probs = None  # (V,)
    if any(not query for query in queries):
        last_logits = (cache if cache is not None else model.context_cache()).last_logits
        first_log_probs = last_logits.float().log_softmax(dim=-1).to(device)

    pairs = [(i, j) for i in range(len(queries)) for j in range(len(continuations))]
    pairs.sort(key=lambda pair: -(len(queries[pair[0]]) + len(continuations[pair[1]])))
    scores = torch.empty(len(queries), len(continuations), dtype=torch.float32)
    labels_left = [len(continuations)] * len(queries)  # a text is scored once its last pair is
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        cpu_ids, cpu_mask = right_pad([queries[i] + continuations[j] for i, j in chunk], pad_id, bucket)
        input_ids, attention_mask = cpu_ids.to(device), cpu_mask.to(device)  # (B, S) each
        query_lengths = [len(queries[i]) for i, _ in chunk]
        # Logits only where a scored token is predicted: from the shortest query's end on (from
        # a multiple of the bucket, so that graphs see few shapes).
        first_scored = max(min(query_lengths), 1)  # token 0 (empty query) comes from the context
        first_kept = (first_scored - 1) // bucket * bucket
        seq_len = input_ids.shape[1]
        positions = torch.arange(first_kept, seq_len - 1)
        if graphed is not None:
            logits = graphed(cpu_ids, cpu_mask, positions, context_cache=cache)
        else:
            logits = model.sample_logits(
                input_ids, attention_mask, context_cache=cache, positions=positions.to(device)
            )
        # (B, S - 1 - first_kept, V): position p predicts token p + 1
        log_probs = logits.float().log_softmax(dim=-1)
        token_log_probs = torch.zeros(input_ids.shape, dtype=torch.float32, device=device)  # (B, S)
        token_log_probs[:, first_kept + 1 :] = log_probs.gather(
            -1, input_ids[:, first_kept + 1 :].unsqueeze(-1)
        ).squeeze(-1)
        if first_log_probs is not None:
            token_log_probs[:, 0] = first_log_probs[input_ids[:, 0]]
        query_lengths = torch.tensor(query_lengths, device=device)  # (B,)
        positions = torch.arange(input_ids.shape[1], device=device)  # (S,)
        scored = (positions >= query_lengths.unsqueeze(1)) & attention_mask.bool()  # (B, S)
        totals = torch.where(scored, token_log_probs, 0.0).sum(dim=-1).cpu()  # (B,)
        rows, columns = zip(*chunk, strict=True)
        scores[list(rows), list(columns)] = totals
        for i in rows:
            labels_left[i] -= 1
        job.on_scored(sum(labels_left[i] == 0 for i in set(rows)))

    return scores


def _score_by_query(model: CPTModel, cache: ContextCache, job: _Job) -> torch.Tensor:
    """(T, L) scores with each query run once: a batch of queries goes through the model after
    the cached context, then each one's L continuations run against ``[context ; its query]``.
    The same numbers as `_score_pairs`, for about ``(Q + L * C) / (L * (Q + C))`` of its tokens
    (queries of Q tokens, continuations of C). ``batch_size`` queries per pass, longest first;
    their continuations run ``max(1, batch_size // L)`` texts (about ``batch_size`` rows, each
    with its own copy of the prefix's states) a pass."""
    queries, continuations, batch_size, pad_id = job.queries, job.continuations, job.batch_size, job.pad_id
    device = model.delta.device
    num_labels = len(continuations)
    cont_ids, cont_mask = (t.to(device) for t in right_pad(continuations, pad_id))  # (L, C) each
    order = sorted(range(len(queries)), key=lambda i: -len(queries[i]))
    scores = torch.empty(len(queries), num_labels, dtype=torch.float32)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        lengths = torch.tensor([len(queries[i]) for i in chunk], device=device)  # (b,)
        states, mask, last_logits = _after_queries(model, cache, [queries[i] for i in chunk], lengths, pad_id)
        first = last_logits.float().log_softmax(dim=-1)[:, cont_ids[:, 0]]  # (b, L): token 0
        # tokens 1..: about batch_size rows a pass, since each row holds its own copy of the prefix
        rest = torch.cat([
            _continuation_log_probs(model, states, mask, lengths, texts, cont_ids, cont_mask)
            for texts in torch.arange(len(chunk), device=device).split(max(1, batch_size // num_labels))
        ])  # (b, L)
        scores[chunk] = (first + rest).cpu()
        job.on_scored(len(chunk))
    return scores


def _after_queries(
    model: CPTModel, cache: ContextCache, queries: list[list[int]], lengths: torch.Tensor, pad_id: int
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor, torch.Tensor]:
    """Runs b right-padded queries after the cached context.

    Returns:
        The per-layer (keys, values) of ``[context ; queries]``, each (b, heads, N + S, dim); the
        (b, N + S) attention mask of those positions; the (b, V) logits at each query's last
        token (the context's last position for an empty query).
    """
    device = lengths.device
    batch_size = len(queries)
    if max(len(query) for query in queries) == 0:
        return cache.tensors, model.context_mask(batch_size), cache.last_logits.unsqueeze(0).expand(batch_size, -1)
    input_ids, query_mask = (t.to(device) for t in right_pad(queries, pad_id))  # (b, S) each
    last = (lengths - 1).clamp(min=0)  # (b,)
    keep = torch.unique(last)
    logits, states, mask = model.query_pass(cache, input_ids, query_mask, keep)  # mask: (b, N + S)
    logits = logits[torch.arange(batch_size, device=device), torch.searchsorted(keep, last)]  # (b, V)
    empty = lengths == 0  # an empty query beside others: its first token comes from the context
    logits = torch.where(empty.unsqueeze(1), cache.last_logits.float(), logits.float())  # (b, V) float32
    return states, mask, logits


def _continuation_log_probs(
    model: CPTModel,
    states: list[tuple[torch.Tensor, torch.Tensor]],
    prefix_mask: torch.Tensor,
    lengths: torch.Tensor,
    texts: torch.Tensor,
    cont_ids: torch.Tensor,
    cont_mask: torch.Tensor,
) -> torch.Tensor:
    """(t, L) summed log-probabilities of continuation tokens 1.. after ``[context ; query]`` for
    the ``texts`` (t indices into the rows of ``states``, ``prefix_mask`` and ``lengths``); token
    0 is scored from the query's last position by the caller. Each continuation sits after its
    query's padding, so its positions are given explicitly: N + query length + k."""
    num_labels, length = cont_ids.shape
    batch_size = texts.shape[0]
    if length == 1:
        return torch.zeros(batch_size, num_labels, device=cont_ids.device)
    source = texts.repeat_interleave(num_labels)  # (rows,): row r holds text r // L, label r % L
    prefix = [  # one copy of each row's prefix (none where one batch-1 prefix serves all)
        (keys, values) if keys.shape[0] == 1 else (keys[source], values[source]) for keys, values in states
    ]
    ids = cont_ids.repeat(batch_size, 1)  # (rows, C)
    mask = torch.cat([prefix_mask[source], cont_mask.repeat(batch_size, 1)], dim=1)  # (rows, N + S + C)
    starts = model.num_virtual_tokens + lengths[source]  # (rows,)
    positions = starts.unsqueeze(1) + torch.arange(length, device=ids.device)  # (rows, C)
    keep = torch.arange(length - 1, device=ids.device)
    logits = model.continuation_pass(prefix, ids, mask, positions, keep)
    log_probs = logits.float().log_softmax(dim=-1)  # (rows, C - 1, V): position k predicts k + 1
    token_log_probs = log_probs.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # (rows, C - 1)
    real = cont_mask.repeat(batch_size, 1)[:, 1:].bool()  # right padding scores nothing
    return torch.where(real, token_log_probs, 0.0).sum(dim=-1).view(batch_size, num_labels)


def _continuation(
    model: CPTModel, tokenizer: PreTrainedTokenizerBase, template: Template, label: str, index: int
) -> list[int]:
    """What `render_example` writes after the query: label, output suffix, end token."""
    what = f"label {index} ({label!r})"
    try:
        # render_example(text, label) is render_query(text) + this, whatever the text.
        full = render_example(tokenizer, template, "", label).input_ids
    except ValueError as error:
        raise ValueError(f"{what}: {error}") from error
    ids = full[len(render_query(tokenizer, template, "").input_ids) :]
    check_vocabulary(ids, model.vocab_size, what)
    return ids


def _check_finite_scores(scores: torch.Tensor, texts: list[str]) -> None:
    """Refuses the first text with a NaN or infinite score in the (T, L) table, on the host
    already: no read from the device beyond the one per batch that brought the scores back."""
    finite = torch.isfinite(scores).all(dim=1)  # (T,)
    if not bool(finite.all()):
        i = int((~finite).nonzero()[0])
        raise NonFiniteScoresError(
            i, texts[i], "the model's label scores are NaN or infinite, so no label can be chosen; its "
            "weights, or activations overflowing their dtype (float16), are at fault",
        )


