"""`encdec generate` and `encdec eval` on a real Hugging Face folder (transformers' own Pegasus class,
the tiny data's tokenizer).

Inputs from a file (text or JSONL) or stdin, in batches sorted by length: the outputs are the
argument form's and each input's own unbatched generation, in input order; a bad line leaves no
output file (not even FILE.partial). The model and its batches run on the device and in the
precision asked for, and "auto" picks the run's precision on a GPU and fp32 on CPU.
"""
import io
import json
import os
import random

import pytest
import torch

from tests.test_import_hf import make_hf


@pytest.fixture(scope="module")
def hf(tiny_pairs, tmp_path_factory):
    """A Pegasus folder whose greedy outputs differ from input to input (a small random model
    says the same thing to everything): large random matrices, embedding rows of equal norm."""
    from transformers import AutoModelForSeq2SeqLM
    path = make_hf(str(tmp_path_factory.mktemp("gen") / "hf"), "pre", tiny_pairs["train"])
    model = AutoModelForSeq2SeqLM.from_pretrained(path)
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.ndim == 2 and "embed_positions" not in n:
                p.copy_(torch.randn_like(p) * 3 / p.shape[1] ** 0.5)
        e = model.get_input_embeddings().weight
        e.copy_(torch.nn.functional.normalize(torch.randn_like(e), dim=-1))
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def lines(tiny_pairs):
    """1,000 inputs of 1-3 words: lengths vary, so sorting by length reorders them."""
    words = [json.loads(x)["src"].split() for x in open(tiny_pairs["heldout_jsonl"], encoding="utf-8")]
    rng = random.Random(0)
    return [" ".join(rng.choice(words)[:rng.randint(1, 3)]) for _ in range(1000)]


def test_generate_from_a_file_or_stdin_equals_the_argument_form_in_order(hf, lines, tmp_path, capsys, monkeypatch):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
    from launcher.cli import main
    opts = ["--max-new-tokens", "5", "--batch-size", "16", "--device", "cpu"]     # windows of 256 lines
    assert main(["generate", hf, *lines, *opts]) == 0
    by_args = capsys.readouterr().out.split("\n")[:-1]          # generations hold odd bytes: \n only
    src = tmp_path / "in.txt"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert main(["generate", hf, "--input", str(src), "--output", str(tmp_path / "out.txt"), *opts]) == 0
    by_file = (tmp_path / "out.txt").read_text(encoding="utf-8").split("\n")[:-1]
    assert len(by_args) == len(by_file) == 1000 and by_file == by_args
    assert len(set(by_file)) > 30 and not (tmp_path / "out.txt.partial").exists()
    # each input alone (no padding, no batch) through transformers: the same text at its own line
    tok, model = AutoTokenizer.from_pretrained(hf), AutoModelForSeq2SeqLM.from_pretrained(hf).eval()
    for i in random.Random(1).sample(range(1000), 24):
        with torch.no_grad():
            ids = model.generate(**tok([lines[i]], return_tensors="pt", truncation=True, max_length=24),
                                 max_new_tokens=5, do_sample=False)
        assert tok.batch_decode(ids, skip_special_tokens=True)[0] == by_file[i], i
    # JSONL from stdin: each record back with "generated", in order (the same batches: a different
    # batch changes the float rounding, which can flip a near tie of this random model)
    recs = [{"id": i, "text": t} for i, t in enumerate(lines)]
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(json.dumps(r) + "\n" for r in recs)))
    assert main(["generate", hf, "--input", "-", "--field", "text", *opts]) == 0
    got = [json.loads(x) for x in capsys.readouterr().out.split("\n")[:-1]]
    assert got == [{**r, "generated": g} for r, g in zip(recs, by_args)]


def test_a_bad_input_line_leaves_no_output(hf, lines, tmp_path, capsys):
    from launcher.cli import main
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    rows = [json.dumps({"text": t}) for t in lines[:700]]
    rows[650] = '{"text": 3}'                          # after two windows of 256 were written
    src.write_text("\n".join(rows) + "\n", encoding="utf-8")
    assert main(["generate", hf, "--input", str(src), "--field", "text", "--output", str(out), "--batch-size", "16",
                 "--max-new-tokens", "3", "--quiet"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        f"encdec: error: {src}:651: field 'text': a int, not a string"
    assert not out.exists() and not os.path.exists(f"{out}.partial")


def test_model_and_batches_run_on_the_requested_device_and_precision(hf, lines, tiny_pairs, tmp_path):
    from launcher.cli import main
    from launcher.hf.generate import generate, inference_precision, load
    seen = []
    for want in ("bf16", "fp32"):
        m = load(hf, device="cpu", precision=want)
        assert next(m.model.parameters()).device.type == "cpu"
        hooks = [m.model.get_encoder().register_forward_pre_hook(lambda mod, a, kw: seen.append(
                     ("in", kw["input_ids"].device.type)), with_kwargs=True),
                 m.model.get_output_embeddings().register_forward_hook(lambda mod, a, o: seen.append(
                     ("logits", o.dtype)))]
        generate(hf, lines[:40], max_new_tokens=3, batch_size=16, loaded=m)
        for h in hooks:
            h.remove()
        dt = torch.bfloat16 if want == "bf16" else torch.float32
        assert set(seen) == {("in", "cpu"), ("logits", dt)}, seen
        seen.clear()
    # the same through `encdec eval`: bf16 on CPU when asked (a loss near, not equal to, fp32's)
    res = {}
    for want in ("bf16", "fp32"):
        path = tmp_path / f"{want}.json"
        assert main(["eval", hf, tiny_pairs["valid"], "--device", "cpu", "--dtype", want, "--max-generate", "8",
                     "--json", str(path), "--quiet"]) == 0
        res[want] = json.loads(path.read_text())
        assert res[want]["precision"] == want and res[want]["device"] == "cpu" and res[want]["generated"] == 8
    assert res["bf16"]["loss"] != res["fp32"]["loss"] and res["bf16"]["loss"] == pytest.approx(res["fp32"]["loss"],
                                                                                               rel=2e-2)
    # "auto": the run's precision on a GPU, fp32 on CPU; an explicit request wins
    folder = tmp_path / "bf16run"
    folder.mkdir()
    (folder / "encdec_config.yaml").write_text("train:\n  precision: bf16\n")
    assert inference_precision(str(folder), "cuda:0") == "bf16" and inference_precision(hf, "cuda") == "fp32"
    assert inference_precision(str(folder), "cpu") == "fp32"
    assert inference_precision(str(folder), "cuda", "fp32") == "fp32"
    assert inference_precision(hf, "cpu", "bf16") == "bf16"
    if not torch.cuda.is_available():
        assert main(["generate", hf, "one", "--device", "cuda"]) == 2
