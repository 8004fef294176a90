"""
DELRec baseline (Zhang et al., "Distilling Sequential Pattern to Enhance LLMs-based Sequential
Recommendation"): distil the SASRec teacher's patterns into a soft prompt of a frozen LLM, then fine-tune
the LLM with AdaLoRA to name the next item among 20 candidates.

Reads  out/<dataset>/dataset.json (01_prepare.py), teacher.pt (02_teacher.py), student.pt (05_student.py,
       optional: the P2Rec student is scored on the same candidates)
Writes out/<dataset>/delrec_soft_prompt.pt (the first seed's), out/<dataset>/delrec_metrics.json (mean, std,
       every seed's metrics, wall time and the LLM's share of it)

$ python baselines/delrec.py --data ml-100k

Stage 1 (pattern distillation): only `--virtual-tokens` prompt embeddings train, the LLM is frozen, on two
tasks mixed with a dynamic weight (each task weighted by its share of the summed loss, so the lagging
task gets more): Temporal Analysis (the history and the item that came after a gap: name the item in the
gap) and Recommendation Pattern Simulating (name the teacher's top-1 among its top-10 and 10 random items).
Stage 2: the soft prompt is frozen, AdaLoRA (with its orthogonality regulariser) adapts the LLM to name the
true next item among 20 candidates.
Scoring: the log-likelihood of each candidate's whole name after the prompt (the sum over its tokens: the
probability that the LLM writes that name, the order beam search would generate the candidates in), so every
candidate gets a score; with item tokens one pass of the prompt scores all its candidates. Items are named by one
new token each, whose embedding both stages train, started from the SASRec teacher's item table (common.ItemTokens)
so that the LLM begins with what the teacher learned of which items go together: the LLM knows nothing of "item
4821" (`--item-names id`), and a token gives the item its own row to learn, input and output alike. The paper names
items by title (`--item-names title`, where the data has titles); validation chose tokens over titles and `item
<id>`, and the teacher's start over a random one (`--item-names token`), on both bundled datasets (RESULTS.md
section 7, rounds 10, 11 and 19: on ml-100k NDCG@10 0.63 by random tokens against titles' 0.50, 0.67-0.69 by the
teacher's over 3 seeds).
`--no-stage1` is the paper's ablation: stage 2 with no distilled prompt (on ml-100k at full scale, with the teacher's
start, it ranks as well as both stages: RESULTS.md section 7, round 19).
Two scales (--scale): on a CPU, small defaults (300 training users, their last training item, one epoch per stage)
keep the tests and a smoke run quick; on a GPU, full ones: every user and the last 20 prefixes of its train split,
128 samples a step (halved until a step fits the GPU's free memory), stage 2 stopping once validation NDCG@10 (500
users' second last items, 20 candidates each) has not improved for 3 epochs, keeping its best epoch. --seeds 42 43
44 runs each seed and reports mean ± std. Interrupted? The same command resumes after the last whole epoch of either
stage, skipping finished seeds (out/<dataset>/delrec.ckpt.pt).
"""
import argparse
import math
import os
import random
import sys
import time
from collections import Counter

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import (ITEM_NAMES, EarlyStopping, ItemTokens, Stopwatch, UserError, add_common_args,  # noqa: E402
                    add_scale_args, candidate_set, check_nonnegative, check_positive, compile_blocks, embed_tokens,
                    expected_at_random, fill_scale_defaults, fit_batch_size, item_names, item_tokens, load_dataset,
                    load_llm, load_references, longest, pick_device, pick_users, popularity_scores,
                    random_unseen, rank_systems, ranking_cases, right_padded, run_main, run_seeds, sasrec_states,
                    save_atomic, save_checkpoint, scaled, seed_everything, set_rng_state, shuffled_batches, stage_dir,
                    train_prefixes)

KS = (1, 5, 10)


class Prompts:
    """The three DELRec prompts, as text (`ids` tokenizes them). Items are named (`names`) by title ('title'), as
    'item <id>' ('id'), or by their own token ('token' or 'teacher-token': common.ItemTokens, which must have added
    the tokens to the tokenizer)."""

    def __init__(self, tokenizer, titles, max_history, names="title"):
        self.tok, self.titles, self.max_history, self.names = tokenizer, titles or [], max_history, names
        counts = Counter(self.titles)
        self.shared = {title for title, n in counts.items() if n > 1}  # two films called "Hamlet"
        self.cache = {}

    def name(self, item):
        """The item's token, or its title (indexed by item ID), or its ID where it has no title or shares it with
        another item."""
        if self.names.endswith("token"):
            return ItemTokens.name(item)
        title = self.titles[item] if self.names == "title" and item < len(self.titles) else ""
        if not title:
            return f"item {item}"
        return title if title not in self.shared else f"{title} (item {item})"

    def name_ids(self, item):
        if item not in self.cache:
            self.cache[item] = self.ids(" " + self.name(item))
        return self.cache[item]

    def ids(self, texts):
        """Token ids of a prompt, or of a list of prompts in one call: the tokenizer then spreads them over the
        CPU's cores (one call a prompt was over half the time of building Beauty's training samples)."""
        return self.tok(texts, add_special_tokens=False).input_ids

    def text(self, history, tail):
        items = "; ".join(self.name(i) for i in history[-self.max_history:])
        return f"A user's items, oldest first: {items}. {tail}"

    def temporal(self, history, after_gap):
        return self.text(history, f"Then one item is missing, and after it came: {self.name(after_gap)}. "
                                  f"The missing item was:")

    def ranking(self, history, cands, who="The user chose next"):
        return self.text(history, f"Candidates: {'; '.join(self.name(c) for c in cands)}. {who}:")


class SoftPromptLM(nn.Module):
    """A causal LM whose input starts with `n` trainable virtual-token embeddings (none when n = 0); with
    `item_tokens` (common.ItemTokens), items are tokens of their own, in the input and the output."""

    def __init__(self, llm, n, item_tokens=None):
        super().__init__()
        self.llm, self.items = llm, item_tokens
        emb = llm.get_input_embeddings().weight
        start = emb[torch.randint(len(emb), (n,))].detach().float().clone()  # real tokens: a sane scale
        self.soft = nn.Parameter(start)

    def item_params(self):
        return [] if self.items is None else [self.items.emb.weight]

    def token_embeds(self, ids):
        return embed_tokens(self.llm, ids, self.items)

    def logits(self, head, hidden):
        return head(hidden) if self.items is None else self.items.logits(head, hidden)

    def decoder_and_head(self):
        model = self.llm.get_base_model() if hasattr(self.llm, "get_base_model") else self.llm
        return model.get_decoder(), model.get_output_embeddings()

    def embed(self, ids):
        tokens = self.token_embeds(ids)
        return torch.cat([self.soft.to(tokens.dtype).expand(len(ids), -1, -1), tokens], 1)

    def target_nll(self, samples, device, per_sample=False):
        """Mean negative log-likelihood of the samples' target tokens; `per_sample`: each sample's summed over its
        target tokens, minus the log-probability of its whole target. Samples are (prompt ids, target ids)."""
        ids = right_padded([p + t for p, t in samples])
        labels = torch.full(ids.shape, -100)
        for row, (p, t) in enumerate(samples):
            labels[row, len(p):len(p) + len(t)] = torch.tensor(t)
        ids, labels = ids.to(device), labels.to(device)
        decoder, head = self.decoder_and_head()
        hidden = decoder(inputs_embeds=self.embed(ids), use_cache=False).last_hidden_state[:, len(self.soft):]
        # position j predicts token j + 1: read only the positions that predict a target token
        pred = labels[:, 1:] != -100
        logits = self.logits(head, hidden[:, :-1][pred]).float()
        if not per_sample:
            return F.cross_entropy(logits, labels[:, 1:][pred])
        nll = F.cross_entropy(logits, labels[:, 1:][pred], reduction="none")
        return torch.zeros(len(samples), device=device).index_add_(0, pred.nonzero()[:, 0], nll)

    @torch.no_grad()
    def batched_scores(self, samples, device, batch_size):
        """score() for many (prompt, name) pairs at once, `batch_size` sequences a step, every prompt run again for
        each of its names: more arithmetic than sharing its cache, but on a GPU one large batch beats hundreds of
        small launch-bound steps."""
        return torch.cat([-self.target_nll(samples[i:i + batch_size], device, per_sample=True).cpu()
                          for i in range(0, len(samples), batch_size)])

    @torch.no_grad()
    def next_token_scores(self, prompts, candidates, device, batch_size):
        """The log-probability of each candidate token right after its prompt, all of a prompt's candidates read
        off one forward pass of it, `batch_size` prompts a step. Names that differ in their last token only (item
        tokens, each after the same space) rank as by score(), which adds the shared tokens' log-probability, the
        same for every candidate: one sequence per case instead of one per candidate."""
        decoder, head = self.decoder_and_head()
        scores = []
        for i in tqdm(range(0, len(prompts), batch_size), desc="score", leave=False):
            chunk = prompts[i:i + batch_size]
            ids = right_padded(chunk).to(device)
            hidden = decoder(inputs_embeds=self.embed(ids), use_cache=False).last_hidden_state
            last = torch.tensor([len(self.soft) + len(p) - 1 for p in chunk], device=device)  # right-padded
            logp = self.logits(head, hidden[torch.arange(len(chunk), device=device), last]).float().log_softmax(-1)
            scores += [row[torch.tensor(c, device=device)].cpu() for row, c in zip(logp, candidates[i:i + batch_size])]
        return scores

    @torch.no_grad()
    def score(self, prompt, names, device):
        """Log-likelihood of each whole name after `prompt`: the prompt runs once, its KV cache is shared."""
        decoder, head = self.decoder_and_head()
        out = decoder(inputs_embeds=self.embed(torch.tensor([prompt], device=device)), use_cache=True)
        cache = out.past_key_values
        cache.batch_repeat_interleave(len(names))
        ids = right_padded(names).to(device)
        L = ids.shape[1]
        hidden = decoder(inputs_embeds=self.token_embeds(ids), past_key_values=cache).last_hidden_state
        hidden = torch.cat([out.last_hidden_state[:, -1:].expand(len(names), -1, -1), hidden[:, :-1]], 1)
        logp = self.logits(head, hidden).float().log_softmax(-1).gather(2, ids[..., None])[..., 0]
        lengths = torch.tensor([len(n) for n in names], device=device)
        real = torch.arange(L, device=device) < lengths[:, None]  # the names' own tokens, not padding
        return (logp * real).sum(1).cpu()


def train_epoch(model, opt, batches, device, desc, first_step=0, step_hook=None, penalty=None):
    """One pass of AdamW over batches of (task name, samples); the two distillation tasks share each step
    with dynamic weights: weight_i = loss_i / sum of losses (detached). `penalty()`: a regulariser added to each
    step's loss (AdaLoRA's, stage 2). Returns the epoch's mean step loss without it (the last step's alone would
    speak of the few samples it held)."""
    summed = 0.0
    for step, tasks in enumerate(tqdm(batches, desc=desc, leave=False), first_step):
        losses = [model.target_nll(samples, device) for samples in tasks]
        total = sum(losses)
        loss = sum(loss * (loss.detach() / total.detach()) for loss in losses) if len(losses) > 1 else total
        opt.zero_grad(set_to_none=True)
        (loss + penalty() if penalty else loss).backward()
        opt.step()
        if step_hook:
            step_hook(step)
        summed = summed + loss.detach()  # a tensor: no wait for the GPU at every step
    return float(summed) / len(batches)


def adalora_orthogonality(llm):
    """AdaLoRA's regulariser: how far each adapter's P (lora_B) and Q (lora_A) are from orthonormal, the mean
    Frobenius norm of P^T P - I and Q Q^T - I, times the config's orth_reg_weight. It keeps the singular values,
    by which AdaLoRA prunes ranks, meaningful. peft adds it only to a loss that its own forward computes; target_nll
    computes ours outside it, so stage 2 adds it by hand."""
    norms = []
    for name, p in llm.named_parameters():
        if p.requires_grad and ("lora_A" in name or "lora_B" in name):
            gram = p @ p.T if "lora_A" in name else p.T @ p
            norms.append(torch.linalg.matrix_norm(gram - torch.eye(len(gram), device=p.device, dtype=p.dtype)))
    return llm.peft_config["default"].orth_reg_weight * torch.stack(norms).mean()


ALLOCATOR_STATE = ("ipt", "exp_avg_ipt", "exp_avg_unc")  # what AdaLoRA's rank allocator learns as it goes


def allocator_state(model, allocator):
    """AdaLoRA's importance scores and the rank pattern it settled on (None for stage 1, which has no allocator)."""
    if allocator is None:
        return None
    return {**{name: getattr(allocator, name) for name in ALLOCATOR_STATE},
            "rank_pattern": model.llm.peft_config["default"].rank_pattern}


def resume_stage(stage, epochs, model, params, opt, allocator, saved, patience):
    """(epochs done, last epoch's loss, early stopping) of `stage` in what an interrupted run left, with its weights
    restored, and, when it stopped inside this stage, the optimiser and AdaLoRA's allocator too."""
    if saved is None or saved["stage"] < stage:
        return 0, None, EarlyStopping(patience)
    with torch.no_grad():
        for param, value in zip(params, saved["params"][stage]):
            param.copy_(value)
    if saved["stage"] > stage:  # this stage was finished
        return epochs, saved["stage_losses"][stage], EarlyStopping(patience)
    opt.load_state_dict(saved["optimizer"])
    if allocator is not None:
        for name in ALLOCATOR_STATE:
            setattr(allocator, name, saved["allocator"][name])
        model.llm.peft_config["default"].rank_pattern = saved["allocator"]["rank_pattern"]
    return saved["epoch"], saved["loss"], EarlyStopping(patience, saved["early"])


def train_stage(stage, model, params, tasks, epochs, args, device, progress, allocator=None, validate=None):
    """Up to `epochs` passes over `tasks` (one list of samples per task, shuffled each epoch: epoch_batches), each
    ending in a checkpoint (`progress`: its path, settings, and what an interrupted run left), so that after Ctrl-C
    or kill -9 the same command resumes after the last whole epoch. `allocator`: AdaLoRA's rank allocator (stage 2),
    whose state is saved along. `validate`: a score per epoch; the stage then stops once it has not improved for
    --patience epochs and keeps its best epoch's weights. Returns the last epoch's mean loss and the early stopping
    record."""
    opt = torch.optim.AdamW(params, lr=args.lr)
    done, loss, early = resume_stage(stage, epochs, model, params, opt, allocator, progress["resumed"], args.patience)
    hook = (lambda step: model.llm.base_model.update_and_allocate(step)) if allocator is not None else None
    penalty = (lambda: adalora_orthogonality(model.llm)) if allocator is not None else None
    for epoch in range(done, epochs):
        if validate and early.stop():
            break
        start = time.time()
        batches = epoch_batches(tasks, args.batch_size, progress["seed"], epoch)
        model.train()  # validation leaves it in eval mode, and the LLM loads in it: dropout, where the LLM has any
        loss = train_epoch(model, opt, batches, device, f"stage {stage}, epoch {epoch + 1}", epoch * len(batches), hook,
                           penalty)
        trained = time.time()
        if validate:
            early.update(validate(), params)
        scored = f", validation NDCG@10 {early.scores[-1]:.4f}" if validate else ""
        took = f"training {trained - start:.0f} s" + (f", validation {time.time() - trained:.0f} s" if validate else "")
        print(f"seed {progress['seed']}, stage {stage}, epoch {epoch + 1}: training loss {loss:.3f}{scored} ({took})")
        progress["params"][stage] = [p.detach().cpu().clone() for p in params]
        progress["stage_losses"][stage] = loss
        save_checkpoint(progress["path"], progress["settings"], epoch + 1, [], stage=stage, loss=loss,
                        params=progress["params"], stage_losses=progress["stage_losses"], optimizer=opt.state_dict(),
                        allocator=allocator_state(model, allocator), early=early.state(), seed=progress["seed"],
                        finished=progress["finished"])
    if validate and early.best_params is not None:
        early.restore_best(params)
    return loss, early


def add_adalora(model, total_step):
    """Wrap the LLM in AdaLoRA (rank 12 budgeted down to 8 over `total_step` steps, on q/v); returns the
    trainable parameters and the rank allocator. Each step must then call update_and_allocate(step)."""
    from peft import AdaLoraConfig, get_peft_model
    config = AdaLoraConfig(init_r=12, target_r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                           total_step=total_step)
    model.llm = get_peft_model(model.llm, config)
    return [p for p in model.llm.parameters() if p.requires_grad], model.llm.base_model.rankallocator


def sample_tokens(sample):
    prompt, target = sample
    return len(prompt) + len(target)


def epoch_batches(tasks, batch_size, seed, epoch):
    """One epoch's steps: each task's samples in a fresh order, cut into batches; step i holds batch i of every
    task. The order comes from the seed and the epoch alone, so a resumed run replays it. Unshuffled, a step would
    hold a handful of users' prefixes, and the same ones every epoch."""
    rng = random.Random(seed + epoch)
    return [list(step) for step in zip(*(shuffled_batches(samples, batch_size, rng) for samples in tasks))]


def rank_metrics(rank):
    out = {f"HR@{k}": float(rank < k) for k in KS}
    out.update({f"NDCG@{k}": (rank < k) / math.log2(rank + 2) for k in (5, 10)})
    return out


# Options whose default depends on --scale: (small, for a CPU: the tests and a smoke run | full, for a GPU)
SCALES = {"train_users": (300, 0), "prefixes": (1, 20), "stage2_epochs": (1, 20), "patience": (1, 3),
          "batch_size": (8, 128), "lr": (1e-3, 3e-3), "valid_users": (50, 500), "compile": (False, True)}


def parse_args():
    """The arguments, with the --scale defaults filled in for the device; returns them and the device."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, seed=False, llm=True)
    add_scale_args(parser, SCALES)
    parser.add_argument("--virtual-tokens", type=int, default=20, help="soft prompt length (the paper: 100)")
    parser.add_argument("--candidates", type=int, default=20, help="items ranked per test case")
    parser.add_argument("--max-history", type=int, default=10, help="most recent items in a prompt")
    parser.add_argument("--item-names", choices=ITEM_NAMES, default="teacher-token", help="how prompts name "
                        "items: one new token each, learned with the adapters and started from the SASRec teacher's "
                        "item table (token: at random); by title (the paper's, where the data has titles); or "
                        "'item <id>'")
    parser.add_argument("--test-users", type=int, default=0, help="users scored (0: all)")
    parser.add_argument("--stage1-epochs", type=int, default=1, help="passes of pattern distillation")
    parser.add_argument("--stage2-epochs", type=int, help=scaled(SCALES, "stage2_epochs", "epoch ceiling of the "
                        "AdaLoRA fine-tuning, which stops once validation NDCG@10 has not improved for --patience "
                        "epochs and keeps its best epoch"))
    parser.add_argument("--patience", type=int, help=scaled(SCALES, "patience", "stage 2 epochs without a better "
                                                            "validation NDCG@10 before it stops"))
    parser.add_argument("--batch-size", type=int, help=scaled(SCALES, "batch_size", "samples per step"))
    parser.add_argument("--lr", type=float, help=scaled(SCALES, "lr", "AdamW learning rate"))
    parser.add_argument("--no-stage1", action="store_true", help="ablation: stage 2 without a distilled soft prompt")
    args = parser.parse_args()
    device = pick_device(args.device)
    fill_scale_defaults(args, device, SCALES)
    check_positive(args, "virtual_tokens", "max_history", "stage1_epochs", "stage2_epochs", "patience", "batch_size",
                   "lr")
    check_nonnegative(args, "train_users", "prefixes", "valid_users", "test_users")
    if args.candidates < 11:
        raise UserError(f"--candidates must be at least 11 (the teacher's top-10 and one more), got {args.candidates}")
    return args, device


def stage1_samples(seqs, users, prompts, teacher, num_items, candidates, prefixes, rng):
    """Temporal Analysis (name the item in a gap) and Recommendation Pattern Simulating (name the teacher's
    top-1 among its top-10 and random unseen items), one of each per training prefix: (prompt ids, name ids)."""
    cuts = [(u, seen) for u in users for seen in train_prefixes(seqs[u], prefixes, shortest=3)]
    table = teacher.item_table().detach()
    top10 = []  # the teacher's top-10 after each cut (its top-1 is the answer), scored 1,024 cuts at a time
    for states in sasrec_states(teacher, [seen for _, seen in cuts]).split(1024):
        scores = states @ table.T
        scores[:, 0] = float("-inf")  # padding
        top10 += scores.topk(10).indices.tolist()
    simulated = []
    for (u, seen), top in zip(cuts, top10):
        cands = top + random_unseen(set(top) | set(seqs[u]), candidates - 10, num_items, rng)
        rng.shuffle(cands)
        simulated.append(prompts.ranking(seen, cands, "The sequential model recommends"))
    temporal = prompts.ids([prompts.temporal(seen[:-2], seen[-1]) for _, seen in cuts])
    return ([(ids, prompts.name_ids(seen[-2])) for ids, (_, seen) in zip(temporal, cuts)],
            [(ids, prompts.name_ids(top[0])) for ids, top in zip(prompts.ids(simulated), top10)])


def stage2_samples(seqs, users, prompts, num_items, candidates, prefixes, rng):
    """Name the last item of each training prefix among `candidates` items: (prompt ids, name ids)."""
    texts, answers = [], []
    for u in users:
        for seen in train_prefixes(seqs[u], prefixes, shortest=2):
            cands = candidate_set(set(seqs[u]), seen[-1], num_items, candidates, rng)
            texts.append(prompts.ranking(seen[:-1], cands))
            answers.append(seen[-1])
    return [(ids, prompts.name_ids(item)) for ids, item in zip(prompts.ids(texts), answers)]


def scoring_batch(args, device):
    """Prompts per step when candidates are scored: on a GPU 4 x --batch-size (no gradients), every candidate's
    prompt whole; on a CPU 0, meaning case by case, a prompt's cache shared by its candidates."""
    return 4 * args.batch_size if device.type == "cuda" else 0


def model_scores(model, prompts, cases, device, batch_size):
    """DELRec's score of every candidate of every case. Names that share all but their last token (items as
    tokens): one pass per prompt and that shared part scores all its candidates (SoftPromptLM.next_token_scores).
    Other names: on a CPU (`batch_size` 0) case by case, each prompt's cache shared by its candidates (the least
    arithmetic); on a GPU all cases in large batches (SoftPromptLM.batched_scores)."""
    ranking = prompts.ids([prompts.ranking(history, cands) for _, history, _, cands in cases])  # each case's, once
    names = [[prompts.name_ids(c) for c in case[3]] for case in cases]
    shared = names[0][0][:-1]
    if all(name[:-1] == shared for case in names for name in case):
        last_tokens = [[name[-1] for name in case] for case in names]
        return model.next_token_scores([prompt + shared for prompt in ranking], last_tokens, device, batch_size or 1)
    if batch_size == 0:
        return [model.score(prompt, case, device) for prompt, case in tqdm(list(zip(ranking, names)), desc="score",
                                                                           leave=False)]
    pairs = [(prompt, name) for prompt, case in zip(ranking, names) for name in case]
    return model.batched_scores(pairs, device, batch_size).split([len(case) for case in names])


def test_cases(seqs, num_items, args, seed):
    """The test users' candidates, drawn from the seed alone: every system ranks these (baselines/references.py too)."""
    return ranking_cases(seqs, pick_users(len(seqs), args.test_users, random.Random(seed + 4)), num_items,
                         args.candidates, random.Random(seed + 1), "test")


def run_seed(seed, args, data, device, references, progress):
    """One DELRec run: stage 1, stage 2 (early stopping on the validation items), then every system on the test
    users' candidates (drawn from the seed alone). Returns the metrics per system, stage 2's best epoch and its
    validation curve."""
    seed_everything(seed)
    rng = random.Random(seed)
    seqs, num_items = data["sequences"], data["num_items"]
    llm, tokenizer = load_llm(args.llm, device, lm_head=True)
    llm.requires_grad_(False)
    prompts = Prompts(tokenizer, data["item_titles"], args.max_history, args.item_names)
    items = item_tokens(args.item_names, tokenizer, num_items, llm, references["SASRec teacher"])
    model = SoftPromptLM(llm, 0 if args.no_stage1 else args.virtual_tokens, items).to(device)
    users = pick_users(len(seqs), args.train_users, rng)
    resumed = progress["resumed"]
    progress.update(params=resumed["params"] if resumed else {}, stage_losses=resumed["stage_losses"] if resumed else {})
    if resumed is not None:
        set_rng_state(progress["resumed"]["rng"])
        print(f"resuming from {progress['path']}: seed {seed}, stage {progress['resumed']['stage']}, "
              f"epoch {progress['resumed']['epoch']} was done")

    llm_time = Stopwatch()  # batch fitting, training, validation and scoring
    if not args.no_stage1:  # stage 1: the soft prompt (and item tokens) learn (samples drawn again on resuming, alike)
        temporal, simulated = stage1_samples(seqs, users, prompts, references["SASRec teacher"], num_items, args.candidates,
                                             args.prefixes, rng)
        with llm_time:
            args.batch_size = fit_batch_size(lambda n: sum(model.target_nll(longest(task, n, sample_tokens), device)
                                                           for task in (temporal, simulated)).backward(),
                                             [model.soft, *model.item_params()], args.batch_size, device)
            loss, _ = train_stage(1, model, [model.soft, *model.item_params()], [temporal, simulated],
                                  args.stage1_epochs, args, device, progress)
        print(f"seed {seed}, stage 1: {len(temporal)} temporal + {len(simulated)} simulating samples, "
              f"training loss {loss:.3f}")
        if seed == args.seeds[0]:
            save_atomic({"soft": model.soft.detach().cpu(), "seed": seed, "args": vars(args),
                         "item_emb": None if items is None else items.emb.weight.detach().cpu()},
                        os.path.join(stage_dir(args), "delrec_soft_prompt.pt"),
                        {"args": vars(args), "dataset_fingerprint": data["fingerprint"]})

    # stage 2: the soft prompt is frozen, AdaLoRA adapts the LLM to name the true next item
    model.soft.requires_grad_(False)
    recs = stage2_samples(seqs, users, prompts, num_items, args.candidates, args.prefixes, rng)
    params, allocator = add_adalora(model, math.ceil(len(recs) / args.batch_size) * args.stage2_epochs)
    params += model.item_params()
    if args.compile:  # now that AdaLoRA is in the blocks
        compile_blocks(model.llm)
    with llm_time:  # the trial step is where --compile compiles
        args.batch_size = fit_batch_size(lambda n: model.target_nll(longest(recs, n, sample_tokens), device).backward(),
                                         params, args.batch_size, device)
    # the rank budget's schedule spans the steps run, at the batch size that fits
    allocator.set_total_step(math.ceil(len(recs) / args.batch_size) * args.stage2_epochs)
    valid = ranking_cases(seqs, pick_users(len(seqs), args.valid_users, random.Random(seed + 2)), num_items,
                          args.candidates, random.Random(seed + 3), "valid")

    def validate():
        model.eval()
        scores = model_scores(model, prompts, valid, device, scoring_batch(args, device))
        return rank_systems({"DELRec": model}, model, scores, valid, rank_metrics, "validate")["DELRec"]["NDCG@10"]

    with llm_time:
        loss, early = train_stage(2, model, params, [recs], args.stage2_epochs, args, device, progress, allocator,
                                  validate)
    print(f"seed {seed}, stage 2: {len(recs)} samples, training loss {loss:.3f}, best epoch {early.best_epoch} of "
          f"{len(early.scores)} (validation NDCG@10 {' '.join(f'{v:.4f}' for v in early.scores)})")

    model.eval()
    test = test_cases(seqs, num_items, args, seed)
    systems = {"popularity": popularity_scores(seqs, num_items, seed), **references, "DELRec": model}
    with llm_time:
        scores = model_scores(model, prompts, test, device, scoring_batch(args, device))
    result = rank_systems(systems, model, scores, test, rank_metrics, "test")
    result["DELRec, no stage 1" if args.no_stage1 else "DELRec"] = result.pop("DELRec")
    return {"metrics": {**result, "random (expected)": expected_at_random(rank_metrics, args.candidates)},
            "best_epoch": early.best_epoch, "valid_ndcg10": early.scores, "test_users": len(test),
            "llm_seconds": round(llm_time.seconds, 1)}


def main():
    args, device = parse_args()
    data = load_dataset(args)
    args.item_names = item_names(args, data)
    references = load_references(args, data)
    run_seeds(args, data, "delrec_no_stage1" if args.no_stage1 else "delrec",
              lambda seed, progress: run_seed(seed, args, data, device, references, progress))


if __name__ == "__main__":
    run_main(main)
