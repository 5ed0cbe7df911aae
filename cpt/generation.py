"""Generation with a trained CPT context, and what every inference call checks of its texts.

The context is constant at inference: `generate` runs it through the frozen model once (the
model's ``context_cache``) and lets ``transformers``' ``generate`` continue after it, feeding only
the query. The checks here (texts, templates, token ids, non-finite scores) are shared with
`cpt.infer.classify`.

This module sits below `cpt.model`: it knows a model only through `ContextModel`, the inference
API `CPTModel` offers, so `CPTModel.generate` can call it without an import running upwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn
from transformers import LogitsProcessor, LogitsProcessorList

from cpt import _compat, passes
from cpt._fields import (
    as_list,
    check_text,
    check_vocabulary,
    int_list,
    is_int,
    is_number,
    show,
)
from cpt.context import Context
from cpt.data import (
    Template,
    as_template,
    padding_id,
    render_example,
    render_query,
    task_template,
)
from cpt.passes import ContextCache

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class ContextModel(Protocol):
    """What inference reads of a model: `CPTModel`'s inference API."""

    base_model: nn.Module
    context: Context
    task: dict | None

    @property
    def num_virtual_tokens(self) -> int: ...

    @property
    def vocab_size(self) -> int: ...

    def context_cache(self) -> ContextCache: ...

    def context_key(self) -> tuple: ...

    def context_embeddings(self) -> torch.Tensor: ...


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


@torch.no_grad()
def generate(
    model: ContextModel,
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
    check_model(model)
    texts = check_strings("texts", [texts] if isinstance(texts, str) else texts)
    reserved = {"input_ids", "inputs", "inputs_embeds", "attention_mask", "cache", "past_key_values"}
    clashing = sorted(reserved & generation_kwargs.keys())
    if clashing:
        raise ValueError(f"generate builds {clashing} itself; do not pass them")
    _check_generation_arguments(model, generation_kwargs)
    returns = generation_kwargs.get("num_return_sequences", 1)
    if returns != 1 or isinstance(returns, bool):
        raise ValueError(f"num_return_sequences must be 1 (one output per text), got {returns!r}")
    template = template_for(model, template)
    cache = checked_cache(model, context_cache)
    base_model = model.base_model
    sampling = _check_sampling(base_model, generation_kwargs)
    processors = list(generation_kwargs.pop("logits_processor", None) or [])
    device = model.delta.device
    n = model.num_virtual_tokens

    if "eos_token_id" not in generation_kwargs:
        generation_kwargs["eos_token_id"] = stop_token_ids(model, tokenizer, template)
    stops = set(_as_list(generation_kwargs["eos_token_id"]))
    if generation_kwargs.get("pad_token_id", base_model.generation_config.pad_token_id) is None:
        generation_kwargs["pad_token_id"] = padding_id(tokenizer, model.vocab_size)  # spares the warning; one sequence is never padded

    outputs: list[str] = []
    for i, text in enumerate(texts):
        query = query_ids(model, tokenizer, template, text, i)
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


def stop_token_ids(model: ContextModel, tokenizer: PreTrainedTokenizerBase, template: Template) -> list[int]:
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


def query_ids(
    model: ContextModel, tokenizer: PreTrainedTokenizerBase, template: Template, text: str, index: int
) -> list[int]:
    """``render_query(text)``'s ids, refused (naming the text) if the model cannot embed one."""
    ids = render_query(tokenizer, template, text).input_ids
    check_vocabulary(ids, model.vocab_size, _text_name(index, text))
    return ids


def template_for(model: ContextModel, template: Template | None) -> Template:
    """``template``, or for None the one the model's context was written with (its ``task``):
    scoring with another template than the context's would quietly give other numbers."""
    return task_template(model.task) if template is None else as_template(template)


def check_strings(name: str, values: Sequence[str]) -> list[str]:
    """``values`` as a non-empty list of texts (`cpt._fields.check_text`), each named by index."""
    values = as_list(values, name, "strings")
    if not values:
        raise ValueError(f"{name} is empty: give at least one")
    for k, value in enumerate(values):
        check_text(value, f"{name}[{k}]")
    return values


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


def _check_generation_arguments(model: ContextModel, kwargs: dict[str, Any]) -> None:
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
            check_vocabulary(_as_list(kwargs[name], name), model.vocab_size, name)
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


def check_model(model: ContextModel) -> None:
    """Refuses anything but a `CPTModel` (known by its `Context`: this module sits below it)."""
    if not isinstance(model, torch.nn.Module) or not isinstance(getattr(model, "context", None), Context):
        raise ValueError(f"model must be a CPTModel, got {type(model).__name__}")


def checked_cache(model: ContextModel, cache: ContextCache | None) -> ContextCache:
    if cache is None:
        return model.context_cache()
    passes.check_context_cache(cache, model.num_virtual_tokens, model.context_key())
    return cache


def _check_generation_fits(model: ContextModel, query_tokens: int, kwargs: dict[str, Any], index: int) -> None:
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


def _last_context_row_is_plain(model: ContextModel) -> bool:
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


_PROBE_LABEL = "x"  # any label that renders to a token will do
