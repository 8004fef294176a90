"""
Stage 3: latent categories from the teacher, then P2Rec's user-level SFT of a LoRA LLM.

Reads  out/<dataset>/dataset.json, out/<dataset>/teacher.pt            (01_prepare.py, 02_teacher.py)
Writes out/<dataset>/categories.pt   k-means category of every item, each user's prior preference
       out/<dataset>/sft_adapter/    the LoRA adapter (PEFT save_pretrained: PeftModel.from_pretrained loads it)
       out/<dataset>/sft_head.pt     category head, item-token projection, settings
       out/<dataset>/sft_metrics.json  validation KL per epoch, LLM time and tokens per epoch, category check

$ python 03_sft.py --data beauty
$ python 03_sft.py --data ml-100k --max-items 20 --epochs 1   # the quick CPU demo (README)

1. k-means (k-means++ init) on the teacher's item embeddings gives every item a latent category.
2. A user's prior preference distribution is the normalised count of their training items per category.
3. ONE sample per user (user-level SFT, not one per prefix): the LLM reads the user's item IDs and a small
   head on the last token's hidden state predicts the distribution; loss = KL(prior || predicted).
   --level instance runs the E4SRec-style baseline instead (one sample per train position, next-item
   cross-entropy over all items through an item head), same prompts and LoRA, for bench_sft.py.
Interrupted? Run the same command again: it resumes from out/<dataset>/sft.ckpt.pt after the last whole epoch.
"""
import argparse
import os
import shutil
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import (LoRALLM, PromptBuilder, UserError, add_common_args, all_reduce_sum, check_made_from,
                    check_positive, compile_blocks, file_fingerprint, llm_fingerprint,
                    load_checkpoint, load_dataset, load_llm, pack_prompts, pick_device, preference_kl, require, run_main,
                    run_settings, save_atomic, save_checkpoint, seed_everything, setup_distributed, split_user,
                    stage_dir, token_batches)


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


def prior_preferences(sequences, item_categories, k):
    """Normalised count of each user's training items per latent category: [users, k]."""
    prior = torch.zeros(len(sequences), k)
    for user, seq in enumerate(sequences):
        train = torch.tensor(split_user(seq)[0])
        prior[user] = torch.bincount(item_categories[train], minlength=k).float()
    return prior / prior.sum(1, keepdim=True)


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


def user_level_samples(sequences, users, builder, max_items, prior):
    """P2Rec: ONE sample per user, its recent training items -> its prior preference distribution."""
    return [builder(split_user(sequences[u])[0][-max_items:]) for u in users], prior[users]


def instance_level_samples(sequences, users, builder, max_items, last_only=False):
    """The E4SRec-style baseline: one sample per (user, position) of the train split, the prefix before
    the position -> the item at it. `last_only` keeps one sample per user (cheap validation)."""
    prompts, targets = [], []
    for u in users:
        train = split_user(sequences[u])[0]
        for t in range(len(train) - 1 if last_only else 1, len(train)):
            prompts.append(builder(train[max(0, t - max_items):t]))
            targets.append(train[t])
    return prompts, torch.tensor(targets)


def sft_loss(log_pred, target):
    """User level: KL(prior || predicted) over the categories; instance level: next-item cross-entropy."""
    if target.dtype == torch.long:
        return F.nll_loss(log_pred, target)
    return preference_kl(log_pred, target)


def prompt_batches(prompts, max_tokens, shuffle, generator=None):
    return token_batches([len(ids) for ids, _ in prompts], max_tokens, shuffle, generator)


def run_epoch(model, prompts, targets, batches, device, opt=None, desc="", rank=0, world=1):
    """One pass over `batches` (lists of sample indices); trains when an optimiser is given.
    Under torchrun each process takes every world-th sample of each batch and DDP averages the gradients,
    so the N processes together make exactly the step one process makes on the whole batch.
    Returns (mean loss, seconds, tokens). Nothing in the loop waits for the GPU."""
    model.train(opt is not None)
    totals, start = torch.zeros(2, device=device), time.time()  # summed loss, tokens
    with torch.set_grad_enabled(opt is not None):
        for batch in tqdm(batches, desc=desc, leave=False):
            shard = batch[rank::world]
            # A batch smaller than the world leaves some processes without samples: they step on one
            # sample weighted 0, as DDP needs every process in every gradient exchange.
            weight = len(shard) * world / len(batch)
            shard = shard or batch[:1]
            packed = pack_prompts([prompts[i] for i in shard], device)
            loss = sft_loss(model(packed), targets[shard].to(device, non_blocking=True)) * weight
            if opt is not None:
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
                opt.step()
            totals[0] += loss.detach() * len(batch) / world
            totals[1] += packed.ids.numel()
    loss_sum, tokens = all_reduce_sum(totals, world).tolist()  # waits for the GPU, once per epoch
    return loss_sum / sum(len(b) for b in batches), time.time() - start, int(tokens)


def fit_max_tokens(model, prompts, targets, max_tokens, device, world=1):
    """On the GPU, shrink the batch budget until a training step on the longest prompts fits in the free
    memory (a 1.5B model does not fit 32k-token batches), instead of failing mid-epoch. Under torchrun all
    processes take the smallest budget any of them found."""
    if device.type != "cuda":
        return max_tokens
    fitted = torch.tensor(largest_fitting_budget(model, prompts, targets, max_tokens, device), device=device)
    if world > 1:
        torch.distributed.all_reduce(fitted, torch.distributed.ReduceOp.MIN)
    return int(fitted)


def largest_fitting_budget(model, prompts, targets, max_tokens, device):
    longest = sorted(range(len(prompts)), key=lambda i: len(prompts[i][0]))[::-1]
    while max_tokens >= len(prompts[longest[0]][0]):
        batch = longest[:max(1, max_tokens // len(prompts[longest[0]][0]))]
        try:
            model.train()
            sft_loss(model(pack_prompts([prompts[i] for i in batch], device)), targets[batch].to(device)).backward()
            model.zero_grad(set_to_none=True)
            return max_tokens
        except torch.OutOfMemoryError:
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            max_tokens //= 2
    raise UserError(f"even one prompt of {len(prompts[longest[0]][0])} tokens does not fit on the GPU: lower --max-items")


def save_adapter(model, path):
    """save_pretrained into a temporary directory, then swap it in, so a crash never leaves half an adapter."""
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.llm.save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, llm=True)
    # latent categories
    parser.add_argument("--k", type=int, default=32, help="latent categories (k-means clusters)")
    parser.add_argument("--kmeans-iters", type=int, default=100, help="most k-means iterations")
    # model / prompt
    parser.add_argument("--level", choices=("user", "instance"), default="user",
                        help="user: P2Rec, one sample per user; instance: the E4SRec-style baseline, one per train position")
    parser.add_argument("--item-repr", choices=("text", "token"), default="text",
                        help="text: the ID written out (measured best, README); token: one new token per item, "
                             "initialised from the teacher embedding (3x less LLM time)")
    parser.add_argument("--max-items", type=int, default=50, help="most recent training items in a user's prompt")
    # training
    parser.add_argument("--epochs", type=int, default=3, help="passes over all users")
    parser.add_argument("--lr", type=float, default=5e-4, help="AdamW learning rate")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="tokens per batch (prompts packed end to end, no padding); default 4096 on CPU, "
                             "32768 on GPU, lowered automatically when the GPU memory is short")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the LLM's blocks (GPU): ~2x faster epochs after a 1-2 min compile, "
                             "so it pays for long runs (README, Speed)")
    parser.add_argument("--val-frac", type=float, default=0.05, help="users held out to measure validation KL")
    # LoRA
    parser.add_argument("--lora-r", type=int, default=8, help="LoRA rank")
    parser.add_argument("--lora-alpha", type=int, default=16, help="LoRA alpha")
    parser.add_argument("--lora-dropout", type=float, default=0.0, help="LoRA dropout (0: a few passes over the users need none, and it costs a copy of every q/v input)")
    parser.add_argument("--lora-targets", default="q_proj,v_proj", help="comma-separated module names that get LoRA")
    args = parser.parse_args()
    device, rank, world = setup_distributed(pick_device(args.device))
    args.max_tokens = args.max_tokens or (32768 if device.type == "cuda" else 4096)
    check_positive(args, "k", "kmeans_iters", "max_items", "epochs", "lr", "max_tokens", "lora_r")
    if not 0 < args.val_frac < 1:
        raise UserError(f"--val-frac must lie between 0 and 1, got {args.val_frac}")
    args.lora_targets = args.lora_targets.split(",")

    data = load_dataset(args)
    out = stage_dir(args)
    teacher_path = require(os.path.join(out, "teacher.pt"), f"python 02_teacher.py --data {args.data}")
    check_made_from(teacher_path + ".meta.json", "dataset_fingerprint", data["fingerprint"],
                    f"the data changed since the teacher was trained: rerun python 02_teacher.py --data {args.data}", args.force)
    if args.k > data["num_items"]:
        raise UserError(f"--k {args.k} is larger than the number of items ({data['num_items']}): choose a smaller --k")
    seed_everything(args.seed)

    # 1-2. latent categories and prior preferences. Rows are L2-normalised: SASRec scores by dot product,
    # so a popular item's long vector would otherwise pull it away from items of the same kind.
    teacher_emb = torch.load(teacher_path, map_location="cpu")["item_emb"].float()
    item_categories = torch.full((data["num_items"] + 1,), -1, dtype=torch.long)
    item_categories[1:] = kmeans(torch.nn.functional.normalize(teacher_emb[1:], dim=1), args.k, args.kmeans_iters, args.seed)
    prior = prior_preferences(data["sequences"], item_categories, args.k)
    check = category_check(data["item_groups"], item_categories, seed=args.seed) if data["item_groups"] else None
    if check:
        print("latent categories vs pre-grouped categories (random item pairs):")
        for key, value in check.items():
            print(f"  {key:36s} {value:.4f}" if isinstance(value, float) else f"  {key:36s} {value}")

    # 3. SFT. User level (P2Rec): one prompt per user. Instance level (the baseline): one per train position.
    base, tokenizer = load_llm(args.llm, device)
    builder = PromptBuilder(tokenizer, args.item_repr)
    users = torch.randperm(len(data["sequences"]), generator=torch.Generator().manual_seed(args.seed)).tolist()
    n_val = max(1, int(len(users) * args.val_frac))
    val_users, train_users = users[:n_val], users[n_val:]
    if args.level == "user":
        train_set = user_level_samples(data["sequences"], train_users, builder, args.max_items, prior)
        val_set = user_level_samples(data["sequences"], val_users, builder, args.max_items, prior)
    else:
        train_set = instance_level_samples(data["sequences"], train_users, builder, args.max_items)
        val_set = instance_level_samples(data["sequences"], val_users, builder, args.max_items, last_only=True)
    num_outputs = args.k if args.level == "user" else data["num_items"] + 1  # item 0 is padding, never a target
    model = LoRALLM(base, num_outputs, args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_targets,
                    teacher_item_emb=teacher_emb if args.item_repr == "token" else None).to(device)
    if args.compile:
        compile_blocks(model.llm)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, fused=device.type == "cuda")
    max_tokens = fit_max_tokens(model, *train_set, args.max_tokens, device, world)
    batch_tokens = max_tokens * world  # every process gets a share of each batch: --max-tokens is per process
    gen = torch.Generator().manual_seed(args.seed)  # the same on every process, so all cut the same batches
    val_batches = prompt_batches(val_set[0], batch_tokens, shuffle=False)
    trained = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    shards = {"rank": rank, "world": world}

    loss_name = "val_kl" if args.level == "user" else "val_ce"
    checkpoint = os.path.join(out, "sft.ckpt.pt")  # a killed run resumes from here
    settings = run_settings(args, dataset_fingerprint=data["fingerprint"], teacher_fingerprint=file_fingerprint(teacher_path),
                            llm=llm_fingerprint(args.llm), processes=world)
    resumed = load_checkpoint(checkpoint, settings, args.force, gen)
    if resumed:
        model.load_state_dict(resumed["trainable"], strict=False)
        opt.load_state_dict(resumed["optimizer"])
        history = resumed["history"]
    else:
        history = [{"epoch": 0, loss_name: run_epoch(model, *val_set, val_batches, device, desc="val", **shards)[0]}]
    print(f"{args.level}-level SFT: {len(train_set[0])} training samples from {len(train_users)} users, "
          f"{len(val_users)} validation users, {args.llm} on {device}, {loss_name} before training {history[0][loss_name]:.4f}")
    for epoch in range(len(history), args.epochs + 1):
        batches = prompt_batches(train_set[0], batch_tokens, shuffle=True, generator=gen)
        train_loss, seconds, tokens = run_epoch(trained, *train_set, batches, device, opt, f"epoch {epoch}", **shards)
        val_loss = run_epoch(model, *val_set, val_batches, device, desc="val", **shards)[0]
        history.append({"epoch": epoch, "train_loss": train_loss, loss_name: val_loss, "train_s": seconds,
                        "tokens": tokens, "samples": len(train_set[0])})
        print(f"epoch {epoch}: train loss {train_loss:.4f}, {loss_name} {val_loss:.4f}, LLM time {seconds:.1f} s, "
              f"{tokens / seconds:.0f} tokens/s")
        if rank == 0:  # every process holds the same weights: one writes
            trainable = {name: p.detach().cpu() for name, p in model.named_parameters() if p.requires_grad}
            save_checkpoint(checkpoint, settings, epoch, gen, trainable=trainable, optimizer=opt.state_dict(),
                            history=history)
    if rank > 0:
        return

    meta = {"args": vars(args), "dataset_fingerprint": data["fingerprint"], "llm": llm_fingerprint(args.llm),
            "teacher_fingerprint": file_fingerprint(teacher_path)}
    save_atomic({"item_categories": item_categories, "prior": prior}, os.path.join(out, "categories.pt"), meta)
    save_adapter(model, os.path.join(out, "sft_adapter"))
    save_atomic({"trainable": model.trainable_state(), "num_outputs": num_outputs, "args": vars(args),
                 "teacher_item_emb": teacher_emb}, os.path.join(out, "sft_head.pt"), meta)
    save_atomic({"history": history, "category_check": check}, os.path.join(out, "sft_metrics.json"), meta)
    os.remove(checkpoint)
    print(f"sft: {loss_name} {history[0][loss_name]:.4f} -> {history[-1][loss_name]:.4f} over {args.epochs} epochs, "
          f"{sum(h.get('train_s', 0) for h in history) / args.epochs:.1f} s LLM time per epoch; "
          f"next: python 04_embed.py --data {args.data}")


if __name__ == "__main__":
    run_main(main)
