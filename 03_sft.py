"""
Stage 3: latent categories from the teacher, then P2Rec's user-level SFT of a LoRA LLM.

Reads  out/<dataset>/dataset.json, out/<dataset>/teacher.pt            (01_prepare.py, 02_teacher.py)
Writes out/<dataset>/categories.pt   k-means category of every item, each user's prior preference
       out/<dataset>/sft_adapter/    the LoRA adapter (PEFT save_pretrained: PeftModel.from_pretrained loads it)
       out/<dataset>/sft_head.pt     category head, item tokens, settings
       out/<dataset>/sft_metrics.json  validation KL per epoch beside two reference predictors, LLM time, category check
       (--item-repr title, beyond the paper's ID-only setting: sft_adapter_title/, sft_head_title.pt, sft_metrics_title.json,
       beside the ID-only SFT's files, so that 05_student.py can compare the two)

$ python 03_sft.py --data beauty
$ torchrun --standalone --nproc_per_node 2 03_sft.py --data beauty    # several GPUs: each takes part of every batch

1. Latent categories: k-means (k-means++ init) on the teacher's item embeddings gives every item a category.
2. Prior preferences: a user's distribution is the normalised count of their training items per category.
3. Samples: ONE per user (user-level SFT, not one per prefix): the LLM reads the user's item IDs (by default one
   new token per item, learned from scratch; --item-repr text writes them in digits) and a small
   head on the last token's hidden state predicts the distribution; loss = KL(prior || predicted).
   The same forward pass also scores every prefix of the prompt: at each item's last token the head predicts the
   distribution of the items so far (--prefix-weight), so the LLM must parse the latent category of each item.
   --level instance runs the E4SRec-style baseline instead (one sample per train position, next-item
   cross-entropy over all items through an item head), same prompts and LoRA, for bench_sft.py.
4. Training: AdamW with warm-up and cosine decay; the epoch with the lowest validation KL is kept (early stop).
5. Saving: the adapter, head and item tokens of that epoch, the categories, and the KL curve.
Interrupted? Run the same command again: it resumes from out/<dataset>/sft.ckpt.pt after the last whole epoch.
"""
import argparse
import math
import os
import shutil
import time
from typing import NamedTuple

import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import (ITEM_REPRS, LoRALLM, PromptBuilder, UserError, add_common_args, all_reduce_sum, available_memory,
                    check_positive, compile_blocks, current_teacher, file_fingerprint, llm_fingerprint, load_checkpoint,
                    load_dataset, load_artifact, load_llm, pack_prompts, pick_device, preference_kl, run_main,
                    run_settings, save_atomic, save_checkpoint, seed_everything, setup_distributed, sft_files, split_user,
                    stage_dir, token_batches)


def add_sft_args(parser):
    """The SFT options, one per line; bench_sft.py takes the same ones, so it times the settings that train."""
    # latent categories
    parser.add_argument("--k", type=int, default=32, help="latent categories (k-means clusters)")
    parser.add_argument("--kmeans-iters", type=int, default=100, help="most k-means iterations")
    # samples and prompts
    # One new token per item is the default: on the students' validation it ties text IDs on Beauty and beats
    # them on ml-100k, and its prompts are 2.3x shorter, so an epoch costs 41% less LLM time (RESULTS.md).
    parser.add_argument("--item-repr", choices=ITEM_REPRS, default="item-token",
                        help="how an item ID enters the LLM: item-token (one new token per item, learned from scratch, "
                             "nothing from the teacher), text (digits, the paper's prompts), code (fixed-width digits), "
                             "teacher-token (projected teacher embedding) or, beyond the paper's ID-only setting, title "
                             "(each item's title, where the dataset has titles: ml-100k)")
    parser.add_argument("--max-items", type=int, default=50, help="most recent training items in a user's prompt")
    parser.add_argument("--prefix-weight", type=float, default=0.25,
                        help="weight of each user's mean KL over its prefixes, read at each item's last token (0: the user-level KL alone)")
    # training
    parser.add_argument("--epochs", type=int, default=14, help="most passes over all users (the cosine decay ends here)")
    parser.add_argument("--patience", type=int, default=2, help="stop after this many epochs without a lower validation KL")
    parser.add_argument("--lr", type=float, default=None,
                        help="AdamW peak learning rate; default 1e-3 x sqrt(batch tokens / 8192), the square-root rule for "
                             "Adam: 2e-3 at the GPU's 32768 tokens, 1e-3 at 8192")
    parser.add_argument("--lr-schedule", choices=("cosine", "constant"), default="cosine",
                        help="cosine: linear warm-up over the first 3%% of steps, then cosine decay to 0 at --epochs")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="tokens per batch (prompts packed end to end, no padding); default 4096 on CPU, on GPU 32768 "
                             "but at most 1/32 of an epoch's tokens; lowered automatically when the GPU memory is short")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the LLM's blocks (GPU): faster epochs after a 1-2 min compile")
    parser.add_argument("--checkpointing", action="store_true",
                        help="activation checkpointing: recompute each block in the backward pass (7B-class LLMs)")
    # LoRA
    parser.add_argument("--lora-r", type=int, default=16, help="LoRA rank")
    parser.add_argument("--lora-alpha", type=int, default=32, help="LoRA alpha")
    parser.add_argument("--lora-dropout", type=float, default=0.0, help="LoRA dropout (0: it costs a copy of every adapted input)")
    parser.add_argument("--lora-targets", default="all-linear",
                        help="all-linear (attention and MLP: the LLM must memorise every item's category) or "
                             "comma-separated module names, such as q_proj,v_proj")


def batch_defaults(args, device, prompts, config, world=1):
    """--max-tokens and --lr where not given. On a GPU a small LLM's step costs about the same for 8k or 32k
    tokens (it is bound by kernel launches), so the GPU takes 32k-token batches, but never more than 1/32 of an
    epoch's tokens (nor less than the longest prompt): a small dataset still gets 32 optimiser steps per epoch
    (ml-100k got 6 and fitted worse). On a CPU, 4096 tokens, or fewer where the RAM at hand holds fewer. The
    learning rate grows with the square root of the whole batch, from 1e-3 at 8192 tokens."""
    longest = max(len(p.ids) for p in prompts)
    if args.max_tokens is None:
        per_step = max(longest, sum(len(p.ids) for p in prompts) // (32 * world))
        args.max_tokens = min(32768, per_step) if device.type == "cuda" else 4096
        if device.type == "cpu":
            args.max_tokens = cpu_batch_that_fits(args.max_tokens, longest, config)
    elif device.type == "cpu":
        check_cpu_batch(args.max_tokens, longest, config)
    args.lr = args.lr or 1e-3 * math.sqrt(args.max_tokens * world / 8192)


def cpu_step_bytes(tokens, config):
    """Peak memory of a CPU training step beyond the weights. Every adapted layer keeps its input and its LoRA
    path's for the backward pass, in fp32: about 40 floats per hidden unit and 6 per MLP unit, per token and
    layer, fitted to SmolLM2-135M with LoRA on all linear layers (a 4096-token step peaked at 15.7 GB)."""
    mlp = getattr(config, "intermediate_size", None) or 4 * config.hidden_size
    return 4 * tokens * config.num_hidden_layers * (40 * config.hidden_size + 6 * mlp)


def cpu_batch_that_fits(max_tokens, longest, config):
    """Halve the default CPU batch until a step fits in 80% of the available RAM, saying so."""
    free = available_memory(torch.device("cpu"))
    fitted = max_tokens
    while free is not None and fitted > longest and cpu_step_bytes(fitted, config) > 0.8 * free:
        fitted //= 2
    if fitted != max_tokens:
        print(f"--max-tokens {fitted}: a step of {max_tokens} tokens needs about "
              f"{cpu_step_bytes(max_tokens, config) / 2**30:.1f} GiB and {free / 2**30:.1f} GiB of RAM is available")
    check_cpu_batch(max(fitted, longest), longest, config)
    return max(fitted, longest)


def check_cpu_batch(max_tokens, longest, config):
    """Refuse, before training, a CPU batch budget whose step cannot fit in the available RAM."""
    free = available_memory(torch.device("cpu"))
    need = cpu_step_bytes(max(max_tokens, longest), config)
    if free is not None and need > 0.8 * free:
        fits = int(0.8 * free / cpu_step_bytes(1, config))
        fix = (f"pass --max-tokens {fits} or less" if fits >= longest else
               f"lower --max-items (the longest prompt has {longest} tokens) or use a smaller LLM")
        raise UserError(f"a training step of {max(max_tokens, longest)} tokens needs about {need / 2**30:.1f} GiB "
                        f"and {free / 2**30:.1f} GiB of RAM is available: {fix}")


def check_sft_args(args):
    check_positive(args, "k", "kmeans_iters", "max_items", "epochs", "patience", "lora_r")
    for optional in ("max_tokens", "lr"):
        if getattr(args, optional) is not None:
            check_positive(args, optional)
    if args.prefix_weight < 0:
        raise UserError(f"--prefix-weight must be 0 or more, got {args.prefix_weight}")
    if args.lora_targets != "all-linear":
        args.lora_targets = args.lora_targets.split(",")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, llm=True)
    add_sft_args(parser)
    parser.add_argument("--level", choices=("user", "instance"), default="user",
                        help="user: P2Rec, one sample per user; instance: the E4SRec-style baseline, one per train position")
    parser.add_argument("--val-frac", type=float, default=0.05, help="users held out to measure validation KL")
    args = parser.parse_args()
    check_sft_args(args)
    if not 0 < args.val_frac < 1:
        raise UserError(f"--val-frac must lie between 0 and 1, got {args.val_frac}")
    return args


# ----------------------------------------------------------------------------- 1-2. latent categories, priors

def kmeans(x, k, iters, seed):
    """Plain k-means with k-means++ initialisation; returns each row's cluster in 0..k-1."""
    gen = torch.Generator().manual_seed(seed)
    centers = x[torch.randint(len(x), (1,), generator=gen)]
    closest = torch.cdist(x, centers).squeeze(1) ** 2
    for _ in range(1, k):  # k-means++: next center drawn with probability proportional to squared distance
        pick = torch.multinomial(closest, 1, generator=gen)
        centers = torch.cat([centers, x[pick]])
        closest = torch.minimum(closest, torch.cdist(x, x[pick]).squeeze(1) ** 2)
    assign = torch.cdist(x, centers).argmin(1)
    for _ in range(iters):
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(centers).index_add_(0, assign, x)
        centers = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centers)
        new_assign = torch.cdist(x, centers).argmin(1)
        if torch.equal(new_assign, assign):
            break
        assign = new_assign
    return assign


def latent_categories(teacher_emb, k, iters, seed):
    """Category 0..k-1 of every item (-1 for padding). Rows are L2-normalised: SASRec scores by dot product,
    so a popular item's long vector would otherwise pull it away from items of the same kind."""
    item_categories = torch.full((len(teacher_emb),), -1, dtype=torch.long)
    item_categories[1:] = kmeans(F.normalize(teacher_emb[1:].float(), dim=1), k, iters, seed)
    return item_categories


def prior_preferences(sequences, item_categories, k):
    """Normalised count of each user's training items per latent category: [users, k]."""
    prior = torch.zeros(len(sequences), k)
    for user, seq in enumerate(sequences):
        train = torch.tensor(split_user(seq)[0])
        prior[user] = torch.bincount(item_categories[train], minlength=k).float()
    return prior / prior.sum(1, keepdim=True)


def reference_kls(prior, train_users, val_users):
    """What the SFT must beat: the validation KL of predicting the uniform distribution for everybody, and of
    predicting the training users' mean prior for everybody (the best guess that ignores which items a user has)."""
    val = prior[val_users]
    uniform = torch.full_like(val, 1 / val.shape[1])
    mean_prior = prior[train_users].mean(0, keepdim=True).expand_as(val)
    return {"uniform_kl": preference_kl(uniform.log(), val).item(),
            "mean_prior_kl": preference_kl(mean_prior.clamp(min=1e-12).log(), val).item()}


def category_check(item_groups, item_categories, pairs=200_000, seed=0):
    """The paper's Fig. 5: for random item pairs, how often the pre-grouped categories (attributes, genres)
    and the latent k-means categories agree, against chance."""
    items = torch.tensor([i for i, g in enumerate(item_groups) if g])
    gen = torch.Generator().manual_seed(seed)
    a, b = items[torch.randint(len(items), (2, pairs), generator=gen)]
    keep = a != b
    a, b = a[keep].tolist(), b[keep].tolist()
    group_sets = [set(g) for g in item_groups]
    same_group = torch.tensor([bool(group_sets[i] & group_sets[j]) for i, j in zip(a, b)])
    same_latent = item_categories[a] == item_categories[b]
    table = {"pairs": len(a),
             "same group, same latent": (same_group & same_latent).float().mean().item(),
             "same group, different latent": (same_group & ~same_latent).float().mean().item(),
             "different group, same latent": (~same_group & same_latent).float().mean().item(),
             "different group, different latent": (~same_group & ~same_latent).float().mean().item(),
             "P(same latent | same group)": same_latent[same_group].float().mean().item(),
             "P(same latent | different group)": same_latent[~same_group].float().mean().item(),
             "P(same latent) (chance)": same_latent.float().mean().item()}
    table["lift over chance"] = table["P(same latent | same group)"] / max(table["P(same latent) (chance)"], 1e-12)
    return table


# ----------------------------------------------------------------------------- 3. samples

class Samples(NamedTuple):
    """Prompts and their targets: prior distributions [n, k] (user level) or next items [n] (instance level);
    at user level also, per prompt, the distribution of every prefix of its items ([items in prompt, k])."""
    prompts: list
    targets: torch.Tensor
    prefix_targets: list = None


def prefix_distributions(categories, k):
    """Row j: the normalised category counts of items 0..j. [len(categories), k]"""
    counts = F.one_hot(torch.tensor(categories), k).float().cumsum(0)
    return counts / counts.sum(1, keepdim=True)


def user_level_samples(sequences, users, builder, max_items, prior, item_categories):
    """P2Rec: ONE sample per user, its recent training items -> its prior preference distribution."""
    recent = [split_user(sequences[u])[0][-max_items:] for u in users]
    k = prior.shape[1]
    return Samples([builder(items) for items in recent], prior[users],
                   [prefix_distributions(item_categories[items].tolist(), k) for items in recent])


def instance_level_samples(sequences, users, builder, max_items, last_only=False):
    """The E4SRec-style baseline: one sample per (user, position) of the train split, the prefix before
    the position -> the item at it. `last_only` keeps one sample per user (cheap validation)."""
    prompts, targets = [], []
    for u in users:
        train = split_user(sequences[u])[0]
        for t in range(len(train) - 1 if last_only else 1, len(train)):
            prompts.append(builder(train[max(0, t - max_items):t]))
            targets.append(train[t])
    return Samples(prompts, torch.tensor(targets))


def split_users(num_users, val_frac, seed):
    users = torch.randperm(num_users, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, int(num_users * val_frac))
    return users[n_val:], users[:n_val]


# ----------------------------------------------------------------------------- 4. training

def batch_loss(model, samples, shard, packed, device, prefix_weight):
    """Summed loss of the shard's samples: per user, KL(prior || predicted) plus prefix_weight times the mean KL
    over the user's prefixes (each user counts once, however many items it has); or the next-item cross-entropy
    at instance level."""
    targets = samples.targets[shard].to(device, non_blocking=True)
    if samples.prefix_targets is None:
        return F.nll_loss(model(packed), targets, reduction="sum")
    if prefix_weight == 0:
        return F.kl_div(model(packed), targets, reduction="sum")
    ends = [samples.prompts[i].item_ends for i in shard]
    starts = torch.tensor([0] + [len(samples.prompts[i].ids) for i in shard]).cumsum(0)  # on the CPU: no GPU wait
    positions = torch.cat([start + torch.tensor(e) for start, e in zip(starts, ends)]).to(device, non_blocking=True)
    per_user_mean = torch.cat([torch.full((len(e),), 1 / max(1, len(e))) for e in ends]).to(device, non_blocking=True)
    prefix = torch.cat([samples.prefix_targets[i] for i in shard]).to(device, non_blocking=True)
    last, at_items = model(packed, positions)
    prefix_kl = (F.kl_div(at_items, prefix, reduction="none").sum(1) * per_user_mean).sum()
    return F.kl_div(last, targets, reduction="sum") + prefix_weight * prefix_kl


def run_epoch(model, samples, batches, device, opt=None, schedule=None, desc="", rank=0, world=1, prefix_weight=0.0):
    """One pass over `batches` (lists of sample indices); trains when an optimiser is given. Returns
    (mean loss per user, seconds, tokens). The loss is what was optimised: in training the user-level KL plus
    the weighted per-prefix KL; without an optimiser (validation) the user-level KL alone, what P2Rec reconstructs.
    Under torchrun each process takes every world-th sample of each batch and DDP averages the gradients,
    so the N processes together make exactly the step one process makes on the whole batch.
    Nothing in the loop waits for the GPU."""
    model.train(opt is not None)
    totals, start = torch.zeros(2, device=device), time.time()  # summed loss, tokens
    with torch.set_grad_enabled(opt is not None):
        for batch in tqdm(batches, desc=desc, leave=False):
            shard = batch[rank::world]
            # A batch smaller than the world leaves some processes without samples: they step on one
            # sample weighted 0, as DDP needs every process in every gradient exchange.
            weight = world / len(batch) if shard else 0.0
            shard = shard or batch[:1]
            packed = pack_prompts([samples.prompts[i] for i in shard], device)
            loss = batch_loss(model, samples, shard, packed, device, prefix_weight if opt else 0.0) * weight
            if opt is not None:
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
                opt.step()
                schedule.step()
            totals[0] += loss.detach() * len(batch) / world
            totals[1] += packed.ids.numel()
    loss_sum, tokens = all_reduce_sum(totals, world).tolist()  # waits for the GPU, once per epoch
    return loss_sum / sum(len(b) for b in batches), time.time() - start, int(tokens)


def prompt_batches(prompts, max_tokens, shuffle, generator=None):
    return token_batches([len(p.ids) for p in prompts], max_tokens, shuffle, generator)


def fit_max_tokens(model, samples, max_tokens, device, world=1):
    """On the GPU, shrink the batch budget until a training step on the longest prompts fits in the free
    memory (a 1.5B model does not fit 32k-token batches), instead of failing mid-epoch. Under torchrun all
    processes take the smallest budget any of them found."""
    if device.type != "cuda":
        return max_tokens
    fitted = torch.tensor(largest_fitting_budget(model, samples, max_tokens, device), device=device)
    if world > 1:
        torch.distributed.all_reduce(fitted, torch.distributed.ReduceOp.MIN)
    return int(fitted)


def largest_fitting_budget(model, samples, max_tokens, device):
    longest = sorted(range(len(samples.prompts)), key=lambda i: len(samples.prompts[i].ids))[::-1]
    longest_tokens = len(samples.prompts[longest[0]].ids)
    while max_tokens >= longest_tokens:
        batch = longest[:max(1, max_tokens // longest_tokens)]
        try:
            model.train()
            packed = pack_prompts([samples.prompts[i] for i in batch], device)
            batch_loss(model, samples, batch, packed, device, 1.0).backward()
            model.zero_grad(set_to_none=True)
            return max_tokens
        except torch.OutOfMemoryError:
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            max_tokens //= 2
    raise UserError(f"even one prompt of {longest_tokens} tokens does not fit on the GPU: lower --max-items")


def prepare_llm(model, args):
    """Activation checkpointing and torch.compile, as asked (both off by default)."""
    if args.checkpointing:
        # Non-reentrant: the inputs are embeddings of frozen tables, which the reentrant variant would leave
        # without gradients (and the LoRA weights with none).
        model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.compile:
        compile_blocks(model.llm)


def warmup_cosine(total_steps, kind):
    """Learning-rate factor per step: linear warm-up over the first 3% of steps, then cosine decay to 0."""
    warmup = max(1, int(0.03 * total_steps))
    if kind == "constant":
        return lambda step: min(1.0, (step + 1) / warmup)
    return lambda step: min((step + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps)))


def trainable_tensors(model):
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad}


def train(model, train_set, val_set, args, device, shards, checkpoint, settings, refs):
    """Epochs until --epochs or --patience epochs without a lower validation loss; the model ends holding the
    best epoch's weights. Returns the history (epoch 0: before training)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, fused=device.type == "cuda")
    world = shards["world"]
    max_tokens = fit_max_tokens(model, train_set, args.max_tokens, device, world)
    batch_tokens = max_tokens * world  # every process gets a share of each batch: --max-tokens is per process
    gen = torch.Generator().manual_seed(args.seed)  # the same on every process, so all cut the same batches
    steps_per_epoch = len(prompt_batches(train_set.prompts, batch_tokens, shuffle=False))
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(steps_per_epoch * args.epochs, args.lr_schedule))
    val_batches = prompt_batches(val_set.prompts, batch_tokens, shuffle=False)
    trained = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    loss_name = "val_kl" if args.level == "user" else "val_ce"

    def validate():
        return run_epoch(model, val_set, val_batches, device, desc="val", **shards)[0]

    resumed = load_checkpoint(checkpoint, settings, args.force, [gen])
    if resumed:
        model.load_state_dict(resumed["trainable"], strict=False)
        opt.load_state_dict(resumed["optimizer"])
        schedule.load_state_dict(resumed["schedule"])
        history, best = resumed["history"], resumed["best"]
    else:
        val_loss = validate()
        history = [{"epoch": 0, loss_name: val_loss, **gap_closed(val_loss, refs)}]
        best = {"epoch": 0, "loss": val_loss, "weights": trainable_tensors(model)}
    print_start(args, train_set, val_set, device, history[0], loss_name)
    for epoch in range(len(history), args.epochs + 1):
        if epoch - best["epoch"] > args.patience:
            print(f"early stop: no lower {loss_name} for {args.patience} epochs")
            break
        batches = prompt_batches(train_set.prompts, batch_tokens, shuffle=True, generator=gen)
        train_loss, seconds, tokens = run_epoch(trained, train_set, batches, device, opt, schedule, f"epoch {epoch}",
                                                prefix_weight=args.prefix_weight, **shards)
        val_loss = validate()
        history.append({"epoch": epoch, "train_loss": train_loss, loss_name: val_loss, **gap_closed(val_loss, refs),
                        "train_s": seconds, "tokens": tokens, "samples": len(train_set.prompts)})
        weights = trainable_tensors(model)  # one CPU copy serves the best-so-far and the checkpoint
        if val_loss < best["loss"]:
            best = {"epoch": epoch, "loss": val_loss, "weights": weights}
        print(f"epoch {epoch}: train loss {train_loss:.4f}, {loss_name} {val_loss:.4f}{gap_text(history[-1], refs)}, "
              f"LLM time {seconds:.1f} s, {tokens / seconds:.0f} tokens/s")
        if shards["rank"] == 0:  # every process holds the same weights: one writes
            save_checkpoint(checkpoint, settings, epoch, [gen], trainable=weights,
                            optimizer=opt.state_dict(), schedule=schedule.state_dict(), history=history, best=best)
    model.load_state_dict(best["weights"], strict=False)
    return history, best["epoch"]


def gap_closed(val_kl, refs):
    """Share of the way from the mean-prior predictor's KL down to 0 that the LLM has gone (user level)."""
    return {} if refs is None else {"gap_closed": 1 - val_kl / refs["mean_prior_kl"]}


def gap_text(entry, refs):
    if refs is None:
        return ""
    return f" (uniform {refs['uniform_kl']:.4f}, mean prior {refs['mean_prior_kl']:.4f}: {100 * entry['gap_closed']:.0f}% of the gap closed)"


def print_start(args, train_set, val_set, device, first, loss_name):
    print(f"{args.level}-level SFT: {len(train_set.prompts)} training samples, {len(val_set.prompts)} validation "
          f"samples, {args.llm} on {device}, items as {args.item_repr}, {loss_name} before training {first[loss_name]:.4f}")


# ----------------------------------------------------------------------------- 5. saving

def save_adapter(model, path):
    """save_pretrained into a temporary directory, then swap it in, so a crash never leaves half an adapter."""
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.llm.save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def save_artifacts(out, model, args, inputs, categories, history, best_epoch, refs, num_outputs):
    meta = {"args": vars(args), "dataset_fingerprint": inputs["data"]["fingerprint"], "llm": llm_fingerprint(args.llm),
            "teacher_fingerprint": file_fingerprint(inputs["teacher_path"])}
    files = sft_files(args.item_repr)
    # The SFT by titles writes the same categories (same teacher, k and seed give the same bytes) as the ID-only one.
    save_atomic({"item_categories": categories["item_categories"], "prior": categories["prior"]},
                os.path.join(out, "categories.pt"), meta)
    save_adapter(model, os.path.join(out, files["adapter"]))
    teacher_emb = inputs["teacher_emb"] if args.item_repr == "teacher-token" else None
    save_atomic({"trainable": model.trainable_state(), "num_outputs": num_outputs, "num_items": inputs["data"]["num_items"],
                 "args": vars(args), "teacher_item_emb": teacher_emb}, os.path.join(out, files["head"]), meta)
    save_atomic({"history": history, "best_epoch": best_epoch, "references": refs, "category_check": categories["check"]},
                os.path.join(out, files["metrics"]), meta)


# ----------------------------------------------------------------------------- main

def load_inputs(args):
    """The dataset and the teacher's item embeddings, checked to belong together."""
    data = load_dataset(args)
    teacher_path = current_teacher(args, data)
    if args.k > data["num_items"]:
        raise UserError(f"--k {args.k} is larger than the number of items ({data['num_items']}): choose a smaller --k")
    teacher_emb = load_artifact(teacher_path)["item_emb"].float()
    return {"data": data, "teacher_path": teacher_path, "teacher_emb": teacher_emb}


def categories_and_priors(args, inputs):
    """Steps 1-2: every item's latent category, every user's prior preference, and the check against the data's
    own groups (the paper's Fig. 5) where it has them."""
    data = inputs["data"]
    item_categories = latent_categories(inputs["teacher_emb"], args.k, args.kmeans_iters, args.seed)
    check = category_check(data["item_groups"], item_categories, seed=args.seed) if data["item_groups"] else None
    if check:
        print(f"latent categories vs pre-grouped ones: P(same latent | same group) {check['P(same latent | same group)']:.3f}, "
              f"chance {check['P(same latent) (chance)']:.3f}, lift {check['lift over chance']:.2f}")
    return {"item_categories": item_categories, "prior": prior_preferences(data["sequences"], item_categories, args.k),
            "check": check}


def build_samples(args, data, tokenizer, categories):
    """Step 3: (train set, validation set, reference KLs): user level (P2Rec), one prompt per user; instance
    level (the baseline), one per train position."""
    builder = PromptBuilder(tokenizer, args.item_repr, data["num_items"], data.get("item_titles"))
    train_users, val_users = split_users(len(data["sequences"]), args.val_frac, args.seed)
    if args.level == "instance":
        return (instance_level_samples(data["sequences"], train_users, builder, args.max_items),
                instance_level_samples(data["sequences"], val_users, builder, args.max_items, last_only=True), None)
    prior = categories["prior"]
    train_set, val_set = (user_level_samples(data["sequences"], users, builder, args.max_items, prior,
                                             categories["item_categories"]) for users in (train_users, val_users))
    return train_set, val_set, reference_kls(prior, train_users, val_users)


def main():
    args = parse_args()
    device, rank, world = setup_distributed(pick_device(args.device))
    inputs = load_inputs(args)
    data, out = inputs["data"], stage_dir(args)
    PromptBuilder.check_titles(args.item_repr, data.get("item_titles"))
    seed_everything(args.seed)

    categories = categories_and_priors(args, inputs)
    base, tokenizer = load_llm(args.llm, device)
    train_set, val_set, refs = build_samples(args, data, tokenizer, categories)
    batch_defaults(args, device, train_set.prompts, base.config, world)
    num_outputs = args.k if args.level == "user" else data["num_items"] + 1  # item 0 is padding, never a target
    model = LoRALLM(base, num_outputs, args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_targets,
                    item_repr=args.item_repr, num_items=data["num_items"], teacher_item_emb=inputs["teacher_emb"]).to(device)
    prepare_llm(model, args)

    checkpoint = os.path.join(out, sft_files(args.item_repr)["checkpoint"])  # a killed run resumes from here
    settings = run_settings(args, dataset_fingerprint=data["fingerprint"], llm=llm_fingerprint(args.llm),
                            teacher_fingerprint=file_fingerprint(inputs["teacher_path"]), processes=world)
    history, best_epoch = train(model, train_set, val_set, args, device, {"rank": rank, "world": world}, checkpoint,
                                settings, refs)
    if rank > 0:
        return
    save_artifacts(out, model, args, inputs, categories, history, best_epoch, refs, num_outputs)
    os.remove(checkpoint)
    print_summary(args, history, best_epoch, refs)


def print_summary(args, history, best_epoch, refs):
    loss_name = "val_kl" if args.level == "user" else "val_ce"
    trained_epochs = [h for h in history if "train_s" in h]
    print(f"sft: {loss_name} {history[0][loss_name]:.4f} -> {history[best_epoch][loss_name]:.4f} (best epoch {best_epoch} "
          f"of {len(trained_epochs)}){gap_text(history[best_epoch], refs)}; LLM time "
          f"{sum(h['train_s'] for h in trained_epochs):.1f} s; next: python 04_embed.py --data {args.data}")


if __name__ == "__main__":
    run_main(main)
