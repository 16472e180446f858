"""T5 v1.1 (model.arch=t5), in one file: the layout of Hugging Face's T5ForConditionalGeneration.

Shapes: B batch, S source length, T target length, D d_model, H heads, Dk head_dim (HF d_kv),
F d_ff, V vocabulary.

    src (B, S) --embed--> x --N x [x + attn(rms x, bias_enc); x + ffn(rms x)]--> rms --> memory (B, S, D)
    tgt (B, T) --embed--> y --N x [self(bias_dec, causal); cross(memory); ffn]--> rms --> h (B, T, D)
    h --lm_head (untied; or tied: embed.weight^T after h * D^-0.5)--> logits (B, T, V)

T5 v1.1 differs from the seed Transformer in: RMS norm (a scale, no bias, no mean), pre-norm,
no bias in any linear layer, no embedding scaling, no absolute positions but a relative position
bias: the signed distance key - query is bucketed (exact for small distances, logarithmic up to
max_distance), each bucket has a learned scalar per head, added to the attention scores. The
table lives in the first layer of each stack; the bias it gives is computed once per stack and
shared by every layer (bidirectional buckets in the encoder, causal in the decoder; none in
cross-attention). Scores are not scaled by Dk^-0.5 (the initialisation absorbs it). The FFN is
gated GELU: wo(gelu_tanh(wi_0 x) * wi_1 x). Dropout where Hugging Face puts it: on the
embeddings, on attention probabilities, inside the FFN, on every residual branch and after each
stack's final norm. The padded vocabulary rows carry no logit bias (T5's own 32128-row table has
28 unused rows too): the model computes the function of the exported T5ForConditionalGeneration.
Only rows past an export's row count (model.export_vocab_size: a folder of 1100 rows padded to
1152) are never predicted (logits_bias -1e9, as the seed model's padding), so the function is
still the exported folder's, and those rows stay zero.

As the seed model: the model knows nothing of parallelism; attention reads its local head count
from q.out_features and the bias table's width, the embedding goes through self.embed, the
output projection through self.lm_head (or self.embed), the loss through self.criterion.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.arch import ShardedBlock, TPPlan, embedding
from model.config import ModelConfig
from model.loss import LinearCrossEntropy


@dataclass
class T5Config(ModelConfig):
    arch: str = "t5"
    head_dim: int = 0            # per-head width (HF d_kv); 0 = d_model // n_heads
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    tie_embeddings: bool = False  # output projection tied to the embedding (original T5, h * d_model^-0.5)

    def check(self) -> list[tuple[str, str]]:
        bad = super().check()
        if self.head_dim < 0:
            bad.append(("model.head_dim", f"must be >= 0, got {self.head_dim}"))
        if not self.head_dim and (self.n_heads <= 0 or self.d_model % self.n_heads):
            bad.append(("model.n_heads", f"{self.n_heads} heads do not divide model.d_model={self.d_model} "
                                         "(or set model.head_dim)"))
        if self.relative_attention_num_buckets < 4 or self.relative_attention_num_buckets % 2:
            bad.append(("model.relative_attention_num_buckets",
                        f"must be an even number >= 4, got {self.relative_attention_num_buckets}"))
        if self.relative_attention_max_distance <= self.relative_attention_num_buckets // 4:
            bad.append(("model.relative_attention_max_distance",
                        f"must exceed relative_attention_num_buckets / 4, got {self.relative_attention_max_distance}"))
        return bad

    def identity(self) -> dict:
        return {**super().identity(), "head_dim": head_dim(self)}      # 0 = d_model // n_heads: compare widths


def head_dim(c: T5Config) -> int:
    return c.head_dim or c.d_model // c.n_heads


def relative_position_bucket(rel: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int) -> torch.Tensor:
    """rel = key position - query position (any int shape) -> bucket ids in [0, num_buckets).

    Bidirectional: half the buckets for keys after the query. Causal: keys after the query all
    fall in bucket 0 (masked anyway). Of the rest, half are exact distances, half logarithmic
    bins up to max_distance (beyond it: the last bucket). The formula of Mesh TensorFlow / HF.
    """
    buckets = torch.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (rel > 0).long() * num_buckets
        rel = rel.abs()
    else:
        rel = -torch.clamp(rel, max=0)
    max_exact = num_buckets // 2
    large = max_exact + (torch.log(rel.float() / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).long()
    large = torch.clamp(large, max=num_buckets - 1)
    return buckets + torch.where(rel < max_exact, rel, large)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, the variance in fp32 (T5LayerNorm)."""

    def __init__(self, d: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        var = x.float().pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(var + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


class T5Attention(nn.Module):
    """Multi-head attention without biases or score scaling; the position bias enters as SDPA's float mask.

    relative_attention_bias (num_buckets, H) is held by the first layer of each stack only.
    """

    def __init__(self, c: T5Config, has_bias_table: bool = False):
        super().__init__()
        self.head_dim = head_dim(c)
        inner = c.n_heads * self.head_dim
        self.q = nn.Linear(c.d_model, inner, bias=False)
        self.k = nn.Linear(c.d_model, inner, bias=False)
        self.v = nn.Linear(c.d_model, inner, bias=False)
        self.o = nn.Linear(inner, c.d_model, bias=False)
        self.dropout = c.dropout
        self.num_buckets, self.max_distance = c.relative_attention_num_buckets, c.relative_attention_max_distance
        if has_bias_table:
            self.relative_attention_bias = embedding(self.num_buckets, c.n_heads)

    def position_bias(self, q_len: int, k_len: int, bidirectional: bool) -> torch.Tensor:
        """(1, H_local, q_len, k_len) float: the bias of every head held here."""
        table = self.relative_attention_bias
        ctx = torch.arange(q_len, device=table.weight.device)[:, None]
        mem = torch.arange(k_len, device=table.weight.device)[None, :]
        b = relative_position_bucket(mem - ctx, bidirectional, self.num_buckets, self.max_distance)
        return table(b).permute(2, 0, 1).unsqueeze(0)

    def forward(self, x, kv, mask=None):
        # x (B, T, D) queries; kv (B, S, D); mask: additive float (1|B, H|1, T, S) or bool (B, 1, 1, S)
        B, T, _ = x.shape
        S = kv.shape[1]
        q = self.q(x).view(B, T, -1, self.head_dim).transpose(1, 2)   # (B, H, T, Dk)
        k = self.k(kv).view(B, S, -1, self.head_dim).transpose(1, 2)
        v = self.v(kv).view(B, S, -1, self.head_dim).transpose(1, 2)
        if mask is not None and mask.is_floating_point():
            mask = mask.to(q.dtype)
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, scale=1.0)
        return self.o(out.transpose(1, 2).reshape(B, T, -1))


class GatedFeedForward(nn.Module):
    """wo(dropout(gelu_tanh(wi_0 x) * wi_1 x)): T5 v1.1's gated-GELU (HF feed_forward_proj="gated-gelu")."""

    def __init__(self, c: T5Config):
        super().__init__()
        self.wi_0 = nn.Linear(c.d_model, c.d_ff, bias=False)
        self.wi_1 = nn.Linear(c.d_model, c.d_ff, bias=False)
        self.wo = nn.Linear(c.d_ff, c.d_model, bias=False)
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, x):
        return self.wo(self.dropout(F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x)))


class T5EncoderLayer(nn.Module):
    def __init__(self, c: T5Config, first: bool):
        super().__init__()
        self.self_norm = RMSNorm(c.d_model, c.layer_norm_eps)
        self.self_attn = T5Attention(c, has_bias_table=first)
        self.ffn_norm = RMSNorm(c.d_model, c.layer_norm_eps)
        self.ffn = GatedFeedForward(c)
        self.drop = nn.Dropout(c.dropout)

    def forward(self, x, bias):
        h = self.self_norm(x)
        x = x + self.drop(self.self_attn(h, h, bias))
        return x + self.drop(self.ffn(self.ffn_norm(x)))


class T5DecoderLayer(nn.Module):
    def __init__(self, c: T5Config, first: bool):
        super().__init__()
        self.self_norm = RMSNorm(c.d_model, c.layer_norm_eps)
        self.self_attn = T5Attention(c, has_bias_table=first)
        self.cross_norm = RMSNorm(c.d_model, c.layer_norm_eps)
        self.cross_attn = T5Attention(c)
        self.ffn_norm = RMSNorm(c.d_model, c.layer_norm_eps)
        self.ffn = GatedFeedForward(c)
        self.drop = nn.Dropout(c.dropout)

    def forward(self, y, memory, bias, src_mask):
        h = self.self_norm(y)
        y = y + self.drop(self.self_attn(h, h, bias))
        y = y + self.drop(self.cross_attn(self.cross_norm(y), memory, src_mask))
        return y + self.drop(self.ffn(self.ffn_norm(y)))


class T5(nn.Module):
    def __init__(self, c: T5Config):
        super().__init__()
        if c.vocab_size <= 0:
            raise ValueError("ModelConfig.vocab_size must be set (from the tokenizer) before building the model")
        self.config = c
        self.embed = embedding(c.vocab_size, c.d_model)          # shared by encoder and decoder inputs
        self.drop = nn.Dropout(c.dropout)
        self.encoder = nn.ModuleList(T5EncoderLayer(c, i == 0) for i in range(c.n_encoder_layers))
        self.decoder = nn.ModuleList(T5DecoderLayer(c, i == 0) for i in range(c.n_decoder_layers))
        self.encoder_norm = RMSNorm(c.d_model, c.layer_norm_eps)
        self.decoder_norm = RMSNorm(c.d_model, c.layer_norm_eps)
        self.lm_head = None if c.tie_embeddings else nn.Linear(c.d_model, c.vocab_size, bias=False)
        # (V,) 0, then -1e9 on rows past the exported ones (when the model holds more); filled by init_weights
        self.register_buffer("logits_bias", torch.empty(c.vocab_size), persistent=False)
        self.masks_rows = c.hf_vocab_size < c.vocab_size
        # over the whole (exported) vocabulary, as HF T5's loss; chunked from h, logits never whole
        self.criterion = LinearCrossEntropy(n_classes=c.hf_vocab_size if self.masks_rows else 0)
        if not self.embed.weight.is_meta:            # on the meta device: shapes only, init_weights() later
            self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """T5's initialisation (Mesh TensorFlow / HF _init_weights with factor 1); norms to 1."""
        c, dk = self.config, head_dim(self.config)
        self.logits_bias.zero_()
        self.logits_bias[c.hf_vocab_size:] = -1e9
        for m in self.modules():
            if isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
        nn.init.normal_(self.embed.weight, std=1.0)
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, std=1.0)
        for m in self.modules():
            if isinstance(m, T5Attention):
                nn.init.normal_(m.q.weight, std=(c.d_model * dk) ** -0.5)
                nn.init.normal_(m.k.weight, std=c.d_model ** -0.5)
                nn.init.normal_(m.v.weight, std=c.d_model ** -0.5)
                nn.init.normal_(m.o.weight, std=(c.n_heads * dk) ** -0.5)
                if hasattr(m, "relative_attention_bias"):
                    nn.init.normal_(m.relative_attention_bias.weight, std=c.d_model ** -0.5)
            elif isinstance(m, GatedFeedForward):
                nn.init.normal_(m.wi_0.weight, std=c.d_model ** -0.5)
                nn.init.normal_(m.wi_1.weight, std=c.d_model ** -0.5)
                nn.init.normal_(m.wo.weight, std=c.d_ff ** -0.5)

    def encode(self, src_ids, src_mask):
        # src_mask (B, S) bool, True = real token, or None (no padding). Bias (1, H, S, S) + key padding
        # -> (B, H, S, S)
        S = src_ids.shape[1]
        bias = self.encoder[0].self_attn.position_bias(S, S, bidirectional=True)
        if src_mask is not None:
            bias = bias.masked_fill(~src_mask[:, None, None, :], float("-inf"))
        x = self.drop(self.embed(src_ids))
        for layer in self.encoder:
            x = layer(x, bias)
        return self.drop(self.encoder_norm(x))

    def decode(self, tgt_ids, memory, src_mask):
        # Causal bias (1, H, T, T). Targets are right-padded: causality keeps real positions off padding.
        T = tgt_ids.shape[1]
        bias = self.decoder[0].self_attn.position_bias(T, T, bidirectional=False)
        future = torch.ones(T, T, dtype=torch.bool, device=tgt_ids.device).triu(1)
        bias = bias.masked_fill(future, float("-inf"))
        mask = None if src_mask is None else src_mask[:, None, None, :]
        y = self.drop(self.embed(tgt_ids))
        for layer in self.decoder:
            y = layer(y, memory, bias, mask)
        return self.drop(self.decoder_norm(y))

    def _projection(self, h):
        """(h as the output projection sees it, its weight (V, D)): untied lm_head, or original
        T5's tied embedding after the d_model^-0.5 rescale."""
        if self.lm_head is None:
            return h * self.config.d_model ** -0.5, self.embed.weight
        return h, self.lm_head.weight

    def _bias(self):
        return self.logits_bias if self.masks_rows else None

    def logits(self, h):
        h, w = self._projection(h)
        z = F.linear(h, w)
        return z + self.logits_bias if self.masks_rows else z

    def forward(self, src_ids, src_mask, tgt_ids, labels=None):
        """Logits (B, T, V); with labels (B, T), the summed cross-entropy and the token count
        (then the logits are never materialised whole: model/loss.py, chunked over tokens)."""
        h = self.decode(tgt_ids, self.encode(src_ids, src_mask), src_mask)
        if labels is None:
            return self.logits(h)
        h, w = self._projection(h)
        return self.criterion(h, w, self._bias(), labels)


# ----------------------------------------------------------------------------- what encdec needs to know of it

TP_PLAN = TPPlan(
    blocks=(ShardedBlock(T5Attention, columns=("q", "k", "v"), rows=("o",), head_tables=("relative_attention_bias",),
                         inputs=2, kv_copied_upstream=("cross_attn",)),
            ShardedBlock(GatedFeedForward, columns=("wi_0", "wi_1"), rows=("wo",))),
    vocab_heads=("lm_head",), vocab_buffers=("logits_bias",))


def describe(c: T5Config) -> str:
    return ("T5 v1.1 (RMS norm, relative position bias, gated GELU, "
            + ("tied" if c.tie_embeddings else "untied") + " output head)")


def attention_width(c: T5Config) -> int:
    return c.n_heads * head_dim(c)


def activation_terms(c: T5Config, B: int, S: int, T: int, tp: int, bf16: bool) -> tuple[float, float, float]:
    """Activation bytes saved for backward (one encoder layer, one decoder layer, per-stack fixed),
    for launcher/planner/model.py. As the seed model's (model/transformer.py), with: RMS norms (input,
    normalised x, output), inner width I = H Dk, the gated FFN (wi_0, gelu, wi_1, product and its
    dropout mask: 4 F), attention dropout at model.dropout (the math kernel keeps scores,
    probabilities, mask and dropped probabilities), and the position bias of each stack
    (1, H, L, L) fp32 with its masked copy, shared by the stack's layers."""
    D, F, H = c.d_model, c.d_ff, c.n_heads
    inner = attention_width(c)
    a, r = (2 if bf16 else 4), 4
    drop = 1 if c.dropout > 0 else 0
    norm = 2 * r * D + a * D
    ffn = (4 * a * F + drop * F) / tp
    enc_tok = 2 * norm + a * 4 * inner / tp + ffn + 2 * drop * D + 4 * H / tp
    dec_tok = 3 * norm + a * 6 * inner / tp + ffn + 3 * drop * D + 8 * H / tp
    dec_src = 2 * a * inner / tp
    enc_layer = B * S * enc_tok
    dec_layer = B * T * dec_tok + B * S * dec_src
    if drop:
        enc_layer += B * H / tp * S * S * (3 * a + 1)
        dec_layer += B * H / tp * (T * T + T * S) * (3 * a + 1)
    bias = 2 * 4 * H / tp * (S * S + T * T)
    fixed = bias + 2 * drop * B * (S + T) * D + (norm + drop * D) * B * (S + T)   # masks, final norms
    return enc_layer, dec_layer, fixed
