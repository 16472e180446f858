"""The Transformer of "Attention Is All You Need", in one file.

Shapes: B batch, S source length, T target length, D d_model, H heads, Dh = D / H, V vocabulary.

    src (B, S) --embed*sqrt(D) + sinusoid--> x (B, S, D) --N x EncoderLayer--> memory (B, S, D)
    tgt_in (B, T) --embed*sqrt(D) + sinusoid--> y (B, T, D) --N x DecoderLayer(memory)--> h (B, T, D)
    h --tied output projection (embed.weight^T) + logits_bias--> logits (B, T, V)

The model knows nothing of parallelism. Tensor parallelism swaps the linear layers, the
embedding and the criterion for sharded ones from outside (launcher/parallel/); to allow that,
attention infers its local head count from the projection width, and the output projection and
the loss go through `self.embed` and `self.criterion`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.arch import ShardedBlock, TPPlan, embedding
from model.config import ModelConfig, heads_divide
from model.loss import LinearCrossEntropy


@dataclass
class TransformerConfig(ModelConfig):
    arch: str = "transformer"
    norm: str = "pre"            # pre: LN before each sublayer + final LN (stable); post: as in the paper
    activation: str = "relu"
    attention_dropout: float = 0.0

    def check(self) -> list[tuple[str, str]]:
        bad = super().check() + heads_divide(self)
        if not bad and ((self.d_model // self.n_heads) % 2 or self.d_model % 2):
            bad.append(("model.d_model", f"{self.d_model} must be even (sinusoidal positions)"))
        if self.norm not in ("pre", "post"):
            bad.append(("model.norm", f"must be 'pre' or 'post', got {self.norm!r}"))
        if self.activation not in ("relu", "gelu"):
            bad.append(("model.activation", f"must be relu or gelu, got {self.activation!r}"))
        return bad


def vocab_logits_bias(c: ModelConfig) -> torch.Tensor:
    """(V,): 0 on the real vocabulary, -1e9 on the padded rows (never predicted); exported as
    Hugging Face's final_logits_bias."""
    bias = torch.zeros(c.vocab_size)
    bias[(c.real_vocab_size or c.vocab_size):] = -1e9
    return bias


def sinusoid_table(n_pos: int, dim: int) -> torch.Tensor:
    """(n_pos, dim): sin of every frequency in the first half, cos in the second half.

    The frequencies are the paper's, pos / 10000^(2i/dim); the halves layout (not interleaved)
    is the one of Pegasus and Marian, so exported models compute the same function.
    """
    pos = torch.arange(n_pos, dtype=torch.float64)[:, None]
    i = torch.arange(dim // 2, dtype=torch.float64)[None, :]
    angle = pos / torch.pow(10000.0, 2 * i / dim)
    return torch.cat([torch.sin(angle), torch.cos(angle)], dim=1).float()


class Attention(nn.Module):
    """Multi-head attention through scaled_dot_product_attention.

    q, k, v, o are plain nn.Linear (with bias, as in Pegasus/Marian). The number of heads held
    here is q.out_features // head_dim, so column-sharded q/k/v hold a slice of the heads.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        self.head_dim = d_model // n_heads
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.o = nn.Linear(d_model, d_model)
        self.dropout = dropout

    def forward(self, x, kv, mask=None, causal=False):
        # x (B, T, D) queries; kv (B, S, D) keys/values; mask (B, 1, 1, S) bool, True = attend,
        # or None (no padding: SDPA may then pick the flash kernel). One GEMM for q, k and v in
        # self-attention, one for k and v in cross-attention: the weights stay separate
        # parameters (checkpoints, TP shards and the HF key map are unchanged) and are
        # concatenated here, a copy of D x 3D next to the (B x T) x D x 3D matmul.
        B, T, _ = x.shape
        S = kv.shape[1]
        if kv is x:
            qkv = F.linear(x, torch.cat([self.q.weight, self.k.weight, self.v.weight]),
                           _cat_bias(self.q.bias, self.k.bias, self.v.bias))
            q, k, v = qkv.view(B, T, 3, -1, self.head_dim).permute(2, 0, 3, 1, 4)   # 3 x (B, H, T, Dh)
        else:
            q = self.q(x).view(B, T, -1, self.head_dim).transpose(1, 2)           # (B, H, T, Dh)
            kvp = F.linear(kv, torch.cat([self.k.weight, self.v.weight]), _cat_bias(self.k.bias, self.v.bias))
            k, v = kvp.view(B, S, 2, -1, self.head_dim).permute(2, 0, 3, 1, 4)      # 2 x (B, H, S, Dh)
        p = self.dropout if self.training else 0.0
        out = attend(q, k, v, mask, p, causal)
        return self.o(out.transpose(1, 2).reshape(B, T, -1))          # (B, T, D)


def _cat_bias(*biases):
    return None if any(b is None for b in biases) else torch.cat(biases)


def attend(q, k, v, mask, dropout_p: float, causal: bool):
    """SDPA with a bool mask; a flex-attention BlockMask (document_mask on GPU) goes to flex_attention."""
    if mask is not None and not isinstance(mask, torch.Tensor):
        return _flex()(q, k, v, block_mask=mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal)


_FLEX = {}


def _flex():
    if "fn" not in _FLEX:
        from torch.nn.attention.flex_attention import flex_attention   # deferred: GPU-only path
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX["fn"]


def document_mask(src_mask: torch.Tensor, segments: torch.Tensor, dropout: float = 0.0, flex: bool | None = None):
    """Encoder self-attention inside each document of a packed example.

    src_mask (B, S) bool (True = real token), segments (B, S) int (document number in the example).
    Query i attends key j iff j is real and in i's document; a padding query attends every real
    key (its output is never used; this keeps its softmax finite). On CUDA with flex attention
    (and no attention dropout) -> a BlockMask: only the blocks on the diagonal are computed and
    no (B, S, S) tensor exists; otherwise a (B, 1, S, S) bool mask for SDPA.
    """
    if (src_mask.is_cuda if flex is None else flex) and dropout == 0.0:
        try:
            from torch.nn.attention.flex_attention import create_block_mask   # deferred: GPU-only path
        except ImportError:
            create_block_mask = None
        if create_block_mask is not None:
            seg, real = segments, src_mask

            def mod(b, h, qi, kj):
                return real[b, kj] & ((seg[b, qi] == seg[b, kj]) | ~real[b, qi])
            B, S = src_mask.shape
            # compiled on GPU: the mask is built block by block, never as a (B, S, S) tensor
            return create_block_mask(mod, B, None, S, S, device=src_mask.device, _compile=src_mask.is_cuda)
    same = segments[:, :, None] == segments[:, None, :]
    return (src_mask[:, None, :] & (same | ~src_mask[:, :, None]))[:, None]


class FeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int, activation: str):
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)
        self.act = F.relu if activation == "relu" else F.gelu

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Sublayer(nn.Module):
    """Residual + LayerNorm around one sublayer, pre-LN (x + f(LN x)) or post-LN (LN(x + f(x)))."""

    def __init__(self, d_model: int, pre: bool, dropout: float, eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(d_model, eps=eps)
        self.pre = pre
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, fn):
        if self.pre:
            return x + self.dropout(fn(self.norm(x)))
        return self.norm(x + self.dropout(fn(x)))


class EncoderLayer(nn.Module):
    """pre: norm placement (default: c.norm); ffn: the feed-forward module's factory (default FeedForward)."""

    def __init__(self, c: ModelConfig, pre: bool | None = None, ffn=None):
        super().__init__()
        pre = c.norm == "pre" if pre is None else pre
        self.self_attn = Attention(c.d_model, c.n_heads, c.attention_dropout)
        self.ffn = ffn() if ffn else FeedForward(c.d_model, c.d_ff, c.activation)
        self.attn_block = Sublayer(c.d_model, pre, c.dropout, c.layer_norm_eps)
        self.ffn_block = Sublayer(c.d_model, pre, c.dropout, c.layer_norm_eps)

    def forward(self, x, src_mask):
        x = self.attn_block(x, lambda h: self.self_attn(h, h, src_mask))
        return self.ffn_block(x, self.ffn)


class DecoderLayer(nn.Module):
    def __init__(self, c: ModelConfig, pre: bool | None = None, ffn=None):
        super().__init__()
        pre = c.norm == "pre" if pre is None else pre
        self.self_attn = Attention(c.d_model, c.n_heads, c.attention_dropout)
        self.cross_attn = Attention(c.d_model, c.n_heads, c.attention_dropout)
        self.ffn = ffn() if ffn else FeedForward(c.d_model, c.d_ff, c.activation)
        self.self_block = Sublayer(c.d_model, pre, c.dropout, c.layer_norm_eps)
        self.cross_block = Sublayer(c.d_model, pre, c.dropout, c.layer_norm_eps)
        self.ffn_block = Sublayer(c.d_model, pre, c.dropout, c.layer_norm_eps)

    def forward(self, y, memory, src_mask):
        # Causal self-attention. Target padding sits at the right end, so a causal mask already
        # keeps every real position away from it; padded positions are excluded from the loss.
        y = self.self_block(y, lambda h: self.self_attn(h, h, None, causal=True))
        y = self.cross_block(y, lambda h: self.cross_attn(h, memory, src_mask))
        return self.ffn_block(y, self.ffn)


def attention_mask(src_mask):
    """(B, S) bool source mask -> the (B, 1, 1, S) SDPA mask, or None when there is no padding.

    None stays None (the caller knows the batch has no padding: the trainer decides from the
    host copy of the batch, once per micro-batch). A mask on the CPU is checked here (no device
    sync involved); a mask already on an accelerator is used as given, never synced per layer.
    """
    if src_mask is None:
        return None
    if src_mask.device.type == "cpu" and src_mask.numpy().all():      # host memory: numpy reads it in place
        return None
    return src_mask[:, None, None, :]


class Transformer(nn.Module):
    def __init__(self, c: TransformerConfig):
        super().__init__()
        if c.vocab_size <= 0:
            raise ValueError("ModelConfig.vocab_size must be set (from the tokenizer) before building the model")
        self.config = c
        self.embed = embedding(c.vocab_size, c.d_model)      # shared: source, target, output
        self.embed_scale = math.sqrt(c.d_model)
        # fixed tables, filled by init_weights (not saved: functions of the config)
        self.register_buffer("positions", torch.empty(c.max_positions, c.d_model), persistent=False)
        self.register_buffer("logits_bias", torch.empty(c.vocab_size), persistent=False)
        self.drop = nn.Dropout(c.dropout)
        self.encoder = nn.ModuleList(EncoderLayer(c) for _ in range(c.n_encoder_layers))
        self.decoder = nn.ModuleList(DecoderLayer(c) for _ in range(c.n_decoder_layers))
        # Pre-LN stacks end with a LayerNorm (the residual stream is otherwise unnormalised).
        self.encoder_norm = nn.LayerNorm(c.d_model, eps=c.layer_norm_eps) if c.norm == "pre" else nn.Identity()
        self.decoder_norm = nn.LayerNorm(c.d_model, eps=c.layer_norm_eps) if c.norm == "pre" else nn.Identity()
        self.criterion = LinearCrossEntropy(n_classes=c.real_vocab_size)
        if not self.embed.weight.is_meta:            # on the meta device: shapes only, init_weights() later
            self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """Xavier-uniform linear weights, zero biases, N(0, d_model^-1/2) embedding, the fixed tables."""
        self.positions.copy_(sinusoid_table(self.config.max_positions, self.config.d_model))
        self.logits_bias.copy_(vocab_logits_bias(self.config))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                m.reset_parameters()
        nn.init.normal_(self.embed.weight, std=self.config.d_model ** -0.5)

    def _embed(self, ids):
        # (B, L) -> (B, L, D): scaled token embedding + sinusoid position
        L = ids.shape[1]
        if L > self.positions.shape[0]:
            raise ValueError(f"sequence length {L} exceeds model.max_positions={self.positions.shape[0]}")
        return self.drop(self.embed(ids) * self.embed_scale + self.positions[:L].to(self.embed.weight.dtype))

    def encode(self, src_ids, src_mask, src_segments=None):
        # src_mask (B, S) bool, True = real token -> (B, 1, 1, S) for every query and head;
        # None = no padding (no mask at all, so SDPA may use its flash kernel);
        # src_segments (B, S) int: packed documents, each token attends only inside its own
        if src_segments is None:
            mask = attention_mask(src_mask)
        else:
            real = src_mask if src_mask is not None else torch.ones_like(src_segments, dtype=torch.bool)
            mask = document_mask(real, src_segments, self.config.attention_dropout if self.training else 0.0)
        x = self._embed(src_ids)
        for layer in self.encoder:
            x = layer(x, mask)
        return self.encoder_norm(x)

    def decode(self, tgt_ids, memory, src_mask):
        mask = attention_mask(src_mask)
        y = self._embed(tgt_ids)
        for layer in self.decoder:
            y = layer(y, memory, mask)
        return self.decoder_norm(y)

    def logits(self, h):
        # (B, T, D) @ (D, V) tied to the embedding; padded vocabulary rows pushed to -1e9
        return F.linear(h, self.embed.weight) + self.logits_bias

    def forward(self, src_ids, src_mask, tgt_ids, labels=None, src_segments=None):
        """Logits (B, T, V); with labels (B, T), the summed cross-entropy and the token count.

        With labels the logits are never materialised whole: the criterion takes the hidden
        states and the tied output projection (model/loss.py, chunked over tokens).
        """
        h = self.decode(tgt_ids, self.encode(src_ids, src_mask, src_segments), src_mask)
        if labels is None:
            return self.logits(h)
        return self.criterion(h, self.embed.weight, self.logits_bias, labels)


# ----------------------------------------------------------------------------- what encdec needs to know of it

TP_PLAN = TPPlan(
    blocks=(ShardedBlock(Attention, columns=("q", "k", "v"), rows=("o",), inputs=2, kv_copied_upstream=("cross_attn",)),
            ShardedBlock(FeedForward, columns=("fc1",), rows=("fc2",), dropout="")),
    vocab_buffers=("logits_bias",))


def describe(c: TransformerConfig) -> str:
    return f"Transformer ({c.norm}-LN, sinusoidal positions, tied embeddings)"


def attention_width(c: ModelConfig) -> int:
    return c.d_model


def activation_terms(c: TransformerConfig, B: int, S: int, T: int, tp: int, bf16: bool) -> tuple[float, float, float]:
    """Activation bytes saved for backward: (one encoder layer, one decoder layer, the rest), for
    launcher/planner/model.py. Per token (a = bytes of matmul operands, 4 fp32 / 2 bf16 autocast;
    r = 4, the fp32 residual stream and LayerNorm inputs; flash/efficient SDPA, no S x S matrix;
    dropout masks 1 byte):
        encoder layer   2 r D (LN inputs) + 2 a D (LN outputs into linears)
                        + a (3 D + D + D) / tp (q|k|v, attention output, its copy) + a F / tp
                        + 2 D (dropout masks) + 4 H / tp (log-sum-exp)
        decoder layer   3 r D + 3 a D + a (3 D + 3 D + D) / tp + a F / tp + 3 D + 8 H / tp
          per source    2 a D / tp (cross-attention k|v)
    + the fused-projection weight copies per layer (q|k|v and k|v concatenations, saved in fp32
    runs; bf16 casts of every weight under autocast), embeddings' dropout masks, final norms."""
    D, F, H = c.d_model, c.d_ff, c.n_heads
    a, r = (2 if bf16 else 4), 4
    drop = 1 if c.dropout > 0 else 0
    enc_tok = 2 * r * D + 2 * a * D + a * 5 * D / tp + a * F / tp + 2 * drop * D + 4 * H / tp + 8
    dec_tok = 3 * r * D + 3 * a * D + a * 7 * D / tp + a * F / tp + 3 * drop * D + 8 * H / tp + 12
    dec_src = 2 * a * D / tp + (a * D if bf16 else 0)          # k|v of the memory (+ its bf16 cast per layer)
    if bf16:   # autocast keeps a bf16 copy of every weight it casts (and of the concatenations)
        w_enc, w_dec = 2 * (5 * D * D + 2 * D * F) / tp, 2 * (8 * D * D + 2 * D * F) / tp
    else:
        w_enc, w_dec = 4 * 3 * D * D / tp, 4 * 5 * D * D / tp
    enc_layer = B * S * enc_tok + w_enc
    dec_layer = B * T * dec_tok + B * S * dec_src + w_dec
    if c.attention_dropout > 0:                                # math attention: probabilities + mask kept
        enc_layer += B * H / tp * S * S * (a + 1)
        dec_layer += B * H / tp * (T * T + T * S) * (a + 1)
    fixed = drop * B * (S + T) * D + 2 * r * B * S * D + r * B * T * D      # embedding masks, final norms
    return enc_layer, dec_layer, fixed
