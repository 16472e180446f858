"""Any Hugging Face T5 folder imports and trains: the head as the folder means it, any vocabulary size.

The folders are saved by the installed transformers with each convention of the head (what T5
calls tied is the d_model^-0.5 rescale of the decoder output before a head that is shared.weight):
    tied       T5Config(tie_word_embeddings=True): config.json scale_decoder_outputs=true, no lm_head
    ordinary   T5Config(tie_word_embeddings=False), as users build v1.1: transformers 5 reports and
               saves tie_word_embeddings=true with scale_decoder_outputs=false and a shared head
               (no lm_head tensor): not rescaled -> untied, the head starts as shared.weight
    untied     an lm_head of its own (as the published v1.1 folders)
plus config.json as transformers 4 wrote it (no scale_decoder_outputs), lm_head tensors equal to
shared.weight, mT5, and the refusal of a rescaled head that differs from shared.weight.

Vocabulary: folders of 1100 rows (the 359-token tiny tokenizer) and of 32128 rows with a
32100-token tokenizer start a real run (2 gloo ranks, tp 2, dropout 0.1, loader workers 1, ZeRO
1/2/3) with the run's vocab_multiple; its rows are kept (padded, never cut), the run records
export_vocab_size, and `encdec convert` writes the folder's row count back. A Pegasus folder of
1100 rows goes the same generic way.
"Unchanged" weights are the step-0 checkpoint (saved by the started run before any update): its
export holds every tensor of the folder bitwise, and AutoModelForSeq2SeqLM gives bitwise the
source's logits. After 3 steps the exported folder computes our trained model's function (loss
equal; the padded rows past the folder's stayed exactly zero: never predicted).
"""
import json
import os
import shutil

import pytest
import torch
from ckpt_helpers import consolidated, run_ranks, trainer

from launcher.checkpoint.format import CheckpointError
from tests.conftest import run_cli

T5 = ("model.arch=t5", "model.layer_norm_eps=1e-6", "model.relative_attention_num_buckets=8",
      "model.relative_attention_max_distance=16", "model.max_positions=64")


def make_folder(out: str, tok_json: str, vocab: int, convention: str, seed: int = 0, mt5: bool = False) -> str:
    """A T5 folder saved by the installed transformers (every parameter perturbed) with a tokenizer."""
    from transformers import MT5Config, MT5ForConditionalGeneration, T5Config, T5ForConditionalGeneration
    from data.tokenizer import save_hf_tokenizer
    from reference import untie_head
    kw = dict(vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
              relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.1,
              feed_forward_proj="gated-gelu", decoder_start_token_id=0, n_positions=64)
    torch.manual_seed(seed)
    if mt5:
        model = MT5ForConditionalGeneration(MT5Config(**kw))
    else:
        model = T5ForConditionalGeneration(T5Config(**kw, tie_word_embeddings=convention == "tied"))
    if convention == "untied":
        untie_head(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(out)
    save_hf_tokenizer(tok_json, out, model_max_length=24)
    return out


def make_pegasus(out: str, tok_json: str, vocab: int, real: int, seed: int = 0) -> str:
    """The seed architecture's folder (PegasusForConditionalGeneration): its padding rows -1e9 in final_logits_bias."""
    from transformers import PegasusConfig, PegasusForConditionalGeneration
    from data.tokenizer import save_hf_tokenizer
    torch.manual_seed(seed)
    model = PegasusForConditionalGeneration(PegasusConfig(
        vocab_size=vocab, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        activation_function="relu", dropout=0.1, attention_dropout=0.0, activation_dropout=0.0, scale_embedding=True,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, forced_eos_token_id=None, tie_word_embeddings=True))
    with torch.no_grad():
        model.final_logits_bias[0, real:] = -1e9
        for n, p in model.named_parameters():
            if "embed_positions" not in n:
                p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(out)
    save_hf_tokenizer(tok_json, out, model_max_length=24)
    return out


def _json(folder) -> dict:
    with open(os.path.join(folder, "config.json")) as f:
        return json.load(f)


def _edit(src, dst, config=None, tensors=None) -> str:
    """A copy of folder src with config.json keys set (None: removed) and tensors replaced."""
    from safetensors.torch import load_file, save_file
    shutil.copytree(src, dst)
    c = {**_json(src), **(config or {})}
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump({k: v for k, v in c.items() if v is not None}, f)
    if tensors:
        sd = load_file(os.path.join(src, "model.safetensors"))
        sd.update({k: f(sd) for k, f in tensors.items()})
        save_file(sd, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return str(dst)


def _st(folder) -> dict:
    from safetensors.torch import load_file
    return load_file(os.path.join(folder, "model.safetensors"))


def _batch(real: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(3, real, (3, 11), generator=g)
    mask = torch.ones_like(src, dtype=torch.bool)
    mask[1, 7:] = False
    tgt = torch.randint(3, real, (3, 9), generator=g)
    labels = torch.cat([tgt[:, 1:], torch.full((3, 1), 1)], dim=1)
    tgt[:, 0] = 0
    return src, mask, tgt, labels


def _hf_logits(folder, b) -> torch.Tensor:
    from transformers import AutoModelForSeq2SeqLM
    model = AutoModelForSeq2SeqLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(input_ids=b[0], attention_mask=b[1].long(), decoder_input_ids=b[2]).logits


def assert_exported_unchanged(src, back, real):
    """Every tensor of src bitwise in back (which may add lm_head: then equal to shared.weight;
    Pegasus: the position tables), the same row count, and bitwise the same logits through
    AutoModelForSeq2SeqLM."""
    a, b = _st(src), _st(back)
    for k, v in a.items():
        assert v.dtype == b[k].dtype and torch.equal(v, b[k]), k
    assert set(b) - set(a) <= {"lm_head.weight", "model.encoder.embed_positions.weight",
                               "model.decoder.embed_positions.weight"}
    if "lm_head.weight" in set(b) - set(a):
        assert torch.equal(b["lm_head.weight"], a["shared.weight"])
    assert _json(back)["vocab_size"] == _json(src)["vocab_size"]
    batch = _batch(real)
    assert torch.equal(_hf_logits(back, batch), _hf_logits(src, batch))


# ----------------------------------------------------------------------------- the head, as written

def test_t5_head_conventions_import_as_the_folder_means(tiny_pairs, tmp_path):
    from launcher.checkpoint.hf_folder import hf_state
    from launcher.hf.export import convert
    from launcher.hf.importer import import_hf
    tok = os.path.join(tiny_pairs["train"], "tokenizer.json")
    f = {c: make_folder(str(tmp_path / c), tok, 360, c) for c in ("tied", "ordinary", "untied")}
    f["mt5"] = make_folder(str(tmp_path / "mt5"), tok, 360, "ordinary", mt5=True)
    assert (_json(f["ordinary"])["tie_word_embeddings"], _json(f["ordinary"])["scale_decoder_outputs"]) == (True, False)
    assert "lm_head.weight" not in _st(f["ordinary"]) and "lm_head.weight" in _st(f["untied"])

    def tied(folder):
        st = hf_state(folder)
        return st["config"]["model"]["tie_embeddings"], st["weights"].get("lm_head.weight", (None, None))[1]
    # as written by the installed transformers (5.x): imported, exported, the same logits
    for c, want in (("tied", (True, None)), ("ordinary", (False, "shared.weight")),
                    ("untied", (False, "lm_head.weight")), ("mt5", (False, "shared.weight"))):
        assert tied(f[c]) == want, c
        import_hf(f[c], str(tmp_path / f"{c}-ckpt"), progress=False)
        convert(str(tmp_path / f"{c}-ckpt"), str(tmp_path / f"{c}-back"), progress=False)
        assert_exported_unchanged(f[c], str(tmp_path / f"{c}-back"), 359)
    # config.json as transformers 4 wrote it (no scale_decoder_outputs), and lm_head tensors equal to shared
    shared_copy = {"lm_head.weight": lambda sd: sd["shared.weight"].clone()}
    cases = {
        "v4-untied": (f["untied"], {"tie_word_embeddings": False, "scale_decoder_outputs": None}, None, False),
        "v4-tied": (f["tied"], {"scale_decoder_outputs": None}, None, True),
        "v4-tied-implicit": (f["tied"], {"scale_decoder_outputs": None, "tie_word_embeddings": None}, None, True),
        "both-keys-tied": (f["tied"], {}, shared_copy, True),
        "both-keys-untied": (f["ordinary"], {}, shared_copy, False),
        "mt5-v4-tied": (f["mt5"], {"transformers_version": "4.40.0"}, None, True),
    }
    for name, (src, config, tensors, want) in cases.items():
        assert tied(_edit(src, tmp_path / name, config, tensors))[0] == want, name
    # a rescaled head that differs from shared.weight: one line naming the tensor and the key as written
    differs = {"lm_head.weight": lambda sd: sd["shared.weight"] + 1}
    for name, config, said in (("bad5", {}, "scale_decoder_outputs=true"),
                               ("bad4", {"scale_decoder_outputs": None}, "tie_word_embeddings=true"),
                               ("bad4-implicit", {"scale_decoder_outputs": None, "tie_word_embeddings": None},
                                "no tie_word_embeddings")):
        with pytest.raises(CheckpointError) as e:
            import_hf(_edit(f["tied"], tmp_path / name, config, differs), str(tmp_path / "x"), progress=False)
        msg = str(e.value)
        assert "\n" not in msg and f"tensor lm_head.weight differs from shared.weight, but config.json has {said}" \
            in msg, msg
    assert not os.path.exists(tmp_path / "x")
    r = run_cli(["import", str(tmp_path / "bad5"), str(tmp_path / "x")])           # as users meet it
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert r.stderr.startswith("encdec: error: ") and "config.json has scale_decoder_outputs=true" in r.stderr


# ----------------------------------------------------------------------------- any vocabulary, trained under tp 2

RUNS = {   # folder -> (convention, rows, tokenizer, run overrides, vocab_size and export_vocab_size recorded)
    "ordinary1100": ("ordinary", 1100, "tiny", (*T5, "model.vocab_multiple=128", "parallel.zero_stage=2"),
                     (1152, 1100)),
    "untied1100": ("untied", 1100, "tiny", (*T5, "parallel.zero_stage=1"), (1104, 1100)),
    "tied32128": ("tied", 32128, "big", (*T5, "parallel.zero_stage=3", "model.tie_embeddings=true"), (32128, 0)),
    # the seed architecture's adapter goes the same way (its padding rows are -1e9 in final_logits_bias)
    "pegasus1100": ("pegasus", 1100, "tiny", ("model.norm=pre", "parallel.zero_stage=2"), (1104, 1100)),
}


def _runs(data, base):
    """Each folder: a run started from it (saved at step 0, before any update), then 3 steps."""
    for name, (_, _, tok, over, _) in RUNS.items():
        t = trainer(data[tok], os.path.join(base, name), *over, "parallel.tp=2", "model.dropout=0.1",
                    "data.num_workers=1", "train.steps=3", f"checkpoint.resume={os.path.join(base, 'hf', name)}")
        assert t.step == 0
        t.save_checkpoint()
        t.train()


def _our_loss(ckpt, b):
    from model import build
    cfg, params = consolidated(ckpt)
    model = build(cfg.model).eval()
    model.load_state_dict(params)
    with torch.no_grad():
        s, n = model(b[0], b[1], b[2], labels=b[3])
    return cfg.model, params, (s / n).item()


def test_t5_folders_of_any_vocabulary_train_under_tp2(tiny_pairs, tmp_path):
    from data.prepare import prepare
    from data.tokenizer import load_tokenizer
    from launcher.hf.export import convert
    big = load_tokenizer(tiny_pairs["train"])                  # 359 tokens -> 32100, as T5's tokenizer
    big.add_tokens([f"<unused_{i}>" for i in range(32100 - big.get_vocab_size())])
    big.save(str(tmp_path / "big.json"))
    corpus = os.path.join(os.path.dirname(tiny_pairs["heldout_jsonl"]), "train.jsonl")
    prepare([corpus], str(tmp_path / "big"), objective="pairs", tokenizer=str(tmp_path / "big.json"),
            shard_size=1500, progress=False)
    data = {"tiny": tiny_pairs["train"], "big": str(tmp_path / "big")}
    toks = {"tiny": os.path.join(tiny_pairs["train"], "tokenizer.json"), "big": str(tmp_path / "big.json")}
    for i, (name, (conv, rows, tok, _, _)) in enumerate(RUNS.items()):
        if conv == "pegasus":
            make_pegasus(str(tmp_path / "hf" / name), toks[tok], rows, 359, seed=i)
        else:
            make_folder(str(tmp_path / "hf" / name), toks[tok], rows, conv, seed=i)
    run_ranks(2, _runs, data, str(tmp_path), tmp=str(tmp_path))
    from transformers import AutoModelForSeq2SeqLM
    for name, (conv, rows, tok, _, (vocab, export)) in RUNS.items():
        src, run = str(tmp_path / "hf" / name), tmp_path / name / "checkpoints"
        real = 359 if tok == "tiny" else 32100
        # unchanged: the started run's step-0 weights export to the folder's tensors, bitwise
        convert(str(run / "step00000000"), str(tmp_path / f"{name}-0"), progress=False)
        assert_exported_unchanged(src, str(tmp_path / f"{name}-0"), real)
        # trained: the run kept every row, recorded the folder's row count, and exports that function
        convert(str(run / "step00000003"), str(tmp_path / f"{name}-3"), progress=False)
        b = _batch(real, seed=1)
        mc, params, ours = _our_loss(run / "step00000003", b)
        assert (mc.vocab_size, mc.export_vocab_size, mc.real_vocab_size) == (vocab, export, real), name
        assert getattr(mc, "tie_embeddings", True) == (conv in ("tied", "pegasus")), name
        for k in ("embed.weight", "lm_head.weight"):
            if k in params:
                assert params[k].shape[0] == vocab and not params[k][rows:].any(), k   # padding: zero, never predicted
        shared = "model.shared.weight" if conv == "pegasus" else "shared.weight"
        assert not torch.equal(params["embed.weight"][:rows], _st(src)[shared]), name   # it trained
        back = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / f"{name}-3").eval()
        assert back.config.vocab_size == rows and _st(tmp_path / f"{name}-3")[shared].shape[0] == rows
        with torch.no_grad():
            logits = back(input_ids=b[0], attention_mask=b[1].long(), decoder_input_ids=b[2]).logits
        theirs = torch.nn.functional.cross_entropy(logits.flatten(0, 1), b[3].flatten()).item()
        assert ours == pytest.approx(theirs, rel=1e-5), name
