"""The `unicap` command line: one subcommand per job, each module providing add_arguments/run.

Modules are imported only when their subcommand runs, so `unicap --help` stays fast.
A user's error (a bad value, a missing file, a config or table that does not fit its contract) is
printed as one line, `error: ...`, with exit status 2, as argparse does for bad options;
`UNICAP_DEBUG=1` raises it with its traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# exceptions that mean "the user asked for something wrong": ValueError covers unicap.config.ConfigError,
# unicap.preflight.UsageError, unicap.contract.base.SchemaError and unicap.contract.checkpoint.CheckpointError
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)

# subcommand -> (module with add_arguments(parser) and run(args) -> int, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "ingest": ("datagen.ingest", "download a URL list into image shards (img2dataset)"),
    "ingest-folder": ("datagen.folder", "shard a folder of local images"),
    "synth": ("datagen.synth", "render the synthetic data set with ground-truth captions"),
    "caption": ("pipelines.caption", "caption image shards with a VLM (Ray Data + vLLM) into Parquet"),
    "score": ("pipelines.score", "CLIP / aesthetic scores, embeddings and duplicates per shard (Ray Data + open_clip)"),
    "stages": ("pipelines.stages", "cut the scored pool into the stage1 / stage2 / stage3 manifests"),
    "pack": ("pipelines.pack", "pack a stage's images (resized to its buckets) and captions into training shards"),
    "validate": ("unicap.validate_cmd", "check caption Parquet files against the caption record"),
    "eval-captions": ("datagen.answer_key", "score captions against the synthetic answer key (recall, hallucination)"),
    "report": ("unicap.report", "one self-contained HTML page about a run folder (funnel, captions, scores, training)"),
    "sample": ("train.sample", "generate images from a Next-DiT checkpoint"),
    "calibrate-cache": ("train.calibrate_cache", "fit the sampling step cache's coefficients on a weights folder"),
    "adherence": (
        "train.adherence",
        "prompt adherence of Next-DiT weights, judged against the synthetic answer key (GenEval-style)",
    ),
    "train-captioner": ("train.captioner.launch", "fine-tune a Qwen2-VL captioner on caption Parquet (DeepSpeed)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unicap", description="Caption-first data engine and trainer for text-to-image models."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)  # its arguments are added in main(), only when it runs
    return parser


def run_reporting_user_errors(prog: str, run, args: argparse.Namespace) -> int:
    """run(args), with a user's error printed as `prog: error: ...` (one line) and exit status 2."""
    try:
        return int(run(args) or 0)
    except USER_ERRORS as e:
        if os.environ.get("UNICAP_DEBUG", "") not in ("", "0"):
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    command = next((a for a in argv if not a.startswith("-")), None)
    if command in COMMANDS:
        module = importlib.import_module(COMMANDS[command][0])
        sub = parser._subparsers._group_actions[0].choices[command]  # noqa: SLF001
        module.add_arguments(sub)
    args = parser.parse_args(argv)
    module = importlib.import_module(args._module)
    return run_reporting_user_errors(f"unicap {args.command}", module.run, args)


def module_main(module_name: str, argv: list[str] | None = None) -> int:
    """`python -m MODULE ...` for a job module: its own parser (add_arguments) and run(args)."""
    module = importlib.import_module(module_name)
    prog = f"python -m {module_name}"
    p = argparse.ArgumentParser(
        prog=prog, description=module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    module.add_arguments(p)
    return run_reporting_user_errors(prog, module.run, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
