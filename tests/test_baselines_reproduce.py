"""baselines/reproduce.sh: every baseline run on one dataset, then their tables; run again, it skips what is done."""
import json
import os
import subprocess
import sys

from conftest import ROOT, copy_artifacts

METRICS = ("delrec_metrics.json", "delrec_no_stage1_metrics.json", "llm_trsr_hierarchical_metrics.json",
           "llm_trsr_recurrent_metrics.json")


def reproduce(out, tiny_llm):
    """The script as a user runs it, with the `python` of this test's environment first on the PATH."""
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    args = ["--out", out, "--device", "cpu", "--llm", tiny_llm, "--train-users", 20, "--test-users", 20, "--lr", 1e-2,
            "--seeds", 1]
    proc = subprocess.run(["bash", "baselines/reproduce.sh", "synth", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_every_baseline_runs_then_the_tables_and_a_rerun_skips_the_finished_runs(pipeline, tmp_path, tiny_llm):
    out = copy_artifacts(pipeline, tmp_path, "dataset.json", "teacher.pt", "student.pt")
    printed = reproduce(out, tiny_llm)
    assert "teacher (bce)" in printed and (out / "synth" / "teacher_bce.pt").exists()  # trained by the script
    for name in METRICS:
        assert list(json.loads((out / "synth" / name).read_text())["per_seed"]) == ["1"]  # --seeds overrides 42 43 44
    table = (out / "synth" / "baselines.md").read_text()
    for system in ("| DELRec |", "| DELRec, no stage 1 |", "hierarchical", "recurrent", "| popularity |",
                   "| SASRec, bce (the papers') |"):
        assert system in table and system in printed
    again = reproduce(out, tiny_llm)
    assert again.count("exists, skipping") == len(METRICS) + 1  # and the papers' SASRec
    assert (out / "synth" / "baselines.md").read_text() == table
