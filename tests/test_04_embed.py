import torch

from conftest import TEACHER_ARGS, copy_artifacts, run_stage, run_torchrun


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


def test_two_processes_embed_like_one(pipeline, tmp_path):
    out = copy_artifacts(pipeline, tmp_path, "dataset.json", "teacher.pt", "sft_head.pt", "sft_adapter")
    run_torchrun("04_embed.py", "--data", "synth", "--out", out, "--device", "cpu", "--max-tokens", 64)
    assert torch.allclose(torch.load(out / "synth" / "item_emb.pt"), torch.load(pipeline / "item_emb.pt"), atol=1e-5)
