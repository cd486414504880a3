# tokenizer.py: CLIP BPE against OpenAI's clip.tokenize, BERT WordPiece against HF's BertTokenizer.
# Golden ids were recorded once from the reference implementations (tests/golden/README.md, "Tokenizers").
import json
import os
import pickle

import pytest
import torch

import prepare
import tokenizer

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")
SOT, EOT = 49406, 49407


def _load(name):
    with open(os.path.join(GOLDEN, name), encoding="utf-8") as f:
        return json.load(f)["items"]


@pytest.fixture(scope="module")
def clip_tok():
    return tokenizer.ClipTokenizer()


@pytest.fixture(scope="module")
def bert_tok():
    return tokenizer.BertTokenizer(os.path.join(GOLDEN, "tok_bert_vocab.txt"))


@pytest.mark.parametrize("L", [77, 32])
def test_clip_golden(L):
    items = _load("tok_clip.json")
    assert len(items) > 400
    ids = tokenizer.tokenize([it["text"] for it in items], context_length=L)
    assert ids.dtype == torch.long and ids.shape == (len(items), L)
    for row, it in zip(ids.tolist(), items):
        want = it[str(L)] + [0] * (L - len(it[str(L)]))
        assert row == want, f"caption {it['text']!r}"


def test_truncation_ends_in_eot():
    text = "a man is " + "very " * 200 + "happy"
    for L in (77, 32, 8, 2):
        row = tokenizer.tokenize(text, context_length=L)[0].tolist()
        assert len(row) == L and row[0] == SOT and row[-1] == EOT and 0 not in row
    assert tokenizer.tokenize(text, context_length=1).tolist() == [[EOT]]  # OpenAI: cut to [SOT], then EOT overwrites
    # a caption that fits exactly is not touched
    n = len(tokenizer.ClipTokenizer().encode("a dog runs"))
    assert tokenizer.tokenize("a dog runs", context_length=n + 2)[0, -1].item() == EOT


def test_empty_and_shapes():
    assert tokenizer.tokenize("").tolist() == [[SOT, EOT] + [0] * 75]
    assert tokenizer.tokenize(["", "  \n\t "], context_length=4).tolist() == [[SOT, EOT, 0, 0]] * 2
    assert tokenizer.tokenize([], context_length=16).shape == (0, 16)
    assert tokenizer.tokenize(("a", "b")).shape == (2, 77)
    with pytest.raises(ValueError):
        tokenizer.tokenize("a", context_length=0)


def test_type_error_names_the_item():
    with pytest.raises(TypeError, match="item 1 is int"):
        tokenizer.tokenize(["fine", 3])
    with pytest.raises(TypeError, match="item 0 is NoneType"):
        tokenizer.tokenize([None])
    with pytest.raises(TypeError):
        tokenizer.ClipTokenizer().encode(b"bytes")


def test_literal_special_tokens(clip_tok):
    # OpenAI keeps a literal <|startoftext|>/<|endoftext|> in the text as the special id
    assert clip_tok.encode("<|startoftext|>x<|endoftext|>") == [SOT, clip_tok.encode("x")[0], EOT]


def test_surrogate_pair_is_joined(clip_tok):
    # ftfy joins a surrogate pair (e.g. from badly decoded JSON) into the character it encodes
    assert clip_tok.encode("\ud83d\ude00 ok") == clip_tok.encode("😀 ok")


def test_mojibake_left_alone():
    # the one documented deviation: ftfy would repair "cafÃ©" to "café"; we keep the text as it is
    assert tokenizer._ftfy_fix_text("cafÃ©") == "cafÃ©"


def test_encode_decode_round_trip(clip_tok):
    # the ids' bytes (tiktoken's decode: each word's `</w>` is its trailing space) give the pieces back
    for text in ["a man is playing the guitar", "café naïve 一个男人 привет", "a dog, a cat. 3 birds!"]:
        ids = clip_tok.encode(text)
        assert all(0 <= i < SOT for i in ids)
        assert " ".join(clip_tok._bpe.decode(ids).split()) == " ".join(tokenizer._clip_pieces(text))
    assert clip_tok._bpe.decode(clip_tok.encode("a man is playing the guitar")) == "a man is playing the guitar "


def test_clip_call_contract(clip_tok):
    texts = ["!$ wow", "a much longer caption about a dog " * 10, ""]
    ids, mask = clip_tok(texts, 32)
    assert ids.dtype == mask.dtype == torch.long and ids.shape == mask.shape == (3, 32)
    assert torch.equal(ids, tokenizer.tokenize(texts, 32))
    assert ids[0, 1].item() == 0  # "!" inside a piece is id 0: the mask cannot be ids != 0
    for row, m in zip(ids.tolist(), mask.tolist()):
        n = row.index(EOT, 1) + 1
        assert m == [1] * n + [0] * (32 - n)
    assert (clip_tok.vocab_size, clip_tok.sot_id, clip_tok.eot_id, clip_tok.pad_id, clip_tok.mask_id) == \
        (49408, SOT, EOT, 0, None)
    # DataLoader workers may receive the tokenizer pickled
    assert pickle.loads(pickle.dumps(clip_tok)).encode(texts[0]) == clip_tok.encode(texts[0])


def test_bert_golden(bert_tok):
    items = _load("tok_bert.json")
    assert len(items) > 300
    for it in items:
        assert bert_tok.encode(it["text"]) == it["ids"], f"caption {it['text']!r}"


def test_bert_call_contract(bert_tok):
    specials = (bert_tok.pad_id, bert_tok.unk_id, bert_tok.cls_id, bert_tok.sep_id, bert_tok.mask_id)
    assert specials == (0, 100, 101, 102, 103) and bert_tok.vocab_size == 1114
    texts = ["一个男人在弹吉他", "一个男人在弹吉他" * 20, ""]
    ids, mask = bert_tok(texts, 12)
    assert ids.dtype == mask.dtype == torch.long and ids.shape == mask.shape == (3, 12)
    body = bert_tok.encode(texts[0])
    assert ids[0].tolist() == [101] + body + [102] + [0] * (12 - len(body) - 2)
    assert ids[1].tolist() == [101] + bert_tok.encode(texts[1])[:10] + [102]  # cut to L-2 tokens between specials
    assert ids[2].tolist()[:3] == [101, 102, 0]
    assert mask.sum(1).tolist() == [len(body) + 2, 12, 2]
    assert bert_tok.tokenize(texts[0]) == list("一个男人在弹吉他")
    assert bert_tok.tokenize("a" * 101) == ["[UNK]"]  # longer than 100 characters


def test_bert_bad_input(tmp_path, bert_tok):
    with pytest.raises(TypeError, match="item 1"):
        bert_tok(["ok", 5], 8)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\na\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"\[MASK\]"):
        tokenizer.BertTokenizer(str(vocab))
    with pytest.raises(FileNotFoundError):
        tokenizer.BertTokenizer(str(tmp_path / "missing.txt"))


def test_get_tokenizer():
    assert isinstance(tokenizer.get_tokenizer("clip"), tokenizer.ClipTokenizer)
    tok = tokenizer.get_tokenizer("bert", os.path.join(GOLDEN, "tok_bert_vocab.txt"))
    assert isinstance(tok, tokenizer.BertTokenizer)
    with pytest.raises(ValueError, match="bert_vocab"):
        tokenizer.get_tokenizer("bert")
    with pytest.raises(ValueError, match="unknown"):
        tokenizer.get_tokenizer("gpt2")


def test_prepare_tokenize_is_the_tokenizer():
    # prepare.tokenize is what users call
    assert prepare.tokenize is tokenizer.tokenize


def test_unk_wrapped_is_the_original_vatex_input(bert_tok):
    # the original's VATEX loader: [UNK] (CLIP's start string, unknown to BERT), the caption cut to L-2 tokens,
    # [UNK] (the end string), zero padding; golden ids from the vocabulary by hand
    vocab = [line.rstrip("\n") for line in open(os.path.join(GOLDEN, "tok_bert_vocab.txt"), encoding="utf-8")]
    char_ids = [vocab.index(c) for c in "一个男人"]
    ids, mask = tokenizer.UnkWrapped(bert_tok)(["一个男人", "一个男人" * 5], 8)
    assert ids[0].tolist() == [100, *char_ids, 100, 0, 0]
    assert ids[1].tolist() == [100, *(char_ids * 2)[:6], 100]
    assert mask.tolist() == [[1] * 6 + [0] * 2, [1] * 8]
    assert tokenizer.UnkWrapped(bert_tok).vocab_size == bert_tok.vocab_size  # otherwise the BERT tokenizer's own
