import importlib
import json

import torch

student = importlib.import_module("05_student")


def test_results_pair_vanilla_and_enhanced(pipeline):
    runs = json.loads((pipeline / "results.json").read_text())["runs"]
    assert {(r["model"], r["variant"]) for r in runs} == {(m, v) for m in ("sasrec", "gru4rec") for v in ("vanilla", "enhanced")}
    for r in runs:
        assert set(r["test"]) >= {f"{m}@{k}" for m in ("HR", "NDCG") for k in (5, 10, 20)}
    table = (pipeline / "results.md").read_text()
    assert "| sasrec | enhanced |" in table and "| gru4rec | lift |" in table
    assert (pipeline / "student.pt").exists()


def test_enhanced_model_uses_llm_embeddings():
    llm_emb = torch.randn(11, 24)
    llm_emb[0] = 0
    torch.manual_seed(0)
    model = student.GRU4Rec(10, dim=8, dropout=0.0, llm_item_emb=llm_emb)
    table = model.item_table()
    assert table.shape == (11, 8)
    assert torch.allclose(table, model.items.id_emb.weight + model.items.llm_proj(model.items.llm_emb))
    assert model(torch.tensor([[0, 1, 2]])).shape == (1, 3, 8)


def test_markdown_table_reports_mean_and_spread():
    runs = [{"model": "sasrec", "variant": v, "seed": s, "test": {m: x for m in student.METRICS}}
            for v, xs in (("vanilla", (0.1, 0.2)), ("enhanced", (0.2, 0.3))) for s, x in zip((1, 2), xs)]
    table = student.markdown_table(runs, "toy")
    assert "0.1500 ± 0.0707" in table and "+66.7%" in table
