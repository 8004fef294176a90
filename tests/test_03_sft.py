import importlib
import json

import pytest
import torch

from conftest import NUM_GROUPS, NUM_USERS, make_tiny_llm, run_stage

sft = importlib.import_module("03_sft")


def test_kmeans_recovers_separated_clusters():
    torch.manual_seed(0)
    centers = torch.tensor([[5.0, 0], [-5.0, 0], [0, 5.0]])
    x = torch.cat([c + 0.3 * torch.randn(30, 2) for c in centers])
    assign = sft.kmeans(x, 3, 50, seed=0)
    for block in assign.view(3, 30):
        assert (block == block[0]).all()
    assert len(set(assign.tolist())) == 3


def test_prior_preference_counts_training_items_only():
    item_categories = torch.tensor([-1, 0, 0, 1, 2])
    prior = sft.prior_preferences([[1, 2, 3, 4, 4], [3, 3, 1, 2]], item_categories, 3)
    # user 0 trains on [1, 2, 3] (4 and 4 are validation/test); user 1 on [3, 3]
    assert torch.allclose(prior, torch.tensor([[2 / 3, 1 / 3, 0], [0, 1, 0]]))


def test_category_check_counts_agreement():
    groups = [[], ["a"], ["a"], ["b"], ["b"]]
    perfect = sft.category_check(groups, torch.tensor([-1, 0, 0, 1, 1]), pairs=2000)
    assert perfect["P(same latent | same group)"] == 1.0 and perfect["P(same latent | different group)"] == 0.0


def test_user_level_sft_artifacts(pipeline):
    from peft import PeftModel  # noqa: F401  (the adapter must load with plain PEFT)
    metrics = json.loads((pipeline / "sft_metrics.json").read_text())
    history = metrics["history"]
    assert history[-1]["val_kl"] < history[0]["val_kl"]  # the LLM learned to reconstruct the priors
    assert all(h["samples"] == NUM_USERS - max(1, int(NUM_USERS * 0.05)) for h in history[1:])  # one sample per user
    assert metrics["category_check"]["lift over chance"] > 1.5  # the k-means categories follow the true groups
    categories = torch.load(pipeline / "categories.pt")
    assert categories["prior"].shape == (NUM_USERS, NUM_GROUPS)
    assert torch.allclose(categories["prior"].sum(1), torch.ones(NUM_USERS))
    assert (pipeline / "sft_adapter" / "adapter_config.json").exists()


@pytest.mark.parametrize("arch", ["qwen2"])
def test_item_tokens_and_other_architectures(pipeline, tmp_path, arch):
    """Items as new tokens initialised from the teacher (the pipeline fixture covers text IDs), on a Qwen2-style model."""
    llm = make_tiny_llm(tmp_path / arch, arch=arch)
    out = tmp_path / "out"
    (out / "synth").mkdir(parents=True)
    for name in ("dataset.json", "dataset.json.meta.json", "teacher.pt", "teacher.pt.meta.json"):
        (out / "synth" / name).write_bytes((pipeline / name).read_bytes())
    run_stage("03_sft.py", "--data", "synth", "--out", out, "--llm", llm, "--k", 4, "--epochs", 1,
              "--item-repr", "token", "--max-tokens", 2048, "--device", "cpu")
    run_stage("04_embed.py", "--data", "synth", "--out", out, "--device", "cpu")
    assert torch.load(out / "synth" / "item_emb.pt").shape == (41, 32)


def test_sft_errors(pipeline, tmp_path):
    out = pipeline.parent
    cases = [(["--llm", tmp_path], "is not a model"),
             (["--k", 1000], "larger than the number of items"),
             (["--epochs", -1], "must be positive")]
    for args, message in cases:
        proc = run_stage("03_sft.py", "--data", "synth", "--out", out, *args, check=False)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    proc = run_stage("03_sft.py", "--data", "synth", "--out", tmp_path, check=False)
    assert proc.returncode == 2 and "01_prepare.py" in proc.stderr
