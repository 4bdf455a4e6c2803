"""``make bench-peer``: lowmem-moe and mergekit-moe on the same merges, measured the same way, outputs compared.

mergekit-moe runs from its own virtual environment, which the Makefile
creates. Results go to results/peer.json, and RESULTS.md is regenerated.
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
from .compare_outputs import compare_outputs
from .machine_info import collect_machine_info, peer_versions
from .measure import OK, RunRecord
from .merge_cases import PEER_CASES, MergeCase
from .model_store import ModelStore
from .results_page import PEER_RESULTS, write_results_page
from .synthetic_checkpoint import ModelShape
from .tool_runs import check_plan, measure_lowmem_merge, measure_mergekit, not_supported_record, require_disk_space

logger = logging.getLogger("benchmarks")

BENCHMARKS = Path(__file__).resolve().parent
DEFAULT_WORK = BENCHMARKS / "work"
DEFAULT_RESULTS = BENCHMARKS / "results"


def run_peer_case(store: ModelStore, case: MergeCase, work: Path, mergekit_moe: Path) -> dict[str, Any]:
    """Measure both tools on one merge, compare their outputs, then delete both outputs.

    A merge that lowmem-moe does not support yet is skipped for both tools.
    """
    inputs = prepare_case_inputs(store, case, work / "configs")
    lowmem_output = work / "outputs" / f"{case.name}-lowmem"
    mergekit_output = work / "outputs" / f"{case.name}-mergekit"
    check = check_plan(inputs.config, lowmem_output)
    if not check.supported:
        logger.info("%s: lowmem-moe does not support this merge yet; mergekit-moe is not run either", case.name)
        return {
            "case": asdict(case),
            "lowmem": not_supported_record(case.name, "lowmem-moe", check).to_json(),
            "mergekit": None,
            "comparison": None,
        }

    # Both outputs stay on disk until they are compared.
    require_disk_space(work, 2 * check.bytes_written)
    lowmem = measure_lowmem_merge(f"peer-{case.name}-lowmem", inputs.config, lowmem_output, work, inputs.source_files)
    mergekit = measure_mergekit(
        f"peer-{case.name}-mergekit", mergekit_moe, inputs.config, mergekit_output, work, inputs.source_files
    )
    comparison = None
    if lowmem.status == OK and mergekit.status == OK:
        logger.info("Comparing the outputs of %s", case.name)
        comparison = compare_outputs(lowmem_output, mergekit_output).to_json()
    for folder in (lowmem_output, mergekit_output):
        if folder.exists():
            shutil.rmtree(folder)
    return {"case": asdict(case), "lowmem": lowmem.to_json(), "mergekit": mergekit.to_json(), "comparison": comparison}


def run_peer(work: Path, results: Path, peer_venv: Path, workers: int) -> dict[str, Any]:
    """Run every peer merge and return the results, also written to results/peer.json.

    Raises:
        FileNotFoundError: mergekit-moe is not installed in ``peer_venv``.
    """
    started = time.perf_counter()
    mergekit_moe = peer_venv / "bin" / "mergekit-moe"
    if not mergekit_moe.is_file():
        raise FileNotFoundError(f"{mergekit_moe} not found. Run `make bench-peer`, which installs mergekit into {peer_venv}.")

    work.mkdir(parents=True, exist_ok=True)
    machine = collect_machine_info(work)
    machine["peer"] = peer_versions(peer_venv / "bin" / "python")
    store = ModelStore(work / "models", ModelShape())
    store.generate(store.missing_files(model_requests(list(PEER_CASES))), workers)

    cases = [run_peer_case(store, case, work, mergekit_moe) for case in PEER_CASES]
    result = {
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "total_seconds": time.perf_counter() - started,
        "cases": cases,
    }
    results.mkdir(parents=True, exist_ok=True)
    (results / PEER_RESULTS).write_text(json.dumps(result, indent=2) + "\n")
    return result


def _summary(result: dict[str, Any]) -> str:
    lines = [f"make bench-peer took {result['total_seconds'] / 60:.1f} min."]
    for row in result["cases"]:
        for key in ("lowmem", "mergekit"):
            if not row.get(key):
                continue
            record = RunRecord.from_json(row[key])
            if record.status != OK:
                lines.append(f"{row['case']['name']} {record.tool}: {record.status}")
                continue
            lines.append(
                f"{row['case']['name']} {record.tool}: {record.wall_seconds:.1f} s, peak RSS {record.peak_rss_bytes / 1e6:.0f} MB"
            )
        if row.get("comparison"):
            comparison = row["comparison"]
            lines.append(f"  tensors equal: {comparison['equal_count']}, different: {comparison['different_count']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark lowmem-moe against mergekit-moe; see benchmarks/RESULTS.md.")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="folder for cached models, outputs and logs")
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="folder for the JSON results")
    parser.add_argument("--peer-venv", type=Path, default=DEFAULT_WORK / "peer-venv", help="virtual environment with mergekit")
    parser.add_argument("--workers", type=int, default=2, help="processes that generate synthetic models (default: 2)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    result = run_peer(args.work.resolve(), args.results.resolve(), args.peer_venv.resolve(), args.workers)
    page = write_results_page(args.results.resolve(), BENCHMARKS / "RESULTS.md")
    print(_summary(result))
    print(f"Results: {page}")
    failed = any(row[key] and row[key]["status"] == "failed" for row in result["cases"] for key in ("lowmem", "mergekit"))
    different = any(row["comparison"] and row["comparison"]["different_count"] for row in result["cases"])
    return 1 if failed or different else 0


if __name__ == "__main__":
    sys.exit(main())
