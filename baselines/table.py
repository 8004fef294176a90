"""
One table per candidate set from the baselines' metrics: DELRec beside its ablation, LLM-TRSR's two paradigms
beside each other, each with random, popularity, the SASRec teacher, the papers' SASRec (bce; where the runs scored
it) and the P2Rec student, mean ± std over seeds.

Reads  out/<dataset>/delrec_metrics.json, delrec_no_stage1_metrics.json, llm_trsr_hierarchical_metrics.json,
       llm_trsr_recurrent_metrics.json (whichever exist; baselines/delrec.py and baselines/llm_trsr.py write them)
Writes nothing: prints markdown

$ python baselines/table.py --data ml-100k
$ python baselines/table.py --runs results/delrec_beauty_round11_tokens_prefixes5_seed42.json \\
      results/delrec_beauty_round12_tokens_prefixes5_seeds43-44.json

`--runs` reads the metrics files given instead, and pools runs of one system whose settings differ in their seeds
alone (seed 42 on one machine, 43 and 44 on another) into one run over all their seeds. The files do not say which
commit made them: give runs of the same code, or of changes that you know rank alike.

With 3 seeds or more, a system's figure carries * where its mean is above popularity's by more than twice the
larger standard deviation of the two (the bar the baselines are held to). Rows of systems that every run scores
(popularity, the teacher, the student) come from the first run of the table; a run on other seeds or other test
users than that one ranked other candidates, so it goes into a table of its own. Two runs of one system in a table
are told apart by the settings in which they differ.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import UserError, clearly_above, load_artifact, run_main, seeds_mean_std, stage_dir  # noqa: E402

# candidate set -> (the runs that rank it, the two metrics shown)
TABLES = {"DELRec's candidates": (("delrec", "delrec_no_stage1"), ("HR@10", "NDCG@10")),
          "LLM-TRSR's candidates": (("llm_trsr_hierarchical", "llm_trsr_recurrent"), ("Recall@10", "MRR@10"))}
REFERENCES = ("random (expected)", "popularity", "SASRec teacher", "SASRec, bce (the papers')", "P2Rec student")


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


def settings(run):
    """What a run's candidates and training depend on, its seeds and where it ran aside. Options left unset (None)
    are left out, so that a run from before an option existed pools with one that leaves it unset."""
    return {k: v for k, v in run["args"].items() if k not in ("seeds", "out", "device", "force") and v is not None}


def systems(run):
    return [s for s in run["metrics"] if s not in REFERENCES]


def pool_seeds(runs):
    """Runs of one system with the same settings on other seeds as one run over all their seeds: every seed's
    metrics, their mean ± std over the systems that every seed scored."""
    per_seed, came_from = {}, {}
    for run in runs:
        twice = per_seed.keys() & run["per_seed"].keys()
        if twice:
            seed = min(twice, key=int)
            raise UserError(f"seed {seed} of {systems(run)[0]} is in both {came_from[seed]} and {run['path']}: "
                            f"give one of them")
        per_seed.update(run["per_seed"])
        came_from.update(dict.fromkeys(run["per_seed"], run["path"]))
    per_seed = dict(sorted(per_seed.items(), key=lambda item: int(item[0])))
    scored = set.intersection(*(set(seed["metrics"]) for seed in per_seed.values()))
    mean, std = seeds_mean_std({s: {k: v for k, v in seed["metrics"].items() if k in scored}
                                for s, seed in per_seed.items()})
    return {**runs[0], "seeds": [int(s) for s in per_seed], "per_seed": per_seed, "metrics": mean, "std": std}


def pooled(runs):
    groups = {}
    for run in runs:
        key = json.dumps([systems(run), settings(run), run["test_users"]], sort_keys=True)
        groups.setdefault(key, []).append(run)
    return [pool_seeds(group) if len(group) > 1 else group[0] for group in groups.values()]


def told_apart(result, others):
    """The settings in which `result` differs from other runs of its system in one table, as options."""
    mine = settings(result)
    differ = sorted(k for k in mine if any(settings(other).get(k) != mine[k] for other in others))
    return ", ".join(f"--{k.replace('_', '-')} {mine[k]}" for k in differ)


def same_candidates(a, b):
    return a["seeds"] == b["seeds"] and a["test_users"] == b["test_users"]


def print_table(title, results, metrics):
    """`results`: the runs' metrics JSONs, all ranking the same candidates."""
    first = results[0]
    print(f"\n{title}: {first['args']['candidates']} per test user, {first['test_users']} users, seeds "
          f"{' '.join(map(str, first['seeds']))} (mean ± std)\n")
    print(f"| system | {' | '.join(metrics)} | wall time per seed |")
    print("|---|" + "---|" * (len(metrics) + 1))
    rows = [(s, s, first, "") for s in REFERENCES if s in first["metrics"]]
    for result in results:
        for system in systems(result):
            others = [r for r in results if r is not result and system in r["metrics"]]
            told = told_apart(result, others)
            rows.append((system, f"{system} ({told})" if told else system, result, wall_time(result)))
    for system, label, result, seconds in rows:
        print(f"| {label} | {' | '.join(cell(result, system, m) for m in metrics)} | {seconds} |")


def read_runs(paths):
    give = ("give the metrics JSONs that baselines/delrec.py and baselines/llm_trsr.py write "
            "(out/<dataset>/*_metrics.json)")
    for path in paths:
        if not os.path.exists(path):
            raise UserError(f"{path} does not exist: {give}")
        run = load_artifact(path)
        if not (isinstance(run, dict) and {"args", "per_seed", "metrics", "std"} <= run.keys()
                and "popularity" in run["metrics"]):
            raise UserError(f"{path} is not a baseline's metrics file: {give}")
        yield {**run, "path": path}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="ml-100k", help="dataset name, as given to the baselines")
    parser.add_argument("--out", default="out", help="the baselines' metrics are in OUT/DATA/")
    parser.add_argument("--runs", nargs="+", metavar="JSON", help="metrics files to read instead of OUT/DATA's; "
                        "runs of one system whose settings differ in their seeds alone are pooled")
    args = parser.parse_args()
    if args.runs:
        found = list(read_runs(args.runs))
    else:
        out = stage_dir(args)
        paths = [os.path.join(out, f"{name}_metrics.json") for names, _ in TABLES.values() for name in names]
        found = list(read_runs([p for p in paths if os.path.exists(p)]))
        if not found:
            raise UserError(f"no baseline metrics in {out}/: run python baselines/delrec.py --data {args.data} or "
                            f"python baselines/llm_trsr.py --data {args.data} first")
    for title, (_, metrics) in TABLES.items():
        left = pooled([run for run in found if metrics[0] in run["metrics"]["popularity"]])
        while left:  # the runs on the first one's candidates, then the rest
            together = [r for r in left if same_candidates(r, left[0])]
            print_table(title, together, metrics)
            left = [r for r in left if r not in together]


if __name__ == "__main__":
    run_main(main)
