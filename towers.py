"""
The towers HMMC is built from, as their authors define them: OpenAI CLIP's ViT image tower and causal text
transformer, and the Chinese BERT (hfl/chinese-roberta-wwm-ext is a plain BERT-base); then the readers of every weight
file (OpenAI's, HF's, the original HMMC's, train.py's). Rarely edited: tests pin the outputs to open_clip and HF
transformers. Module names copy OpenAI's / HF's state-dict keys (`c_fc`, `ln_final`, `attention.self.query`...), so
`load_state_dict` is the whole loader. Weights stay fp32; callers run under autocast.

>>> clip = load_clip("ViT-B-32.pt")          # OpenAI's archive or a plain state dict; architecture from the shapes
"""
import io
import json
import math
import os
import pickle
import re
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


@dataclass
class CLIPConfig:
    embed_dim: int = 512
    image_resolution: int = 224
    vision_layers: int = 12
    vision_width: int = 768
    vision_patch_size: int = 32
    context_length: int = 77
    vocab_size: int = 49408
    transformer_width: int = 512
    transformer_heads: int = 8
    transformer_layers: int = 12
    eot_id: int = 49407  # end-of-text id used for pooling; CLIP's tokenizer puts it last in the vocabulary

    @property
    def vision_heads(self) -> int:
        # OpenAI ties heads to width (64 per head); tiny custom towers still get one head
        return max(1, self.vision_width // 64)

    @classmethod
    def from_state_dict(cls, sd: dict, text: bool = True) -> "CLIPConfig":
        """The architecture of an OpenAI-layout ViT state dict; text=False: the image tower's only (HMMC with BERT)."""
        if "visual.proj" not in sd and any(k.startswith("visual.layer1.") for k in sd):
            raise ValueError("this is a ResNet CLIP (visual.layer1.* keys, no visual.proj); ResNet CLIP models are "
                             "not supported, use a ViT one (ViT-B/32, ViT-B/16, ViT-L/14, ...)")
        needed = ["visual.conv1.weight", "visual.positional_embedding", "visual.proj"]  # load_checked: the rest
        if text:
            needed += ["text_projection", "positional_embedding", "token_embedding.weight", "ln_final.weight"]
        missing = [k for k in needed if k not in sd]
        if missing:
            raise ValueError(f"not a CLIP ViT state dict: missing keys {missing}")
        # grid*grid patches + 1 class token; another count fails the shape check of the load
        grid = round(math.sqrt(sd["visual.positional_embedding"].shape[0] - 1))
        conv = sd["visual.conv1.weight"]  # (width, 3, patch, patch)
        vision = dict(embed_dim=sd["visual.proj"].shape[1], image_resolution=conv.shape[-1] * grid,
                      vision_layers=_count_layers(sd, "visual.transformer.resblocks."), vision_width=conv.shape[0],
                      vision_patch_size=conv.shape[-1])
        if not text:
            return cls(**vision)
        width = sd["ln_final.weight"].shape[0]
        vocab_size = sd["token_embedding.weight"].shape[0]
        return cls(**vision, context_length=sd["positional_embedding"].shape[0], vocab_size=vocab_size,
                   transformer_width=width, transformer_heads=max(1, width // 64),
                   transformer_layers=_count_layers(sd, "transformer.resblocks."),
                   # OpenAI's vocabulary ends with <|startoftext|>, <|endoftext|>; a small one keeps that order
                   eot_id=min(49407, vocab_size - 1))


def _count_layers(sd: dict, prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x), the GELU approximation CLIP was trained with, as silu(1.702 x) / 1.702: autograd then
    keeps one tensor for backward instead of two (~18% less activation memory for the ViT)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(1.702 * x) * (1 / 1.702)


class Attention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's parameter names, computed by SDPA."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"attention width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))  # packed q, k, v rows
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        # nn.MultiheadAttention's init, which the original's temporal transformer started from
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, is_causal: bool = False):
        B, L, D = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)            # (B, L, 3D)
        q, k, v = qkv.view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, h, L, D/h)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)    # (B, h, L, D/h)
        y = y.transpose(1, 2).reshape(B, L, D)                               # (B, L, D)
        return self.out_proj(y)


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, eps: float = 1e-5):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=eps)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=eps)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, 4 * width), gelu=QuickGELU(),
                                             c_proj=nn.Linear(4 * width, width)))

    def forward(self, x: torch.Tensor, is_causal: bool = False):
        x = x + self.attn(self.ln_1(x), is_causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of blocks `resblocks.{i}`; `grad_checkpointing = True` recomputes activations in backward."""

    def __init__(self, width: int, layers: int, heads: int, eps: float = 1e-5):
        super().__init__()
        self.width, self.layers = width, layers
        self.grad_checkpointing = False
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads, eps) for _ in range(layers)])

    def forward(self, x: torch.Tensor, is_causal: bool = False):
        for block in self.resblocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, is_causal, use_reentrant=False)
            else:
                x = block(x, is_causal)
        return x


def _init_clip_blocks(transformer: Transformer):
    # OpenAI's init (for training from scratch): residual projections shrink with depth so the stream's variance
    # stays put. The temporal Transformer keeps nn.MultiheadAttention's.
    W, layers = transformer.width, transformer.layers
    for block in transformer.resblocks:
        nn.init.normal_(block.attn.in_proj_weight, std=W ** -0.5)
        nn.init.normal_(block.attn.out_proj.weight, std=W ** -0.5 * (2 * layers) ** -0.5)
        nn.init.normal_(block.mlp.c_fc.weight, std=(2 * W) ** -0.5)
        nn.init.normal_(block.mlp.c_proj.weight, std=W ** -0.5 * (2 * layers) ** -0.5)


class VisionTransformer(nn.Module):
    """CLIP's image tower; keys are OpenAI's `visual.*` keys without the prefix."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        W, P = cfg.vision_width, cfg.vision_patch_size
        if cfg.image_resolution % P:
            raise ValueError(f"image_resolution {cfg.image_resolution} is not a multiple of the patch size {P}")
        self.input_resolution = cfg.image_resolution
        grid = cfg.image_resolution // P
        scale = W ** -0.5
        self.conv1 = nn.Conv2d(3, W, kernel_size=P, stride=P, bias=False)  # patchify
        self.class_embedding = nn.Parameter(scale * torch.randn(W))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, W))
        self.ln_pre = nn.LayerNorm(W)
        self.transformer = Transformer(W, cfg.vision_layers, cfg.vision_heads)
        self.ln_post = nn.LayerNorm(W)
        self.proj = nn.Parameter(scale * torch.randn(W, cfg.embed_dim))
        _init_clip_blocks(self.transformer)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] != (self.input_resolution, self.input_resolution):
            raise ValueError(f"expected images of {self.input_resolution}x{self.input_resolution} pixels, "
                             f"got shape {tuple(images.shape)}")
        x = self.conv1(images.to(self.conv1.weight.dtype))                 # (B, W, grid, grid)
        x = x.flatten(2).transpose(1, 2)                                   # (B, N-1, W)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)   # (B, 1, W)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # (B, N, W)
        x = self.transformer(self.ln_pre(x))                               # (B, N, W)
        return self.ln_post(x[:, 0]) @ self.proj                           # (B, E)


class TextTransformer(nn.Module):
    """CLIP's causal text tower (OpenAI's top-level text keys); any length L <= context_length."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.cfg = cfg
        W = cfg.transformer_width
        self.token_embedding = nn.Embedding(cfg.vocab_size, W)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, W))
        self.transformer = Transformer(W, cfg.transformer_layers, cfg.transformer_heads)
        self.ln_final = nn.LayerNorm(W)
        self.text_projection = nn.Parameter(torch.empty(W, cfg.embed_dim))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=W ** -0.5)
        _init_clip_blocks(self.transformer)

    def text_hidden(self, ids: torch.Tensor) -> torch.Tensor:
        """Per-token features after ln_final, before the projection."""
        B, L = ids.shape
        if L > self.cfg.context_length:
            raise ValueError(f"text of {L} tokens is longer than the context length {self.cfg.context_length}")
        x = self.token_embedding(ids) + self.positional_embedding[:L]     # (B, L, W)
        x = self.transformer(x, is_causal=True)                           # (B, L, W)
        return self.ln_final(x)                                           # (B, L, W)

    def eot_positions(self, ids: torch.Tensor) -> torch.Tensor:
        """Each row's first EOT. OpenAI's argmax(ids) is the same while EOT is the largest id; looking it up survives
        other vocabularies, and a row without EOT falls back to argmax, where the reference code pools."""
        is_eot = ids == self.cfg.eot_id                                    # (B, L)
        first_eot = is_eot.int().argmax(dim=1)                             # (B,) argmax returns the first maximum
        return torch.where(is_eot.any(dim=1), first_eot, ids.argmax(dim=1))  # (B,)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.text_hidden(ids)                                          # (B, L, W)
        x = x[torch.arange(x.shape[0], device=x.device), self.eot_positions(ids)]  # (B, W)
        return x @ self.text_projection                                    # (B, E)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        # `mask` (BERT's interface) is not needed: pooled at EOT under a causal mask, padding after EOT cannot matter
        return self.encode_text(ids)


class CLIP(TextTransformer):
    """OpenAI's CLIP. Its state dict keeps the text tower's tensors on the top module (`token_embedding`), so CLIP
    extends the text tower rather than holding one; the image tower is `visual`."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__(cfg)
        self.visual = VisionTransformer(cfg)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # in OpenAI's state dict; HMMC has its s

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual(images)                                         # (B, E)


# -----------------------------------------------------------------------------------------------------------------
# Chinese BERT (hfl/chinese-roberta-wwm-ext is a plain BERT-base): HF key names, post-LN, erf GELU, tanh pooler.

@dataclass
class BertConfig:
    vocab_size: int = 21128
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    pad_token_id: int = 0

    @classmethod
    def from_json(cls, path: str) -> "BertConfig":
        """Read a HF config.json; fields we do not model must hold the values we implement."""
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        for key, ok in (("hidden_act", "gelu"), ("position_embedding_type", "absolute")):
            if d.get(key, ok) != ok:
                raise ValueError(f"{path}: {key}={d[key]!r} is not supported (only {ok!r})")
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


class BertLayer(nn.Module):
    """A post-LN encoder layer; the ModuleDicts reproduce HF's key nesting (attention.self.query, ...)."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        H, eps = cfg.hidden_size, cfg.layer_norm_eps
        if H % cfg.num_attention_heads:
            raise ValueError(f"hidden_size {H} is not divisible by {cfg.num_attention_heads} attention heads")
        self.heads = cfg.num_attention_heads
        self.attn_dropout = cfg.attention_probs_dropout_prob
        self.attention = nn.ModuleDict(dict(
            self=nn.ModuleDict(dict(query=nn.Linear(H, H), key=nn.Linear(H, H), value=nn.Linear(H, H))),
            output=nn.ModuleDict(dict(dense=nn.Linear(H, H), LayerNorm=nn.LayerNorm(H, eps=eps))),
        ))
        self.intermediate = nn.ModuleDict(dict(dense=nn.Linear(H, cfg.intermediate_size)))
        self.output = nn.ModuleDict(dict(dense=nn.Linear(cfg.intermediate_size, H), LayerNorm=nn.LayerNorm(H, eps=eps)))
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        # keep: (B, 1, 1, L) bool, True for real tokens
        B, L, H = x.shape
        a = self.attention.self
        q, k, v = (m(x).view(B, L, self.heads, H // self.heads).transpose(1, 2)
                   for m in (a.query, a.key, a.value))                      # 3 x (B, h, L, H/h)
        # padding keys get the dtype's lowest score, not -inf (as HF): an all-padding row stays finite
        bias = torch.zeros(keep.shape, dtype=q.dtype, device=q.device).masked_fill(~keep, torch.finfo(q.dtype).min)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                           dropout_p=self.attn_dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, L, H)                              # (B, L, H)
        x = self.attention.output.LayerNorm(x + self.dropout(self.attention.output.dense(y)))
        h = F.gelu(self.intermediate.dense(x))                              # (B, L, I) exact erf GELU, as BERT
        return self.output.LayerNorm(x + self.dropout(self.output.dense(h)))  # (B, L, H)


class BertModel(nn.Module):
    """HF's BertModel: (ids, mask) -> (last_hidden (B, L, H), pooled (B, H), None without the pooler)."""

    def __init__(self, cfg: BertConfig, pooler: bool = True):
        super().__init__()
        self.cfg = cfg
        H = cfg.hidden_size
        self.embeddings = nn.ModuleDict(dict(
            word_embeddings=nn.Embedding(cfg.vocab_size, H, padding_idx=cfg.pad_token_id),
            position_embeddings=nn.Embedding(cfg.max_position_embeddings, H),
            token_type_embeddings=nn.Embedding(cfg.type_vocab_size, H),
            LayerNorm=nn.LayerNorm(H, eps=cfg.layer_norm_eps),
        ))
        self.encoder = nn.ModuleDict(dict(layer=nn.ModuleList([BertLayer(cfg) for _ in range(cfg.num_hidden_layers)])))
        self.pooler = nn.ModuleDict(dict(dense=nn.Linear(H, H))) if pooler else None
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)
        for m in self.modules():  # BERT's init (initializer_range 0.02); matters only without a checkpoint
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)
            if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                nn.init.zeros_(m.weight[m.padding_idx])
        # from scratch, types and positions at 0.02 like the words make captions start alike (cos 0.995 under mean
        # pooling); zero types and CLIP's 0.01 positions leave the words to tell them apart (0.95)
        nn.init.zeros_(self.embeddings.token_type_embeddings.weight)
        nn.init.normal_(self.embeddings.position_embeddings.weight, std=0.01)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None):
        B, L = ids.shape
        if L > self.cfg.max_position_embeddings:
            raise ValueError(f"text of {L} tokens is longer than max_position_embeddings "
                             f"{self.cfg.max_position_embeddings}")
        e = self.embeddings
        pos = torch.arange(L, device=ids.device)
        x = e.word_embeddings(ids) + e.position_embeddings(pos) + e.token_type_embeddings(torch.zeros_like(ids))
        x = self.dropout(e.LayerNorm(x))
        keep = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        keep = keep[:, None, None, :]                                        # (B, 1, 1, L) for all heads, queries
        for layer in self.encoder.layer:
            x = layer(x, keep)                                               # (B, L, H)
        if self.pooler is None:
            return x, None
        return x, torch.tanh(self.pooler.dense(x[:, 0]))                     # (B, H) from the [CLS] position


# ---- weight files: the one guarded reader, the towers' checkpoints, the one check before every load -----------------

def read_checkpoint(path, mmap: bool = False) -> dict:
    """A weight file as a dict, running no code from it: torch.load(weights_only=True), OpenAI's TorchScript archives
    and .safetensors; errors name the file. mmap=True maps the tensors (to read a checkpoint's settings only)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        if path.endswith(".safetensors"):
            ckpt = read_safetensors(path)
        elif _is_torchscript(path):
            ckpt = _read_torchscript_tensors(path)
        else:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except _RefusedArchive as e:
        raise ValueError(f"{path}: {e}") from None
    except Exception as e:  # in its first sentence: torch.load adds ~300 characters of advice
        first = (str(e).splitlines() or [""])[0].split(". ")[0].rstrip(".")
        raise ValueError(f"could not read checkpoint {path} (truncated or corrupt file?): {type(e).__name__}: "
                         f"{first}") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path}: expected a dict (a train.py checkpoint or a state dict), got {type(ckpt).__name__}")
    return ckpt


def _state_dict(ckpt: dict, source: str) -> dict:
    # fp32 tensors of a state dict (perhaps under "state_dict"): released weights are fp16, autocast does the rest
    if isinstance(ckpt.get("state_dict"), dict):
        ckpt = ckpt["state_dict"]
    if not all(torch.is_tensor(v) for v in ckpt.values()):
        raise ValueError(f"{source} does not hold a state dict (a dict of tensors); top-level keys: "
                         f"{sorted(ckpt)[:20]}")
    return {k: v.float() if v.is_floating_point() else v for k, v in ckpt.items()}


def load_clip_state_dict(path: str) -> dict:
    """OpenAI's CLIP archive (ViT-B-32.pt) or a torch.save'd state dict, as an fp32 state dict."""
    if not os.path.isfile(path):  # the URL OpenAI's `clip` package uses (the hex part is the file's SHA-256)
        raise FileNotFoundError(f"no CLIP checkpoint at {path}; download OpenAI's ViT-B/32 weights from "
                                "https://openaipublic.azureedge.net/clip/models/"
                                "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt")
    sd = _state_dict(read_checkpoint(path), path)
    # OpenAI's archives add three ints; archives traced from open_clip also carry its constant causal mask
    sd = {k: v for k, v in sd.items()
          if k not in ("input_resolution", "context_length", "vocab_size") and k.split(".")[-1] != "attn_mask"}
    try:
        CLIPConfig.from_state_dict(sd)  # validates: ResNet CLIP, missing keys
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return sd


def load_clip(path: str, device="cpu") -> CLIP:
    """An fp32 CLIP from an OpenAI checkpoint, the architecture read off the shapes."""
    sd = load_clip_state_dict(path)
    with torch.device("meta"):  # no memory and no random init for weights about to be replaced
        model = CLIP(CLIPConfig.from_state_dict(sd))
    load_checked(model, sd, path, assign=True)
    return model.to(device)


def _bert_weights_file(path: str) -> str:
    # the weights file of a HF BERT folder, model.safetensors preferred
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no BERT folder at {path}; download e.g. hfl/chinese-roberta-wwm-ext from "
                                f"the Hugging Face hub (config.json, vocab.txt and the weights)")
    for name in ("model.safetensors", "pytorch_model.bin"):
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    raise FileNotFoundError(f"no BERT weights in {path}: expected model.safetensors or pytorch_model.bin")


def load_bert_state_dict(path: str) -> dict:
    """A HF BERT folder's fp32 weights under BertModel's keys: no `bert.` prefix, `cls.*` heads or position_ids."""
    file = _bert_weights_file(path)
    out = {}
    for k, v in _state_dict(read_checkpoint(file), file).items():
        k = k.removeprefix("bert.")
        if k.startswith("cls.") or k == "embeddings.position_ids":
            continue
        # checkpoints converted from TensorFlow name LayerNorm parameters gamma/beta; HF renames them on load
        out[k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")] = v
    return out


def load_checked(model: nn.Module, sd: dict, source: str, droppable: tuple = (), optional: tuple = (),
                 assign: bool = False) -> list:
    """Every load: `sd` into `model` after a check; returns the keys dropped. Keys the model lacks with a `droppable`
    prefix are dropped, `optional` ones may be missing; any other difference is a ValueError naming `source`."""
    own = model.state_dict()
    dropped = sorted(k for k in sd if k not in own and droppable and k.startswith(droppable))
    sd = {k: v for k, v in sd.items() if k not in dropped}
    missing = sorted(k for k in own if k not in sd and k not in optional)
    unexpected = sorted(k for k in sd if k not in own)
    shapes = sorted(f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in sd.items()
                    if k in own and v.shape != own[k].shape)
    if missing or unexpected or shapes:
        def show(keys):
            return "[" + ", ".join(keys[:10]) + (f" ... ({len(keys)} in all)" if len(keys) > 10 else "") + "]"
        raise ValueError(f"{source} holds another architecture than this model: missing {show(missing)}; "
                         f"unexpected {show(unexpected)}; shape mismatch {show(shapes)}")
    model.load_state_dict(sd, strict=False, assign=assign)
    return dropped


def strip_prefixes(sd: dict) -> dict:
    """Keys without the `module.` (DDP) and `_orig_mod.` (torch.compile) prefixes of wrapped models."""
    return {re.sub(r"^((module|_orig_mod)\.)+", "", k): v for k, v in sd.items()}


# ---- the original HMMC's checkpoints (state dicts of its BirdModel or BirdPreTrainedModel) --------------------------

# its key prefixes -> HMMC's (model.py), the first match wins
_ORIGINAL_PREFIXES = {"visual_encoder.visual.": "video.visual.",  # OpenAI's ViT
                      "visual_encoder.temporal_transformer.": "video.temporal.",  # CLIP blocks, TF LayerNorm
                      "visual_encoder.frame_position_embeddings.": "video.frame_position_embeddings.",
                      "text_encoder.chinese_encoder.": "text.bert.",  # HF BertModel
                      "text_encoder.text_proj.": "text.text_proj.",
                      "text_encoder.": "text."}  # OpenAI's text keys
# dropped: the pre-training parts, and scalars that earlier commits of the original saved, which touch no embedding
_ORIGINAL_DROPPED = ("text_encoder_k.", "visual_encoder_k.", "v_projector", "v_predictor", "t_projector", "cls.",
                     "queue_", "logit_scale", "weight_sum", "text_encoder.logit_scale", "visual_encoder.logit_scale")


def convert_original(sd: dict, source: str = "the original checkpoint") -> tuple[dict, dict, list]:
    """The original's state dict -> (the HMMCConfig fields its shapes fix, our state dict, the keys dropped)."""
    sd = strip_prefixes(_state_dict(sd, source))
    ours, dropped, unknown = {}, [], []
    for k, v in sd.items():
        old = next((p for p in _ORIGINAL_PREFIXES if k.startswith(p)), None)
        if k.startswith(_ORIGINAL_DROPPED):
            dropped.append(k)
        elif old is None:
            unknown.append(k)
        elif k != "text_encoder.chinese_encoder.embeddings.position_ids":  # transformers 4.x saved it: 0..L-1
            ours[_ORIGINAL_PREFIXES[old] + k[len(old):]] = v
    if unknown:
        raise ValueError(f"unrecognised keys in the original checkpoint: {unknown[:20]}"
                         f"{' ...' if len(unknown) > 20 else ''}")
    openai = {k[len("video."):]: v for k, v in ours.items() if k.startswith("video.visual.")}
    arch = dict(text_encoder="clip", use_temp="video.frame_position_embeddings.weight" in ours)
    if "text.bert.embeddings.word_embeddings.weight" in ours:
        shape = lambda name: ours["text.bert." + name].shape
        hidden = shape("embeddings.word_embeddings.weight")[1]
        arch["bert"] = BertConfig(vocab_size=shape("embeddings.word_embeddings.weight")[0], hidden_size=hidden,
                                  num_hidden_layers=_count_layers(ours, "text.bert.encoder.layer."),
                                  num_attention_heads=max(1, hidden // 64),
                                  intermediate_size=shape("encoder.layer.0.intermediate.dense.weight")[0],
                                  max_position_embeddings=shape("embeddings.position_embeddings.weight")[0],
                                  type_vocab_size=shape("embeddings.token_type_embeddings.weight")[0])
        arch.update(text_encoder="bert", clip=CLIPConfig.from_state_dict(openai, text=False))
    else:
        openai.update({k[len("text."):]: v for k, v in ours.items() if k.startswith("text.")})
        arch["clip"] = CLIPConfig.from_state_dict(openai)
    if arch["use_temp"]:
        arch.update(temporal_layers=_count_layers(ours, "video.temporal.resblocks."),
                    temporal_heads=max(1, arch["clip"].embed_dim // 64),
                    max_frames=ours["video.frame_position_embeddings.weight"].shape[0])
    return arch, ours, dropped


# ---- readers of two formats without their packages: OpenAI's TorchScript archives and safetensors -------------------

def _is_torchscript(path: str) -> bool:
    # both torch.save and torch.jit.save write zip files; only TorchScript ones carry a code/ folder
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(name.split("/")[1:2] == ["code"] or name.endswith("/constants.pkl") for name in z.namelist())


class _RefusedArchive(Exception):
    pass


# the storage classes a data.pkl names, as the dtypes they hold (the classes themselves are deprecated)
_STORAGE_DTYPES = {f"{name}Storage": getattr(torch, dtype) for name, dtype in (
    ("Half", "float16"), ("BFloat16", "bfloat16"), ("Float", "float32"), ("Double", "float64"), ("Long", "int64"),
    ("Int", "int32"), ("Short", "int16"), ("Char", "int8"), ("Byte", "uint8"), ("Bool", "bool"))}


class _ScriptObject:
    """A TorchScript class (`__torch__.*`) while unpickling: keeps the attribute dict, runs nothing."""
    state = {}

    def __setstate__(self, state):
        self.state = state


class _TensorUnpickler(pickle.Unpickler):
    """Unpickles data.pkl allowing only what tensors need: modules become inert _ScriptObjects, other globals fail."""

    def __init__(self, archive: zipfile.ZipFile, prefix: str):
        super().__init__(io.BytesIO(archive.read(f"{prefix}/data.pkl")))
        self.archive, self.prefix = archive, prefix

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return torch._utils._rebuild_tensor_v2
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if module == "__torch__" or module.startswith("__torch__."):
            return _ScriptObject
        if module == "torch.jit._pickle" and name in ("build_intlist", "build_doublelist", "build_boollist",
                                                        "build_tensorlist", "restore_type_tag"):
            return lambda value, *type_tag: value  # wrappers of lists of plain values: each returns its first argument
        raise _RefusedArchive(f"refusing to load {module}.{name} from the archive: only tensors and TorchScript "
                              f"modules holding them are read (this does not look like an OpenAI CLIP file)")

    def persistent_load(self, pid):
        kind, dtype, key, _location, numel = pid  # ('storage', HalfStorage -> torch.float16, '0', 'cpu', numel)
        if kind != "storage" or not isinstance(dtype, torch.dtype):
            raise _RefusedArchive(f"unknown persistent id {pid!r} in the archive")
        data = self.archive.read(f"{self.prefix}/data/{key}")
        untyped = torch.UntypedStorage.from_buffer(data, dtype=torch.uint8) if data else torch.UntypedStorage(0)
        if untyped.nbytes() != numel * dtype.itemsize:
            raise _RefusedArchive(f"tensor data {key} holds {untyped.nbytes()} bytes, expected {numel} x {dtype}")
        return torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)


def _read_torchscript_tensors(path: str) -> dict:
    """A TorchScript archive's {dotted name: tensor}, as ScriptModule.state_dict(), without running its code."""
    with zipfile.ZipFile(path) as archive:
        prefix = next(n for n in archive.namelist() if n.endswith("/data.pkl"))[:-len("/data.pkl")]
        root = _TensorUnpickler(archive, prefix).load()
    sd = {}

    def walk(obj, name):
        for key, value in obj.state.items():
            if torch.is_tensor(value):
                sd[name + key] = value
            elif isinstance(value, _ScriptObject):
                walk(value, f"{name}{key}.")

    if not isinstance(root, _ScriptObject):
        raise _RefusedArchive(f"data.pkl holds a {type(root).__name__}, not a TorchScript module")
    walk(root, "")
    return sd


# safetensors: 8-byte little-endian header size, a JSON header {name: {dtype, shape, data_offsets}}, then raw bytes
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def read_safetensors(path: str) -> dict:
    """The safetensors format without its package (on a little-endian machine, as the format). A file cut short fails
    in struct or json; read_checkpoint names the file in every error."""
    with open(path, "rb") as f:
        buf = bytearray(f.read())  # writable, so torch.frombuffer can share it without a warning
    n = struct.unpack("<Q", buf[:8])[0]
    header = json.loads(buf[8:8 + n])
    header.pop("__metadata__", None)
    sd = {}
    for name, info in header.items():
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {name} has unsupported dtype {info['dtype']}")
        dtype, shape, (a, b) = _SAFETENSORS_DTYPES[info["dtype"]], info["shape"], info["data_offsets"]
        count = math.prod(shape)
        if not 0 <= a <= b <= len(buf) - 8 - n or b - a != count * dtype.itemsize:
            raise ValueError(f"tensor {name} bytes {a}..{b} do not fit the file or its shape {shape}")
        t = torch.frombuffer(buf, dtype=dtype, count=count, offset=8 + n + a) if count else torch.empty(0, dtype=dtype)
        sd[name] = t.reshape(shape)
    return sd
