import json

import pytest

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


def seeds_json(path, per_seed, **args):
    """A baseline's metrics file as run_seeds writes it: `per_seed` {seed: {system: value}}, the same value for
    every metric; its mean and std are the first seed's and 0, so that a pooled table must recompute them."""
    per_seed = {str(seed): {"metrics": {name: {"HR@10": v, "NDCG@10": v} for name, v in systems.items()},
                            "seconds": 100.0, "llm_seconds": 90.0} for seed, systems in per_seed.items()}
    first = next(iter(per_seed.values()))["metrics"]
    path.write_text(json.dumps({
        "args": {"candidates": 20, "prefixes": 5, "out": str(path.parent), **args, "seeds": [int(s) for s in per_seed]},
        "test_users": 50, "seeds": [int(s) for s in per_seed], "per_seed": per_seed, "metrics": first,
        "std": {name: {m: 0.0 for m in values} for name, values in first.items()}}))
    return path


def test_runs_of_one_system_on_other_seeds_pool_into_one(tmp_path):
    first = seeds_json(tmp_path / "a.json", {42: {"popularity": 0.70, "P2Rec student": 0.9, "DELRec": 0.80}})
    (tmp_path / "b").mkdir()  # another machine's out dir
    rest = seeds_json(tmp_path / "b" / "c.json", {43: {"popularity": 0.71, "DELRec": 0.82},
                                                  44: {"popularity": 0.72, "DELRec": 0.84}})
    printed = run_stage("baselines/table.py", "--runs", first, rest).stdout
    assert printed.count("DELRec's candidates") == 1 and "seeds 42 43 44" in printed
    assert "| popularity | 0.7100 ± 0.0100 |" in printed
    assert "| DELRec | 0.8200 ± 0.0200* | 0.8200 ± 0.0200* | 100 s (LLM 90 s) |" in printed  # 0.11 > 2 x 0.02
    assert "P2Rec student" not in printed  # scored by one seed of three: no mean over the three


def test_runs_with_other_settings_stay_apart_and_say_how_they_differ(tmp_path):
    seeds = {1: {"popularity": 0.7, "DELRec": 0.8}, 2: {"popularity": 0.7, "DELRec": 0.8}}
    five = seeds_json(tmp_path / "five.json", seeds)
    twenty = seeds_json(tmp_path / "twenty.json", seeds, prefixes=20)
    printed = run_stage("baselines/table.py", "--runs", five, twenty).stdout
    assert "| DELRec (--prefixes 5) |" in printed and "| DELRec (--prefixes 20) |" in printed


def test_a_run_from_before_an_option_existed_pools_with_one_that_leaves_it_unset(tmp_path):
    older = seeds_json(tmp_path / "older.json", {1: {"popularity": 0.7, "DELRec": 0.8}})
    unset = seeds_json(tmp_path / "unset.json", {2: {"popularity": 0.7, "DELRec": 0.8}}, system=None)
    chosen = seeds_json(tmp_path / "chosen.json", {3: {"popularity": 0.7, "DELRec": 0.8}}, system="Describe tastes.")
    printed = run_stage("baselines/table.py", "--runs", older, unset, chosen).stdout
    assert "seeds 1 2 (mean ± std)" in printed and "seeds 3 (mean ± std)" in printed


@pytest.mark.parametrize("case, words", [("missing", "does not exist"), ("not metrics", "is not a baseline's metrics"),
                                         ("seed twice", "seed 1 of DELRec is in both")])
def test_bad_runs_are_one_error_line(tmp_path, case, words):
    run = seeds_json(tmp_path / "run.json", {1: {"popularity": 0.7, "DELRec": 0.8}})
    (tmp_path / "other.json").write_text(json.dumps({"users": 5}))
    given = {"missing": [tmp_path / "nowhere.json"], "not metrics": [run, tmp_path / "other.json"],
             "seed twice": [run, run]}[case]
    proc = run_stage("baselines/table.py", "--runs", *given, check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and words in proc.stderr
