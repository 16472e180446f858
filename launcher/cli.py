"""`encdec` command: prepare | train | plan | convert | import | generate | eval | plot.

Every expected failure (bad config, missing or bad input, bad checkpoint) ends with one line
`encdec: error: ...` naming the file/key/value, and exit status 2.
"""
from __future__ import annotations

import argparse
import atexit
import os
import signal
import subprocess
import sys
import threading

from common.atomic import atomic_write
from common.errors import UserError
from data.registry import OBJECTIVES
from launcher import run_files
from launcher.config import load_config
from launcher.signals import StopSignal

# The subcommands import their modules when they run: deepspeed and transformers take seconds to
# import, and `encdec --help` or a config error should not wait for them.


def _prepare(a) -> int:
    from data.prepare import run_cli
    return run_cli(a)


def _train(a) -> int:
    if a.nproc and a.nproc > 1:
        # Fail here, before any process starts: the config, every input, the layout of N local ranks.
        import torch
        from launcher.checkpoint.vocab import fit_run_vocab
        from launcher.parallel.dims import check_local_gpus, validate_layout
        from launcher.training.inputs import resolve_inputs
        check_local_gpus(a.nproc, torch.cuda.device_count(), os.environ.get("CUDA_VISIBLE_DEVICES"),
                         f"--nproc {a.nproc}")
        cfg = load_config(a.config, a.overrides)
        validate_layout(cfg, a.nproc, a.nproc)
        resolve_inputs(cfg)
        fit_run_vocab(cfg)                          # reads (and checks) what checkpoint.resume names
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
    from launcher.hf.files import Output, count_lines, read_inputs
    from launcher.hf.generate import load, stream_generate
    from launcher.hf.progress import Progress
    if bool(a.texts) == bool(a.input):
        raise UserError("generate: give the texts as arguments or --input FILE (- for stdin), "
                         + ("not both" if a.texts else "none given"))
    if a.field and not a.input:
        raise UserError("generate: --field reads JSONL from --input")
    if a.input and a.input != "-" and not os.path.isfile(a.input):
        raise FileNotFoundError(f"--input {a.input}: no such file")
    m = load(a.model_dir, a.device, a.dtype)
    items = read_inputs(a.input, a.field) if a.input else ((None, t) for t in a.texts)
    records: list = []                             # the records of the window being generated

    def texts():
        for rec, text in items:
            records.append(rec)
            yield text
    total = count_lines(a.input) if a.input else len(a.texts)
    try:
        with Progress(total, "generate", "inputs", a.quiet) as bar, Output(a.output) as out:
            for gens in stream_generate(m, texts(), a.num_beams, a.max_new_tokens, a.batch_size, bar):
                for rec, g in zip(records, gens):
                    out.line(rec, g)
                del records[:len(gens)]
                out.flush()
    except BrokenPipeError:                        # `encdec generate ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


def _eval(a) -> int:
    from launcher.hf.evaluate import run, table
    res = run(a.model_dir, a.data, a.json, objective=a.objective, batch_size=a.batch_size, num_beams=a.num_beams,
              max_generate=a.max_generate, device=a.device, precision=a.dtype, quiet=a.quiet)
    print(table(res))
    print(f"wrote {a.json}")
    return 0


def _plot(a) -> int:
    from launcher.monitor.plot import plot
    for p in plot(a.run_dir):
        print(p)
    return 0


def _plan(a) -> int:
    from launcher.planner.plan import main as plan_main
    return plan_main(a.config, a.overrides, a.nodes, a.gpus_per_node, a.gpu_memory_gib, a.peak_tflops, a.json,
                     a.vocab, calibrate=a.calibrate, device=a.device)


def _inference_args(s) -> None:
    s.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda, cuda:N")
    s.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto: the run's train.precision on a GPU, fp32 on CPU")
    s.add_argument("--quiet", action="store_true", help="no progress on stderr")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="encdec", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("prepare", help="raw text / JSONL / webdataset tars of text -> tokenizer + webdataset shards")
    s.add_argument("inputs", nargs="*")
    s.add_argument("--out", required=True)
    s.add_argument("--workers", type=int, default=1, help="processes on this machine (same output as 1)")
    s.add_argument("--tokenizer-sample", type=int, default=1 << 30, metavar="BYTES",
                   help="train the tokenizer on a seeded sample of about this many bytes")
    s.add_argument("--max-bad-lines", default="1%", help="bad input lines skipped before failing: N or P%% of lines")
    s.add_argument("--unit-size", type=int, default=256 << 20, metavar="BYTES",
                   help="input files are grouped into units of at least this size (the unit of parallel work)")
    s.add_argument("--plan-only", action="store_true",
                   help="only check inputs and make the tokenizer (array job step 1)")
    s.add_argument("--slice", metavar="I/N", help="prepare the units of slice I of N (array task), then stop")
    s.add_argument("--merge", action="store_true", help="merge the prepared units into --out (array job, last step)")
    s.add_argument("--objective", choices=["span", "pairs"], default="span")
    s.add_argument("--tokenizer", help="reuse this tokenizer.json, a prepared folder or a Hugging Face model folder "
                                       "(e.g. T5's) instead of training one")
    s.add_argument("--add-tokens", help="comma-separated special tokens to add (e.g. UL2's \"[NLU],[NLG],[S2S]\")")
    s.add_argument("--vocab-size", type=int, default=8000)
    s.add_argument("--shard-size", type=int, default=10000, help="samples per shard")
    s.add_argument("--text-field", "--text-key", dest="text_field", default="text",
                   help="the JSON field holding the text (JSONL lines, a tar's .json members)")
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

    s = sub.add_parser("import", help="Hugging Face Pegasus/Marian/T5 folder -> a checkpoint to continue pretraining")
    s.add_argument("hf_dir")
    s.add_argument("out")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(fn=_import)

    s = sub.add_parser("generate", help="generate with a converted model through transformers")
    s.add_argument("model_dir")
    s.add_argument("texts", nargs="*", help="inputs (or --input)")
    s.add_argument("--input", metavar="FILE", help="one input per line; - = stdin")
    s.add_argument("--field", help="--input is JSONL: the input is this field; output: each record + \"generated\"")
    s.add_argument("--output", metavar="FILE", help="write here (FILE.partial until complete) instead of stdout")
    s.add_argument("--num-beams", type=int, default=1)
    s.add_argument("--max-new-tokens", type=int, default=64, help="at most the model's decoder positions - 1")
    s.add_argument("--batch-size", type=int, default=64, help="inputs per batch (sorted by length)")
    _inference_args(s)
    s.set_defaults(fn=_generate)

    s = sub.add_parser("plan", help="memory, communication and step time of a layout; the layouts that fit")
    s.add_argument("config")
    s.add_argument("overrides", nargs="*")
    s.add_argument("--nodes", type=int, required=True)
    s.add_argument("--gpus-per-node", type=int, required=True)
    s.add_argument("--gpu-memory-gib", type=float, default=80.0)
    s.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak per GPU (default 989, H100/H200)")
    s.add_argument("--vocab", type=int, default=32000, help="vocabulary size when the config leaves it to the tokenizer")
    s.add_argument("--json", action="store_true")
    s.add_argument("--calibrate", action="store_true",
                   help="time the model's layers and AdamW on this machine's device for the step-time estimate")
    s.add_argument("--device", default=None, help="device to calibrate on (default: cuda if available, else cpu)")
    s.set_defaults(fn=_plan)
    s = sub.add_parser("eval", help="loss/perplexity (and BLEU/chrF for pairs) of a converted model on prepared shards")
    s.add_argument("model_dir")
    s.add_argument("data", help="a prepared folder, manifest or shard pattern (as data.valid)")
    s.add_argument("--objective", choices=list(OBJECTIVES), help="default: the run's data.objective")
    s.add_argument("--batch-size", type=int, default=32, help="examples per batch (regrouped by length)")
    s.add_argument("--num-beams", type=int, default=1, help="1 = greedy")
    s.add_argument("--max-generate", type=int, default=None,
                   help="pairs: the first N examples decoded and scored (default: the run's train.eval_generate, "
                        "as the trainer scored)")
    s.add_argument("--json", default="eval.json", help="where the results are written")
    _inference_args(s)
    s.set_defaults(fn=_eval)

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
        atomic_write(os.path.join(run_dir, run_files.USER_ERROR), msg + "\n")
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args, extra = p.parse_known_args(argv)
    if args.cmd in ("train", "plan"):             # overrides may also follow the options
        args.overrides += [x for x in extra if "=" in x and not x.startswith("-")]
        extra = [x for x in extra if not ("=" in x and not x.startswith("-"))]
    if extra:
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.fn(args)
    except (UserError, FileNotFoundError) as e:     # the user's to fix: one line, no traceback
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"encdec: error: {msg}", file=sys.stderr)
        _mark_user_error(args.cmd, msg)
        return 2
    except KeyboardInterrupt:
        return 130


def leave(code: int) -> None:
    """Ends the program after `main` returned: the interpreter's own exit steps that matter (Python
    threads joined, atexit handlers: the run lock, wandb, loader workers, logging), then the process
    ends without tearing down torch's C++ state. That teardown (communication backends' threads and
    static objects, in whatever order the interpreter drops them) now and then aborted a rank that
    had finished and saved everything ("terminate called without an active exception", exit -6),
    which torchrun and srun count as the job failing; it also cost a garbage-collector walk."""
    for t in threading.enumerate():
        if t is not threading.main_thread() and not t.daemon:
            t.join()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def entry() -> None:
    """The `encdec` program (and `python -m launcher.cli`). main() itself returns, for callers in-process."""
    leave(main())


if __name__ == "__main__":
    entry()
