"""``make bench``: lowmem-moe against cp of the same bytes, peak memory scaling, and the GGUF check.

Sources are synthetic Llama models with Yi-34B's shape (see
synthetic_checkpoint.py), cached in the work folder between runs. Results
go to results/bench.json, and RESULTS.md is regenerated from it.
"""

import argparse
import json
import logging
import shutil
import sys
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .case_inputs import model_requests, prepare_case_inputs
from .gguf_check import run_gguf_check
from .machine_info import collect_machine_info
from .measure import OK, RunRecord
from .merge_cases import HEADLINE_CASES, SCALING_CASES, MergeCase
from .model_store import ModelStore
from .results_page import BENCH_RESULTS, write_results_page
from .synthetic_checkpoint import ModelShape
from .tool_runs import (
    check_plan,
    measure_copy,
    measure_import_baseline,
    measure_lowmem_merge,
    measure_plan,
    not_supported_record,
    require_disk_space,
)

logger = logging.getLogger("benchmarks")

BENCHMARKS = Path(__file__).resolve().parent
DEFAULT_WORK = BENCHMARKS / "work"
DEFAULT_RESULTS = BENCHMARKS / "results"
# A shape for a quick check of the harness itself, about 60 MB per model.
SMOKE_SHAPE = ModelShape(
    hidden_size=512, intermediate_size=1024, num_attention_heads=8, num_key_value_heads=2, vocab_size=4096
)


def run_headline_case(store: ModelStore, case: MergeCase, work: Path, repeats: int) -> dict[str, Any]:
    """Measure the plan once, then the merge and cp of its output ``repeats`` times, deleting both outputs each time.

    Merge and cp alternate, so that both meet the same load from other
    processes as far as possible.
    """
    inputs = prepare_case_inputs(store, case, work / "configs")
    output = work / "outputs" / case.name
    copy_target = work / "outputs" / f"{case.name}-cp"
    check = check_plan(inputs.config, output)
    if not check.supported:
        logger.info("%s: lowmem-moe does not support this merge yet", case.name)
        record = not_supported_record(case.name, "lowmem-moe", check)
        return {"case": asdict(case), "repeats": [{"merge": record.to_json(), "copy": None}]}

    require_disk_space(work, 2 * check.bytes_written)
    plan = measure_plan(f"{case.name}-plan", inputs.config, output, work, inputs.source_files)
    runs = []
    for repeat in range(1, repeats + 1):
        merge = measure_lowmem_merge(f"{case.name}-merge-{repeat}", inputs.config, output, work, inputs.source_files)
        copy = measure_copy(f"{case.name}-cp-{repeat}", output, copy_target, work) if merge.status == OK else None
        _remove(output, copy_target)
        runs.append({"merge": merge.to_json(), "copy": copy.to_json() if copy else None})
    return {"case": asdict(case), "planned_bytes": check.bytes_written, "plan": plan.to_json(), "repeats": runs}


def run_scaling_case(store: ModelStore, case: MergeCase, work: Path, measured: dict[tuple, dict[str, Any]]) -> dict[str, Any]:
    """Measure one merge of the scaling series, or reuse the headline measurement of the same merge."""
    if case.key in measured:
        first_merge = measured[case.key]["repeats"][0]["merge"]
        return {"case": asdict(case), "merge": first_merge, "reused_from": measured[case.key]["case"]["name"]}

    inputs = prepare_case_inputs(store, case, work / "configs")
    output = work / "outputs" / case.name
    check = check_plan(inputs.config, output)
    if not check.supported:
        return {"case": asdict(case), "merge": not_supported_record(case.name, "lowmem-moe", check).to_json()}
    require_disk_space(work, check.bytes_written)
    merge = measure_lowmem_merge(f"{case.name}-merge", inputs.config, output, work, inputs.source_files)
    _remove(output)
    return {"case": asdict(case), "planned_bytes": check.bytes_written, "merge": merge.to_json()}


def run_bench(work: Path, results: Path, shape: ModelShape, workers: int, repeats: int, gguf: bool) -> dict[str, Any]:
    """Run every part of the benchmark and return the results, also written to results/bench.json."""
    started = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    machine = collect_machine_info(work)
    store = ModelStore(work / "models", shape)

    cases = [*HEADLINE_CASES, *SCALING_CASES]
    missing = store.missing_files(model_requests(cases))
    generation_started = time.perf_counter()
    store.generate(missing, workers)
    generation_seconds = time.perf_counter() - generation_started

    baseline = measure_import_baseline(work)
    headline = [run_headline_case(store, case, work, repeats) for case in HEADLINE_CASES]
    measured = {tuple(row["case"][key] for key in ("gate_mode", "dtype", "layers", "experts")): row for row in headline}
    scaling = [run_scaling_case(store, case, work, measured) for case in SCALING_CASES]
    gguf_result = run_gguf_check(work / "gguf") if gguf else None

    result = {
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "shape": asdict(shape),
        "generated_files": len(missing),
        "generation_seconds": generation_seconds,
        "total_seconds": time.perf_counter() - started,
        "repeats": repeats,
        "import_baseline": baseline.to_json(),
        "headline": headline,
        "scaling": scaling,
        "gguf": gguf_result,
    }
    results.mkdir(parents=True, exist_ok=True)
    (results / BENCH_RESULTS).write_text(json.dumps(result, indent=2) + "\n")
    return result


def _remove(*folders: Path) -> None:
    for folder in folders:
        if folder.exists():
            shutil.rmtree(folder)


def _summary(result: dict[str, Any]) -> str:
    minutes = result["total_seconds"] / 60
    lines = [f"make bench took {minutes:.1f} min ({result['generation_seconds'] / 60:.1f} min generating models)."]
    for row in result["headline"]:
        for run in row["repeats"]:
            merge = RunRecord.from_json(run["merge"])
            if merge.status != OK:
                lines.append(f"{merge.label}: {merge.status}")
                continue
            copy = RunRecord.from_json(run["copy"]) if run.get("copy") else None
            ratio = f", {merge.wall_seconds / copy.wall_seconds:.2f}x cp" if copy and copy.status == OK else ""
            lines.append(f"{merge.label}: {merge.wall_seconds:.1f} s, peak RSS {merge.peak_rss_bytes / 1e6:.0f} MB{ratio}")
    if result["gguf"] is not None:
        lines.append(f"GGUF check: {'passed' if result['gguf']['passed'] else 'FAILED'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark lowmem-moe against cp; see benchmarks/RESULTS.md.")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="folder for cached models, outputs and logs")
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="folder for the JSON results")
    parser.add_argument("--workers", type=int, default=2, help="processes that generate synthetic models (default: 2)")
    parser.add_argument(
        "--repeats", type=int, default=3, help="measurements of each merge and its cp in the headline table (default: 3)"
    )
    parser.add_argument("--skip-gguf", action="store_true", help="skip the llama.cpp conversion check")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="check the harness quickly with small models; results and page go to WORK/smoke unless --results is given",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    work = args.work.resolve()
    results = args.results.resolve()
    page = BENCHMARKS / "RESULTS.md"
    if args.smoke and results == DEFAULT_RESULTS:
        results = work / "smoke"
        page = results / "RESULTS.md"
    shape = SMOKE_SHAPE if args.smoke else ModelShape()
    result = run_bench(work, results, shape, args.workers, args.repeats, gguf=not args.skip_gguf)
    write_results_page(results, page)
    print(_summary(result))
    print(f"Results: {page}")
    records = [run[key] for row in result["headline"] for run in row["repeats"] for key in ("merge", "copy") if run.get(key)]
    records += [row["merge"] for row in result["scaling"]]
    failed = any(record["status"] == "failed" for record in records)
    gguf_failed = result["gguf"] is not None and not result["gguf"]["passed"]
    return 1 if failed or gguf_failed else 0


if __name__ == "__main__":
    sys.exit(main())
