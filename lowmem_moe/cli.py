"""The ``lowmem-moe`` command."""

import argparse
import json
import logging
import os
import re
import sys
import tempfile
import time
from pathlib import Path

from tqdm.contrib.logging import logging_redirect_tqdm

from . import __version__
from .config import load_merge_config
from .dtypes import dtype_code_from_name, torch_dtype
from .errors import OutputError, UserError
from .memory_budget import DEFAULT_CHUNK_SIZE, DEFAULT_SHARD_SIZE, MIN_CHUNK_SIZE
from .merge import PreparedMerge, disk_bytes_needed, free_disk_bytes, prepare_resolved, run_merge
from .model_resolution import resolve_sources
from .output_files import write_config
from .output_folder import OutputFolder
from .plan_report import download_report, format_bytes, plan_summary, plan_tensor_lines
from .planner import PlanOptions
from .structure_check import check_planned_structure

logger = logging.getLogger("lowmem_moe")

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "k": 1024,
    "m": 1024**2,
    "g": 1024**3,
    "t": 1024**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}


def parse_size(text: str) -> int:
    """Parse a byte count such as ``5GB`` (10^9), ``512MiB`` (2^20) or ``1048576``."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if not match or unit not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}; use a number with an optional unit such as 5GB or 64MiB")
    value = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size {text!r} must be positive")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lowmem-moe",
        description="Build Mixture-of-Experts checkpoints from dense models in bounded memory.",
    )
    parser.add_argument("--version", action="version", version=f"lowmem-moe {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    merge = commands.add_parser("merge", help="merge the models of a mergekit-moe style YAML into OUT_DIR")
    _add_plan_arguments(merge)
    merge.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty OUT_DIR")

    plan = commands.add_parser("plan", help="print what a merge would read and write, without writing anything")
    _add_plan_arguments(plan)
    plan.add_argument("--tensors", action="store_true", help="also list every output tensor and its source bytes")
    plan.add_argument("--json", action="store_true", help="print the whole plan as JSON")

    routes = commands.add_parser("routes", help="show which experts a merged model routes given prompts to")
    routes.add_argument("model", type=Path, metavar="OUT_DIR", help="merged model folder")
    routes.add_argument("prompts", nargs="+", metavar="PROMPT", help="prompt texts")
    routes.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="dtype in which the layers run; bfloat16 halves the memory of a layer (default: float32)",
    )
    routes.add_argument("--layers", action="store_true", help="show the shares of every layer, not only the total")
    routes.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    routes.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")

    verify = commands.add_parser(
        "verify", help="compare every byte of a merged model with its sources, using the config recorded in its model card"
    )
    verify.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="merged model folder")
    verify.add_argument(
        "--chunk-size",
        type=parse_size,
        default=None,
        help="bytes read from a source per step; memory use grows with it (default: the chunk size of the merge)",
    )
    verify.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    verify.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    return parser


def _add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, metavar="CONFIG.yml", help="merge YAML, as written for mergekit-moe")
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="output model folder")
    parser.add_argument(
        "--shard-size",
        type=parse_size,
        default=DEFAULT_SHARD_SIZE,
        help="maximum tensor bytes per output file, e.g. 5GB or 2GiB (default: 5GB)",
    )
    parser.add_argument(
        "--chunk-size",
        type=parse_size,
        default=DEFAULT_CHUNK_SIZE,
        help=f"bytes read from a source per step; memory use grows with it (default: {format_bytes(DEFAULT_CHUNK_SIZE)})",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for random gates and noise (default: 0)")
    parser.add_argument(
        "--layout",
        choices=("per_expert", "fused"),
        default="per_expert",
        help="expert tensor layout: per_expert (one tensor per expert and projection, read by transformers 4.x "
        "and 5.x, llama.cpp and vLLM) or fused (transformers 5's gate_up_proj and down_proj) (default: per_expert)",
    )
    parser.add_argument(
        "--gate-dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="dtype in which the hidden gate modes run the base model; bfloat16 halves the memory of a layer "
        "(default: float32)",
    )
    parser.add_argument(
        "--drop-config-field",
        action="append",
        default=[],
        metavar="FIELD",
        help="leave out a base config.json field that the output architecture cannot express (repeatable)",
    )
    parser.add_argument(
        "--allow-identical-experts",
        "--i-understand-this-is-not-useful-without-training",
        action="store_true",
        dest="allow_identical_experts",
        help="allow every expert to come from the same model, which is useful only before training",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")


def main(argv: list[str] | None = None) -> int:
    """Run the command line and return its exit code."""
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose, args.quiet)
    if args.command == "routes":
        return _run_reporting_errors(lambda: _routes_command(args), args.model)
    if args.chunk_size is not None and args.chunk_size < MIN_CHUNK_SIZE:
        logger.error("--chunk-size must be at least %s.", format_bytes(MIN_CHUNK_SIZE))
        return 2
    if args.command == "verify":
        return _run_reporting_errors(lambda: _verify_command(args), args.out_dir)

    options = PlanOptions(
        shard_size=args.shard_size,
        chunk_size=args.chunk_size,
        seed=args.seed,
        dropped_config_fields=frozenset(args.drop_config_field),
        allow_identical_experts=args.allow_identical_experts,
        gate_dtype=dtype_code_from_name(args.gate_dtype),
        layout=args.layout,
    )
    if args.command == "plan":
        return _run_reporting_errors(lambda: _plan_command(args, options), args.out_dir)
    return _run_reporting_errors(lambda: _merge_command(args, options), args.out_dir)


def _run_reporting_errors(command, out_dir: Path) -> int:
    # A user mistake prints one message and no traceback.
    try:
        return command()
    except UserError as error:
        logger.error("%s", error)
        return 1
    except KeyboardInterrupt:
        logger.error("Interrupted. %s is unchanged.", out_dir)
        return 130


def _routes_command(args: argparse.Namespace) -> int:
    # Imported here, as the other commands do not need transformers' model code.
    from .routing_report import format_routes, route_prompts

    routes = route_prompts(args.model, args.prompts, torch_dtype(dtype_code_from_name(args.dtype)))
    print(format_routes(routes, per_layer=args.layers))
    return 0


def _verify_command(args: argparse.Namespace) -> int:
    from .verify import verify_output

    report = verify_output(args.out_dir, chunk_size=args.chunk_size)
    if not report.ok:
        logger.error("%s", report.summary())
        return 1
    print(report.summary())
    return 0


def _plan_command(args: argparse.Namespace, options: PlanOptions) -> int:
    # Files of Hub models that the cache lacks are counted, not downloaded:
    # the tensor plan needs their headers, so it waits for `merge`.
    config = load_merge_config(args.config)
    resolution = resolve_sources(config)
    if resolution.pending_files:
        if args.json:
            print(json.dumps({"download": resolution.download_json_dict()}, indent=2))
        else:
            print(download_report(resolution))
        return 0

    prepared = prepare_resolved(config, resolution, options)
    _check_output_structure(prepared)
    if args.json:
        print(json.dumps(prepared.plan.to_json_dict(), indent=2))
        return 0
    try:
        OutputFolder(args.out_dir).check_target()
    except OutputError as error:
        # The plan itself is still useful, so this is a warning, not an error.
        logger.warning("merge would stop here: %s", error)
    free_disk = free_disk_bytes(args.out_dir)
    print(plan_summary(prepared.plan, free_disk, disk_bytes_needed(prepared), resolution.bytes_to_download))
    if args.tensors:
        print("\n".join(plan_tensor_lines(prepared.plan)))
    return 0


def _check_output_structure(prepared: PreparedMerge) -> None:
    # A merge builds transformers' model from the output config beside its
    # copy. The plan does the same, so that base config values or sizes that
    # do not fit the tensors fail here too, before anything is written.
    planned = {tensor.name: tensor.shape for tensor in prepared.plan.tensors}
    with tempfile.TemporaryDirectory(prefix="lowmem-moe-plan-") as folder:
        write_config(prepared.plan.output_config, Path(folder))
        check_planned_structure(Path(folder), planned, prepared.sources.base.config.path)


def _merge_command(args: argparse.Namespace, options: PlanOptions) -> int:
    start = time.monotonic()
    # The gate pass logs from its thread while the copy's progress bar is
    # drawn, so log lines go through tqdm, which keeps the bar intact.
    with logging_redirect_tqdm(loggers=[logger]):
        out_dir = run_merge(args.config, args.out_dir, options, overwrite=args.overwrite)
    size = sum(path.stat().st_size for path in out_dir.iterdir() if path.is_file())
    logger.info("Done: %s of output in %.1f s.", format_bytes(size), time.monotonic() - start)
    return 0


class _LevelPrefixFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        if record.levelno >= logging.ERROR:
            return f"error: {message}"
        if record.levelno >= logging.WARNING:
            return f"warning: {message}"
        return message


def _configure_logging(verbose: bool, quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LevelPrefixFormatter("%(message)s"))
    level = logging.INFO
    if verbose:
        level = logging.DEBUG
    elif quiet:
        level = logging.WARNING
    package_logger = logging.getLogger("lowmem_moe")
    package_logger.handlers[:] = [handler]
    package_logger.setLevel(level)
    package_logger.propagate = False


def entry() -> None:
    """Run the ``lowmem-moe`` command and end the process with its exit code.

    The process ends with os._exit once the logs are flushed; every output
    file is closed by then. A merge that failed or was interrupted after
    its gate pass thread had used torch sometimes aborted in the normal
    interpreter teardown, with "terminate called without an active
    exception" (exit 134), even after the thread was stopped and joined.
    """
    code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
