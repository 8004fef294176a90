import importlib
import json

import pytest
import torch

from common import ItemEmbedding, SASRec, llm_features
from conftest import copy_artifacts, run_stage

student = importlib.import_module("05_student")
TINY = ["--epochs", 4, "--batch-size", 16, "--lr", 5e-3, "--dim", 16, "--maxlen", 20, "--device", "cpu"]


def test_results_pair_vanilla_and_enhanced(pipeline):
    runs = json.loads((pipeline / "results.json").read_text())["runs"]
    assert {(r["model"], r["variant"]) for r in runs} == {(m, v) for m in ("sasrec", "gru4rec") for v in ("vanilla", "enhanced")}
    for r in runs:
        assert set(r["test"]) >= {f"{m}@{k}" for m in ("HR", "NDCG") for k in (5, 10, 20)}
        assert set(r["subgroups"]) == set(student.SUBGROUPS)
        assert r["subgroups"]["tail items"]["users"] + r["subgroups"]["head items"]["users"] == 80
    table = (pipeline / "results.md").read_text()
    assert "| sasrec | enhanced |" in table and "| gru4rec | lift of enhanced |" in table and "tail items" in table
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


def test_markdown_table_reports_mean_spread_lift_and_subgroups():
    groups = {g: {"NDCG@10": 0.1, "HR@10": 0.2} for g in student.SUBGROUPS}
    runs = [{"model": "sasrec", "variant": v, "seed": s, "test": {m: x for m in student.METRICS}, "subgroups": groups}
            for v, xs in (("vanilla", (0.1, 0.2)), ("enhanced", (0.2, 0.3))) for s, x in zip((1, 2), xs)]
    table = student.markdown_table(runs, "toy", "init")
    assert "0.1500 ± 0.0707" in table and "| sasrec | lift of enhanced | | +66.7%" in table
    assert "| sasrec | enhanced | 0.1000 / 0.2000 |" in table


def test_markdown_table_shows_an_empty_subgroup_as_a_dash():
    groups = {g: {"NDCG@10": 0.1, "HR@10": 0.2} for g in student.SUBGROUPS if g != "short users"}  # ml-100k
    runs = [{"model": "gru4rec", "variant": v, "seed": s, "test": {m: 0.1 for m in student.METRICS}, "subgroups": groups}
            for v in ("vanilla", "enhanced") for s in (1, 2)]
    assert "| gru4rec | vanilla | 0.1000 / 0.2000 | 0.1000 / 0.2000 | - | 0.1000 / 0.2000 |" in student.markdown_table(runs, "toy", "init")


@pytest.mark.parametrize("fuse", ["init", "align"])
def test_runs_trained_together_match_runs_trained_alone(pipeline, tmp_path, fuse):
    """The same runs, stacked into one vmap-ed group or trained one at a time, end with the same metrics (dropout
    off: stacked runs draw their dropout masks together, so only its random numbers differ)."""
    results = {}
    for together in ("yes", "no"):
        out = copy_artifacts(pipeline, tmp_path / together, "dataset.json", "teacher.pt", "sft_head.pt", "item_emb.pt")
        run_stage("05_student.py", "--data", "synth", "--out", out, *TINY, "--dropout", 0, "--seeds", 1, 2,
                  "--fuse", fuse, "--together", together)
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


def test_student_errors(pipeline, tmp_path):
    out = copy_artifacts(pipeline, tmp_path, "dataset.json", "teacher.pt", "sft_head.pt", "item_emb.pt")
    cases = [(["--variants", "enhanced"], "must include vanilla"),
             (["--variants", "vanilla,base-llm"], "python 04_embed.py --data synth --base"),
             (["--variants", "vanilla,llm"], "unknown --variants entry llm")]
    for args, message in cases:
        proc = run_stage("05_student.py", "--data", "synth", "--out", out, "--device", "cpu", *args, check=False)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_sasrec_student_loads_for_the_baselines(pipeline):
    from common import load_sasrec
    model = load_sasrec(str(pipeline / "student.pt"), 40)
    assert isinstance(model, SASRec) and model(torch.tensor([[1, 2, 3]])).shape == (1, 3, 32)
