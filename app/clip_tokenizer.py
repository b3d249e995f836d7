"""open_clip's CLIP tokenizer without torch: the same token ids from the same vocabulary, as numpy arrays.

open_clip's ``SimpleTokenizer`` lives in a package whose import pulls in torch and torchvision (about 8 s of a
service start on a slow CPU). The service's ONNX start (see ``app.onnx_encoder``) needs only token ids, so this
module reproduces that tokenizer's steps with the libraries it uses itself plus Hugging Face ``tokenizers``:

1. clean: ftfy, HTML entities unescaped twice, whitespace collapsed, lower case (``clean='lower'``);
2. split into words with the same ``regex`` pattern (special tokens, contractions, letter runs, single digits,
   other symbol runs);
3. each word as UTF-8 bytes mapped to printable characters (GPT-2's byte table, which CLIP uses), then
   byte-pair merges in the vocabulary file's order, the last symbol of a word carrying ``</w>`` (done by a
   ``tokenizers`` BPE model built from open_clip's own merges file);
4. ``<start_of_text>`` + ids + ``<end_of_text>``, cut to the context length with the end token kept, zero-padded.

``tests/test_clip_tokenizer.py`` compares it with open_clip's tokenizer on captions, class names and awkward
strings, and the ONNX start compares them again on a probe set before it records a model as eligible.
"""

from __future__ import annotations

import gzip
import html
from collections.abc import Sequence
from pathlib import Path

import ftfy
import numpy as np
import regex
from tokenizers import Tokenizer, models, pre_tokenizers

SPECIAL_TOKENS = ("<start_of_text>", "<end_of_text>")
#: open_clip keeps the first 48,894 merges of its 16e6 vocabulary file (49,152 ids in all).
MERGES_KEPT = 49152 - 256 - 2


def byte_characters() -> list[str]:
    """The printable character standing for each byte value 0..255 (GPT-2's table, in CLIP's id order).

    Bytes that are printable Latin-1 characters stand for themselves; the others (controls, space, a few
    punctuation marks) take the code points from 256 on, in byte order. The order of this list's *values*
    as open_clip builds it (printable bytes first) is the order of the first 256 token ids.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    ordered = printable + [b for b in range(256) if b not in printable]
    return [table[b] for b in ordered]


class ClipTokenizer:
    """Text -> (n, context_length) int64 token ids, equal to open_clip's ``SimpleTokenizer(clean='lower')``."""

    def __init__(self, vocab_file: Path, context_length: int = 77) -> None:
        with gzip.open(vocab_file) as f:
            lines = f.read().decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1 : MERGES_KEPT + 1]]
        symbols = byte_characters()
        vocab = [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges), *SPECIAL_TOKENS]
        ids = {token: i for i, token in enumerate(vocab)}
        bpe = models.BPE(vocab=ids, merges=[(a, b) for a, b in merges], end_of_word_suffix="</w>")
        self._bpe = Tokenizer(bpe)
        # Words arrive already split (step 2); this only maps each word's bytes to the table's characters.
        self._bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        self._special = {token: ids[token] for token in SPECIAL_TOKENS}
        self.sot_token_id, self.eot_token_id = (ids[t] for t in SPECIAL_TOKENS)
        self.vocab_size = len(ids)
        self.context_length = context_length
        specials = "|".join(SPECIAL_TOKENS)
        self._words = regex.compile(
            specials + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE
        )

    @staticmethod
    def clean(text: str) -> str:
        text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
        return " ".join(text.split()).lower()

    def encode(self, text: str) -> list[int]:
        """The ids of ``text``, without start and end tokens."""
        out: list[int] = []
        run: list[str] = []  # consecutive ordinary words, merged in one call

        def flush() -> None:
            if run:
                out.extend(self._bpe.encode(run, is_pretokenized=True, add_special_tokens=False).ids)
                run.clear()

        for word in self._words.findall(self.clean(text)):
            special = self._special.get(word)
            if special is None:
                run.append(word)
            else:
                flush()
                out.append(special)
        flush()
        return out

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> np.ndarray:
        if isinstance(texts, str):
            texts = [texts]
        length = context_length or self.context_length
        result = np.zeros((len(texts), length), dtype=np.int64)
        for row, text in enumerate(texts):
            tokens = [self.sot_token_id, *self.encode(text), self.eot_token_id]
            if len(tokens) > length:
                tokens = tokens[:length]
                tokens[-1] = self.eot_token_id
            result[row, : len(tokens)] = tokens
        return result
