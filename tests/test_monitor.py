"""Monitor: metrics.jsonl, a real offline wandb run read back from its .wandb log, run-id reuse,
no secrets on disk, rank != 0 silent."""
import glob
import io
import json
import os
import struct
import time

import pytest

from launcher.monitor import metrics as mon
from launcher.config import RunConfig

FAKE_KEY = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c"     # shaped like a wandb API key (40 hex)
TRAIN_KEYS = ["loss", "lr", "grad_norm", "tokens_per_s", "tokens_per_s_per_device", "samples_per_s", "mfu",
              "step_time_s", "data_wait_frac", "peak_mem_gb", "skipped_samples"]


def read_wandb_log(path):
    """Records of a .wandb transaction log, parsed with wandb's own protobuf (wandb 0.31 ships no
    Python reader for the file itself). Framing: a 7-byte header (':W&B', magic 0xBEE1, version),
    then LevelDB-log chunks in 32 KiB blocks: crc32c (4), length (2), type (1: full, 2: first,
    3: middle, 4: last)."""
    from wandb.proto import wandb_internal_pb2 as pb
    data = open(path, "rb").read()
    assert data[:4] == b":W&B" and struct.unpack("<H", data[4:6])[0] == 0xBEE1, path
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:                        # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if pos + 7 + length > len(data):    # a chunk still being written
            break
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 2):
            pending = chunk
        elif kind in (3, 4):
            pending += chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(pending)
            records.append(rec)
    return records


def complete_log(wandb_file, timeout=60.0):
    """The records of a finished run's log. wandb's service process may still be flushing the file
    when finish() returns, so wait (bounded) for the final `exit` record."""
    deadline = time.monotonic() + timeout
    while True:
        records = read_wandb_log(wandb_file)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.1)


def history_and_config(wandb_file):
    rows, config, run_id = [], {}, None
    for rec in complete_log(wandb_file):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            rows.append({(it.key or "/".join(it.nested_key)): json.loads(it.value_json) for it in rec.history.item})
        elif kind == "run":
            config.update({u.key: json.loads(u.value_json) for u in rec.run.config.update})
            run_id = rec.run.run_id
    return rows, config, run_id


def train_metrics(step):
    return {"loss": 5.0 / step, "lr": 1e-4 * step, "grad_norm": 1.5, "tokens_per_s": 1000.0 * step,
            "tokens_per_s_per_device": 500.0 * step, "samples_per_s": 10.0, "mfu": None, "step_time_s": 0.25,
            "data_wait_frac": 0.01, "peak_mem_gb": 0.0, "skipped_samples": 2}


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    wdir = tmp_path / "wandb_home"
    for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(wdir / var.lower()))
        os.makedirs(wdir / var.lower(), exist_ok=True)
    monkeypatch.setenv("WANDB_MODE", "offline")            # wins over cfg.wandb.mode below
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("WANDB_SILENT", "true")
    return wdir


def make_cfg():
    cfg = RunConfig(name="mon-test")
    cfg.train.steps = 100
    cfg.wandb.mode = "disabled"
    cfg.wandb.tags = ["t1", "t2"]
    cfg.wandb.group = "g"
    # A secret inside a config value (a pipe: URL with a bearer token) must not reach wandb.
    cfg.data.train = f"pipe:curl -s -H 'Authorization: Bearer {FAKE_KEY}' https://u:pw@host/s-{{0..3}}.tar"
    return cfg


def test_offline_run_resume_and_no_secrets(tmp_path, wandb_env):
    run_dir = str(tmp_path / "run")
    cfg = make_cfg()
    out = io.StringIO()
    m = mon.Monitor(cfg, run_dir, is_rank0=True, extra_config={"world_size": 2}, stream=out)
    first_id = m.run_id
    assert first_id and open(os.path.join(run_dir, "wandb_run_id")).read().strip() == first_id
    for step in (10, 20, 30):
        m.log(step, train_metrics(step))
    m.log_eval(30, {"loss": 2.5, "ppl": 12.18, "bleu": 11.0},
               table_rows=[{"source": "a b", "reference": "x y", "hypothesis": "x z"}])
    m.close()
    assert "step 30/100 (30.0%) | loss 0.1667 | lr 3.00e-03 | 30,000 tok/s | ETA" in out.getvalue()

    files = glob.glob(str(wandb_env / "wandb_dir" / "wandb" / f"offline-run-*-{first_id}" / f"run-{first_id}.wandb"))
    assert len(files) == 1, files
    rows, config, rid = history_and_config(files[0])
    assert rid == first_id
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == [10, 20, 30]
    for key in TRAIN_KEYS:
        if key != "mfu":                                   # None values are not logged by wandb
            assert all(f"train/{key}" in r for r in train_rows), key
    assert [r["train/loss"] for r in train_rows] == pytest.approx([0.5, 0.25, 5 / 30])
    eval_rows = [r for r in rows if "eval/loss" in r]
    assert len(eval_rows) == 1 and eval_rows[0]["step"] == 30 and eval_rows[0]["eval/bleu"] == 11.0
    assert eval_rows[0]["eval/samples/nrows"] == 1            # the wandb table (stored as a file reference)
    # Full effective config, secrets removed.
    assert config["model"]["d_model"] == cfg.model.d_model and config["train"]["steps"] == 100
    assert config["run_info"] == {"world_size": 2} and config["wandb"]["tags"] == ["t1", "t2"]
    assert config["data"]["train"] == "pipe:curl -s -H 'Authorization: Bearer ***' https://***@host/s-{0..3}.tar"

    # The same run folder continues the same wandb run, and metrics.jsonl is appended to.
    m2 = mon.Monitor(cfg, run_dir, is_rank0=True, console=False)
    assert m2.run_id == first_id
    m2.log(40, train_metrics(40))
    m2.close()
    files = sorted(glob.glob(str(wandb_env / "wandb_dir" / "wandb" / "offline-run-*" / "run-*.wandb")))
    assert len(files) == 2 and files[0].endswith(f"run-{first_id}.wandb") and files[1].endswith(f"run-{first_id}.wandb")
    # Two offline folders of the same run id (asserted by name above); together they hold every step.
    steps = set()
    for f in files:
        rows_f, _config, rid_f = history_and_config(f)
        assert rid_f in (None, first_id)
        steps |= {r["step"] for r in rows_f if "train/loss" in r}
    assert steps == {10, 20, 30, 40}
    lines = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert [(r["kind"], r["step"]) for r in lines] == [("train", 10), ("train", 20), ("train", 30),
                                                        ("eval", 30), ("train", 40)]
    assert set(TRAIN_KEYS) <= set(lines[0]) and lines[0]["mfu"] is None and lines[3]["ppl"] == 12.18
    samples = [json.loads(x) for x in open(os.path.join(run_dir, "eval_samples.jsonl"))]
    assert samples == [{"step": 30, "rows": [{"source": "a b", "reference": "x y", "hypothesis": "x z"}]}]

    # The API key is nowhere on disk: run folder, wandb dirs (run files, logs, config, cache).
    scanned = 0
    for root, _dirs, names in os.walk(tmp_path):
        for name in names:
            path = os.path.join(root, name)
            if os.path.isfile(path):
                scanned += 1
                assert FAKE_KEY.encode() not in open(path, "rb").read(), path
    assert scanned >= 8


def test_rank_nonzero_is_a_noop(tmp_path, wandb_env):
    run_dir = tmp_path / "run1"
    m = mon.Monitor(make_cfg(), str(run_dir), is_rank0=False)
    m.log(1, train_metrics(1))
    m.log_eval(1, {"loss": 1.0}, table_rows=[{"a": 1}])
    m.close()
    assert m.run_id is None and not run_dir.exists()
    assert not os.listdir(wandb_env / "wandb_dir")


def test_disabled_writes_jsonl_only(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run_dir = tmp_path / "run"
    cfg = make_cfg()
    with mon.Monitor(cfg, str(run_dir), is_rank0=True, console=False) as m:
        assert m.wandb_run is None
        m.log(5, {"loss": 1.0, "note": f"key={FAKE_KEY}"})
    assert sorted(os.listdir(run_dir)) == ["metrics.jsonl"]
    row = json.loads(open(run_dir / "metrics.jsonl").read())
    assert row["kind"] == "train" and row["step"] == 5 and row["note"] == "key=***"


def test_mode_resolution_and_run_id(tmp_path):
    assert mon.resolve_mode("offline", {}) == "offline"
    assert mon.resolve_mode("online", {"WANDB_MODE": "disabled"}) == "disabled"
    assert mon.resolve_mode("disabled", {"WANDB_MODE": "dryrun"}) == "offline"
    with pytest.raises(ValueError, match="WANDB_MODE='loud'"):
        mon.resolve_mode("offline", {"WANDB_MODE": "loud"})
    rid = mon.run_id(str(tmp_path))
    assert rid == mon.run_id(str(tmp_path)) and len(rid) == 8
    (tmp_path / "wandb_run_id").write_text("../etc\n")
    with pytest.raises(ValueError, match="not a valid wandb run id"):
        mon.run_id(str(tmp_path))


def test_scrub():
    env = {"WANDB_API_KEY": "abcdefgh12345", "HF_TOKEN": "hf_" + "x" * 34, "PATH": "/usr/bin:/bin", "SHORT_KEY": "ab"}
    vals = mon.secret_values(env)
    assert vals == sorted(["abcdefgh12345", "hf_" + "x" * 34], key=len, reverse=True)
    d = {"api_key": "v", "wandb_key": "v2", "eos_token": "</s>", "pad_id": 0, "tokens_per_s": 3.0, "password": "",
         "nested": [{"secret": 1}, "s3://me:pw@bucket/x", "see abcdefgh12345 here", "wandb_v1_AbC123_xyz ok"]}
    assert mon.scrub(d, vals) == {"api_key": "***", "wandb_key": "***", "eos_token": "</s>", "pad_id": 0,
                                  "tokens_per_s": 3.0, "password": "",
                                  "nested": [{"secret": "***"}, "s3://***@bucket/x", "see *** here", "*** ok"]}


def test_progress_line():
    line = mon.progress_line(250, 1000, {"loss": 2.0, "lr": 3e-4, "tokens_per_s": 12345.6, "mfu": 0.415}, 3725)
    assert line == "step 250/1000 (25.0%) | loss 2.0000 | lr 3.00e-04 | 12,346 tok/s | mfu 41.5% | ETA 1h02m"
    assert mon.progress_line(1, 10, {}, None) == "step 1/10 (10.0%) | ETA ?"
