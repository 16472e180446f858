"""BART (model.arch=bart), in one file: the layout of Hugging Face's BartForConditionalGeneration.

Shapes: B batch, S source length, T target length, D d_model, H heads, F d_ff, V vocabulary,
P max_positions.

    src (B, S) --embed [* sqrt(D)] + enc_pos[2:2+S]--> LN_emb --> x --N x post-LN EncoderLayer--> memory (B, S, D)
    tgt (B, T) --embed [* sqrt(D)] + dec_pos[2:2+T]--> LN_emb --> y --N x post-LN DecoderLayer(memory)--> h
    h --tied output projection (embed.weight^T) + logits_bias--> logits (B, T, V)

BART differs from the seed Transformer's post-LN form (Marian, model/transformer.py) in: learned
absolute positions, one table per stack of P + 2 rows read from row 2 on (fairseq kept rows 0
and 1 for its padding index; BartLearnedPositionalEmbedding's offset), a LayerNorm on the
embeddings of each stack (layernorm_embedding), embeddings unscaled unless scale_embedding
(False for facebook/bart-base and -large), GELU, dropout inside the FFN (activation_dropout), and
an N(0, 0.02) initialisation. No final LayerNorms (mBART's add_final_layer_norm /
normalize_before are not built). The layers are the seed's blocks (Attention, Sublayer, the FFN
with an activation dropout), so the tensor-parallel plan is the seed's; the padded vocabulary
rows carry the seed's -1e9 logit bias, exported as final_logits_bias.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import transformer
from model.arch import ShardedBlock, TPPlan, embedding
from model.config import ModelConfig, heads_divide
from model.loss import LinearCrossEntropy
from model.transformer import Attention, DecoderLayer, EncoderLayer, FeedForward, attention_mask, vocab_logits_bias

POSITION_OFFSET = 2          # rows of each position table before position 0 (HF BartLearnedPositionalEmbedding.offset)
INIT_STD = 0.02              # BART's init_std


@dataclass
class BartConfig(ModelConfig):
    arch: str = "bart"
    activation: str = "gelu"
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    scale_embedding: bool = False    # token embeddings * sqrt(d_model) (False in facebook/bart-*)

    def check(self) -> list[tuple[str, str]]:
        bad = super().check() + heads_divide(self)
        if self.activation not in ("relu", "gelu"):
            bad.append(("model.activation", f"must be relu or gelu, got {self.activation!r}"))
        for k in ("attention_dropout", "activation_dropout"):
            if not 0 <= getattr(self, k) < 1:
                bad.append((f"model.{k}", f"must be in [0, 1), got {getattr(self, k)}"))
        if self.max_positions <= 0:
            bad.append(("model.max_positions", f"must be > 0, got {self.max_positions}"))
        return bad


class BartFeedForward(FeedForward):
    """fc2(dropout(act(fc1 x))): the seed FFN with BART's activation dropout on the hidden columns
    (inside the tensor-parallel region: a private RNG stream per TP rank)."""

    def __init__(self, c: BartConfig):
        super().__init__(c.d_model, c.d_ff, c.activation)
        self.dropout = nn.Dropout(c.activation_dropout)

    def forward(self, x):
        return self.fc2(self.dropout(self.act(self.fc1(x))))


class BartEncoderLayer(EncoderLayer):
    """LN(x + drop(attn(x))), LN(x + drop(ffn(x))): the seed's post-LN layer, parameter names included."""

    def __init__(self, c: BartConfig):
        super().__init__(c, pre=False, ffn=lambda: BartFeedForward(c))


class BartDecoderLayer(DecoderLayer):
    def __init__(self, c: BartConfig):
        super().__init__(c, pre=False, ffn=lambda: BartFeedForward(c))


class Bart(nn.Module):
    def __init__(self, c: BartConfig):
        super().__init__()
        if c.vocab_size <= 0:
            raise ValueError("ModelConfig.vocab_size must be set (from the tokenizer) before building the model")
        self.config = c
        self.embed = embedding(c.vocab_size, c.d_model)          # shared: source, target, output
        self.embed_scale = math.sqrt(c.d_model) if c.scale_embedding else 1.0
        self.encoder_positions = embedding(c.max_positions + POSITION_OFFSET, c.d_model)
        self.decoder_positions = embedding(c.max_positions + POSITION_OFFSET, c.d_model)
        self.encoder_embed_norm = nn.LayerNorm(c.d_model, eps=c.layer_norm_eps)
        self.decoder_embed_norm = nn.LayerNorm(c.d_model, eps=c.layer_norm_eps)
        self.register_buffer("logits_bias", torch.empty(c.vocab_size), persistent=False)   # init_weights fills it
        self.drop = nn.Dropout(c.dropout)
        self.encoder = nn.ModuleList(BartEncoderLayer(c) for _ in range(c.n_encoder_layers))
        self.decoder = nn.ModuleList(BartDecoderLayer(c) for _ in range(c.n_decoder_layers))
        # no final LayerNorms (post-LN); the stacks' outputs pass here, where the TP plan copies them
        self.encoder_norm, self.decoder_norm = nn.Identity(), nn.Identity()
        self.criterion = LinearCrossEntropy(n_classes=c.real_vocab_size)
        if not self.embed.weight.is_meta:            # on the meta device: shapes only, init_weights() later
            self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """BART's: N(0, 0.02) linear weights and embeddings (tokens, positions), zero biases, LayerNorms 1 / 0."""
        self.logits_bias.copy_(vocab_logits_bias(self.config))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=INIT_STD)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=INIT_STD)
            elif isinstance(m, nn.LayerNorm):
                m.reset_parameters()

    def _embed(self, ids, positions: nn.Embedding, norm: nn.LayerNorm):
        # (B, L) -> (B, L, D): token embedding (scaled or not) + the stack's positions from row 2, LayerNorm, dropout
        L = ids.shape[1]
        if L > self.config.max_positions:
            raise ValueError(f"sequence length {L} exceeds model.max_positions={self.config.max_positions}")
        x = self.embed(ids)
        if self.embed_scale != 1.0:
            x = x * self.embed_scale
        pos = positions(torch.arange(POSITION_OFFSET, L + POSITION_OFFSET, device=ids.device))   # (L, D)
        return self.drop(norm(x + pos))

    def encode(self, src_ids, src_mask):
        # src_mask (B, S) bool, True = real token; None = no padding (no mask: SDPA may use its flash kernel)
        mask = attention_mask(src_mask)
        x = self._embed(src_ids, self.encoder_positions, self.encoder_embed_norm)
        for layer in self.encoder:
            x = layer(x, mask)
        return self.encoder_norm(x)

    def decode(self, tgt_ids, memory, src_mask):
        mask = attention_mask(src_mask)
        y = self._embed(tgt_ids, self.decoder_positions, self.decoder_embed_norm)
        for layer in self.decoder:
            y = layer(y, memory, mask)
        return self.decoder_norm(y)

    def logits(self, h):
        # (B, T, D) @ (D, V) tied to the embedding; padded vocabulary rows pushed to -1e9
        return F.linear(h, self.embed.weight) + self.logits_bias

    def forward(self, src_ids, src_mask, tgt_ids, labels=None):
        """Logits (B, T, V); with labels (B, T), the summed cross-entropy and the token count (the
        logits then never materialised whole: model/loss.py, chunked over tokens)."""
        h = self.decode(tgt_ids, self.encode(src_ids, src_mask), src_mask)
        if labels is None:
            return self.logits(h)
        return self.criterion(h, self.embed.weight, self.logits_bias, labels)


# ----------------------------------------------------------------------------- what encdec needs to know of it

# the seed's blocks: q/k/v column- and o row-parallel; fc1 column- and fc2 row-parallel, with the
# activation dropout on each rank's own hidden columns
TP_PLAN = TPPlan(
    blocks=(ShardedBlock(Attention, columns=("q", "k", "v"), rows=("o",), inputs=2, kv_copied_upstream=("cross_attn",)),
            ShardedBlock(BartFeedForward, columns=("fc1",), rows=("fc2",))),
    vocab_buffers=("logits_bias",))


def describe(c: BartConfig) -> str:
    return (f"BART (post-LN, learned positions, embedding LayerNorm, {c.activation.upper()}, "
            f"{'scaled' if c.scale_embedding else 'unscaled'} tied embeddings)")


def attention_width(c: ModelConfig) -> int:
    return c.d_model


def activation_terms(c: BartConfig, B: int, S: int, T: int, tp: int, bf16: bool) -> tuple[float, float, float]:
    """Activation bytes saved for backward (launcher/planner/model.py): the seed Transformer's
    (model/transformer.py: the same attention, FFN and LayerNorm-residual blocks; the embedding
    LayerNorms in place of its final ones) plus the activation dropout's 1-byte masks (F / tp per
    token and layer) when activation_dropout > 0."""
    enc, dec, fixed = transformer.activation_terms(c, B, S, T, tp, bf16)
    if c.activation_dropout > 0:
        enc += B * S * c.d_ff / tp
        dec += B * T * c.d_ff / tp
    return enc, dec, fixed
