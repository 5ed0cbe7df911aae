"""Inference with a trained CPT context: classify texts by label likelihood, or generate.

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

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from cpt import _compat, calibration, passes
from cpt._fields import as_list, check_bool, check_distinct, check_text, check_vocabulary, int_list, is_int, is_number, show
from cpt.context import Context
from cpt.data import (
    Template, as_template, as_texts, check_distinct_labels, padding_id, render_example, render_query,
    right_pad, task_template,
)
from cpt.graphs import SEQ_BUCKET, GraphedLogits
from cpt.passes import ContextCache
from cpt.plan import Choice

if TYPE_CHECKING:
    from cpt.model import CPTModel
    from transformers import PreTrainedTokenizerBase


SCORES_DTYPE = torch.float32
"""The dtype of the scores inference reads: `classify`'s log-probabilities, and the next-token
scores ``transformers``' ``generate`` casts the logits to before sampling."""

TEMPERATURE_RANGE = (torch.finfo(SCORES_DTYPE).tiny, torch.finfo(SCORES_DTYPE).max)
"""The sampling temperatures `generate` takes: a positive normal float32 (a subnormal one may be
flushed to zero) that is finite. Any of them is computable, since `generate` shifts each step's
scores to a maximum of 0 before they are divided by it (the best token's score stays 0, the others
go to at worst minus infinity)."""


class NonFiniteScoresError(ValueError):
    """The model's scores for a text hold NaN or infinity, so no label or token can be chosen
    from them (broken weights, or activations that overflowed their dtype).

    Attributes:
        index: the text's position among the texts of the call.
        text: the text.
    """

    def __init__(self, index: int, text: str, what: str) -> None:
        self.index, self.text, self.what = index, text, what
        super().__init__(f"{_text_name(index, text)}: {what}")

    def at(self, index: int) -> NonFiniteScoresError:
        """The same error for the text at ``index`` of a larger list (a caller that passed a part)."""
        return NonFiniteScoresError(index, self.text, self.what)


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
    _check_model(model)
    texts = _strings("texts", as_texts(texts))
    labels = _strings("labels", labels)
    if len(labels) < 2:  # the one label would win every text, with probability 1
        raise ValueError(f"labels holds {len(labels)} label: a classification needs at least two, got {labels!r}")
    check_distinct(labels, "labels")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    check_bool(use_cache, "use_cache")
    check_bool(calibrate, "calibrate")
    template = _template(model, template)

    queries = [_query_ids(model, tokenizer, template, text, i) for i, text in enumerate(texts)]
    continuations = [_continuation(model, tokenizer, template, label, j) for j, label in enumerate(labels)]
    check_distinct_labels(labels, continuations)
    longest = max(len(ids) for ids in continuations)
    i = max(range(len(queries)), key=lambda j: len(queries[j]))  # the first of the longest texts
    what = f"text {i} with the longest label"
    _compat.check_positions(model.base_model.config, model.num_virtual_tokens, len(queries[i]) + longest, what)

    cached: Choice = "on" if use_cache else "off"
    how = model.execution_plan("infer", batch_size, longest, context_cache=cached, cuda_graphs=cuda_graphs)
    cache = _checked_cache(model, context_cache) if how.cached else None
    graphed = GraphedLogits(model, capture_after=2) if how.graphs else None  # a shape used once: no capture
    pad_id = padding_id(tokenizer, _vocab_size(model))
    if how.query_once:
        scores = _score_by_query(model, cache, queries, continuations, batch_size, pad_id)
    else:
        scores = _score_pairs(model, cache, graphed, queries, continuations, batch_size, pad_id)
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


@torch.no_grad()
def generate(
    model: CPTModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: str | Sequence[str],
    *,
    template: Template | None = None,
    context_cache: ContextCache | None = None,
    **generation_kwargs: Any,
) -> list[str]:
    """Generates a continuation of ``[context ; render_query(text)]`` for each text.

    The context is not run again: ``base_model.generate`` gets the context's KV cache together
    with ``input_ids = context ids + query ids``; it feeds only the ids not yet in the cache (the
    query), so the context ids are placeholders whose (trained) embeddings are already cached.
    Logits processors that look back at the prompt (e.g. ``repetition_penalty``) see the context
    ids, and ``max_length``/``min_length`` count the context's N tokens: prefer
    ``max_new_tokens``. Texts are generated one at a time (no padding, so nothing to get wrong
    between the context and a left-padded query).

    Unless ``eos_token_id`` is given, generation also stops at the template's end token (when it
    is a single token), as every example of the context ends with it; a final stop token is not
    part of the returned text.

    Each step's scores are watched for what no token can be chosen from (a NaN, plus infinity, or
    every token ruled out) on the device, and read back once per text: such a text is refused,
    not decoded into garbage. When sampling, the scores are shifted to a maximum of 0 first, which
    leaves the distribution as it is and keeps every temperature of `TEMPERATURE_RANGE` finite.

    Args:
        model: a trained `CPTModel`.
        tokenizer: the tokenizer the context was made with.
        texts: one text or a sequence of texts.
        template: how examples are written out; None: the one the model's context was written
            with (``model.task``, which `fit` and saved adapters record), else the default.
        context_cache: the context's KV cache; by default ``model.context_cache()``, which the
            model keeps while its adapter is unchanged.
        **generation_kwargs: passed to ``transformers``' ``generate`` (``max_new_tokens``,
            ``do_sample``, ``temperature``, ``top_p``, ...).

    Returns:
        The new text of each input text (special tokens skipped), one string per text.

    Raises:
        ValueError: if ``model`` is not a `CPTModel`, ``texts`` is empty or holds a non-string
            or a text that is not valid Unicode or holds a token id outside the model's vocabulary
            (naming the text), ``template`` is not a `Template`, a generation
            argument would replace the prompt or the cache, a count (`COUNT_ARGUMENTS`) is not
            an integer, a token id (`TOKEN_ARGUMENTS`) lies outside the model's vocabulary,
            ``generation_config``, ``logits_processor``, ``stopping_criteria`` or ``streamer``
            is not one, ``num_return_sequences`` or
            ``num_beams`` is not 1, ``context_cache`` has the wrong length, a text's prompt, or the prompt and ``max_new_tokens`` (or
            ``max_length``), do not fit the model's maximum number of positions (naming the text),
            or a text renders to no query tokens while the context's last token carries a trained
            embedding; when sampling, if ``temperature`` is outside `TEMPERATURE_RANGE`, ``top_p``
            outside [0, 1] or ``top_k`` not an integer >= 0.
        NonFiniteScoresError: a ValueError naming the first text whose scores were not finite.
    """
    _check_model(model)
    texts = _strings("texts", [texts] if isinstance(texts, str) else texts)
    reserved = {"input_ids", "inputs", "inputs_embeds", "attention_mask", "cache", "past_key_values"}
    clashing = sorted(reserved & generation_kwargs.keys())
    if clashing:
        raise ValueError(f"generate builds {clashing} itself; do not pass them")
    _check_generation_arguments(model, generation_kwargs)
    returns = generation_kwargs.get("num_return_sequences", 1)
    if returns != 1 or isinstance(returns, bool):
        raise ValueError(f"num_return_sequences must be 1 (one output per text), got {returns!r}")
    template = _template(model, template)
    cache = _checked_cache(model, context_cache)
    base_model = model.base_model
    sampling = _check_sampling(base_model, generation_kwargs)
    processors = list(generation_kwargs.pop("logits_processor", None) or [])
    device = model.delta.device
    n = model.num_virtual_tokens

    if "eos_token_id" not in generation_kwargs:
        generation_kwargs["eos_token_id"] = stop_token_ids(model, tokenizer, template)
    stops = set(_as_list(generation_kwargs["eos_token_id"]))
    if generation_kwargs.get("pad_token_id", base_model.generation_config.pad_token_id) is None:
        generation_kwargs["pad_token_id"] = padding_id(tokenizer, _vocab_size(model))  # spares the warning; one sequence is never padded

    outputs: list[str] = []
    for i, text in enumerate(texts):
        query = _query_ids(model, tokenizer, template, text, i)
        _compat.check_positions(model.base_model.config, model.num_virtual_tokens, len(query), f"text {i}")
        _check_generation_fits(model, len(query), generation_kwargs, i)
        cached = n
        if not query:
            # generate needs one uncached token: feed the context's last token again, which is
            # exact only when its embedding is the plain word embedding (separators, labels).
            if not _last_context_row_is_plain(model):
                raise ValueError(
                    f"text {i} renders to no query tokens and the context's last token has a "
                    "trained embedding; use a template with an output prefix or an end token"
                )
            cached = n - 1
        tensors = [(k[:, :, :cached], v[:, :, :cached]) for k, v in cache.tensors]
        input_ids = torch.cat(
            [model.context.ids, torch.tensor(query, dtype=torch.long, device=device)]
        ).unsqueeze(0)  # (1, N + Q)
        attention_mask = torch.cat(
            [model.context.mask, torch.ones(len(query), dtype=torch.long, device=device)]
        ).unsqueeze(0)  # (1, N + Q)
        guard = _FiniteScores(shift=sampling)  # after the user's processors, before the samplers'
        sequences = passes.generate(
            base_model, input_ids, attention_mask, tensors,
            logits_processor=LogitsProcessorList([*processors, guard]), **generation_kwargs,
        )
        if not guard.all_finite():  # the one read of the flag for this text
            raise NonFiniteScoresError(
                i, text, "the model's next-token scores held NaN or infinity (or ruled out every token) "
                "during generation; its weights, or activations overflowing their dtype, are at fault",
            )
        new = sequences[0, input_ids.shape[1] :].tolist()
        if new and new[-1] in stops:
            new = new[:-1]
        outputs.append(tokenizer.decode(new, skip_special_tokens=True))
    return outputs


def stop_token_ids(model: CPTModel, tokenizer: PreTrainedTokenizerBase, template: Template) -> list[int]:
    """The ids `generate` stops at by default: the model's eos ids and the template's end token.

    The end token counts only when `render_example` writes it as exactly one token (the
    tokenizer's eos token when ``template.end_token`` is None).
    """
    stops = _as_list(getattr(model.base_model.generation_config, "eos_token_id", None))
    # render_example ends with the end token: the difference with an end-less template is it.
    with_end = render_example(tokenizer, template, "", _PROBE_LABEL).input_ids
    without = render_example(tokenizer, replace(template, end_token=""), "", _PROBE_LABEL).input_ids
    end = with_end[len(without) :]
    if len(end) == 1 and end[0] not in stops:
        stops.append(end[0])
    return stops


_PROBE_LABEL = "x"  # any label that renders to a token will do


def _score_pairs(
    model: CPTModel,
    cache: ContextCache | None,
    graphed: GraphedLogits | None,
    queries: list[list[int]],
    continuations: list[list[int]],
    batch_size: int,
    pad_id: int,
) -> torch.Tensor:
    """(T, L) scores with one sequence ``query + continuation`` per (text, label) pair,
    ``batch_size`` sequences per pass, longest first. The reference path (``cache`` None: the
    context runs again with every batch) and the one CUDA graphs replay (sequences padded to
    `SEQ_BUCKET` tokens, so that batch shapes repeat)."""
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

    return scores


def _score_by_query(
    model: CPTModel,
    cache: ContextCache,
    queries: list[list[int]],
    continuations: list[list[int]],
    batch_size: int,
    pad_id: int,
) -> torch.Tensor:
    """(T, L) scores with each query run once: a batch of queries goes through the model after
    the cached context, then each one's L continuations run against ``[context ; its query]``.
    The same numbers as `_score_pairs`, for about ``(Q + L * C) / (L * (Q + C))`` of its tokens
    (queries of Q tokens, continuations of C). ``batch_size`` queries per pass, longest first;
    their continuations run ``max(1, batch_size // L)`` texts (about ``batch_size`` rows, each
    with its own copy of the prefix's states) a pass."""
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
    context_mask = model.context.mask.expand(batch_size, -1)  # (b, N)
    if max(len(query) for query in queries) == 0:
        return cache.tensors, context_mask, cache.last_logits.unsqueeze(0).expand(batch_size, -1)
    input_ids, query_mask = (t.to(device) for t in right_pad(queries, pad_id))  # (b, S) each
    mask = torch.cat([context_mask, query_mask], dim=1)  # (b, N + S)
    last = (lengths - 1).clamp(min=0)  # (b,)
    keep = torch.unique(last)
    logits, states = passes.query_pass(model.base_model, cache, input_ids, mask, keep)
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
    logits = passes.continuation_pass(model.base_model, prefix, ids, mask, positions, keep)
    log_probs = logits.float().log_softmax(dim=-1)  # (rows, C - 1, V): position k predicts k + 1
    token_log_probs = log_probs.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # (rows, C - 1)
    real = cont_mask.repeat(batch_size, 1)[:, 1:].bool()  # right padding scores nothing
    return torch.where(real, token_log_probs, 0.0).sum(dim=-1).view(batch_size, num_labels)


def _query_ids(
    model: CPTModel, tokenizer: PreTrainedTokenizerBase, template: Template, text: str, index: int
) -> list[int]:
    """``render_query(text)``'s ids, refused (naming the text) if the model cannot embed one."""
    ids = render_query(tokenizer, template, text).input_ids
    check_vocabulary(ids, _vocab_size(model), _text_name(index, text))
    return ids


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
    check_vocabulary(ids, _vocab_size(model), what)
    return ids


def _vocab_size(model: CPTModel) -> int:
    return int(passes.input_embeddings(model.base_model).weight.shape[0])


def _template(model: CPTModel, template: Template | None) -> Template:
    """``template``, or for None the one the model's context was written with (its ``task``):
    scoring with another template than the context's would quietly give other numbers."""
    return task_template(model.task) if template is None else as_template(template)


def _strings(name: str, values: Sequence[str]) -> list[str]:
    """``values`` as a non-empty list of texts (`cpt._fields.check_text`), each named by index."""
    values = as_list(values, name, "strings")
    if not values:
        raise ValueError(f"{name} is empty: give at least one")
    for k, value in enumerate(values):
        check_text(value, f"{name}[{k}]")
    return values


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


class _FiniteScores(LogitsProcessor):
    """Watches each generation step's scores for a row no token can be chosen from (a NaN, plus
    infinity, or every token at minus infinity): a flag that stays on the device, so the steps
    run without reading it back. Such a row becomes zeros (decoding goes on, to be refused after).

    With ``shift``, every row is shifted to a maximum of 0: sampling's softmax is unchanged, and
    the temperature's division that follows leaves the best token at 0 and the others at worst at
    minus infinity, never NaN.
    """

    def __init__(self, shift: bool) -> None:
        self.shift = shift
        self.finite: torch.Tensor | None = None  # () bool, on the scores' device

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        top = scores.amax(dim=-1, keepdim=True)  # (B, 1): NaN where a score is NaN
        usable = torch.isfinite(top)  # (B, 1)
        self.finite = usable.all() if self.finite is None else self.finite & usable.all()
        return torch.where(usable, scores - top if self.shift else scores, 0.0)  # (B, V)

    def all_finite(self) -> bool:
        """True if every step so far had usable scores (reads the flag back once)."""
        return self.finite is None or bool(self.finite)


def _check_sampling(base_model: torch.nn.Module, kwargs: dict[str, Any]) -> bool:
    """Whether ``generate`` will sample; refuses beam search (the context's cache holds one
    sequence) and, when sampling, a temperature, ``top_p`` or ``top_k`` that sampling cannot
    compute with. Each setting is read from ``kwargs``, else from the generation config."""
    config = kwargs.get("generation_config") or base_model.generation_config

    def setting(name: str) -> Any:
        return kwargs[name] if name in kwargs else getattr(config, name, None)

    beams = setting("num_beams")
    if beams not in (None, 1) or isinstance(beams, bool):
        raise ValueError(f"num_beams must be 1 (the context's cache holds one sequence), got {show(beams)}")
    if not setting("do_sample"):
        return False
    low, high = TEMPERATURE_RANGE
    temperature, top_p, top_k = setting("temperature"), setting("top_p"), setting("top_k")
    if temperature is not None and not (is_number(temperature) and low <= temperature <= high):
        raise ValueError(
            f"temperature must be a number in [{low!r}, {high!r}] (the float32 scores' normal range; "
            f"do_sample=False for greedy decoding), got {show(temperature)}"
        )
    if top_p is not None and not (is_number(top_p) and 0 <= top_p <= 1):
        raise ValueError(f"top_p must be a number in [0, 1], got {show(top_p)}")
    if top_k is not None and not (is_int(top_k) and top_k >= 0):
        raise ValueError(f"top_k must be an integer >= 0 (0: no limit), got {show(top_k)}")
    return True


COUNT_ARGUMENTS = ("max_new_tokens", "min_new_tokens", "max_length", "min_length", "num_return_sequences", "no_repeat_ngram_size")
"""`generate`'s arguments that count tokens or sequences: integers, never floats or bools (which
``transformers`` would take as 1.5 or True tokens)."""
TOKEN_ARGUMENTS = ("eos_token_id", "pad_token_id", "bos_token_id", "forced_bos_token_id", "forced_eos_token_id")
"""`generate`'s arguments that name token ids: each id must be one the model can embed."""


def _check_generation_arguments(model: CPTModel, kwargs: dict[str, Any]) -> None:
    """Refuses a count that is not an integer, a token id outside the model's vocabulary (an
    ``IndexError`` inside sampling, or a stop token that can never come), and a processor,
    stopping criterion, streamer or generation config that is not one."""
    from transformers import GenerationConfig

    for name in COUNT_ARGUMENTS:
        value = kwargs.get(name)
        if value is not None and not is_int(value):
            raise ValueError(f"{name} must be an integer, got {show(value)}")
    for name in TOKEN_ARGUMENTS:
        if kwargs.get(name) is not None:
            check_vocabulary(_as_list(kwargs[name], name), _vocab_size(model), name)
    config = kwargs.get("generation_config")
    if config is not None and not isinstance(config, GenerationConfig):
        raise ValueError(f"generation_config must be a transformers GenerationConfig, got {show(config)}")
    for name in ("logits_processor", "stopping_criteria"):  # lists of callables(input_ids, scores)
        value = kwargs.get(name)
        if value is not None and not (isinstance(value, Sequence) and all(callable(x) for x in value)):
            raise ValueError(f"{name} must be a list of callables (input_ids, scores), got {show(value)}")
    streamer = kwargs.get("streamer")
    if streamer is not None and not all(callable(getattr(streamer, m, None)) for m in ("put", "end")):
        raise ValueError(f"streamer must have put() and end() methods (a transformers streamer), got {show(streamer)}")


def _text_name(index: int, text: str) -> str:
    """``text 3 ('the first words'...)``: a text named by its index and the start of it."""
    shown = repr(text[:_TEXT_PREFIX]) + ("..." if len(text) > _TEXT_PREFIX else "")
    return f"text {index} ({shown})"


_TEXT_PREFIX = 30  # characters of a text that a message shows


def _check_model(model: CPTModel) -> None:
    """Refuses anything but a `CPTModel` (known by its `Context`: this module sits below it)."""
    if not isinstance(model, torch.nn.Module) or not isinstance(getattr(model, "context", None), Context):
        raise ValueError(f"model must be a CPTModel, got {type(model).__name__}")


def _checked_cache(model: CPTModel, cache: ContextCache | None) -> ContextCache:
    if cache is None:
        return model.context_cache()
    passes.check_context_cache(cache, model.num_virtual_tokens, model.context_key())
    return cache


def _check_generation_fits(model: CPTModel, query_tokens: int, kwargs: dict[str, Any], index: int) -> None:
    """Refuses a generation whose new tokens would pass the model's maximum number of positions."""
    limit = _compat.max_positions(model.base_model.config)
    prompt = model.num_virtual_tokens + query_tokens
    new = kwargs.get("max_new_tokens")
    total = prompt + new if isinstance(new, int) else kwargs.get("max_length")
    if limit is not None and isinstance(total, int) and total > limit:
        raise ValueError(
            f"text {index}: the prompt (context and query) takes {prompt} positions and generation may "
            f"reach {total}, more than the model's {limit}; lower max_new_tokens to at most {max(limit - prompt, 0)}"
        )


def _last_context_row_is_plain(model: CPTModel) -> bool:
    """True if the context's last embedding equals the word embedding of its id."""
    embeddings = passes.input_embeddings(model.base_model)
    last = model.context_embeddings()[-1].to(embeddings.weight.dtype)
    return torch.equal(last, embeddings(model.context.ids[-1:])[0])


def _as_list(ids: int | Sequence[int] | torch.Tensor | None, name: str = "eos_token_id") -> list[int]:
    """Token ids given as None, one int, a list or tuple of ints or an integer tensor, as a list
    (`cpt._fields.int_list`: a dict or a set is refused, not read by its keys)."""
    if ids is None:
        return []
    if isinstance(ids, torch.Tensor):
        ids = ids.flatten()
    return int_list(name, [ids] if is_int(ids) else ids)
