"""model.arch=bart against transformers' BartForConditionalGeneration: facebook/bart-base and -large
shaped configs map (parameter counts, key sets, shapes), mBART-style layouts are refused, and a
folder saved by transformers (BART's </s> decoder start and forced <s>) imports with `encdec import`,
converts back bitwise with `encdec convert`, loads with AutoModelForSeq2SeqLM, and computes and
greedily generates what our model does. (The perturbed-model logits both ways and the in-memory
round trip are tests/test_registry.py's, for every architecture.)"""
import json
import os

import pytest
import torch

from launcher.checkpoint.format import CheckpointError
from model import build, count_parameters, get
from tests.test_import_hf import assert_same_weights

A = get("bart").hf
# config.json of facebook/bart-base and facebook/bart-large, the fields that matter (legacy keys included)
FACEBOOK = dict(vocab_size=50265, max_position_embeddings=1024, activation_function="gelu", scale_embedding=False,
                pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2,
                add_final_layer_norm=False, normalize_before=False, normalize_embedding=True,
                static_position_embeddings=False, add_bias_logits=False, extra_pos_embeddings=2)
SHAPES = {"bart-base": (768, 6, 12, 3072, 139420416), "bart-large": (1024, 12, 16, 4096, 406291456)}


def _hf_config(name, **kw):
    from transformers import BartConfig
    d, layers, heads, ffn, _ = SHAPES[name]
    return BartConfig(**{**FACEBOOK, "d_model": d, "encoder_layers": layers, "decoder_layers": layers,
                         "encoder_attention_heads": heads, "decoder_attention_heads": heads,
                         "encoder_ffn_dim": ffn, "decoder_ffn_dim": ffn, **kw})


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_facebook_bart_configs_map(name):
    from transformers import BartForConditionalGeneration
    c = A.model_config(_hf_config(name))
    assert (c.arch, c.d_model, c.n_encoder_layers, c.activation, c.scale_embedding, c.max_positions) == \
        ("bart", SHAPES[name][0], SHAPES[name][1], "gelu", False, 1024)
    assert (c.pad_id, c.eos_id, c.decoder_start_id, c.forced_eos_id) == (1, 2, 2, 2)
    with torch.device("meta"):
        hm = BartForConditionalGeneration(A.hf_config(c))
        ours = build(c)
    n = SHAPES[name][4]                                         # the published sizes
    assert count_parameters(c) == n == sum(p.numel() for p in hm.parameters())
    theirs = {k: tuple(v.shape) for k, v in hm.state_dict().items() if k not in A.tied(c)}
    assert {k: tuple(v.shape) for k, v in A.to_hf_state_dict(ours.state_dict(), c).items()} == theirs
    assert theirs["model.encoder.embed_positions.weight"] == (1026, SHAPES[name][0])


@pytest.mark.parametrize("key", ["normalize_before", "add_final_layer_norm", "static_position_embeddings"])
def test_mbart_style_layouts_are_refused(key):
    with pytest.raises(ValueError, match=rf"^{key}=True is not supported"):
        A.model_config(_hf_config("bart-base", **{key: True}))


V = 359                                                          # the tiny data's tokenizer


def _folder(out, tokenizer_dir):
    """A BART folder as transformers saves one: facebook/bart-*'s token conventions (decoder start </s>,
    forced <s> in generation_config.json), every tensor random (large, so greedy outputs vary)."""
    from transformers import BartConfig, BartForConditionalGeneration
    from data.tokenizer import save_hf_tokenizer
    cfg = BartConfig(**{**FACEBOOK, "vocab_size": V, "d_model": 32, "encoder_layers": 2, "decoder_layers": 2,
                        "encoder_attention_heads": 4, "decoder_attention_heads": 4, "encoder_ffn_dim": 64,
                        "decoder_ffn_dim": 64, "max_position_embeddings": 40, "dropout": 0.1,
                        "attention_dropout": 0.1, "activation_dropout": 0.05})
    torch.manual_seed(0)
    model = BartForConditionalGeneration(cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (3 / p.shape[-1] ** 0.5 if p.ndim == 2 else 0.3) + (p.ndim == 1) * 1.0)
    model.generation_config.forced_bos_token_id = 0
    model.save_pretrained(out)
    save_hf_tokenizer(os.path.join(tokenizer_dir, "tokenizer.json"), out, model_max_length=32)
    return out


def test_folder_imports_converts_back_bitwise_and_generates_alike(tiny_pairs, tmp_path):
    from transformers import AutoConfig, AutoModelForSeq2SeqLM, GenerationConfig
    from launcher.hf.export import convert
    from launcher.hf.importer import import_hf
    from model.generate import greedy
    from tests.ckpt_helpers import consolidated
    hf = _folder(str(tmp_path / "hf"), tiny_pairs["train"])
    assert "forced_bos_token_id" not in json.loads((tmp_path / "hf" / "config.json").read_text())
    st = import_hf(hf, str(tmp_path / "ckpt"), progress=False)
    m = st["config"]["model"]
    assert (m["arch"], m["decoder_start_id"], m["forced_bos_id"], m["forced_eos_id"]) == ("bart", 2, 0, 2)
    assert (m["pad_id"], m["eos_id"]) == (1, 2)
    assert (m["real_vocab_size"], m["activation_dropout"], m["scale_embedding"]) == (V, 0.05, False)
    convert(str(tmp_path / "ckpt"), str(tmp_path / "back"), progress=False)
    assert_same_weights(hf, str(tmp_path / "back"))             # every tensor, bitwise (final_logits_bias too)
    c0, c1 = AutoConfig.from_pretrained(hf), AutoConfig.from_pretrained(tmp_path / "back")
    for k in ("model_type", "vocab_size", "d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads",
              "encoder_ffn_dim", "activation_function", "max_position_embeddings", "scale_embedding", "dropout",
              "attention_dropout", "activation_dropout", "pad_token_id", "eos_token_id", "decoder_start_token_id"):
        assert getattr(c0, k) == getattr(c1, k), k
    gen = GenerationConfig.from_pretrained(tmp_path / "back")
    assert (gen.decoder_start_token_id, gen.forced_bos_token_id, gen.forced_eos_token_id) == (2, 0, 2)
    cfg, params = consolidated(str(tmp_path / "ckpt"))
    ours = build(cfg.model).eval()
    ours.load_state_dict(params)
    back = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "back").eval()
    orig = AutoModelForSeq2SeqLM.from_pretrained(hf).eval()
    g = torch.Generator().manual_seed(3)
    src = torch.randint(3, V, (4, 13), generator=g)
    mask = torch.ones_like(src, dtype=torch.bool)
    mask[1, 9:] = False
    mask[3, 5:] = False
    tgt = torch.cat([torch.full((4, 1), 2), torch.randint(3, V, (4, 7), generator=g)], dim=1)
    with torch.no_grad():
        want = back(input_ids=src, attention_mask=mask.long(), decoder_input_ids=tgt).logits
        assert (ours(src, mask, tgt) - want).abs().max().item() < 1e-4
        # greedy, as the exported generation_config says (start </s>, <s> forced, </s> forced last), no arguments
        theirs = back.generate(input_ids=src, attention_mask=mask.long(), max_new_tokens=8, do_sample=False,
                               num_beams=1)
        first = orig.generate(input_ids=src, attention_mask=mask.long(), max_new_tokens=8, do_sample=False,
                              num_beams=1)
    mine = greedy(ours, src, mask, max_new_tokens=8)
    assert torch.equal(theirs, first)                           # the folder decodes as the one imported
    assert (mine[:, :2] == torch.tensor([2, 0])).all() and len({tuple(r) for r in mine[:, 2:].tolist()}) > 1
    assert mine.shape[1] == 9 and (mine[:, -1] == 2).all()
    assert torch.equal(mine, theirs[:, :mine.shape[1]]), (mine, theirs)
    # a folder our model cannot represent: one line naming the key
    bad = tmp_path / "bad"
    os.makedirs(bad)
    for f in os.listdir(hf):
        os.link(os.path.join(hf, f), bad / f) if f != "config.json" else None
    (bad / "config.json").write_text(json.dumps({**json.loads((tmp_path / "hf" / "config.json").read_text()),
                                                 "add_final_layer_norm": True}))
    with pytest.raises(CheckpointError, match=r"config.json: add_final_layer_norm=True is not supported"):
        import_hf(str(bad), str(tmp_path / "x"), progress=False)


def test_bart_base_config_is_facebook_bart_base():
    import dataclasses
    from launcher.config import load_config
    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "bart-base.yaml"))
    m = dataclasses.replace(cfg.model, vocab_size=50265, real_vocab_size=50265)
    ref = A.model_config(_hf_config("bart-base"))
    for f in ("d_model", "n_heads", "d_ff", "n_encoder_layers", "n_decoder_layers", "activation", "scale_embedding",
              "max_positions", "layer_norm_eps"):
        assert getattr(m, f) == getattr(ref, f), f
    assert count_parameters(m) == SHAPES["bart-base"][4]
    assert (cfg.data.objective, cfg.data.bart.mask_ratio, cfg.data.bart.poisson_lambda) == ("bart", 0.3, 3.0)
    assert cfg.data.max_tgt_len >= cfg.data.max_src_len
