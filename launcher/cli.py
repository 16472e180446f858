"""`encdec` command: prepare | train | convert | import | generate | plot.

Every expected failure (bad config, missing or bad input, bad checkpoint) ends with one line
`encdec: error: ...` naming the file/key/value, and exit status 2.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys

from data.corpus import CorpusError
from launcher.checkpoint.format import CheckpointError
from launcher.config import ConfigError, load_config
from launcher.signals import StopSignal

# The subcommands import their modules when they run: deepspeed and transformers take seconds to
# import, and `encdec --help` or a config error should not wait for them.


def _prepare(a) -> int:
    from data.prepare import prepare
    man = prepare(a.inputs, a.out, objective=a.objective, tokenizer=a.tokenizer, vocab_size=a.vocab_size,
                  shard_size=a.shard_size, text_field=a.text_field, src_field=a.src_field,
                  tgt_field=a.tgt_field, overwrite=a.overwrite, progress=not a.quiet)
    print(f"prepared {man['num_samples']} samples, {man['num_tokens']} tokens in {len(man['shards'])} shards -> {a.out}")
    return 0


def _train(a) -> int:
    if a.nproc and a.nproc > 1:
        # Fail here, before any process starts: the config, every input, the layout of N local ranks.
        from launcher.parallel.dims import validate_layout
        from launcher.training.inputs import resolve_inputs
        cfg = load_config(a.config, a.overrides)
        validate_layout(cfg, a.nproc, a.nproc)
        resolve_inputs(cfg)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={a.nproc}",
               "-m", "launcher.cli", "train", a.config, *a.overrides]
        # Ctrl-C reaches torchrun and every rank from the terminal: the ranks stop with a checkpoint,
        # torchrun waits for them; this process just waits too (a handler, not SIG_IGN: not inherited)
        signal.signal(signal.SIGINT, lambda signum, frame: None)
        return subprocess.call(cmd)
    stop = StopSignal().install()                   # before the slow imports: a signal now is kept
    cfg = load_config(a.config, a.overrides)
    from launcher.train import run
    run(cfg, stop)
    return 0


def _convert(a) -> int:
    from launcher.hf.export import convert
    out = convert(a.checkpoint, a.out, overwrite=a.overwrite, verify=not a.no_verify)
    print(f"wrote {out}")
    return 0


def _import(a) -> int:
    from launcher.hf.importer import import_and_report
    import_and_report(a.hf_dir, a.out, overwrite=a.overwrite)
    return 0


def _generate(a) -> int:
    from launcher.hf.generate import generate
    for line in generate(a.model_dir, a.texts, num_beams=a.num_beams, max_new_tokens=a.max_new_tokens):
        print(line)
    return 0


def _plot(a) -> int:
    from launcher.monitor.plot import plot
    for p in plot(a.run_dir):
        print(p)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="encdec", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("prepare", help="raw text/JSONL -> tokenizer + webdataset shards")
    s.add_argument("inputs", nargs="+")
    s.add_argument("--out", required=True)
    s.add_argument("--objective", choices=["span", "pairs"], default="span")
    s.add_argument("--tokenizer", help="reuse this tokenizer.json (or a prepared folder) instead of training one")
    s.add_argument("--vocab-size", type=int, default=8000)
    s.add_argument("--shard-size", type=int, default=10000, help="samples per shard")
    s.add_argument("--text-field", default="text")
    s.add_argument("--src-field", default="src")
    s.add_argument("--tgt-field", default="tgt")
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=_prepare)

    s = sub.add_parser("train", help="train from a YAML config (key.sub=value overrides)")
    s.add_argument("config")
    s.add_argument("overrides", nargs="*")
    s.add_argument("--nproc", type=int, default=1, help="ranks on this machine (torchrun)")
    s.set_defaults(fn=_train)

    s = sub.add_parser("convert", help="training checkpoint -> Hugging Face folder")
    s.add_argument("checkpoint")
    s.add_argument("out")
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("--no-verify", action="store_true", help="skip the sha256 check (sizes are always checked)")
    s.set_defaults(fn=_convert)

    s = sub.add_parser("import", help="Hugging Face Pegasus/Marian folder -> a checkpoint to continue pretraining")
    s.add_argument("hf_dir")
    s.add_argument("out")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(fn=_import)

    s = sub.add_parser("generate", help="generate with a converted model through transformers")
    s.add_argument("model_dir")
    s.add_argument("texts", nargs="+")
    s.add_argument("--num-beams", type=int, default=1)
    s.add_argument("--max-new-tokens", type=int, default=64)
    s.set_defaults(fn=_generate)

    s = sub.add_parser("plot", help="PNG curves from a run folder's metrics.jsonl")
    s.add_argument("run_dir")
    s.set_defaults(fn=_plot)
    return p


def _mark_user_error(cmd: str, msg: str) -> None:
    """Under slurm/train.sbatch (ENCDEC_RUN_DIR set): RUN_DIR/user_error tells the script not to
    restart (a bad config, data or a diverged run would fail the same way again)."""
    run_dir = os.environ.get("ENCDEC_RUN_DIR")
    if cmd != "train" or not run_dir or not os.path.isdir(run_dir):
        return
    try:
        tmp = os.path.join(run_dir, f".user_error.{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(msg + "\n")
        os.replace(tmp, os.path.join(run_dir, "user_error"))
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args, extra = p.parse_known_args(argv)
    if args.cmd == "train":                       # overrides may also follow --nproc N
        args.overrides += [x for x in extra if "=" in x and not x.startswith("-")]
        extra = [x for x in extra if not ("=" in x and not x.startswith("-"))]
    if extra:
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.fn(args)
    except (ConfigError, CorpusError, CheckpointError, FileNotFoundError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"encdec: error: {msg}", file=sys.stderr)
        _mark_user_error(args.cmd, msg)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
