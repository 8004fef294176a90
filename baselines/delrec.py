"""
DELRec baseline (Zhang et al., "Distilling Sequential Pattern to Enhance LLMs-based Sequential
Recommendation"): distil the SASRec teacher's patterns into a soft prompt of a frozen LLM, then fine-tune
the LLM with AdaLoRA to name the next item among 20 candidates.

Reads  out/<dataset>/dataset.json (01_prepare.py), teacher.pt (02_teacher.py), student.pt (05_student.py,
       optional: the P2Rec student is scored on the same candidates)
Writes out/<dataset>/delrec_soft_prompt.pt, out/<dataset>/delrec_metrics.json

$ python baselines/delrec.py --data ml-100k

Stage 1 (pattern distillation): only `--virtual-tokens` prompt embeddings train, the LLM is frozen, on two
tasks mixed with a dynamic weight (each task weighted by its share of the summed loss, so the lagging
task gets more): Temporal Analysis (the history and the item that came after a gap: name the item in the
gap) and Recommendation Pattern Simulating (name the teacher's top-1 among its top-10 and 10 random items).
Stage 2: the soft prompt is frozen, AdaLoRA adapts the LLM to name the true next item among 20 candidates.
Scoring: the mean log-likelihood of each candidate's name after the prompt, so every candidate gets a
score. Items are named by title where the data has them (ml-100k), else "item <id>" (Beauty).
`--no-stage1` is the paper's ablation: stage 2 with no distilled prompt.
Interrupted? The same command resumes after the last whole epoch of either stage (out/<dataset>/delrec.ckpt.pt).
"""
import argparse
import math
import os
import random
import sys
from collections import Counter

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import (UserError, add_common_args, candidate_rank, candidate_set, check_positive,  # noqa: E402
                    expected_at_random, llm_fingerprint, load_checkpoint, load_dataset, load_llm,
                    load_teacher_and_student, pick_device, popularity_scores, random_unseen, reference_scores, run_main,
                    run_settings, sasrec_scores, save_atomic, save_checkpoint, seed_everything, split_user, stage_dir)

KS = (1, 5, 10)


class Prompts:
    """Token ids of the three DELRec prompts; items are named by title (or 'item <id>')."""

    def __init__(self, tokenizer, titles, max_history):
        self.tok, self.titles, self.max_history = tokenizer, titles or [], max_history
        counts = Counter(self.titles)
        self.shared = {title for title, n in counts.items() if n > 1}  # two films called "Hamlet"
        self.cache = {}

    def name(self, item):
        """The item's title (indexed by item ID); the ID where it has none or shares it with another item."""
        title = self.titles[item] if item < len(self.titles) else ""
        if not title:
            return f"item {item}"
        return title if title not in self.shared else f"{title} (item {item})"

    def name_ids(self, item):
        if item not in self.cache:
            self.cache[item] = self.tok(" " + self.name(item), add_special_tokens=False).input_ids
        return self.cache[item]

    def text(self, history, tail):
        items = "; ".join(self.name(i) for i in history[-self.max_history:])
        return self.tok(f"A user's items, oldest first: {items}. {tail}", add_special_tokens=False).input_ids

    def temporal(self, history, after_gap):
        return self.text(history, f"Then one item is missing, and after it came: {self.name(after_gap)}. "
                                  f"The missing item was:")

    def ranking(self, history, cands, who="The user chose next"):
        return self.text(history, f"Candidates: {'; '.join(self.name(c) for c in cands)}. {who}:")


class SoftPromptLM(nn.Module):
    """A causal LM whose input starts with `n` trainable virtual-token embeddings (none when n = 0)."""

    def __init__(self, llm, n):
        super().__init__()
        self.llm = llm
        emb = llm.get_input_embeddings().weight
        start = emb[torch.randint(len(emb), (n,))].detach().float().clone()  # real tokens: a sane scale
        self.soft = nn.Parameter(start)

    def decoder_and_head(self):
        model = self.llm.get_base_model() if hasattr(self.llm, "get_base_model") else self.llm
        return model.get_decoder(), model.get_output_embeddings()

    def embed(self, ids):
        tokens = self.llm.get_input_embeddings()(ids)
        return torch.cat([self.soft.to(tokens.dtype).expand(len(ids), -1, -1), tokens], 1)

    def target_nll(self, samples, device):
        """Mean negative log-likelihood of each sample's target tokens; samples are (prompt ids, target ids)."""
        L = max(len(p) + len(t) for p, t in samples)
        ids = torch.zeros(len(samples), L, dtype=torch.long)
        labels = torch.full((len(samples), L), -100)
        for row, (p, t) in enumerate(samples):
            ids[row, :len(p) + len(t)] = torch.tensor(p + t)
            labels[row, len(p):len(p) + len(t)] = torch.tensor(t)
        ids, labels = ids.to(device), labels.to(device)
        decoder, head = self.decoder_and_head()
        hidden = decoder(inputs_embeds=self.embed(ids), use_cache=False).last_hidden_state[:, len(self.soft):]
        # position j predicts token j + 1: read only the positions that predict a target token
        pred = labels[:, 1:] != -100
        logits = head(hidden[:, :-1][pred]).float()
        return F.cross_entropy(logits, labels[:, 1:][pred])

    @torch.no_grad()
    def score(self, prompt, names, device):
        """Mean log-likelihood of each name after `prompt`: the prompt runs once, its KV cache is shared."""
        decoder, head = self.decoder_and_head()
        out = decoder(inputs_embeds=self.embed(torch.tensor([prompt], device=device)), use_cache=True)
        cache = out.past_key_values
        cache.batch_repeat_interleave(len(names))
        L = max(len(n) for n in names)
        ids = torch.zeros(len(names), L, dtype=torch.long, device=device)
        for row, n in enumerate(names):
            ids[row, :len(n)] = torch.tensor(n)
        hidden = decoder(inputs_embeds=self.llm.get_input_embeddings()(ids), past_key_values=cache).last_hidden_state
        hidden = torch.cat([out.last_hidden_state[:, -1:].expand(len(names), -1, -1), hidden[:, :-1]], 1)
        logp = head(hidden).float().log_softmax(-1).gather(2, ids[..., None])[..., 0]
        lengths = torch.tensor([len(n) for n in names], device=device)
        real = torch.arange(L, device=device) < lengths[:, None]  # the names' own tokens, not padding
        return ((logp * real).sum(1) / lengths).cpu()


def train_epoch(model, opt, batches, device, desc, first_step=0, step_hook=None):
    """One pass of AdamW over batches of (task name, samples); the two distillation tasks share each step
    with dynamic weights: weight_i = loss_i / sum of losses (detached)."""
    for step, tasks in enumerate(tqdm(batches, desc=desc, leave=False), first_step):
        losses = [model.target_nll(samples, device) for samples in tasks]
        total = sum(losses)
        loss = sum(loss * (loss.detach() / total.detach()) for loss in losses) if len(losses) > 1 else total
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step_hook:
            step_hook(step)
    return loss.item()


ALLOCATOR_STATE = ("ipt", "exp_avg_ipt", "exp_avg_unc")  # what AdaLoRA's rank allocator learns as it goes


def allocator_state(model, allocator):
    """AdaLoRA's importance scores and the rank pattern it settled on (None for stage 1, which has no allocator)."""
    if allocator is None:
        return None
    return {**{name: getattr(allocator, name) for name in ALLOCATOR_STATE},
            "rank_pattern": model.llm.peft_config["default"].rank_pattern}


def resume_stage(stage, epochs, model, params, opt, allocator, saved):
    """(epochs done, last loss) of `stage` in what an interrupted run left, with its weights restored, and, when it
    stopped inside this stage, the optimiser and AdaLoRA's allocator too."""
    if saved is None or saved["stage"] < stage:
        return 0, None
    with torch.no_grad():
        for param, value in zip(params, saved["params"][stage]):
            param.copy_(value)
    if saved["stage"] > stage:  # this stage was finished
        return epochs, saved["stage_losses"][stage]
    opt.load_state_dict(saved["optimizer"])
    if allocator is not None:
        for name in ALLOCATOR_STATE:
            setattr(allocator, name, saved["allocator"][name])
        model.llm.peft_config["default"].rank_pattern = saved["allocator"]["rank_pattern"]
    return saved["epoch"], saved["loss"]


def train_stage(stage, model, params, batches, epochs, args, device, progress, allocator=None):
    """`epochs` passes over `batches`, each ending in a checkpoint (`progress`: its path, settings, and what an
    interrupted run left), so that after Ctrl-C or kill -9 the same command resumes after the last whole epoch.
    `allocator`: AdaLoRA's rank allocator (stage 2), whose state is saved along."""
    opt = torch.optim.AdamW(params, lr=args.lr)
    done, loss = resume_stage(stage, epochs, model, params, opt, allocator, progress["resumed"])
    hook = (lambda step: model.llm.base_model.update_and_allocate(step)) if allocator is not None else None
    for epoch in range(done, epochs):
        loss = train_epoch(model, opt, batches, device, f"stage {stage}, epoch {epoch + 1}", epoch * len(batches), hook)
        progress["params"][stage] = [p.detach().cpu().clone() for p in params]
        progress["stage_losses"][stage] = loss
        save_checkpoint(progress["path"], progress["settings"], epoch + 1, [], stage=stage, loss=loss,
                        params=progress["params"], stage_losses=progress["stage_losses"], optimizer=opt.state_dict(),
                        allocator=allocator_state(model, allocator))
    return loss


def add_adalora(model, total_step):
    """Wrap the LLM in AdaLoRA (rank 12 budgeted down to 8 over `total_step` steps, on q/v); returns the
    trainable parameters and the rank allocator. Each step must then call update_and_allocate(step)."""
    from peft import AdaLoraConfig, get_peft_model
    config = AdaLoraConfig(init_r=12, target_r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                           total_step=total_step)
    model.llm = get_peft_model(model.llm, config)
    return [p for p in model.llm.parameters() if p.requires_grad], model.llm.base_model.rankallocator


def chunks(samples, size):
    return [samples[i:i + size] for i in range(0, len(samples), size)]


def rank_metrics(rank):
    out = {f"HR@{k}": float(rank < k) for k in KS}
    out.update({f"NDCG@{k}": (rank < k) / math.log2(rank + 2) for k in (5, 10)})
    return out


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, llm=True)
    parser.add_argument("--virtual-tokens", type=int, default=20, help="soft prompt length (the paper: 100)")
    parser.add_argument("--candidates", type=int, default=20, help="items ranked per test case")
    parser.add_argument("--max-history", type=int, default=10, help="most recent items in a prompt")
    parser.add_argument("--train-users", type=int, default=300,
                        help="users whose train split makes the training samples")
    parser.add_argument("--test-users", type=int, default=0, help="users scored (0: all)")
    parser.add_argument("--stage1-epochs", type=int, default=1, help="passes of pattern distillation")
    parser.add_argument("--stage2-epochs", type=int, default=1, help="passes of AdaLoRA fine-tuning")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per step")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    parser.add_argument("--no-stage1", action="store_true", help="ablation: stage 2 without a distilled soft prompt")
    args = parser.parse_args()
    check_positive(args, "virtual_tokens", "max_history", "train_users", "stage1_epochs", "stage2_epochs",
                   "batch_size", "lr")
    if args.test_users < 0:
        raise UserError(f"--test-users must be 0 (all) or more, got {args.test_users}")
    if args.candidates < 11:
        raise UserError(f"--candidates must be at least 11 (the teacher's top-10 and one more), got {args.candidates}")
    return args


def stage1_samples(seqs, users, prompts, teacher, num_items, candidates, rng):
    """Temporal Analysis (name the item in a gap) and Recommendation Pattern Simulating (name the teacher's
    top-1 among its top-10 and random unseen items), one of each per training user."""
    temporal, simulated = [], []
    for u in users:
        train_part = split_user(seqs[u])[0]
        if len(train_part) < 3:
            continue
        temporal.append((prompts.temporal(train_part[:-2], train_part[-1]), prompts.name_ids(train_part[-2])))
        scores = sasrec_scores(teacher, train_part, list(range(num_items + 1)))
        scores[0] = float("-inf")
        top = scores.topk(10).indices.tolist()  # the teacher's top-10; its top-1 is the answer
        cands = top + random_unseen(set(top) | set(seqs[u]), candidates - 10, num_items, rng)
        rng.shuffle(cands)
        simulated.append((prompts.ranking(train_part, cands, "The sequential model recommends"), prompts.name_ids(top[0])))
    return temporal, simulated


def stage2_samples(seqs, users, prompts, num_items, candidates, rng):
    """Name the true next item of a user's train split among `candidates` items."""
    recs = []
    for u in users:
        train_part = split_user(seqs[u])[0]
        if len(train_part) < 2:
            continue
        cands = candidate_set(set(seqs[u]), train_part[-1], num_items, candidates, rng)
        recs.append((prompts.ranking(train_part[:-1], cands), prompts.name_ids(train_part[-1])))
    return recs


def test_systems(systems, model, prompts, seqs, test_users, num_items, args, device):
    """Every system ranks the same candidate sets (they depend on the seed only): mean metrics per system."""
    totals = {name: Counter() for name, m in systems.items() if m is not None}  # update() adds
    test_rng = random.Random(args.seed + 1)
    for u in tqdm(test_users, desc="test", leave=False):
        history, target = seqs[u][:-1], seqs[u][-1]
        cands = candidate_set(set(seqs[u]), target, num_items, args.candidates, test_rng)
        for name, m in systems.items():
            if m is None:
                continue
            if m is model:
                scores = model.score(prompts.ranking(history, cands), [prompts.name_ids(c) for c in cands], device)
            else:
                scores = reference_scores(m, history, cands)
            totals[name].update(rank_metrics(candidate_rank(scores, cands.index(target))))
    result = {name: {k: v / len(test_users) for k, v in t.items()} for name, t in totals.items()}
    return {**result, "random (expected)": expected_at_random(rank_metrics, args.candidates)}


def main():
    args = parse_args()
    data = load_dataset(args)
    device = pick_device(args.device)
    out = stage_dir(args)
    teacher, student = load_teacher_and_student(args, data["num_items"])
    meta = {"args": vars(args), "dataset_fingerprint": data["fingerprint"]}
    seed_everything(args.seed)
    rng = random.Random(args.seed)

    llm, tokenizer = load_llm(args.llm, device, lm_head=True)
    llm.requires_grad_(False)
    prompts = Prompts(tokenizer, data["item_titles"], args.max_history)
    model = SoftPromptLM(llm, 0 if args.no_stage1 else args.virtual_tokens).to(device)
    seqs = data["sequences"]
    users = rng.sample(range(len(seqs)), min(args.train_users, len(seqs)))

    name = "delrec_no_stage1" if args.no_stage1 else "delrec"
    path = os.path.join(out, f"{name}.ckpt.pt")  # every epoch of both stages: a killed run resumes from here
    settings = run_settings(args, dataset_fingerprint=data["fingerprint"], llm=llm_fingerprint(args.llm))
    progress = {"path": path, "settings": settings, "resumed": load_checkpoint(path, settings, args.force, []),
                "params": {}, "stage_losses": {}}
    if progress["resumed"] is not None:
        progress["params"], progress["stage_losses"] = progress["resumed"]["params"], progress["resumed"]["stage_losses"]

    if not args.no_stage1:  # stage 1: only the soft prompt learns (its samples are drawn again on resuming, alike)
        temporal, simulated = stage1_samples(seqs, users, prompts, teacher, data["num_items"], args.candidates, rng)
        batches = [list(pair) for pair in zip(chunks(temporal, args.batch_size), chunks(simulated, args.batch_size))]
        loss = train_stage(1, model, [model.soft], batches, args.stage1_epochs, args, device, progress)
        print(f"stage 1: {len(temporal)} temporal + {len(simulated)} simulating samples, last loss {loss:.3f}")
        save_atomic({"soft": model.soft.detach().cpu(), "args": vars(args)},
                    os.path.join(out, "delrec_soft_prompt.pt"), meta)

    # stage 2: the soft prompt is frozen, AdaLoRA adapts the LLM to name the true next item
    model.soft.requires_grad_(False)
    recs = stage2_samples(seqs, users, prompts, data["num_items"], args.candidates, rng)
    batches = [[batch] for batch in chunks(recs, args.batch_size)]
    params, allocator = add_adalora(model, len(batches) * args.stage2_epochs)
    loss = train_stage(2, model, params, batches, args.stage2_epochs, args, device, progress, allocator)
    print(f"stage 2: {len(recs)} samples, last loss {loss:.3f}")

    model.eval()
    n_test = args.test_users or len(seqs)
    test_users = range(len(seqs)) if n_test >= len(seqs) else rng.sample(range(len(seqs)), n_test)
    systems = {"popularity": popularity_scores(seqs, data["num_items"], args.seed), "SASRec teacher": teacher,
               "P2Rec student": student, "DELRec": model}
    result = test_systems(systems, model, prompts, seqs, test_users, data["num_items"], args, device)
    variant = "DELRec, no stage 1" if args.no_stage1 else "DELRec"
    result[variant] = result.pop("DELRec")
    save_atomic({"args": vars(args), "test_users": len(test_users), "metrics": result},
                os.path.join(out, f"{name}_metrics.json"), meta)
    os.remove(path)
    print(f"{args.candidates} candidates per test user, {len(test_users)} users")
    for name, m in result.items():
        print(f"  {name:20s} " + " ".join(f"{k} {v:.4f}" for k, v in m.items()))


if __name__ == "__main__":
    run_main(main)
