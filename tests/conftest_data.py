"""Offline tokenizers for the data-layer tests (imported by tests/test_data_*.py; not a pytest conftest).

``word_tokenizer``: one token per whitespace-separated word, so expected ids and masks can be
counted by hand. ``byte_tokenizer``: byte-level BPE without merges, one token per byte (so "\\n" is a
token, as in real byte-level models). Both know the ChatML markers as special tokens.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from align_runner.data.templates import CHATML

EOS, IM_START, IM_END, UNK = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "[UNK]"
SPECIALS = [EOS, IM_START, IM_END]
ROLE_WORDS = ["system", "user", "assistant", "tool"]
WORDS = ("hi there hello friend how are you fine thanks what is two plus four answer the a b c d e f "
         "question yes no maybe good bad I like cats dogs cars Q: A: 4 5 ok sure").split()


def _wrap(tokenizer: Tokenizer, chat_template: str | None) -> PreTrainedTokenizerFast:
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS,
        pad_token=EOS,
        unk_token=UNK if UNK in tokenizer.get_vocab() else None,
        additional_special_tokens=[IM_START, IM_END],
    )
    wrapped.chat_template = chat_template
    return wrapped


def word_tokenizer(chat_template: str | None = CHATML) -> PreTrainedTokenizerFast:
    """Vocabulary: 0 <|endoftext|>, 1 <|im_start|>, 2 <|im_end|>, 3 [UNK], 4.. roles, then WORDS."""
    vocab = {token: i for i, token in enumerate([*SPECIALS, UNK, *ROLE_WORDS, *WORDS])}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return _wrap(tokenizer, chat_template)


def byte_tokenizer(chat_template: str | None = CHATML) -> PreTrainedTokenizerFast:
    """Byte-level BPE with no merges: every byte of text is one token; specials are single tokens."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate([*SPECIALS, *alphabet])}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return _wrap(tokenizer, chat_template)


def ids(tokenizer: PreTrainedTokenizerFast, *tokens: str) -> list[int]:
    """Token ids of ``tokens`` looked up one by one (for writing expected values by hand)."""
    return [tokenizer.convert_tokens_to_ids(t) for t in tokens]
