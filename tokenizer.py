"""
Captions -> rows of token ids (and masks) for HMMC's text towers; `get_tokenizer` picks one by text tower. English:
CLIP's BPE (`ClipTokenizer`, `tokenize`), id for id OpenAI's `clip.tokenize(texts, L, truncate=True)`: ftfy.fix_text
(re-implemented), html.unescape twice, whitespace collapsed, lower case, CLIP's regex, BPE per piece (in tiktoken).
Chinese: BERT WordPiece (`BertTokenizer`), id for id HF transformers' BertTokenizer.

    >>> tokenize("a dog runs", context_length=8)       # SOT, BPE ids, EOT, zero padding
    tensor([[49406,   320,  1929,  5586, 49407,     0,     0,     0]])
"""
import functools
import gzip
import html
import html.entities
import itertools
import os
import re
import unicodedata

import numpy as np
import regex
import tiktoken
import torch


CLIP_BPE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "bpe_simple_vocab_16e6.txt.gz")

# ---- ftfy.fix_text, default configuration (facts from ftfy 6.3.1: ftfy/__init__.py, fixes.py, chardata.py) -----

def _ftfy_tables():
    # ftfy's single-character fixes in its order (C1 controls read as cp1252, ligatures, half/full-width forms, curly
    # quotes, line breaks) composed into one str.translate table: \x92 -> ’ -> ' in one step, as across ftfy's
    c1 = {b: bytes([b]).decode("cp1252", errors="ignore") or chr(b) for b in range(0x80, 0xA0)}  # 5 are undefined
    ligatures = {"Ĳ": "IJ", "ĳ": "ij", "ŉ": "ʼn", "Ǳ": "DZ", "ǲ": "Dz", "ǳ": "dz", "Ǆ": "DŽ", "ǅ": "Dž", "ǆ": "dž",
                 "Ǉ": "LJ", "ǈ": "Lj", "ǉ": "lj", "Ǌ": "NJ", "ǋ": "Nj", "ǌ": "nj", "ﬀ": "ff", "ﬁ": "fi", "ﬂ": "fl",
                 "ﬃ": "ffi", "ﬄ": "ffl", "ﬅ": "ſt", "ﬆ": "st"}
    ligatures = {ord(k): v for k, v in ligatures.items()}
    width = {cp: alt for cp in range(0xFF01, 0xFFF0) if (alt := unicodedata.normalize("NFKC", chr(cp))) != chr(cp)}
    width[0x3000] = " "
    quotes = {cp: "'" for cp in (0x02BC, 0x2018, 0x2019, 0x201A, 0x201B)}
    quotes.update({cp: '"' for cp in (0x201C, 0x201D, 0x201E, 0x201F)})
    breaks = {ord("\r"): "\n", 0x2028: "\n", 0x2029: "\n", 0x85: "\n"}  # "\r\n" is replaced before the table
    steps = [c1, ligatures, width, quotes, breaks]
    table = {cp: functools.reduce(str.translate, steps, chr(cp)) for cp in set().union(*steps)}
    # controls ftfy deletes: C0 but \t \n \f \r, DEL, deprecated Arabic format characters, interlinear annotation,
    # object replacement, BOM
    controls = dict.fromkeys([*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070), 0xFEFF,
                              *range(0xFFF9, 0xFFFD)])
    # ftfy's own HTML unescaping: the HTML5 named entities that end in ';', and the upper-cased form of lower-case
    # names (&NTILDE; -> Ñ) that stdlib html would not read
    entities = {}
    for name, char in html.entities.html5.items():
        if name.endswith(";"):
            entities["&" + name] = char
            if name == name.lower() and html.unescape("&" + name.upper()) == "&" + name.upper():
                entities["&" + name.upper()] = char.upper()
    return table, controls, entities


_FTFY_TABLE, _FTFY_CONTROLS, _FTFY_ENTITIES = _ftfy_tables()
# ftfy's patterns use the standard library's `re` (its \d is any Unicode digit), so ours do too
_FTFY_ENTITY = re.compile(r"&#?[0-9A-Za-z]{1,24};")
_FTFY_ANSI = re.compile(r"\x1b\[((?:\d|;)*)([a-zA-Z])")


def _ftfy_entity(m):
    s = m.group(0)
    if s.startswith("&#") and ";" not in (out := html.unescape(s)):  # a numeric entity that stdlib html reads
        return out
    return _FTFY_ENTITIES.get(s, s)


def _ftfy_segment(text: str, unescape: bool) -> str:
    # one pass of ftfy's fixes in its order, repeated until nothing changes (ftfy loops the same way)
    while True:
        before = text
        if unescape and "&" in text:
            text = _FTFY_ENTITY.sub(_ftfy_entity, text)
        # ftfy's mojibake repair ("cafÃ©" -> "café", ~400 lines of heuristics) would come here: such text stays as is
        text = text.replace("\r\n", "\n").translate(_FTFY_TABLE)
        # surrogates (strings from bad JSON): pairs joined into their character, lone halves become U+FFFD
        text = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
        if "\x1b" in text:
            text = _FTFY_ANSI.sub("", text)
        text = unicodedata.normalize("NFC", text.translate(_FTFY_CONTROLS))
        if text == before:
            return text


def _ftfy_fix_text(text: str) -> str:
    """ftfy.fix_text(text) with ftfy's default settings, minus mojibake repair."""
    # ftfy works line by line (and cuts lines at 1e6 characters, which we ignore) and stops HTML unescaping for good
    # at the first line containing '<' (it may be HTML)
    lt = text.find("<")
    cut = text.rfind("\n", 0, lt) + 1 if lt >= 0 else len(text)
    return _ftfy_segment(text[:cut], True) + _ftfy_segment(text[cut:], False)


# ---- CLIP BPE ------------------------------------------------------------------------------------------------------

_CLIP_PAT = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE)
_WHITESPACE = regex.compile(r"\s+")


def _clip_pieces(text: str) -> list[str]:
    """OpenAI's whitespace_clean(basic_clean(text)).lower(), split into BPE pieces."""
    text = _ftfy_fix_text(text)
    text = html.unescape(html.unescape(text))
    return _CLIP_PAT.findall(_WHITESPACE.sub(" ", text.strip()).strip().lower())


@functools.cache
def _clip_bpe() -> tiktoken.Encoding:
    """CLIP's vocabulary (parsed once, ~0.5 s) as a tiktoken Encoding whose ranks are CLIP's ids; `</w>` is a trailing
    b" " ("dog</w>" is b"dog "). tiktoken merges the pair whose concatenation has the lowest rank, CLIP the pair with
    the lowest merge rank: the same ids on ~1.7M words checked (tests/golden/README.md)."""
    # CLIP's byte alphabet: the 188 printable bytes keep their code point and come first, the other 68 follow as
    # chr(256 + n); a byte's position is its id
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    order = printable + [b for b in range(256) if b not in printable]
    char_to_byte = {chr(b) if i < 188 else chr(256 + i - 188): b for i, b in enumerate(order)}
    with gzip.open(CLIP_BPE_PATH) as f:
        merges = f.read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]  # OpenAI's slice: header, 48,894 merges
    ranks = {bytes([b]): i for i, b in enumerate(order)} | {bytes([b, 32]): 256 + i for i, b in enumerate(order)}
    for i, line in enumerate(merges):
        token = "".join(line.split())
        eow = token.endswith("</w>")
        body = bytes(char_to_byte[c] for c in (token[:-4] if eow else token))
        ranks[body + (b" " if eow else b"")] = 512 + i
    if len(ranks) != 49406:
        raise ValueError(f"{CLIP_BPE_PATH} is not CLIP's bpe_simple_vocab_16e6.txt.gz: {len(ranks) - 512} distinct "
                         f"merges, expected 48894")
    # pieces arrive one at a time, each ending in its b" " marker, so the split pattern is trivial
    return tiktoken.Encoding("clip_bpe", pat_str=r"[^ ]+ ", mergeable_ranks=ranks, special_tokens={})


class ClipTokenizer:
    """OpenAI CLIP's BPE tokenizer (49,408 ids). Rows of `__call__` equal `clip.tokenize(texts, L, truncate=True)`."""

    vocab_size = 49408
    sot_id = 49406
    eot_id = 49407
    pad_id = 0
    mask_id = None  # OpenAI's vocabulary has no mask token (HMMC overwrote id 49394 with "[MASK]"; we do not)

    specials = {"<|startoftext|>": sot_id, "<|endoftext|>": eot_id}  # written in a text, each is one piece

    def __init__(self):
        self._bpe = _clip_bpe()

    def encode(self, text: str) -> list[int]:
        """BPE ids of one text, without SOT/EOT."""
        ids = []
        for piece in _clip_pieces(text):
            ids.extend([self.specials[piece]] if piece in self.specials else self._bpe.encode_ordinary(piece + " "))
        return ids

    def __call__(self, texts, context_length: int = 77) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, mask), both LongTensor [N, L]; mask is 1 from SOT to EOT."""
        return _pack_rows(texts, context_length, self.encode, self.sot_id, self.eot_id, "tokenize")


def _pack_rows(texts, context_length: int, encode, start_id: int, end_id: int, who: str):
    """(ids, mask) LongTensor [N, L] of rows `start, ids..., end`, zero-padded; a row too long is cut and ends in
    `end`, as OpenAI's clip.tokenize(truncate=True) and the original HMMC's BERT loaders."""
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


def tokenize(texts, context_length: int = 77) -> torch.Tensor:
    """CLIP token ids [N, context_length], those of OpenAI's `clip.tokenize(texts, context_length, truncate=True)`."""
    return ClipTokenizer()(texts, context_length)[0]


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
    """BERT WordPiece, lower-cased: the tokens and ids of HF transformers' BertTokenizer(vocab_file)."""

    specials = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

    def __init__(self, vocab_file: str):
        with open(vocab_file, encoding="utf-8") as f:  # a repeated token keeps its last line, as HF's loader does
            self.vocab = {line.rstrip("\n"): i for i, line in enumerate(f)}
        missing = [t for t in self.specials if t not in self.vocab]
        if missing:
            raise ValueError(f"BERT vocab {vocab_file} lacks the special tokens {missing}")
        self.vocab_size = len(self.vocab)
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (self.vocab[t] for t in self.specials)
        # special tokens written in the text are kept whole, before any lower-casing or punctuation split
        self._special_pat = regex.compile("(" + "|".join(regex.escape(t) for t in self.specials) + ")")

    def _basic(self, text: str) -> list[str]:
        # drop NUL, U+FFFD and control/format characters (C*, except \t \n \r), whitespace -> space, spaces around
        # CJK ideographs so each is a word (no NFC, as HF's Rust tokenizer and transformers 4.x, which HMMC used)
        out = []
        for ch in text:
            category = unicodedata.category(ch)
            if ch in "\t\n\r" or category == "Zs":
                out.append(" ")
            elif not category.startswith("C") and ch != "\ufffd":  # NUL is a C character too
                out.append(f" {ch} " if _bert_is_cjk(ord(ch)) else ch)
        words = []
        for word in "".join(out).split():
            # lower-casing also strips accents: NFD, then drop the combining marks (Mn)
            word = "".join(c for c in unicodedata.normalize("NFD", word.lower()) if unicodedata.category(c) != "Mn")
            for punct, chars in itertools.groupby(word, _bert_is_punct):  # a punctuation character is a word of its own
                words.extend(chars if punct else ["".join(chars)])
        return words

    def _wordpiece(self, word: str) -> list[str]:
        # greedy longest-match-first; a word with an unmatchable part, or longer than 100 chars, is one [UNK]
        if len(word) > 100:
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
        tokens = []
        for part in self._special_pat.split(text):
            if part in self.specials:
                tokens.append(part)
                continue
            for word in self._basic(part):
                tokens.extend(self._wordpiece(word))
        return tokens

    def encode(self, text: str) -> list[int]:
        """WordPiece ids of one text, without [CLS]/[SEP]."""
        return [self.vocab[t] for t in self.tokenize(text)]

    def __call__(self, texts, context_length: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, mask) LongTensor [N, L]: [CLS] tokens [SEP], cut so the row fits L, padded with 0."""
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


class UnkWrapped:
    """A BertTokenizer with rows `[UNK] ... [UNK]`: the original's Chinese VATEX model was trained and evaluated on
    captions wrapped in CLIP's start/end strings, which BERT's vocabulary maps to [UNK]."""

    def __init__(self, bert: BertTokenizer):
        self.bert = bert

    def __call__(self, texts, context_length: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
        return _pack_rows(texts, context_length, self.bert.encode, self.bert.unk_id, self.bert.unk_id, "UnkWrapped")

    def __getattr__(self, name):
        return getattr(self.bert, name)
