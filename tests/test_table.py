import json

from conftest import run_stage


def metrics_json(path, systems, seeds=(1, 2, 3), users=50, candidates=20, metrics=("HR@10", "NDCG@10")):
    """A baseline's metrics file: `systems` {name: (mean, std)}, the same figures for every metric."""
    per_seed = {str(s): {"seconds": 100.0 + s, "llm_seconds": 90.0 + s} for s in seeds}
    path.write_text(json.dumps({
        "args": {"candidates": candidates}, "test_users": users, "seeds": list(seeds), "per_seed": per_seed,
        "metrics": {name: {m: mean for m in metrics} for name, (mean, _) in systems.items()},
        "std": {name: {m: std for m in metrics} for name, (_, std) in systems.items()}}))


REFERENCES = {"random (expected)": (0.5, 0.0), "popularity": (0.80, 0.01), "SASRec teacher": (0.95, 0.01)}


def test_ablation_beside_the_system_and_stars_only_past_two_std_over_popularity(tmp_path):
    out = tmp_path / "synth"
    out.mkdir()
    metrics_json(out / "delrec_metrics.json", {**REFERENCES, "DELRec": (0.83, 0.01)})  # +0.03 > 2 std
    metrics_json(out / "delrec_no_stage1_metrics.json", {**REFERENCES, "DELRec, no stage 1": (0.81, 0.01)})
    metrics_json(out / "llm_trsr_hierarchical_metrics.json", {**REFERENCES, "LLM-TRSR (hierarchical)": (0.9, 0.01)},
                 seeds=(42,), candidates=21, metrics=("Recall@10", "MRR@10"))
    printed = run_stage("baselines/table.py", "--data", "synth", "--out", tmp_path).stdout
    delrec, trsr = printed.split("LLM-TRSR's candidates")
    assert "20 per test user, 50 users, seeds 1 2 3" in delrec
    assert "| DELRec | 0.8300 ± 0.0100* | 0.8300 ± 0.0100* | 102 s (LLM 92 s) |" in delrec
    assert "| DELRec, no stage 1 | 0.8100 ± 0.0100 | 0.8100 ± 0.0100 |" in delrec
    assert delrec.count("| popularity |") == 1 and "P2Rec student" not in delrec
    assert "| Recall@10 | MRR@10 |" in trsr and "0.9000 ± 0.0100 |" in trsr  # one seed: no claim, no star


def test_runs_on_other_candidates_get_their_own_table(tmp_path):
    out = tmp_path / "synth"
    out.mkdir()
    metrics_json(out / "delrec_metrics.json", {**REFERENCES, "DELRec": (0.83, 0.01)})
    metrics_json(out / "delrec_no_stage1_metrics.json", {**REFERENCES, "DELRec, no stage 1": (0.81, 0.01)},
                 seeds=(4, 5, 6))
    printed = run_stage("baselines/table.py", "--data", "synth", "--out", tmp_path).stdout
    assert printed.count("DELRec's candidates") == 2 and "seeds 4 5 6" in printed


def test_no_metrics_is_one_error_line(tmp_path):
    (tmp_path / "synth").mkdir()
    proc = run_stage("baselines/table.py", "--data", "synth", "--out", tmp_path, check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: no baseline metrics in {tmp_path}/synth/: run python baselines/delrec.py --data synth or "
        "python baselines/llm_trsr.py --data synth first"]
