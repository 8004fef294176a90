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
    added = student.GRU4Rec(10, dim=8, dropout=0.0, llm_item_emb=llm_emb, fuse="add")
    assert torch.allclose(added.item_table(), added.items.id_emb.weight + added.items.llm_proj(added.items.llm_emb))
    assert added(torch.tensor([[0, 1, 2]])).shape == (1, 3, 8)
    init = student.GRU4Rec(10, dim=8, dropout=0.0, llm_item_emb=llm_emb, fuse="init")
    start = init.item_table()[1:].detach()
    # the starting ID embeddings are a linear image of the (standardised) LLM embeddings: items whose LLM
    # embeddings are close start close; refitting them from the LLM embeddings leaves no residual
    standard = (llm_emb[1:] - llm_emb[1:].mean(0)) / llm_emb[1:].std(0)
    fit = torch.linalg.lstsq(standard, start).solution
    assert torch.allclose(standard @ fit, start, atol=1e-4)
    assert init.items.llm_proj is None and torch.allclose(start.std(), torch.tensor(8 ** -0.5), rtol=0.05)


def test_markdown_table_reports_mean_and_spread():
    runs = [{"model": "sasrec", "variant": v, "seed": s, "test": {m: x for m in student.METRICS}}
            for v, xs in (("vanilla", (0.1, 0.2)), ("enhanced", (0.2, 0.3))) for s, x in zip((1, 2), xs)]
    table = student.markdown_table(runs, "toy")
    assert "0.1500 ± 0.0707" in table and "+66.7%" in table
