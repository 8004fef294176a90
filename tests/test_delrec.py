import json
import math
import random
import sys

import pytest
import torch

from conftest import (ROOT, baseline_whole_and_resumed, batch_on_a_gpu_that_fits, copy_artifacts,
                      run_stage)

sys.path.insert(0, ROOT + "/baselines")
import delrec  # noqa: E402
from common import ItemEmbedding, ItemTokens, SASRec, candidate_set, item_tokens, ranking_cases  # noqa: E402

ARGS = ["--train-users", 40, "--virtual-tokens", 4, "--batch-size", 8, "--lr", 1e-2]


def test_candidate_sets_hold_the_target_and_no_seen_item_or_duplicate():
    rng = random.Random(0)
    seen = set(range(1, 30))
    for target in (30, 31, 40):
        cands = candidate_set(seen | {target}, target, num_items=50, size=20, rng=rng)
        assert len(cands) == 20 == len(set(cands)) and target in cands
        assert not (set(cands) - {target}) & seen


@pytest.fixture(scope="module")
def tiny(tiny_llm):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    llm = AutoModelForCausalLM.from_pretrained(tiny_llm).requires_grad_(False)
    prompts = delrec.Prompts(AutoTokenizer.from_pretrained(tiny_llm), None, max_history=5)
    return llm, prompts


def test_stage1_trains_the_soft_prompt_and_leaves_the_llm_frozen(tiny):
    llm, prompts = tiny
    torch.manual_seed(0)
    model = delrec.SoftPromptLM(llm, 4)
    before = {k: v.clone() for k, v in llm.state_dict().items()}
    soft = model.soft.detach().clone()
    samples = [(prompts.ids(prompts.temporal([1, 2, 3], 5)), prompts.name_ids(4)),
               (prompts.ids(prompts.ranking([1, 2], list(range(10, 30)))), prompts.name_ids(12))]
    first = model.target_nll(samples, torch.device("cpu")).item()
    opt = torch.optim.AdamW([model.soft], lr=1e-2)
    delrec.train_epoch(model, opt, [[samples[:1], samples[1:]]] * 20, torch.device("cpu"), "t")
    assert model.target_nll(samples, torch.device("cpu")).item() < first
    assert not torch.equal(model.soft, soft)
    assert all(torch.equal(before[k], v) for k, v in llm.state_dict().items())


def test_stage2_adalora_trains(tiny_llm, tiny):
    from transformers import AutoModelForCausalLM
    _, prompts = tiny
    torch.manual_seed(0)
    model = delrec.SoftPromptLM(AutoModelForCausalLM.from_pretrained(tiny_llm).requires_grad_(False), 4)
    model.soft.requires_grad_(False)
    params, _ = delrec.add_adalora(model, total_step=10)
    before = [p.detach().clone() for p in params]
    samples = [(prompts.ids(prompts.ranking([1, 2], list(range(10, 30)))), prompts.name_ids(12))]
    first = model.target_nll(samples, torch.device("cpu")).item()
    delrec.train_epoch(model, torch.optim.AdamW(params, lr=1e-2), [[samples]] * 10, torch.device("cpu"), "t",
                       step_hook=lambda step: model.llm.base_model.update_and_allocate(step))
    assert model.target_nll(samples, torch.device("cpu")).item() < first
    assert any(not torch.equal(a, b) for a, b in zip(before, params))
    assert not model.soft.requires_grad


def test_an_epoch_reports_the_mean_of_its_step_losses(tiny):
    llm, prompts = tiny
    torch.manual_seed(0)
    model, cpu = delrec.SoftPromptLM(llm, 4), torch.device("cpu")
    first = [(prompts.ids(prompts.temporal([1, 2, 3], 5)), prompts.name_ids(4))]
    second = [(prompts.ids(prompts.ranking([1, 2], list(range(10, 30)))), prompts.name_ids(12))]
    step_losses = [model.target_nll(batch, cpu).item() for batch in (first, second)]
    frozen = torch.optim.AdamW([model.soft], lr=0.0)  # the steps change nothing: each loss is the one above
    loss = delrec.train_epoch(model, frozen, [[first], [second]], cpu, "t")
    assert step_losses[0] != pytest.approx(step_losses[1])
    assert loss == pytest.approx(sum(step_losses) / 2)


def test_each_epoch_steps_through_every_sample_once_in_a_fresh_order_that_a_resumed_run_replays():
    temporal, simulated = list(range(100)), list(range(100, 200))
    first = delrec.epoch_batches([temporal, simulated], 16, seed=42, epoch=0)
    assert len(first) == 7 and all(len(step) == 2 for step in first)  # step i: batch i of each task
    assert sorted(x for step in first for x in step[0]) == temporal
    assert sorted(x for step in first for x in step[1]) == simulated
    assert first[0][0] != temporal[:16]  # not the users' order, in which a step holds a few users' prefixes
    assert delrec.epoch_batches([temporal, simulated], 16, seed=42, epoch=0) == first
    assert delrec.epoch_batches([temporal, simulated], 16, seed=42, epoch=1) != first


def test_stage2_penalty_is_the_one_adalora_adds_to_a_loss_its_forward_computes(tiny_llm):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    model = delrec.SoftPromptLM(AutoModelForCausalLM.from_pretrained(tiny_llm).requires_grad_(False), 0)
    delrec.add_adalora(model, total_step=10)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with_penalty = model.llm.base_model(input_ids=ids, labels=ids).loss  # AdaLoraModel.forward adds it
    plain = model.llm.get_base_model()(input_ids=ids, labels=ids).loss  # the adapted LLM alone
    penalty = delrec.adalora_orthogonality(model.llm)
    assert penalty > 0 and torch.allclose(with_penalty - plain, penalty)


def test_scores_cover_every_candidate_and_match_a_full_forward(tiny):
    llm, prompts = tiny
    model = delrec.SoftPromptLM(llm, 3).eval()
    prompt, names = prompts.ids(prompts.ranking([1, 2, 3], [7, 8, 9])), [prompts.name_ids(c) for c in (7, 8, 9, 123)]
    scores = model.score(prompt, names, torch.device("cpu"))
    assert scores.shape == (4,) and torch.isfinite(scores).all()
    # the cached pass equals a plain forward over prompt + name: the log-likelihood of the whole name, the sum of
    # its tokens' (the forward's mean times the name's length)
    with torch.no_grad():
        for score, name in zip(scores, names):
            nll = model.target_nll([(prompt, name)], torch.device("cpu")).item() * len(name)
            assert -score.item() == pytest.approx(nll, rel=1e-4)
    # the GPU route: every (prompt, name) pair in padded batches, prompts of different lengths mixed
    other = prompts.ids(prompts.ranking([4, 5], [7, 8]))
    pairs = [(prompt, name) for name in names] + [(other, name) for name in names[:2]]
    batched = model.batched_scores(pairs, torch.device("cpu"), batch_size=4)
    expected = torch.cat([scores, model.score(other, names[:2], torch.device("cpu"))])
    assert torch.allclose(batched, expected, atol=1e-4)


def test_case_by_case_and_batched_scoring_agree(tiny):
    llm, prompts = tiny
    model = delrec.SoftPromptLM(llm, 3).eval()
    cases = ranking_cases([list(range(1, 12)), [5, 9, 2, 7, 3]], [0, 1], 40, 11, random.Random(0), "test")
    cached, batched = (delrec.model_scores(model, prompts, cases, torch.device("cpu"), size) for size in (0, 7))
    assert len(cached) == len(batched) == 2
    for one, other in zip(cached, batched):
        assert one.shape == (11,) and torch.allclose(one, other, atol=1e-4)


def test_end_to_end_with_adalora(pipeline, tmp_path, tiny_llm):
    out = copy_artifacts(pipeline, tmp_path, "dataset.json", "teacher.pt", "student.pt")
    run_stage("baselines/delrec.py", "--data", "synth", "--out", out, "--device", "cpu", "--llm", tiny_llm, *ARGS,
              "--seeds", 1, 2)
    result = json.loads((out / "synth" / "delrec_metrics.json").read_text())
    metrics = result["metrics"]
    assert set(metrics) == {"random (expected)", "popularity", "SASRec teacher", "P2Rec student", "DELRec"}
    assert metrics["random (expected)"]["HR@10"] == pytest.approx(10 / 20)
    for m in metrics.values():
        assert 0 <= m["HR@1"] <= m["HR@5"] <= m["HR@10"] <= 1
    per_seed = [result["per_seed"][seed]["metrics"]["popularity"]["HR@10"] for seed in ("1", "2")]
    assert metrics["popularity"]["HR@10"] == pytest.approx(sum(per_seed) / 2)  # each seed draws its own candidates
    assert result["std"]["random (expected)"]["HR@10"] == 0 and result["per_seed"]["1"]["best_epoch"] == 1
    soft_prompt = torch.load(out / "synth" / "delrec_soft_prompt.pt")
    assert soft_prompt["soft"].shape[0] == 4
    assert soft_prompt["item_emb"].shape == (41, 32)  # no titles: one token per item (40) and padding, by default
    run_stage("baselines/delrec.py", "--data", "synth", "--out", out, "--device", "cpu", "--llm", tiny_llm, *ARGS,
              "--no-stage1")
    ablation = json.loads((out / "synth" / "delrec_no_stage1_metrics.json").read_text())["metrics"]
    assert "DELRec, no stage 1" in ablation


def test_a_batch_too_large_for_the_gpu_halves_until_its_step_fits(pipeline, tmp_path, tiny_llm, monkeypatch, capsys):
    """Stage 1's trial steps (both tasks, the longest samples) and stage 2's (AdaLoRA) run; 8 does not fit, 4 does."""
    printed, used = batch_on_a_gpu_that_fits(delrec, pipeline, tmp_path, ["--llm", tiny_llm, *ARGS],
                                             "delrec_metrics.json", 4, monkeypatch, capsys)
    assert "--batch-size 8 does not fit in the GPU's free memory: 4 samples a step" in printed and used == 4


def test_killed_run_resumes_to_the_same_metrics(pipeline, tmp_path, tiny_llm):
    """kill -9 once the first epoch is checkpointed (stage 1 of 2 epochs), then the same command: it resumes after
    that epoch, through stage 2's AdaLoRA, and ends with the uninterrupted run's metrics."""
    args = ["--device", "cpu", "--llm", tiny_llm, *ARGS, "--stage1-epochs", 2, "--stage2-epochs", 2]
    whole, resumed = baseline_whole_and_resumed(pipeline, tmp_path, "baselines/delrec.py", args, "delrec")
    assert resumed == whole


@pytest.fixture(scope="module")
def tokens(tiny_llm):
    """The tiny LLM, and prompts naming 30 items by one new token each; also the tokenizer's size before them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_llm)
    vocab = len(tokenizer)
    llm = AutoModelForCausalLM.from_pretrained(tiny_llm).requires_grad_(False)
    torch.manual_seed(0)
    items = ItemTokens(tokenizer, 30, llm.get_input_embeddings().weight)
    return llm, delrec.Prompts(tokenizer, None, max_history=5, names="token"), items, vocab


def test_item_tokens_are_rows_of_their_own_in_and_out(tokens):
    llm, prompts, items, vocab = tokens
    assert items.first == vocab and prompts.name_ids(7)[-1] == vocab + 6
    model = delrec.SoftPromptLM(llm, 3, items)
    embeds = model.token_embeds(torch.tensor([[5, vocab + 6]]))
    assert torch.equal(embeds[0, 0], llm.get_input_embeddings().weight[5])
    assert torch.equal(embeds[0, 1], items.emb.weight[7])
    hidden = torch.randn(2, llm.config.hidden_size)
    logits = model.logits(llm.get_output_embeddings(), hidden)
    assert logits.shape == (2, vocab + 30)
    assert torch.allclose(logits[:, vocab + 6], hidden @ items.emb.weight[7])
    assert torch.allclose(logits[:, :vocab], llm.get_output_embeddings()(hidden))


@pytest.mark.parametrize("teacher_dim", [16, 64])  # narrower and wider than the tiny LLM (32)
def test_teacher_tokens_start_from_the_teachers_item_table(tiny_llm, teacher_dim):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    llm = AutoModelForCausalLM.from_pretrained(tiny_llm)
    torch.manual_seed(0)
    teacher = SASRec(ItemEmbedding(30, teacher_dim))
    items = item_tokens("teacher-token", AutoTokenizer.from_pretrained(tiny_llm), 30, llm, teacher)
    rows, table = items.emb.weight[1:].detach(), teacher.item_table()[1:].detach()
    table = (table - table.mean(0)) / table.std(0)
    token_std = llm.get_input_embeddings().weight.std().item()
    assert rows.shape == (30, 32) and math.isclose(rows.std().item(), token_std, rel_tol=1e-3)
    if teacher_dim <= 32:  # every inner product kept, up to one scale
        gram, teacher_gram = rows @ rows.T, table @ table.T
        assert torch.allclose(gram / gram.norm(), teacher_gram / teacher_gram.norm(), atol=1e-5)
    plain = item_tokens("token", AutoTokenizer.from_pretrained(tiny_llm), 30, llm, teacher)
    assert plain.emb.weight.shape == (31, 32) and item_tokens("id", None, 30, llm, teacher) is None


def test_item_tokens_learn_in_stage1_and_score_alike_on_every_route(tokens):
    llm, prompts, items, _ = tokens
    model, cpu = delrec.SoftPromptLM(llm, 3, items), torch.device("cpu")
    before, rows = {k: v.clone() for k, v in llm.state_dict().items()}, items.emb.weight.detach().clone()
    samples = [(prompts.ids(prompts.ranking([1, 2, 3], list(range(10, 30)))), prompts.name_ids(12))]
    first = model.target_nll(samples, cpu).item()
    opt = torch.optim.AdamW([model.soft, *model.item_params()], lr=1e-2)
    delrec.train_epoch(model, opt, [[samples]] * 10, cpu, "t")
    assert model.target_nll(samples, cpu).item() < first
    assert not torch.equal(items.emb.weight, rows)
    assert all(torch.equal(before[k], v) for k, v in llm.state_dict().items())
    cases = ranking_cases([list(range(1, 12)), [5, 9, 2, 7, 3]], [0, 1], 30, 11, random.Random(0), "test")
    model.eval()
    together, alone = (delrec.model_scores(model, prompts, cases, cpu, size) for size in (7, 0))  # padded, or not
    for case, one_pass, unpadded in zip(cases, together, alone):
        prompt, names = prompts.ids(prompts.ranking(case[1], case[3])), [prompts.name_ids(c) for c in case[3]]
        per_name = model.batched_scores([(prompt, name) for name in names], cpu, 4)  # a sequence per candidate
        assert one_pass.shape == (11,) and torch.allclose(one_pass, unpadded, atol=1e-4)
        for other in (model.score(prompt, names, cpu), per_name):  # plus the shared space's log-probability
            shift = other - one_pass
            assert torch.allclose(shift, shift[0].expand(11), atol=1e-4) and shift[0] < 0


def test_end_to_end_with_items_named_by_id(pipeline, tmp_path, tiny_llm):
    out = copy_artifacts(pipeline, tmp_path, "dataset.json", "teacher.pt")
    common = ["--data", "synth", "--out", out, "--device", "cpu", "--llm", tiny_llm, *ARGS]
    run_stage("baselines/delrec.py", *common, "--item-names", "id")
    metrics = json.loads((out / "synth" / "delrec_metrics.json").read_text())["metrics"]
    assert 0 <= metrics["DELRec"]["HR@1"] <= metrics["DELRec"]["HR@10"] <= 1
    assert torch.load(out / "synth" / "delrec_soft_prompt.pt")["item_emb"] is None
    proc = run_stage("baselines/delrec.py", *common, "--item-names", "title", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "--item-names title needs item titles" in proc.stderr


def test_end_to_end_with_tokens_started_at_random(pipeline, tmp_path, tiny_llm):
    out = copy_artifacts(pipeline, tmp_path, "dataset.json", "teacher.pt")
    run_stage("baselines/delrec.py", "--data", "synth", "--out", out, "--device", "cpu", "--llm", tiny_llm, *ARGS,
              "--item-names", "token")
    metrics = json.loads((out / "synth" / "delrec_metrics.json").read_text())
    assert metrics["args"]["item_names"] == "token"
    assert 0 <= metrics["metrics"]["DELRec"]["HR@1"] <= metrics["metrics"]["DELRec"]["HR@10"] <= 1


def test_items_are_named_by_teacher_started_tokens_by_default_even_where_titles_exist(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["delrec.py", "--data", "ml-100k", "--device", "cpu"])
    assert delrec.parse_args()[0].item_names == "teacher-token"


def test_items_are_named_by_title_or_id():
    prompts = delrec.Prompts(None, ["", "Hamlet", "Hamlet", "Heat", ""], max_history=5)
    assert [prompts.name(i) for i in (1, 2, 3, 4)] == ["Hamlet (item 1)", "Hamlet (item 2)", "Heat", "item 4"]
    assert delrec.Prompts(None, None, max_history=5).name(7) == "item 7"
    assert delrec.Prompts(None, ["", "Heat"], max_history=5, names="id").name(1) == "item 1"
