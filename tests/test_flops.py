"""The FLOPs formula against a hand count and against torch's own FLOP counter on the real model."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from launcher.monitor import flops
from model.transformer import Transformer, TransformerConfig as ModelConfig


def tiny_cfg(**kw):
    base = dict(vocab_size=96, real_vocab_size=90, d_model=16, n_heads=2, d_ff=40,
                n_encoder_layers=2, n_decoder_layers=3, dropout=0.0, max_positions=64)
    base.update(kw)
    return ModelConfig(**base)


def test_hand_count_tiny_config():
    # D=16, F=40, V=96, Le=2, Ld=3, one sample, S=5, T=3; every matmul as (rows, inner, cols).
    D, F, V, S, T = 16, 40, 96, 5, 3
    enc_layer = [
        (S, D, D), (S, D, D), (S, D, D),   # q, k, v projections
        (S, D, S),                          # scores: all heads together have inner size D
        (S, S, D),                          # probs @ values
        (S, D, D),                          # o projection
        (S, D, F), (S, F, D),               # ffn
    ]
    dec_layer = [
        (T, D, D), (T, D, D), (T, D, D), (T, D, T), (T, T, D), (T, D, D),   # causal self-attn, full T x T
        (T, D, D),                           # cross q on the target
        (S, D, D), (S, D, D),                # cross k, v on the source (memory)
        (T, D, S), (T, S, D),                # cross scores and probs @ values
        (T, D, D),                           # cross o
        (T, D, F), (T, F, D),                # ffn
    ]
    output = [(T, D, V)]
    macs = 2 * sum(a * b * c for a, b, c in enc_layer) + 3 * sum(a * b * c for a, b, c in dec_layer) \
        + sum(a * b * c for a, b, c in output)
    # Written out: enc layer = 5*16*16*4 + 5*16*5 + 5*5*16 + 2*5*16*40 = 5120+400+400+6400 = 12320
    assert sum(a * b * c for a, b, c in enc_layer) == 12320
    # dec layer = 3*16*16*4 + 3*16*3*2 + 3*16*16*2 + 5*16*16*2 + 3*16*5*2 + 3*16*40*2
    #           = 3072 + 288 + 1536 + 2560 + 480 + 3840 = 11776
    assert sum(a * b * c for a, b, c in dec_layer) == 11776
    assert macs == 2 * 12320 + 3 * 11776 + 3 * 16 * 96 == 64576
    cfg = tiny_cfg()
    assert flops.forward_macs(cfg, S, T) == 64576
    assert flops.forward_flops(cfg, 1, S, T) == 2 * 64576
    assert flops.train_flops(cfg, 4, S, T) == 3 * 2 * 4 * 64576
    assert flops.train_flops(cfg, 4, S, T, recompute=True) == 4 * 2 * 4 * 64576
    # Real-length variant: per-sample sum; equal to the padded count when nothing is padded.
    assert flops.train_flops_lengths(cfg, [S] * 4, [T] * 4) == flops.train_flops(cfg, 4, S, T)
    assert flops.train_flops_lengths(cfg, [5, 2], [3, 1]) == 6 * (flops.forward_macs(cfg, 5, 3)
                                                                   + flops.forward_macs(cfg, 2, 1))
    with pytest.raises(ValueError, match="2 source lengths but 1 target"):
        flops.train_flops_lengths(cfg, [5, 2], [3])


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_matches_torch_flop_counter(norm):
    """torch's FlopCounterMode counts 2*m*k*n per matmul, forward and backward, and (with the math
    attention backend, which runs the attention as plain matmuls) full T x T causal scores. It
    ignores the same things the formula ignores (norms, softmax, biases, loss), so the two must
    agree exactly: forward = forward_flops, forward + backward = train_flops (backward = 2x)."""
    torch.manual_seed(0)
    cfg = tiny_cfg(norm=norm)
    model = Transformer(cfg)
    B, S, T = 3, 11, 7
    src = torch.randint(2, cfg.real_vocab_size, (B, S))
    src_mask = torch.ones(B, S, dtype=torch.bool)
    src_mask[1, 8:] = False                          # padding does not change the matmul shapes
    tgt = torch.randint(2, cfg.real_vocab_size, (B, T))
    labels = torch.randint(2, cfg.real_vocab_size, (B, T))
    with sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as fwd:
            loss, n = model(src, src_mask, tgt, labels)
        assert fwd.get_total_flops() == flops.forward_flops(cfg, B, S, T)
        with FlopCounterMode(display=False) as both:
            loss, n = model(src, src_mask, tgt, labels)
            (loss / n).backward()
    counted = both.get_total_flops()
    assert counted == flops.train_flops(cfg, B, S, T), (counted, flops.train_flops(cfg, B, S, T))
    # Leaving out any term would be caught: the smallest term (one encoder layer's scores) is > 0.5%.
    assert 2 * 3 * B * S * S * cfg.d_model / counted > 0.005


def test_peak_flops_table_env_and_mfu(monkeypatch):
    monkeypatch.delenv(flops.ENV_PEAK, raising=False)
    assert flops.peak_flops("cpu", "bf16") is None           # CPUs: no made-up peak
    monkeypatch.setattr(flops, "_device_name", lambda d: ("cuda", "NVIDIA H100 80GB HBM3"))
    assert flops.peak_flops("cuda:0", "bf16") == 989e12
    monkeypatch.setattr(flops, "_device_name", lambda d: ("cuda", "NVIDIA H200"))
    assert flops.peak_flops("cuda:0", "bf16") == 989e12
    monkeypatch.setattr(flops, "_device_name", lambda d: ("cuda", "NVIDIA A100-SXM4-80GB"))
    assert flops.peak_flops("cuda:0", "bf16") == 312e12
    prev = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert flops.peak_flops("cuda:0", "fp32") == 19.5e12
        torch.set_float32_matmul_precision("high")           # TF32 tensor cores allowed
        assert flops.peak_flops("cuda:0", "fp32") == 156e12
    finally:
        torch.set_float32_matmul_precision(prev)
    monkeypatch.setattr(flops, "_device_name", lambda d: ("cuda", "NVIDIA H100 PCIe"))
    assert flops.peak_flops("cuda:0", "bf16") == 756e12
    monkeypatch.setattr(flops, "_device_name", lambda d: ("cuda", "Some Future GPU"))
    assert flops.peak_flops("cuda:0", "bf16") is None
    monkeypatch.setenv(flops.ENV_PEAK, "1e12")
    assert flops.peak_flops("cpu", "bf16") == 1e12           # the override wins for any device
    monkeypatch.setenv(flops.ENV_PEAK, "fast")
    with pytest.raises(ValueError, match="ENCDEC_PEAK_FLOPS='fast' is not a number"):
        flops.peak_flops("cpu", "bf16")
    with pytest.raises(ValueError, match="precision must be bf16 or fp32"):
        flops.peak_flops("cpu", "fp16")
    # 8 devices at 1e12 each, 4e12 FLOPs in 2 s -> 2e12 FLOP/s / 8e12 = 0.25
    assert flops.mfu(4e12, 2.0, 1e12, 8) == pytest.approx(0.25)
    assert flops.mfu(4e12, 2.0, None, 8) is None


def test_peak_flops_real_device():
    # Whatever this machine is, the lookup itself must not fail (CPU here: None; a GPU: table or None).
    import os
    if os.environ.get(flops.ENV_PEAK):
        pytest.skip("override set")
    value = flops.peak_flops(None, "bf16")
    assert value is None or value > 1e12
