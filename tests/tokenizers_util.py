"""Tiny tokenizers built offline, for tests: nothing is downloaded.

Two tokenizers that behave differently on the same text:

- `make_wordlevel_tokenizer`: whole words split on whitespace and punctuation. Spaces vanish (a
  lone ``" "`` is zero tokens), unknown words become ``[UNK]``, decoding joins tokens with spaces.
- `make_bpe_tokenizer`: byte-level BPE like GPT-2. Lossless (``decode(encode(s)) == s``), spaces
  are part of tokens, any text encodes, and rare words split into many tokens.

Both return a ``transformers.PreTrainedTokenizerFast`` with eos and pad tokens set.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

CORPUS = (
    "input: the movie was great output: very positive",
    "input: an awful film output: negative",
    "input: a fine story output: positive",
    "input: boring and too long output: very negative",
    "Q: what is it ? A: a cat .",
    "the plot was thin but the actors were good",
)
"""Sentences the tokenizers are trained on; they cover the words the tests use."""

WORDLEVEL_SPECIAL_TOKENS = ("[UNK]", "[PAD]", "[EOS]")
BPE_SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>")
BPE_VOCAB_SIZE = 320  # 256 bytes + 2 specials + ~60 merges: common words whole, rare ones split


def make_wordlevel_tokenizer(with_eos: bool = True) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `CORPUS`, with ``[UNK]``, ``[PAD]`` and ``[EOS]``.

    Args:
        with_eos: if False, the tokenizer has no eos token (to test that case).
    """
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(
        special_tokens=list(WORDLEVEL_SPECIAL_TOKENS), show_progress=False
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    special = {"unk_token": "[UNK]", "pad_token": "[PAD]"}
    if with_eos:
        special["eos_token"] = "[EOS]"
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, name_or_path="test-wordlevel", **special
    )


def make_bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A GPT-2 style byte-level BPE tokenizer over `CORPUS`, with eos and pad tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        special_tokens=list(BPE_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte: any text encodes
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        name_or_path="test-bpe",
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
    )
