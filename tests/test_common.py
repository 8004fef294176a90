import math

import torch

import pytest

from common import (EarlyStopping, ItemEmbedding, LoRALLM, NEGATIVE_DRAWS, PromptBuilder, RunGroup, SASRec,
                    UserError, bce_negatives, eval_split, fill_scale_defaults, fit_batch_size, graph_widths,
                    left_pad, load_llm, longest, negative_draws, pack_prompts, popularity_scores, preference_kl,
                    rank_metrics, ranking_cases, right_padded, run_losses, sampled_negatives, sampled_ranks,
                    sasrec_states, seeds_mean_std, split_user, stack_batches, target_ranks, token_batches, train_pairs,
                    train_popularity, train_prefixes, train_tensors, trim_padding)


def test_rank_metrics_hand_computed():
    # user 0: target item 2 has the top score -> rank 0; user 1: target 3 is beaten by items 1 and 4 -> rank 2
    scores = torch.tensor([[9.0, 0.1, 0.9, 0.3, 0.2],
                           [9.0, 0.8, 0.1, 0.5, 0.7]])  # column 0 (padding) is ignored whatever its score
    ranks = target_ranks(scores, torch.tensor([2, 3]))
    assert ranks.tolist() == [0, 2]
    m = rank_metrics(ranks, ks=(1, 3))
    assert m["HR@1"] == 0.5 and m["HR@3"] == 1.0
    assert math.isclose(m["NDCG@1"], 0.5)
    assert math.isclose(m["NDCG@3"], (1.0 + 1 / math.log2(4)) / 2)


def test_rank_metrics_masks_history_but_not_target():
    scores = torch.tensor([[0.0, 0.8, 0.1, 0.5, 0.7]])
    history = torch.tensor([[1, 4, 3, 0]])  # seen items 1, 4 and the target 3 itself
    assert target_ranks(scores, torch.tensor([3])).item() == 2
    assert target_ranks(scores, torch.tensor([3]), history).item() == 0


def test_preference_kl_matches_definition():
    prior = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    pred = torch.tensor([[0.25, 0.25, 0.5], [0.2, 0.3, 0.5]])
    expected = (0.5 * math.log(2) * 2 + 0.0) / 2  # second user matches exactly
    assert math.isclose(preference_kl(pred.log(), prior).item(), expected, rel_tol=1e-6)


def test_split_and_padding():
    assert split_user([1, 2, 3, 4, 5]) == ([1, 2, 3], 4, 5)
    assert left_pad([[1, 2, 3], [4]], 2).tolist() == [[2, 3], [0, 4]]
    assert right_padded([[1, 2, 3], [4]]).tolist() == [[1, 2, 3], [4, 0, 0]]
    inputs, targets = train_tensors([[1, 2, 3, 4, 5]], 4)
    assert inputs.tolist() == [[0, 0, 1, 2]] and targets.tolist() == [[0, 0, 2, 3]]
    valid_in, valid_tgt, _ = eval_split([[1, 2, 3, 4, 5]], "valid", 4)
    test_in, test_tgt, history = eval_split([[1, 2, 3, 4, 5]], "test", 4)
    assert valid_in.tolist() == [[0, 1, 2, 3]] and valid_tgt.tolist() == [4]
    assert test_in.tolist() == [[1, 2, 3, 4]] and test_tgt.tolist() == [5] and history.tolist() == [[1, 2, 3, 4]]


def test_token_batches_cover_all_and_respect_budget():
    lengths = [5, 50, 7, 12, 49, 3, 30, 30, 70]
    batches = token_batches(lengths, max_tokens=60, shuffle=True, generator=torch.Generator().manual_seed(0))
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 60 or len(b) == 1 for b in batches)
    assert [b for b in batches if len(b) == 1 and lengths[b[0]] > 60] == [[8]]  # too long: alone
    assert token_batches(lengths, max_tokens=60, shuffle=False) == [[5, 0, 2, 3, 6], [7], [4], [1], [8]]  # by length


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_packed_prompts_match_each_prompt_alone(tmp_path, arch):
    """Packing several prompts into one row changes nothing: each prompt's final hidden state is that of the
    prompt run alone through the model's own SDPA attention (so no prompt sees another)."""
    from conftest import make_tiny_llm
    base, tokenizer = load_llm(make_tiny_llm(tmp_path, arch), torch.device("cpu"))
    reference, _ = load_llm(str(tmp_path), torch.device("cpu"))  # untouched: attn_implementation "sdpa"
    model = LoRALLM(base, num_outputs=3).eval()
    builder = PromptBuilder(tokenizer, "text", num_items=500)
    prompts = [builder([5, 17, 333]), builder([2]), builder([40, 41, 42, 43, 44])]
    packed = pack_prompts(prompts, torch.device("cpu"))
    assert packed.ids.shape == (1, sum(len(p.ids) for p in prompts)) and packed.longest == len(prompts[2].ids)
    hidden = model.hidden(packed)
    with torch.no_grad():
        alone = torch.cat([reference(torch.tensor([p.ids])).last_hidden_state[:, -1] for p in prompts])
    assert torch.allclose(hidden, alone, atol=1e-5)


def test_sasrec_is_causal_and_trimming_is_exact():
    torch.manual_seed(0)
    model = SASRec(ItemEmbedding(20, 16), maxlen=8, dropout=0.0).eval()
    seq = torch.tensor([[0, 0, 0, 3, 4, 5, 6, 7], [0, 0, 0, 0, 0, 1, 2, 3]])
    changed = seq.clone()
    changed[0, -1] = 9
    out, out_changed = model(seq), model(changed)
    assert torch.allclose(out[0, :-1], out_changed[0, :-1], atol=1e-6)  # earlier positions never see later items
    assert not torch.allclose(out[0, -1], out_changed[0, -1])
    trimmed, = trim_padding(seq)
    assert trimmed.shape[1] == 5
    assert torch.allclose(model(trimmed)[:, -1], out[:, -1], atol=1e-5)


def test_sasrec_states_in_batches_are_each_historys_own():
    torch.manual_seed(0)
    model = SASRec(ItemEmbedding(20, 16), maxlen=8, dropout=0.0).eval()
    histories = [[3], [4, 5, 6], list(range(1, 13)), [7, 2] * 3, [9, 9]]  # one longer than maxlen: its last 8
    batched = sasrec_states(model, histories, batch_size=2)
    alone = torch.cat([model(torch.tensor([h[-8:]]))[:, -1] for h in histories])
    assert batched.shape == (5, 16) and torch.allclose(batched, alone, atol=1e-5)
    assert sasrec_states(model, []).shape == (0, 16)


def test_sampled_protocol_ranks_the_target_among_fixed_unseen_candidates():
    scores = torch.tensor([[0.0, 0.9, 0.5, 0.7, 0.1, 0.3]])
    assert sampled_ranks(scores, torch.tensor([3]), torch.tensor([[1, 4, 5]])).tolist() == [1]  # only item 1 beats it
    sequences = [[1, 2, 3, 4], [5, 6, 7, 8, 9, 10, 11, 12], [2, 4, 6]]
    negatives = sampled_negatives(sequences, num_items=20, n=100)
    assert negatives.shape == (3, 12)  # the heaviest user has only 12 unseen items: everyone gets 12
    for seq, row in zip(sequences, negatives.tolist()):
        assert len(set(row)) == 12 and not set(row) & set(seq) and all(1 <= i <= 20 for i in row)
    assert torch.equal(negatives, sampled_negatives(sequences, num_items=20, n=100))  # drawn once, the same every time


def test_bce_negatives_are_uniform_over_the_users_unseen_items():
    sequences = [[1, 2, 3, 4, 5, 9, 10], [6, 7, 8]]  # training items: user 0 has 1-5, user 1 has 6
    pairs = train_pairs(sequences, num_items=10)
    assert pairs.tolist() == sorted([1, 2, 3, 4, 5, 11 + 6])
    rows = 4000
    users = torch.zeros(1, rows, dtype=torch.long)
    negatives = bce_negatives(users, torch.rand(1, NEGATIVE_DRAWS, rows, generator=torch.Generator().manual_seed(0)),
                              pairs, num_items=10)
    counts = torch.bincount(negatives.flatten(), minlength=11)
    assert counts[1:6].sum() <= 20  # all ten draws hit one of user 0's 5 items: 1 row in 1,024
    assert ((counts[6:] - rows / 5).abs() < 0.1 * rows / 5).all()  # 6..10, one fifth each
    draws = torch.tensor([[[0.05], [0.25], [0.75]] + [[0.0]] * (NEGATIVE_DRAWS - 3)])  # items 1, 3, 8
    assert bce_negatives(torch.zeros(1, 1, dtype=torch.long), draws, pairs, 10).tolist() == [[8]]  # the first unseen
    assert bce_negatives(torch.ones(1, 1, dtype=torch.long), draws, pairs, 10).tolist() == [[1]]  # user 1 has not seen 1


def test_negative_draws_follow_each_runs_generator_whatever_the_padding():
    # A run's draws depend on its own rows only, not on how wide or long its group's stacked batch is.
    sequences = [[1 + (u + j) % 9 for j in range(3 + u % 6)] for u in range(12)]
    inputs, targets = train_tensors(sequences, maxlen=16)
    lengths = (inputs > 0).sum(1)
    batch = torch.tensor([0, 3, 5])

    def draws(batches, shape):
        seq, positions, row_targets = stack_batches(inputs, targets, lengths, batches, shape)
        users, uniforms = negative_draws(batches, positions, row_targets, seq.shape[2], [torch.Generator().manual_seed(7)] * len(batches))
        real = row_targets[0] > 0
        return users[0][real], uniforms[0][:, real], row_targets[0][real]
    alone, grouped = draws([batch], None), draws([batch, torch.tensor([1, 2, 11])], (4, 16))
    for a, g in zip(alone, grouped):
        assert torch.equal(a, g)
    assert alone[0].tolist() == [3] * 3 + [5] * 5  # users of 3, 6 and 8 items: 0, 3 and 5 training targets


def test_a_step_gives_the_same_losses_at_every_width_that_holds_its_users():
    # The GPU replays one CUDA graph per width of graph_widths; the CPU cuts each step to its longest user.
    torch.manual_seed(0)
    sequences = [[1 + (u + j) % 9 for j in range(3 + u % 6)] for u in range(12)]  # 3-8 items: 0-5 train inputs
    inputs, targets = train_tensors(sequences, maxlen=16)
    lengths = (inputs > 0).sum(1)
    group = RunGroup([SASRec(ItemEmbedding(9, 8), maxlen=16, dropout=0.0) for _ in range(2)], torch.device("cpu"))
    batches = [torch.tensor([0, 3, 5]), torch.tensor([1, 2])]  # one per run, of different lengths

    def losses(shape):
        return run_losses(group, *stack_batches(inputs, targets, lengths, batches, shape), torch.float32)[0]
    cut = losses(None)
    assert (cut > 0).all()
    assert int(lengths[torch.cat(batches)].max()) == 5
    for width in (8, 16):  # the widths of graph_widths(16) that hold these users
        assert torch.allclose(losses((4, width)), cut, atol=1e-5)
    assert graph_widths(50) == [6, 12, 25, 50] and graph_widths(2) == [1, 2]


def test_prompts_mark_each_item_and_write_ids_as_asked(tiny_llm):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_llm)
    tokens = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    for item_repr, written in (("text", (" 7,", " 123,")), ("code", (" 0007,", " 0123,"))):
        builder = PromptBuilder(tokenizer, item_repr, num_items=1000)
        prompt = builder([7, 123])
        first, second = tokens(written[0]), tokens(written[1])
        assert prompt.ids == builder.prefix + first + second + builder.suffix
        end = len(builder.prefix) - 1
        assert prompt.item_ends == [end + len(first), end + len(first) + len(second)]  # each item's last token
    code = PromptBuilder(tokenizer, "code", num_items=1000)
    assert len(code([7]).ids) == len(code([999]).ids)  # fixed width: every item costs the same tokens
    token = PromptBuilder(tokenizer, "item-token", num_items=1000)([7, 123])
    assert [token.slots[e] for e in token.item_ends] == [7, 123] and sum(s > 0 for s in token.slots) == 2
    titles = [""] * 124
    titles[7], titles[123] = "Toy Story", "A title far longer than the budget of tokens " * 3
    named = PromptBuilder(tokenizer, "title", num_items=1000, titles=titles)([7, 123])
    comma = tokens(",")
    assert named.ids == (named.ids[:len(builder.prefix)] + tokens(" Toy Story") + comma
                         + tokens(" " + titles[123])[:PromptBuilder.TITLE_TOKENS] + comma + builder.suffix)
    assert sum(s > 0 for s in named.slots) == 0  # titles are ordinary tokens


def test_popularity_counts_training_items_and_breaks_ties_at_random():
    sequences = [[1, 2, 2, 3, 4], [2, 1, 5, 6]]  # training splits: [1, 2, 2] and [2, 1]
    assert train_popularity(sequences, 6).tolist() == [0, 2, 3, 0, 0, 0, 0]
    scores = popularity_scores(sequences, 6, seed=0)
    assert scores.argsort(descending=True)[:2].tolist() == [2, 1]  # counts decide, the fraction only breaks ties
    assert len(set(scores[3:].tolist())) == 4 and torch.equal(scores, popularity_scores(sequences, 6, seed=0))


def test_train_prefixes_end_at_the_last_training_items_longest_first():
    seq = [1, 2, 3, 4, 5, 6, 7]  # train split [1, 2, 3, 4, 5]
    assert train_prefixes(seq, 2, shortest=2) == [[1, 2, 3, 4, 5], [1, 2, 3, 4]]
    assert train_prefixes(seq, 0, shortest=3) == [[1, 2, 3, 4, 5], [1, 2, 3, 4], [1, 2, 3]]
    assert train_prefixes([1, 2, 3], 5, shortest=2) == []  # a one-item train split has no target


def test_ranking_cases_hold_out_the_validation_or_test_item():
    import random
    seqs = [list(range(1, 9)), [9, 10, 11, 12]]
    for split, cut in (("valid", -2), ("test", -1)):
        for u, history, target, cands in ranking_cases(seqs, [0, 1], 40, 11, random.Random(0), split):
            assert history == seqs[u][:cut] and target == seqs[u][cut]
            assert len(set(cands)) == 11 and not (set(cands) - {target}) & set(seqs[u])


def test_early_stopping_keeps_the_best_epoch_and_stops_after_patience():
    param = torch.nn.Parameter(torch.zeros(1))
    early = EarlyStopping(patience=2)
    for epoch, score in enumerate([0.1, 0.5, 0.4, 0.3], 1):
        assert not early.stop()
        with torch.no_grad():
            param.fill_(epoch)
        early.update(score, [param])
    assert early.stop() and early.best_epoch == 2
    resumed = EarlyStopping(2, early.state())  # what a checkpoint carries
    resumed.restore_best([param])
    assert resumed.stop() and param.item() == 2


def test_scale_defaults_follow_the_device_unless_set():
    import argparse
    args = argparse.Namespace(scale="auto", epochs=None, batch_size=4)
    fill_scale_defaults(args, torch.device("cpu"), {"epochs": (1, 8), "batch_size": (8, 32)})
    assert (args.scale, args.epochs, args.batch_size) == ("small", 1, 4)
    args = argparse.Namespace(scale="auto", epochs=None)
    fill_scale_defaults(args, torch.device("cuda"), {"epochs": (1, 8)})
    assert (args.scale, args.epochs) == ("full", 8)


def test_seeds_mean_std():
    mean, std = seeds_mean_std({1: {"a": {"HR@10": 0.2}}, 2: {"a": {"HR@10": 0.4}}})
    assert mean["a"]["HR@10"] == pytest.approx(0.3) and std["a"]["HR@10"] == pytest.approx(0.1414, abs=1e-4)
    assert seeds_mean_std({1: {"a": {"HR@10": 0.2}}})[1]["a"]["HR@10"] == 0.0


def test_batch_size_halves_until_a_trial_step_fits_and_clears_its_gradients():
    weight = torch.nn.Parameter(torch.ones(3))
    tried = []

    def trial_step(n):  # a GPU whose memory holds 40 samples a step
        tried.append(n)
        (weight * torch.rand(3) * n).sum().backward()  # dropout draws from the random state
        if n > 40:
            raise torch.OutOfMemoryError("out of memory")

    torch.manual_seed(0)
    assert fit_batch_size(trial_step, [weight], 128, torch.device("cuda")) == 32
    assert tried == [128, 64, 32] and weight.grad is None
    after = torch.rand(2)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(2))  # the trial steps' random draws were undone
    assert fit_batch_size(trial_step, [weight], 128, torch.device("cpu")) == 128 and tried[-1] == 32  # no trial
    with pytest.raises(UserError, match="does not fit"):
        fit_batch_size(lambda n: trial_step(1000), [weight], 4, torch.device("cuda"))
    assert longest([[1], [1, 2, 3], [1, 2]], 2, len) == [[1, 2], [1, 2, 3]]
