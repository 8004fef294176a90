"""
LLM-TRSR baseline (Zheng et al., "Harnessing Large Language Models for Text-Rich Sequential
Recommendation", WWW 2024): the frozen LLM summarises a long history block by block, then the LLM with
LoRA reads the summary, the last few items and one candidate and answers "Yes" or "No".

Reads  out/<dataset>/dataset.json (01_prepare.py), teacher.pt (02_teacher.py), student.pt (05_student.py,
       optional: the P2Rec student is scored on the same candidates)
Writes out/<dataset>/llm_trsr_summaries.json (the summary cache), llm_trsr_<paradigm>_metrics.json

$ python baselines/llm_trsr.py --data ml-100k --paradigm hierarchical

Summaries: the history is cut into blocks of `--block-size` items from its start (the last block may be
shorter) and the last `--max-blocks` blocks are summarised, at most `--summary-tokens` new tokens each:
  hierarchical  summarise every block on its own, then merge the block summaries into one;
  recurrent     summarise the first block, then update that summary with each following block.
Blocks start at fixed positions, so a block (and a recurrent summary of the same blocks) reads the same
for the training cut and the test cut of a user. Summaries are cached on disk, keyed by the items they
read: a rerun (or the other paradigm, which shares the first block's summary) does not regenerate them.
Items are named by title and genres where the data has them (ml-100k), else "item <id>" (Beauty).

Recommender: LoRA (r 8, alpha 16, on q/k/v/o) learns to answer "Yes" for the item that came next and
"No" for a random item the user never touched (1:1). Score = softmax over the "Yes" and "No" logits.
Test: the true next item and `--candidates`-1 random unseen items, Recall and MRR at 3/5/10, with the
SASRec teacher and the P2Rec student scored on the same candidates, beside popularity and a random order.
Interrupted? The same command resumes: summaries come from their cache, the LoRA from its last whole epoch
(out/<dataset>/llm_trsr_<paradigm>.ckpt.pt).
"""
import argparse
import json
import os
import random
import sys
from collections import Counter

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import (UserError, add_common_args, candidate_rank, candidate_set, check_positive,  # noqa: E402
                    expected_at_random, llm_fingerprint, load_checkpoint, load_dataset, load_llm,
                    load_teacher_and_student, matmul_dtype, pick_device, popularity_scores, random_unseen, run_main,
                    reference_scores, run_settings, save_atomic, save_checkpoint, seed_everything, split_user, stage_dir)

KS = (3, 5, 10)
PARADIGMS = ("hierarchical", "recurrent")
SLOT = "\x00"  # stands for the user's text while the chat template is rendered once


def split_blocks(history, size, max_blocks):
    """Blocks of `size` items cut from the start of the history (the last may be shorter); the last
    `max_blocks` of them."""
    return [history[i:i + size] for i in range(0, len(history), size)][-max_blocks:]


class Texts:
    """Every prompt of the method as text, wrapped in the LLM's chat template when it has one."""

    def __init__(self, tokenizer, titles, genres):
        self.tok, self.titles, self.genres = tokenizer, titles, genres
        if tokenizer.chat_template:
            chat = tokenizer.apply_chat_template([{"role": "user", "content": SLOT}], tokenize=False,
                                                 add_generation_prompt=True)
            self.head, self.tail = chat.split(SLOT)
            self.answers = ("Yes", "No")  # the assistant's turn starts on a new line
        else:
            self.head, self.tail = "", "\nAnswer:"
            self.answers = (" Yes", " No")

    def item(self, item):
        if not self.titles or not self.titles[item]:
            return f"item {item}"
        genres = self.genres[item] if self.genres else []
        return f"{self.titles[item]} ({', '.join(genres)})" if genres else self.titles[item]

    def items(self, items):
        return "; ".join(self.item(i) for i in items)

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

    def user_ids(self, summary, recent):
        """The recommender prompt up to the candidate (token ids): the same for all of a user's candidates."""
        return self.tok(self.head + f"What the user likes: {summary}\nThe user's most recent items, oldest first: "
                        f"{self.items(recent)}.\n", add_special_tokens=False).input_ids

    def candidate_ids(self, candidate):
        """The rest of the recommender prompt (token ids): the candidate and the question."""
        return self.tok(f"Candidate: {self.item(candidate)}. Will the user interact with the candidate next? "
                        f"Answer Yes or No." + self.tail, add_special_tokens=False).input_ids

    def answer_ids(self):
        yes, no = (self.tok(a, add_special_tokens=False).input_ids[0] for a in self.answers)
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
        ids = [tok(p, add_special_tokens=False).input_ids for p in prompts]
        width = max(map(len, ids))
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        batch = torch.tensor([[pad] * (width - len(i)) + i for i in ids], device=self.device)
        mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids], device=self.device)
        out = self.llm.generate(input_ids=batch, attention_mask=mask, max_new_tokens=self.args.summary_tokens,
                                do_sample=False, pad_token_id=pad)
        return [" ".join(tok.decode(row, skip_special_tokens=True).split()) for row in out[:, width:]]

    def hierarchical(self, histories):
        blocks = [split_blocks(h, self.args.block_size, self.args.max_blocks) for h in histories]
        self.run({block_key(b): self.texts.block(b) for bs in blocks for b in bs}, "summarise blocks")
        merged = {merged_key(bs): self.texts.merge([self.cache[block_key(b)] for b in bs])
                  for bs in blocks if len(bs) > 1}
        self.run(merged, "merge summaries")
        return [self.cache[merged_key(bs) if len(bs) > 1 else block_key(bs[0])] for bs in blocks]

    def recurrent(self, histories):
        blocks = [split_blocks(h, self.args.block_size, self.args.max_blocks) for h in histories]
        self.run({block_key(bs[0]): self.texts.block(bs[0]) for bs in blocks}, "summarise block 1")
        for step in range(1, self.args.max_blocks):  # one batched pass per block position
            self.run({key_so_far(bs[:step + 1]): self.texts.update(self.cache[key_so_far(bs[:step])], bs[step])
                      for bs in blocks if len(bs) > step}, f"update with block {step + 1}")
        return [self.cache[key_so_far(bs)] for bs in blocks]


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


def last_hidden(llm, seqs, device, cache=None):
    """The decoder's hidden state at the last token of each id list (right-padded into one batch; causal
    attention keeps the padding out of every real position), after `cache` when given. Returns it with the
    base model, whose output embeddings are the LM head."""
    base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
    lengths = torch.tensor([len(s) for s in seqs], device=device)
    ids = torch.zeros(len(seqs), int(lengths.max()), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, :len(seq)] = torch.tensor(seq)
    hidden = base.get_decoder()(input_ids=ids.to(device), past_key_values=cache, use_cache=cache is not None)
    return hidden.last_hidden_state[torch.arange(len(seqs), device=device), lengths - 1].float(), base


def last_token_logits(llm, prompts, device):
    """Next-token logits after each prompt (lists of ids); the head runs on the last position only (the
    full [batch, length, vocab] logits would be most of the memory), in fp32: bf16 logits tie often."""
    last, base = last_hidden(llm, prompts, device)
    return F.linear(last, base.get_output_embeddings().weight.float())


@torch.no_grad()
def yes_probability(llm, prefix, rests, answers, device):
    """P(Yes) against No for every candidate: the shared prefix runs once and its KV cache serves them all."""
    base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
    cache = base.get_decoder()(input_ids=torch.tensor([prefix], device=device), use_cache=True).past_key_values
    cache.batch_repeat_interleave(len(rests))
    last, _ = last_hidden(llm, rests, device, cache)
    logits = last @ base.get_output_embeddings().weight[answers].float().T  # [candidates, (Yes, No)], fp32
    return logits.softmax(-1)[:, 0].cpu()


def train(llm, params, samples, answers, args, device, checkpoint, settings):
    """AdamW on the cross-entropy of the answer token ("Yes" or "No") after each prompt, over the vocabulary.
    Every epoch ends in `checkpoint`: after Ctrl-C or kill -9 the same command resumes after the last whole epoch."""
    opt = torch.optim.AdamW(params, lr=args.lr)
    start, loss = 0, None
    resumed = load_checkpoint(checkpoint, settings, args.force, [])
    if resumed is not None:
        with torch.no_grad():
            for param, saved in zip(params, resumed["params"]):
                param.copy_(saved)
        opt.load_state_dict(resumed["optimizer"])
        start, loss = resumed["epoch"], resumed["loss"]
    llm.train()
    for epoch in range(start, args.epochs):
        order = list(samples)
        random.Random(args.seed + epoch).shuffle(order)
        batches = [order[i:i + args.batch_size] for i in range(0, len(order), args.batch_size)]
        for batch in tqdm(batches, desc=f"LoRA epoch {epoch + 1}", leave=False):
            targets = torch.tensor([answers[label] for _, label in batch], device=device)
            step_loss = F.cross_entropy(last_token_logits(llm, [p for p, _ in batch], device), targets)
            opt.zero_grad(set_to_none=True)
            step_loss.backward()
            opt.step()
        loss = step_loss.item()
        save_checkpoint(checkpoint, settings, epoch + 1, [], params=[p.detach().cpu() for p in params],
                        optimizer=opt.state_dict(), loss=loss)
    llm.eval()
    return loss


def training_pairs(seqs, users, num_items, rng):
    """(user, item, answer): each user's last train item with "Yes", one random item the user never
    interacted with (in any split) with "No"."""
    pairs = []
    for u in users:
        negative = random_unseen(set(seqs[u]), 1, num_items, rng)[0]
        pairs += [(u, split_user(seqs[u])[0][-1], "Yes"), (u, negative, "No")]
    return pairs


def ranking_metrics(rank):
    """Recall@K and MRR@K of a target at 0-based `rank` among the candidates."""
    out = {f"Recall@{k}": float(rank < k) for k in KS}
    out.update({f"MRR@{k}": (rank < k) / (rank + 1) for k in KS})
    return out


# ----------------------------------------------------------------------------- main

def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, llm=True)
    parser.add_argument("--paradigm", default="hierarchical", choices=PARADIGMS, help="how blocks are summarised")
    parser.add_argument("--block-size", type=int, default=5, help="items per block")
    parser.add_argument("--max-blocks", type=int, default=5, help="the last this many blocks are summarised")
    parser.add_argument("--summary-tokens", type=int, default=32, help="new tokens per generated summary (cap)")
    parser.add_argument("--generate-batch", type=int, default=32, help="prompts per generation batch")
    parser.add_argument("--recent", type=int, default=5, help="most recent items listed beside the summary")
    parser.add_argument("--candidates", type=int, default=21, help="items ranked per test user (the paper: 21)")
    parser.add_argument("--train-users", type=int, default=200, help="users whose train split gives the LoRA samples (0: all)")
    parser.add_argument("--test-users", type=int, default=200, help="users scored (0: all)")
    parser.add_argument("--epochs", type=int, default=1, help="LoRA passes over the samples")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per LoRA step")
    parser.add_argument("--lr", type=float, default=5e-4, help="AdamW learning rate")
    args = parser.parse_args()
    check_positive(args, "block_size", "max_blocks", "summary_tokens", "generate_batch", "recent", "epochs",
                   "batch_size", "lr")
    for name in ("train_users", "test_users"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be 0 (all) or more, got {getattr(args, name)}")
    if args.candidates < max(KS) + 1:
        raise UserError(f"--candidates must be at least {max(KS) + 1} so that @{max(KS)} means something, "
                        f"got {args.candidates}")
    return args


def pick_users(n_users, wanted, rng):
    return list(range(n_users)) if wanted == 0 or wanted >= n_users else sorted(rng.sample(range(n_users), wanted))


def test_systems(systems, llm, texts, answers, seqs, test_users, histories, summaries, num_items, args, device):
    """Mean metrics per system over the test users; the candidate sets depend on the seed only."""
    totals = {name: Counter() for name, m in systems.items() if m is not None}  # update() adds
    test_rng = random.Random(args.seed + 2)
    for u, history, summary in tqdm(list(zip(test_users, histories, summaries)), desc="test", leave=False):
        cands = candidate_set(set(seqs[u]), seqs[u][-1], num_items, args.candidates, test_rng)
        for name, m in systems.items():
            if m is None:
                continue
            if m is llm:
                scores = yes_probability(llm, texts.user_ids(summary, history[-args.recent:]),
                                         [texts.candidate_ids(c) for c in cands], list(answers.values()), device)
            else:
                scores = reference_scores(m, history, cands)
            totals[name].update(ranking_metrics(candidate_rank(scores, cands.index(seqs[u][-1]))))  # ties count against it
    result = {name: {k: v / len(test_users) for k, v in t.items()} for name, t in totals.items()}
    return {**result, "random (expected)": expected_at_random(ranking_metrics, args.candidates)}


def main():
    args = parse_args()
    data = load_dataset(args)
    device = pick_device(args.device)
    out = stage_dir(args)
    teacher, student = load_teacher_and_student(args, data["num_items"])
    seed_everything(args.seed)
    rng = random.Random(args.seed)
    seqs = data["sequences"]
    train_users = [u for u in pick_users(len(seqs), args.train_users, rng) if len(split_user(seqs[u])[0]) >= 2]
    test_users = pick_users(len(seqs), args.test_users, random.Random(args.seed + 1))

    # bf16 where matmuls run natively in it: generation and LoRA both run twice as fast on such a CPU
    llm, tokenizer = load_llm(args.llm, device, lm_head=True)
    llm = llm.to(matmul_dtype(device)).requires_grad_(False).eval()
    texts = Texts(tokenizer, data["item_titles"], data["item_groups"] if data["item_titles"] else None)
    answers = dict(zip(("Yes", "No"), texts.answer_ids()))

    # 1. summaries of every history the recommender reads: the training cut (the train split without its
    # last item, which is the answer) and the test cut (everything before the test item)
    settings = {"llm": llm_fingerprint(args.llm), "summary_tokens": args.summary_tokens,
                "dataset_fingerprint": data["fingerprint"], "prompts": [texts.block([]), texts.merge([]),
                                                                         texts.update("", [])]}
    summarizer = Summarizer(llm, texts, args, device, os.path.join(out, "llm_trsr_summaries.json"), settings)
    train_histories = [split_user(seqs[u])[0][:-1] for u in train_users]
    test_histories = [seqs[u][:-1] for u in test_users]
    summarise = getattr(summarizer, args.paradigm)
    train_summaries, test_summaries = summarise(train_histories), summarise(test_histories)
    print(f"summaries ({args.paradigm}): {summarizer.generated} generated, {len(summarizer.cache)} in the cache; "
          f"a test user's: {test_summaries[0]!r}")

    # 2. LoRA fine-tuning to answer Yes for the next item, No for a random unseen one
    prompts = {u: texts.user_ids(summary, history[-args.recent:])
               for u, history, summary in zip(train_users, train_histories, train_summaries)}
    samples = [(prompts[u] + texts.candidate_ids(item), answer)
               for u, item, answer in training_pairs(seqs, train_users, data["num_items"], rng)]
    llm, params = add_lora(llm)
    checkpoint = os.path.join(out, f"llm_trsr_{args.paradigm}.ckpt.pt")
    loss = train(llm, params, samples, answers, args, device, checkpoint,
                 run_settings(args, dataset_fingerprint=data["fingerprint"], llm=llm_fingerprint(args.llm)))
    print(f"LoRA: {len(samples)} samples (1:1 positives and negatives), {args.epochs} epoch(s), last loss {loss:.3f}")

    # 3. test: every system ranks the same candidates
    systems = {"popularity": popularity_scores(seqs, data["num_items"], args.seed), "SASRec teacher": teacher,
               "P2Rec student": student, f"LLM-TRSR ({args.paradigm})": llm}
    result = test_systems(systems, llm, texts, answers, seqs, test_users, test_histories, test_summaries,
                          data["num_items"], args, device)
    meta = {"args": vars(args), "dataset_fingerprint": data["fingerprint"]}
    save_atomic({"args": vars(args), "test_users": len(test_users), "train_samples": len(samples), "metrics": result},
                os.path.join(out, f"llm_trsr_{args.paradigm}_metrics.json"), meta)
    os.remove(checkpoint)
    print(f"{args.candidates} candidates per test user, {len(test_users)} users")
    for name, m in result.items():
        print(f"  {name:28s} " + " ".join(f"{k} {v:.4f}" for k, v in m.items()))


if __name__ == "__main__":
    run_main(main)
