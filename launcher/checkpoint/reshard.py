"""Loading a checkpoint of one layout into a DeepSpeed engine of another (the do-it-yourself universal checkpoint).

DeepSpeed runs in fp32 here (bf16 comes from autocast), so the fp32 master weights and the Adam
state of every parameter are plain fp32 tensors. The CheckpointReader gives each of them whole
(joined over the old ZeRO partitions and TP shards); this module cuts the new rank's piece:

    whole tensor --TP plan: narrow along the split dim--> this TP rank's tensor (same shape as the param)
        ZeRO 0    -> param.data, optimizer.state[param]
        ZeRO 1/2  -> param.data (every rank holds the module) and the rank's fragment of the flat fp32
                     partition and of its Adam state (DeepSpeed's _hp_mapping gives the addresses)
        ZeRO 3    -> the rank's slice of the fp32 partition and Adam state (DeepSpeed's set_full_hp_param),
                     then the module's partitions are refreshed from it as after an optimizer step

Reading is one parameter at a time, so memory stays near one whole parameter per rank beyond the
engine itself. The step counter, the LR scheduler and the data position come from trainer_state.json.
"""
from __future__ import annotations

import torch

from launcher.checkpoint.format import CheckpointError
from launcher.checkpoint.reader import CheckpointReader
from launcher.parallel.dims import Mesh
from launcher.parallel.plan import shard_dims
from model import arch_of

_STATE_KEYS = ("exp_avg", "exp_avg_sq")


def _fit_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """Vocabulary rows past the checkpoint's are padding (zeros, never input, never predicted): pad
    them; rows past this run's vocabulary (padding of the checkpoint's, format.check_compatible) are cut."""
    if t.shape[0] == rows:
        return t
    if t.shape[0] > rows:
        return t[:rows].contiguous()
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


def _local(name: str, full: torch.Tensor, tp: int, tp_rank: int, dims: dict, vocab: int,
           vocab_rows: frozenset) -> torch.Tensor:
    if name in vocab_rows:
        full = _fit_rows(full, vocab)
    if name in dims and tp > 1:
        d = dims[name]
        n = full.shape[d] // tp
        full = full.narrow(d, tp_rank * n, n).contiguous()
    return full


def _step_tensor(step: int, group: dict, device) -> torch.Tensor:
    on_device = group.get("fused") or group.get("capturable")
    return torch.tensor(float(step), dtype=torch.float32, device=device if on_device else "cpu")


def load_into_engine(engine, scheduler, reader: CheckpointReader, cfg, mesh: Mesh,
                     load_optimizer: bool = True) -> None:
    """Fills the engine (any ZeRO stage, any TP) from reader; the optimizer state and the LR
    schedule too when the checkpoint has them."""
    stage, tp, vocab = cfg.parallel.zero_stage, cfg.parallel.tp, cfg.model.vocab_size
    rows = frozenset(arch_of(cfg.model).hf.vocab_rows(cfg.model))     # parameters whose dim 0 is the vocabulary
    dims = shard_dims(engine.module) if tp > 1 else {}
    with_opt = load_optimizer and reader.has_optimizer()
    step = (reader.optimizer_step() or int(reader.state["step"])) if with_opt else 0
    params = dict(engine.module.named_parameters())
    missing = sorted(set(params) - set(reader.names()))
    if missing:
        raise CheckpointError(f"checkpoint {reader.tag_dir} lacks parameters {missing[:5]}")

    def whole(name, key):
        return _local(name, reader.get(name, key), tp, mesh.tp_rank, dims, vocab, rows).to(engine.device)

    with torch.no_grad():
        if stage == 0:
            _load_plain(engine.optimizer, params, whole, with_opt, step)
        elif stage in (1, 2):
            _load_zero12(engine.optimizer, params, whole, with_opt, step)
        else:
            _load_zero3(engine.optimizer, params, whole, with_opt, step)
    if with_opt and reader.state.get("scheduler") and scheduler is not None:
        scheduler.load_state_dict(dict(reader.state["scheduler"]))
        for g, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
            g["lr"] = lr
    if with_opt:
        engine.global_steps = int(reader.state["step"])
        engine.global_samples = engine.global_steps * cfg.train.global_batch_size


def _load_plain(opt, params, whole, with_opt, step):
    """ZeRO 0: the module parameters are the optimizer's parameters."""
    for name, p in params.items():
        p.data.copy_(whole(name, "fp32"))
    if not with_opt:
        return
    names = {id(p): n for n, p in params.items()}
    for g in opt.param_groups:
        for p in g["params"]:
            name = names[id(p)]
            opt.state[p] = {"step": _step_tensor(step, g, p.device),
                            **{k: whole(name, k).to(p.dtype) for k in _STATE_KEYS}}


def _load_zero12(opt, params, whole, with_opt, step):
    """ZeRO 1/2: lp params (full on every rank) + this rank's fragment of each group's flat fp32 partition."""
    names = {id(p): n for n, p in params.items()}
    states = []
    for i, group in enumerate(opt.bit16_groups):
        flat = opt.single_partition_of_fp32_groups[i]
        st = {k: torch.zeros_like(flat) for k in _STATE_KEYS} if with_opt else {}
        for p in group:
            name = names[id(p)]
            value = whole(name, "fp32")
            p.data.copy_(value.view_as(p))
            m = p._hp_mapping
            if m is None:                            # no element of this param in this rank's partition
                continue
            lp, hp = m.lp_fragment_address, m.hp_fragment_address
            flat.data[hp.start:hp.start + hp.numel] = value.flatten()[lp.start:lp.start + lp.numel]
            for k in st:
                st[k][hp.start:hp.start + hp.numel] = whole(name, k).flatten()[lp.start:lp.start + lp.numel]
        states.append((flat, st))
    if with_opt:
        for (flat, st), g in zip(states, opt.optimizer.param_groups):
            opt.optimizer.state[flat] = {"step": _step_tensor(step, g, flat.device), **st}


def _load_zero3(opt, params, whole, with_opt, step):
    """ZeRO 3: this rank's slice of every parameter, in the fp32 partitions, then in the module's."""
    if with_opt:
        for flat, g in zip(opt.fp32_partitioned_groups_flat, opt.optimizer.param_groups):
            opt.optimizer.state[flat] = {"step": _step_tensor(step, g, flat.device),
                                         **{k: torch.zeros_like(flat) for k in _STATE_KEYS}}
    for name, p in params.items():
        opt.set_full_hp_param(whole(name, "fp32"), p)
        if with_opt:
            for k in _STATE_KEYS:
                opt.set_full_hp_param(whole(name, k), p, k)
    for i, flat in enumerate(opt.fp32_partitioned_groups_flat):
        if opt.fp16_partitioned_groups_flat[i] is not None:
            opt.fp16_partitioned_groups_flat[i].data.copy_(flat.data)
