"""The exported folder's model card and `encdec eval`, on a tiny trained t5 (real trainer, real shards).

The card's figures (steps, tokens, last train and eval rows, parameter count) must be the run's;
`encdec eval` through transformers must give the trainer's own validation loss on the same
shards, and by default score the same examples as the trainer's evaluation (train.eval_generate:
the same count, the same BLEU/chrF, from 2 ranks); the clean run leaves no run.lock; `encdec generate`
truncates inputs longer than the model's positions with a warning.
"""
import json
import os
import re

import pytest
from ckpt_helpers import metrics, run_ranks, train

T5 = ("model.arch=t5", "model.layer_norm_eps=1e-6", "model.relative_attention_num_buckets=8",
      "model.relative_attention_max_distance=16")


def _train(data, valid, out):
    train(data, out, *T5, f"data.valid={valid}", "train.steps=4", "train.global_batch_size=8",
          "train.micro_batch_size=4", "train.precision=fp32", "optim.lr=3e-3", "parallel.zero_stage=1",
          "checkpoint.every=0", "train.eval_generate=21")
    return True


@pytest.fixture(scope="module")
def exported(tiny_pairs, tmp_path_factory):
    from launcher.hf.export import convert
    base = tmp_path_factory.mktemp("card")
    run_ranks(2, _train, tiny_pairs["train"], tiny_pairs["valid"], str(base / "run"), tmp=str(base))
    convert(str(base / "run"), str(base / "hf"), progress=False)
    return str(base / "run"), str(base / "hf")


def test_card_figures_are_the_runs(exported):
    from model import count_parameters
    from launcher.checkpoint.format import read_state, resolve_checkpoint
    from launcher.config import config_from_dict
    run, hf = exported
    card = json.loads(open(os.path.join(hf, "encdec_card.json")).read())
    root, tag = resolve_checkpoint(run)
    state = read_state(os.path.join(root, tag))
    train_rows = metrics(run)
    evals = [json.loads(x) for x in open(os.path.join(run, "metrics.jsonl")) if '"eval"' in x]
    assert card["step"] == state["step"] == 4 and card["tokens_seen"] == state["tokens_seen"] > 0
    assert card["train_metrics"]["loss"] == train_rows[4]["loss"]
    assert card["eval_metrics"]["loss"] == evals[-1]["loss"] and card["eval_metrics"]["step"] == 4
    cfg = config_from_dict(state["config"])
    assert card["parameters"] == count_parameters(cfg.model) == sum(
        t.numel() for t in __import__("safetensors.torch").torch.load_file(os.path.join(hf, "model.safetensors")).values())
    assert card["class"] == "T5ForConditionalGeneration" and card["data"][0]["samples"] > 0
    readme = open(os.path.join(hf, "README.md")).read()
    for s in (f"| parameters | {card['parameters']:,} |", f"| steps | {card['step']:,} |",
              f"loss {card['train_metrics']['loss']:.6g}", "AutoModelForSeq2SeqLM", "arch: t5"):
        assert s in readme, s
    assert json.loads(open(os.path.join(hf, "tokenizer_config.json")).read())["model_max_length"] == 24


def test_eval_loss_and_scored_examples_equal_the_trainers(exported, tiny_pairs, tmp_path, capsys):
    from launcher.cli import main
    run, hf = exported
    assert not os.path.exists(os.path.join(run, "run.lock"))          # released (removed) by the clean exit
    out = tmp_path / "eval.json"
    assert main(["eval", hf, tiny_pairs["valid"], "--json", str(out), "--batch-size", "8"]) == 0
    stdout = capsys.readouterr().out
    res = json.loads(out.read_text())
    evals = [json.loads(x) for x in open(os.path.join(run, "metrics.jsonl")) if '"eval"' in x]
    assert res["loss"] == pytest.approx(evals[-1]["loss"], rel=1e-5)
    # the trainer's evaluation (2 ranks: 11 positions each, one past 21 dropped) and `encdec eval`
    # score the same first 21 validation examples
    assert res["generated"] == evals[-1]["generated"] == 21 and re.search(r"^generated +21$", stdout, re.M)
    assert res["chrf"] == pytest.approx(evals[-1]["chrf"], abs=1e-6)
    assert res["bleu"] == pytest.approx(evals[-1]["bleu"], abs=1e-6)
    assert 0 <= res["chrf"] <= 100 and "loss" in stdout and "chrf" in stdout
    # ... in stream order: the trainer's table rows are the validation stream's first sources
    from tokenizers import Tokenizer
    from data.stream import DataStream
    from launcher.hf.evaluate import _spec
    tok, srcs = Tokenizer.from_file(os.path.join(hf, "tokenizer.json")), []
    for b in DataStream(_spec(hf, tiny_pairs["valid"], None, 8), 0, 1, 8):
        srcs += [tok.decode(b["src"][i][b["src_mask"][i]].tolist(), skip_special_tokens=True) for i in range(8)]
        if len(srcs) >= 21:
            break
    table = json.loads(open(os.path.join(run, "eval_samples.jsonl")).read().splitlines()[-1])["rows"]
    assert [r["source"] for r in table] == srcs[:21]


def test_generate_truncates_long_inputs_with_a_warning(tiny_pairs, tmp_path, capsys):
    from launcher.cli import main
    from tests.test_import_hf import make_hf
    hf = make_hf(str(tmp_path / "pegasus"), "pre", tiny_pairs["train"])      # 64 positions, model_max_length 24
    words = " ".join(["three thousand and forty-two"] * 50)                  # 200 words: IndexError before
    assert main(["generate", hf, words, "--max-new-tokens", "4"]) == 0
    assert "more than the model's 24: truncated" in capsys.readouterr().err
