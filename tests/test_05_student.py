import importlib
import json

import pytest
import torch

from common import ItemEmbedding, SASRec, llm_features
from conftest import copy_artifacts, kill_when_checkpointed, run_stage

student = importlib.import_module("05_student")
TINY = ["--epochs", 4, "--batch-size", 16, "--lr", 5e-3, "--dim", 16, "--maxlen", 20, "--device", "cpu"]


def test_results_pair_vanilla_and_enhanced(pipeline):
    runs = json.loads((pipeline / "results.json").read_text())["runs"]
    assert {(r["loss"], r["model"], r["variant"]) for r in runs} == {("ce", m, v) for m in ("sasrec", "gru4rec")
                                                                     for v in ("vanilla", "enhanced")}
    for r in runs:
        assert set(r["test"]) >= {f"{p}{m}@{k}" for p in ("", "masked_", "sampled_") for m in ("HR", "NDCG") for k in (5, 10, 20)}
        assert r["sampled_candidates"] == 31  # 40 items, at most 10 seen by a user: 30 negatives + the target
        assert 1 <= r["best_epoch"] <= r["last_epoch"] == 5 and not r["converged"]  # 5 epochs, patience 50
        assert set(r["subgroups"]) == set(student.SUBGROUPS)
        assert r["subgroups"]["tail items"]["users"] + r["subgroups"]["head items"]["users"] == 80
    table = (pipeline / "results.md").read_text()
    assert "| ce | sasrec | enhanced |" in table and "Sampled (31 candidates)" in table and "tail items" in table
    assert (pipeline / "student.pt").exists()


def test_features_are_standardised_principal_components():
    emb = torch.randn(11, 24) * torch.linspace(0.1, 100, 24)  # wildly different scales per dimension
    emb[0] = 0
    features = llm_features(emb, 8)
    assert features.shape == (11, 8) and (features[0] == 0).all()
    assert torch.allclose(features[1:].std(), torch.tensor(1.0), atol=1e-5)
    one_hot = torch.nn.functional.one_hot(torch.tensor([0, 0, 1, 2, 2, 1, 0]), 3).float()
    assert llm_features(one_hot, 8).shape[1] == 2  # 3 categories: 2 directions once centred


def test_fusions_use_the_features():
    features = llm_features(torch.randn(11, 24), 8)
    torch.manual_seed(0)
    vanilla = ItemEmbedding(10, 8)
    for fuse in ("init", "add", "align"):
        torch.manual_seed(0)
        items = ItemEmbedding(10, 8, features, fuse, align_weight=2.0)
        if fuse == "init":  # the ID table starts as a scaled copy of the features
            assert torch.allclose(items.table(), features * 8 ** -0.5)
        else:  # the random ID table is the vanilla one; add starts as plain IDs, align pulls toward the features
            assert torch.allclose(items.id_emb.weight, vanilla.id_emb.weight)
            assert torch.allclose(items.table(), vanilla.table())
    align = ItemEmbedding(10, 8, features, "align", align_weight=2.0)
    expected = 2.0 * (align.id_emb.weight[1:] - features[1:] * 8 ** -0.5).pow(2).sum(1).mean()
    assert torch.allclose(align.regulariser(), expected)
    assert ItemEmbedding(10, 8, features, "init").regulariser() == 0


def test_xavier_init_scales_the_item_table_and_keeps_the_variants_paired():
    features = llm_features(torch.randn(2001, 24), 16)
    std = (2 / (2001 + 16)) ** 0.5
    torch.manual_seed(0)
    vanilla = SASRec(ItemEmbedding(2000, 16, xavier=True), maxlen=10, xavier=True)
    torch.manual_seed(0)
    enhanced = SASRec(ItemEmbedding(2000, 16, features, "init", xavier=True), maxlen=10, xavier=True)
    assert abs(vanilla.item_table()[1:].std().item() / std - 1) < 0.05
    assert torch.allclose(enhanced.item_table(), features * std)
    rest = [(name, w) for name, w in vanilla.named_parameters() if not name.startswith("items.")]
    assert all(torch.equal(w, enhanced.get_parameter(name)) for name, w in rest)
    torch.manual_seed(0)
    normal = SASRec(ItemEmbedding(2000, 16), maxlen=10)
    assert not torch.allclose(normal.pos_emb.weight.std(), vanilla.pos_emb.weight.std(), rtol=0.1)


def test_gru4rec_ignores_padding_and_is_causal():
    torch.manual_seed(0)
    model = student.GRU4Rec(ItemEmbedding(20, 8), dropout=0.0).eval()
    seq = torch.tensor([[0, 0, 3, 4, 5]])
    padded = torch.tensor([[0, 0, 0, 0, 3, 4, 5]])
    assert torch.allclose(model(seq)[:, -3:], model(padded)[:, -3:], atol=1e-6)
    changed = torch.tensor([[0, 0, 3, 4, 9]])
    assert torch.allclose(model(seq)[:, :-1], model(changed)[:, :-1])


def test_subgroups_split_users_by_target_popularity_and_history():
    sequences = [[1, 1, 1, 1, 2, 3], [1, 2, 2, 3, 4, 5, 6, 7, 1], [2, 3, 4, 5, 6]]
    masks = student.subgroup_masks(sequences, num_items=10)  # item 1 is the most popular of 10: the head (top 20%) is {1, 2}
    assert masks["head items"].tolist() == [False, True, False] and (masks["tail items"] == ~masks["head items"]).all()
    assert masks["short users"].tolist() == [True, False, True]


def toy_run(variant, seed, value, subgroups, model="sasrec", best_epoch=3, converged=True):
    test = {prefix + m: value * (2 if prefix else 1) for prefix in ("", "sampled_") for m in student.METRICS}
    return {"loss": "ce", "model": model, "variant": variant, "seed": seed, "test": test, "subgroups": subgroups,
            "best_epoch": best_epoch, "converged": converged, "sampled_candidates": 101}


def test_markdown_table_reports_lifts_spread_epochs_and_subgroups():
    groups = {g: {"NDCG@10": 0.1, "HR@10": 0.2} for g in student.SUBGROUPS}
    runs = [toy_run(v, s, x, groups, best_epoch=e) for v, xs, e in (("vanilla", (0.1, 0.2), 9), ("enhanced", (0.2, 0.3), 4))
            for s, x in zip((1, 2), xs)]
    table = student.markdown_table(runs, "toy", "init")
    # per-seed lifts +100% and +50%: mean 75, std 35.4; the means (0.15, 0.25) differ by less than 2 x 0.0707: no '*'
    assert "| ce | sasrec | enhanced | +75.0% ± 35.4 | +75.0% ± 35.4 | +75.0% ± 35.4 | +75.0% ± 35.4 | 4 |" in table
    assert "| ce | sasrec | vanilla | 0.1500 ± 0.0707 |" in table and "| 1 | 0.3000 ± 0.1414 |" not in table
    assert "Sampled (101 candidates)" in table and "| ce | sasrec | vanilla | 2 | 0.3000 ± 0.1414 |" in table
    assert "| ce | sasrec | enhanced | 0.1000 / 0.2000 |" in table
    clear = [toy_run(v, s, x, groups) for v, xs in (("vanilla", (0.10, 0.11)), ("enhanced", (0.20, 0.21))) for s, x in zip((1, 2), xs)]
    assert "| +95.5% ± 6.4 * |" in student.markdown_table(clear, "toy", "init")  # +100% and +90.9%, far above: marked


def test_markdown_table_shows_an_empty_subgroup_and_an_unconverged_run():
    groups = {g: {"NDCG@10": 0.1, "HR@10": 0.2} for g in student.SUBGROUPS if g != "short users"}  # ml-100k
    runs = [toy_run(v, s, 0.1, groups, "gru4rec", best_epoch=s, converged=s == 1) for v in ("vanilla", "enhanced") for s in (1, 2)]
    table = student.markdown_table(runs, "toy", "init")
    assert "| ce | gru4rec | vanilla | 0.1000 / 0.2000 | 0.1000 / 0.2000 | - | 0.1000 / 0.2000 |" in table
    assert "| 1-2! |" in table


@pytest.mark.parametrize("fuse,loss", [("init", "ce"), ("align", "ce"), ("init", "bce")])
def test_runs_trained_together_match_runs_trained_alone(pipeline, tmp_path, fuse, loss):
    """The same runs, stacked into one vmap-ed group or trained one at a time, end with the same metrics (dropout
    off: stacked runs draw their dropout masks together, so only its random numbers differ). With bce every run
    draws its own negatives and stops on its own (patience 3), in a group as alone."""
    results = {}
    stop = ["--epochs", 60, "--patience", 3] if loss == "bce" else []
    for together in ("yes", "no"):
        out = copy_artifacts(pipeline, tmp_path / together, "dataset.json", "teacher.pt", "sft_head.pt", "item_emb.pt")
        run_stage("05_student.py", "--data", "synth", "--out", out, *TINY, "--dropout", 0, "--seeds", 1, 2,
                  "--fuse", fuse, "--together", together, "--loss", loss, *stop)
        results[together] = json.loads((out / "synth" / "results.json").read_text())["runs"]
    key = lambda r: (r["model"], r["variant"], r["seed"])  # noqa: E731
    alone = {key(r): r for r in results["no"]}
    assert len(alone) == 8
    for r in results["yes"]:
        a = alone[key(r)]
        assert r["best_epoch"] == a["best_epoch"], key(r)
        for h, ha in zip(r["history"], a["history"]):
            assert h["loss"] == pytest.approx(ha["loss"], rel=1e-4), key(r)
            assert h["valid"] == pytest.approx(ha["valid"], abs=1e-6), key(r)
        assert r["test"] == pytest.approx(a["test"], abs=1e-6), key(r)
        assert r["last_epoch"] == a["last_epoch"] == len(r["history"]), key(r)
    if loss == "bce":
        assert all(r["converged"] and r["last_epoch"] == r["best_epoch"] + 3 for r in results["yes"])
        assert len({r["last_epoch"] for r in results["yes"]}) > 1  # the runs of one group stopped at different epochs


def test_item_text_variants_with_their_own_fusions(titled):
    """text and p2rec-text (beyond the ID-only setting) train beside vanilla; a fusion named in --variants is used."""
    proc = run_stage("05_student.py", "--data", "titled", "--out", titled.parent, *TINY, "--models", "sasrec",
                     "--variants", "vanilla,text,text+align,p2rec-text+add")
    runs = json.loads((titled / "results.json").read_text())["runs"]
    assert [r["variant"] for r in runs] == ["vanilla", "text", "text+align", "p2rec-text+add"]
    assert len({r["test"]["NDCG@10"] for r in runs}) == 4  # four different item tables
    assert "| ce | sasrec | p2rec-text+add |" in (titled / "results.md").read_text() and "students: 4 runs" in proc.stdout
    inputs = json.loads((titled / "results.json.meta.json").read_text())["inputs"]
    assert {"item_emb_text.pt", "item_emb_title.pt"} <= set(inputs)


def test_student_errors(pipeline, tmp_path):
    out = copy_artifacts(pipeline, tmp_path, "dataset.json", "teacher.pt", "sft_head.pt", "item_emb.pt")
    cases = [(["--variants", "enhanced"], "must include vanilla"),
             (["--variants", "vanilla,base-llm"], "python 04_embed.py --data synth --base"),
             (["--variants", "vanilla,llm"], "unknown --variants entry llm"),
             (["--variants", "vanilla,enhanced+sum"], "unknown --variants fusion entry sum"),
             (["--variants", "vanilla,text"], "python 04_embed.py --data synth --text")]
    for args, message in cases:
        proc = run_stage("05_student.py", "--data", "synth", "--out", out, "--device", "cpu", *args, check=False)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_sasrec_student_loads_for_the_baselines(pipeline):
    from common import load_sasrec
    model = load_sasrec(str(pipeline / "student.pt"), 40)
    assert isinstance(model, SASRec) and model(torch.tensor([[1, 2, 3]])).shape == (1, 3, 32)


def test_killed_students_resume_to_the_same_results(pipeline, tmp_path):
    """kill -9 once a group of runs has finished, then the same command: it trains only what is left and ends with
    the uninterrupted run's results."""
    results = {}
    for name in ("whole", "killed"):
        out = copy_artifacts(pipeline, tmp_path / name, "dataset.json", "teacher.pt", "sft_head.pt", "item_emb.pt")
        args = ["--data", "synth", "--out", out, *TINY, "--seeds", 1, 2, "--together", "no", "--loss", "ce,bce"]
        if name == "killed":
            kill_when_checkpointed("05_student.py", args, out / "synth" / "students.ckpt.pt")
            assert not (out / "synth" / "results.json").exists()
        proc = run_stage("05_student.py", *args)
        assert ("resuming from" in proc.stdout) == (name == "killed")
        assert not (out / "synth" / "students.ckpt.pt").exists()
        results[name] = json.loads((out / "synth" / "results.json").read_text())["runs"]
    assert len(results["whole"]) == 16 and {r["loss"] for r in results["whole"]} == {"ce", "bce"}
    for whole, resumed in zip(results["whole"], results["killed"]):
        assert (whole["loss"], whole["model"], whole["variant"], whole["seed"]) == (resumed["loss"], resumed["model"],
                                                                                   resumed["variant"], resumed["seed"])
        assert whole["test"] == resumed["test"] and whole["best_epoch"] == resumed["best_epoch"]
