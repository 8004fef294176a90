"""baselines/references.py: the reference rankers scored again on finished runs' candidates, a SASRec trained since
among them."""
import json

import pytest

from conftest import TEACHER_ARGS, copy_artifacts, run_stage

RUNS = {"baselines/delrec.py": (["--train-users", 10, "--virtual-tokens", 4, "--batch-size", 8], "delrec_metrics.json"),
        "baselines/llm_trsr.py": (["--train-users", 10, "--summary-tokens", 4, "--generate-batch", 16],
                                  "llm_trsr_hierarchical_metrics.json")}


def table_rows(printed):
    """{system: (the figures rescored, the run's own)} from the markdown tables."""
    rows = {}
    for line in printed.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and "±" in line:
            rows.setdefault(cells[0], []).append(([float(c.split(" ± ")[0]) for c in cells[1:3]], cells[3]))
    return rows


@pytest.mark.parametrize("script", RUNS)
def test_rescored_references_match_the_run_and_add_the_papers_sasrec(pipeline, tmp_path, tiny_llm, script):
    out = copy_artifacts(pipeline, tmp_path, "dataset.json", "teacher.pt", "student.pt")
    args, metrics = RUNS[script]
    common = ["--data", "synth", "--out", out, "--device", "cpu"]
    for seed in (1, 2):  # two runs, pooled into one over both seeds
        run_stage(script, *common, "--llm", tiny_llm, *args, "--test-users", 20, "--seeds", seed)
        (out / "synth" / metrics).rename(out / f"seed{seed}.json")
    run_stage("02_teacher.py", *common, *TEACHER_ARGS, "--loss", "bce", "--name", "teacher_bce")

    rows = table_rows(run_stage("baselines/references.py", out / "seed1.json", out / "seed2.json", "--out", out).stdout)
    pooled = {seed: json.loads((out / f"seed{seed}.json").read_text())["metrics"] for seed in (1, 2)}
    names = {"popularity", "SASRec teacher", "SASRec, bce (the papers')", "P2Rec student"}
    assert set(rows) == names and all(len(r) == 1 for r in rows.values())  # one table: the two seeds pooled
    first, second = (m for m in pooled[1]["popularity"] if m.endswith("@10"))
    for system in names - {"SASRec, bce (the papers')"}:  # the same candidates, the same models: the same figures
        figures, own = rows[system][0]
        expected = [(pooled[1][system][m] + pooled[2][system][m]) / 2 for m in (first, second)]
        assert figures == pytest.approx(expected, abs=6e-5) and own == " / ".join(f"{v:.4f}" for v in expected)
    figures, own = rows["SASRec, bce (the papers')"][0]
    assert own == "-" and all(0 <= f <= 1 for f in figures) and figures[0] > 0.6  # it learned the walks (chance: 0.5)
