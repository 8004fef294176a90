import json

from conftest import copy_artifacts, run_stage


def test_bench_times_both_levels(pipeline, tmp_path, tiny_llm):
    out = copy_artifacts(pipeline, tmp_path, "dataset.json")
    proc = run_stage("bench_sft.py", "--data", "synth", "--out", out, "--llm", tiny_llm, "--k", 4,
                     "--max-tokens", 512, "--device", "cpu")
    assert "instance-level / user-level time" in proc.stdout
    result = json.loads((out / "synth" / "bench_sft.json").read_text())
    rows = {(r["level"], r["phase"]): r for r in result["rows"]}
    sequences = json.loads((pipeline / "dataset.json").read_text())["sequences"]
    assert rows["user", "train epoch"]["samples"] == len(sequences)  # one sample per user
    assert rows["instance", "train epoch"]["samples"] == sum(len(s) - 3 for s in sequences)  # one per train position
    assert rows["user", "inference"]["samples"] == 40  # P2Rec's inference: one pass over the items
    assert result["ratios"]["train epoch"]["token_ratio"] > 3
    assert all(r["seconds"] > 0 and r["mfu"] is None for r in result["rows"])  # no MFU without a known GPU peak


def test_bench_scales_a_timed_share_of_the_epoch(pipeline, tmp_path, tiny_llm):
    out = copy_artifacts(pipeline, tmp_path, "dataset.json")
    run_stage("bench_sft.py", "--data", "synth", "--out", out, "--llm", tiny_llm, "--k", 4, "--levels", "user",
              "--max-tokens", 128, "--fraction", 0.5, "--device", "cpu")
    row = json.loads((out / "synth" / "bench_sft.json").read_text())["rows"][0]
    assert 0 < row["timed_share"] < 1 and row["seconds"] > 0
