"""Import: start pretraining from a stock Hugging Face Pegasus / Marian folder.

The folders are made by transformers itself (random init, save_pretrained) with the training
data's tokenizer. HF -> encdec checkpoint -> HF must be bitwise equal; a real Trainer started
from the folder (checkpoint.resume=HF_DIR) must hold exactly those weights in its DeepSpeed
engine (saved at step 0 and exported again: bitwise equal) and its first loss must be the HF
model's own loss on the same batch.
"""
import os

import pytest
import torch
from ckpt_helpers import metrics, run_ranks, trainer

from launcher.checkpoint.format import CheckpointError

VOCAB, REAL = 360, 359           # the tiny data's tokenizer has 359 tokens, padded to 360


def make_hf(out: str, norm: str, tokenizer_dir: str, seed: int = 0) -> str:
    from transformers import MarianConfig, MarianMTModel, PegasusConfig, PegasusForConditionalGeneration
    from data.tokenizer import save_hf_tokenizer
    common = dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                  decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                  activation_function="relu", dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                  scale_embedding=True, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                  forced_eos_token_id=None, tie_word_embeddings=True)
    torch.manual_seed(seed)
    if norm == "pre":
        model = PegasusForConditionalGeneration(PegasusConfig(**common))
    else:
        model = MarianMTModel(MarianConfig(decoder_vocab_size=VOCAB, share_encoder_decoder_embeddings=True, **common))
    with torch.no_grad():
        model.final_logits_bias[0, REAL:] = -1e9                # padding row, as encdec exports it
        for n, p in model.named_parameters():                   # nonzero biases and norms too
            if "embed_positions" not in n:
                p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(out)
    save_hf_tokenizer(os.path.join(tokenizer_dir, "tokenizer.json"), out, model_max_length=24)
    return out


def _st(path):
    from safetensors.torch import load_file
    return load_file(os.path.join(path, "model.safetensors"))


def assert_same_weights(src_dir, out_dir):
    a, b = _st(src_dir), _st(out_dir)
    for k, v in a.items():
        assert k in b, k
        assert v.dtype == b[k].dtype and torch.equal(v, b[k]), k
    assert set(b) - set(a) <= {"model.encoder.embed_positions.weight", "model.decoder.embed_positions.weight"}


@pytest.fixture(scope="module", params=["pre", "post"])
def hf_folder(request, tiny_pairs, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"hf_{request.param}")
    return request.param, make_hf(str(tmp / "hf"), request.param, tiny_pairs["train"])


def test_hf_encdec_hf_round_trip_is_bitwise(hf_folder, tmp_path):
    from transformers import AutoConfig
    from launcher.hf.export import convert
    from launcher.hf.importer import import_hf
    norm, hf = hf_folder
    st = import_hf(hf, str(tmp_path / "ckpt"), progress=False)
    assert st["config"]["model"]["norm"] == norm and st["config"]["model"]["real_vocab_size"] == REAL
    convert(str(tmp_path / "ckpt"), str(tmp_path / "back"), progress=False)
    assert_same_weights(hf, str(tmp_path / "back"))
    c0, c1 = AutoConfig.from_pretrained(hf), AutoConfig.from_pretrained(tmp_path / "back")
    for k in ("model_type", "vocab_size", "d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads",
              "encoder_ffn_dim", "activation_function", "max_position_embeddings", "scale_embedding",
              "pad_token_id", "eos_token_id", "decoder_start_token_id", "tie_word_embeddings"):
        assert getattr(c0, k) == getattr(c1, k), k


def test_refuses_what_it_cannot_represent(hf_folder, tmp_path):
    import shutil
    from safetensors.torch import load_file, save_file
    from launcher.hf.importer import import_hf
    _, hf = hf_folder
    bad = tmp_path / "bad"
    shutil.copytree(hf, bad)
    sd = load_file(bad / "model.safetensors")
    sd["final_logits_bias"][0, 5] = 0.5
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="final_logits_bias holds trained values"):
        import_hf(str(bad), str(tmp_path / "x"), progress=False)


def _continue(data, base, hf, norm):
    """Start a real run from the HF folder; save at step 0 (before any update), then train 2 steps."""
    over = (f"model.norm={norm}", "parallel.zero_stage=2", "train.steps=2", "train.micro_batch_size=8",
            f"checkpoint.resume={hf}", "optim.lr=1e-3")
    t = trainer(data, os.path.join(base, "run"), *over)
    assert t.step == 0
    t.save_checkpoint()
    first = next(iter(t.inputs.stream(t.cfg, "train", 0, 1)))   # the batch of step 1 (dp=1, accum 1)
    torch.save(first, os.path.join(base, "first_batch.pt"))
    t.train()
    # the same from the folder imported as an encdec (layout-free) checkpoint
    from launcher.hf.importer import import_hf
    import_hf(hf, os.path.join(base, "imported"), progress=False)
    over = over[:-2] + (f"checkpoint.resume={os.path.join(base, 'imported')}", over[-1])
    trainer(data, os.path.join(base, "run2"), *over).train()
    return {"loss1": metrics(os.path.join(base, "run"))[1]["loss"],
            "imported": [metrics(os.path.join(base, "run2"))[s]["loss"] for s in (1, 2)],
            "direct": [metrics(os.path.join(base, "run"))[s]["loss"] for s in (1, 2)]}


def test_trainer_starts_from_hf_folder(hf_folder, tiny_pairs, tmp_path):
    from transformers import AutoModelForSeq2SeqLM
    from launcher.hf.export import convert
    norm, hf = hf_folder
    res = run_ranks(1, _continue, tiny_pairs["train"], str(tmp_path), hf, norm, tmp=str(tmp_path))
    convert(str(tmp_path / "run" / "checkpoints" / "step00000000"), str(tmp_path / "step0"), progress=False)
    assert_same_weights(hf, str(tmp_path / "step0"))          # the engine held exactly the HF weights
    b = torch.load(tmp_path / "first_batch.pt", weights_only=True)
    model = AutoModelForSeq2SeqLM.from_pretrained(hf).eval()
    with torch.no_grad():
        logits = model(input_ids=b["src"], attention_mask=b["src_mask"].long(), decoder_input_ids=b["tgt_in"]).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), b["labels"].flatten(), ignore_index=-100)
    assert res["loss1"] == pytest.approx(loss.item(), rel=1e-6)
    assert res["imported"] == res["direct"]
