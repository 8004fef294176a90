import argparse
import importlib
import json
import math

import pytest
import torch

from common import Prompt, UserError, pack_prompts
from conftest import (NUM_GROUPS, NUM_USERS, SFT_ARGS, TEACHER_ARGS, copy_artifacts, kill_when_checkpointed,
                      make_tiny_llm, run_stage, run_torchrun)

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


def test_reference_kls_on_a_hand_made_case():
    prior = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.5, 0.5]])
    refs = sft.reference_kls(prior, train_users=[0, 1, 2], val_users=[3])
    # validation user (0.5, 0.5): uniform is exact; the training mean is (2/3, 1/3)
    assert refs["uniform_kl"] == pytest.approx(0.0, abs=1e-6)
    assert refs["mean_prior_kl"] == pytest.approx(0.5 * math.log(0.5 / (2 / 3)) + 0.5 * math.log(0.5 / (1 / 3)))
    assert sft.gap_closed(refs["mean_prior_kl"] / 4, refs)["gap_closed"] == pytest.approx(0.75)


TINY_CONFIG = argparse.Namespace(hidden_size=32, intermediate_size=64, num_hidden_layers=2)
SMOLLM2_CONFIG = argparse.Namespace(hidden_size=576, intermediate_size=1536, num_hidden_layers=30)


def test_batch_defaults_grow_on_a_gpu_but_keep_32_steps_per_epoch():
    def defaults(device, train_tokens, world=1, longest=200):
        args = argparse.Namespace(max_tokens=None, lr=None)
        lengths = [longest] + [100] * ((train_tokens - longest) // 100)
        sft.batch_defaults(args, torch.device(device), [Prompt(list(range(n)), [], []) for n in lengths], TINY_CONFIG, world)
        return args.max_tokens, args.lr

    assert defaults("cuda", 1_200_000) == (32768, pytest.approx(2e-3))  # Beauty: the budget alone binds
    assert defaults("cuda", 200_000) == (6250, pytest.approx(1e-3 * math.sqrt(6250 / 8192)))  # ml-100k: 32 steps
    assert defaults("cuda", 1_200_000, world=2) == (18750, pytest.approx(1e-3 * math.sqrt(37500 / 8192)))
    assert defaults("cuda", 3_000, longest=300)[0] == 300  # a tiny dataset: never below its longest prompt
    assert defaults("cpu", 1_200_000) == (4096, pytest.approx(1e-3 * math.sqrt(0.5)))
    args = argparse.Namespace(max_tokens=8192, lr=5e-4)
    sft.batch_defaults(args, torch.device("cuda"), [Prompt(list(range(100)), [], [])] * 2000, TINY_CONFIG)
    assert (args.max_tokens, args.lr) == (8192, 5e-4)  # what the user gave is kept


def test_cpu_batches_shrink_to_the_ram_at_hand_or_are_refused(monkeypatch, capsys):
    """With 1 GiB of RAM free, SmolLM2-135M's step (about 3.9 MB a token) fits 221 tokens: the default budget
    halves to 128 and says so; a budget the user gave, or a prompt longer than what fits, is refused at once."""
    monkeypatch.setattr(sft, "available_memory", lambda device: 2 ** 30)
    def batch(max_tokens, longest=100):
        args = argparse.Namespace(max_tokens=max_tokens, lr=None)
        sft.batch_defaults(args, torch.device("cpu"), [Prompt(list(range(longest)), [], [])] * 50, SMOLLM2_CONFIG)
        return args.max_tokens
    assert batch(None) == 128 and "--max-tokens 128: a step of 4096 tokens needs about 14.8 GiB" in capsys.readouterr().out
    with pytest.raises(UserError, match="needs about 14.8 GiB and 1.0 GiB of RAM is available: pass --max-tokens 221 or less"):
        batch(4096)
    with pytest.raises(UserError, match="lower --max-items \\(the longest prompt has 300 tokens\\)"):
        batch(None, longest=300)


def test_prefix_distributions_count_the_items_so_far():
    assert torch.allclose(sft.prefix_distributions([1, 1, 0, 2], 3),
                          torch.tensor([[0, 1, 0], [0, 1, 0], [1 / 3, 2 / 3, 0], [1 / 4, 2 / 4, 1 / 4]]))


def test_prefix_kl_is_a_mean_per_user_so_every_user_counts_once():
    class Uniform(torch.nn.Module):  # predicts (1/2, 1/2) at every token asked for
        def forward(self, packed, positions=None):
            half = math.log(0.5)
            last = torch.full((len(packed.bounds) - 1, 2), half)
            return last if positions is None else (last, torch.full((len(positions), 2), half))
    # user 0 has items of categories 0, 1 (prior (1/2, 1/2)); user 1 one item of category 1 (prior (0, 1))
    prompts = [Prompt([5, 6, 7, 8], [0] * 4, [1, 2]), Prompt([5, 6, 8], [0] * 3, [1])]
    samples = sft.Samples(prompts, torch.tensor([[0.5, 0.5], [0.0, 1.0]]),
                          [sft.prefix_distributions([0, 1], 2), sft.prefix_distributions([1], 2)])
    cpu = torch.device("cpu")

    def loss(shard, weight):
        return sft.batch_loss(Uniform(), samples, shard, pack_prompts([prompts[i] for i in shard], cpu), cpu, weight).item()
    # user KLs 0 and log 2; prefix KLs: user 0 (log 2 + 0) / 2, user 1 log 2
    assert loss([0, 1], 0.0) == pytest.approx(math.log(2))
    assert loss([0, 1], 1.0) == pytest.approx(2.5 * math.log(2))
    assert loss([0], 2.0) + loss([1], 2.0) == pytest.approx(loss([0, 1], 2.0))


def test_category_check_counts_agreement():
    groups = [[], ["a"], ["a"], ["b"], ["b"]]
    perfect = sft.category_check(groups, torch.tensor([-1, 0, 0, 1, 1]), pairs=2000)
    assert perfect["P(same latent | same group)"] == 1.0 and perfect["P(same latent | different group)"] == 0.0


def test_user_level_sft_artifacts(pipeline, tiny_llm):
    metrics = json.loads((pipeline / "sft_metrics.json").read_text())
    history, best = metrics["history"], metrics["history"][metrics["best_epoch"]]
    assert best["val_kl"] < history[0]["val_kl"]  # the LLM learned to reconstruct the priors
    assert best["val_kl"] == min(h["val_kl"] for h in history)  # the saved epoch is the best one
    refs = metrics["references"]
    assert refs["uniform_kl"] > 0 and refs["mean_prior_kl"] > 0
    assert best["gap_closed"] == pytest.approx(1 - best["val_kl"] / refs["mean_prior_kl"])
    assert all(h["samples"] == NUM_USERS - max(1, int(NUM_USERS * 0.05)) for h in history[1:])  # one sample per user
    assert metrics["category_check"]["lift over chance"] > 1.5  # the k-means categories follow the true groups
    categories = torch.load(pipeline / "categories.pt")
    assert categories["prior"].shape == (NUM_USERS, NUM_GROUPS)
    assert torch.allclose(categories["prior"].sum(1), torch.ones(NUM_USERS))
    from peft import PeftModel  # the adapter loads with plain PEFT, no code of ours
    from transformers import AutoModel
    tuned = PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_llm), str(pipeline / "sft_adapter"))
    assert any("lora_" in name for name, _ in tuned.named_parameters())


@pytest.mark.parametrize("item_repr", ["text", "teacher-token"])
def test_other_item_reprs_and_architectures(pipeline, tmp_path, item_repr):
    """Items as text IDs and as new tokens initialised from the teacher (the pipeline fixture covers the default,
    item tokens learned from scratch), on a Qwen2-style model."""
    llm = make_tiny_llm(tmp_path / "qwen2", arch="qwen2")
    out = copy_artifacts(pipeline, tmp_path / "out", "dataset.json", "teacher.pt")
    run_stage("03_sft.py", "--data", "synth", "--out", out, "--llm", llm, "--k", 4, "--epochs", 1,
              "--item-repr", item_repr, "--max-tokens", 2048, "--device", "cpu")
    run_stage("04_embed.py", "--data", "synth", "--out", out, "--device", "cpu")
    assert torch.load(out / "synth" / "item_emb.pt").shape == (41, 32)


def test_instance_level_samples_are_every_train_prefix():
    builder = lambda items: list(items)  # noqa: E731  (prompt = the item IDs themselves)
    prompts, targets, _ = sft.instance_level_samples([[1, 2, 3, 4, 5], [7, 8, 9, 6]], [0, 1], builder, max_items=1)
    # user 0 trains on [1, 2, 3]: (1 -> 2), (2 -> 3) with one item of context; user 1 on [7, 8]: (7 -> 8)
    assert prompts == [[1], [2], [7]] and targets.tolist() == [2, 3, 8]
    prompts, targets, _ = sft.instance_level_samples([[1, 2, 3, 4, 5]], [0], builder, max_items=50, last_only=True)
    assert prompts == [[1, 2]] and targets.tolist() == [3]


def test_instance_level_sft(pipeline, tmp_path, tiny_llm):
    """The E4SRec-style baseline: one sample per train position, next-item loss falls, 04_embed reads it."""
    out = copy_artifacts(pipeline, tmp_path, "dataset.json", "teacher.pt")
    run_stage("03_sft.py", "--data", "synth", "--out", out, "--llm", tiny_llm, "--level", "instance", "--k", 4,
              "--epochs", 2, "--lr", 3e-3, "--max-tokens", 512, "--device", "cpu")
    history = json.loads((out / "synth" / "sft_metrics.json").read_text())["history"]
    sequences = json.loads((pipeline / "dataset.json").read_text())["sequences"]
    val_users = max(1, int(NUM_USERS * 0.05))
    assert sum(len(s) - 3 for s in sequences) - history[1]["samples"] in range(3 * val_users, 12 * val_users + 1)
    assert history[-1]["val_ce"] < history[0]["val_ce"]
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


def test_killed_sft_refuses_a_retrained_teacher_then_resumes(pipeline, tmp_path, tiny_llm):
    out = copy_artifacts(pipeline, tmp_path, "dataset.json", "teacher.pt")
    args = ["--data", "synth", "--out", out, "--llm", tiny_llm, "--device", "cpu", *SFT_ARGS]
    kill_when_checkpointed("03_sft.py", args, out / "synth" / "sft.ckpt.pt")
    assert not (out / "synth" / "sft_metrics.json").exists()
    # The teacher is retrained (another seed) while SFT is interrupted: its checkpoint targets are stale now.
    run_stage("02_teacher.py", "--data", "synth", "--out", out, "--device", "cpu", "--seed", 7, *TEACHER_ARGS)
    proc = run_stage("03_sft.py", *args, check=False)
    assert proc.returncode == 2 and "checkpoint of a run with other arguments or inputs" in proc.stderr, proc.stderr
    # The original teacher back: the same command resumes and ends where the uninterrupted pipeline did.
    copy_artifacts(pipeline, out, "teacher.pt")
    assert "resuming from" in run_stage("03_sft.py", *args).stdout
    resumed = json.loads((out / "synth" / "sft_metrics.json").read_text())["history"]
    first = json.loads((pipeline / "sft_metrics.json").read_text())["history"]
    assert [h["val_kl"] for h in resumed] == [h["val_kl"] for h in first]


def test_two_processes_train_like_one(pipeline, tmp_path, tiny_llm):
    """torchrun with 2 gloo processes and half the per-process budget makes the very steps of one process."""
    out = copy_artifacts(pipeline, tmp_path, "dataset.json", "teacher.pt")
    args = [a if a != 512 else 256 for a in SFT_ARGS]  # --max-tokens is per process
    proc = run_torchrun("03_sft.py", "--data", "synth", "--out", out, "--device", "cpu", "--llm", tiny_llm, *args)
    assert proc.stdout.count("user-level SFT:") == 1  # only rank 0 speaks
    sharded = json.loads((out / "synth" / "sft_metrics.json").read_text())["history"]
    single = json.loads((pipeline / "sft_metrics.json").read_text())["history"]
    assert [sorted(h) for h in sharded] == [sorted(h) for h in single]  # same epochs, same keys
    for got, want in zip(sharded, single):
        for key in ("train_loss", "val_kl"):
            if want.get(key) is None:  # epoch 0 holds no train loss
                assert got.get(key) is None
            else:
                assert got[key] == pytest.approx(want[key], rel=1e-3), (key, got, want)
    assert sharded[1]["val_kl"] != sharded[-1]["val_kl"]  # it trained


def test_activation_checkpointing_trains_alike(pipeline, tmp_path, tiny_llm):
    """--checkpointing recomputes each block in the backward pass: less memory, the same training."""
    out = copy_artifacts(pipeline, tmp_path, "dataset.json", "teacher.pt")
    run_stage("03_sft.py", "--data", "synth", "--out", out, "--device", "cpu", "--llm", tiny_llm, *SFT_ARGS, "--checkpointing")
    recomputed = json.loads((out / "synth" / "sft_metrics.json").read_text())["history"]
    single = json.loads((pipeline / "sft_metrics.json").read_text())["history"]
    assert [h["val_kl"] for h in recomputed] == pytest.approx([h["val_kl"] for h in single], rel=1e-4)
