"""Real steps measured for the planner tests: peak live tensor bytes and collective bytes per rank."""
import logging

import torch

PLAN_MODEL = ["model.d_model=64", "model.n_heads=4", "model.d_ff=256", "model.n_encoder_layers=2",
              "model.n_decoder_layers=2", "model.dropout=0.1", "model.vocab_multiple=8", "data.max_src_len=48",
              "data.max_tgt_len=24", "train.precision=fp32", "train.micro_batch_size=8"]
VOCAB = 500


def plan_config(overrides, world):
    from launcher.training.inputs import model_config
    from launcher.config import load_config
    cfg = load_config("configs/test-tiny.yaml", PLAN_MODEL + list(overrides))
    dp = world // cfg.parallel.tp
    cfg.train.global_batch_size = cfg.train.micro_batch_size * dp
    cfg.model = model_config(cfg, VOCAB)
    return cfg


def batch(cfg, step, dp_rank):
    g = torch.Generator().manual_seed(100 + step * 7 + dp_rank)
    B, S, T, V = cfg.train.micro_batch_size, cfg.data.max_src_len, cfg.data.max_tgt_len, VOCAB
    src = torch.randint(3, V, (B, S), generator=g)
    tgt = torch.randint(3, V, (B, T + 1), generator=g)
    return {"src": src, "src_mask": torch.ones(B, S, dtype=torch.bool), "tgt_in": tgt[:, :-1].contiguous(),
            "labels": tgt[:, 1:].contiguous(), "pad_frac": 0.0}


def measure(rank, world, overrides, steps=2):
    """Builds the trainer's step (launcher/training/step.py: its engine from build_engine) and runs
    `steps` steps under the trackers: the peak of live tensor bytes from the engine's construction
    on, and the bytes of every collective of the last step."""
    import deepspeed
    from bench.measure import CollectiveBytes, PeakMemory
    from launcher.training.guard import StepGuard
    from launcher.training.step import TrainStep
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    cfg = plan_config(overrides, world)
    from launcher.parallel import ParallelDims
    mesh = ParallelDims.from_world(cfg.parallel.tp, world).build(rank)
    torch.manual_seed(0)
    with PeakMemory() as pm:
        t = TrainStep(cfg, mesh, "cpu", 1, StepGuard(0), rank=rank)
        for step in range(steps):
            if step == steps - 1:
                resting = pm.current
                peak_before = pm.peak
                pm.reset_peak()
                with CollectiveBytes() as cb:
                    loss = t([batch(cfg, step, mesh.dp_rank)], step).loss
                step_peak = pm.peak - resting
                pm.peak = max(pm.peak, peak_before)
            else:
                t([batch(cfg, step, mesh.dp_rank)], step)
    out = {"peak": pm.peak, "step_peak_above_rest": step_peak, "resting": resting, "comm": dict(cb.bytes), "calls": dict(cb.calls), "loss": loss}
    t.engine.destroy()
    del deepspeed
    return out


def measure_activations(rank, world, overrides):
    """Peak tensor bytes of one forward + backward above the resting model (weights and gradients
    already allocated): what the micro-batch's activations, the loss and backward's temporaries take."""
    from launcher.parallel import ParallelDims, parallelize
    from bench.measure import PeakMemory
    from model import build
    cfg = plan_config(overrides, world)
    mesh = ParallelDims.from_world(cfg.parallel.tp, world).build(rank)
    torch.manual_seed(0)
    model = parallelize(build(cfg.model), mesh, activation_checkpointing=cfg.parallel.activation_checkpointing)
    b = batch(cfg, 0, mesh.dp_rank)

    def step():
        loss, n = model(b["src"], None, b["tgt_in"], b["labels"])
        (loss / n).backward()
    step()                                          # gradients exist from here on (accumulated into)
    with PeakMemory() as pm:
        step()
    return pm.peak
