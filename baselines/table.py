"""
One table per candidate set from the baselines' metrics: DELRec beside its ablation, LLM-TRSR's two paradigms
beside each other, each with random, popularity, the SASRec teacher and the P2Rec student, mean ± std over seeds.

Reads  out/<dataset>/delrec_metrics.json, delrec_no_stage1_metrics.json, llm_trsr_hierarchical_metrics.json,
       llm_trsr_recurrent_metrics.json (whichever exist; baselines/delrec.py and baselines/llm_trsr.py write them)
Writes nothing: prints markdown

$ python baselines/table.py --data ml-100k

With 3 seeds or more, a system's figure carries * where its mean is above popularity's by more than twice the larger
standard deviation of the two (the bar the baselines are held to). Rows of systems that every run scores (popularity, the teacher,
the student) come from the first run of the table; a run on other seeds or other test users than that one ranked
other candidates, so it goes into a table of its own.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import UserError, clearly_above, load_artifact, run_main, stage_dir  # noqa: E402

# candidate set -> (the runs that rank it, the two metrics shown)
TABLES = {"DELRec's candidates": (("delrec", "delrec_no_stage1"), ("HR@10", "NDCG@10")),
          "LLM-TRSR's candidates": (("llm_trsr_hierarchical", "llm_trsr_recurrent"), ("Recall@10", "MRR@10"))}
REFERENCES = ("random (expected)", "popularity", "SASRec teacher", "P2Rec student")


def above_popularity(result, system, metric):
    if len(result["seeds"]) < 3:
        return False  # no claim from fewer seeds
    mean, std = result["metrics"], result["std"]
    return clearly_above(mean[system][metric], std[system][metric], mean["popularity"][metric], std["popularity"][metric])


def cell(result, system, metric):
    mean, std = result["metrics"][system][metric], result["std"][system][metric]
    star = "*" if system not in REFERENCES and above_popularity(result, system, metric) else ""
    return f"{mean:.4f} ± {std:.4f}{star}"


def wall_time(result):
    """Mean wall time per seed and the LLM's share of it (a resumed seed counts only its resumed part)."""
    runs = list(result["per_seed"].values())
    if not all("llm_seconds" in r for r in runs):
        return "-"  # metrics written before the baselines timed their seeds
    seconds, llm = (sum(r[key] for r in runs) / len(runs) for key in ("seconds", "llm_seconds"))
    return f"{seconds:.0f} s (LLM {llm:.0f} s)"


def same_candidates(a, b):
    return a["seeds"] == b["seeds"] and a["test_users"] == b["test_users"]


def print_table(title, results, metrics):
    """`results`: the runs' metrics JSONs, all ranking the same candidates."""
    first = results[0]
    print(f"\n{title}: {first['args']['candidates']} per test user, {first['test_users']} users, seeds "
          f"{' '.join(map(str, first['seeds']))} (mean ± std)\n")
    print(f"| system | {' | '.join(metrics)} | wall time per seed |")
    print("|---|" + "---|" * (len(metrics) + 1))
    systems = [(s, first, "") for s in REFERENCES if s in first["metrics"]]
    systems += [(s, result, wall_time(result)) for result in results for s in result["metrics"] if s not in REFERENCES]
    for system, result, seconds in systems:
        print(f"| {system} | {' | '.join(cell(result, system, m) for m in metrics)} | {seconds} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="ml-100k", help="dataset name, as given to the baselines")
    parser.add_argument("--out", default="out", help="the baselines' metrics are in OUT/DATA/")
    args = parser.parse_args()
    out = stage_dir(args)
    paths = {title: [os.path.join(out, f"{name}_metrics.json") for name in names] for title, (names, _) in TABLES.items()}
    runs = {title: [load_artifact(p) for p in ps if os.path.exists(p)] for title, ps in paths.items()}
    if not any(runs.values()):
        raise UserError(f"no baseline metrics in {out}/: run python baselines/delrec.py --data {args.data} or "
                        f"python baselines/llm_trsr.py --data {args.data} first")
    for title, (_, metrics) in TABLES.items():
        left = runs[title]
        while left:  # the runs on the first one's candidates, then the rest
            together = [r for r in left if same_candidates(r, left[0])]
            print_table(title, together, metrics)
            left = [r for r in left if r not in together]


if __name__ == "__main__":
    run_main(main)
