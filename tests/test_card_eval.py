"""The exported folder's model card and `encdec eval`, on a tiny trained t5 (real trainer, real shards).

The card's figures (steps, tokens, last train and eval rows, parameter count) must be the run's;
`encdec eval` through transformers must give the trainer's own validation loss on the same
shards; `encdec generate` truncates inputs longer than the model's positions with a warning.
"""
import json
import os

import pytest
from ckpt_helpers import metrics, run_ranks, train

T5 = ("model.arch=t5", "model.layer_norm_eps=1e-6", "model.relative_attention_num_buckets=8",
      "model.relative_attention_max_distance=16")


def _train(data, valid, out):
    train(data, out, *T5, f"data.valid={valid}", "train.steps=4", "train.global_batch_size=8",
          "train.micro_batch_size=4", "train.precision=fp32", "optim.lr=3e-3", "parallel.zero_stage=1",
          "checkpoint.every=0")
    return True


@pytest.fixture(scope="module")
def exported(tiny_pairs, tmp_path_factory):
    from launcher.hf.export import convert
    base = tmp_path_factory.mktemp("card")
    run_ranks(1, _train, tiny_pairs["train"], tiny_pairs["valid"], str(base / "run"), tmp=str(base))
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


def test_eval_loss_equals_trainers_validation_loss(exported, tiny_pairs, tmp_path, capsys):
    from launcher.cli import main
    run, hf = exported
    out = tmp_path / "eval.json"
    assert main(["eval", hf, tiny_pairs["valid"], "--json", str(out), "--batch-size", "8", "--max-generate", "16"]) == 0
    stdout = capsys.readouterr().out
    res = json.loads(out.read_text())
    evals = [json.loads(x) for x in open(os.path.join(run, "metrics.jsonl")) if '"eval"' in x]
    assert res["loss"] == pytest.approx(evals[-1]["loss"], rel=1e-5)
    assert res["generated"] == 16 and 0 <= res["chrf"] <= 100 and "loss" in stdout and "chrf" in stdout


def test_generate_truncates_long_inputs_with_a_warning(tiny_pairs, tmp_path, capsys):
    from launcher.cli import main
    from tests.test_import_hf import make_hf
    hf = make_hf(str(tmp_path / "pegasus"), "pre", tiny_pairs["train"])      # 64 positions, model_max_length 24
    words = " ".join(["three thousand and forty-two"] * 50)                  # 200 words: IndexError before
    assert main(["generate", hf, words, "--max-new-tokens", "4"]) == 0
    assert "more than the model's 24: truncated" in capsys.readouterr().err
