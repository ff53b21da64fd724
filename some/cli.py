"""The ``some`` command (also ``python -m some``, and ``torchrun ... -m some train``).

    some train --preset tiny --out runs/tiny                 # train, then analysis, pictures, report.md
    some train --preset A4 --set num_experts=96 --out runs/a4-96
    some train --out runs/tiny --resume                      # continue a run from its checkpoint
    some report runs/tiny                                    # rebuild report.md
    some generate runs/tiny/model --prompt "Q: Why" [-n 3]   # sample text from a trained model
    some eval runs/tiny/model [--data SOURCE] [--ood SOURCE] # perplexity and expert usage on a corpus
    some export runs/tiny [OUT_DIR]                          # a run's model as a from_pretrained directory
    some lm-eval-task tasks --model runs/tiny/model          # lm-evaluation-harness tasks on held-out documents
    some ablate experiments/gating.yaml [--smoke]            # an ablation study (docs/method.md §7)
    some selftest [--device cuda] [--quick]                  # check the ops backends on this machine
    some info                                                # build info and presets

User errors (bad config, missing corpus, corrupt checkpoint, diverged run)
print one line ``some: error: ...`` and exit non-zero, without a traceback.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from .errors import ConfigError, PeerLostError, SomeError
from .ops import build_info, verification
from .ops.selftest import run_selftest
from .runs import PRESETS, SoMEConfig, apply_overrides, get_preset, train, write_report
from .runs.export import eval_text, evaluate_model, export_run, generate_text
from .runs.lm_eval_task import lm_eval_command, write_lm_eval_tasks
from .runs.rundir import LOGGER, ConsoleHandler
from .studies import load_study, run_status, run_study, summarize

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="some", description="Self-Organizing Mixture of Experts")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a SoME language model into a run directory",
                       description="Train a SoME language model; writes config, logs, metrics, checkpoint, "
                                   "analysis, pictures and report.md to --out.")
    _add_train_arguments(t)

    r = sub.add_parser("report", help="rebuild report.md of a run directory")
    r.add_argument("run_dir", help="a run directory written by 'some train'")

    a = sub.add_parser("ablate", help="run an ablation study (experiments/*.yaml) and compare its variants",
                       description="Run every variant x dataset x seed of a study file (each run in its own "
                                   "process, finished runs are kept), then write results.md/csv and pictures.")
    _add_ablate_arguments(a)

    st = sub.add_parser("selftest", help="check both ops backends against a float64 reference on this machine",
                        description="Every op and gating, forward and backward, at awkward sizes (and on GPUs one "
                                    "A4-sized bfloat16 experts call), native kernels and torch backend against "
                                    "a float64 reference. Exits 1 on any mismatch.")
    st.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N or mps")
    st.add_argument("--dtype", nargs="+", choices=["float64", "float32", "bfloat16"], metavar="DTYPE",
                    help="dtypes to check (default: float64 float32 bfloat16)")
    st.add_argument("--quick", action="store_true", help="the small shapes only (seconds)")
    st.add_argument("--full", action="store_true", help="also the A4-sized experts call on the CPU (minutes)")

    g = sub.add_parser("generate", help="sample text from a trained model (RUN_DIR/model or a hub id)",
                       description="Continue a prompt with a model saved by some (save_pretrained / RUN_DIR/model).")
    g.add_argument("model", help="a model directory, e.g. runs/tiny/model, or a Hugging Face hub id")
    g.add_argument("--prompt", required=True, help="the text to continue")
    g.add_argument("-n", "--num-samples", type=int, default=1, help="continuations to print (default 1)")
    g.add_argument("--max-new-tokens", type=int, default=60)
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens (0: all)")
    g.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (1: off)")
    g.add_argument("--greedy", action="store_true", help="the most likely token each step (no sampling)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")

    e = sub.add_parser("eval", help="perplexity and expert usage of a trained model on a corpus",
                       description="Validation perplexity over real tokens and middle-layer usage; with the "
                                   "model's own corpus (the default) the run's validation split.")
    e.add_argument("model", help="a model directory, e.g. runs/tiny/model")
    e.add_argument("--data", metavar="SOURCE", help="a data source (default: the run's own corpus)")
    e.add_argument("--ood", metavar="SOURCE", help="also an out-of-domain corpus")
    e.add_argument("--docs", type=int, help="validation documents (default: the run's val_subset_size)")
    e.add_argument("--out", metavar="DIR", help="write eval.json, eval.md and the usage histogram here")
    e.add_argument("--device", default="auto")

    x = sub.add_parser("export", help="write a run's model as a from_pretrained directory",
                       description="Runs export RUN_DIR/model when they finish; this exports an older run "
                                   "(or to another place) from its checkpoint.")
    x.add_argument("run_dir", help="a run directory with checkpoint.pt")
    x.add_argument("out_dir", nargs="?", help="where to write (default RUN_DIR/model)")

    k = sub.add_parser("lm-eval-task", help="write lm-evaluation-harness tasks over held-out documents",
                       description="Last-word tasks (loglikelihood and 4-way choice) over a validation split of "
                                   "offline corpora, as YAML + JSONL for lm_eval --include_path (no network).")
    k.add_argument("out_dir", help="where to write the task files")
    k.add_argument("--model", metavar="DIR", help="a model directory: its run's corpus and validation split")
    k.add_argument("--data", nargs="+", metavar="SOURCE",
                   help="corpora (default: the model's own, or fortunes and bible)")
    k.add_argument("--items", type=int, default=200, help="items per task at most (default 200)")

    sub.add_parser("info", help="print how the extension was built and the presets")
    return parser


def _add_train_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", help=f"a named configuration: {', '.join(PRESETS)}")
    src.add_argument("--config", metavar="FILE", help="a YAML configuration (e.g. a run's config.yaml)")
    p.add_argument("--set", dest="overrides", action="append", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override config fields, e.g. --set num_experts=128 epochs=2 (repeatable)")
    p.add_argument("--out", required=True, metavar="DIR", help="run directory, e.g. runs/NAME")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    p.add_argument("--no-plots", dest="plots", action="store_false",
                   help="skip the run's pictures (usage histogram, key-store UMAP, usage heat map, dynamics "
                        "curves, class and topic heat maps)")
    progress = p.add_mutually_exclusive_group()
    progress.add_argument("--progress", dest="progress", action="store_true", default=None,
                          help="always show the progress bar (default: only on a terminal)")
    progress.add_argument("--no-progress", dest="progress", action="store_false")


def _add_ablate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("study", help="a study file, e.g. experiments/gating.yaml")
    p.add_argument("--smoke", action="store_true", help="run the file's 'smoke' section (CPU, minutes)")
    p.add_argument("--out", metavar="DIR", help="output directory (default runs/ablations/STUDY[-smoke])")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    p.add_argument("--dry-run", action="store_true", help="validate the study and list its runs; train nothing")
    p.add_argument("--summarize", action="store_true",
                   help="only rebuild results.md/csv and the pictures from the finished runs")
    p.add_argument("--quiet", action="store_true", help="one line per run instead of every run's log")


def config_from_args(args: argparse.Namespace) -> SoMEConfig | None:
    """The configuration the arguments ask for; None when resuming without one."""
    overrides = [item for group in args.overrides for item in group]
    if args.preset is not None:
        config = get_preset(args.preset)
    elif args.config is not None:
        config = SoMEConfig.load_yaml(args.config)
    elif args.resume:
        if overrides:
            raise ConfigError("--set with --resume needs --preset or --config (the run's config is fixed)")
        return None
    else:
        raise ConfigError(f"give --preset NAME ({', '.join(PRESETS)}) or --config FILE")
    return apply_overrides(config, overrides)


def _train(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    try:
        train(config, args.out, resume=args.resume, device=args.device, make_plots=args.plots,
              progress=args.progress)
    except KeyboardInterrupt:
        print(f"\nsome: interrupted; continue with: some train --out {args.out} --resume", file=sys.stderr)
        return 130
    return 0


def _generate(args: argparse.Namespace) -> int:
    for flag, value, ok, want in (("--num-samples", args.num_samples, args.num_samples >= 1, ">= 1"),
                                  ("--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 0, ">= 0"),
                                  ("--temperature", args.temperature, args.temperature > 0, "> 0"),
                                  ("--top-k", args.top_k, args.top_k >= 0, ">= 0 (0: all tokens)"),
                                  ("--top-p", args.top_p, 0 < args.top_p <= 1, "in (0, 1] (1: off)")):
        if not ok:  # (NaN fails every comparison, so it is refused too)
            raise ConfigError(f"{flag} must be {want}, got {value}")
    texts = generate_text(args.model, args.prompt, num_samples=args.num_samples, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_k=args.top_k or None,
                          top_p=None if args.top_p >= 1 else args.top_p, greedy=args.greedy, seed=args.seed,
                          device=args.device)
    for i, text in enumerate(texts):
        if len(texts) > 1:
            print(f"--- sample {i + 1}")
        print(text)
    return 0


def _eval(args: argparse.Namespace) -> int:
    result = evaluate_model(args.model, args.data, ood=args.ood, out_dir=args.out, device=args.device,
                            val_docs=args.docs)
    print(eval_text(result))
    if args.out:
        picture = ", usage_histogram.png" if "usage_counts" in result else ""  # none for a dense control
        print(f"Wrote {Path(args.out) / 'eval.json'}, eval.md{picture}")
    return 0


def _export(args: argparse.Namespace) -> int:
    print(export_run(args.run_dir, args.out_dir))
    return 0


def _lm_eval_task(args: argparse.Namespace) -> int:
    written = write_lm_eval_tasks(args.out_dir, model_dir=args.model, sources=args.data, items=args.items)
    for w in written:
        print(f"{w.source}: {w.items} items from {w.split} -> {', '.join(w.tasks)}")
    print(f"Run: {lm_eval_command(args.model or 'MODEL_DIR', Path(args.out_dir).resolve())}")
    return 0


def _report(args: argparse.Namespace) -> int:
    print(write_report(args.run_dir))
    return 0


def _ablate(args: argparse.Namespace) -> int:
    study = load_study(args.study, smoke=args.smoke, check_corpora=not args.summarize)
    out = Path(args.out) if args.out else study.default_out()
    if args.dry_run:
        for run in study.runs:
            print(f"{run_status(run, out):8s} {run.dir(out)}")
        print(f"{len(study.runs)} runs; the study file is valid")
        return 0
    if args.summarize:
        print(summarize(study, out))
        return 0
    try:
        run_study(study, out, device=args.device, stream=not args.quiet)
    except KeyboardInterrupt:
        print("\nsome: interrupted; run the same command again to continue (finished runs are kept)",
              file=sys.stderr)
        return 130
    return 0


def _selftest(args: argparse.Namespace) -> int:
    results = run_selftest(args.device, args.dtype, quick=args.quick, full=args.full)
    return 0 if all(r.ok for r in results) else 1


def _info(args: argparse.Namespace) -> int:
    info = build_info()
    width = max(map(len, info))
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")
    print(f"{'cuda_available':<{width}}  {torch.cuda.is_available()}")
    if info.get("cuda") and torch.cuda.is_available():  # whether 'auto' serves the kernels on this GPU
        print(f"{'cuda_verified':<{width}}  {verification.is_verified('cuda')}")
    print(f"{'presets':<{width}}  {', '.join(PRESETS)}")
    return 0


# Errors from the user's files and machine, reported in one line (with --debug: the traceback).
_USER_ENVIRONMENT_ERRORS = (OSError, UnicodeDecodeError, MemoryError, RecursionError, ValueError)


def _describe(e: BaseException) -> str:
    if isinstance(e, FileNotFoundError) and e.filename:  # from open(): "[Errno 2] ..." is noise
        return f"file not found: {e.filename}"
    if isinstance(e, OSError) and e.filename:
        return f"{e.filename}: {e.strerror or e}"
    if isinstance(e, UnicodeDecodeError):
        return f"a file is not UTF-8 text ({e.reason} at byte {e.start})"
    if isinstance(e, MemoryError):
        return "out of memory (a size in the configuration is too large for this machine)"
    if isinstance(e, RecursionError):
        return "a file is nested too deeply to read"
    return str(e) or type(e).__name__


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # the command's own messages (training, studies) go to stdout, above any progress bar
    logger = logging.getLogger(LOGGER)
    console = ConsoleHandler()
    console.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(console)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    handlers = {"train": _train, "report": _report, "info": _info, "ablate": _ablate, "selftest": _selftest,
                "generate": _generate, "eval": _eval, "export": _export, "lm-eval-task": _lm_eval_task}
    try:
        return handlers[args.command](args)
    except SomeError as e:
        if args.debug:
            raise
        print(f"some: error: {_describe(e)}", file=sys.stderr)
        if isinstance(e, PeerLostError):
            # the process group lost a peer mid-collective: its native threads may wait at
            # interpreter exit for work that never ends (seen in CI: the error printed, the
            # process alive 200 s later). Everything was written atomically before; leave now.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(e.exit_code)
        return e.exit_code
    except _USER_ENVIRONMENT_ERRORS as e:
        if args.debug or (isinstance(e, ValueError) and not isinstance(e, UnicodeDecodeError)):
            raise  # a ValueError that is no SomeError is a bug: show it
        print(f"some: error: {_describe(e)}", file=sys.stderr)
        return 2
    finally:
        logger.removeHandler(console)


if __name__ == "__main__":
    sys.exit(main())
