import copy
import json
import random
import sys
import types

import pytest
import torch

from conftest import (ROOT, baseline_whole_and_resumed, batch_on_a_gpu_that_fits, copy_artifacts,
                      run_stage)

sys.path.insert(0, ROOT + "/baselines")
import llm_trsr  # noqa: E402
from common import ItemTokens, UserError, candidate_rank, expected_at_random, ranking_cases  # noqa: E402

ARGS = ["--train-users", 30, "--test-users", 20, "--summary-tokens", 4, "--generate-batch", 16, "--lr", 1e-2]


def test_blocks_are_cut_from_the_start_and_only_the_last_ones_kept():
    history = list(range(1, 24))  # 23 items: blocks of 5, 5, 5, 5, 3
    assert llm_trsr.split_blocks(history, 5, 5) == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10], [11, 12, 13, 14, 15],
                                                    [16, 17, 18, 19, 20], [21, 22, 23]]
    assert llm_trsr.split_blocks(history, 5, 2) == [[16, 17, 18, 19, 20], [21, 22, 23]]
    assert llm_trsr.split_blocks(list(range(1, 31)), 5, 5)[0] == [6, 7, 8, 9, 10]  # 6 blocks: the first is dropped
    assert llm_trsr.split_blocks([7, 8], 5, 5) == [[7, 8]]


@pytest.fixture(scope="module")
def tiny(tiny_llm):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    llm = AutoModelForCausalLM.from_pretrained(tiny_llm).requires_grad_(False).eval()
    titles = [""] + [f"Film {i}" for i in range(1, 41)]
    genres = [[]] + [["Drama"] if i % 2 else ["Comedy", "War"] for i in range(1, 41)]
    return llm, llm_trsr.Texts(AutoTokenizer.from_pretrained(tiny_llm), titles, genres)


class RecordingSummarizer(llm_trsr.Summarizer):
    """Returns a text naming the prompt it was given instead of generating, so tests can follow the chain."""

    def __init__(self, texts, path, settings=None, whole_blocks=False):
        args = types.SimpleNamespace(block_size=5, max_blocks=5, generate_batch=4, summary_tokens=4,
                                     whole_blocks=whole_blocks)
        super().__init__(None, texts, args, torch.device("cpu"), str(path), settings or {"v": 1})
        self.prompts = []

    def generate(self, prompts):
        self.prompts += prompts
        return [f"S{len(self.prompts) - len(prompts) + n}" for n in range(len(prompts))]


def test_items_are_named_by_title_and_genres(tiny):
    _, texts = tiny
    assert texts.item(1) == "Film 1 (Drama)" and texts.item(2) == "Film 2 (Comedy, War)"
    assert "item 7" in llm_trsr.Texts(texts.tok, None, None).block([7])


# like SmolLM2's: a default system turn that names the model when the prompt brings none
CHAT = ("{% if messages[0].role != 'system' %}<|system|>I am TinyLM\n{% endif %}{% for m in messages %}"
        "<|{{ m.role }}|>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def test_system_turn_replaces_the_templates_own_in_every_prompt(tiny):
    _, texts = tiny
    tok = copy.deepcopy(texts.tok)
    tok.chat_template = CHAT
    default, system = llm_trsr.Texts(tok, None, None), llm_trsr.Texts(tok, None, None, system="Describe tastes.")
    assert default.block([7]).startswith("<|system|>I am TinyLM\n<|user|>Items")
    assert system.block([7]).startswith("<|system|>Describe tastes.\n<|user|>Items")
    assert "TinyLM" not in system.merge(["a", "b"]) + system.update("a", [7]) + system.user("a", [7])
    plain = llm_trsr.Texts(texts.tok, None, None, system="Describe tastes.")  # no chat template
    assert plain.block([7]).startswith("Describe tastes.\nItems")


def test_a_template_without_system_turns_is_one_error_line(tiny):
    tok = copy.deepcopy(tiny[1].tok)
    tok.chat_template = ("{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system role') }}"
                         "{% endif %}{{ m.content }}{% endfor %}")
    with pytest.raises(UserError, match="takes no system turn .*no system role.*leave --system out"):
        llm_trsr.Texts(tok, None, None, system="Describe tastes.")


def test_hierarchical_summarises_each_block_then_merges_them(tiny, tmp_path):
    _, texts = tiny
    s = RecordingSummarizer(texts, tmp_path / "cache.json")
    [summary] = s.hierarchical([list(range(1, 13))])  # blocks [1..5] [6..10] [11, 12]
    blocks = [texts.block(list(range(1, 6))), texts.block(list(range(6, 11))), texts.block([11, 12])]
    assert sorted(s.prompts[:3]) == sorted(blocks)
    block_summaries = [s.cache[llm_trsr.block_key(b)] for b in ([1, 2, 3, 4, 5], [6, 7, 8, 9, 10], [11, 12])]
    assert s.prompts[3:] == [texts.merge(block_summaries)]  # oldest block first
    assert summary == "S3"
    assert "Film 11 (Drama); Film 12 (Comedy, War)" in blocks[2]


def test_recurrent_updates_one_summary_block_by_block(tiny, tmp_path):
    _, texts = tiny
    s = RecordingSummarizer(texts, tmp_path / "cache.json")
    [summary] = s.recurrent([list(range(1, 13))])
    assert s.prompts == [texts.block([1, 2, 3, 4, 5]), texts.update("S0", [6, 7, 8, 9, 10]), texts.update("S1", [11, 12])]
    assert summary == "S2"


def test_whole_blocks_leave_the_shorter_last_block_to_the_recent_items(tiny, tmp_path):
    _, texts = tiny
    assert llm_trsr.split_blocks(list(range(1, 13)), 5, 5, whole=True) == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]
    histories = [list(range(1, 11)), list(range(1, 13)), [1, 2, 3]]  # two prefixes of one user, and a short one
    for paradigm, generated in (("hierarchical", 3), ("recurrent", 2)):  # 2 blocks + their merge | block + update
        s = RecordingSummarizer(texts, tmp_path / f"{paradigm}.json", whole_blocks=True)
        summaries = getattr(s, paradigm)(histories)
        assert summaries[0] == summaries[1] != llm_trsr.NO_SUMMARY and summaries[2] == llm_trsr.NO_SUMMARY
        assert len(s.prompts) == generated


def test_summary_cache_is_reused_and_dropped_when_settings_change(tiny, tmp_path):
    _, texts = tiny
    histories = [list(range(1, 13)), list(range(20, 27))]
    first = RecordingSummarizer(texts, tmp_path / "cache.json")
    summaries = first.hierarchical(histories)
    assert first.prompts
    again = RecordingSummarizer(texts, tmp_path / "cache.json")  # a rerun reads the file
    assert again.hierarchical(histories) == summaries and again.prompts == []
    # the recurrent paradigm shares the first block's summary; a longer history reuses its old blocks
    longer = RecordingSummarizer(texts, tmp_path / "cache.json")
    longer.recurrent([list(range(1, 14))])
    assert texts.block([1, 2, 3, 4, 5]) not in longer.prompts and len(longer.prompts) == 2
    both = RecordingSummarizer(texts, tmp_path / "cache.json")  # same blocks, the other paradigm: its own summary
    assert both.recurrent(histories[:1]) != summaries[:1] and len(both.prompts) == 1  # blocks 1-2 came from `longer`
    other = RecordingSummarizer(texts, tmp_path / "cache.json", settings={"v": 2})
    other.hierarchical(histories)
    assert len(other.prompts) == len(first.prompts)


def test_generation_is_batched_and_capped(tiny, tmp_path):
    llm, texts = tiny
    args = types.SimpleNamespace(summary_tokens=3)
    s = llm_trsr.Summarizer(llm, texts, args, torch.device("cpu"), str(tmp_path / "c.json"), {})
    prompts = [texts.block([1]), texts.block([1, 2, 3, 4, 5])]  # different lengths: left padding
    new_tokens = []
    generate = llm.generate
    llm.generate = lambda **kw: new_tokens.append(generate(**kw).shape[1] - kw["input_ids"].shape[1]) or generate(**kw)
    try:
        batched = s.generate(prompts)
        alone = [s.generate([p])[0] for p in prompts]
    finally:
        del llm.generate
    assert batched == alone and all(batched)
    assert max(new_tokens) == 3


def test_candidate_rows_keep_each_candidate_to_the_prefix_and_itself():
    ids, positions, mask, (rows, cols) = llm_trsr.candidate_rows([[1, 2, 3], [4]], [[[5, 6], [7]], [[8, 9, 10]]])
    assert ids.shape == (2, 8) and ids[0].tolist() == [1, 2, 3, 5, 6, 7, 0, 0] and ids[1, :4].tolist() == [4, 8, 9, 10]
    assert positions[0, :6].tolist() == [0, 1, 2, 3, 4, 3]  # each candidate continues the prefix
    assert rows.tolist() == [0, 0, 1] and cols.tolist() == [4, 5, 3]
    assert mask[0, 0, 5].tolist() == [True, True, True, False, False, True, False, False]  # not the other candidate
    assert mask[0, 0, 4].tolist() == [True] * 5 + [False] * 3 and mask[1, 0, 0].tolist() == [True] + [False] * 7
    assert not mask[1, 0, :4, 4:].any() and mask.diagonal(dim1=2, dim2=3).all()  # padding: seen by none, sees itself


@pytest.mark.parametrize("titles", [True, False])
def test_shared_rows_score_what_whole_prompts_do(tiny, titles):
    """Prefixes of two lengths, four and two candidates of their own lengths, named by title or by ID: every
    candidate's logits equal the LLM's own forward over its whole prompt, batched in rows or not."""
    llm, texts = tiny
    texts = texts if titles else llm_trsr.Texts(texts.tok, None, None)
    prefixes = texts.ids([texts.user("likes dramas", [1, 2, 3]), texts.user("a user who likes long war films", [9])])
    candidates = [[texts.candidate_ids(c) for c in (4, 5, 17, 30)], [texts.candidate_ids(c) for c in (6, 7)]]
    with torch.no_grad():
        got = llm_trsr.answer_logits(llm, prefixes, candidates, torch.device("cpu"))
        want = torch.cat([llm(torch.tensor([p + c])).logits[0, -1:] for p, cs in zip(prefixes, candidates) for c in cs])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    answers = list(texts.answer_ids())
    for rows_per_step in (1, 2):
        probs = llm_trsr.yes_probabilities(llm, prefixes, candidates, answers, torch.device("cpu"), rows_per_step)
        assert [len(p) for p in probs] == [4, 2] and ((probs[0] > 0) & (probs[0] < 1)).all()
        torch.testing.assert_close(torch.cat(probs), want[:, answers].softmax(-1)[:, 0], atol=1e-5, rtol=1e-5)


def test_training_loss_is_yes_after_the_next_item_and_no_after_the_unseen_one(tiny):
    llm, texts = tiny
    answers = dict(zip(("Yes", "No"), texts.answer_ids()))
    batch = [(texts.ids(texts.user("likes dramas", [1, 2])), [texts.candidate_ids(3), texts.candidate_ids(30)]),
             (texts.ids(texts.user("likes comedies", [4])), [texts.candidate_ids(5), texts.candidate_ids(31)])]
    with torch.no_grad():
        logits = torch.cat([llm(torch.tensor([p + c])).logits[0, -1:] for p, cs in batch for c in cs])
        want = torch.nn.functional.cross_entropy(logits, torch.tensor([answers["Yes"], answers["No"]] * 2))
        torch.testing.assert_close(llm_trsr.batch_loss(llm, batch, answers, torch.device("cpu")), want)


def test_scores_come_one_tensor_per_case(tiny):
    llm, texts = tiny
    answers = dict(zip(("Yes", "No"), texts.answer_ids()))
    cases = ranking_cases([list(range(1, 12)), [5, 9, 2, 7, 3]], [0, 1], 40, 11, random.Random(0), "test")
    args = types.SimpleNamespace(recent=3, batch_size=1)  # one case a step
    scores = llm_trsr.llm_scores(llm, texts, answers, cases, ["likes dramas", "likes comedies"], args,
                                 torch.device("cpu"))
    assert [s.shape for s in scores] == [(11,), (11,)] and not torch.equal(scores[0], scores[1])


def test_item_tokens_name_items_to_the_recommender_and_learn_with_the_lora(tiny_llm, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer, cpu = AutoTokenizer.from_pretrained(tiny_llm), torch.device("cpu")
    torch.manual_seed(0)
    llm, params = llm_trsr.add_lora(AutoModelForCausalLM.from_pretrained(tiny_llm).requires_grad_(False))
    items = ItemTokens(tokenizer, 40, llm.get_input_embeddings().weight)
    texts = llm_trsr.Texts(tokenizer, [""] + [f"Film {i}" for i in range(1, 41)], None, tokens=True)
    answers = dict(zip(("Yes", "No"), texts.answer_ids()))
    prefix = texts.ids(texts.user("likes dramas", [1, 3, 5]))
    assert {items.first, items.first + 2, items.first + 4} <= set(prefix)  # the recommender reads tokens
    assert "Film 7" in texts.block([7]) and "<item_" not in texts.block([7])  # the summariser reads titles
    candidates = [[texts.candidate_ids(c) for c in (7, 8)]]
    with torch.no_grad():  # item tokens in shared rows score what whole prompts do
        whole = llm(inputs_embeds=items.embed(llm.get_input_embeddings(), torch.tensor([prefix + candidates[0][1]])))
        torch.testing.assert_close(llm_trsr.answer_logits(llm, [prefix], candidates, cpu, items)[1],
                                   whole.logits[0, -1], atol=1e-5, rtol=1e-5)

    def p_yes():
        return llm_trsr.yes_probabilities(llm, [prefix], candidates, list(answers.values()), cpu, 1, items)[0]
    before, rows = p_yes(), items.emb.weight.detach().clone()
    args = types.SimpleNamespace(lr=1e-2, epochs=3, patience=3, batch_size=1)
    progress = {"path": str(tmp_path / "ckpt.pt"), "settings": {}, "seed": 0, "finished": {}, "resumed": None}
    llm_trsr.train(llm, params + [items.emb.weight], [(prefix, candidates[0])] * 20, answers, args, cpu, progress,
                   lambda: float(p_yes()[0] - p_yes()[1]), items)
    assert p_yes()[0] > before[0] + 0.1 and p_yes()[1] < before[1] - 0.1  # Yes for 7, No for 8
    moved = (items.emb.weight - rows).norm(dim=1)  # the prompts' items learn; the others only decay (AdamW)
    assert moved[[1, 3, 5, 7, 8]].min() > 10 * moved[[2, 30]].max()


def test_lora_learns_to_answer(tiny_llm, tiny, tmp_path):
    """Two training cuts: after the LoRA, P(Yes) rises for each cut's next item and falls for its unseen one."""
    from transformers import AutoModelForCausalLM
    _, texts = tiny
    torch.manual_seed(0)
    llm, params = llm_trsr.add_lora(AutoModelForCausalLM.from_pretrained(tiny_llm).requires_grad_(False))
    answers = dict(zip(("Yes", "No"), texts.answer_ids()))
    samples = [(texts.ids(texts.user("likes dramas", [1, 3, 5])), [texts.candidate_ids(7), texts.candidate_ids(8)]),
               (texts.ids(texts.user("likes comedies", [2, 4])), [texts.candidate_ids(6), texts.candidate_ids(9)])]

    def p_yes():
        return torch.stack(llm_trsr.yes_probabilities(llm, [p for p, _ in samples], [c for _, c in samples],
                                                       list(answers.values()), torch.device("cpu"), 2))
    before = p_yes()
    args = types.SimpleNamespace(lr=1e-2, epochs=4, patience=4, batch_size=2)
    progress = {"path": str(tmp_path / "ckpt.pt"), "settings": {}, "seed": 0, "finished": {}, "resumed": None}
    _, early = llm_trsr.train(llm, params, samples * 15, answers, args, torch.device("cpu"), progress,
                              lambda: float((p_yes()[:, 0] - p_yes()[:, 1]).mean()))  # 15 steps an epoch
    assert len(early.scores) == 4 and early.scores[early.best_epoch - 1] == max(early.scores)
    moved = p_yes() - before
    assert (moved[:, 0] > 0.1).all() and (moved[:, 1] < -0.1).all()
    assert all(p.grad is not None for p in params)


def test_ranking_metrics_count_ties_against_the_target():
    m = llm_trsr.ranking_metrics(candidate_rank(torch.tensor([0.9, 0.5, 0.5, 0.1]), 2))  # rank 3 with the tie
    assert m["Recall@3"] == 1 and m["MRR@3"] == pytest.approx(1 / 3)
    m = llm_trsr.ranking_metrics(candidate_rank(torch.tensor([0.1] * 3 + [0.9] * 8), 0))
    assert m["Recall@10"] == 0 and m["MRR@10"] == 0


def test_random_expectation_is_the_mean_over_ranks():
    m = expected_at_random(llm_trsr.ranking_metrics, 21)
    assert m["Recall@10"] == pytest.approx(10 / 21) and m["MRR@3"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 21)


@pytest.mark.parametrize("paradigm, options", [("hierarchical", []), ("recurrent", ["--no-whole-blocks"]),
                                               ("hierarchical", ["--item-names", "id"]),
                                               ("hierarchical", ["--item-names", "teacher-token", "--system",
                                                                 "Say what the user likes."])])
def test_end_to_end(pipeline, tmp_path, tiny_llm, paradigm, options):
    out = copy_artifacts(pipeline, tmp_path, "dataset.json", "teacher.pt", "student.pt")
    common = ["--data", "synth", "--out", out, "--device", "cpu", "--llm", tiny_llm, "--paradigm", paradigm, *ARGS,
              *options]
    proc = run_stage("baselines/llm_trsr.py", *common)
    result = json.loads((out / "synth" / f"llm_trsr_{paradigm}_metrics.json").read_text())
    assert set(result["metrics"]) == {"random (expected)", "popularity", "SASRec teacher", "P2Rec student",
                                      f"LLM-TRSR ({paradigm})"}
    assert result["per_seed"]["42"]["train_samples"] == 60
    for m in result["metrics"].values():
        assert 0 <= m["MRR@3"] <= m["Recall@3"] <= m["Recall@5"] <= m["Recall@10"] <= 1
    assert " 0 generated" not in proc.stdout
    seed42 = result["per_seed"]["42"]["metrics"][f"LLM-TRSR ({paradigm})"]  # the finished seed's line, as it ends
    assert f"LLM-TRSR ({paradigm}) {seed42['Recall@10']:.4f} / {seed42['MRR@10']:.4f}" in proc.stdout
    rerun = run_stage("baselines/llm_trsr.py", *common)
    assert " 0 generated" in rerun.stdout  # every summary came from the cache


def test_compiled_blocks_compute_what_eager_ones_do(tiny_llm):
    """--compile changes how the kernels run, not the arithmetic: the same scores and LoRA gradients, up to float
    rounding (in eval mode: compiled dropout draws other random numbers, so training curves differ)."""
    from transformers import AutoModelForCausalLM
    from common import compile_blocks
    torch.manual_seed(0)
    llm, params = llm_trsr.add_lora(AutoModelForCausalLM.from_pretrained(tiny_llm).requires_grad_(False))
    for param in params:
        param.data.normal_(0, 0.1)  # PEFT starts B at zero: give every LoRA weight a gradient
    prefixes, candidates = [list(range(5, 17)), list(range(30, 33))], [[[40, 41], [42]], [[43, 44, 45, 46]]]
    llm.eval()

    def scores_and_grads():
        logits = llm_trsr.answer_logits(llm, prefixes, candidates, torch.device("cpu"))
        grads = torch.autograd.grad(logits[:, 3].sum(), params)
        return logits.detach(), grads

    eager = scores_and_grads()
    compile_blocks(llm)
    compiled = scores_and_grads()
    assert all(block._compiled_call_impl is not None for block in llm.get_base_model().get_decoder().layers)
    torch.testing.assert_close(compiled[0], eager[0], atol=1e-5, rtol=1e-5)
    for got, want in zip(compiled[1], eager[1]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_a_batch_too_large_for_the_gpu_halves_until_its_step_fits(pipeline, tmp_path, tiny_llm, monkeypatch, capsys):
    printed, used = batch_on_a_gpu_that_fits(llm_trsr, pipeline, tmp_path, ["--llm", tiny_llm, *ARGS],
                                             "llm_trsr_hierarchical_metrics.json", 2, monkeypatch, capsys)
    assert "--batch-size 4 does not fit in the GPU's free memory: 2 samples a step" in printed and used == 2


def test_killed_run_resumes_to_the_same_metrics(pipeline, tmp_path, tiny_llm):
    """Two seeds; kill -9 once seed 2's first LoRA epoch is checkpointed (seed 1 finished), then the same command:
    it keeps seed 1, resumes seed 2 after that epoch and ends with the uninterrupted run's mean and std."""
    args = ["--device", "cpu", "--llm", tiny_llm, *ARGS, "--epochs", 2, "--patience", 2, "--seeds", 1, 2]
    whole, resumed = baseline_whole_and_resumed(pipeline, tmp_path, "baselines/llm_trsr.py", args, "llm_trsr_hierarchical",
                                                ready=lambda checkpoint: checkpoint["seed"] == 2)
    assert resumed == whole


def test_training_cuts_pair_each_prefixs_last_item_with_an_unseen_one():
    seqs = [list(range(1, 12)), [5, 9, 2, 7, 3], [40, 39, 38]]
    cuts = llm_trsr.training_cuts(seqs, [0, 1, 2] * 20, 1, num_items=40, rng=random.Random(0))
    assert len(cuts) == 40  # user 2's train split: one item, no target
    for u, history, nxt, unseen in cuts:
        assert history == seqs[u][:-3] and nxt == seqs[u][-3]  # validation and test stay unseen
        assert unseen not in seqs[u] and 1 <= unseen <= 40
    prefixes = llm_trsr.training_cuts(seqs[:2], [0, 1], 3, num_items=40, rng=random.Random(0))
    assert [(history[-1], nxt) for _, history, nxt, _ in prefixes] == \
        [(8, 9), (7, 8), (6, 7), (9, 2), (5, 9)]  # user 1's train split [5, 9, 2] has two prefixes with a target
