# Chinese BERT text encoder and HF-folder loading. Golden values: tests/golden/README.md ("CLIP and BERT").
import json
import os
import shutil

import pytest
import torch

import towers

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")
ST_DIR = os.path.join(GOLDEN, "bert_tiny")       # transformers 5 save_pretrained: model.safetensors, bert.* + cls.*
BIN_DIR = os.path.join(GOLDEN, "bert_tiny_bin")  # transformers 4.x style pytorch_model.bin, + position_ids buffer


@pytest.fixture(scope="module")
def outputs():
    return torch.load(os.path.join(GOLDEN, "bert_tiny_outputs.pt"), weights_only=True)


def tiny_cfg(**kw):
    d = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=16)
    d.update(kw)
    return towers.BertConfig(**d)


def load_bert(path: str) -> towers.BertModel:
    """A BertModel from a HF folder (config.json + model.safetensors or pytorch_model.bin), read as load_model reads
    the BERT of init_from="clip"."""
    sd = towers.load_bert_state_dict(path)
    model = towers.BertModel(towers.BertConfig.from_json(os.path.join(path, "config.json")))
    towers.load_checked(model, sd, towers._bert_weights_file(path))
    return model


@pytest.mark.parametrize("folder", [ST_DIR, BIN_DIR], ids=["safetensors", "bin"])
def test_golden_outputs(folder, outputs):
    # reference: transformers' BertModel (eval mode) on ids with padding, attention_mask = ids != 0
    bert = load_bert(folder).eval()
    assert bert.cfg.hidden_size == 32 and bert.cfg.num_hidden_layers == 2
    with torch.no_grad():
        last_hidden, pooled = bert(outputs["ids"], outputs["mask"])
    torch.testing.assert_close(last_hidden, outputs["last_hidden"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, outputs["pooled"], atol=1e-5, rtol=1e-5)


def test_both_formats_give_the_same_state_dict():
    a, b = towers.load_bert_state_dict(ST_DIR), towers.load_bert_state_dict(BIN_DIR)
    assert set(a) == set(b) == set(towers.BertModel(towers.BertConfig.from_json(os.path.join(ST_DIR, "config.json")))
                                   .state_dict())
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any(k.startswith(("bert.", "cls.")) or k.endswith("position_ids") for k in a)


def test_hf_key_names():
    keys = set(towers.BertModel(tiny_cfg(num_hidden_layers=1)).state_dict())
    for k in ["embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
              "embeddings.token_type_embeddings.weight", "embeddings.LayerNorm.weight",
              "encoder.layer.0.attention.self.query.weight", "encoder.layer.0.attention.self.key.bias",
              "encoder.layer.0.attention.self.value.weight", "encoder.layer.0.attention.output.dense.weight",
              "encoder.layer.0.attention.output.LayerNorm.bias", "encoder.layer.0.intermediate.dense.weight",
              "encoder.layer.0.output.dense.weight", "encoder.layer.0.output.LayerNorm.weight", "pooler.dense.bias"]:
        assert k in keys
    assert len(keys) == 5 + 16 + 2


def test_safetensors_reader_dtypes():
    # written by the safetensors library itself (F32, F16, BF16, I64, an empty tensor); same tensors via torch.save
    ours = towers.read_safetensors(os.path.join(GOLDEN, "bert_st_dtypes.safetensors"))
    ref = torch.load(os.path.join(GOLDEN, "bert_st_dtypes.pt"), weights_only=True)
    assert set(ours) == set(ref)
    for k in ref:
        assert ours[k].dtype == ref[k].dtype and torch.equal(ours[k], ref[k]), k


def test_mask_is_respected():
    torch.manual_seed(0)
    bert = towers.BertModel(tiny_cfg()).eval()
    ids = torch.tensor([[2, 7, 9, 3, 0, 0], [2, 5, 3, 0, 0, 0]])
    mask = (ids != 0).long()
    ids2 = ids.clone()
    ids2[ids == 0] = 17  # different tokens at padded positions
    with torch.no_grad():
        h, p = bert(ids, mask)
        h2, p2 = bert(ids2, mask)
        h_unmasked, _ = bert(ids2)
        h_pad, p_pad = bert(torch.zeros(1, 6, dtype=torch.long), torch.zeros(1, 6, dtype=torch.long))
    for row, n in enumerate((4, 3)):
        torch.testing.assert_close(h2[row, :n], h[row, :n], atol=1e-6, rtol=0)
    torch.testing.assert_close(p2, p, atol=1e-6, rtol=0)
    assert (h_unmasked[0, :4] - h[0, :4]).abs().max() > 1e-3  # without the mask the padding is seen
    assert torch.isfinite(h_pad).all() and torch.isfinite(p_pad).all()


def test_dropout_only_in_train_mode():
    torch.manual_seed(0)
    bert = towers.BertModel(tiny_cfg(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1))
    ids = torch.randint(1, 50, (2, 8))
    bert.train()
    assert not torch.equal(bert(ids)[0], bert(ids)[0])
    bert.eval()
    assert torch.equal(bert(ids)[0], bert(ids)[0])
    bert = towers.BertModel(tiny_cfg(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).train()
    assert torch.equal(bert(ids)[0], bert(ids)[0])


def test_plain_keys_and_tf_layernorm_names(outputs, tmp_path):
    # no `bert.` prefix and LayerNorm gamma/beta (TensorFlow-converted checkpoints) load the same
    sd = towers.load_bert_state_dict(ST_DIR)
    sd = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
          for k, v in sd.items()}
    shutil.copy(os.path.join(ST_DIR, "config.json"), tmp_path)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    bert = load_bert(str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(bert(outputs["ids"], outputs["mask"])[1], outputs["pooled"], atol=1e-5, rtol=1e-5)


def test_config_from_json(tmp_path):
    cfg = towers.BertConfig.from_json(os.path.join(ST_DIR, "config.json"))
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size) == (100, 32, 4, 64)
    with open(os.path.join(ST_DIR, "config.json")) as f:
        d = json.load(f)
    d["hidden_act"] = "relu"
    path = tmp_path / "config.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError, match="hidden_act='relu' is not supported"):
        towers.BertConfig.from_json(str(path))


# ---- bad input

def test_missing_folder_config_and_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="no BERT folder at .*nowhere"):
        load_bert(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="model.safetensors or pytorch_model.bin"):
        load_bert(str(tmp_path))
    shutil.copy(os.path.join(ST_DIR, "model.safetensors"), tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_bert(str(tmp_path))


def test_truncated_weights(tmp_path):
    shutil.copy(os.path.join(ST_DIR, "config.json"), tmp_path)
    for name, src in [("model.safetensors", os.path.join(ST_DIR, "model.safetensors")),
                      ("pytorch_model.bin", os.path.join(BIN_DIR, "pytorch_model.bin"))]:
        data = open(src, "rb").read()
        for blob in (data[: len(data) // 2], data[:5]):
            (tmp_path / name).write_bytes(blob)
            with pytest.raises(ValueError, match=f"{name}.*(truncated|too short)"):
                load_bert(str(tmp_path))
        os.remove(tmp_path / name)


def test_mismatched_keys(tmp_path):
    sd = towers.load_bert_state_dict(ST_DIR)
    del sd["pooler.dense.weight"]
    sd["encoder.layer.2.output.dense.weight"] = torch.zeros(1)
    shutil.copy(os.path.join(ST_DIR, "config.json"), tmp_path)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin.*pooler\.dense\.weight.*layer\.2\.output\.dense"):
        load_bert(str(tmp_path))


def test_too_long_input():
    bert = towers.BertModel(tiny_cfg())
    with pytest.raises(ValueError, match="max_position_embeddings 16"):
        bert(torch.zeros(1, 17, dtype=torch.long))


def test_bf16_autocast_keeps_mask():
    torch.manual_seed(0)
    bert = towers.BertModel(tiny_cfg()).eval()
    ids = torch.tensor([[2, 7, 9, 3, 0, 0], [0, 0, 0, 0, 0, 0]])
    with torch.no_grad():
        h, p = bert(ids, (ids != 0).long())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h16, p16 = bert(ids, (ids != 0).long())
    assert torch.isfinite(h16.float()).all() and torch.isfinite(p16.float()).all()
    # observed: 1.9e-4 apart (values up to 2.9); attending to the two padding tokens moves them by 1.4e-2
    torch.testing.assert_close(h16[0, :4].float(), h[0, :4], atol=1e-3, rtol=0)
