"""Tokenizers trained offline with the ``tokenizers`` library, wrapped as ``transformers`` fast tokenizers.

Pretrained tokenizers cannot be downloaded here (no Hub access) and Marian/M2M100 tokenizers need
sentencepiece, so the recipes train their own in seconds. Both results are
``transformers.PreTrainedTokenizerFast`` objects: ``save_pretrained(dir)`` writes ``tokenizer.json`` and
``transformers.AutoTokenizer.from_pretrained(dir)`` reloads them offline.

Translation (:func:`train_translation_tokenizer`): one joint BPE vocabulary for both languages (shared
embeddings), NFKC normalisation (as SentencePiece's default: ``…`` becomes ``...``, ``²`` becomes ``2``),
an initial alphabet of Latin-1 letters and common punctuation (so rare ``«»``/``é`` are not ``<unk>``), SentencePiece-style ``Metaspace`` pre-tokenisation (``▁`` marks a
word start, so ``decode`` restores the exact spacing and keeps umlauts/ß as whole characters). Special
tokens and ids: ``<pad>`` = 0, ``</s>`` = 1 (eos), ``<unk>`` = 2 -- the Marian layout, where the decoder
starts from the pad token. A post-processor appends ``</s>`` to every sequence, sources and
``text_target`` labels alike: without it a seq2seq model never learns to stop generating.

Causal LM (:func:`train_causal_lm_tokenizer`): GPT-2-style byte-level BPE (never produces unknown
tokens), ``<|endoftext|>`` = 0 as bos/eos/unk, and a *separate* ``<pad>`` = 1. Using eos as pad (the
GPT-2 habit) makes ``DataCollatorForLanguageModeling`` mask every real end-of-text token out of the
labels; a distinct pad id avoids that. No special tokens are added automatically (as with GPT-2);
``nm_hf.data.text.tokenize_and_group(add_eos=True)`` inserts eos between documents when wanted.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<pad>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"
TRANSLATION_SPECIAL_TOKENS = [PAD_TOKEN, EOS_TOKEN, UNK_TOKEN]  # ids 0, 1, 2

ENDOFTEXT_TOKEN = "<|endoftext|>"
CAUSAL_LM_SPECIAL_TOKENS = [ENDOFTEXT_TOKEN, PAD_TOKEN]  # ids 0, 1

_MODEL_INPUT_NAMES = ["input_ids", "attention_mask"]


def _latin_alphabet() -> list[str]:
    """Printable ASCII + Latin-1 letters/punctuation + common typographic marks, stable under NFKC.

    Seeding BPE with them keeps characters that are rare in the training text (``«»``, ``é``, ``€``)
    out of ``<unk>``; they cost about 200 vocabulary entries.
    """
    chars = [chr(i) for i in range(0x21, 0x7F)] + [chr(i) for i in range(0xA1, 0x100) if i != 0xAD]
    chars += list("–—‘’‚“”„•€«»‹›▁")
    return sorted({c for c in chars if unicodedata.normalize("NFKC", c) == c})


def _length_hint(texts: Iterable[str]) -> int | None:
    try:
        return len(texts)  # type: ignore[arg-type]
    except TypeError:
        return None


def train_translation_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 8000,
    min_frequency: int = 2,
    model_max_length: int = 512,
    show_progress: bool = False,
) -> PreTrainedTokenizerFast:
    """Train a joint (source + target language) BPE tokenizer that appends ``</s>`` to every sequence.

    ``texts`` is any iterable of sentences of both languages, e.g.
    ``nm_hf.data.translation.iter_translation_texts(dataset_dict, ("en", "de"))``. Training on ~30k
    sentence pairs takes about a second. ``tokenizer(src, text_target=tgt)`` returns ``labels`` ending
    with ``eos_token_id`` (1); ``decode(ids, skip_special_tokens=True)`` gives back the text.
    """
    tokenizer = Tokenizer(models.BPE(unk_token=UNK_TOKEN, fuse_unk=True))
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=TRANSLATION_SPECIAL_TOKENS,
        initial_alphabet=_latin_alphabet(),
        show_progress=show_progress,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=_length_hint(texts))
    eos_id = tokenizer.token_to_id(EOS_TOKEN)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS_TOKEN}",
        pair=f"$A {EOS_TOKEN} $B {EOS_TOKEN}",
        special_tokens=[(EOS_TOKEN, eos_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=model_max_length,
        model_input_names=_MODEL_INPUT_NAMES,
        clean_up_tokenization_spaces=False,
    )


def train_causal_lm_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 8000,
    min_frequency: int = 2,
    model_max_length: int = 1024,
    show_progress: bool = False,
) -> PreTrainedTokenizerFast:
    """Train a GPT-2-style byte-level BPE tokenizer (``<|endoftext|>`` = bos/eos/unk, separate ``<pad>``).

    The 256 byte symbols are always in the vocabulary, so any text (code, emoji) round-trips exactly
    through ``decode``.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=CAUSAL_LM_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=_length_hint(texts))
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=ENDOFTEXT_TOKEN,
        eos_token=ENDOFTEXT_TOKEN,
        unk_token=ENDOFTEXT_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=model_max_length,
        model_input_names=_MODEL_INPUT_NAMES,
        clean_up_tokenization_spaces=False,
    )
