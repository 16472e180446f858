"""Data settings built once: the stream's settings are the run's DataConfig (no default of their own),
`encdec eval` builds the trainer's validation stream from an exported folder's config, and the
stream's counters (bad samples, packing) are part of its checkpointed state, also when resuming a
checkpoint written before that (trainer_state.json "data_counters")."""
import dataclasses
import json
import os
import shutil

import torch.distributed as dist
import yaml

from data.config import DataConfig, MixtureEntry
from data.spec import StreamSpec
from data.ul2 import default_table
from launcher.config import config_to_dict, load_config
from tests.ckpt_helpers import TINY, metrics, run_ranks, train
from tests.test_data_sources import BAD, write_shards


def test_the_stream_reads_the_configs_settings_and_the_config_is_parsed_once(tiny_pairs):
    assert all(f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
               for f in dataclasses.fields(StreamSpec))
    from launcher.training.inputs import resolve_inputs
    cfg = load_config(TINY, [f"data.train={tiny_pairs['train']}"])
    spec = resolve_inputs(cfg).spec(cfg, "train")
    d = DataConfig()
    for k in ("seed", "bucket_window", "num_streams", "shuffle_block", "max_bad_samples", "pack"):
        assert getattr(spec, k) == getattr(cfg.data, k), k
    assert (spec.seed, spec.bucket_window) == (d.seed, d.bucket_window) == (1234, 8)
    cfg = load_config(TINY, ["data.objective=ul2",
                             "data.mixture=[{source: a, weight: 2}, {source: b, objective: pairs}]"])
    assert cfg.data.ul2 == default_table()                      # the effective table, in the saved config too
    assert cfg.data.mixture == [MixtureEntry("a", 2.0, "ul2", "", "0", "text", "src", "tgt"),
                                MixtureEntry("b", 1.0, "pairs", "", "1", "text", "src", "tgt")]


def test_eval_builds_the_trainers_validation_stream(tiny_pairs, tmp_path):
    from launcher.hf.card import CONFIG_FILE
    from launcher.hf.evaluate import _spec
    from launcher.training.inputs import resolve_inputs
    cfg = load_config(TINY, [f"data.train={tiny_pairs['train']}", f"data.valid={tiny_pairs['valid']}",
                             "data.max_bad_samples=7", "data.seed=99", "data.num_streams=3", "data.shuffle_block=32"])
    inputs = resolve_inputs(cfg)
    want = inputs.spec(cfg, "valid", global_batch=16)
    os.makedirs(tmp_path / "hf")
    (tmp_path / "hf" / CONFIG_FILE).write_text(yaml.safe_dump(config_to_dict(cfg)))
    shutil.copyfile(inputs.tokenizer_path, tmp_path / "hf" / "tokenizer.json")
    got = _spec(str(tmp_path / "hf"), tiny_pairs["valid"], None, 16)
    assert (got.data, got.vocab, got.global_batch, got.shuffle) == (want.data, want.vocab, 16, False)
    assert got.components[0].shards == want.components[0].shards and got.epoch_positions == want.epoch_positions


def _train_and_resume_from_old_state(data, tokenizer, base):
    common = ("data.num_workers=1", "data.num_streams=2", "data.shuffle_block=4", f"data.tokenizer={tokenizer}")
    old, new = os.path.join(base, "old"), os.path.join(base, "new")
    train(data, new, *common, "train.steps=2", "checkpoint.every=2")
    path = os.path.join(old, "checkpoints", "step00000002", "trainer_state.json")
    if dist.get_rank() == 0:
        shutil.copytree(new, old)
        with open(path) as f:
            st = json.load(f)
        counters = st["data"].pop("counters")          # the layout written before the counters were the stream's
        with open(path, "w") as f:
            json.dump({**st, "data_counters": counters}, f)
    dist.barrier()
    train(data, old, *common, "train.steps=3")
    train(data, new, *common, "train.steps=3")
    with open(os.path.join(new, "checkpoints", "step00000002", "trainer_state.json")) as f:
        counters = json.load(f)["data"]["counters"]
    return {"counters": counters, "old": metrics(old), "new": metrics(new)}


def test_counters_are_the_streams_state_and_old_checkpoints_resume(tiny_pairs, tmp_path):
    """Bad samples counted up to a checkpoint are in its data state and go on from there after a
    resume; a checkpoint with the older layout (top-level "data_counters") resumes the same."""
    data = write_shards(str(tmp_path / "bad"), (10, 10, 10, 10), bad=BAD)
    res = run_ranks(2, _train_and_resume_from_old_state, data, tiny_pairs["train"], str(tmp_path), tmp=str(tmp_path))
    assert res["counters"]["bad_samples"] == res["new"]["2"]["skipped_samples"] > 0
    same = ("loss", "grad_norm", "skipped_samples", "packing_dropped_tokens", "tokens_seen")
    assert [res["old"]["3"][k] for k in same] == [res["new"]["3"][k] for k in same]
    assert res["new"]["3"]["skipped_samples"] >= res["counters"]["bad_samples"]
