"""
HMMC: a video encoder (CLIP's ViT per frame, then a temporal transformer), a text encoder (CLIP's text tower or the
Chinese BERT), hierarchical matching (video similarity + the mean of the top-k frame similarities), the fine-tuning
loss and the momentum-contrast pre-training (FAM, VTM, FTM, MLM). `load_model` is the one way from an `init_from` to
a model. The towers and the readers of every weight file are in towers.py.

>>> net, info = load_model("out-synthetic/ckpt.pt")      # info["message"]: what was loaded, what was dropped
>>> net = HMMC.from_original("pytorch_model.bin.4")      # a released HMMC fine-tuning checkpoint
>>> video_emb, frame_emb = net.encode_video(video)      # video: uint8 RGB frames (B, T, 3, 224, 224)
>>> text_emb = net.encode_text(ids, mask)              # ids, mask from tokenizer.get_tokenizer(...)(texts, 32)
"""
import copy
import math
import os
from collections import OrderedDict
from dataclasses import asdict, dataclass, replace

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from towers import (BertConfig, BertModel, CLIPConfig, TextTransformer, Transformer, VisionTransformer,
                    convert_original, load_bert_state_dict, load_checked, load_clip_state_dict, read_checkpoint,
                    strip_prefixes)
from towers import load_clip  # noqa: F401 (model.load_clip is how users load OpenAI's CLIP)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # the RGB statistics CLIP's image tower was trained with
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def normalize_frames(frames: torch.Tensor) -> torch.Tensor:
    """uint8 RGB [..., 3, H, W] -> float32 CLIP-normalised (loaders move uint8, 4x less); floats pass as they are."""
    if frames.dtype != torch.uint8:
        return frames
    if frames.dim() < 3 or frames.shape[-3] != 3:
        raise ValueError(f"expected RGB frames [..., 3, H, W], got shape {tuple(frames.shape)}")
    mean = torch.tensor(CLIP_MEAN, device=frames.device, dtype=torch.float32).view(3, 1, 1) * 255
    std = torch.tensor(CLIP_STD, device=frames.device, dtype=torch.float32).view(3, 1, 1) * 255
    return (frames.to(torch.float32) - mean) / std


# -----------------------------------------------------------------------------------------------------------------
# Shape letters: B videos, T frames, L tokens, E joint embedding, K queue length, G global batch (all ranks).

@dataclass
class HMMCConfig:
    clip: CLIPConfig | dict | None = None  # CLIP towers (ViT-B/32 shapes by default); E = clip.embed_dim
    bert: BertConfig | dict | None = None  # Chinese text tower, required when text_encoder == "bert"
    text_encoder: str = "clip"  # "clip" (English) | "bert" (Chinese BERT + Linear hidden -> E)
    bert_pooling: str = "cls"  # "cls": BERT's pooler on [CLS], as released | "mean" of the token states
    # video encoder
    use_temp: bool = True  # temporal transformer over the frame embeddings
    temporal_layers: int = 4
    temporal_heads: int = 0  # 0 -> E // 64 (8 for E = 512, as the original)
    max_frames: int = 48  # rows of the frame position table
    temporal_init: str = "default"  # "default" (PyTorch init, N(0,1) positions, as released) | "clip" (CLIP4Clip)
    # fine-tuning loss
    use_frame_fea: bool = True  # frame-text matching term (training) / frame term (eval)
    weight_video: float = 0.85
    weight_frame: float = 0.15
    sim_scale: float = 100.0  # similarity scale s in s*cos (a constant in the original)
    learn_sim_scale: bool = False  # learn log(s), clamped to <= 100, CLIP4Clip style
    # pre-training
    pretrain: bool = False
    use_tags: bool = True  # paper behaviour; the released code ran title-only
    num_frames: int = 12  # frames per clip in pre-training batches (sizes the frame queues)
    queue_size: int = 1024  # K; must be a multiple of the global batch
    momentum: float = 0.99
    temperature: float = 0.07
    proj_hidden: int = 4096
    weight_fam: float = 0.05
    weight_vtm: float = 0.45
    weight_ftm: float = 0.45
    weight_mlm: float = 0.05
    mlm_prob: float = 0.15
    mlm_mask_id: int = 103  # [MASK] of hfl/chinese-roberta-wwm-ext; train sets it from the tokenizer
    mlm_special_ids: tuple = (0, 101, 102)  # [PAD], [CLS], [SEP]: never masked
    # fidelity switches: the original stored CLIP matrices in fp16 and trained them at ~1e-7, i.e. not at all
    freeze_clip_vision: bool = False
    freeze_clip_text: bool = False

    def __post_init__(self):
        self.clip = CLIPConfig(**self.clip) if isinstance(self.clip, dict) else self.clip or CLIPConfig()
        self.bert = BertConfig(**self.bert) if isinstance(self.bert, dict) else self.bert
        self.mlm_special_ids = tuple(self.mlm_special_ids)

    def to_dict(self) -> dict:
        # nested dataclasses become dicts, the tuple a list: plain types for weights_only checkpoints
        return {**asdict(self), "mlm_special_ids": list(self.mlm_special_ids)}

    @classmethod
    def from_dict(cls, d: dict) -> "HMMCConfig":
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown HMMCConfig keys {unknown}; valid keys: {sorted(cls.__dataclass_fields__)}")
        return cls(**d)


# ---- distributed helpers --------------------------------------------------------------------------------------------

def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every rank's rows concatenated in rank order (no gradient); each rank must pass the same shape."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)  # (W*n, ...) in rank order


class _AllGatherSumGrad(torch.autograd.Function):
    # every rank computes the same global loss; its local slice gets the gradient SUMMED over ranks, so after DDP's
    # average the gradients equal one process's on the global batch (CLIP4Clip's local slice is W times smaller)

    @staticmethod
    def forward(ctx, x):
        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        return all_gather_rows(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()  # all_reduce is in place; autograd may reuse grad elsewhere
        dist.all_reduce(grad)  # gloo has no reduce_scatter; all_reduce + slice is the same sum
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather rows across ranks keeping gradients (summed back); the same row count on every rank."""
    return _AllGatherSumGrad.apply(x) if _distributed() else x


# ---- similarity and loss primitives ---------------------------------------------------------------------------------

def _no_autocast(x: torch.Tensor):
    # similarities scaled by 100 (or 1/0.07) in bf16 would move by ~0.5, enough to reorder close candidates: fp32
    return torch.autocast(x.device.type, enabled=False)


def hierarchical_similarity(text_emb: torch.Tensor, video_emb: torch.Tensor, frame_emb: torch.Tensor, top_k: int,
                            frame_match_weight: float, chunk_size: int | None = None, normalized: bool = False):
    """100 cos(t, v) + frame_match_weight * mean of the top-k (1..T) 100 cos(t, frame), fp32 (Q, V); `normalized`:
    unit vectors already (a search index). Chunks of queries keep the (chunk, V, T) tensor near 2^25 elements."""
    text_emb, video_emb, frame_emb = (x.float() if normalized else F.normalize(x.float(), dim=-1)
                                      for x in (text_emb, video_emb, frame_emb))  # (Q, E), (V, E), (V, T, E)
    V, T, E = frame_emb.shape
    frames = frame_emb.reshape(V * T, E)
    k = max(1, min(top_k, T))
    chunk_size = chunk_size or max(1, (1 << 25) // max(1, V * T))
    out = torch.empty(text_emb.shape[0], V, device=text_emb.device)  # (Q, V)
    # TF32 keeps 10 mantissa bits: near-ties among 1,000 videos decide R@1, so the ranking is computed in full fp32
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with _no_autocast(text_emb):
            for i in range(0, text_emb.shape[0], chunk_size):
                t = text_emb[i:i + chunk_size]  # (c, E)
                sim = t @ video_emb.T  # (c, V)
                if frame_match_weight != 0:
                    sim_frame = (t @ frames.T).view(-1, V, T)  # (c, V, T)
                    # a caption usually describes a few moments of a clip: keep the best-matching frames only
                    sim = sim + frame_match_weight * sim_frame.topk(k, dim=-1).values.mean(dim=-1)
                out[i:i + chunk_size] = 100 * sim
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return out


def queue_contrastive_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo's CL(q, k, Q): CE of the positive q.k against the queue's negatives. k (n, E), or (n, r, E) for r
    positives sharing their query's (n, M) negative logits (the mean over the r losses)."""
    with _no_autocast(q):
        # 1/tau in q and CE as logsumexp - positive: the big (n, M) logits are never divided or concatenated
        q = F.normalize(q.float(), dim=-1) / temperature  # (n, E)
        k = F.normalize(k.float(), dim=-1)
        pos = torch.einsum("ne,n...e->n...", q, k)  # (n,) or (n, r)
        lse_neg = torch.logsumexp(q @ queue.float().T, dim=1)  # (n,)
        lse_neg = lse_neg.view(-1, *[1] * (pos.dim() - 1))  # broadcast over the r positives
        return (torch.logaddexp(pos, lse_neg) - pos).mean()


def mask_tokens(ids: torch.Tensor, vocab_size: int, mask_id: int, special_ids, prob: float = 0.15,
                attention_mask: torch.Tensor | None = None, generator: torch.Generator | None = None):
    """BERT masking: a position (not special, not padding) is chosen with `prob`, then becomes [MASK] 80%, a random
    id 10%, unchanged 10%. Returns (masked_ids, labels), labels -100 where not chosen."""
    special = torch.isin(ids, torch.tensor(special_ids, device=ids.device))
    if attention_mask is not None:
        special |= attention_mask == 0
    kw = dict(device=ids.device, generator=generator)
    chosen = (torch.rand(ids.shape, **kw) < prob) & ~special  # (B, L)
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    action = torch.rand(ids.shape, **kw)  # one draw decides mask / random / keep
    random_ids = torch.randint(vocab_size, ids.shape, dtype=ids.dtype, **kw)
    out = torch.where(chosen & (action < 0.8), torch.full_like(ids, mask_id), ids)
    out = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, out)
    return out, labels


# ---- modules --------------------------------------------------------------------------------------------------------

class VideoEncoder(nn.Module):
    """CLIP ViT per frame x, h = TT(x + P) + x as the original; returns (mean_t normalise(h) (B, E), x (B, T, E))."""

    def __init__(self, cfg: HMMCConfig):
        super().__init__()
        E = cfg.clip.embed_dim
        self.visual = VisionTransformer(cfg.clip)
        self.use_temp = cfg.use_temp
        if cfg.use_temp:
            heads = cfg.temporal_heads or max(1, E // 64)
            # eps 1e-12: the original's TF-style LayerNorm in the temporal blocks
            self.temporal = Transformer(E, cfg.temporal_layers, heads, eps=1e-12)
            self.frame_position_embeddings = nn.Embedding(cfg.max_frames, E)  # N(0, 1) init, as released

    def forward(self, video: torch.Tensor):
        B, T = video.shape[:2]
        x = self.visual(video.reshape(B * T, *video.shape[2:])).reshape(B, T, -1)  # (B, T, E)
        h = x
        if self.use_temp:
            if T > self.frame_position_embeddings.num_embeddings:
                raise ValueError(f"{T} frames but the frame position table has "
                                 f"{self.frame_position_embeddings.num_embeddings} rows (max_frames)")
            h = self.temporal(x + self.frame_position_embeddings.weight[:T]) + x  # (B, T, E)
        video_emb = F.normalize(h, dim=-1).mean(dim=1)  # (B, E); consumers normalise it again
        return video_emb, x


class BertTextEncoder(nn.Module):
    """Chinese BERT + Linear(hidden -> E) of its pooled state."""

    def __init__(self, bert_cfg: BertConfig, embed_dim: int, pooling: str = "cls"):
        super().__init__()
        self.pooling = pooling
        self.bert = BertModel(bert_cfg, pooler=pooling == "cls")
        self.text_proj = nn.Linear(bert_cfg.hidden_size, embed_dim)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        last, pooled = self.bert(ids, mask)  # (B, L, H), (B, H) or None
        if self.pooling == "mean":
            keep = mask.to(last.dtype).unsqueeze(-1)  # (B, L, 1)
            pooled = (last * keep).sum(1) / keep.sum(1).clamp(min=1)
        return self.text_proj(pooled)  # (B, E)


def _mlp(dim: int, hidden: int) -> nn.Sequential:
    # MoBY projector / predictor: Linear-BN-ReLU-Linear; train converts BN to SyncBN under DDP on CUDA
    return nn.Sequential(nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim))


class HMMC(nn.Module):
    """Encoders `video` and `text`; pre-training adds momentum copies (`*_m`), projector MLPs, MLM head and queues."""

    def __init__(self, cfg: HMMCConfig):
        super().__init__()
        # every check of a config is here, before anything is built; first the choices of the string fields
        for name, choices in {"text_encoder": ("clip", "bert"), "bert_pooling": ("cls", "mean"),
                              "temporal_init": ("default", "clip")}.items():
            if getattr(cfg, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(cfg, name)!r}")
        if cfg.pretrain and cfg.text_encoder == "clip" and cfg.weight_mlm > 0:
            raise ValueError("MLM pre-training needs the bidirectional BERT text encoder; the CLIP text tower is "
                             "causal. Set weight_mlm=0 for English pre-training (the released English run did).")
        if cfg.freeze_clip_text and cfg.text_encoder != "clip":
            raise ValueError("freeze_clip_text freezes the CLIP text tower, but text_encoder='bert'")
        self.cfg = cfg
        E = cfg.clip.embed_dim
        self.video = VideoEncoder(cfg)
        self.text = (TextTransformer(cfg.clip) if cfg.text_encoder == "clip"
                     else BertTextEncoder(cfg.bert, E, cfg.bert_pooling))
        if cfg.learn_sim_scale and not cfg.pretrain:  # pre-training uses tau, never s: DDP would see it unused
            self.logit_scale = nn.Parameter(torch.tensor(math.log(cfg.sim_scale)))
        towers = ([self.video.visual] if cfg.freeze_clip_vision else []) + ([self.text] if cfg.freeze_clip_text else [])
        for tower in towers:
            for n, p in tower.named_parameters():
                # the tensors the original stored in fp16 (conv, attention, MLP, projections), which never moved
                if ".attn." in n or ".mlp." in n or n.endswith(("conv1.weight", "proj", "text_projection")):
                    p.requires_grad_(False)
        if cfg.pretrain:
            self._build_pretrain(cfg, E)

    def _build_pretrain(self, cfg: HMMCConfig, E: int):
        self.use_fam = cfg.weight_fam > 0
        self.use_mlm = cfg.weight_mlm > 0
        # heads whose loss is off are not built, so DDP never sees parameters without gradients
        if self.use_fam:
            self.projector = _mlp(E, cfg.proj_hidden)
            self.predictor = _mlp(E, cfg.proj_hidden)
        if self.use_mlm:
            self.mlm_head = nn.Sequential(OrderedDict(  # BERT's LM head on the projected hidden states
                dense=nn.Linear(E, E), gelu=nn.GELU(), ln=nn.LayerNorm(E, eps=1e-12),
                decoder=nn.Linear(E, cfg.bert.vocab_size)))
        # momentum encoders: EMA copies that produce the queue keys; never receive gradients
        self.video_m = copy.deepcopy(self.video)
        self.text_m = copy.deepcopy(self.text)
        if self.use_fam:
            self.projector_m = copy.deepcopy(self.projector)
        for p in self._momentum_params()[1]:
            p.requires_grad_(False)
        # one pointer, one buffer per key stream; frame streams hold num_frames rows per video
        K, T = cfg.queue_size, cfg.num_frames
        used = {"tag": cfg.use_tags, "frame": cfg.use_frame_fea, "frame_proj": self.use_fam}
        rows = {"video": 1, "title": 1, "tag": 1, "frame": T, "frame_proj": T}
        self.queue_rows = {name: r for name, r in rows.items() if used.get(name, True)}
        for name, rows in self.queue_rows.items():
            self.register_buffer(f"queue_{name}", F.normalize(torch.randn(K * rows, E), dim=-1))  # (K*rows, E)
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def similarity_scale(self):
        """s in s*cos: the original's constant 100, or exp(learned log s) clamped to 100."""
        if getattr(self, "logit_scale", None) is not None:
            return self.logit_scale.exp().clamp(max=100.0)
        return self.cfg.sim_scale

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text(ids, mask).float(), dim=-1)  # (N, E)

    def encode_video(self, video: torch.Tensor):
        """video (B, T, 3, H, W) -> unit (video_emb (B, E), frame_emb (B, T, E)), frames before the temporal module."""
        video_emb, frames = self.video(normalize_frames(video))
        return F.normalize(video_emb.float(), dim=-1), F.normalize(frames.float(), dim=-1)

    def forward(self, batch: dict):
        """(loss, parts): detached scalars {"video", "frame"}, or {"fam", "vtm", "ftm", "mlm"} in pre-training."""
        return self._pretrain_loss(batch) if self.cfg.pretrain else self._finetune_loss(batch)

    def _finetune_loss(self, batch: dict):
        cfg = self.cfg
        text_emb = self.encode_text(batch["ids"], batch["mask"])  # (B, E)
        video_emb, frame_emb = self.encode_video(batch["video"])  # (B, E), (B, T, E)
        # every rank computes the same loss over the global batch; gradients are summed back to their rank
        text_emb, video_emb, frame_emb = (gather_with_grad(x) for x in (text_emb, video_emb, frame_emb))
        G, T = frame_emb.shape[:2]
        with _no_autocast(text_emb):
            s = self.similarity_scale()
            labels = torch.arange(G, device=text_emb.device)
            logits = s * text_emb @ video_emb.T  # (G, G) text x video
            # symmetric CE, summed (not halved) as in the original
            loss_video = F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)
            loss = cfg.weight_video * loss_video
            parts = {"video": loss_video.detach(), "frame": torch.zeros((), device=loss.device)}
            if cfg.use_frame_fea:
                # frame-text matching: each frame position t is its own "video" candidate set; batched over t
                logits_f = s * torch.einsum("ie,jte->tij", text_emb, frame_emb)  # (T, G, G)
                labels_f = labels.repeat(T)  # (T*G,)
                # all T blocks have G rows, so one mean over T*G rows is the mean over t of the per-position losses
                loss_frame = F.cross_entropy(logits_f.reshape(T * G, G), labels_f) + \
                    F.cross_entropy(logits_f.transpose(1, 2).reshape(T * G, G), labels_f)
                loss = loss + cfg.weight_frame * loss_frame
                parts["frame"] = loss_frame.detach()
        return loss, parts

    def _pretrain_loss(self, batch: dict):
        cfg = self.cfg
        B, T = batch["video"].shape[:2]
        if T != cfg.num_frames:
            raise ValueError(f"pre-training batch has {T} frames but the frame queues were sized for "
                             f"num_frames={cfg.num_frames}")
        use_tags = cfg.use_tags
        # snapshot the queues: the enqueue below writes them in place, but backward still needs the values used here
        queues = {name: getattr(self, f"queue_{name}").clone() for name in self.queue_rows}
        CL = lambda q, k, name: queue_contrastive_loss(q, k, queues[name], cfg.temperature)
        zero = torch.zeros((), device=batch["video"].device)

        # online features
        video = normalize_frames(batch["video"])  # (B, T, 3, H, W)
        v, frames = self.video(video)  # (B, E), (B, T, E) raw pre-temporal frames
        title = self.text(batch["ids"], batch["mask"])  # (B, E)
        tag = self.text(batch["tag_ids"], batch["tag_mask"]) if use_tags else None
        if self.use_fam:
            pred = self.predictor(self.projector(frames.reshape(B * T, -1))).reshape(B, T, -1)  # (B, T, E)

        # momentum keys: no gradient; the momentum encoders run in train mode as in the original
        proj_m = None
        with torch.no_grad():
            v_m, frames_m = self.video_m(video)  # (B, E), (B, T, E)
            title_m = self.text_m(batch["ids"], batch["mask"])  # (B, E)
            tag_m = self.text_m(batch["tag_ids"], batch["tag_mask"]) if use_tags else None
            if self.use_fam:
                proj_m = self.projector_m(frames_m.reshape(B * T, -1)).reshape(B, T, -1)  # (B, T, E)

        # FAM, frame adjacency: prediction of frame t vs momentum projection of t+1 and back, in one batch; the
        # original sums the directions and averages over pairs: twice the mean over all 2(T-1)B rows
        loss_fam = zero
        if self.use_fam and T > 1:
            q = torch.cat([pred[:, :-1], pred[:, 1:]], dim=1)  # (B, 2(T-1), E)
            k = torch.cat([proj_m[:, 1:], proj_m[:, :-1]], dim=1)  # (B, 2(T-1), E)
            loss_fam = 2 * CL(q.reshape(-1, q.shape[-1]), k.reshape(-1, k.shape[-1]), "frame_proj")

        # VTM, video-text matching, both directions through the queues; with tags, the average of title and tag
        loss_vtm = CL(v, title_m, "title") + CL(title, v_m, "video")
        if use_tags:
            loss_vtm = 0.5 * (loss_vtm + CL(v, tag_m, "tag") + CL(tag, v_m, "video"))

        # FTM, frame-text matching: text vs each momentum frame, each frame vs the momentum text
        loss_ftm = zero
        if cfg.use_frame_fea:
            def ftm(c, c_m, queue):
                # the T momentum frames are T positives of one text: its (B, K*T) negative logits are computed once
                c_m_rows = c_m[:, None].expand(B, T, c_m.shape[-1]).reshape(B * T, -1)  # (B*T, E)
                return CL(c, frames_m, "frame") + CL(frames.reshape(B * T, -1), c_m_rows, queue)
            loss_ftm = ftm(title, title_m, "title")
            if use_tags:
                loss_ftm = 0.5 * (loss_ftm + ftm(tag, tag_m, "tag"))

        # keys enter the queues after the losses, so a queue never holds its batch; eval mode leaves them alone
        if self.training:
            keys = {"video": v_m, "title": title_m, "tag": tag_m, "frame": frames_m, "frame_proj": proj_m}
            self._enqueue({name: keys[name] for name in self.queue_rows})

        # MLM on the online text encoder (a separate pass over masked ids; Chinese BERT only)
        loss_mlm = zero
        if self.use_mlm:
            loss_mlm = self._mlm_loss(batch["ids"], batch["mask"])
            if use_tags:
                loss_mlm = 0.5 * (loss_mlm + self._mlm_loss(batch["tag_ids"], batch["tag_mask"]))

        loss = cfg.weight_fam * loss_fam + cfg.weight_vtm * loss_vtm + cfg.weight_ftm * loss_ftm + \
            cfg.weight_mlm * loss_mlm
        parts = {"fam": loss_fam, "vtm": loss_vtm, "ftm": loss_ftm, "mlm": loss_mlm}
        return loss, {k: x.detach() for k, x in parts.items()}

    def _mlm_loss(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        masked, labels = mask_tokens(ids, cfg.bert.vocab_size, cfg.mlm_mask_id, cfg.mlm_special_ids, cfg.mlm_prob,
                                     attention_mask=mask)
        logits = self.mlm_head(self.text.text_proj(self.text.bert(masked, mask)[0]))  # (B, L, vocab)
        # mean over masked tokens; a batch with none gives 0 rather than NaN (and needs no host sync)
        total = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
        return total / (labels != -100).sum().clamp(min=1)

    @torch.no_grad()
    def _enqueue(self, keys: dict):
        # every rank writes the same global batch, so the queues stay equal. The pointer stays on the device: reading
        # it would stall the host every step and split torch.compile's graph
        K = self.cfg.queue_size
        for name, x in keys.items():
            x = all_gather_rows(x.float()) if _distributed() else x.float()  # (G, E) or (G, T, E)
            G, rows = x.shape[0], self.queue_rows[name]
            if K % G != 0:  # then every write stays inside the queue
                raise ValueError(f"queue_size={K} must be a multiple of the global batch ({G} videos)")
            at = self.queue_ptr * rows + torch.arange(G * rows, device=x.device)  # rows ptr*r .. (ptr+G)*r - 1
            getattr(self, f"queue_{name}").index_copy_(0, at, F.normalize(x.reshape(G * rows, -1), dim=-1))
        self.queue_ptr.copy_((self.queue_ptr + G) % K)

    def _momentum_params(self):
        online = [self.video, self.text] + ([self.projector] if self.use_fam else [])
        momentum = [self.video_m, self.text_m] + ([self.projector_m] if self.use_fam else [])
        return ([p for m in online for p in m.parameters()], [p for m in momentum for p in m.parameters()])

    @torch.no_grad()
    def momentum_update(self):
        """theta_m <- m theta_m + (1 - m) theta after each optimizer step (the original: every forward); BN
        statistics of the momentum projector come from its own forwards."""
        if self.cfg.pretrain:
            online, momentum = self._momentum_params()
            torch._foreach_lerp_(momentum, online, 1.0 - self.cfg.momentum)

    @torch.no_grad()
    def copy_to_momentum(self):
        """Momentum parameters <- their online twins (after loading weights)."""
        if self.cfg.pretrain:
            online, momentum = self._momentum_params()
            torch._foreach_copy_(momentum, online)

    def configure_optimizers(self, weight_decay: float, learning_rate: float, clip_lr_scale: float, text_lr: float,
                             betas=(0.9, 0.98), eps: float = 1e-6, device_type: str = "cpu"):
        """AdamW over {vision tower, text encoder, new modules} x {decay, none for dim < 2 (the original decayed CLIP's
        ln_* and class_embedding)}; groups carry `name` and `base_lr` for the schedule; frozen parameters stay out."""
        lrs = {"vision": learning_rate * clip_lr_scale, "text": text_lr, "new": learning_rate}
        groups = {(tower, decay): [] for tower in lrs for decay in (True, False)}
        for n, p in self.named_parameters():
            if p.requires_grad:
                tower = "vision" if n.startswith("video.visual.") else "text" if n.startswith("text.") else "new"
                groups[(tower, p.dim() >= 2)].append(p)
        param_groups = [{"params": params, "lr": lrs[tower], "base_lr": lrs[tower],
                         "weight_decay": weight_decay if decay else 0.0,
                         "name": f"{tower}_{'decay' if decay else 'no_decay'}"}
                        for (tower, decay), params in groups.items() if params]
        # the fused kernel (CUDA, and CPU since torch 2.4) is several times faster on the large embedding tables
        return torch.optim.AdamW(param_groups, lr=learning_rate, betas=tuple(betas), eps=eps,
                                 fused=device_type in ("cuda", "cpu"))

    def flops_per_video(self, num_frames: int, context_length: int, tag_context_length: int | None = None) -> float:
        """Training FLOPs per video, PaLM-appendix style: 2 per weight per token + 4 n^2 d per attention layer;
        trained parts cost 3x their forward, momentum parts 1x; element-wise ops and losses (<1%) left out."""
        cfg, c = self.cfg, self.cfg.clip
        E, T = c.embed_dim, num_frames

        def blocks(n, d, layers, ffn=None):  # pre-LN transformer blocks, fused qkv + out + MLP
            ffn = ffn or 4 * d
            return layers * (2 * n * (4 * d * d + 2 * d * ffn) + 4 * n * n * d)

        n_patch = (c.image_resolution // c.vision_patch_size) ** 2
        vit = 2 * n_patch * 3 * c.vision_patch_size ** 2 * c.vision_width + \
            blocks(n_patch + 1, c.vision_width, c.vision_layers) + 2 * c.vision_width * E
        video = T * vit + (blocks(T, E, cfg.temporal_layers) if cfg.use_temp else 0)

        def text(L):
            if cfg.text_encoder == "clip":
                return blocks(L, c.transformer_width, c.transformer_layers) + 2 * c.transformer_width * E
            b = cfg.bert
            return blocks(L, b.hidden_size, b.num_hidden_layers, b.intermediate_size) + \
                2 * b.hidden_size * b.hidden_size + 2 * b.hidden_size * E

        if not cfg.pretrain:
            return 3.0 * (video + text(context_length))
        lengths = [context_length, tag_context_length or context_length] if cfg.use_tags else [context_length]
        fwd_train = fwd_m = video + sum(text(n) for n in lengths)  # the online and the momentum towers
        if self.use_fam:
            mlp = 2 * 2 * E * cfg.proj_hidden  # E -> hidden -> E per frame
            fwd_train += 2 * T * mlp  # projector + predictor
            fwd_m += T * mlp
        if self.use_mlm:  # a second online pass over the masked ids, then the LM head
            fwd_train += sum(text(n) + 2 * n * (E * E + E * cfg.bert.vocab_size) for n in lengths)
        return 3.0 * fwd_train + fwd_m

    @classmethod
    def from_clip(cls, cfg: HMMCConfig, clip_sd: dict, bert_sd: dict | None = None) -> "HMMC":
        """A new HMMC with OpenAI's CLIP (and HF BERT); temporal_init="clip" copies CLIP's text layers (CLIP4Clip)."""
        cfg = replace(cfg, clip=CLIPConfig.from_state_dict(clip_sd))
        model = cls(cfg)
        model.video.visual.load_state_dict({k[len("visual."):]: v for k, v in clip_sd.items()
                                            if k.startswith("visual.")})
        if cfg.text_encoder == "clip":
            model.text.load_state_dict({k: clip_sd[k] for k in model.text.state_dict() if k in clip_sd})
        elif bert_sd is None:
            raise ValueError("text_encoder='bert' needs bert_sd (towers.load_bert_state_dict(path))")
        else:  # mean pooling has no use for the checkpoint's [CLS] pooler
            model.text.bert.load_state_dict({k: v for k, v in bert_sd.items() if k != "embeddings.position_ids"
                                             and not (cfg.bert_pooling == "mean" and k.startswith("pooler."))})
        if cfg.temporal_init == "clip" and cfg.use_temp:  # temporal block i <- text block i, positions <- text's
            temporal, pos = model.video.temporal, model.video.frame_position_embeddings
            blocks = {k: clip_sd["transformer." + k] for k in temporal.state_dict() if "transformer." + k in clip_sd}
            load_checked(temporal, blocks, "temporal_init='clip': CLIP's text tower")
            rows = {"weight": clip_sd["positional_embedding"][:cfg.max_frames]}
            load_checked(pos, rows, "temporal_init='clip': CLIP's text positions")
        model.copy_to_momentum()
        return model

    @classmethod
    def from_original(cls, state_dict_or_path, **overrides) -> "HMMC":
        """A fine-tuning HMMC from the original's state dict or file; `overrides` set other HMMCConfig fields."""
        sd = state_dict_or_path
        arch, ours, _ = convert_original(read_checkpoint(sd) if isinstance(sd, (str, os.PathLike)) else sd)
        model = cls(HMMCConfig.from_dict({**arch, **overrides}))
        load_checked(model, ours, "original checkpoint", optional=("logit_scale",))
        return model


# ---- one function from `init_from` to a model -----------------------------------------------------------------------

_PRETRAIN_ONLY = ("video_m.", "text_m.", "projector.", "projector_m.", "predictor.", "mlm_head.", "queue_")
# what the weights of a checkpoint fix; every other HMMCConfig field may come from the config that loads it
_ARCH_FIELDS = ("clip", "bert", "text_encoder", "bert_pooling")


def load_model(init_from: str, cfg: HMMCConfig | None = None, *, clip_path: str = "", bert_path: str | None = None,
               device="cpu") -> tuple[HMMC, dict]:
    """`init_from`: "scratch", "clip" (CLIP at `clip_path`, HF BERT at `bert_path`), or a checkpoint of train.py or
    the original, which fixes the towers' architecture and `cfg` (default: its own) the rest, so pre-training parts
    are dropped for fine-tuning. -> (model, info: "dropped" keys, "message", "checkpoint" of train.py or None)."""
    info = {"dropped": [], "checkpoint": None}
    if init_from == "scratch":  # "scratch" and "clip" need `cfg`
        with torch.device(device):
            model = HMMC(cfg)
        info["message"] = f"initialised a new model ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M)"
        return model, info
    if init_from == "clip":
        clip_sd, bert_sd = load_clip_state_dict(clip_path), None
        if cfg.text_encoder == "bert":
            if not bert_path:
                raise ValueError("init_from='clip' with text_encoder='bert' needs bert_path (a HF folder such as "
                                 "hfl/chinese-roberta-wwm-ext)")
            bert_sd = load_bert_state_dict(bert_path)
            cfg = replace(cfg, bert=BertConfig.from_json(os.path.join(bert_path, "config.json")))
        info["message"] = f"loaded CLIP from {clip_path}" + (f" and BERT from {bert_path}" if bert_sd else "")
        return HMMC.from_clip(cfg, clip_sd, bert_sd).to(device), info
    ckpt = read_checkpoint(init_from)
    if "model" in ckpt and "model_args" in ckpt:  # train.py's
        saved, sd, ignored = HMMCConfig.from_dict(ckpt["model_args"]), strip_prefixes(ckpt["model"]), []
        info["checkpoint"] = ckpt
    else:  # a bare state dict: the original HMMC's released weights
        arch, sd, ignored = convert_original(ckpt, init_from)
        saved = HMMCConfig(**arch)
    if cfg is not None:
        saved = replace(cfg, **{k: getattr(saved, k) for k in _ARCH_FIELDS})
    model = HMMC(saved)
    dropped = load_checked(model, sd, init_from, droppable=_PRETRAIN_ONLY, optional=("logit_scale",))
    info["dropped"] = ignored + dropped
    parts = sorted({k.split(".")[0] for k in info["dropped"]})
    info["message"] = f"loaded {len(sd) - len(dropped)} tensors from {init_from}" + (
        f"; dropped {len(info['dropped'])} this model has no use for ({', '.join(parts)})" if parts else "")
    return model.to(device), info
