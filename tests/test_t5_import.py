"""Continue pretraining from a Hugging Face T5ForConditionalGeneration folder (model.arch=t5).

The folder is made by transformers (random init, every parameter perturbed, untied lm_head,
save_pretrained) with the training data's tokenizer. HF -> encdec checkpoint -> HF is bitwise;
a real Trainer started with checkpoint.resume=HF_DIR holds exactly the folder's weights (saved at
step 0 and exported again: bitwise) and its first loss is the HF model's own loss on that batch.
"""
import json
import os
import shutil

import pytest
import torch
from ckpt_helpers import metrics, run_ranks, trainer

from launcher.checkpoint.format import CheckpointError

VOCAB = 360                           # the tiny data's 359 tokens padded to 360 (test-tiny: vocab_multiple 8)
T5 = ("model.arch=t5", "model.layer_norm_eps=1e-6", "model.relative_attention_num_buckets=8",
      "model.relative_attention_max_distance=16", "model.max_positions=64")


def make_t5(out: str, tokenizer_dir: str, seed: int = 0) -> str:
    from transformers import T5Config, T5ForConditionalGeneration
    from data.tokenizer import save_hf_tokenizer
    from reference import untie_head
    cfg = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
                   feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0,
                   n_positions=64)
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(cfg)
    untie_head(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(out)
    with open(os.path.join(out, "config.json")) as f:          # as the published v1.1 configs say it
        c = json.load(f)
    c["tie_word_embeddings"] = False
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(c, f)
    save_hf_tokenizer(os.path.join(tokenizer_dir, "tokenizer.json"), out, model_max_length=24)
    return out


def _st(path):
    from safetensors.torch import load_file
    return load_file(os.path.join(path, "model.safetensors"))


def assert_same_weights(a_dir, b_dir):
    a, b = _st(a_dir), _st(b_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def t5_folder(tiny_pairs, tmp_path_factory):
    return make_t5(str(tmp_path_factory.mktemp("t5") / "hf"), tiny_pairs["train"])


def test_t5_hf_encdec_hf_bitwise_and_refusals(t5_folder, tmp_path):
    from launcher.hf.export import convert
    from launcher.hf.importer import import_hf
    st = import_hf(t5_folder, str(tmp_path / "ckpt"), progress=False)
    m = st["config"]["model"]
    assert (m["arch"], m["head_dim"], m["tie_embeddings"], m["real_vocab_size"]) == ("t5", 8, False, 359)
    convert(str(tmp_path / "ckpt"), str(tmp_path / "back"), progress=False)
    assert_same_weights(t5_folder, str(tmp_path / "back"))
    with open(tmp_path / "back" / "config.json") as f:
        c = json.load(f)
    assert (c["model_type"], c["feed_forward_proj"], c["tie_word_embeddings"], c["decoder_start_token_id"]) == \
        ("t5", "gated-gelu", False, 0)
    with open(tmp_path / "back" / "tokenizer_config.json") as f:
        assert json.load(f)["model_max_length"] == 64             # n_positions of the folder
    # what the model cannot represent: one line naming the field
    bad = tmp_path / "relu"
    shutil.copytree(t5_folder, bad)
    c = json.loads((bad / "config.json").read_text())
    c["feed_forward_proj"] = "relu"
    (bad / "config.json").write_text(json.dumps(c))
    with pytest.raises(CheckpointError, match="feed_forward_proj='relu' is not supported"):
        import_hf(str(bad), str(tmp_path / "x"), progress=False)


def _continue(data, base, hf):
    over = (*T5, "parallel.zero_stage=2", "train.steps=2", "train.micro_batch_size=8", f"checkpoint.resume={hf}",
            "optim.lr=1e-3")
    t = trainer(data, os.path.join(base, "run"), *over)
    assert t.step == 0
    t.save_checkpoint()
    torch.save(next(iter(t.inputs.stream(t.cfg, "train", 0, 1))), os.path.join(base, "first_batch.pt"))
    t.train()
    return {"loss1": metrics(os.path.join(base, "run"))[1]["loss"]}


def test_trainer_continues_from_t5_folder(t5_folder, tiny_pairs, tmp_path):
    from transformers import T5ForConditionalGeneration
    from launcher.hf.export import convert
    res = run_ranks(1, _continue, tiny_pairs["train"], str(tmp_path), t5_folder, tmp=str(tmp_path))
    convert(str(tmp_path / "run" / "checkpoints" / "step00000000"), str(tmp_path / "step0"), progress=False)
    assert_same_weights(t5_folder, str(tmp_path / "step0"))
    b = torch.load(tmp_path / "first_batch.pt", weights_only=True)
    model = T5ForConditionalGeneration.from_pretrained(t5_folder).eval()
    with torch.no_grad():
        out = model(input_ids=b["src"], attention_mask=b["src_mask"].long(), decoder_input_ids=b["tgt_in"],
                    labels=b["labels"])
    assert res["loss1"] == pytest.approx(out.loss.item(), rel=1e-5)
