"""
The golden files of this folder, from the reference implementations (README.md here says what each one holds).
Not part of the tests and not run by them: it needs packages this repository does not depend on, so run it in a
scratch environment:

$ python -m venv /tmp/golden && . /tmp/golden/bin/activate
$ pip install torch open_clip_torch==3.3.0 transformers==5.24.0 safetensors==0.8.0 clip-anytorch==2.6.0 ftfy==6.3.1 \
      regex==2026.11.19
$ python tests/golden/make_golden.py check        # recompute every reference output from the committed inputs
$ python tests/golden/make_golden.py make         # write new random models and their outputs (then commit them)

`check` is the one to run after a change of the reference packages: it rebuilds the reference models from the
committed weights, runs them on the committed inputs (images, ids, captions) and reports every difference. `make`
draws new weights and inputs (seeded), so its files differ from the committed ones bit for bit (the draw order
follows the reference packages' parameter order); the tests then still pass, since they compare our code with
whatever the reference computed. The caption lists of tok_*.json are inputs too: `make` keeps the committed
captions and recomputes their ids.
"""

import json
import os
import shutil
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SOT, EOT = 254, 255  # the tiny CLIP's start and end tokens: the two largest ids, as in OpenAI's vocabulary


def seeded_values(named_tensors, generator):
    """The README's rule: LayerNorm weights 1 + 0.2 N, other vectors 0.1 N, matrices N / sqrt(fan_in),
    logit_scale 4.6 (log 100)."""
    out = {}
    for name, t in named_tensors:
        if not t.is_floating_point():
            out[name] = t.clone()
        elif name == "logit_scale":
            out[name] = torch.full_like(t, 4.6)
        elif t.dim() <= 1 and ("ln" in name or "LayerNorm" in name or "layer_norm" in name) and name.endswith("weight"):
            out[name] = 1 + 0.2 * torch.randn(t.shape, generator=generator)
        elif t.dim() <= 1:
            out[name] = 0.1 * torch.randn(t.shape, generator=generator)
        else:
            out[name] = torch.randn(t.shape, generator=generator) / t[0].numel() ** 0.5
    return out


# ----------------------------------------------------------------------------- CLIP

def reference_clip(state_dict):
    """OpenAI's architecture inferred from the weights by open_clip, in fp32 with the fp16 values."""
    import open_clip
    model = open_clip.model.build_model_from_openai_state_dict(dict(state_dict), cast_dtype=None).float().eval()
    model.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=False)
    return model


def clip_outputs(state_dict, images, ids):
    model = reference_clip(state_dict)
    with torch.no_grad():
        return model.encode_image(images).float(), model.encode_text(ids).float()


def make_clip(g):
    import open_clip
    model = open_clip.model.CLIP(
        embed_dim=32, quick_gelu=True,
        vision_cfg=open_clip.model.CLIPVisionCfg(layers=1, width=128, patch_size=8, image_size=32),
        text_cfg=open_clip.model.CLIPTextCfg(context_length=16, vocab_size=256, width=64, heads=1, layers=2))
    state_dict = {k: v.half() for k, v in seeded_values(model.state_dict().items(), g).items()}  # as OpenAI ships
    images = torch.randn(3, 3, 32, 32, generator=g)
    ids = torch.zeros(4, 16, dtype=torch.long)
    for row, n in enumerate((5, 9, 16, 3)):  # one row fills the whole context
        ids[row, :n] = torch.cat([torch.tensor([SOT]), torch.randint(1, SOT, (n - 2,), generator=g),
                                  torch.tensor([EOT])])
    image_emb, text_emb = clip_outputs(state_dict, images, ids)
    torch.save({"state_dict": state_dict, "images": images, "ids": ids, "image_emb": image_emb,
                "text_emb": text_emb, "eot_id": EOT}, os.path.join(HERE, "clip_tiny.pt"))


def check_clip():
    saved = torch.load(os.path.join(HERE, "clip_tiny.pt"), weights_only=True)
    image_emb, text_emb = clip_outputs(saved["state_dict"], saved["images"], saved["ids"])
    return [compare("clip_tiny.pt image_emb", image_emb, saved["image_emb"]),
            compare("clip_tiny.pt text_emb", text_emb, saved["text_emb"])]


# ----------------------------------------------------------------------------- BERT

BERT_ROWS = [[101, 7, 42, 9, 88, 13, 102, 0, 0, 0], [101, 5, 102, 0, 0, 0, 0, 0, 0, 0],
             [101, 61, 3, 77, 20, 45, 11, 90, 36, 102]]  # zero padding; the second row has 2 real tokens only


def bert_outputs(folder, ids):
    import transformers
    model = transformers.BertModel.from_pretrained(folder).eval()
    mask = (ids != 0).long()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    return mask, out.last_hidden_state, out.pooler_output


def make_bert(g):
    import transformers
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=40)
    model = transformers.BertForPreTraining(cfg)
    model.load_state_dict(seeded_values(model.state_dict().items(), g), strict=False)
    folder, legacy = os.path.join(HERE, "bert_tiny"), os.path.join(HERE, "bert_tiny_bin")
    model.save_pretrained(folder)  # config.json + model.safetensors
    os.makedirs(legacy, exist_ok=True)
    shutil.copyfile(os.path.join(folder, "config.json"), os.path.join(legacy, "config.json"))
    # what transformers 4.x wrote: a pickled state dict with the position_ids buffer
    state = dict(model.state_dict())
    state["bert.embeddings.position_ids"] = torch.arange(cfg.max_position_embeddings)[None]
    torch.save(state, os.path.join(legacy, "pytorch_model.bin"))
    ids = torch.tensor(BERT_ROWS)
    mask, last_hidden, pooled = bert_outputs(folder, ids)
    torch.save({"ids": ids, "mask": mask, "last_hidden": last_hidden, "pooled": pooled},
               os.path.join(HERE, "bert_tiny_outputs.pt"))


def make_safetensors_dtypes(g):
    from safetensors.torch import save_file
    tensors = {"f32": torch.randn(3, 4, generator=g), "f16": torch.randn(5, generator=g).half(),
               "bf16": torch.randn(2, 3, generator=g).bfloat16(),
               "i64": torch.randint(-2 ** 40, 2 ** 40, (7, 1), generator=g), "empty": torch.zeros(0, 3)}
    save_file(tensors, os.path.join(HERE, "bert_st_dtypes.safetensors"))
    torch.save(tensors, os.path.join(HERE, "bert_st_dtypes.pt"))


def check_bert():
    saved = torch.load(os.path.join(HERE, "bert_tiny_outputs.pt"), weights_only=True)
    problems = []
    for folder in ("bert_tiny", "bert_tiny_bin"):
        mask, last_hidden, pooled = bert_outputs(os.path.join(HERE, folder), saved["ids"])
        problems += [compare(f"{folder} mask", mask, saved["mask"]),
                     compare(f"{folder} last_hidden", last_hidden, saved["last_hidden"]),
                     compare(f"{folder} pooled", pooled, saved["pooled"])]
    from safetensors.torch import load_file
    st, pt = load_file(os.path.join(HERE, "bert_st_dtypes.safetensors")), torch.load(
        os.path.join(HERE, "bert_st_dtypes.pt"), weights_only=True)
    problems += [compare(f"bert_st_dtypes {k}", st[k], pt[k], exact=True) for k in pt]
    return problems


# ----------------------------------------------------------------------------- tokenizers

def clip_reference_ids(text, context_length):
    """clip.tokenize(text, context_length, truncate=True) of OpenAI's code, without its zero padding (its body
    transcribed: importing clip/clip.py needs torchvision)."""
    from clip.simple_tokenizer import SimpleTokenizer
    tok = clip_reference_ids.tok = getattr(clip_reference_ids, "tok", None) or SimpleTokenizer()
    ids = [tok.encoder["<|startoftext|>"]] + tok.encode(text) + [tok.encoder["<|endoftext|>"]]
    if len(ids) > context_length:
        ids = ids[:context_length]
        ids[-1] = tok.encoder["<|endoftext|>"]
    return ids


def bert_reference_ids(text, lower):
    from transformers import BertTokenizerLegacy
    vocab = os.path.join(HERE, "tok_bert_vocab.txt")
    tok = BertTokenizerLegacy(vocab, do_lower_case=lower)
    return tok.convert_tokens_to_ids(tok.tokenize(text))


def tokenizer_ids():
    """(file name, {caption: recomputed record}) for both tokenizer files, from their committed captions."""
    out = []
    with open(os.path.join(HERE, "tok_clip.json"), encoding="utf-8") as f:
        clip_items = json.load(f)["items"]
    out.append(("tok_clip.json", [{"text": it["text"], "77": clip_reference_ids(it["text"], 77),
                                   "32": clip_reference_ids(it["text"], 32)} for it in clip_items]))
    with open(os.path.join(HERE, "tok_bert.json"), encoding="utf-8") as f:
        bert_items = json.load(f)["items"]
    out.append(("tok_bert.json", [{"text": it["text"], "ids": bert_reference_ids(it["text"], True),
                                   "cased": bert_reference_ids(it["text"], False)} for it in bert_items]))
    return out


def make_tokenizer_ids():
    for name, items in tokenizer_ids():
        path = os.path.join(HERE, name)
        with open(path, encoding="utf-8") as f:
            note = json.load(f)["note"]
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"note": note, "items": items}, f, ensure_ascii=False, indent=0)


def check_tokenizer_ids():
    problems = []
    for name, items in tokenizer_ids():
        with open(os.path.join(HERE, name), encoding="utf-8") as f:
            saved = json.load(f)["items"]
        bad = [it["text"] for it, want in zip(items, saved) if it != want]
        problems.append(f"{name}: {len(bad)} of {len(saved)} captions differ, e.g. {bad[:3]!r}" if bad else None)
    return problems


# -----------------------------------------------------------------------------

def compare(what, got, want, exact=False):
    """None when equal (to 1e-5 for floats computed by the reference), else a line saying how far apart."""
    same = torch.equal(got, want) if exact or not got.is_floating_point() else \
        got.shape == want.shape and torch.allclose(got.float(), want.float(), rtol=1e-5, atol=1e-5)
    if same:
        return None
    diff = (got.float() - want.float()).abs().max().item() if got.shape == want.shape else f"shape {got.shape}"
    return f"{what}: differs ({diff} apart)"


def main(command):
    if command == "make":
        g = torch.Generator().manual_seed(0)
        make_clip(g)
        make_bert(g)
        make_safetensors_dtypes(g)
        make_tokenizer_ids()
        print(f"wrote the golden files in {HERE}; run `check`, then the tests")
    elif command == "check":
        problems = [p for p in check_clip() + check_bert() + check_tokenizer_ids() if p]
        print("\n".join(problems) or "every golden file matches the reference packages")
        return 1 if problems else 0
    else:
        raise SystemExit("usage: python tests/golden/make_golden.py check|make")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else ""))
