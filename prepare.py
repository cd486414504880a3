"""
Everything between files on disk and model inputs, at prepare time and at run time:
videos -> sampled JPEG frames in an LMDB (system ffmpeg/ffprobe), annotation files -> one jsonl schema per split,
the built-in synthetic dataset, the CLIP BPE and Chinese WordPiece tokenizers, and `VideoTextDataset`.
Writes data/<dataset>/{frames.lmdb, <split>.jsonl}. Safe to rerun: finished videos are skipped.

$ python prepare.py synthetic                                             # data/synthetic, the default's data
$ python prepare.py frames --videos=MSRVTT/videos/all --out=data/msrvtt/frames.lmdb --num_frames=30 --workers=8
$ python prepare.py msrvtt --anno=msrvtt_data --out=data/msrvtt
$ python prepare.py vatex --annotations=vatex_data.json --splits_dir=vatex_txt --out=data/vatex
$ python prepare.py chvtt --annotations=chvtt.json --out=data/chvtt
"""
import csv
import errno
import gzip
import html
import html.entities
import inspect
import io
import json
import multiprocessing as mp
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import unicodedata
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import regex
import tiktoken
import torch
import lmdb
from PIL import Image, ImageEnhance, ImageFilter


# -----------------------------------------------------------------------------------------------------------------
# Tokenizers. English: OpenAI CLIP's byte-level BPE, id for id equal to `clip.tokenize(texts, L, truncate=True)`.
# Chinese: BERT WordPiece, id for id equal to HF transformers' BertTokenizer (hfl/chinese-roberta-wwm-ext vocab).
#
# CLIP's reference tokenizer (clip/simple_tokenizer.py) is: ftfy.fix_text -> html.unescape twice -> strip ->
# collapse whitespace -> lower -> split with a regex -> byte-level BPE per piece with an end-of-word marker `</w>`.
# We keep the regex (the `regex` package, same pattern and flags) and replace two slow parts:
#   - ftfy (not a dependency) by `_ftfy_fix_text`, a re-implementation of the fixes ftfy.fix_text applies by default,
#     except its mojibake repair (see there);
#   - the pure-Python BPE loop by tiktoken's Rust BPE (see `_clip_bpe_ranks` for why the result is the same).

CLIP_BPE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "bpe_simple_vocab_16e6.txt.gz")

# ---- ftfy.fix_text, default configuration (facts from ftfy 6.3.1: ftfy/__init__.py, fixes.py, chardata.py) -----

def _ftfy_tables():
    # The single-character fixes ftfy applies one after the other: C1 controls read as windows-1252 (the 5 bytes
    # cp1252 leaves undefined stay as they are), Latin ligatures, half/full-width forms (plus U+3000 ideographic
    # space), curly quotes, one-character line breaks. We compose them into one str.translate table, so that e.g.
    # \x92 -> ’ -> ' happens in one step as it does across ftfy's steps.
    c1 = {}
    for b in range(0x80, 0xA0):
        try:
            c1[b] = bytes([b]).decode("cp1252")
        except UnicodeDecodeError:
            c1[b] = chr(b)
    ligatures = {"Ĳ": "IJ", "ĳ": "ij", "ŉ": "ʼn", "Ǳ": "DZ", "ǲ": "Dz", "ǳ": "dz", "Ǆ": "DŽ", "ǅ": "Dž", "ǆ": "dž",
                 "Ǉ": "LJ", "ǈ": "Lj", "ǉ": "lj", "Ǌ": "NJ", "ǋ": "Nj", "ǌ": "nj", "ﬀ": "ff", "ﬁ": "fi", "ﬂ": "fl",
                 "ﬃ": "ffi", "ﬄ": "ffl", "ﬅ": "ſt", "ﬆ": "st"}
    ligatures = {ord(k): v for k, v in ligatures.items()}
    width = {0x3000: " "}
    for cp in range(0xFF01, 0xFFF0):
        alt = unicodedata.normalize("NFKC", chr(cp))
        if alt != chr(cp):
            width[cp] = alt
    quotes = {cp: "'" for cp in (0x02BC, 0x2018, 0x2019, 0x201A, 0x201B)}
    quotes.update({cp: '"' for cp in (0x201C, 0x201D, 0x201E, 0x201F)})
    breaks = {ord("\r"): "\n", 0x2028: "\n", 0x2029: "\n", 0x85: "\n"}  # "\r\n" is replaced before the table
    steps = [c1, ligatures, width, quotes, breaks]
    table = {}
    for cp in set().union(*steps):
        s = chr(cp)
        for step in steps:
            s = "".join(step.get(ord(ch), ch) for ch in s)
        table[cp] = s
    # controls ftfy deletes: C0 except \t \n \f \r, DEL, deprecated Arabic format chars, interlinear annotation,
    # object replacement character, BOM. Zero-width (joiner) characters and C1 controls are kept.
    controls = dict.fromkeys([*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070), 0xFEFF,
                              *range(0xFFF9, 0xFFFD)])
    return table, controls


_FTFY_TABLE, _FTFY_CONTROLS = _ftfy_tables()
# ftfy's patterns use the standard library's `re` (its \d is any Unicode digit), so ours do too
_FTFY_ENTITY = re.compile(r"&#?[0-9A-Za-z]{1,24};")
_FTFY_ANSI = re.compile(r"\x1b\[((?:\d|;)*)([a-zA-Z])")
_FTFY_SURROGATE_PAIR = re.compile("[\ud800-\udbff][\udc00-\udfff]")
_FTFY_SURROGATE = re.compile("[\ud800-\udfff]")
# text that fix_text returns unchanged: ASCII without '&', ESC or a control character it deletes or rewrites (\r)
_FTFY_ASCII_NOOP = re.compile(r"[^&\x00-\x08\x0b\x0d-\x1f\x7f]*")
_html_entities = None


def _ftfy_entity(m):
    # ftfy's own HTML unescaping: all HTML5 named entities that end in ';', the upper-cased form of lower-case names
    # (&NTILDE; -> Ñ) when stdlib html would not read it, and numeric ones that html.unescape can decode.
    global _html_entities
    if _html_entities is None:
        ents = {}
        for name, char in html.entities.html5.items():
            if name.endswith(";"):
                ents["&" + name] = char
                if name == name.lower() and html.unescape("&" + name.upper()) == "&" + name.upper():
                    ents["&" + name.upper()] = char.upper()
        _html_entities = ents
    s = m.group(0)
    if s in _html_entities:
        return _html_entities[s]
    if s.startswith("&#"):
        out = html.unescape(s)
        return s if ";" in out else out
    return s


def _ftfy_segment(text: str, unescape: bool) -> str:
    # one pass of ftfy's fixes in its order, repeated until nothing changes (ftfy loops the same way)
    while True:
        before = text
        if unescape and "&" in text:
            text = _FTFY_ENTITY.sub(_ftfy_entity, text)
        # ftfy.fix_encoding would come here: its mojibake repair (text decoded with the wrong codec, e.g. "cafÃ©"
        # -> "café") is a heuristic over ~400 lines of character-class tables, judged not worth carrying for
        # captions; we leave such text as it is, so ids differ from OpenAI's only on text ftfy deems mojibake.
        text = text.replace("\r\n", "\n").translate(_FTFY_TABLE)
        if _FTFY_SURROGATE.search(text):  # strings from bad JSON: pairs joined, lone halves become U+FFFD
            text = _FTFY_SURROGATE_PAIR.sub(
                lambda m: chr(0x10000 + (ord(m[0][0]) - 0xD800) * 1024 + ord(m[0][1]) - 0xDC00), text)
            text = _FTFY_SURROGATE.sub("\ufffd", text)
        if "\x1b" in text:
            text = _FTFY_ANSI.sub("", text)
        text = unicodedata.normalize("NFC", text.translate(_FTFY_CONTROLS))
        if text == before:
            return text


def _ftfy_fix_text(text: str) -> str:
    """ftfy.fix_text(text) with ftfy's default settings, minus mojibake repair."""
    if text.isascii() and _FTFY_ASCII_NOOP.fullmatch(text):
        return text
    # ftfy works line by line (and cuts lines at 1e6 characters, which we ignore) and stops HTML unescaping for good
    # at the first line containing '<' (it may be HTML)
    lt = text.find("<")
    if lt < 0:
        return _ftfy_segment(text, True)
    cut = text.rfind("\n", 0, lt) + 1
    return _ftfy_segment(text[:cut], True) + _ftfy_segment(text[cut:], False)


# ---- CLIP BPE ------------------------------------------------------------------------------------------------------

_CLIP_PAT = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE)
# The same pattern for cleaned ASCII text (lower-case, single spaces, no control characters), where \p{L} is [a-z] and
# \p{N} is [0-9]; the standard library's `re` runs it about 4x faster than `regex` runs the Unicode one.
_CLIP_PAT_ASCII = re.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+""")
_WHITESPACE = regex.compile(r"\s+")


def _clip_pieces(text: str) -> list[str]:
    """OpenAI's whitespace_clean(basic_clean(text)).lower(), split into BPE pieces."""
    text = _ftfy_fix_text(text)
    if "&" in text:
        text = html.unescape(html.unescape(text))
    if text.isascii():  # after ftfy the only ASCII whitespace left is \t \n \v \f \r and space: split() agrees with \s
        return _CLIP_PAT_ASCII.findall(" ".join(text.split()).lower())
    return _CLIP_PAT.findall(_WHITESPACE.sub(" ", text.strip()).strip().lower())


def _clip_byte_order() -> list[int]:
    # CLIP's byte-level alphabet: the 188 printable bytes keep their code point and come first, the other 68 bytes
    # follow in ascending order (mapped to chr(256 + n)). The list position of a byte is its token id.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    return printable + [b for b in range(256) if b not in printable]


def _clip_bpe_ranks(path: str) -> tuple[dict[bytes, int], list[bytes]]:
    """CLIP's vocabulary as tiktoken mergeable ranks (rank == CLIP id) plus the id -> bytes table for decoding.

    CLIP's BPE works on symbols, where the last symbol of a piece carries `</w>`. We write `</w>` as one trailing
    byte b" " (a space never occurs inside a piece, because whitespace separates pieces), so "dog</w>" is b"dog ".
    Ids: 0-255 the bytes, 256-511 byte + `</w>`, 512-49405 the merges in file order, 49406/49407 SOT/EOT.
    tiktoken merges the adjacent pair whose concatenation has the lowest rank; CLIP merges the pair with the lowest
    merge rank. They agree as long as no reachable pair (C, D) concatenates to a token built by a different merge.
    Byte + b" " ranks (256-511) are below every merge, so tiktoken's first step always attaches the end-of-word marker,
    as CLIP starts with it attached. We checked the agreement piece by piece against the reference BPE on ~1.7M
    words: every vocabulary word, random words (letters, tokens glued together, mixed scripts), and each of the 34,803
    tokens that can also be split into two other tokens, inside random contexts: no difference (tests/golden/README.md).
    """
    order = _clip_byte_order()
    char_to_byte = {chr(b) if i < 188 else chr(256 + i - 188): b for i, b in enumerate(order)}
    with gzip.open(path) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]  # OpenAI's slice: line 0 is a header, 48,894 merges are used
    ranks, id_to_bytes = {}, []
    for i, b in enumerate(order):
        ranks[bytes([b])] = i
        id_to_bytes.append(bytes([b]))
    for i, b in enumerate(order):
        ranks[bytes([b, 32])] = 256 + i
        id_to_bytes.append(bytes([b]) + b"</w>")
    for i, line in enumerate(merges):
        token = "".join(line.split())
        eow = token.endswith("</w>")
        body = bytes(char_to_byte[c] for c in (token[:-4] if eow else token))
        ranks[body + (b" " if eow else b"")] = 512 + i
        id_to_bytes.append(body + (b"</w>" if eow else b""))
    id_to_bytes += [b"<|startoftext|>", b"<|endoftext|>"]
    if len(ranks) != 49406:
        raise ValueError(f"{path} is not CLIP's bpe_simple_vocab_16e6.txt.gz: {len(ranks) - 512} distinct merges, "
                         f"expected 48894")
    return ranks, id_to_bytes


_clip_bpe_cache = {}  # merges path -> (tiktoken Encoding, id -> bytes)


class ClipTokenizer:
    """OpenAI CLIP's BPE tokenizer (49,408 ids). Rows of `__call__` equal `clip.tokenize(texts, L, truncate=True)`."""

    vocab_size = 49408
    sot_id = 49406
    eot_id = 49407
    pad_id = 0
    mask_id = None  # OpenAI's vocabulary has no mask token (HMMC overwrote id 49394 with "[MASK]"; we do not)

    def __init__(self, bpe_path: str = CLIP_BPE_PATH):
        self.bpe_path = bpe_path
        if bpe_path not in _clip_bpe_cache:  # parsing the merges takes ~0.5 s: once per process
            if not os.path.exists(bpe_path):
                raise FileNotFoundError(f"CLIP BPE merges file not found at {bpe_path} (it ships in assets/)")
            ranks, id_to_bytes = _clip_bpe_ranks(bpe_path)
            # pieces arrive one at a time, each already ending in its b" " marker, so the split pattern is trivial
            bpe = tiktoken.Encoding("clip_bpe", pat_str=r"[^ ]+ ", mergeable_ranks=ranks, special_tokens={})
            _clip_bpe_cache[bpe_path] = (bpe, id_to_bytes)
        self._bpe, self._id_to_bytes = _clip_bpe_cache[bpe_path]
        # per-piece cache, as in OpenAI's tokenizer; a literal <|startoftext|>/<|endoftext|> in the text is one piece
        # and maps to the special id there too
        self._cache = {"<|startoftext|>": (self.sot_id,), "<|endoftext|>": (self.eot_id,)}

    def __getstate__(self):  # DataLoader workers started by spawn get the path and rebuild (once per process)
        return {"bpe_path": self.bpe_path}

    def __setstate__(self, state):
        self.__init__(state["bpe_path"])

    def encode(self, text: str) -> list[int]:
        """BPE ids of one text, without SOT/EOT."""
        if not isinstance(text, str):
            raise TypeError(f"ClipTokenizer.encode expects str, got {type(text).__name__}: {text!r:.80}")
        ids, cache = [], self._cache
        for piece in _clip_pieces(text):
            out = cache.get(piece)
            if out is None:
                out = cache[piece] = tuple(self._bpe.encode_ordinary(piece + " "))
                if len(cache) > 1_000_000:  # a bound for streams of random text; real captions reuse few words
                    self._cache = cache = {k: cache[k] for k in ("<|startoftext|>", "<|endoftext|>")}
            ids.extend(out)
        return ids

    def decode(self, ids) -> str:
        """Text of a list of ids (as OpenAI: `</w>` becomes a space; SOT/EOT come out as their literal strings)."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"ClipTokenizer.decode: id {i} is outside the vocabulary [0, {self.vocab_size})")
        text = b"".join(self._id_to_bytes[i] for i in ids).decode("utf-8", errors="replace")
        return text.replace("</w>", " ")

    def __call__(self, texts, context_length: int = 77) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, mask), both LongTensor [N, L]; mask is 1 from SOT to EOT."""
        return _pack_rows(texts, context_length, self.encode, self.sot_id, self.eot_id, "tokenize")


def _pack_rows(texts, context_length: int, encode, start_id: int, end_id: int, who: str):
    """(ids, mask) LongTensor [N, L] of rows `start, ids..., end`, zero-padded. A row too long for L is cut and keeps
    `end` in its last slot: OpenAI's clip.tokenize(truncate=True) and HMMC's BERT loaders ([CLS], L-1 tokens, [SEP],
    spec §5.3) are both this one rule."""
    if isinstance(texts, str):
        texts = [texts]
    if context_length < 1:
        raise ValueError(f"context_length must be at least 1, got {context_length}")
    texts = list(texts)
    ids = np.zeros((len(texts), context_length), dtype=np.int64)
    mask = np.zeros((len(texts), context_length), dtype=np.int64)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{who}: item {i} is {type(text).__name__}, not str: {text!r:.80}")
        row = [start_id, *encode(text)][:context_length - 1] + [end_id]
        ids[i, :len(row)] = row
        mask[i, :len(row)] = 1  # from the length, never ids != 0: id 0 is CLIP's '!' and a literal "[PAD]" in BERT
    return torch.from_numpy(ids), torch.from_numpy(mask)


_default_clip_tokenizer = None


def tokenize(texts, context_length: int = 77) -> torch.Tensor:
    """CLIP token ids, LongTensor [N, context_length]: SOT, BPE ids, EOT, zero padding; a text longer than the
    context is cut and its last id is EOT. Identical to OpenAI `clip.tokenize(texts, context_length, truncate=True)`."""
    global _default_clip_tokenizer
    if _default_clip_tokenizer is None:
        _default_clip_tokenizer = ClipTokenizer()
    return _default_clip_tokenizer(texts, context_length)[0]


# ---- BERT WordPiece (Chinese side) ---------------------------------------------------------------------------------

def _bert_is_cjk(cp: int) -> bool:
    # the CJK Unified Ideographs blocks BERT splits into single characters (not Hiragana/Katakana/Hangul)
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF or 0x2A700 <= cp <= 0x2B73F
            or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF or 0xF900 <= cp <= 0xFAFF
            or 0x2F800 <= cp <= 0x2FA1F)


def _bert_is_punct(ch: str) -> bool:
    # all ASCII non-alphanumeric printables count ($, +, ^, ` too), plus every Unicode P* category
    return (ch.isascii() and ch.isprintable() and not ch.isalnum() and ch != " ") or \
        unicodedata.category(ch).startswith("P")


class BertTokenizer:
    """BERT WordPiece, same tokens and ids as HF transformers' BertTokenizer(vocab_file, do_lower_case=...)."""

    specials = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

    def __init__(self, vocab_file: str, do_lower_case: bool = True, max_chars_per_word: int = 100):
        if not vocab_file or not os.path.exists(vocab_file):
            raise FileNotFoundError(f"BERT vocab file not found: {vocab_file!r} (a vocab.txt, one token per line)")
        self.vocab = {}
        with open(vocab_file, encoding="utf-8") as f:
            for i, line in enumerate(f):
                self.vocab[line.rstrip("\n")] = i  # a repeated token keeps its last line, as HF's loader does
        missing = [t for t in self.specials if t not in self.vocab]
        if missing:
            raise ValueError(f"BERT vocab {vocab_file} lacks the special tokens {missing}")
        self.inv_vocab = {i: t for t, i in self.vocab.items()}
        self.do_lower_case = do_lower_case
        self.max_chars_per_word = max_chars_per_word
        self.vocab_size = len(self.vocab)
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (self.vocab[t] for t in self.specials)
        # special tokens written in the text are kept whole, before any lower-casing or punctuation split
        self._special_pat = regex.compile("(" + "|".join(regex.escape(t) for t in self.specials) + ")")
        self._cache = {}

    def _basic(self, text: str) -> list[str]:
        # clean: drop NUL, U+FFFD and control/format characters (category C*, except \t \n \r), whitespace -> space;
        # put spaces around CJK ideographs so each is a word of its own. (transformers 5's Python BertTokenizer also
        # applies NFC here; its default Rust one and 4.x's, which HMMC used, do not. With lower-casing the NFD below
        # makes it moot; we follow the majority.)
        out = []
        for ch in text:
            cp = ord(ch)
            if cp == 0 or cp == 0xFFFD:
                continue
            if ch in "\t\n\r" or unicodedata.category(ch) == "Zs":
                out.append(" ")
            elif unicodedata.category(ch).startswith("C"):
                continue
            elif _bert_is_cjk(cp):
                out.append(" " + ch + " ")
            else:
                out.append(ch)
        words = []
        for word in "".join(out).split():
            if self.do_lower_case:  # lower-casing also strips accents: NFD, then drop the combining marks (Mn)
                word = "".join(c for c in unicodedata.normalize("NFD", word.lower()) if unicodedata.category(c) != "Mn")
            start = 0
            for j, ch in enumerate(word):  # every punctuation character is a word of its own
                if _bert_is_punct(ch):
                    if j > start:
                        words.append(word[start:j])
                    words.append(ch)
                    start = j + 1
            if start < len(word):
                words.append(word[start:])
        return words

    def _wordpiece(self, word: str) -> list[str]:
        # greedy longest-match-first; a word with an unmatchable part, or longer than 100 chars, is one [UNK]
        if len(word) > self.max_chars_per_word:
            return ["[UNK]"]
        pieces, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                sub = word[start:end] if start == 0 else "##" + word[start:end]
                if sub in self.vocab:
                    break
                end -= 1
            if end == start:
                return ["[UNK]"]
            pieces.append(sub)
            start = end
        return pieces

    def tokenize(self, text: str) -> list[str]:
        if not isinstance(text, str):
            raise TypeError(f"BertTokenizer.tokenize expects str, got {type(text).__name__}: {text!r:.80}")
        tokens = []
        for part in self._special_pat.split(text):
            if part in self.specials:
                tokens.append(part)
                continue
            for word in self._basic(part):
                pieces = self._cache.get(word)
                if pieces is None:
                    pieces = self._cache[word] = self._wordpiece(word)
                tokens.extend(pieces)
        return tokens

    def encode(self, text: str) -> list[int]:
        """WordPiece ids of one text, without [CLS]/[SEP]."""
        return [self.vocab[t] for t in self.tokenize(text)]

    def decode(self, ids) -> str:
        """Tokens joined by spaces, '##' continuations glued back (HF's convert_tokens_to_string)."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        for i in ids:
            if i not in self.inv_vocab:
                raise ValueError(f"BertTokenizer.decode: id {i} is not in the vocabulary")
        return " ".join(self.inv_vocab[i] for i in ids).replace(" ##", "").strip()

    def __call__(self, texts, context_length: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, mask) LongTensor [N, L]: [CLS] tokens [SEP], cut so the row fits L, padded with 0 (spec §5.3)."""
        return _pack_rows(texts, context_length, self.encode, self.cls_id, self.sep_id, "BertTokenizer")


def get_tokenizer(text_encoder: str, bert_vocab: str | None = None):
    """The tokenizer for a text tower: "clip" -> ClipTokenizer(), "bert" -> BertTokenizer(bert_vocab)."""
    if text_encoder == "clip":
        return ClipTokenizer()
    if text_encoder == "bert":
        if not bert_vocab or not os.path.exists(bert_vocab):
            raise ValueError(f"text_encoder='bert' needs bert_vocab, the path of a vocab.txt; got {bert_vocab!r}")
        return BertTokenizer(bert_vocab)
    raise ValueError(f"unknown text_encoder {text_encoder!r}; expected 'clip' or 'bert'")


# -----------------------------------------------------------------------------------------------------------------
# Data part: the frame LMDB (writer + reader), image normalisation, frame sampling, the VideoTextDataset,
# ffmpeg frame extraction, annotation converters (MSR-VTT, VATEX, CHVTT) and the `python prepare.py <cmd>` CLI.
#
# On-disk layout (DESIGN.md §3): data/<name>/frames.lmdb with key f"{video_id}_{i}" -> JPEG bytes of frame i and a
# `__meta__` key holding JSON; data/<name>/<split>.jsonl with one video per line:
#   {"video_id": str, "captions": [str, ...], "tags": [str, ...] (opt), "duration": float (opt), ...}
# Languages: `captions`/`tags` hold the dataset's own language (English for MSR-VTT and VATEX, Chinese for
# CHVTT); other languages sit next to them with a suffix: `captions_zh` (VATEX, synthetic), `captions_en`/`tags_en`
# (CHVTT). One LMDB serves every language; the dataset's `caption_field` picks the field (tags follow the suffix).

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

FRAMEDB_VERSION = 1
_META_KEY = b"__meta__"
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v", ".flv", ".mpg", ".mpeg", ".3gp", ".wmv",
                    ".ts", ".mts", ".m2ts", ".ogv", ".ogg", ".gif", ".vob", ".f4v", ".asf", ".divx", ".rm", ".rmvb",
                    ".h264", ".264", ".h265", ".hevc", ".y4m", ".mxf", ".nut", ".ivf", ".mjpeg", ".dv")


def _fmt_seconds(s):
    s = int(max(s, 0))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# -----------------------------------------------------------------------------------------------------------------
# The frame store

# py-lmdb refuses to open one environment twice in a process, yet a train set and an eval set (or two datasets of
# one LMDB) may both read it: readers share one environment per path and process, reference-counted.
_SHARED_ENVS = {}  # realpath -> [env, refcount, pid]


def _open_shared_env(path):
    key = os.path.realpath(path)
    entry = _SHARED_ENVS.get(key)
    if entry is not None and entry[2] != os.getpid():
        # inherited through fork (a DataLoader worker): LMDB forbids using it here and py-lmdb would refuse to open
        # the path again while it is open. Without a lock file nothing is shared, so closing our copy is safe.
        try:
            entry[0].close()
        except lmdb.Error:
            pass
        entry = None
    if entry is None:
        env = lmdb.open(path, readonly=True, lock=False, readahead=False, meminit=False,
                        subdir=os.path.isdir(path), max_readers=2048, max_spare_txns=1)
        entry = _SHARED_ENVS[key] = [env, 0, os.getpid()]
    entry[1] += 1
    return entry[0]


def _release_shared_env(path):
    key = os.path.realpath(path)
    entry = _SHARED_ENVS.get(key)
    if entry is not None and entry[2] == os.getpid():
        entry[1] -= 1
        if entry[1] <= 0:
            entry[0].close()
            del _SHARED_ENVS[key]


class FrameDB:
    """JPEG frames of videos in an LMDB: key f"{video_id}_{i}" -> JPEG bytes, plus a `__meta__` JSON entry.

    Reader: FrameDB(path) (readonly, no lock file, no readahead: safe and cheap in many DataLoader workers).
    Writer: FrameDB(path, readonly=False, num_frames=30, frame_size=224). Writes are buffered and committed in
    batches (every `commit_every` videos and on close()), each batch in one transaction, so a crash or a full disk
    never leaves a half-written video behind: a video is either complete or absent. The memory map starts at
    `map_size` and doubles whenever LMDB reports it full. LMDBs made by the original HMMC's tools/frame2lmdb.py
    (no `__meta__`) are read too; their frame count is found by probing keys.
    """

    def __init__(self, path, readonly=True, map_size=1 << 30, num_frames=None, frame_size=None, commit_every=64):
        self.path = path
        self.readonly = readonly
        self.commit_every = commit_every
        self._pending = {}      # video_id -> list of JPEG bytes, not yet committed
        self._pending_failed = {}  # video_id -> reason, not yet committed
        if readonly:
            if not os.path.exists(path):
                raise FileNotFoundError(f"no frame LMDB at {path}; make it with "
                                        f"`python prepare.py frames --videos=DIR --out={path}`")
            self.env = _open_shared_env(path)
        else:
            os.makedirs(path, exist_ok=True)
            # an existing map may be larger than asked: never shrink it
            existing = os.path.getsize(os.path.join(path, "data.mdb")) if os.path.exists(
                os.path.join(path, "data.mdb")) else 0
            if os.path.realpath(path) in _SHARED_ENVS:
                raise RuntimeError(f"{path} is open for reading in this process; close its readers before writing")
            self.env = lmdb.open(path, map_size=max(map_size, 2 * existing, 1 << 20), subdir=True,
                                 readahead=False, meminit=False, max_dbs=0)
        self.meta = self._read_meta()
        if not readonly:
            if self.meta is None:  # a fresh store
                if num_frames is None or frame_size is None:
                    raise ValueError(f"creating {path} needs num_frames and frame_size")
                self.meta = {"version": FRAMEDB_VERSION, "num_frames": int(num_frames),
                             "frame_size": int(frame_size), "count": 0, "failed": {}}
                self._write_batch({})
            else:
                for k, v in (("num_frames", num_frames), ("frame_size", frame_size)):
                    if v is not None and self.meta.get(k) is not None and self.meta[k] != v:
                        raise ValueError(f"{path} was made with {k}={self.meta[k]} but {k}={v} was asked; "
                                         f"use the same settings or another --out")
        elif self.meta is None:
            raise ValueError(f"{path} holds no frames (empty LMDB)")

    # --- meta ---
    def _read_meta(self):
        with self.env.begin() as txn:
            raw = txn.get(_META_KEY)
            if raw is not None:
                meta = json.loads(bytes(raw).decode("utf-8"))
                meta.setdefault("failed", {})
                return meta
            # no __meta__: an LMDB from the original tools/frame2lmdb.py, or a fresh one
            cur = txn.cursor()
            if not cur.first():
                return None
            key = bytes(cur.key()).decode("utf-8", "replace")
            vid, _, idx = key.rpartition("_")
            if not vid or not idx.isdigit():
                raise ValueError(f"{self.path}: key {key!r} is not of the form <video_id>_<frame index> and "
                                 f"there is no __meta__ entry; is this a frame LMDB?")
            n = 0
            while txn.get(f"{vid}_{n}".encode()) is not None:  # probe how many frames this video has
                n += 1
            if n == 0:
                raise ValueError(f"{self.path}: cannot infer the frame count (no key {vid}_0)")
            entries = txn.stat()["entries"]
            return {"version": 0, "num_frames": n, "frame_size": None, "count": entries // n, "failed": {},
                    "inferred": True}

    @property
    def num_frames(self) -> int:
        return self.meta["num_frames"]

    @property
    def frame_size(self):
        return self.meta.get("frame_size")

    @property
    def failed(self) -> dict:
        return {**self.meta.get("failed", {}), **self._pending_failed}

    def __len__(self):
        return self.meta["count"]

    # --- reading ---
    def has_video(self, video_id: str) -> bool:
        """True when all frames of the video are stored (writes are per video, so the last key suffices)."""
        if video_id in self._pending:
            return True
        with self.env.begin() as txn:
            return txn.get(f"{video_id}_{self.num_frames - 1}".encode()) is not None

    def get_frame(self, video_id: str, i: int) -> bytes:
        with self.env.begin() as txn:
            raw = txn.get(f"{video_id}_{i}".encode())
        if raw is None:
            raise KeyError(f"frame {video_id}_{i} is not in {self.path} "
                           f"({self.num_frames} frames per video stored)")
        return raw

    def get_frames(self, video_id: str, indices) -> list:
        """JPEG bytes of several frames of one video, read in one transaction."""
        out = []
        with self.env.begin() as txn:
            for i in indices:
                raw = txn.get(f"{video_id}_{int(i)}".encode())
                if raw is None:
                    raise KeyError(f"frame {video_id}_{int(i)} is not in {self.path} "
                                   f"({self.num_frames} frames per video stored)")
                out.append(raw)
        return out

    def video_ids(self) -> list:
        """All stored video ids (a full key scan: for tools and tests, not for the training loop)."""
        ids = []
        with self.env.begin() as txn:
            for key in txn.cursor().iternext(keys=True, values=False):
                k = bytes(key).decode("utf-8", "replace")
                if k.endswith("_0") and key != _META_KEY:
                    ids.append(k[:-2])
        return ids

    # --- writing ---
    def put_video(self, video_id: str, frames: list):
        assert not self.readonly, "FrameDB opened readonly"
        if len(frames) != self.num_frames:
            raise ValueError(f"video {video_id}: {len(frames)} frames given, the store holds {self.num_frames}")
        self._pending[video_id] = [bytes(f) for f in frames]
        self._pending_failed.pop(video_id, None)
        if len(self._pending) >= self.commit_every:
            self.commit()

    def mark_failed(self, video_id: str, reason: str):
        assert not self.readonly, "FrameDB opened readonly"
        self._pending_failed[video_id] = str(reason)

    def commit(self):
        """Write everything buffered in one transaction (a batch is all-or-nothing)."""
        if self.readonly or (not self._pending and not self._pending_failed):
            return
        self._write_batch(self._pending)
        self._pending = {}
        self._pending_failed = {}

    def _write_batch(self, videos):
        meta = dict(self.meta)
        failed = dict(meta.get("failed", {}))
        failed.update(self._pending_failed)
        for vid in videos:
            failed.pop(vid, None)
        meta["failed"] = failed
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    for vid, frames in videos.items():
                        for i, jpg in enumerate(frames):
                            txn.put(f"{vid}_{i}".encode(), jpg)
                    entries = txn.stat()["entries"] - (txn.get(_META_KEY) is not None)
                    meta["count"] = entries // meta["num_frames"]
                    txn.put(_META_KEY, json.dumps(meta, ensure_ascii=False).encode("utf-8"))
                break
            except lmdb.MapFullError:
                # the transaction was aborted, nothing is lost: grow the map and write the batch again
                new_size = self.env.info()["map_size"] * 2
                self.env.set_mapsize(new_size)
            except lmdb.Error as e:
                # a failed commit leaves the previous state on disk intact (LMDB is copy-on-write)
                nbytes = sum(len(f) for frames in videos.values() for f in frames)
                free = shutil.disk_usage(self.path).free
                full = "No space" in str(e) or free < max(2 * nbytes, 16 << 20)
                raise OSError(errno.ENOSPC if full else errno.EIO,
                              f"{'disk full' if full else 'write error'} while writing {self.path} ({e}; "
                              f"{free >> 20} MiB free): the {len(videos)} videos of this batch were not written, the "
                              f"{self.meta['count']} committed before are safe. "
                              f"{'Free some space and r' if full else 'R'}erun the same command to resume") from e
        self.meta = meta

    def close(self):
        if self.env is None:
            return
        if self.readonly:
            _release_shared_env(self.path)
            self.env = None
            return
        try:
            self.commit()
        finally:
            self.env.close()
            self.env = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# -----------------------------------------------------------------------------------------------------------------
# Images: normalisation (on the device), frame sampling, JPEG decode + centre crop, pre-training augmentation

def normalize(frames: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> float32 CLIP-normalised, on the frames' device (the loader moves uint8: 4x less)."""
    if frames.dim() < 3 or frames.shape[-3] != 3:
        raise ValueError(f"normalize expects [..., 3, H, W] frames, got shape {tuple(frames.shape)}")
    mean = torch.tensor(CLIP_MEAN, device=frames.device, dtype=torch.float32).view(3, 1, 1) * 255
    std = torch.tensor(CLIP_STD, device=frames.device, dtype=torch.float32).view(3, 1, 1) * 255
    return (frames.to(torch.float32) - mean) / std


def sample_frame_indices(n: int, t: int, mode: str = "uniform", rng=None) -> np.ndarray:
    """Which t of the n stored frames to use (spec §10.6).

    uniform:    linspace(0, n, t) without the endpoint, as ints (the original's eval sampling).
    random:     t distinct frames, sorted.
    stratified: one random frame from each of t equal bins over the whole range [0, n). This replaces the
                original's `uniform_random`, whose bins of width n // t never reach the tail of the clip.
    """
    if mode == "uniform":
        return np.linspace(0, n, t, endpoint=False).astype(np.int64)
    if t > n:
        raise ValueError(f"cannot sample {t} distinct frames from {n} with frame_sample={mode!r}")
    if mode == "random":
        return np.sort(rng.choice(n, size=t, replace=False)).astype(np.int64)
    if mode == "stratified":
        edges = np.floor(np.linspace(0, n, t + 1)).astype(np.int64)  # every bin is non-empty since n >= t
        return rng.integers(edges[:-1], edges[1:]).astype(np.int64)
    raise ValueError(f"frame_sample must be 'uniform', 'random' or 'stratified', got {mode!r}")


def _open_jpeg(buf, min_short: int):
    """Decode a JPEG; when it is at least twice as large as needed, let libjpeg decode it downscaled (draft)."""
    img = Image.open(io.BytesIO(buf))
    w, h = img.size
    short = min(w, h)
    if short >= 2 * min_short and img.format == "JPEG":
        img.draft("RGB", (-(-w * min_short // short), -(-h * min_short // short)))
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


def _center_crop_into(img, size: int, out: np.ndarray):
    """Resize the short side to `size` (bicubic) and centre-crop a square, writing CHW uint8 into `out`."""
    w, h = img.size
    if min(w, h) == size:  # stored at the right size (the usual case): just cut the middle out
        x0, y0 = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
        out[...] = np.asarray(img.crop((x0, y0, x0 + size, y0 + size))).transpose(2, 0, 1)
        return
    # resize only the centre region: same result as resize-then-crop, without resizing pixels thrown away
    scale = min(w, h) / size
    nw, nh = round(w / scale), round(h / scale)
    x0, y0 = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
    box = (x0 * scale, y0 * scale, (x0 + size) * scale, (y0 + size) * scale)
    out[...] = np.asarray(img.resize((size, size), Image.BICUBIC, box=box)).transpose(2, 0, 1)


# SimCLR-style pre-training augmentation of the original (spec §10.7), in Pillow + numpy.
# Parameters are drawn first (so one draw can serve a whole clip) and applied second.

def _draw_augmentation(rng, w: int, h: int) -> dict:
    p = {}
    # RandomResizedCrop(scale=(0.2, 1), ratio=(3/4, 4/3)): 10 tries, then a centre crop of clamped aspect
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(0.2, 1.0)
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw, ch = int(round(np.sqrt(target * aspect))), int(round(np.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            break
    else:
        ratio = w / h
        if ratio < 3 / 4:
            cw, ch = w, int(round(w / (3 / 4)))
        elif ratio > 4 / 3:
            cw, ch = int(round(h * (4 / 3))), h
        else:
            cw, ch = w, h
        x0, y0 = (w - cw) // 2, (h - ch) // 2
    p["crop"] = (x0, y0, x0 + cw, y0 + ch)
    # ColorJitter(0.4, 0.4, 0.4, 0.1) with p=0.8, the four adjustments in random order
    if rng.random() < 0.8:
        p["jitter"] = [(int(k), float(rng.uniform(0.6, 1.4)) if k < 3 else float(rng.uniform(-0.1, 0.1)))
                       for k in rng.permutation(4)]
    p["gray"] = bool(rng.random() < 0.2)
    p["blur"] = float(rng.uniform(0.1, 2.0)) if rng.random() < 0.5 else None
    p["flip"] = bool(rng.random() < 0.5)
    return p


_GRAY = np.array([0.299, 0.587, 0.114])  # Pillow's RGB -> L weights, used by its ImageEnhance
_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def _jitter_matrix(jitter: list, channel_mean: np.ndarray) -> tuple:
    """Brightness, contrast, saturation and hue in the drawn order, composed into one affine colour map x -> A x + b.

    One Pillow pass instead of four (the HSV round trip for hue alone costs more than everything else). Two
    approximations, both immaterial for augmentation: no clipping between the steps, and hue is rotated in YIQ
    space rather than shifted in HSV. Contrast blends with the grey mean of the image as it is at that step, which
    for an affine map is known from the channel means of the input.
    """
    A, b = np.eye(3), np.zeros(3)
    for kind, f in jitter:
        if kind == 0:  # brightness: scale towards black
            M, c = f * np.eye(3), np.zeros(3)
        elif kind == 1:  # contrast: blend with the mean grey level
            M, c = f * np.eye(3), np.full(3, (1 - f) * _GRAY @ (A @ channel_mean + b))
        elif kind == 2:  # saturation: blend with the pixel's own grey
            M, c = f * np.eye(3) + (1 - f) * np.outer(np.ones(3), _GRAY), np.zeros(3)
        else:  # hue: rotate the chroma plane by f turns (negative angle: the direction HSV hue increases)
            t = -2 * np.pi * f
            R = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])
            M, c = np.linalg.inv(_YIQ) @ R @ _YIQ, np.zeros(3)
        A, b = M @ A, M @ b + c
    return tuple(float(v) for row in np.concatenate([A, b[:, None]], axis=1) for v in row)


def _apply_augmentation(img, p: dict, size: int):
    img = img.resize((size, size), Image.BILINEAR, box=p["crop"])
    if "jitter" in p:
        mean = np.asarray(img.reduce(8), dtype=np.float64).reshape(-1, 3).mean(axis=0)  # a cheap mean estimate
        img = img.convert("RGB", _jitter_matrix(p["jitter"], mean))
    if p["gray"]:
        img = img.convert("L").convert("RGB")
    if p["blur"] is not None:
        img = img.filter(ImageFilter.GaussianBlur(radius=p["blur"]))
    if p["flip"]:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(img)


# -----------------------------------------------------------------------------------------------------------------
# The dataset

def _read_jsonl(path):
    """Yield (line number, dict) from a jsonl file; a broken line is an error naming file and line."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or "video_id" not in obj:
                raise ValueError(f"{path}:{lineno}: expected an object with a 'video_id'")
            yield lineno, obj


class VideoTextDataset(torch.utils.data.Dataset):
    """A prepared split: data_dir/<split>.jsonl + data_dir/frames.lmdb -> uint8 frames, token ids, mask, index.

    mode="train":    one item per caption  {"video": uint8 [T,3,S,S], "ids", "mask", "video_index"}
    mode="pretrain": one item per video    same keys plus "tag_ids", "tag_mask" (the caption is the first one)
    mode="videos":   one item per video    {"video", "video_index"} (eval encodes each video once)
    Random choices (frames, augmentation) are a pure function of (seed, epoch, index): set `dataset.epoch` before
    each epoch's iterator and a run is reproducible and resumable with any number of workers.
    """

    def __init__(self, data_dir, split, tokenizer=None, *, mode="train", num_frames=12, context_length=32,
                 frame_sample="uniform", image_size=224, augment="none", seed=0, caption_field="captions",
                 tag_context_length=25, lmdb_path=None, verbose=True):
        if mode not in ("train", "pretrain", "videos"):
            raise ValueError(f"mode must be 'train', 'pretrain' or 'videos', got {mode!r}")
        if frame_sample not in ("uniform", "random", "stratified"):
            raise ValueError(f"frame_sample must be 'uniform', 'random' or 'stratified', got {frame_sample!r}")
        if augment not in ("none", "frame", "clip"):
            raise ValueError(f"augment must be 'none', 'frame' or 'clip', got {augment!r}")
        if mode != "videos" and tokenizer is None:
            raise ValueError(f"mode={mode!r} needs a tokenizer (prepare.get_tokenizer('clip') or ('bert', vocab))")
        self.data_dir, self.split, self.tokenizer, self.mode = data_dir, split, tokenizer, mode
        self.num_frames, self.context_length, self.tag_context_length = num_frames, context_length, tag_context_length
        self.frame_sample, self.image_size, self.augment, self.seed = frame_sample, image_size, augment, seed
        self.caption_field = caption_field
        self.tag_field = "tags" + caption_field[len("captions"):] if caption_field.startswith("captions") else "tags"
        self.epoch = 0
        self.lmdb_path = lmdb_path or os.path.join(data_dir, "frames.lmdb")

        jsonl = os.path.join(data_dir, f"{split}.jsonl")
        if not os.path.exists(jsonl):
            have = sorted(f[:-6] for f in os.listdir(data_dir) if f.endswith(".jsonl")) if os.path.isdir(
                data_dir) else []
            raise FileNotFoundError(f"no split file {jsonl} (splits there: {have or 'none'}); make it with "
                                    f"`python prepare.py <msrvtt|vatex|chvtt|synthetic> --out={data_dir}`")
        db = FrameDB(self.lmdb_path)  # opened here only to check; workers open their own (LMDB + fork don't mix)
        try:
            self.lmdb_frames = db.num_frames
            self.lmdb_frame_size = db.frame_size
            if num_frames > db.num_frames:
                raise ValueError(f"{self.lmdb_path} stores {db.num_frames} frames per video but num_frames="
                                 f"{num_frames} was asked; lower num_frames or re-extract with "
                                 f"`python prepare.py frames --num_frames={num_frames} ...`")
            if db.frame_size is not None and db.frame_size < image_size:
                raise ValueError(f"{self.lmdb_path} stores frames with a short side of {db.frame_size} px but "
                                 f"image_size={image_size} was asked (frames would be upscaled); lower image_size "
                                 f"or re-extract with `python prepare.py frames --frame_size={image_size} ...`")
            self.video_ids, self.captions, self.tags, self._video_captions = [], [], [], []
            missing, no_caption, total = [], 0, 0
            for lineno, obj in _read_jsonl(jsonl):
                total += 1
                vid = str(obj["video_id"])
                caps = [c for c in obj.get(caption_field) or [] if isinstance(c, str) and c.strip()]
                # a video without captions has no place in training or retrieval metrics; only an index of bare
                # videos (mode="videos", no caption field at all, e.g. eval.py --search) keeps it
                if not caps and (mode != "videos" or caption_field in obj):
                    no_caption += 1
                    continue
                if not db.has_video(vid):
                    missing.append(vid)
                    continue
                vi = len(self.video_ids)
                self.video_ids.append(vid)
                self._video_captions.append(caps)
                self.captions.extend((c, vi) for c in caps)
                tags = obj.get(self.tag_field)
                self.tags.append(" ".join(tags) if isinstance(tags, list) else (tags or None))
        finally:
            db.close()
        if verbose and (missing or no_caption):
            msg = f"{jsonl}: using {len(self.video_ids)} of {total} videos"
            if missing:
                msg += f"; {len(missing)} have no frames in {self.lmdb_path} (e.g. {', '.join(missing[:5])})"
            if no_caption:
                msg += f"; {no_caption} have no {caption_field!r}"
            print(msg, flush=True)
        if not self.video_ids:
            raise ValueError(f"{jsonl}: no usable videos ({len(missing)} without frames in {self.lmdb_path}, "
                             f"{no_caption} without {caption_field!r})")
        self._db = None
        self._pid = None

    @property
    def num_videos(self) -> int:
        return len(self.video_ids)

    def __len__(self):
        return len(self.captions) if self.mode == "train" else len(self.video_ids)

    def __getstate__(self):  # an open LMDB environment must not travel to worker processes
        state = dict(self.__dict__)
        state["_db"], state["_pid"] = None, None
        return state

    def caption_tokens(self):
        """All captions of the split in order: (ids [N, L], mask [N, L], video_of_text Long[N])."""
        ids, mask = self.tokenizer([c for c, _ in self.captions], self.context_length)
        return ids, mask, torch.tensor([vi for _, vi in self.captions], dtype=torch.long)

    def _frames(self, video_id: str, rng) -> torch.Tensor:
        if self._db is None or self._pid != os.getpid():  # first use in this (worker) process
            self._db, self._pid = FrameDB(self.lmdb_path), os.getpid()
        idx = sample_frame_indices(self.lmdb_frames, self.num_frames, self.frame_sample, rng)
        bufs = self._db.get_frames(video_id, idx)
        S = self.image_size
        out = np.empty((len(bufs), 3, S, S), dtype=np.uint8)  # filled in place: one copy per frame
        params = None
        for t, buf in enumerate(bufs):
            if self.augment == "none":
                _center_crop_into(_open_jpeg(buf, S), S, out[t])
            else:
                img = _open_jpeg(buf, S)
                if params is None or self.augment == "frame":  # per frame as released, or one draw per clip
                    params = _draw_augmentation(rng, *img.size)
                out[t] = _apply_augmentation(img, params, S).transpose(2, 0, 1)
        return torch.from_numpy(out)  # (T, 3, S, S)

    def __getitem__(self, index: int) -> dict:
        needs_rng = self.frame_sample != "uniform" or self.augment != "none"
        rng = np.random.default_rng([self.seed, self.epoch, index]) if needs_rng else None
        caption, vi = self.captions[index] if self.mode == "train" else (None, index)
        item = {"video": self._frames(self.video_ids[vi], rng), "video_index": vi}
        if self.mode == "videos":
            return item
        caption = caption if caption is not None else self._video_captions[vi][0]  # pretrain: the first caption
        ids, mask = self.tokenizer([caption], self.context_length)
        item["ids"], item["mask"] = ids[0], mask[0]
        if self.mode == "pretrain":
            # a video without tags uses its caption as tag text, as the original's VATEX pre-training loader did
            tags = self.tags[vi] if self.tags[vi] else caption
            tids, tmask = self.tokenizer([tags], self.tag_context_length)
            item["tag_ids"], item["tag_mask"] = tids[0], tmask[0]
        return item


# -----------------------------------------------------------------------------------------------------------------
# Frame extraction: videos -> frames.lmdb with the system ffprobe/ffmpeg, one decode per video

def _check_ffmpeg():
    for tool in ("ffmpeg", "ffprobe"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} not found on PATH; install FFmpeg (e.g. `apt-get install ffmpeg`, "
                               f"`brew install ffmpeg`, `conda install -c conda-forge ffmpeg`)")


def _last_line(text: str) -> str:
    lines = [l.strip() for l in text.decode("utf-8", "replace").splitlines() if l.strip()]
    return lines[-1][:300] if lines else ""


def _float(x):
    try:
        v = float(x)
        return v if np.isfinite(v) else None
    except (TypeError, ValueError):
        return None


def _rate(x):
    """ffprobe's "30000/1001" -> 29.97 (None for 0/0 or junk)."""
    try:
        num, _, den = str(x).partition("/")
        v = float(num) / float(den or 1)
        return v if v > 0 and np.isfinite(v) else None
    except (TypeError, ValueError, ZeroDivisionError):
        return None


def probe_video(path: str) -> dict:
    """Display width/height (rotation and pixel aspect applied), duration in seconds, frame rate, frame count.

    Raises ValueError with a short reason when the file has no decodable video stream.
    """
    cmd = ["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries",
           "stream=width,height,duration,nb_frames,avg_frame_rate,r_frame_rate,sample_aspect_ratio:"
           "stream_tags=rotate:stream_side_data=rotation:format=duration", "-of", "json", path]
    p = subprocess.run(cmd, capture_output=True, timeout=120)
    if p.returncode != 0:
        raise ValueError(f"unreadable ({_last_line(p.stderr) or 'ffprobe failed'})")
    info = json.loads(p.stdout.decode("utf-8", "replace") or "{}")
    streams = info.get("streams") or []
    if not streams:
        raise ValueError("no video stream (audio-only or not a video)")
    s = streams[0]
    w, h = int(s.get("width") or 0), int(s.get("height") or 0)
    if w <= 0 or h <= 0:
        raise ValueError("video stream without a frame size")
    sar = _rate(str(s.get("sample_aspect_ratio", "1/1")).replace(":", "/")) or 1.0
    w = max(1, int(round(w * sar)))  # non-square pixels: store what a player shows
    rotation = _float((s.get("tags") or {}).get("rotate")) or 0.0
    for sd in s.get("side_data_list") or []:
        if "rotation" in sd:
            rotation = _float(sd["rotation"]) or 0.0
    if int(round(rotation / 90)) % 2 == 1:  # ffmpeg auto-rotates while decoding: a 90/270 degree video is portrait
        w, h = h, w
    fps = _rate(s.get("avg_frame_rate")) or _rate(s.get("r_frame_rate"))
    nb = int(s["nb_frames"]) if str(s.get("nb_frames", "")).isdigit() else None
    duration = _float(s.get("duration")) or _float((info.get("format") or {}).get("duration"))
    if (duration is None or duration <= 0) and fps:
        if not nb:  # no duration and no frame count in the header (raw streams): count packets, a demux-only pass
            p = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-count_packets", "-show_entries",
                                "stream=nb_read_packets", "-of", "csv=p=0", path], capture_output=True, timeout=300)
            text = p.stdout.decode("ascii", "replace").strip().strip(",")
            nb = int(text) if text.isdigit() and int(text) > 0 else None
        duration = nb / fps if nb else None
    return {"width": w, "height": h, "duration": duration, "fps": fps, "nb_frames": nb, "rotation": rotation}


def _output_size(w: int, h: int, short: int):
    """(width, height) with the short side equal to `short`, aspect kept."""
    if w <= h:
        return short, max(1, int(round(h * short / w)))
    return max(1, int(round(w * short / h))), short


def _encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _decode_frames(path, num_frames, frame_size, quality):
    """One ffmpeg decode of the whole video -> num_frames JPEGs at the centres of equal time segments.

    ffmpeg's fps filter resamples the stream to a constant rate from the frames' timestamps (so variable frame
    rate is handled), at 2*num_frames/duration: the odd output slots are then exactly the segment centres
    (i + 0.5) * duration / num_frames, and `select` keeps only those before scaling, so only num_frames frames
    are scaled and piped. round=up makes output slot k show the last frame with pts <= k / rate, i.e. the frame on
    screen at that instant (the default rounding picks up to half a slot later). A video shorter than num_frames
    frames repeats frames (fps duplicates them).
    """
    info = probe_video(path)
    W, H = _output_size(info["width"], info["height"], frame_size)
    duration = info["duration"] if info["duration"] and info["duration"] > 0 else None
    if duration is not None:
        rate = 2 * num_frames / duration
        vf = f"fps={rate:.6f}:round=up,select='mod(n\\,2)',scale={W}:{H}:flags=bicubic"
        limit = num_frames + 1
    else:  # duration unknown even after counting: spread the picks over the first frames (bounded memory)
        vf = f"scale={W}:{H}:flags=bicubic"
        limit = 8 * num_frames
    cmd = ["ffmpeg", "-nostdin", "-v", "error", "-threads", "1", "-i", path, "-map", "0:v:0", "-an", "-sn", "-dn",
           "-vf", vf, "-vsync", "0", "-frames:v", str(limit), "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"]
    # generous: single-threaded decoding of a long high-resolution video can run slower than real time
    p = subprocess.run(cmd, capture_output=True, timeout=300 + 5 * (duration or 600))
    frame_bytes = W * H * 3
    m = len(p.stdout) // frame_bytes
    if m == 0:
        raise ValueError(f"no frame could be decoded ({_last_line(p.stderr) or f'ffmpeg exit code {p.returncode}'})")
    frames = np.frombuffer(p.stdout, dtype=np.uint8, count=m * frame_bytes).reshape(m, H, W, 3)
    if duration is not None and m >= num_frames - 1:
        picks = [min(i, m - 1) for i in range(num_frames)]  # the normal case (the last slot may round away)
    else:
        # fewer frames than the header promised (a truncated file, a wrong duration): spread over what decoded
        picks = [min(int((i + 0.5) * m / num_frames), m - 1) for i in range(num_frames)]
    encoded = {}
    for k in picks:
        if k not in encoded:
            encoded[k] = _encode_jpeg(frames[k], quality)
    return [encoded[k] for k in picks]


def _decode_frames_seek(path, num_frames, frame_size, quality):
    """Baseline for bench_extraction only: one ffmpeg seek + decode per frame, as the original tool did."""
    info = probe_video(path)
    W, H = _output_size(info["width"], info["height"], frame_size)
    out = []
    for i in range(num_frames):
        t = (i + 0.5) * info["duration"] / num_frames
        cmd = ["ffmpeg", "-nostdin", "-v", "error", "-threads", "1", "-ss", f"{t:.6f}", "-i", path, "-map", "0:v:0",
               "-frames:v", "1", "-vf", f"scale={W}:{H}:flags=bicubic", "-f", "rawvideo", "-pix_fmt", "rgb24",
               "pipe:1"]
        p = subprocess.run(cmd, capture_output=True, timeout=300)
        if len(p.stdout) < W * H * 3:
            raise ValueError(f"seek to {t:.2f}s failed ({_last_line(p.stderr)})")
        out.append(_encode_jpeg(np.frombuffer(p.stdout[:W * H * 3], np.uint8).reshape(H, W, 3), quality))
    return out


def _extract_job(job):
    """Worker: (video_id, path, num_frames, frame_size, quality, seek) -> (video_id, frames or None, error or None)."""
    video_id, path, num_frames, frame_size, quality, seek = job
    try:
        if path is None:
            return video_id, None, "missing: no video file with this id"
        size = os.path.getsize(path)
        if size == 0:
            return video_id, None, "empty file (0 bytes)"
        fn = _decode_frames_seek if seek else _decode_frames
        return video_id, fn(path, num_frames, frame_size, quality), None
    except subprocess.TimeoutExpired:
        return video_id, None, "timed out while decoding"
    except Exception as e:  # a bad video is recorded and skipped, never the end of the run
        return video_id, None, str(e) or type(e).__name__


def _read_id_list(path) -> list:
    """Video ids, one per line; jsonl lines ({"video_id": ...}, like the original's msrvtt.json) work too."""
    ids = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("{"):
                try:
                    line = str(json.loads(line)["video_id"])
                except (json.JSONDecodeError, KeyError):
                    raise ValueError(f"{path}:{lineno}: expected a video id or a JSON object with 'video_id'")
            ids.append(line)
    return ids


def find_videos(videos_dir: str, ids=None) -> dict:
    """video_id (file name without extension) -> path, for the video files under videos_dir (recursively).

    With `ids`, only those ids (any extension); an id without a file maps to None.
    """
    if not os.path.isdir(videos_dir):
        raise FileNotFoundError(f"videos folder {videos_dir} does not exist")
    wanted = set(ids) if ids is not None else None
    found = {}  # video id -> (not a known video extension, path): known extensions win a tie of names
    for root, dirs, files in os.walk(videos_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not d.endswith(".lmdb"))
        for name in sorted(files):
            stem, ext = os.path.splitext(name)
            known = ext.lower() in VIDEO_EXTENSIONS
            if name.startswith(".") or (stem not in wanted if wanted is not None else not known):
                continue
            cand = (not known, os.path.join(root, name))
            if stem in found:
                keep = min(found[stem], cand)
                print(f"warning: two files for video id {stem!r}: {found[stem][1]} and {cand[1]}; using {keep[1]}",
                      flush=True)
                cand = keep
            found[stem] = cand
    found = {vid: path for vid, (_, path) in found.items()}
    if ids is not None:
        return {vid: found.get(vid) for vid in dict.fromkeys(ids)}
    return found


def extract_frames(videos_dir, out_path, num_frames=30, frame_size=224, workers=8, ids=None, retry_failed=False,
                   quality=90, id_prefix="", progress_every=5.0, _seek=False) -> dict:
    """Decode every video under videos_dir into the frame LMDB at out_path (resumable; never stops on a bad file).

    `ids`: a list of file names without extension, or a file with one per line. Videos already in the LMDB are
    skipped; ones that failed before are retried only with retry_failed. The LMDB key of a video is id_prefix + its file name without
    extension (CHVTT: files <docid>.mp4 with id_prefix="Video" give the original's keys Video<docid>_<i>).
    Returns {"done", "skipped", "failed": {id: reason}, "seconds"}.
    """
    _check_ffmpeg()
    if isinstance(ids, str):
        ids = _read_id_list(ids)
    videos = {id_prefix + stem: path for stem, path in find_videos(videos_dir, ids).items()}
    db = FrameDB(out_path, readonly=False, num_frames=num_frames, frame_size=frame_size)
    old_failed = db.failed
    jobs, skipped = [], 0
    for vid, path in videos.items():
        # a failure is retried on request, or when its file has appeared since
        retry = retry_failed or (path is not None and old_failed.get(vid, "").startswith("missing"))
        if db.has_video(vid) or (vid in old_failed and not retry):
            skipped += 1
            continue
        jobs.append((vid, path, num_frames, frame_size, quality, _seek))
    n_retry = sum(vid in old_failed for vid, *_ in jobs)
    print(f"frames: {len(videos)} videos in {videos_dir}, {skipped} already done or failed before"
          f"{f' ({n_retry} failed ones retried)' if n_retry else ''}, {len(jobs)} to extract -> {out_path} "
          f"({num_frames} frames, short side {frame_size} px, {workers} workers)", flush=True)
    failed, done, t0, last = {}, 0, time.time(), time.time()

    def progress(final=False):
        el = time.time() - t0
        rate = (done + len(failed)) / el if el > 0 else 0.0
        left = len(jobs) - done - len(failed)
        eta = _fmt_seconds(left / rate) if rate > 0 else "?"
        print(f"frames: {done + len(failed)}/{len(jobs)} videos, {rate:.3g} videos/s, "
              f"{'took ' + _fmt_seconds(el) if final else 'eta ' + eta}, {len(failed)} failed", flush=True)

    pool = mp.get_context("fork" if sys.platform == "linux" else "spawn").Pool(workers) if workers > 1 else None
    try:
        results = pool.imap_unordered(_extract_job, jobs, chunksize=1) if pool else map(_extract_job, jobs)
        for vid, frames, err in results:  # this (main) process is the only LMDB writer
            if err is None:
                db.put_video(vid, frames)
                done += 1
            else:
                db.mark_failed(vid, err)
                failed[vid] = err
            if time.time() - last >= progress_every:
                db.commit()  # a kill loses at most a few seconds of work
                progress()
                last = time.time()
    except KeyboardInterrupt:
        print(f"frames: interrupted; {done} videos written, rerun the same command to resume", flush=True)
        raise
    finally:
        if pool is not None:
            pool.terminate()
        db.close()
    progress(final=True)
    if failed:
        print(f"frames: {len(failed)} videos failed (recorded under __meta__ 'failed' in {out_path}; "
              f"rerun with --retry_failed to try them again):", flush=True)
        for vid, err in list(failed.items())[:20]:
            print(f"  {vid}: {err}", flush=True)
        if len(failed) > 20:
            print(f"  ... and {len(failed) - 20} more", flush=True)
    return {"done": done, "skipped": skipped, "failed": failed, "seconds": time.time() - t0}


# -----------------------------------------------------------------------------------------------------------------
# Annotation converters: real annotation files -> data/<name>/<split>.jsonl (the one schema, see the top)

def _clean_captions(caps, counter: dict) -> list:
    """Keep non-empty strings (stripped); count what was dropped."""
    if isinstance(caps, str):
        caps = [caps]
    out = []
    for c in caps or []:
        if isinstance(c, str) and c.strip():
            out.append(c.strip())
        else:
            counter["empty"] = counter.get("empty", 0) + 1
    return out


def _write_jsonl(path: str, records: list):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)  # never leave a half-written split behind


def _finish_conversion(name: str, out: str, splits: dict, frames, counter: dict) -> dict:
    """Drop videos without frames (when an LMDB is known), write the splits, print one summary line each."""
    frames = frames or os.path.join(out, "frames.lmdb")
    db = None
    if os.path.exists(frames):
        db = FrameDB(frames)
    else:
        print(f"{name}: no frame LMDB at {frames}, so videos are not checked for frames now (the dataset "
              f"leaves out missing ones when it loads); pass --frames=PATH to check", flush=True)
    try:
        summary = {}
        for split, records in splits.items():
            missing = [r["video_id"] for r in records if db is not None and not db.has_video(r["video_id"])]
            if missing:
                gone = set(missing)
                records = [r for r in records if r["video_id"] not in gone]
                print(f"{name}: {split}: {len(missing)} videos have no frames in {frames}, left out "
                      f"(e.g. {', '.join(missing[:5])})", flush=True)
            path = os.path.join(out, f"{split}.jsonl")
            _write_jsonl(path, records)
            n_caps = sum(len(r.get("captions", [])) for r in records)
            print(f"{name}: wrote {path}: {len(records)} videos, {n_caps} captions", flush=True)
            summary[split] = {"videos": len(records), "captions": n_caps, "missing_frames": missing}
    finally:
        if db is not None:
            db.close()
    if counter.get("empty"):
        print(f"{name}: dropped {counter['empty']} empty captions", flush=True)
    if counter.get("no_caption"):
        print(f"{name}: dropped {counter['no_caption']} videos without any caption", flush=True)
    return summary


def _load_json(path: str):
    if not os.path.exists(path):
        raise FileNotFoundError(f"annotation file {path} does not exist")
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None


def _read_csv_ids(path: str) -> list:
    """The `video_id` column of a CLIP4Clip-style csv (a header-less single column works too)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"split file {path} does not exist")
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return []
    header = [h.strip() for h in rows[0]]
    if "video_id" in header:
        col = header.index("video_id")
        return [r[col].strip() for r in rows[1:] if len(r) > col and r[col].strip()]
    return [r[0].strip() for r in rows if r and r[0].strip()]


def convert_msrvtt(anno=None, data_json=None, train_9k=None, train_7k=None, test_csv=None, out="data/msrvtt",
                   frames=None) -> dict:
    """MSR-VTT (CLIP4Clip's msrvtt_data files) -> train_9k / train_7k / train (= 9k) / test (1k-A) jsonl.

    Train videos get all their captions from MSRVTT_data.json in file order; the 1k-A test set has one caption
    per video, the `sentence` column of MSRVTT_JSFUSION_test.csv.
    """
    if anno is not None and not os.path.isdir(anno):
        raise FileNotFoundError(f"msrvtt: annotation folder {anno} does not exist")
    explicit_7k = train_7k is not None

    def default(path, name):
        return path or (os.path.join(anno, name) if anno else None)
    data_json, test_csv = default(data_json, "MSRVTT_data.json"), default(test_csv, "MSRVTT_JSFUSION_test.csv")
    train_9k, train_7k = default(train_9k, "MSRVTT_train.9k.csv"), default(train_7k, "MSRVTT_train.7k.csv")
    if data_json is None or train_9k is None or test_csv is None:
        raise ValueError("msrvtt needs --anno=DIR (with MSRVTT_data.json, MSRVTT_train.9k.csv, "
                         "MSRVTT_JSFUSION_test.csv) or the files one by one (--data_json= --train_9k= --test_csv=)")
    data = _load_json(data_json)
    counter, caps, duration = {}, {}, {}
    for s in data.get("sentences", []):
        caps.setdefault(str(s.get("video_id")), []).extend(_clean_captions([s.get("caption")], counter))
    for v in data.get("videos", []):
        st, en = _float(v.get("start time")), _float(v.get("end time"))
        if st is not None and en is not None and en > st:
            duration[str(v.get("video_id"))] = round(en - st, 3)

    def record(vid, captions):
        r = {"video_id": vid, "captions": captions}
        if vid in duration:
            r["duration"] = duration[vid]
        return r

    splits = {}
    for split, path in (("train_9k", train_9k), ("train_7k", train_7k)):
        if path is None or not os.path.exists(path):
            if split == "train_9k" or explicit_7k:
                raise FileNotFoundError(f"msrvtt: split file {path} does not exist")
            continue  # the 7k list is optional when it comes from --anno
        recs, no_caps = [], []
        for vid in _read_csv_ids(path):
            if caps.get(vid):
                recs.append(record(vid, caps[vid]))
            else:
                no_caps.append(vid)
        if no_caps:
            counter["no_caption"] = counter.get("no_caption", 0) + len(no_caps)
            print(f"msrvtt: {split}: {len(no_caps)} videos of {path} have no caption in {data_json} "
                  f"(e.g. {', '.join(no_caps[:5])})", flush=True)
        splits[split] = recs
    splits["train"] = splits["train_9k"]
    if test_csv is None or not os.path.exists(test_csv):
        raise FileNotFoundError(f"msrvtt: test file {test_csv} does not exist")
    test = {}
    with open(test_csv, encoding="utf-8", newline="") as f:
        for lineno, row in enumerate(csv.DictReader(f), 2):
            vid, sentence = (row.get("video_id") or "").strip(), row.get("sentence")
            if not vid:
                raise ValueError(f"{test_csv}:{lineno}: no video_id (expected columns key, vid_key, video_id, "
                                 f"sentence)")
            kept = _clean_captions([sentence], counter)
            if kept:
                test.setdefault(vid, []).extend(kept)
    splits["test"] = [record(vid, c) for vid, c in test.items()]
    return _finish_conversion("msrvtt", out, splits, frames, counter)


def _read_vatex_annotations(paths: list, counter: dict) -> dict:
    """video_id -> {"en": [...], "zh": [...]} from vatex_data.json-style dicts and/or official VATEX json lists."""
    ann = {}
    for path in paths:
        data = _load_json(path)
        if isinstance(data, dict):  # {video_id: {"enCap": [...], "chCap": [...]}}
            items = [(k, v) for k, v in data.items()]
        elif isinstance(data, list):  # official: [{"videoID": ..., "enCap": [...], "chCap": [...]}]
            items = [(d.get("videoID") or d.get("video_id"), d) for d in data if isinstance(d, dict)]
        else:
            raise ValueError(f"{path}: expected a dict of video ids or a list of {{videoID, enCap, chCap}}")
        for vid, d in items:
            if not vid or not isinstance(d, dict):
                continue
            a = ann.setdefault(str(vid), {"en": [], "zh": []})
            a["en"].extend(_clean_captions(d.get("enCap"), counter))
            a["zh"].extend(_clean_captions(d.get("chCap"), counter))
    return ann


def convert_vatex(annotations=None, splits_dir=None, train_list=None, val_list=None, test_list=None,
                  out="data/vatex", frames=None) -> dict:
    """VATEX -> train / val / test jsonl with English `captions` and Chinese `captions_zh`.

    `annotations`: comma-separated json files, either vatex_data.json ({id: {enCap, chCap}}) or the official
    vatex_training_v1.0.json / vatex_validation_v1.0.json. Splits: the 25,991 / 1,500 / 1,500 id lists
    (train_list.txt, val_list.txt, test_list.txt; val and test both come from the official validation set).
    """
    if not annotations:
        raise ValueError("vatex needs --annotations=vatex_data.json (or the official "
                         "vatex_training_v1.0.json,vatex_validation_v1.0.json, comma-separated)")
    paths = [p for p in str(annotations).split(",") if p]
    counter = {}
    ann = _read_vatex_annotations(paths, counter)
    splits = {}
    for split, path in (("train", train_list), ("val", val_list), ("test", test_list)):
        path = path or (os.path.join(splits_dir, f"{split}_list.txt") if splits_dir else None)
        if path is None:
            raise ValueError(f"vatex needs the split lists: --splits_dir=DIR with train_list.txt, val_list.txt, "
                             f"test_list.txt, or --{split}_list=FILE")
        if not os.path.exists(path):
            raise FileNotFoundError(f"vatex: split list {path} does not exist")
        recs, unknown = [], []
        for vid in _read_id_list(path):
            a = ann.get(vid)
            if a is None or not (a["en"] or a["zh"]):
                unknown.append(vid)
                continue
            recs.append({"video_id": vid, "captions": a["en"], "captions_zh": a["zh"]})
        if unknown:
            counter["no_caption"] = counter.get("no_caption", 0) + len(unknown)
            print(f"vatex: {split}: {len(unknown)} ids of {path} have no captions in the annotations "
                  f"(e.g. {', '.join(unknown[:5])})", flush=True)
        splits[split] = recs
    return _finish_conversion("vatex", out, splits, frames, counter)


_TAG_SEPARATORS = re.compile(r"[,，、;；|#/\t\n]+")


def _split_tags(tag) -> list:
    if isinstance(tag, list):
        parts = [str(t) for t in tag]
    else:
        parts = _TAG_SEPARATORS.split(str(tag or ""))
    return [p.strip() for p in parts if p and p.strip()]


def convert_chvtt(annotations=None, out="data/chvtt", frames=None, split="train") -> dict:
    """CHVTT JSON lines (docid, title, tag, title_eng, tag_eng, duration) -> <split>.jsonl.

    video_id = "Video" + docid (the original's LMDB keys); `captions` = [title], `tags` = tag split on common
    separators; the English translations go to `captions_en` / `tags_en`.
    """
    if not annotations:
        raise ValueError("chvtt needs --annotations=FILE.json (JSON lines: docid, title, tag, title_eng, tag_eng, "
                         "duration); several files comma-separated")
    counter, recs, bad, seen = {}, [], [], set()
    for path in str(annotations).split(","):
        if not os.path.exists(path):
            raise FileNotFoundError(f"chvtt: annotation file {path} does not exist")
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    d = json.loads(line)
                    docid = d["docid"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    bad.append(f"{path}:{lineno}: " + ("invalid JSON" if isinstance(e, json.JSONDecodeError)
                                                      else "no 'docid'"))
                    continue
                vid = f"Video{docid}"
                if vid in seen:
                    counter["duplicate"] = counter.get("duplicate", 0) + 1
                    continue
                title = _clean_captions([d.get("title")], counter)
                if not title:
                    counter["no_caption"] = counter.get("no_caption", 0) + 1
                    continue
                seen.add(vid)
                r = {"video_id": vid, "captions": title, "tags": _split_tags(d.get("tag"))}
                title_en = _clean_captions([d.get("title_eng")], {})
                if title_en:
                    r["captions_en"] = title_en
                    r["tags_en"] = _split_tags(d.get("tag_eng"))
                if _float(d.get("duration")) is not None:
                    r["duration"] = _float(d.get("duration"))
                recs.append(r)
    if bad:
        print(f"chvtt: skipped {len(bad)} bad lines:", flush=True)
        for b in bad[:10]:
            print(f"  {b}", flush=True)
        if len(bad) > 10:
            print(f"  ... and {len(bad) - 10} more", flush=True)
    if counter.get("duplicate"):
        print(f"chvtt: skipped {counter['duplicate']} repeated docids", flush=True)
    summary = _finish_conversion("chvtt", out, {split: recs}, frames, counter)
    summary["bad_lines"] = bad
    return summary


# -----------------------------------------------------------------------------------------------------------------
# Command line: python prepare.py <command> --key=value ...

def _cli_frames(videos: str, out: str, num_frames: int = 30, frame_size: int = 224, workers: int = 8,
                ids: str = None, retry_failed: bool = False, quality: int = 90, id_prefix: str = ""):
    """video files -> frames LMDB"""
    if not out.rstrip("/").endswith(".lmdb"):
        print(f"note: datasets read <data dir>/frames.lmdb; --out={out} does not end in .lmdb", flush=True)
    r = extract_frames(videos, out, num_frames=num_frames, frame_size=frame_size, workers=workers, ids=ids,
                       retry_failed=retry_failed, quality=quality, id_prefix=id_prefix)
    if r["done"] == 0 and r["failed"] and r["skipped"] == 0:
        sys.exit(1)  # nothing at all could be decoded: let scripts notice


def _cli_msrvtt(anno: str = None, data_json: str = None, train_9k: str = None, train_7k: str = None,
                test_csv: str = None, out: str = "data/msrvtt", frames: str = None):
    """MSR-VTT annotations -> jsonl"""
    convert_msrvtt(anno, data_json, train_9k, train_7k, test_csv, out, frames)


def _cli_vatex(annotations: str = None, splits_dir: str = None, train_list: str = None, val_list: str = None,
               test_list: str = None, out: str = "data/vatex", frames: str = None):
    """VATEX annotations -> jsonl"""
    convert_vatex(annotations, splits_dir, train_list, val_list, test_list, out, frames)


def _cli_chvtt(annotations: str = None, out: str = "data/chvtt", frames: str = None, split: str = "train"):
    """CHVTT annotations -> jsonl"""
    convert_chvtt(annotations, out, frames, split)


def _cli_options(func) -> dict:
    """CLI option name -> (parameter name, default) from a function's signature (`--out` means `out_dir`)."""
    opts = {}
    for name, p in inspect.signature(func).parameters.items():
        if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        cli = "out" if name == "out_dir" else name
        opts[cli] = (name, p.default)
    return opts


def _parse_value(key, text, default):
    if isinstance(default, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--{key} expects true or false, got {text!r}")
    for typ in (int, float):
        if isinstance(default, typ):
            try:
                return typ(text)
            except ValueError:
                raise ValueError(f"--{key} expects {'an integer' if typ is int else 'a number'}, got {text!r}")
    return text


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    commands = {"frames": _cli_frames, "msrvtt": _cli_msrvtt, "vatex": _cli_vatex, "chvtt": _cli_chvtt,
                "synthetic": prepare_synthetic}

    def usage():
        lines = ["usage: python prepare.py <command> --key=value ...", "commands:"]
        for name, fn in commands.items():
            if fn is prepare_synthetic:
                lines.append(f"  {name:9s} the built-in synthetic dataset: --out=data/synthetic --seed=0 ...")
                continue
            opts = " ".join(f"--{k}" + ("=..." if d is inspect.Parameter.empty else f"={d}")
                            for k, (_, d) in _cli_options(fn).items())
            lines.append(f"  {name:9s} {fn.__doc__.strip()}: {opts}")
        return "\n".join(lines)

    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    cmd, args = argv[0], argv[1:]
    if cmd not in commands:
        sys.exit(f"error: unknown command {cmd!r}\n{usage()}")
    fn = commands[cmd]
    opts = _cli_options(fn)
    kwargs = {}
    try:
        for a in args:
            if a in ("-h", "--help"):
                print(usage())
                return
            if not a.startswith("--"):
                raise ValueError(f"unexpected argument {a!r}: options are --key=value")
            key, eq, text = a[2:].partition("=")
            if key not in opts:
                raise ValueError(f"unknown option --{key} for `prepare.py {cmd}`; valid: "
                                 + ", ".join(f"--{k}" for k in opts))
            name, default = opts[key]
            if not eq:
                if not isinstance(default, bool):
                    raise ValueError(f"--{key} needs a value: --{key}=...")
                kwargs[name] = True
            else:
                kwargs[name] = _parse_value(key, text, default)
        for key, (name, default) in opts.items():
            if default is inspect.Parameter.empty and name not in kwargs:
                raise ValueError(f"`prepare.py {cmd}` needs --{key}=...")
        fn(**kwargs)
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as e:
        sys.exit(f"error: {e}")


# -----------------------------------------------------------------------------------------------------------------
# Benchmarks (python -c "import prepare; prepare.bench_loader(); prepare.bench_extraction()")
# Both report CPU time next to wall time: on a shared machine, videos per CPU-second is the number that is stable.

def _cpu_seconds():
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _make_bench_video(path, seconds=10, size="640x360", seed=0):
    """A real-looking H.264 clip: moving test pattern plus sensor-like noise (so JPEGs are not trivially small)."""
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i",
                    f"testsrc2=size={size}:rate=30:duration={seconds}", "-vf", f"noise=alls=6:allf=t:all_seed={seed}",
                    "-c:v", "libx264", "-pix_fmt", "yuv420p", "-threads", "1", path], check=True)


def bench_extraction(num_videos=4, seconds=10, size="640x360", num_frames=30, frame_size=224, workers=1) -> dict:
    """videos/s of the one-decode extractor against the original tool's seek-per-frame approach, same run."""
    _check_ffmpeg()
    tmp = tempfile.mkdtemp(prefix="hmmc_bench_")
    try:
        vdir = os.path.join(tmp, "videos")
        os.makedirs(vdir)
        for k in range(num_videos):
            _make_bench_video(os.path.join(vdir, f"bench{k}.mp4"), seconds, size, seed=k)
        res = {}
        for name, seek in (("one decode per video", False), ("seek per frame (baseline)", True)):
            c0, t0 = _cpu_seconds(), time.time()
            r = extract_frames(vdir, os.path.join(tmp, f"{int(seek)}.lmdb"), num_frames=num_frames,
                               frame_size=frame_size, workers=workers, _seek=seek, progress_every=1e9)
            wall, cpu = time.time() - t0, _cpu_seconds() - c0
            assert not r["failed"], r["failed"]
            res[name] = {"videos_per_s": num_videos / wall, "videos_per_cpu_s": num_videos / cpu}
        fast, slow = res["one decode per video"], res["seek per frame (baseline)"]
        res["speedup_wall"] = fast["videos_per_s"] / slow["videos_per_s"]
        res["speedup_cpu"] = fast["videos_per_cpu_s"] / slow["videos_per_cpu_s"]
        print(f"bench_extraction: {num_videos} videos of {seconds}s {size} H.264, {num_frames} frames at "
              f"{frame_size}px, {workers} worker(s)")
        for name in ("one decode per video", "seek per frame (baseline)"):
            print(f"  {name:26s} {res[name]['videos_per_s']:.2f} videos/s wall, "
                  f"{res[name]['videos_per_cpu_s']:.2f} videos per CPU-second")
        print(f"  speedup {res['speedup_wall']:.1f}x wall, {res['speedup_cpu']:.1f}x CPU")
        return res
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def bench_loader(num_videos=200, num_frames=12, image_size=224, stored_frames=30, frame_size=224,
                 size="640x360", quality=90, augment="none", seconds=3.0) -> dict:
    """VideoTextDataset throughput in one process (one core): videos/s, frames/s, per wall and per CPU second."""
    _check_ffmpeg()
    torch.set_num_threads(1)
    tmp = tempfile.mkdtemp(prefix="hmmc_bench_")
    try:
        src = os.path.join(tmp, "src.mp4")
        _make_bench_video(src, 10, size)
        frames = _decode_frames(src, stored_frames, frame_size, quality)  # real frames through the real pipeline
        db = FrameDB(os.path.join(tmp, "frames.lmdb"), readonly=False, num_frames=stored_frames,
                     frame_size=frame_size)
        for k in range(num_videos):
            db.put_video(f"v{k}", frames)
        db.close()
        _write_jsonl(os.path.join(tmp, "bench.jsonl"),
                     [{"video_id": f"v{k}", "captions": ["x"]} for k in range(num_videos)])
        ds = VideoTextDataset(tmp, "bench", mode="videos", num_frames=num_frames, image_size=image_size,
                              augment=augment, frame_sample="uniform" if augment == "none" else "random")
        ds[0]
        n, c0, t0 = 0, time.process_time(), time.time()
        while time.time() - t0 < seconds:
            ds[n % num_videos]
            n += 1
        wall, cpu = time.time() - t0, time.process_time() - c0
        res = {"videos_per_s": n / wall, "videos_per_cpu_s": n / cpu, "frames_per_cpu_s": n * num_frames / cpu,
               "jpeg_kb": sum(map(len, frames)) / len(frames) / 1024}
        print(f"bench_loader: {num_frames} frames of {image_size}px from {size} video frames stored at short side "
              f"{frame_size} (JPEG q{quality}, {res['jpeg_kb']:.1f} KiB), augment={augment}: "
              f"{res['videos_per_s']:.0f} videos/s wall, {res['videos_per_cpu_s']:.0f} videos per CPU-second "
              f"({res['frames_per_cpu_s']:.0f} frames)")
        return res
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------
# The synthetic dataset (DESIGN.md §8): the embedded default's data and the learning test of the whole pipeline.
#
# Each video shows coloured shapes on a dark background. Usually one object moves across the clip, either straight
# (left, right, up or down) or turning half-way ("moves left, then up"); in some videos a second object follows: the
# first one moves during the first half and leaves, then the second appears and moves. Captions say colour, shape,
# direction and order, in English ("a red circle moves left, then up"; "a red circle moves left, then a blue square
# moves up") and Chinese ("红色圆形向左移动，然后向上移动"; "红色圆形向左移动，然后蓝色方块向上移动").
#
# Why this needs temporal modelling: positions are drawn so that a video and its time reverse are equally likely;
# any function of the *set* of frames (mean pooling, top-k frame matching) therefore sees the same thing for "moves
# left" and "moves right", for "left, then up" and "down, then right", and for "A then B" and "B then A". The test
# split is built from complete confusion groups (every caption next to its time-reversed twins), so a frame-level
# model is held near 1/group-size on them while a model that reads frame order can solve them all.
# ---------------------------------------------------------------------------------------------------------------


_SYN_COLOURS = {  # name: (RGB, Chinese)
    "red": ((230, 40, 40), "红色"),
    "green": ((40, 200, 60), "绿色"),
    "blue": ((50, 90, 240), "蓝色"),
    "yellow": ((235, 220, 40), "黄色"),
    "white": ((235, 235, 235), "白色"),
}
_SYN_SHAPES = {"circle": "圆形", "square": "方块", "triangle": "三角形"}
_SYN_DIRECTIONS = {  # name: (unit step in image coordinates (x right, y down), Chinese)
    "left": ((-1, 0), "向左"),
    "right": ((1, 0), "向右"),
    "up": ((0, -1), "向上"),
    "down": ((0, 1), "向下"),
}
_SYN_OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}
_SYN_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# motions of one object: straight, or a turn half-way (never straight on or straight back)
_SYN_MOTIONS = [(d,) for d in _SYN_DIRECTIONS] + [(a, b) for a in _SYN_DIRECTIONS for b in _SYN_DIRECTIONS
                                                   if a != b and b != _SYN_OPPOSITE[a]]


def _syn_objects():
    return [(c, s) for c in _SYN_COLOURS for s in _SYN_SHAPES]


def _syn_reverse(motion: tuple) -> tuple:
    # the time-reversed motion: the same path walked backwards
    return tuple(_SYN_OPPOSITE[d] for d in reversed(motion))


def _syn_caption_en(events) -> str:
    # events: [(colour, shape, motion)], motion a tuple of one or two directions
    parts = [f"a {c} {s} moves " + ", then ".join(m) for c, s, m in events]
    return ", then ".join(parts)


def _syn_caption_zh(events) -> str:
    parts = [f"{_SYN_COLOURS[c][1]}{_SYN_SHAPES[s]}" + "，然后".join(f"{_SYN_DIRECTIONS[d][1]}移动" for d in m)
             for c, s, m in events]
    return "，然后".join(parts)


def _syn_coverage(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Boolean inside-the-shape test at offsets (dx, dy) from the centre (y grows downwards)."""
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.85 * r
    # upward triangle: apex (0, -r), base corners (+-r, 0.8 r)
    return (dy <= 0.8 * r) & (2 * np.abs(dx) <= (dy + r))


def _syn_render(events, rng: np.random.Generator, num_frames: int, size: int) -> np.ndarray:
    """Frames (uint8 [T, size, size, 3]) of a video whose objects share the clip in equal consecutive parts; an
    object that turns spends half of its part on each leg."""
    ss = 2  # 2x2 supersampling: anti-aliased edges make motion smooth rather than jumping whole pixels
    grid = ((np.arange(size * ss) + 0.5) / ss).astype(np.float32)  # sample positions in pixels
    gy, gx = np.meshgrid(grid, grid, indexing="ij")  # (size*ss, size*ss)
    background = rng.integers(0, 30, size=3).astype(np.float32)
    frames = np.empty((num_frames, size, size, 3), dtype=np.float32)
    frames[:] = background
    per_object = num_frames // len(events)
    for k, (colour, shape, motion) in enumerate(events):
        r = rng.uniform(0.17, 0.21) * size
        first = k * per_object
        last = num_frames if k == len(events) - 1 else first + per_object
        n = last - first
        # legs of the path, then a placement of the whole path drawn uniformly among those that fit the frame: the
        # time reverse of every video is then an equally likely video (see the header)
        lengths = rng.uniform(0.4, 0.55, size=len(motion)) * size / len(motion) ** 0.5
        steps = [np.array(_SYN_DIRECTIONS[d][0], dtype=np.float64) * L for d, L in zip(motion, lengths)]
        corners = np.cumsum([np.zeros(2)] + steps, axis=0)  # (legs+1, 2) relative to the start
        lo, hi = corners.min(axis=0), corners.max(axis=0)
        start = rng.uniform(r - lo, size - r - hi)  # (2,)
        pos = np.empty((n, 2))
        legs = len(motion)
        for j in range(n):
            leg = min(j * legs // n, legs - 1)
            in_leg = [i for i in range(n) if min(i * legs // n, legs - 1) == leg]
            u = (in_leg.index(j) + 0.5) / len(in_leg)  # progress along the leg at the centre of the frame's slot
            pos[j] = start + corners[leg] + u * steps[leg]
        cx = pos[:, 0].astype(np.float32)
        cy = pos[:, 1].astype(np.float32)
        rgb = np.array(_SYN_COLOURS[colour][0], dtype=np.float32)
        inside = _syn_coverage(shape, gx - cx[:, None, None], gy - cy[:, None, None], r)  # (n, size*ss, size*ss)
        alpha = inside.reshape(-1, size, ss, size, ss).sum(axis=(2, 4), dtype=np.float32)[..., None] / (ss * ss)
        frames[first:last] = frames[first:last] * (1 - alpha) + rgb * alpha  # (n, size, size, 3)
    return np.clip(np.rint(frames), 0, 255).astype(np.uint8)


def _syn_random_events(rng: np.random.Generator, p_two: float):
    objects = _syn_objects()
    straight = [m for m in _SYN_MOTIONS if len(m) == 1]
    if rng.random() < p_two:  # two objects one after the other, each moving straight
        i, j = rng.choice(len(objects), size=2, replace=False)
        return [(*objects[i], straight[rng.integers(4)]), (*objects[j], straight[rng.integers(4)])]
    c, s = objects[rng.integers(len(objects))]
    return [(c, s, _SYN_MOTIONS[rng.integers(len(_SYN_MOTIONS))])]


def _syn_confusion_groups(rng: np.random.Generator, num_single: int, num_double: int):
    """Caption event lists made of whole confusion groups, every caption once: one object's motion next to its time
    reverse (groups of 2); for two objects the 8 variants (2 orders x 2 x 2 directions). `num_single` groups are
    drawn from the 15 objects x 6 reverse pairs, `num_double` groups from pairs of objects and axes."""
    objects = _syn_objects()
    pairs, seen = [], set()
    for m in _SYN_MOTIONS:
        key = min(m, _syn_reverse(m))
        if key not in seen:
            seen.add(key)
            pairs.append((key, _syn_reverse(key)))
    singles = [(o, p) for o in objects for p in pairs]
    order = rng.permutation(len(singles))[:num_single]
    out = []
    for i in order:
        (c, s), (m, m_rev) = singles[i]
        out += [[(c, s, m)], [(c, s, m_rev)]]
    seen = set()
    while len(seen) < num_double:
        i, j = rng.choice(len(objects), size=2, replace=False)
        a, b = objects[min(i, j)], objects[max(i, j)]
        axes = (("left", "up")[rng.integers(2)], ("left", "up")[rng.integers(2)])
        if (a, b, axes) in seen:
            continue
        seen.add((a, b, axes))
        for da in (axes[0], _SYN_OPPOSITE[axes[0]]):
            for db in (axes[1], _SYN_OPPOSITE[axes[1]]):
                out.append([(*a, (da,)), (*b, (db,))])
                out.append([(*b, (db,)), (*a, (da,))])
    return out


def _syn_vocab() -> list[str]:
    chars = set("，然后移动")
    for _, zh in _SYN_COLOURS.values():
        chars.update(zh)
    for zh in _SYN_SHAPES.values():
        chars.update(zh)
    for _, zh in _SYN_DIRECTIONS.values():
        chars.update(zh)
    return _SYN_SPECIALS + sorted(chars)


def _syn_write_mp4(path: str, frames: list[np.ndarray], fps: int = 8):
    h, w, _ = frames[0].shape
    cmd = ["ffmpeg", "-y", "-loglevel", "error", "-threads", "1", "-f", "rawvideo", "-pix_fmt", "rgb24",
           "-s", f"{w}x{h}", "-r", str(fps), "-i", "-", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", "18", path]
    proc = subprocess.run(cmd, input=b"".join(f.tobytes() for f in frames), capture_output=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ffmpeg failed writing {path}: {proc.stderr.decode(errors='replace').strip()}")


def prepare_synthetic(out_dir: str = "data/synthetic", seed: int = 0, videos: str | None = None,
                      num_frames: int = 8, frame_size: int = 32, num_train: int = 6000, p_two: float = 0.15,
                      test_single: int = 90, test_double: int = 3, val_single: int = 40, val_double: int = 1,
                      verbose: bool = True) -> str:
    """Write the synthetic dataset to `out_dir` (frames.lmdb, train/val/test.jsonl with `captions` (English) and
    `captions_zh`, vocab.txt for the Chinese side); with `videos` also one .mp4 per video there. Deterministic in
    `seed`. The test split has 2*test_single + 8*test_double videos (default 204), all captions unique;
    val 2*val_single + 8*val_double (88)."""
    if num_frames % 2:
        raise ValueError(f"num_frames must be even (two-event videos split the clip in halves), got {num_frames}")
    rng = np.random.default_rng(seed)
    splits = {
        "test": _syn_confusion_groups(rng, test_single, test_double),
        "val": _syn_confusion_groups(rng, val_single, val_double),
        "train": [_syn_random_events(rng, p_two) for _ in range(num_train)],
    }
    tmp_dir = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    os.makedirs(tmp_dir)
    if videos:
        os.makedirs(videos, exist_ok=True)
    db = FrameDB(os.path.join(tmp_dir, "frames.lmdb"), readonly=False, num_frames=num_frames, frame_size=frame_size)
    # one ffmpeg process per .mp4: threads suffice to keep every core busy, the encoding runs outside the GIL
    mp4_pool, mp4_jobs = (ThreadPoolExecutor(os.cpu_count() or 1), []) if videos else (None, [])
    for split, event_lists in splits.items():
        with open(os.path.join(tmp_dir, f"{split}.jsonl"), "w") as f:
            for i, events in enumerate(event_lists):
                vid = f"{split}{i:05d}"
                frames = _syn_render(events, rng, num_frames, frame_size)
                encoded = []
                for frame in frames:
                    buf = io.BytesIO()
                    Image.fromarray(frame).save(buf, format="JPEG", quality=95)
                    encoded.append(buf.getvalue())
                db.put_video(vid, encoded)
                if videos:
                    mp4_jobs.append(mp4_pool.submit(_syn_write_mp4, os.path.join(videos, f"{vid}.mp4"), frames))
                record = {"video_id": vid, "captions": [_syn_caption_en(events)],
                          "captions_zh": [_syn_caption_zh(events)],
                          # tags (for pre-training recipes): the words of the objects, in caption order
                          "tags": [w for c, s, m in events for w in (c, s, *m)],
                          "tags_zh": [w for c, s, m in events for w in
                                      (_SYN_COLOURS[c][1], _SYN_SHAPES[s], *(_SYN_DIRECTIONS[d][1] for d in m))],
                          "duration": num_frames / 8.0}
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
    db.close()
    t0 = time.time()
    for n, job in enumerate(mp4_jobs, 1):
        job.result()  # re-raises an ffmpeg failure
        if verbose and (n % 1000 == 0 or n == len(mp4_jobs)):
            print(f"synthetic: {n}/{len(mp4_jobs)} .mp4 files in {videos} ({n / (time.time() - t0 + 1e-9):.0f}/s)",
                  flush=True)
    if mp4_pool:
        mp4_pool.shutdown()
    with open(os.path.join(tmp_dir, "vocab.txt"), "w") as f:
        f.write("\n".join(_syn_vocab()) + "\n")
    # swap in the finished folder at the end, so an interrupted run never leaves a dataset that looks complete
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp_dir, out_dir)
    if verbose:
        counts = ", ".join(f"{s} {len(e)}" for s, e in splits.items())
        print(f"wrote synthetic dataset to {out_dir}: {counts} videos, {num_frames} frames of {frame_size} px",
              flush=True)
    return out_dir


if __name__ == "__main__":
    main()
