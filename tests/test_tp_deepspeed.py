"""TP x DP under a real DeepSpeed engine (CPU, gloo) against one unsharded process.

4 ranks = tp 2 x dp 2. Every rank also trains the unsharded model on the whole global batch
with torch.optim.AdamW + clip_grad_norm_. The engine's gradient norm must equal the reference
norm at every step, and after 3 clipped steps the gathered TP parameters must equal the
reference's (ZeRO 0-3): exactly in fp32; in bf16 (the engine config of launcher/precision.py:
fp32 engine, bf16 autocast inside its forward; the reference under the same autocast) to bf16
precision, at every stage, ZeRO 0 included.
"""
import copy
import logging

import deepspeed
import pytest
import torch
from torch.testing import assert_close

from launcher.config import ConfigError
from launcher.parallel import ParallelDims, check_supported, parallelize, shard_dims
from launcher.precision import Precision
from model.transformer import Transformer, TransformerConfig as ModelConfig
from parallel_utils import gather_full_state_dict, spawn

# ZeRO's optimizer check imports torch._inductor (~3 s); import it once here, before the ranks fork.
import deepspeed.runtime.zero.muon.muon_optimizer  # noqa: E402,F401

CFG = ModelConfig(vocab_size=64, real_vocab_size=60, d_model=32, n_heads=4, d_ff=64, n_encoder_layers=2,
                  n_decoder_layers=2, dropout=0.0)
STEPS, MICRO, CLIP = 3, 2, 0.05
ADAM = dict(lr=1e-2, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01)


def _global_batch(step, dp):
    g = torch.Generator().manual_seed(100 + step)
    B, S, T = MICRO * dp, 6, 5
    src = torch.randint(2, CFG.real_vocab_size, (B, S), generator=g)
    src_mask = torch.ones(B, S, dtype=torch.bool)
    src_mask[0, 4:] = False
    tgt = torch.randint(2, CFG.real_vocab_size, (B, T + 1), generator=g)
    labels = tgt[:, 1:].clone()
    labels[1, 2 + step:] = -100                 # uneven token counts across DP ranks
    return src, src_mask, tgt[:, :-1], labels


def _reference(model, dp, precision):
    """Unsharded single-process training; returns the pre-clip norms and the first step's parts."""
    opt = torch.optim.AdamW(model.parameters(), **ADAM)
    norms, dims, losses = [], shard_dims(model), []
    for step in range(STEPS):
        src, src_mask, tgt_in, labels = _global_batch(step, dp)
        with Precision(precision).autocast("cpu"):
            loss, n = model(src, src_mask, tgt_in, labels)
        (loss / n).backward()
        losses.append((loss / n).item())
        if step == 0:
            sharded = sum(p.grad.norm() ** 2 for k, p in model.named_parameters() if k in dims).sqrt().item()
            replicated = sum(p.grad.norm() ** 2 for k, p in model.named_parameters() if k not in dims).sqrt().item()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP).item())
        opt.step()
        opt.zero_grad()
    return norms, sharded, replicated, losses


def _engine(init, mesh, stage, precision):
    model = parallelize(copy.deepcopy(init), mesh)
    ds_config = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": stage}, "gradient_clipping": CLIP, "steps_per_print": 10 ** 9,
                 **Precision(precision).deepspeed_config()}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), **ADAM),
                                      config=ds_config, mpu=mesh.deepspeed_mpu())
    return engine, model


def _train_step(engine, mesh, step):
    src, src_mask, tgt_in, labels = _global_batch(step, mesh.dp)
    rows = slice(mesh.dp_rank * MICRO, (mesh.dp_rank + 1) * MICRO)
    loss, _ = engine.module(src[rows], src_mask[rows], tgt_in[rows], labels[rows])
    n_global = (labels != -100).sum()
    engine.backward(loss.float() * mesh.dp / n_global)    # the engine averages gradients over dp
    engine.step()
    norm = engine.get_global_grad_norm()
    total = loss.detach().float().clone()
    torch.distributed.all_reduce(total, group=mesh.dp_group)
    return None if norm is None else float(norm), float(total) / float(n_global)


def _worker(rank, world, precision, stages):
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    deepspeed.init_distributed(dist_backend="gloo")
    mesh = ParallelDims(tp=2, dp=world // 2, world_size=world).build(rank)
    torch.manual_seed(0)
    init = Transformer(CFG)
    ref = copy.deepcopy(init)
    ref_norms, sharded, replicated, ref_losses = _reference(ref, mesh.dp, precision)
    assert min(ref_norms) > 2 * CLIP, ref_norms          # every step clips
    # bf16: the sharded matmuls round differently from the whole ones; double-counted replicated
    # gradients would put the norm 3% off, missing shards 27%. Adam moves an element by about lr
    # per step whatever its gradient's size, so a near-zero gradient whose sign bf16 rounding flips
    # moves the other way (a key bias's true gradient is 0: all noise): in bf16 the losses must
    # agree at every step and stage, and every parameter within 2 lr per step.
    norm_tol = 1e-5 if precision == "fp32" else 5e-3
    for stage in stages:
        engine, model = _engine(init, mesh, stage, precision)
        for step in range(STEPS):
            norm, loss = _train_step(engine, mesh, step)
            assert abs(loss - ref_losses[step]) <= norm_tol * abs(ref_losses[step]), (stage, step, loss, ref_losses)
            if stage > 0:                                  # stage 0 clips but reports no norm
                assert_close(norm, ref_norms[step], rtol=norm_tol, atol=0,
                             msg=lambda m: f"zero {stage} step {step} grad norm: {m}")
        with deepspeed.zero.GatheredParameters(list(model.parameters()), enabled=stage == 3):
            params = {k: p.detach().clone() for k, p in model.named_parameters()}
        full = gather_full_state_dict(model, mesh, params)
        for k, p in ref.named_parameters():
            if precision == "fp32":
                assert_close(full[k], p.detach(), rtol=1e-4, atol=1e-5, msg=lambda m: f"zero {stage} {k}: {m}")
                continue
            assert (full[k] - p.detach()).abs().max() <= 2 * ADAM["lr"] * STEPS, (stage, k)
        engine.destroy()


@pytest.mark.parametrize("precision,stages", [("fp32", (0, 1, 2, 3)), ("bf16", (0, 1, 2, 3))])
def test_tp2_dp2_deepspeed_matches_single_process(precision, stages):
    spawn(_worker, 4, precision, stages)


def test_check_supported():
    for stage in (0, 1, 2, 3):                  # every stage with TP, in both precisions (the engine is fp32)
        check_supported(2, stage)
        check_supported(1, stage)
    with pytest.raises(ConfigError, match=r"'parallel.zero_stage': must be 0-3, got 4"):
        check_supported(1, 4)
