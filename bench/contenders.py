"""What bench/step.py times: the trainer's step, the same model in a bare loop, the stock HF class."""
from __future__ import annotations

import dataclasses

import torch

from launcher.dist_env import DistEnv, export_torch_env, for_this_process
from launcher.parallel import ParallelDims
from launcher.parallel.dims import effective_zero_stage
from launcher.parallel.plan import compile_layers, compile_model
from launcher.precision import precision_of
from launcher.training.engine import build_optimizer, init_distributed, to_device
from launcher.training.guard import StepGuard
from launcher.training.step import TrainStep
from model import arch_of, build


def one_rank() -> str:
    """The benches' one-process group, as a single `encdec train` makes it (a free local port; NCCL
    on GPU 0, gloo on CPU) -> the device."""
    env = for_this_process(DistEnv(0, 1, 0, 1, 0, "127.0.0.1", 0, "single"))
    export_torch_env(env)
    return init_distributed(env, timeout_s=600)


def random_batch(cfg, seed: int) -> dict:
    """A host batch as the data stream yields it: full-length token pairs, no padding."""
    g = torch.Generator().manual_seed(seed)
    B, S, T, V = cfg.train.micro_batch_size, cfg.data.max_src_len, cfg.data.max_tgt_len, cfg.model.real_vocab_size
    src = torch.randint(3, V, (B, S), generator=g)
    tgt = torch.randint(3, V, (B, T + 1), generator=g)
    return {"src": src, "src_mask": torch.ones(B, S, dtype=torch.bool), "tgt_in": tgt[:, :-1].contiguous(),
            "labels": tgt[:, 1:].contiguous(), "pad_frac": 0.0, "keys": [""] * B}


class BenchTrainer:
    """The trainer's step (TrainStep, through the constructor the trainer uses), without the data
    stream, monitor and checkpoint machinery the bench does not time."""

    def __init__(self, cfg, device, force_zero: bool = False):
        """force_zero: the configured ZeRO stage even at one data-parallel rank (where the trainer
        runs ZeRO 0: launcher/parallel/dims.py effective_zero_stage)."""
        t = cfg.train
        keep = force_zero or cfg.parallel.zero_at_one_rank
        cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(
            cfg.parallel, zero_stage=effective_zero_stage(cfg.parallel.zero_stage, 1, keep)))
        torch.manual_seed(t.seed)
        self.fn = TrainStep(cfg, ParallelDims.from_world(1, 1).build(0), device, 1,
                            StepGuard(t.max_bad_steps, t.spike_z, t.spike_window))
        self.i = 0

    def step(self, b):
        out = self.fn([b], self.i)
        self.i += 1
        return out.loss

    def close(self):
        self.fn.engine.destroy()


class BareLoop:
    """A plain PyTorch loop over a model (ours or the stock class), as fast as a loop can be written:
    batches to the device, forward under the precision's autocast, backward, clip, AdamW, zero_grad."""

    def __init__(self, cfg, device, hf: bool, compile: str = ""):
        """compile: "model", the whole forward (as train.compile below ZeRO 3); "layers", each layer's."""
        self.cfg, self.device, self.hf = cfg, device, hf
        torch.manual_seed(cfg.train.seed)
        ours = build(cfg.model)
        if hf:
            import transformers
            adapter = arch_of(cfg.model).hf
            model = getattr(transformers, adapter.class_name(cfg.model))(adapter.hf_config(cfg.model))
            missing, unexpected = model.load_state_dict(adapter.to_hf_state_dict(ours.state_dict(), cfg.model),
                                                        strict=False)
            assert not unexpected, unexpected
            del ours
        else:
            model = ours
            model.criterion.label_smoothing = cfg.train.label_smoothing
            if compile == "model":
                compile_model(model)
            elif compile == "layers":
                compile_layers(model)
        self.model = model.to(device).train()
        self.opt, _ = build_optimizer(cfg, self.model, device)
        self.precision = precision_of(cfg)

    def step(self, b):
        b = to_device(b, self.device)
        with self.precision.autocast(self.device):
            if self.hf:
                loss = self.model(input_ids=b["src"], attention_mask=b["src_mask"], decoder_input_ids=b["tgt_in"],
                                  labels=b["labels"]).loss
            else:
                s, n = self.model(b["src"], None, b["tgt_in"], b["labels"])
                loss = s / n
        loss.backward()
        if self.cfg.optim.grad_clip:                     # as the trainer (DeepSpeed or its ZeRO-0 clip)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()

    def close(self):
        pass
