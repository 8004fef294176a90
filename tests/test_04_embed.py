import json

import torch

from common import load_llm
from conftest import TEACHER_ARGS, copy_artifacts, run_stage, run_torchrun, write_synthetic


def test_item_embeddings(pipeline):
    item_emb = torch.load(pipeline / "item_emb.pt")
    assert item_emb.shape == (41, 32)  # 40 items + padding row, tiny LLM hidden size
    assert (item_emb[0] == 0).all() and torch.isfinite(item_emb).all()
    assert (item_emb[1:].std(0) > 0).all()  # items are told apart


def test_embed_is_deterministic(pipeline, tmp_path):
    before = torch.load(pipeline / "item_emb.pt")
    run_stage("04_embed.py", "--data", "synth", "--out", pipeline.parent, "--device", "cpu", "--max-tokens", 64)
    assert torch.allclose(torch.load(pipeline / "item_emb.pt"), before, atol=1e-5)


def test_embed_needs_sft(tmp_path):
    proc = run_stage("04_embed.py", "--data", "ml-100k", "--out", tmp_path, check=False)
    assert proc.returncode == 2 and "01_prepare.py" in proc.stderr


def test_embed_refuses_sft_from_an_older_teacher(pipeline, tmp_path):
    out = copy_artifacts(pipeline, tmp_path, "dataset.json", "teacher.pt", "sft_head.pt")
    run_stage("02_teacher.py", "--data", "synth", "--out", out, "--device", "cpu", "--seed", 7, *TEACHER_ARGS)
    proc = run_stage("04_embed.py", "--data", "synth", "--out", out, "--device", "cpu", check=False)
    assert proc.returncode == 2 and "the teacher was retrained after SFT" in proc.stderr, proc.stderr
    assert not (out / "synth" / "item_emb.pt").exists()


def test_embed_refuses_sft_from_older_data_and_names_the_commands_for_this_dataset(pipeline, tmp_path):
    out = copy_artifacts(pipeline, tmp_path, "teacher.pt", "sft_head.pt")
    run_stage("01_prepare.py", "--data-file", write_synthetic(tmp_path / "synth.txt", seed=1), "--out", out)
    proc = run_stage("04_embed.py", "--data", "synth", "--out", out, "--device", "cpu", check=False)
    assert proc.returncode == 2 and "the data changed since SFT" in proc.stderr, proc.stderr
    assert "python 02_teacher.py --data synth and python 03_sft.py --data synth" in proc.stderr, proc.stderr
    assert not (out / "synth" / "item_emb.pt").exists()


def test_two_processes_embed_like_one(pipeline, tmp_path):
    out = copy_artifacts(pipeline, tmp_path, "dataset.json", "teacher.pt", "sft_head.pt", "sft_adapter")
    run_torchrun("04_embed.py", "--data", "synth", "--out", out, "--device", "cpu", "--max-tokens", 64)
    assert torch.allclose(torch.load(out / "synth" / "item_emb.pt"), torch.load(pipeline / "item_emb.pt"), atol=1e-5)


def test_titles_embed_through_the_sft_by_titles_beside_the_id_only_files(titled):
    assert (titled / "sft_head_title.pt").exists() and (titled / "sft_adapter_title").is_dir()
    assert not (titled / "sft_head.pt").exists() and not (titled / "item_emb.pt").exists()
    item_emb = torch.load(titled / "item_emb_title.pt")
    assert item_emb.shape == (41, 32) and (item_emb[0] == 0).all() and (item_emb[1:].std(0) > 0).all()


def test_text_is_the_base_llm_averaged_over_each_items_text(titled, tiny_llm):
    """Packed batches and mean pooling give what the base LLM gives for each item's text alone."""
    item_emb = torch.load(titled / "item_emb_text.pt")
    assert item_emb.shape == (41, 32) and (item_emb[0] == 0).all()
    base, tokenizer = load_llm(tiny_llm, torch.device("cpu"))
    for item in (1, 40):
        ids = tokenizer(f"Film {item}. Genres: genre{(item - 1) // 10}.", add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            alone = base(input_ids=ids).last_hidden_state[0].mean(0)
        assert torch.allclose(item_emb[item], alone, atol=1e-4)
    meta = json.loads((titled / "item_emb_text.pt.meta.json").read_text())
    assert "llm" in meta and "sft_fingerprint" not in meta  # text needs no SFT
