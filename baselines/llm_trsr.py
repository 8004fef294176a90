"""
LLM-TRSR baseline (Zheng et al., "Harnessing Large Language Models for Text-Rich Sequential
Recommendation", WWW 2024): the frozen LLM summarises a long history block by block, then the LLM with
LoRA reads the summary, the last few items and one candidate and answers "Yes" or "No".

Reads  out/<dataset>/dataset.json (01_prepare.py), teacher.pt (02_teacher.py), student.pt (05_student.py,
       optional: the P2Rec student is scored on the same candidates)
Writes out/<dataset>/llm_trsr_summaries.json (the summary cache), llm_trsr_<paradigm>_metrics.json (mean, std
       and every seed's metrics, wall time and the LLM's share of it)

$ python baselines/llm_trsr.py --data ml-100k --paradigm hierarchical

Summaries: the history is cut into blocks of `--block-size` items from its start and the last `--max-blocks`
blocks are summarised, at most `--summary-tokens` new tokens each. Whole blocks only (a departure from the paper,
which summarises a shorter last block too; `--no-whole-blocks` does that): the shorter block's items are among the
`--recent` items listed beside the summary anyway, and a user's training prefixes then share their summaries:
under a third of the generations on ml-100k at 20 prefixes, a sixth on Beauty. Two paradigms:
  hierarchical  summarise every block on its own, then merge the block summaries into one;
  recurrent     summarise the first block, then update that summary with each following block.
Blocks start at fixed positions, so a block (and a recurrent summary of the same blocks) reads the same
for the training cut and the test cut of a user. Summaries are cached on disk, keyed by the items they
read: a rerun (or the other paradigm, which shares the first block's summary) does not regenerate them.
Items are named by title and genres where the data has them (ml-100k); else the recommender's prompts name them
by one new token each (Beauty), whose embedding the LoRA training learns along, and the summaries by "item <id>"
(the frozen summariser knows no new token). `--item-names id` names them "item <id>" everywhere.

Recommender: LoRA (r 8, alpha 16, on q/k/v/o) learns to answer "Yes" for the item that came next after a
training prefix and "No" for a random item the user never touched (1:1). Score = softmax over the "Yes" and
"No" logits. A user's prompts differ only in their candidate, so the shared part runs once: one row holds it and
every candidate after it, a mask keeping each candidate to itself (candidate_rows), which computes what separate
prompts would with about a third fewer tokens in training (two candidates) and a third as many in ranking 21.
Test: the true next item and `--candidates`-1 random unseen items, Recall and MRR at 3/5/10, with the SASRec
teacher and the P2Rec student scored on the same candidates, beside popularity and a random order.

Two scales (--scale): on a CPU, small defaults (200 training users and their last training item, one epoch, 200
test users) keep the tests and a smoke run quick; on a GPU, full ones: every user and the last 20 prefixes of its
train split, 256 of them a step (512 prompts) at lr 2e-3 (halved until a step fits the GPU's free memory), the
LoRA stopping once validation MRR@10 (500 users' second last items) has not improved for 3 epochs, keeping its
best epoch, and every user tested. --seeds 42 43 44 reports mean ± std. Interrupted? The same command resumes:
summaries come from their cache, finished seeds are kept, the LoRA resumes from its last whole epoch
(out/<dataset>/llm_trsr_<paradigm>.ckpt.pt).
"""
import argparse
import json
import os
import random
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import (ITEM_NAMES, EarlyStopping, ItemTokens, Stopwatch, UserError, add_common_args,  # noqa: E402
                    add_scale_args, check_nonnegative, check_positive, compile_blocks, embed_tokens,
                    expected_at_random, fill_scale_defaults, fit_batch_size, item_names, item_tokens, llm_fingerprint,
                    load_dataset, load_llm, load_references, longest, matmul_dtype, pick_device, pick_users,
                    popularity_scores, random_unseen, rank_systems, ranking_cases, run_main, run_seeds, save_atomic,
                    save_checkpoint, scaled, seed_everything, set_rng_state, shuffled_batches, stage_dir,
                    train_prefixes)

KS = (3, 5, 10)
PARADIGMS = ("hierarchical", "recurrent")
SLOT = "\x00"  # stands for the user's text while the chat template is rendered once


def split_blocks(history, size, max_blocks, whole=False):
    """Blocks of `size` items cut from the start of the history (the last may be shorter, or with `whole` left out);
    the last `max_blocks` of them."""
    if whole:
        history = history[:len(history) // size * size]
    return [history[i:i + size] for i in range(0, len(history), size)][-max_blocks:]


NO_SUMMARY = "not summarised yet (fewer items than one block)"  # whole blocks, a history shorter than a block


class Texts:
    """Every prompt of the method as text, wrapped in the LLM's chat template when it has one. Summaries name items
    by title (with genres) or 'item <id>'; the recommender's prompts by the same, or with `tokens` by their own token
    (common.ItemTokens must have added the tokens to the tokenizer)."""

    def __init__(self, tokenizer, titles, genres, tokens=False, system=None):
        self.tok, self.titles, self.genres, self.tokens = tokenizer, titles, genres, tokens
        self.candidate_cache = {}  # candidate_ids per item: a full test on Beauty asks for each about 39 times
        if tokenizer.chat_template:
            # no system turn: the template's own, if it has one (SmolLM2's names the model, and its summaries
            # then often speak of SmolLM)
            turns = [{"role": "system", "content": system}] if system else []
            try:
                chat = tokenizer.apply_chat_template(turns + [{"role": "user", "content": SLOT}], tokenize=False,
                                                     add_generation_prompt=True)
            except Exception as error:  # jinja's TemplateError, raised by templates that refuse a system turn
                if not system:
                    raise
                raise UserError(f"--system: this LLM's chat template takes no system turn ({error}): leave "
                                f"--system out") from None
            self.head, self.tail = chat.split(SLOT)
            self.answers = ("Yes", "No")  # the assistant's turn starts on a new line
        else:
            self.head, self.tail = f"{system}\n" if system else "", "\nAnswer:"
            self.answers = (" Yes", " No")

    def item(self, item):
        if not self.titles or not self.titles[item]:
            return f"item {item}"
        genres = self.genres[item] if self.genres else []
        return f"{self.titles[item]} ({', '.join(genres)})" if genres else self.titles[item]

    def items(self, items, name=None):
        return "; ".join(map(name or self.item, items))

    def rec_item(self, item):
        return ItemTokens.name(item) if self.tokens else self.item(item)

    def chat(self, text):
        return self.head + text + self.tail

    def block(self, block):
        return self.chat(f"Items a user interacted with, oldest first: {self.items(block)}. "
                         f"In one sentence, what does this user like?")

    def merge(self, summaries):
        listed = "\n".join(f"{n}. {s}" for n, s in enumerate(summaries, 1))
        return self.chat(f"Summaries of a user's interests, oldest first:\n{listed}\n"
                         f"Merge them into one sentence about what this user likes.")

    def update(self, summary, block):
        return self.chat(f"What a user liked so far: {summary}\nThen the user interacted with, oldest first: "
                         f"{self.items(block)}. Update the description of what this user likes in one sentence.")

    def user(self, summary, recent):
        """The recommender prompt up to the candidate: the same for all of a user's candidates."""
        return self.head + (f"What the user likes: {summary}\nThe user's most recent items, oldest first: "
                            f"{self.items(recent, self.rec_item)}.\n")

    def ids(self, texts):
        """Token ids of a prompt, or of a list of prompts in one call: the tokenizer spreads a list over the CPU's
        cores."""
        return self.tok(texts, add_special_tokens=False).input_ids

    def candidate_ids(self, candidate):
        """The rest of the recommender prompt (token ids): the candidate and the question."""
        if candidate not in self.candidate_cache:
            self.candidate_cache[candidate] = self.ids(f"Candidate: {self.rec_item(candidate)}. Will the user interact "
                                                       f"with the candidate next? Answer Yes or No.{self.tail}")
        return self.candidate_cache[candidate]

    def answer_ids(self):
        yes, no = (ids[0] for ids in self.ids(list(self.answers)))
        if yes == no:
            raise UserError("the LLM's tokenizer gives 'Yes' and 'No' the same first token: use another --llm")
        return yes, no


# ----------------------------------------------------------------------------- summaries

class Summarizer:
    """Generates summaries with the frozen LLM, in batches, through a disk cache keyed by the items read."""

    def __init__(self, llm, texts, args, device, path, settings):
        self.llm, self.texts, self.args, self.device, self.path = llm, texts, args, device, path
        self.settings, self.cache = settings, {}
        if os.path.exists(path):
            with open(path) as f:
                saved = json.load(f)
            if saved["settings"] == settings:
                self.cache = saved["summaries"]
            else:
                print(f"{path} was made with other settings ({saved['settings']}): summarising afresh")
        self.generated = 0

    def run(self, jobs, desc):
        """jobs: {key: prompt text}. Generates the keys not cached yet, saving the cache after every batch."""
        todo = sorted((k for k in jobs if k not in self.cache), key=lambda k: len(jobs[k]))  # similar lengths
        batches = [todo[i:i + self.args.generate_batch] for i in range(0, len(todo), self.args.generate_batch)]
        for keys in tqdm(batches, desc=desc, leave=False):
            for key, text in zip(keys, self.generate([jobs[k] for k in keys])):
                self.cache[key] = text
            self.generated += len(keys)
            save_atomic({"settings": self.settings, "summaries": self.cache}, self.path)

    @torch.no_grad()
    def generate(self, prompts):
        """Greedy continuations of a batch of prompts, left-padded so that all of them end at the last column."""
        tok = self.texts.tok
        ids = self.texts.ids(prompts)
        width = max(map(len, ids))
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        batch = torch.tensor([[pad] * (width - len(i)) + i for i in ids], device=self.device)
        mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids], device=self.device)
        out = self.llm.generate(input_ids=batch, attention_mask=mask, max_new_tokens=self.args.summary_tokens,
                                do_sample=False, pad_token_id=pad)
        return [" ".join(tok.decode(row, skip_special_tokens=True).split()) for row in out[:, width:]]

    def blocks(self, histories):
        return [split_blocks(h, self.args.block_size, self.args.max_blocks, self.args.whole_blocks) for h in histories]

    def hierarchical(self, histories):
        blocks = self.blocks(histories)
        self.run({block_key(b): self.texts.block(b) for bs in blocks for b in bs}, "summarise blocks")
        merged = {merged_key(bs): self.texts.merge([self.cache[block_key(b)] for b in bs])
                  for bs in blocks if len(bs) > 1}
        self.run(merged, "merge summaries")
        return [self.cache[merged_key(bs) if len(bs) > 1 else block_key(bs[0])] if bs else NO_SUMMARY
                for bs in blocks]

    def recurrent(self, histories):
        blocks = self.blocks(histories)
        self.run({block_key(bs[0]): self.texts.block(bs[0]) for bs in blocks if bs}, "summarise block 1")
        for step in range(1, self.args.max_blocks):  # one batched pass per block position
            self.run({key_so_far(bs[:step + 1]): self.texts.update(self.cache[key_so_far(bs[:step])], bs[step])
                      for bs in blocks if len(bs) > step}, f"update with block {step + 1}")
        return [self.cache[key_so_far(bs)] if bs else NO_SUMMARY for bs in blocks]


def block_key(block):
    return "block " + " ".join(map(str, block))


def merged_key(blocks):
    """The hierarchical summary of `blocks`: their block summaries merged."""
    return "merged " + " | ".join(" ".join(map(str, b)) for b in blocks)


def key_so_far(blocks):
    """The recurrent summary after `blocks`: the first block's own summary, then one update per block."""
    return block_key(blocks[0]) if len(blocks) == 1 else "recurrent " + " | ".join(" ".join(map(str, b)) for b in blocks)


# ----------------------------------------------------------------------------- the yes/no recommender

def add_lora(llm):
    """LoRA r 8, alpha 16 on the attention projections (q/k/v/o), as the paper; returns the trainable params."""
    from peft import LoraConfig, get_peft_model
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    llm = get_peft_model(llm, config)
    return llm, [p for p in llm.parameters() if p.requires_grad]


def candidate_rows(prefixes, candidates, device=torch.device("cpu")):
    """Each prefix and all its candidates in one row: the prefix's ids once, then each candidate's ids (the rest of
    its prompt), right-padded to a width divisible by 8 (what memory-efficient attention wants of a mask). The 4D
    mask lets a candidate's tokens see the prefix and the candidate's own earlier tokens only, and their positions
    continue the prefix's, so each candidate's last hidden state is what its whole prompt alone would give, while
    the prefix runs once a row instead of once a candidate. Returns, on `device`, ids and positions [rows, width],
    the mask [rows, 1, width, width] (True: may attend) and the (row, column) of every candidate's last token, in
    order. The rows stay plain lists until one copy each, and the mask is built where it is used, not copied there:
    a ranking step's mask, 256 users of 21 candidates, is about 100 MB."""
    width = max(len(p) + sum(map(len, cs)) for p, cs in zip(prefixes, candidates))
    width += -width % 8
    ids, positions, segments, rows, cols = [], [], [], [], []  # segment 0: the prefix, k: the k-th candidate
    for row, (prefix, cands) in enumerate(zip(prefixes, candidates)):
        row_ids, row_positions, row_segments = list(prefix), list(range(len(prefix))), [0] * len(prefix)
        for k, cand in enumerate(cands, 1):
            row_ids += cand
            row_positions += range(len(prefix), len(prefix) + len(cand))
            row_segments += [k] * len(cand)
            rows.append(row)
            cols.append(len(row_ids) - 1)
        padding = width - len(row_ids)
        ids.append(row_ids + [0] * padding)
        positions.append(row_positions + [0] * padding)
        segments.append(row_segments + [-1] * padding)
    to_device = lambda lists: torch.from_numpy(np.array(lists)).to(device)  # numpy reads nested lists 5x faster
    segment = to_device(segments)
    query, key = segment[:, :, None], segment[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()  # padding sees itself: no empty row
    mask = causal & ((key == 0) | (key == query))
    return to_device(ids), to_device(positions), mask[:, None], (to_device(rows), to_device(cols))


def candidate_hidden(llm, prefixes, candidates, device, items=None):
    """The decoder's hidden state [candidates in all, hidden] at the last token of each prefix + candidate, from
    one row per prefix (candidate_rows), in fp32; `items`: common.ItemTokens, where items are tokens of their own.
    Returns it with the base model, whose output embeddings are the LM head."""
    base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
    ids, positions, mask, (rows, cols) = candidate_rows(prefixes, candidates, device)
    hidden = base.get_decoder()(inputs_embeds=embed_tokens(base, ids, items), position_ids=positions,
                                attention_mask=mask, use_cache=False).last_hidden_state
    return hidden[rows, cols].float(), base


def answer_logits(llm, prefixes, candidates, device, items=None):
    """Next-token logits after every prefix + candidate, over the vocabulary, in fp32 (bf16 logits tie often); the
    head runs on those last positions only (the full [rows, width, vocab] logits would be most of the memory)."""
    last, base = candidate_hidden(llm, prefixes, candidates, device, items)
    return F.linear(last, base.get_output_embeddings().weight.float())


@torch.no_grad()
def yes_probabilities(llm, prefixes, candidates, answers, device, rows_per_step, items=None):
    """P(Yes) against No for every candidate of every prefix (one tensor per prefix), `rows_per_step` prefixes a
    step, each with all its candidates."""
    probs = []
    for i in tqdm(range(0, len(prefixes), rows_per_step), desc="score", leave=False):
        cands = candidates[i:i + rows_per_step]
        last, base = candidate_hidden(llm, prefixes[i:i + rows_per_step], cands, device, items)
        yes_no = last @ base.get_output_embeddings().weight[answers].float().T  # [candidates, (Yes, No)]
        probs += yes_no.softmax(-1)[:, 0].cpu().split([len(c) for c in cands])
    return probs


def batch_loss(llm, batch, answers, device, items=None):
    """Cross-entropy, over the whole vocabulary, of "Yes" after each training cut's next item and "No" after its
    unseen one; `batch`: (prefix ids, [next item's ids, unseen item's ids]) per cut."""
    targets = torch.tensor([answers["Yes"], answers["No"]] * len(batch), device=device)
    logits = answer_logits(llm, [prefix for prefix, _ in batch], [cands for _, cands in batch], device, items)
    return F.cross_entropy(logits, targets)


def train(llm, params, samples, answers, args, device, progress, validate, items=None):
    """AdamW on batch_loss (`samples`: one per training cut, --batch-size cuts a step, each with its Yes and its No
    prompt) for up to --epochs epochs; stops once `validate()` has not improved for --patience epochs and keeps the
    best epoch. Every epoch ends in a checkpoint (`progress`): after Ctrl-C or kill -9 the same command resumes
    after the last whole epoch. Returns the last epoch's mean step loss and the early stopping record."""
    opt = torch.optim.AdamW(params, lr=args.lr)
    start, loss, early = 0, None, EarlyStopping(args.patience)
    resumed = progress["resumed"]
    if resumed is not None:
        with torch.no_grad():
            for param, saved in zip(params, resumed["params"]):
                param.copy_(saved)
        opt.load_state_dict(resumed["optimizer"])
        start, loss, early = resumed["epoch"], resumed["loss"], EarlyStopping(args.patience, resumed["early"])
    for epoch in range(start, args.epochs):
        if early.stop():
            break
        llm.train()
        start = time.time()
        batches = shuffled_batches(samples, args.batch_size, random.Random(progress["seed"] + epoch))
        summed = 0.0
        for batch in tqdm(batches, desc=f"LoRA epoch {epoch + 1}", leave=False):
            step_loss = batch_loss(llm, batch, answers, device, items)
            opt.zero_grad(set_to_none=True)
            step_loss.backward()
            opt.step()
            summed = summed + step_loss.detach()  # a tensor: no wait for the GPU at every step
        loss = float(summed) / len(batches)
        llm.eval()
        trained = time.time()
        early.update(validate(), params)
        print(f"seed {progress['seed']}, LoRA epoch {epoch + 1}: training loss {loss:.3f}, validation MRR@10 "
              f"{early.scores[-1]:.4f} (training {trained - start:.0f} s, validation {time.time() - trained:.0f} s)")
        save_checkpoint(progress["path"], progress["settings"], epoch + 1, [], params=[p.detach().cpu() for p in params],
                        optimizer=opt.state_dict(), loss=loss, early=early.state(), seed=progress["seed"],
                        finished=progress["finished"])
    llm.eval()
    early.restore_best(params)
    return loss, early


def training_cuts(seqs, users, prefixes, num_items, rng):
    """(user, history, next item, unseen item) per training prefix (common.train_prefixes): after the items before
    the prefix's last, the answer is "Yes" for that last item and "No" for one random item the user never
    interacted with (in any split)."""
    return [(u, seen[:-1], seen[-1], random_unseen(set(seqs[u]), 1, num_items, rng)[0])
            for u in users for seen in train_prefixes(seqs[u], prefixes, shortest=2)]


def ranking_metrics(rank):
    """Recall@K and MRR@K of a target at 0-based `rank` among the candidates."""
    out = {f"Recall@{k}": float(rank < k) for k in KS}
    out.update({f"MRR@{k}": (rank < k) / (rank + 1) for k in KS})
    return out


# ----------------------------------------------------------------------------- main

# Options whose default depends on --scale: (small, for a CPU: the tests and a smoke run | full, for a GPU).
# Full scale takes 256 cuts a step: a compiled step of the 135M LLM costs 140 ms at 64 cuts and 199 ms at 256 on one
# H200 (at 64 it waits on the host, not on the arithmetic), so a Beauty epoch takes 55-73 s instead of 129-179 s; the
# learning rate grows with the square root of the batch, and Beauty's validation chose the pair over 64 cuts at 1e-3
# (RESULTS section 7, round 15)
SCALES = {"train_users": (200, 0), "prefixes": (1, 20), "test_users": (200, 0), "valid_users": (50, 500),
          "epochs": (1, 20), "patience": (1, 3), "batch_size": (4, 256), "lr": (5e-4, 2e-3), "generate_batch": (32, 512),
          "compile": (False, True)}


def parse_args():
    """The arguments, with the --scale defaults filled in for the device; returns them and the device."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, seed=False, llm=True)
    add_scale_args(parser, SCALES)
    parser.add_argument("--paradigm", default="hierarchical", choices=PARADIGMS, help="how blocks are summarised")
    parser.add_argument("--block-size", type=int, default=5, help="items per block")
    parser.add_argument("--max-blocks", type=int, default=5, help="the last this many blocks are summarised")
    parser.add_argument("--whole-blocks", action=argparse.BooleanOptionalAction, default=True,
                        help="summarise whole blocks only, leaving a last, shorter block to the recent items listed "
                        "beside the summary (all of it is there while --recent >= --block-size - 1): a user's prefixes "
                        "then share summaries. A departure from the paper, which summarises the shorter block too "
                        "(--no-whole-blocks)")
    parser.add_argument("--summary-tokens", type=int, default=32, help="new tokens per generated summary (cap)")
    parser.add_argument("--generate-batch", type=int, help=scaled(SCALES, "generate_batch", "prompts per generation batch"))
    parser.add_argument("--recent", type=int, default=5, help="most recent items listed beside the summary")
    parser.add_argument("--item-names", choices=ITEM_NAMES, help="how the recommender's prompts name items: by title "
                        "(the default where the data has titles), 'item <id>', or one new token each, learned with "
                        "the LoRA (the default otherwise; teacher-token: started from the SASRec teacher's item table; "
                        "summaries then still name items by title or ID)")
    parser.add_argument("--system", help="system turn of every prompt, e.g. \"You are a recommender system's "
                        "assistant. Given the items a user interacted with, you describe in one sentence what the user "
                        "likes.\" (default: none, so the chat template's own, if it has one: SmolLM2's names the "
                        "model, and many of its summaries speak of SmolLM)")
    parser.add_argument("--candidates", type=int, default=21, help="items ranked per test user (the paper: 21)")
    parser.add_argument("--test-users", type=int, help=scaled(SCALES, "test_users", "users scored (0: all)"))
    parser.add_argument("--epochs", type=int, help=scaled(SCALES, "epochs", "epoch ceiling of the LoRA, which stops "
                        "once validation MRR@10 has not improved for --patience epochs and keeps its best epoch"))
    parser.add_argument("--patience", type=int, help=scaled(SCALES, "patience", "epochs without a better validation "
                                                            "MRR@10 before the LoRA stops"))
    parser.add_argument("--batch-size", type=int, help=scaled(SCALES, "batch_size", "training cuts per LoRA step, "
                                                              "each with a Yes and a No prompt"))
    parser.add_argument("--lr", type=float, help=scaled(SCALES, "lr", "AdamW learning rate"))
    args = parser.parse_args()
    device = pick_device(args.device)
    fill_scale_defaults(args, device, SCALES)
    check_positive(args, "block_size", "max_blocks", "summary_tokens", "generate_batch", "recent", "epochs",
                   "patience", "batch_size", "lr")
    check_nonnegative(args, "train_users", "prefixes", "valid_users", "test_users")
    if args.candidates < max(KS) + 1:
        raise UserError(f"--candidates must be at least {max(KS) + 1} so that @{max(KS)} means something, "
                        f"got {args.candidates}")
    return args, device


def llm_scores(llm, texts, answers, cases, summaries, args, device, items=None):
    """P(Yes) of every candidate of every case (one tensor per case), a case's prompt and all its candidates in one
    row, --batch-size rows a step: as many as a training step's cuts, but with no gradients to keep, so rows of 21
    candidates fit where cuts of two do."""
    candidates = [[texts.candidate_ids(c) for c in case[3]] for case in cases]
    return yes_probabilities(llm, user_prefixes(texts, cases, summaries, args.recent), candidates,
                             list(answers.values()), device, args.batch_size, items)


def user_prefixes(texts, cases, summaries, recent):
    """Token ids of each case's (or training cut's) recommender prompt up to the candidate: its summary and its
    `recent` last items, all in one tokenizer call."""
    return texts.ids([texts.user(summary, history[-recent:]) for (_, history, _, _), summary in zip(cases, summaries)])


def test_cases(seqs, num_items, args, seed):
    """The test users' candidates, drawn from the seed alone: every system ranks these (baselines/references.py too)."""
    return ranking_cases(seqs, pick_users(len(seqs), args.test_users, random.Random(seed + 1)), num_items,
                         args.candidates, random.Random(seed + 2), "test")


def run_seed(seed, args, data, device, references, progress):
    """One LLM-TRSR run: summaries (from the cache where it has them), the LoRA (early stopping on the validation
    items), then every system on the test users' candidates (drawn from the seed alone)."""
    seed_everything(seed)
    rng = random.Random(seed)
    seqs, num_items, out = data["sequences"], data["num_items"], stage_dir(args)
    cuts = training_cuts(seqs, pick_users(len(seqs), args.train_users, rng), args.prefixes, num_items, rng)
    valid = ranking_cases(seqs, pick_users(len(seqs), args.valid_users, random.Random(seed + 3)), num_items,
                          args.candidates, random.Random(seed + 4), "valid")
    test = test_cases(seqs, num_items, args, seed)

    # bf16 where matmuls run natively in it: generation and LoRA both run twice as fast on such a CPU
    llm, tokenizer = load_llm(args.llm, device, lm_head=True)
    llm = llm.to(matmul_dtype(device)).requires_grad_(False).eval()
    titles = data["item_titles"] if args.item_names != "id" else None  # token names: summaries still read titles
    items = item_tokens(args.item_names, tokenizer, num_items, llm, references["SASRec teacher"])
    if items is not None:
        items.to(device)
    texts = Texts(tokenizer, titles, data["item_groups"] if titles else None, items is not None, args.system)
    answers = dict(zip(("Yes", "No"), texts.answer_ids()))

    # 1. summaries of every history the recommender reads (a training cut's: the items before its prefix's last)
    settings = {"llm": llm_fingerprint(args.llm), "summary_tokens": args.summary_tokens,
                "dataset_fingerprint": data["fingerprint"], "prompts": [texts.block([]), texts.merge([]),
                                                                         texts.update("", [])]}
    summarizer = Summarizer(llm, texts, args, device, os.path.join(out, "llm_trsr_summaries.json"), settings)
    summarise = getattr(summarizer, args.paradigm)
    llm_time = Stopwatch()  # generation, batch fitting, training, validation and scoring
    with llm_time:
        train_summaries = summarise([history for _, history, _, _ in cuts])
        valid_summaries, test_summaries = summarise([c[1] for c in valid]), summarise([c[1] for c in test])
    print(f"seed {seed}, summaries ({args.paradigm}): {summarizer.generated} generated, {len(summarizer.cache)} in the "
          f"cache; a test user's: {test_summaries[0]!r}")

    # 2. LoRA fine-tuning to answer Yes for the next item, No for a random unseen one
    samples = [(prefix, [texts.candidate_ids(nxt), texts.candidate_ids(unseen)])
               for prefix, (_, _, nxt, unseen) in zip(user_prefixes(texts, cuts, train_summaries, args.recent), cuts)]
    llm, params = add_lora(llm)
    params += [] if items is None else [items.emb.weight]
    if args.compile:
        compile_blocks(llm)
    # the batch that fits the GPU's free memory; in args, so that validation batches and the metrics JSON follow it.
    # Its trial step, on the cuts whose rows (the prefix and both candidates) are longest, is where --compile
    # compiles: LLM time
    def trial_step(n):
        batch_loss(llm, longest(samples, n, lambda s: len(s[0]) + sum(map(len, s[1]))), answers, device,
                   items).backward()

    with llm_time:
        args.batch_size = fit_batch_size(trial_step, params, args.batch_size, device)
    if progress["resumed"] is not None:
        set_rng_state(progress["resumed"]["rng"])
        print(f"resuming from {progress['path']}: seed {seed}, epoch {progress['resumed']['epoch']} was done")
    name = f"LLM-TRSR ({args.paradigm})"

    def validate():
        scores = llm_scores(llm, texts, answers, valid, valid_summaries, args, device, items)
        return rank_systems({name: llm}, llm, scores, valid, ranking_metrics, "validate")[name]["MRR@10"]

    with llm_time:
        loss, early = train(llm, params, samples, answers, args, device, progress, validate, items)
    print(f"seed {seed}, LoRA: {2 * len(samples)} samples (1:1 Yes and No), training loss {loss:.3f}, best epoch "
          f"{early.best_epoch} of {len(early.scores)} (validation MRR@10 {' '.join(f'{v:.4f}' for v in early.scores)})")

    # 3. test: every system ranks the same candidates
    systems = {"popularity": popularity_scores(seqs, num_items, seed), **references, name: llm}
    with llm_time:
        scores = llm_scores(llm, texts, answers, test, test_summaries, args, device, items)
    result = rank_systems(systems, llm, scores, test, ranking_metrics, "test")
    return {"metrics": {**result, "random (expected)": expected_at_random(ranking_metrics, args.candidates)},
            "best_epoch": early.best_epoch, "valid_mrr10": early.scores, "train_samples": 2 * len(samples),
            "test_users": len(test), "llm_seconds": round(llm_time.seconds, 1)}


def main():
    args, device = parse_args()
    data = load_dataset(args)
    args.item_names = item_names(args, data)
    references = load_references(args, data)
    run_seeds(args, data, f"llm_trsr_{args.paradigm}",
              lambda seed, progress: run_seed(seed, args, data, device, references, progress))


if __name__ == "__main__":
    run_main(main)
