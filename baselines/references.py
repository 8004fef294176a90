"""
Score the reference rankers on the candidates of baseline runs that have finished: popularity and every SASRec in
out/<dataset>/ (the teacher, the papers' SASRec trained with bce, the P2Rec student), without the LLM. For a
reference trained after the run, e.g. the papers' SASRec beside runs that had only the teacher.

Reads  the runs' metrics JSONs (baselines/delrec.py and baselines/llm_trsr.py write them), out/<dataset>/dataset.json,
       teacher.pt, and where they exist teacher_bce.pt and student.pt
Writes nothing: prints one markdown table per run, each row's mean ± std over the run's seeds beside the run's own
       figure where it has that row (popularity's must be the same: the same candidates)

$ python 02_teacher.py --data ml-100k --loss bce --name teacher_bce
$ python baselines/references.py out/ml-100k/delrec_metrics.json out/ml-100k/llm_trsr_hierarchical_metrics.json

A run's candidates are drawn from its dataset, seeds, test users and candidate count alone, so they are drawn again
here exactly. A SASRec retrained since (teacher.pt on another machine) ranks them a little differently from the
one the run scored.
"""
import argparse
import os
import sys
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import delrec  # noqa: E402
import llm_trsr  # noqa: E402
from common import load_dataset, load_references, popularity_scores, rank_systems, run_main, seeds_mean_std  # noqa: E402
from table import TABLES, pooled, read_runs, systems  # noqa: E402


def made_by(run):
    """The baseline that wrote the run: its script, its metrics of a target's rank, the two metrics its table shows."""
    if "paradigm" in run["args"]:
        return llm_trsr, llm_trsr.ranking_metrics, TABLES["LLM-TRSR's candidates"][1]
    return delrec, delrec.rank_metrics, TABLES["DELRec's candidates"][1]


def rescore(run, references, data):
    """The references' and popularity's metrics on each of the run's seeds' test candidates, then mean ± std."""
    script, metrics_of_rank, _ = made_by(run)
    args = SimpleNamespace(**run["args"])
    per_seed = {}
    for seed in run["seeds"]:
        cases = script.test_cases(data["sequences"], data["num_items"], args, seed)
        rankers = {"popularity": popularity_scores(data["sequences"], data["num_items"], seed), **references}
        per_seed[seed] = rank_systems(rankers, None, None, cases, metrics_of_rank, f"seed {seed}")
    return seeds_mean_std(per_seed)


def print_table(run, mean, std, metrics):
    print(f"\n{run['args']['data']}, {systems(run)[0]}'s candidates ({run['path']}): "
          f"{run['args']['candidates']} per test user, {run['test_users']} users, seeds "
          f"{' '.join(map(str, run['seeds']))}\n")
    print(f"| system | {' | '.join(metrics)} | the run's own |")
    print("|---|" + "---|" * (len(metrics) + 1))
    for system in mean:
        own = run["metrics"].get(system)
        print(f"| {system} | {' | '.join(f'{mean[system][m]:.4f} ± {std[system][m]:.4f}' for m in metrics)} | "
              f"{' / '.join(f'{own[m]:.4f}' for m in metrics) if own else '-'} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="JSON", help="the baseline runs' metrics files; runs of one "
                        "system whose settings differ in their seeds alone are pooled")
    parser.add_argument("--out", default="out", help="the dataset and the SASRecs are in OUT/<the runs' dataset>/")
    args = parser.parse_args()
    for run in pooled(list(read_runs(args.runs))):  # runs of one system on other seeds as one, as table.py does
        where = SimpleNamespace(data=run["args"]["data"], out=args.out, force=False)
        data = load_dataset(where)
        mean, std = rescore(run, load_references(where, data), data)
        print_table(run, mean, std, made_by(run)[2])


if __name__ == "__main__":
    run_main(main)
