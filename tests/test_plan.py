"""The plan command: totals, per-tensor byte ranges and JSON, with nothing written."""

import json
import subprocess
import sys

from merge_helpers import merge, merge_yaml, read_tensors


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "lowmem_moe.cli", *map(str, args)], capture_output=True, text=True)


def test_plan_prints_totals(tmp_path, tiny_llama, tiny_experts):
    config = merge_yaml(tmp_path / "merge.yml", tiny_llama, tiny_experts)

    result = run_cli("plan", config, tmp_path / "out")

    assert result.returncode == 0, result.stderr
    for label in ("bytes read", "bytes written", "shards", "free disk", "expected peak memory", "disk needed"):
        assert label in result.stdout
    assert not (tmp_path / "out").exists()


def test_plan_warns_non_empty_out_dir(tmp_path, tiny_llama, tiny_experts):
    config = merge_yaml(tmp_path / "merge.yml", tiny_llama, tiny_experts)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("old")

    result = run_cli("plan", config, out)

    assert result.returncode == 0, result.stderr
    assert "warning: merge would stop here: Output folder" in result.stderr
    assert "is not empty" in result.stderr
    assert "bytes written" in result.stdout


def test_plan_tensors_lists_every_output(tmp_path, tiny_llama, tiny_experts):
    config = merge_yaml(tmp_path / "merge.yml", tiny_llama, tiny_experts)

    result = run_cli("plan", config, tmp_path / "out", "--tensors")
    merged = read_tensors(merge(config, tmp_path / "out"))
    listed = {line.split()[1] for line in result.stdout.splitlines() if line.startswith("model-")}

    assert listed == set(merged)


def test_plan_json_ranges_hold_source_bytes(tmp_path, tiny_llama, tiny_experts):
    config = merge_yaml(tmp_path / "merge.yml", tiny_llama, tiny_experts)

    result = run_cli("plan", config, tmp_path / "out", "--json")
    plan = json.loads(result.stdout)
    merged = read_tensors(merge(config, tmp_path / "out"))

    checked = 0
    for shard in plan["shards"]:
        for tensor in shard["tensors"]:
            segments = tensor["source"].get("segments")
            if not segments:
                assert tensor["name"].endswith("block_sparse_moe.gate.weight")
                continue
            data = b""
            for segment in segments:
                with open(segment["path"], "rb") as handle:
                    handle.seek(segment["offset"])
                    data += handle.read(segment["nbytes"])
            assert merged[tensor["name"]].numpy().tobytes() == data, tensor["name"]
            checked += 1
    assert checked == len(merged) - 2  # all but the two routers
    assert plan["bytes_read"] == sum(
        segment["nbytes"] for shard in plan["shards"] for t in shard["tensors"] for segment in t["source"].get("segments", [])
    )


def test_plan_shard_size_splits_output(tmp_path, tiny_llama, tiny_experts):
    config = merge_yaml(tmp_path / "merge.yml", tiny_llama, tiny_experts)

    result = run_cli("plan", config, tmp_path / "out", "--json", "--shard-size", "50KB")
    plan = json.loads(result.stdout)

    assert len(plan["shards"]) > 3
    for shard in plan["shards"]:
        sizes = [tensor["nbytes"] for tensor in shard["tensors"]]
        assert sum(sizes) <= 50_000 or len(sizes) == 1
