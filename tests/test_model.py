# Tests of the HMMC part of model.py on tiny configs (CPU, a few seconds). Every loss is checked against a direct,
# loop-based reference written here from the original's description, not against the batched code it tests.
import math
import os

import pytest
import torch
import torch.nn.functional as F

import model as M
import towers

torch.set_num_threads(1)
E, T, RES, VOCAB_CLIP, VOCAB_BERT = 32, 4, 16, 100, 60
CLIP_CFG = dict(embed_dim=E, image_resolution=RES, vision_layers=1, vision_width=64, vision_patch_size=8,
                context_length=12, vocab_size=VOCAB_CLIP, transformer_width=64, transformer_heads=1,
                transformer_layers=1, eot_id=VOCAB_CLIP - 1)
BERT_CFG = dict(vocab_size=VOCAB_BERT, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=128, max_position_embeddings=16)
PAD, CLS, SEP, MASK = 0, 1, 2, 3


def make_cfg(**kw) -> M.HMMCConfig:
    base = dict(clip=M.CLIPConfig(**CLIP_CFG), bert=M.BertConfig(**BERT_CFG), num_frames=T, max_frames=8,
                temporal_layers=1, queue_size=8, proj_hidden=48, mlm_mask_id=MASK, mlm_special_ids=(PAD, CLS, SEP))
    if kw.get("pretrain") and kw.get("text_encoder", "clip") == "clip":
        base["weight_mlm"] = 0.0
    base.update(kw)
    return M.HMMCConfig(**base)


def make_model(seed=0, **kw) -> M.HMMC:
    torch.manual_seed(seed)
    return M.HMMC(make_cfg(**kw))


def make_batch(B, text_encoder="clip", seed=1, frames=T):
    g = torch.Generator().manual_seed(seed)
    vocab = VOCAB_CLIP if text_encoder == "clip" else VOCAB_BERT

    def text(L):
        ids = torch.randint(4, vocab - 1, (B, L), generator=g)
        mask = torch.ones(B, L, dtype=torch.long)
        for i in range(B):  # variable lengths: end token, then padding
            n = int(torch.randint(3, L + 1, (1,), generator=g))
            ids[i, 0] = CLS if text_encoder == "bert" else ids[i, 0]
            ids[i, n - 1] = SEP if text_encoder == "bert" else vocab - 1
            ids[i, n:], mask[i, n:] = PAD, 0
        return ids, mask

    ids, mask = text(10)
    tag_ids, tag_mask = text(6)
    return dict(video=torch.randn(B, frames, 3, RES, RES, generator=g), ids=ids, mask=mask, tag_ids=tag_ids,
                tag_mask=tag_mask)


def ce(logits_row, target):  # one row of cross-entropy, written out
    return -(logits_row[target] - torch.logsumexp(logits_row, 0))


# ---------------------------------------------------------------------------------------------------------------
# config

def test_config_round_trip_and_unknown_key():
    cfg = make_cfg(text_encoder="bert", pretrain=True, use_tags=False)
    d = cfg.to_dict()
    assert isinstance(d["clip"], dict) and isinstance(d["bert"], dict) and isinstance(d["mlm_special_ids"], list)
    assert M.HMMCConfig.from_dict(d) == cfg
    with pytest.raises(ValueError, match="unknown HMMCConfig keys.*bogus"):
        M.HMMCConfig.from_dict({**d, "bogus": 1})


def test_english_mlm_is_a_config_error():
    with pytest.raises(ValueError, match="weight_mlm=0"):
        M.HMMC(make_cfg(pretrain=True, weight_mlm=0.05))


# ---------------------------------------------------------------------------------------------------------------
# encoders and fine-tuning

def test_encode_shapes_and_pooling():
    m = make_model()
    b = make_batch(3)
    v, f = m.encode_video(b["video"])
    t = m.encode_text(b["ids"], b["mask"])
    assert v.shape == (3, E) and f.shape == (3, T, E) and t.shape == (3, E)
    for x in (v, f, t):
        torch.testing.assert_close(x.norm(dim=-1), torch.ones(x.shape[:-1]))
    # frame_emb are the raw pre-temporal CLIP frames; video = normalised mean of normalised h = TT(x + P) + x
    x = m.video.visual(b["video"].flatten(0, 1)).view(3, T, E)
    torch.testing.assert_close(f, F.normalize(x, dim=-1))
    h = m.video.temporal(x + m.video.frame_position_embeddings.weight[:T]) + x
    torch.testing.assert_close(v, F.normalize(F.normalize(h, dim=-1).mean(1), dim=-1))
    # without the temporal transformer: plain normalised mean of the normalised frames
    m2 = make_model(use_temp=False)
    v2, f2 = m2.encode_video(b["video"])
    torch.testing.assert_close(v2, F.normalize(f2.mean(1), dim=-1))


def test_uint8_frames_are_normalised_by_the_model():
    x = torch.randint(0, 256, (2, 4, 3, 5, 5), dtype=torch.uint8)
    y = M.normalize_frames(x)
    mean, std = torch.tensor(M.CLIP_MEAN).view(3, 1, 1), torch.tensor(M.CLIP_STD).view(3, 1, 1)
    assert y.dtype == torch.float32 and y.shape == x.shape
    torch.testing.assert_close(y, (x.float() / 255 - mean) / std, atol=1e-5, rtol=1e-5)
    assert M.CLIP_MEAN[2] == 0.40821073  # not the original's augmentation typo
    assert M.normalize_frames(y) is y  # floats are taken as normalised already
    with pytest.raises(ValueError, match="RGB"):
        M.normalize_frames(torch.zeros(2, 4, 5, 5, dtype=torch.uint8))
    # the model gives the same embeddings for uint8 frames as for the frames normalised by hand
    m = make_model()
    video = torch.randint(0, 256, (2, T, 3, RES, RES), dtype=torch.uint8)
    for a, b in zip(m.encode_video(video), m.encode_video(M.normalize_frames(video))):
        assert torch.equal(a, b)


def finetune_loss_reference(t, v, f, scale=100.0, w_video=0.85, w_frame=0.15):
    # the original's BirdModel loss: per-frame-position loop, CE written row by row
    G, T_ = f.shape[:2]

    def sym_ce(S):
        return sum(ce(S[i], i) for i in range(G)) / G + sum(ce(S[:, j], j) for j in range(G)) / G

    loss_v = sym_ce(scale * t @ v.T)
    loss_f = sum(sym_ce(scale * t @ f[:, k].T) for k in range(T_)) / T_
    return w_video * loss_v + w_frame * loss_f, loss_v, loss_f


def test_finetune_loss_matches_loop_reference():
    m = make_model()
    b = make_batch(5)
    loss, parts = m(b)
    t = m.encode_text(b["ids"], b["mask"])
    v, f = m.encode_video(b["video"])
    ref, ref_v, ref_f = finetune_loss_reference(t, v, f)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(parts["video"], ref_v)
    torch.testing.assert_close(parts["frame"], ref_f)
    assert not parts["video"].requires_grad
    # no frame term
    m.cfg.use_frame_fea = False
    loss2, parts2 = m(b)
    torch.testing.assert_close(loss2, 0.85 * ref_v)
    assert parts2["frame"] == 0


def test_finetune_bert_and_learned_scale():
    m = make_model(text_encoder="bert", learn_sim_scale=True, sim_scale=50.0).eval()  # eval: no dropout
    b = make_batch(4, "bert")
    loss, _ = m(b)
    t = m.encode_text(b["ids"], b["mask"])
    v, f = m.encode_video(b["video"])
    torch.testing.assert_close(loss, finetune_loss_reference(t, v, f, scale=50.0)[0])
    loss.backward()
    assert m.logit_scale.grad is not None and m.text.text_proj.weight.grad is not None


def test_learned_scale_stops_at_100():
    # CLIP4Clip's clamp: a learned log-scale past log(100) scores and trains exactly as s = 100, with no gradient
    # pushing it further
    m = make_model(learn_sim_scale=True, sim_scale=50.0)
    with torch.no_grad():
        m.logit_scale.fill_(math.log(400.0))
    b = make_batch(4)
    loss, _ = m(b)
    with torch.no_grad():
        t = m.encode_text(b["ids"], b["mask"])
        v, f = m.encode_video(b["video"])
    torch.testing.assert_close(loss, finetune_loss_reference(t, v, f, scale=100.0)[0])
    loss.backward()
    assert m.logit_scale.grad == 0


def test_losses_stay_fp32_under_autocast():
    for kw in ({}, {"pretrain": True}):
        m = make_model(**kw)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, parts = m(make_batch(4))
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        loss.backward()


def test_batch_of_one():
    m = make_model()
    loss, parts = m(make_batch(1))
    assert loss.item() == 0.0 and parts["frame"].item() == 0.0  # one candidate: CE is exactly 0
    loss.backward()
    mp = make_model(pretrain=True)
    loss, parts = mp(make_batch(1))
    assert torch.isfinite(loss) and loss > 0
    loss.backward()


def test_bert_text_respects_mask():
    m = make_model(text_encoder="bert").eval()
    b = make_batch(3, "bert")
    t = m.encode_text(b["ids"], b["mask"])
    ids = b["ids"].clone()
    ids[b["mask"] == 0] = 7  # garbage under the padding must not change anything
    torch.testing.assert_close(m.encode_text(ids, b["mask"]), t)


def test_bert_mean_pooling_is_the_masked_mean_and_trains_every_parameter():
    m = make_model(text_encoder="bert", bert_pooling="mean").eval()
    assert m.text.bert.pooler is None  # no unused parameters: DDP needs no find_unused_parameters
    b = make_batch(3, "bert")
    hidden, pooled = m.text.bert(b["ids"], b["mask"])
    assert pooled is None
    keep = b["mask"].float()
    mean = torch.stack([hidden[i][keep[i] > 0].mean(0) for i in range(3)])  # each caption's real tokens only
    torch.testing.assert_close(m.encode_text(b["ids"], b["mask"]), F.normalize(m.text.text_proj(mean), dim=-1))
    ids = b["ids"].clone()
    ids[b["mask"] == 0] = 7  # padding stays out of the mean
    torch.testing.assert_close(m.encode_text(ids, b["mask"]), m.encode_text(b["ids"], b["mask"]))
    loss, _ = m(b)
    loss.backward()
    assert all(p.grad is not None for p in m.text.parameters())
    with pytest.raises(ValueError, match="bert_pooling"):
        make_model(text_encoder="bert", bert_pooling="max")


def test_scratch_bert_starts_with_captions_apart_under_mean_pooling():
    # two captions that differ in one word, as a caption and its time-reversed twin ("...left" / "...right")
    ids = torch.tensor([[CLS, 10, 11, 12, 13, 14, 15, 16, 17, 20, SEP], [CLS, 10, 11, 12, 13, 14, 15, 16, 17, 21, SEP]])
    mask = torch.ones_like(ids)
    cos = {}
    for pooling in ("cls", "mean"):
        m = make_model(text_encoder="bert", bert_pooling=pooling).eval()
        with torch.no_grad():
            emb = m.encode_text(ids, mask)
        cos[pooling] = float(emb[0] @ emb[1])
    assert cos["cls"] > 0.999  # the [CLS] state barely moves at BERT's init: every caption looks the same
    assert cos["mean"] < 0.99
    e = M.BertModel(M.BertConfig(**BERT_CFG)).embeddings.requires_grad_(False)
    assert not e.token_type_embeddings.weight.any()  # one type at every position: would be common to all tokens
    assert 0.008 < float(e.position_embeddings.weight.std()) < 0.012
    assert 0.018 < float(e.word_embeddings.weight[1:].std()) < 0.022


def test_bert_pooling_comes_with_the_weights(tmp_path):
    mean = make_model(seed=2, text_encoder="bert", bert_pooling="mean").eval()
    path = str(tmp_path / "mean.pt")
    torch.save({"model": mean.state_dict(), "model_args": mean.cfg.to_dict()}, path)
    loaded, _ = M.load_model(path, make_cfg(text_encoder="bert"))  # a config with the default "cls"
    b = make_batch(2, "bert")
    assert loaded.cfg.bert_pooling == "mean"
    torch.testing.assert_close(loaded.eval().encode_text(b["ids"], b["mask"]), mean.encode_text(b["ids"], b["mask"]))
    # a pre-trained BERT under mean pooling: its [CLS] pooler is left out, everything else loaded
    torch.manual_seed(3)
    bert_sd = M.BertModel(M.BertConfig(**BERT_CFG)).state_dict()
    mz = M.HMMC.from_clip(make_cfg(text_encoder="bert", bert_pooling="mean"), tiny_clip_sd(), bert_sd)
    assert mz.text.bert.pooler is None
    assert torch.equal(mz.text.bert.embeddings.word_embeddings.weight, bert_sd["embeddings.word_embeddings.weight"])


# ---------------------------------------------------------------------------------------------------------------
# hierarchical similarity

def test_hierarchical_similarity_brute_force_and_chunks():
    g = torch.Generator().manual_seed(0)
    Q, V, k = 7, 5, 2
    t = torch.randn(Q, E, generator=g)
    v = torch.randn(V, E, generator=g)
    f = torch.randn(V, T, E, generator=g)
    sim = M.hierarchical_similarity(t, v, f, top_k=k, frame_match_weight=0.7)
    ref = torch.empty(Q, V)
    for i in range(Q):
        for j in range(V):
            cos_v = F.cosine_similarity(t[i], v[j], dim=0)
            cos_f = sorted((F.cosine_similarity(t[i], f[j, s], dim=0).item() for s in range(T)), reverse=True)
            ref[i, j] = 100 * cos_v + 0.7 * 100 * sum(cos_f[:k]) / k
    torch.testing.assert_close(sim, ref, atol=1e-4, rtol=1e-5)
    for chunk in (1, 3, 100):
        torch.testing.assert_close(M.hierarchical_similarity(t, v, f, k, 0.7, chunk_size=chunk), sim)
    # frame_match_weight 0: the video term only; top_k larger than T is clamped
    torch.testing.assert_close(M.hierarchical_similarity(t, v, f, k, 0.0), 100 * F.normalize(t, dim=-1) @
                               F.normalize(v, dim=-1).T)
    assert M.hierarchical_similarity(t, v, f, 99, 1.0).shape == (Q, V)
    # unit inputs (a search index) may skip the normalisation: the same scores; raw ones then score differently
    units = [F.normalize(x, dim=-1) for x in (t, v, f)]
    torch.testing.assert_close(M.hierarchical_similarity(*units, k, 0.7, normalized=True), sim)
    assert not torch.allclose(M.hierarchical_similarity(t, v, f, k, 0.7, normalized=True), sim)


# ---------------------------------------------------------------------------------------------------------------
# pre-training

def cl_reference(q, k, queue, tau=0.07):
    # CL(q, k, Q), row by row: logits [q.k, q.Q_1 ... q.Q_M] / tau, target 0
    q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    rows = [ce(torch.cat([(q[i] @ k[i]).view(1), queue @ q[i]]) / tau, 0) for i in range(q.shape[0])]
    return sum(rows) / len(rows)


def test_contrastive_primitive_matches_reference():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(5, E, generator=g), torch.randn(5, E, generator=g)
    queue = F.normalize(torch.randn(11, E, generator=g), dim=-1)
    torch.testing.assert_close(M.queue_contrastive_loss(q, k, queue, 0.07), cl_reference(q, k, queue))
    # several positives per query sharing the negatives = the mean of the single-positive losses
    ks = torch.randn(5, 3, E, generator=g)
    torch.testing.assert_close(M.queue_contrastive_loss(q, ks, queue, 0.07),
                               sum(cl_reference(q, ks[:, j], queue) for j in range(3)) / 3)


@pytest.mark.parametrize("use_tags", [True, False])
def test_pretrain_losses_match_loop_references(use_tags):
    m = make_model(pretrain=True, use_tags=use_tags)
    B = 4
    b = make_batch(B)
    queues = {n: getattr(m, f"queue_{n}").clone() for n in m.queue_rows}
    torch.manual_seed(5)
    loss, parts = m(b)
    # recompute the features with the same modules (no dropout in the CLIP towers; BN in train mode = batch stats)
    with torch.no_grad():
        v, Fr = m.video(b["video"])
        v_m, Fr_m = m.video_m(b["video"])
        title, title_m = m.text(b["ids"]), m.text_m(b["ids"])
        tag, tag_m = m.text(b["tag_ids"]), m.text_m(b["tag_ids"])
        P = m.predictor(m.projector(Fr.flatten(0, 1))).view(B, T, E)
        Z = m.projector_m(Fr_m.flatten(0, 1)).view(B, T, E)
    Qv, Qt, Qf, Qp = queues["video"], queues["title"], queues["frame"], queues["frame_proj"]
    # FAM: (1/(T-1)) sum_t [CL(P_t, Z_t+1) + CL(P_t+1, Z_t)]
    fam = sum(cl_reference(P[:, t], Z[:, t + 1], Qp) + cl_reference(P[:, t + 1], Z[:, t], Qp)
              for t in range(T - 1)) / (T - 1)
    # VTM and FTM, title (and tag)
    vtm = cl_reference(v, title_m, Qt) + cl_reference(title, v_m, Qv)

    def ftm(c, c_m, Qc):
        return sum(cl_reference(c, Fr_m[:, t], Qf) + cl_reference(Fr[:, t], c_m, Qc) for t in range(T)) / T

    ftm_ = ftm(title, title_m, Qt)
    if use_tags:
        Qg = queues["tag"]
        vtm = 0.5 * (vtm + cl_reference(v, tag_m, Qg) + cl_reference(tag, v_m, Qv))
        ftm_ = 0.5 * (ftm_ + ftm(tag, tag_m, Qg))
    else:
        assert "tag" not in m.queue_rows and not hasattr(m, "queue_tag")
    tol = dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(parts["fam"], fam, **tol)
    torch.testing.assert_close(parts["vtm"], vtm, **tol)
    torch.testing.assert_close(parts["ftm"], ftm_, **tol)
    assert parts["mlm"] == 0
    torch.testing.assert_close(loss, 0.05 * fam + 0.45 * vtm + 0.45 * ftm_, **tol)
    # enqueued after the losses: the first B rows now hold this batch's normalised momentum keys
    assert int(m.queue_ptr) == B
    torch.testing.assert_close(m.queue_video[:B], F.normalize(v_m, dim=-1))
    torch.testing.assert_close(m.queue_title[:B], F.normalize(title_m, dim=-1))
    torch.testing.assert_close(m.queue_frame[:B * T], F.normalize(Fr_m, dim=-1).flatten(0, 1))
    torch.testing.assert_close(m.queue_frame_proj[:B * T], F.normalize(Z, dim=-1).flatten(0, 1), **tol)
    torch.testing.assert_close(m.queue_video[B:], Qv[B:])
    # eval mode: a validation forward does not touch the queues
    before = {k: v.clone() for k, v in m.state_dict().items() if k.startswith("queue_")}
    m.eval()(b)
    assert all(torch.equal(m.state_dict()[k], v) for k, v in before.items())


def test_gradients_reach_online_parameters_only():
    m = make_model(pretrain=True, text_encoder="bert")
    loss, _ = m(make_batch(4, "bert"))
    loss.backward()
    momentum = {n for n, _ in m.named_parameters() if n.split(".")[0] in ("video_m", "text_m", "projector_m")}
    assert momentum
    for n, p in m.named_parameters():
        if n in momentum:
            assert not p.requires_grad and p.grad is None, n
        else:
            assert p.grad is not None, n
    for name in m.queue_rows:
        assert not getattr(m, f"queue_{name}").requires_grad
    # queues, pointer and momentum weights are part of the state dict (checkpoints resume them)
    sd = m.state_dict()
    assert {"queue_ptr", "queue_video", "queue_title", "queue_tag", "queue_frame", "queue_frame_proj"} <= set(sd)
    assert any(k.startswith("video_m.") for k in sd) and any(k.startswith("text_m.") for k in sd)


def test_momentum_update_is_ema():
    m = make_model(pretrain=True)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p))  # online and momentum now differ
    online, mom = m._momentum_params()
    before = [p.clone() for p in mom]
    m.momentum_update()
    for p, b, o in zip(mom, before, online):
        torch.testing.assert_close(p, 0.99 * b + 0.01 * o)
    m.copy_to_momentum()
    for p, o in zip(*m._momentum_params()[::-1]):
        assert torch.equal(p, o)


def test_queue_wrap_around_and_divisibility():
    m = make_model(pretrain=True)  # K = 8
    keys = lambda x: {"video": x, "title": x, "tag": x, "frame": x[:, None].expand(-1, T, -1),
                      "frame_proj": x[:, None].expand(-1, T, -1)}
    batches = [F.normalize(torch.randn(4, E), dim=-1) for _ in range(3)]
    for i, x in enumerate(batches):
        m._enqueue(keys(x))
        assert int(m.queue_ptr) == (4 * (i + 1)) % 8
    torch.testing.assert_close(m.queue_video, torch.cat([batches[2], batches[1]]))  # third batch overwrote the first
    torch.testing.assert_close(m.queue_frame[:4 * T], batches[2].repeat_interleave(T, 0))
    with pytest.raises(ValueError, match="multiple of the global batch"):
        m._enqueue(keys(torch.randn(3, E)))
    with pytest.raises(ValueError, match="num_frames"):
        m(make_batch(2, frames=T + 1))


def test_queues_hold_the_last_batches_row_for_row():
    # three real forwards of 4 videos into queues of 8 (pointer 0 -> 4 -> 0 -> 4): every row of every queue holds
    # the normalised momentum key of the video (and frame position) last written there, frames t = 0..T-1 of video j
    # at row j*T + t. The momentum encoders do not move between forwards (no momentum_update), so the keys can be
    # recomputed afterwards.
    m = make_model(pretrain=True)  # K = 8, T = 4 frames
    batches = [make_batch(4, seed=s) for s in (21, 22, 23)]
    for i, b in enumerate(batches):
        m(b)
        assert int(m.queue_ptr) == 4 * (i + 1) % 8
    with torch.no_grad():
        keys = []
        for b in batches:
            v_m, frames_m = m.video_m(b["video"])
            keys.append({"video": v_m, "title": m.text_m(b["ids"]), "tag": m.text_m(b["tag_ids"]),
                         "frame": frames_m,
                         "frame_proj": m.projector_m(frames_m.flatten(0, 1)).view(4, T, E)})
    for name in ("video", "title", "tag", "frame", "frame_proj"):
        queue = getattr(m, f"queue_{name}")
        per_video = T if name.startswith("frame") else 1
        assert queue.shape == (8 * per_video, E), name
        # rows of videos 0-3: the third batch (it overwrote the first); videos 4-7: the second
        want = torch.cat([F.normalize(keys[2][name], dim=-1).reshape(4 * per_video, E),
                          F.normalize(keys[1][name], dim=-1).reshape(4 * per_video, E)])
        # observed: bit-identical (the same modules on the same inputs); 1e-6 leaves room for other CPUs
        torch.testing.assert_close(queue, want, atol=1e-6, rtol=0, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("pretrain", [False, True])
def test_training_forward_is_one_graph(pretrain):
    # no host syncs (.item(), data-dependent shapes) in the step: each would stall the GPU's queue every step and
    # split torch.compile's graph. The queue pointer used to be read on the host; this pins that it is not.
    m = make_model(pretrain=pretrain)
    explained = torch._dynamo.explain(m)(make_batch(4))
    reasons = [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1 and not reasons, reasons
    torch._dynamo.reset()


def test_mask_tokens_rules_and_proportions():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 1000, (400, 50), generator=g)
    ids[:, 0], ids[:, 30], ids[:, 31:] = CLS, SEP, PAD
    attn = (ids != PAD).long()
    out, labels = M.mask_tokens(ids, 1000, MASK, (PAD, CLS, SEP), 0.15, attention_mask=attn, generator=g)
    chosen = labels != -100
    assert not chosen[:, [0, 30]].any() and not chosen[:, 31:].any()  # never [CLS], [SEP], [PAD]
    assert torch.equal(labels[chosen], ids[chosen]) and torch.equal(out[~chosen], ids[~chosen])
    n = chosen.sum().item()
    assert abs(n / (400 * 29) - 0.15) < 0.01
    masked = (out == MASK) & chosen
    kept = (out == ids) & chosen
    assert abs(masked.sum().item() / n - 0.8) < 0.03
    assert abs(kept.sum().item() / n - 0.1 - 0.1 / 1000) < 0.03  # random draws rarely hit the same id
    assert abs((chosen & ~masked & ~kept).sum().item() / n - 0.1) < 0.03
    # the generator makes it reproducible
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(M.mask_tokens(ids, 1000, MASK, (0,), 0.15, generator=g1)[0],
                       M.mask_tokens(ids, 1000, MASK, (0,), 0.15, generator=g2)[0])


def test_mlm_loss_matches_reference():
    m = make_model(pretrain=True, text_encoder="bert").eval()  # eval: no dropout, so the reference can rerun BERT
    b = make_batch(4, "bert")
    torch.manual_seed(11)
    loss = m._mlm_loss(b["ids"], b["mask"])
    torch.manual_seed(11)
    masked, labels = M.mask_tokens(b["ids"], VOCAB_BERT, MASK, (PAD, CLS, SEP), 0.15, attention_mask=b["mask"])
    hidden = m.text.text_proj(m.text.bert(masked, b["mask"])[0])
    logits = m.mlm_head.decoder(F.layer_norm(F.gelu(m.mlm_head.dense(hidden)), (E,), m.mlm_head.ln.weight,
                                             m.mlm_head.ln.bias, 1e-12))
    terms = [ce(logits[i, j], labels[i, j]) for i in range(4) for j in range(labels.shape[1]) if labels[i, j] != -100]
    assert terms
    torch.testing.assert_close(loss, sum(terms) / len(terms))
    # the full pre-training loss includes it with tags (title + tag averaged)
    lossp, parts = m.train()(b)
    assert parts["mlm"] > 0


def mlm_reference(m, ids, mask):
    """The MLM loss written out: BERT masking with the global RNG, the head by hand, CE row by row over the
    chosen tokens."""
    masked, labels = M.mask_tokens(ids, VOCAB_BERT, MASK, (PAD, CLS, SEP), 0.15, attention_mask=mask)
    hidden = m.text.text_proj(m.text.bert(masked, mask)[0])
    logits = m.mlm_head.decoder(F.layer_norm(F.gelu(m.mlm_head.dense(hidden)), (E,), m.mlm_head.ln.weight,
                                             m.mlm_head.ln.bias, 1e-12))
    terms = [ce(logits[i, j], labels[i, j]) for i in range(ids.shape[0]) for j in range(ids.shape[1])
             if labels[i, j] != -100]
    assert terms
    return sum(terms) / len(terms)


@pytest.mark.parametrize("use_tags", [True, False])
def test_pretraining_mlm_part_is_title_and_tag_mlm(use_tags):
    # in eval mode (no dropout, queues untouched) the forward's only random draws are the two maskings: the title's,
    # then the tags'. The mlm part is their mean with tags, the title's alone without.
    m = make_model(pretrain=True, text_encoder="bert", use_tags=use_tags).eval()
    b = make_batch(4, "bert")
    torch.manual_seed(12)
    loss, parts = m(b)
    torch.manual_seed(12)
    with torch.no_grad():
        title = mlm_reference(m, b["ids"], b["mask"])
        want = 0.5 * (title + mlm_reference(m, b["tag_ids"], b["tag_mask"])) if use_tags else title
    torch.testing.assert_close(parts["mlm"], want)
    torch.testing.assert_close(loss, 0.05 * parts["fam"] + 0.45 * parts["vtm"] + 0.45 * parts["ftm"] + 0.05 * want)


# ---------------------------------------------------------------------------------------------------------------
# optimizer, FLOPs

def test_optimizer_groups_cover_trainable_params_once():
    m = make_model(pretrain=True, text_encoder="bert", freeze_clip_vision=True)
    opt = m.configure_optimizers(0.2, 1e-4, 1e-3, 1e-5, (0.9, 0.98), 1e-6, "cpu")
    seen = [id(p) for g in opt.param_groups for p in g["params"]]
    trainable = [id(p) for p in m.parameters() if p.requires_grad]
    assert sorted(seen) == sorted(trainable) and len(set(seen)) == len(seen)
    names = {id(p): n for n, p in m.named_parameters()}
    for g in opt.param_groups:
        tower = g["name"].split("_")[0]
        assert g["lr"] == g["base_lr"] == pytest.approx({"vision": 1e-7, "text": 1e-5, "new": 1e-4}[tower])
        for p in g["params"]:
            n = names[id(p)]
            assert (g["weight_decay"] == 0.2) == (p.dim() >= 2), n
            assert n.startswith({"vision": "video.visual.", "text": "text."}.get(tower, "")), n
    # freeze_clip_vision freezes the tensors the original kept in fp16 (matrices), not LayerNorms/embeddings
    assert not m.video.visual.conv1.weight.requires_grad and not m.video.visual.proj.requires_grad
    assert m.video.visual.ln_post.weight.requires_grad and m.video.visual.class_embedding.requires_grad
    assert "vision_no_decay" in [g["name"] for g in opt.param_groups]
    assert opt.defaults["betas"] == (0.9, 0.98) and opt.defaults["eps"] == 1e-6


def test_flops_formula():
    m = make_model()
    c = m.cfg.clip
    d, n = c.vision_width, (RES // 8) ** 2 + 1
    vit = 2 * (n - 1) * 3 * 64 * d + (24 * n * d * d + 4 * n * n * d) + 2 * d * E
    tt = 24 * T * E * E + 4 * T * T * E
    w, L = c.transformer_width, 10
    text_of = lambda n: 24 * n * w * w + 4 * n * n * w + 2 * w * E
    text = text_of(L)
    assert m.flops_per_video(T, L) == 3 * (T * vit + tt + text)
    # pre-training: the online towers on the caption and the tags (6 tokens), the projector and predictor on every
    # frame, trained (3x forward); the momentum towers and projector forward only (1x)
    mp = make_model(pretrain=True)
    video, texts, mlp = T * vit + tt, text + text_of(6), 2 * 2 * E * 48  # proj_hidden 48: E -> 48 -> E
    assert mp.flops_per_video(T, L, 6) == 3 * (video + texts + 2 * T * mlp) + (video + texts + T * mlp)


# ---------------------------------------------------------------------------------------------------------------
# weights: CLIP init, pretrain -> finetune, the original's checkpoints

def tiny_clip_sd(seed=0):
    torch.manual_seed(seed)
    return towers.CLIP(M.CLIPConfig(**{**CLIP_CFG, "transformer_width": E, "transformer_heads": 1})).state_dict()


def test_from_clip_and_temporal_init():
    sd = tiny_clip_sd()
    m = M.HMMC.from_clip(make_cfg(temporal_init="clip", pretrain=True), sd)
    assert torch.equal(m.video.visual.conv1.weight, sd["visual.conv1.weight"])
    assert torch.equal(m.text.token_embedding.weight, sd["token_embedding.weight"])
    assert torch.equal(m.video.temporal.resblocks[0].mlp.c_fc.weight, sd["transformer.resblocks.0.mlp.c_fc.weight"])
    assert torch.equal(m.video.frame_position_embeddings.weight, sd["positional_embedding"][:8])
    assert torch.equal(m.video_m.visual.conv1.weight, sd["visual.conv1.weight"])  # momentum copies follow
    # Chinese: the HF BERT weights (a position_ids buffer as transformers 4.x saves it is accepted)
    torch.manual_seed(3)
    bert_sd = {**M.BertModel(M.BertConfig(**BERT_CFG)).state_dict(), "embeddings.position_ids": torch.arange(16)[None]}
    mz = M.HMMC.from_clip(make_cfg(text_encoder="bert"), sd, bert_sd)
    assert torch.equal(mz.text.bert.pooler.dense.weight, bert_sd["pooler.dense.weight"])
    with pytest.raises(ValueError, match="bert_sd"):
        M.HMMC.from_clip(make_cfg(text_encoder="bert"), sd)


def test_load_model_pretrain_checkpoint_into_finetuning(tmp_path):
    pre = make_model(seed=1, pretrain=True)
    path = str(tmp_path / "pre.pt")
    torch.save({"model": pre.state_dict(), "model_args": pre.cfg.to_dict()}, path)
    fin, info = M.load_model(path, make_cfg())  # this config's losses, the checkpoint's towers
    assert "queue_video" in info["dropped"] and any(k.startswith("video_m.") for k in info["dropped"])
    assert any(k.startswith("projector.") for k in info["dropped"]) and "dropped" in info["message"]
    assert fin.cfg.pretrain is False and info["checkpoint"]["model_args"]["pretrain"] is True
    for k, v in fin.state_dict().items():
        assert torch.equal(v, pre.state_dict()[k]), k
    same, info = M.load_model(path)  # no config: the checkpoint's own model, nothing dropped
    assert same.cfg.pretrain is True and info["dropped"] == []
    with pytest.raises(ValueError, match="video.temporal.resblocks.1"):
        M.load_model(path, make_cfg(temporal_layers=2))
    with pytest.raises(ValueError, match="shape mismatch"):
        M.load_model(path, make_cfg(max_frames=6))


# --- an independent reference of the original's forward, written from its description ---------------------------------

def ref_ln(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def ref_attention(x, wq, bq, wk, bk, wv, bv, heads, key_ok=None, causal=False):
    # x (L, D) one sequence; loop over heads and query positions
    L, D = x.shape
    q, k, v = x @ wq.T + bq, x @ wk.T + bk, x @ wv.T + bv
    hd = D // heads
    out = torch.zeros(L, D)
    for h in range(heads):
        s = slice(h * hd, (h + 1) * hd)
        for i in range(L):
            scores = torch.stack([q[i, s] @ k[j, s] / math.sqrt(hd) for j in range(L)])
            allowed = torch.tensor([(not causal or j <= i) and (key_ok is None or bool(key_ok[j])) for j in range(L)])
            scores = scores.masked_fill(~allowed, float("-inf"))
            out[i, s] = torch.softmax(scores, 0) @ v[:, s]
    return out


def ref_clip_block(x, sd, p, heads, eps=1e-5, causal=False):
    w, b = sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"]
    D = x.shape[-1]
    h = ref_ln(x, sd[p + "ln_1.weight"], sd[p + "ln_1.bias"], eps)
    a = ref_attention(h, w[:D], b[:D], w[D:2 * D], b[D:2 * D], w[2 * D:], b[2 * D:], heads, causal=causal)
    x = x + a @ sd[p + "attn.out_proj.weight"].T + sd[p + "attn.out_proj.bias"]
    h = ref_ln(x, sd[p + "ln_2.weight"], sd[p + "ln_2.bias"], eps)
    h = h @ sd[p + "mlp.c_fc.weight"].T + sd[p + "mlp.c_fc.bias"]
    h = h * torch.sigmoid(1.702 * h)
    return x + h @ sd[p + "mlp.c_proj.weight"].T + sd[p + "mlp.c_proj.bias"]


def ref_vit(img, sd, p="visual_encoder.visual."):
    sd = {k[len(p):]: v.float() for k, v in sd.items() if k.startswith(p)}
    W, _, P, _ = sd["conv1.weight"].shape
    g = img.shape[-1] // P
    patches = img.reshape(3, g, P, g, P).permute(1, 3, 0, 2, 4).reshape(g * g, 3 * P * P)  # row-major patch order
    x = torch.cat([sd["class_embedding"][None], patches @ sd["conv1.weight"].reshape(W, -1).T])
    x = ref_ln(x + sd["positional_embedding"], sd["ln_pre.weight"], sd["ln_pre.bias"], 1e-5)
    for i in range(len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})):
        x = ref_clip_block(x, sd, f"transformer.resblocks.{i}.", max(1, W // 64))
    return ref_ln(x[0], sd["ln_post.weight"], sd["ln_post.bias"], 1e-5) @ sd["proj"]


def ref_video(video, sd):
    # the original VisualEncoder: ViT per frame, h = TT(x + P) + x, mean of normalised h; frames = raw x
    out_v, out_f = [], []
    for clip_frames in video:
        x = torch.stack([ref_vit(fr, sd) for fr in clip_frames])  # (T, E)
        h = x
        if "visual_encoder.frame_position_embeddings.weight" in sd:
            t = x + sd["visual_encoder.frame_position_embeddings.weight"].float()[:x.shape[0]]
            for i in range(len({k.split(".")[3] for k in sd if ".temporal_transformer.resblocks." in k})):
                t = ref_clip_block(t, {k: v.float() for k, v in sd.items()},
                                   f"visual_encoder.temporal_transformer.resblocks.{i}.", max(1, E // 64), eps=1e-12)
            h = t + x
        out_v.append(F.normalize(F.normalize(h, dim=-1).mean(0), dim=-1))
        out_f.append(F.normalize(x, dim=-1))
    return torch.stack(out_v), torch.stack(out_f)


def ref_clip_text(ids, sd, p="text_encoder."):
    sd = {k[len(p):]: v.float() for k, v in sd.items() if k.startswith(p)}
    W = sd["ln_final.weight"].shape[0]
    out = []
    for row in ids:
        x = sd["token_embedding.weight"][row] + sd["positional_embedding"][:len(row)]
        for i in range(len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})):
            x = ref_clip_block(x, sd, f"transformer.resblocks.{i}.", max(1, W // 64), causal=True)
        x = ref_ln(x, sd["ln_final.weight"], sd["ln_final.bias"], 1e-5)
        out.append(x[row.argmax()] @ sd["text_projection"])  # the original pools at argmax(ids) = EOT
    return F.normalize(torch.stack(out), dim=-1)


def ref_bert_text(ids, mask, sd, p="text_encoder.chinese_encoder."):
    b = {k[len(p):]: v.float() for k, v in sd.items() if k.startswith(p)}
    H = b["embeddings.word_embeddings.weight"].shape[1]
    out = []
    for row, keep in zip(ids, mask):
        x = b["embeddings.word_embeddings.weight"][row] + b["embeddings.position_embeddings.weight"][:len(row)] + \
            b["embeddings.token_type_embeddings.weight"][0]
        x = ref_ln(x, b["embeddings.LayerNorm.weight"], b["embeddings.LayerNorm.bias"], 1e-12)
        for i in range(len({k.split(".")[2] for k in b if k.startswith("encoder.layer.")})):
            q = lambda n: b[f"encoder.layer.{i}.{n}"]
            a = ref_attention(x, q("attention.self.query.weight"), q("attention.self.query.bias"),
                              q("attention.self.key.weight"), q("attention.self.key.bias"),
                              q("attention.self.value.weight"), q("attention.self.value.bias"), H // 64, key_ok=keep)
            x = ref_ln(x + a @ q("attention.output.dense.weight").T + q("attention.output.dense.bias"),
                       q("attention.output.LayerNorm.weight"), q("attention.output.LayerNorm.bias"), 1e-12)
            h = x @ q("intermediate.dense.weight").T + q("intermediate.dense.bias")
            h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
            x = ref_ln(x + h @ q("output.dense.weight").T + q("output.dense.bias"),
                       q("output.LayerNorm.weight"), q("output.LayerNorm.bias"), 1e-12)
        pooled = torch.tanh(x[0] @ b["pooler.dense.weight"].T + b["pooler.dense.bias"])
        out.append(pooled @ sd["text_encoder.text_proj.weight"].float().T + sd["text_encoder.text_proj.bias"].float())
    return F.normalize(torch.stack(out), dim=-1)


def original_state_dict(text="clip", temporal=True, seed=0):
    """A synthetic state dict in the original BirdModel layout, fp16 where the original stores fp16."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, std=0.1: (torch.randn(*s, generator=g) * std)
    half = lambda x: x.half()  # conv / linear / attention / projection matrices were fp16
    sd = {}

    def block(p, D):
        sd.update({p + "attn.in_proj_weight": half(r(3 * D, D)), p + "attn.in_proj_bias": half(r(3 * D)),
                   p + "attn.out_proj.weight": half(r(D, D)), p + "attn.out_proj.bias": half(r(D)),
                   p + "ln_1.weight": 1 + r(D), p + "ln_1.bias": r(D),
                   p + "ln_2.weight": 1 + r(D), p + "ln_2.bias": r(D),
                   p + "mlp.c_fc.weight": half(r(4 * D, D)), p + "mlp.c_fc.bias": half(r(4 * D)),
                   p + "mlp.c_proj.weight": half(r(D, 4 * D)), p + "mlp.c_proj.bias": half(r(D))})

    W, P, grid = 128, 8, RES // 8
    v = "visual_encoder.visual."
    sd.update({v + "conv1.weight": half(r(W, 3, P, P)), v + "class_embedding": r(W),
               v + "positional_embedding": r(grid * grid + 1, W),
               v + "ln_pre.weight": 1 + r(W), v + "ln_pre.bias": r(W),
               v + "ln_post.weight": 1 + r(W), v + "ln_post.bias": r(W), v + "proj": half(r(W, E))})
    block(v + "transformer.resblocks.0.", W)
    if temporal:
        for i in range(2):
            block(f"visual_encoder.temporal_transformer.resblocks.{i}.", E)
        sd["visual_encoder.frame_position_embeddings.weight"] = r(48, E, std=1.0)
    if text == "clip":
        t, Wt = "text_encoder.", 128
        sd.update({t + "token_embedding.weight": r(VOCAB_CLIP, Wt), t + "positional_embedding": r(16, Wt),
                   t + "ln_final.weight": 1 + r(Wt), t + "ln_final.bias": r(Wt), t + "text_projection": half(r(Wt, E))})
        block(t + "transformer.resblocks.0.", Wt)
        block(t + "transformer.resblocks.1.", Wt)
    else:
        c, H, I = "text_encoder.chinese_encoder.", 128, 96
        sd.update({c + "embeddings.word_embeddings.weight": r(VOCAB_BERT, H), c + "embeddings.position_ids":
                   torch.arange(20)[None], c + "embeddings.position_embeddings.weight": r(20, H),
                   c + "embeddings.token_type_embeddings.weight": r(2, H),
                   c + "embeddings.LayerNorm.weight": 1 + r(H), c + "embeddings.LayerNorm.bias": r(H),
                   c + "pooler.dense.weight": r(H, H), c + "pooler.dense.bias": r(H),
                   "text_encoder.text_proj.weight": r(E, H), "text_encoder.text_proj.bias": r(E)})
        l = c + "encoder.layer.0."
        for n, shape in [("attention.self.query", (H, H)), ("attention.self.key", (H, H)),
                         ("attention.self.value", (H, H)), ("attention.output.dense", (H, H)),
                         ("intermediate.dense", (I, H)), ("output.dense", (H, I))]:
            sd[l + n + ".weight"], sd[l + n + ".bias"] = r(*shape), r(shape[0])
        for n in ("attention.output.LayerNorm", "output.LayerNorm"):
            sd[l + n + ".weight"], sd[l + n + ".bias"] = 1 + r(H), r(H)
    return sd


@pytest.mark.parametrize("text,temporal", [("clip", True), ("clip", False), ("bert", True)])
def test_from_original_matches_reference(text, temporal, tmp_path, capsys):
    sd = original_state_dict(text, temporal)
    path = tmp_path / "pytorch_model.bin.4"
    torch.save(sd, path)
    m = M.HMMC.from_original(str(path)).eval()
    cfg = m.cfg
    assert cfg.text_encoder == text and cfg.use_temp == temporal and cfg.clip.embed_dim == E
    assert cfg.clip.vision_width == 128 and cfg.clip.image_resolution == RES
    if temporal:
        assert cfg.temporal_layers == 2 and cfg.max_frames == 48
    b = make_batch(2, text, frames=3)
    if text == "clip":
        ref_t = ref_clip_text(b["ids"], sd)  # make_batch ends each caption with EOT, the largest id (as in CLIP)
    else:
        ref_t = ref_bert_text(b["ids"], b["mask"], sd)
    with torch.no_grad():
        t = m.encode_text(b["ids"], b["mask"])
        v, f = m.encode_video(b["video"])
    ref_v, ref_f = ref_video(b["video"], sd)
    tol = dict(atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(t, ref_t, **tol)
    torch.testing.assert_close(v, ref_v, **tol)
    torch.testing.assert_close(f, ref_f, **tol)
    assert all(p.dtype == torch.float32 for p in m.parameters())


def test_from_original_drops_pretraining_parts_and_rejects_unknown_keys():
    sd = original_state_dict("clip", True)
    extra = {"visual_encoder_k.visual.proj": sd["visual_encoder.visual.proj"], "queue_v_cross_ng": torch.randn(E, 8),
             "v_projector.linear_out.weight": torch.randn(E, 16), "cls.bias": torch.randn(5)}
    # learned scalars that earlier commits of the original saved (nn.Parameters then): dropped, never loaded
    extra.update({"logit_scale": torch.tensor([2.66]), "weight_sum": torch.tensor([0.5]),
                  "text_encoder.logit_scale": torch.tensor(4.6), "visual_encoder.logit_scale": torch.tensor(4.6)})
    m = M.HMMC.from_original({**sd, **extra})
    assert not m.cfg.pretrain
    assert not hasattr(m, "logit_scale") and m.similarity_scale() == 100.0
    with pytest.raises(ValueError, match="unrecognised keys.*bogus"):
        M.HMMC.from_original({**sd, "bogus.weight": torch.zeros(1)})


def test_from_original_temporal_layernorm_eps():
    # tiny frame embeddings make the temporal LayerNorm's eps visible: the original's TF-style LayerNorm uses 1e-12,
    # and torch's default 1e-5 would move the video embedding by ~1e-1 here
    sd = original_state_dict("clip", True)
    for k in ("visual_encoder.visual.ln_post.weight", "visual_encoder.visual.ln_post.bias",
              "visual_encoder.frame_position_embeddings.weight"):
        sd[k] = sd[k] * 1e-3
    m = M.HMMC.from_original(sd).eval()
    b = make_batch(2, "clip", frames=3)
    with torch.no_grad():
        v, _ = m.encode_video(b["video"])
    torch.testing.assert_close(v, ref_video(b["video"], sd)[0], atol=2e-4, rtol=1e-4)


def test_original_state_dict_takes_its_protocol_from_the_eval_config(tmp_path):
    # an original state dict has no training config: top-k frames, caption length and the [UNK] input come from the
    # eval config file (the released MSR-VTT model was scored with top-2 frames, not the default 3)
    import configurator
    import eval as ev
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = tmp_path / "pytorch_model.bin.4"
    torch.save(original_state_dict("clip", True), path)
    net, info = M.load_model(str(path))
    ckpt_config = (info["checkpoint"] or {}).get("config") or {}
    defaults = {k: getattr(ev, k) for k in ev.config_keys}

    def settings(*argv):
        cfg = configurator.configure(defaults, [*argv, f"--init_from={path}"], prog="eval.py")
        return cfg, ev._settings(cfg, net.cfg, ckpt_config)

    cfg, s = settings(os.path.join(root, "config", "eval_original_msrvtt.py"))
    assert (s["top_k_frames"], s["context_length"], s["num_frames"], s["image_size"]) == (2, 32, 12, 224)
    assert settings()[1]["top_k_frames"] == 3  # no eval config: the original's default
    cfg, s = settings(os.path.join(root, "config", "eval_original_vatex_zh.py"))
    assert cfg["bert_unk_input"] is True and s["top_k_frames"] == 3 and s["caption_field"] == "captions_zh"
    assert settings()[0]["bert_unk_input"] is False  # checkpoints trained here read [CLS] ... [SEP]


def test_similarity_runs_without_tf32_and_restores_the_flag():
    # the ranking is computed in full fp32 whatever the caller's TF32 setting, which is left as it was
    g = torch.Generator().manual_seed(0)
    t, v, f = torch.randn(5, E, generator=g), torch.randn(7, E, generator=g), torch.randn(7, 3, E, generator=g)
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        sim = M.hierarchical_similarity(t, v, f, top_k=2, frame_match_weight=1.0)
        assert torch.backends.cuda.matmul.allow_tf32 is True
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    tn, vn, fn = (F.normalize(x.double(), dim=-1) for x in (t, v, f))
    want = 100 * (tn @ vn.T + torch.einsum("qe,vte->qvt", tn, fn).topk(2, dim=-1).values.mean(-1))
    assert torch.allclose(sim.double(), want, atol=1e-4)
