"""
Stage 5: train future SRS models with and without the LLM-enhanced item embeddings.

Reads  out/<dataset>/dataset.json, out/<dataset>/item_emb.pt        (01_prepare.py, 04_embed.py)
Writes out/<dataset>/results.json   test metrics of every (model, variant, seed), with validation and history
       out/<dataset>/results.md     the vanilla-vs-enhanced table (mean, and spread over seeds)
       out/<dataset>/student.pt     the enhanced SASRec of the first seed (for the baselines' side-by-side)

$ python 05_student.py --data beauty --seeds 42 43 44
Each pair (vanilla, enhanced) shares the seed and every setting. The enhanced model's item table
(--fuse init, the default) starts from the top principal components of the standardised LLM
embeddings instead of random numbers, then trains like the vanilla one; --fuse add keeps the LLM
embeddings frozen and adds a learned projection of them to the ID embedding (measured worse, README).
"""
import argparse
import os
import statistics

import torch
import torch.nn as nn

from common import (KS, LLMItemEmbedding, SASRec, UserError, add_common_args, add_train_args, check_made_from,
                    check_positive, file_fingerprint, format_metrics, load_dataset, pick_device, require,
                    run_main, save_atomic, seed_everything, stage_dir, train_recommender)

METRICS = [f"{m}@{k}" for m in ("HR", "NDCG") for k in KS]


class GRU4Rec(nn.Module):
    """GRU4Rec (Hidasi et al., ICLR 2016) with full-softmax cross-entropy: a GRU over the item embeddings,
    scored against the same item table. Left padding feeds zero vectors first, which the GRU learns to
    treat as 'nothing yet'."""

    def __init__(self, num_items, dim=64, dropout=0.5, llm_item_emb=None, fuse="init"):
        super().__init__()
        self.items = LLMItemEmbedding(num_items, dim, llm_item_emb, fuse)
        self.drop = nn.Dropout(dropout)
        self.gru = nn.GRU(dim, dim, batch_first=True)

    def item_table(self):
        return self.items.table()

    def forward(self, seq, table=None):
        table = self.item_table() if table is None else table
        return self.gru(self.drop(table[seq]))[0]


def build_model(name, num_items, args, llm_item_emb):
    if name == "sasrec":
        return SASRec(num_items, args.dim, args.blocks, args.heads, args.maxlen, args.dropout, llm_item_emb, args.fuse)
    return GRU4Rec(num_items, args.dim, args.dropout, llm_item_emb, args.fuse)


def markdown_table(runs, dataset):
    """Mean (± std over seeds when there are several) of each test metric, vanilla vs enhanced, and the lift."""
    lines = [f"Test split of {dataset}, full ranking over all items (history not masked).", "",
             "| model | variant | seeds | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 3) + "|"]
    for model in dict.fromkeys(r["model"] for r in runs):
        means = {}
        for variant in ("vanilla", "enhanced"):
            values = {m: [r["test"][m] for r in runs if r["model"] == model and r["variant"] == variant] for m in METRICS}
            means[variant] = {m: statistics.mean(v) for m, v in values.items()}
            cells = [f"{means[variant][m]:.4f}" + (f" ± {statistics.stdev(v):.4f}" if len(v) > 1 else "")
                     for m, v in values.items()]
            lines.append(f"| {model} | {variant} | {len(values[METRICS[0]])} | " + " | ".join(cells) + " |")
        lift = [f"{100 * (means['enhanced'][m] / means['vanilla'][m] - 1):+.1f}%" for m in METRICS]
        lines.append(f"| {model} | lift | | " + " | ".join(lift) + " |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, seed=False)
    add_train_args(parser, epochs=40)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42], help="one vanilla/enhanced pair per model and seed")
    parser.add_argument("--models", default="sasrec,gru4rec", help="comma-separated: sasrec, gru4rec")
    parser.add_argument("--fuse", choices=("init", "add"), default="init",
                        help="init: ID embeddings start from the LLM embeddings; add: ID + projected frozen LLM embedding")
    parser.add_argument("--blocks", type=int, default=2, help="SASRec self-attention blocks")
    parser.add_argument("--heads", type=int, default=1, help="SASRec attention heads")
    args = parser.parse_args()
    check_positive(args, "epochs", "batch_size", "lr", "maxlen", "dim", "blocks", "heads")
    models = args.models.split(",")
    unknown = [m for m in models if m not in ("sasrec", "gru4rec")]
    if unknown:
        raise UserError(f"unknown --models entry {unknown[0]}: choose from sasrec, gru4rec")

    data = load_dataset(args)
    out = stage_dir(args)
    emb_path = require(os.path.join(out, "item_emb.pt"), f"python 04_embed.py --data {args.data}")
    check_made_from(emb_path + ".meta.json", "dataset_fingerprint", data["fingerprint"],
                    f"the data changed since the embeddings were made: rerun stages 02-04 for --data {args.data}", args.force)
    sft_path = require(os.path.join(out, "sft_head.pt"), f"python 03_sft.py --data {args.data}")
    check_made_from(emb_path + ".meta.json", "sft_fingerprint", file_fingerprint(sft_path),
                    f"03_sft.py ran again after the embeddings were made: rerun python 04_embed.py --data {args.data}", args.force)
    llm_item_emb = torch.load(emb_path, map_location="cpu")
    if llm_item_emb.shape[0] != data["num_items"] + 1:
        raise UserError(f"{emb_path} has {llm_item_emb.shape[0] - 1} items, the dataset {data['num_items']}: rerun 04_embed.py")
    device = pick_device(args.device)

    runs = []
    for model_name in models:
        for seed in args.seeds:
            for variant, emb in (("vanilla", None), ("enhanced", llm_item_emb)):
                seed_everything(seed)  # same initial ID embeddings and batches for both variants
                model = build_model(model_name, data["num_items"], args, emb)
                args.seed = seed
                result = train_recommender(model, data["sequences"], args, device, desc=f"{model_name} {variant} s{seed}")
                runs.append({"model": model_name, "variant": variant, "seed": seed, **result})
                print(f"{model_name:8s} {variant:8s} seed {seed}: best epoch {result['best_epoch']:3d}, test {format_metrics(result['test'])}")
                if (model_name, variant, seed) == ("sasrec", "enhanced", args.seeds[0]):
                    save_atomic({"state": model.state_dict(), "args": vars(args)}, os.path.join(out, "student.pt"))

    meta = {"args": vars(args), "dataset_fingerprint": data["fingerprint"], "item_emb_fingerprint": file_fingerprint(emb_path)}
    save_atomic({"runs": runs}, os.path.join(out, "results.json"), meta)
    table = markdown_table(runs, args.data)
    save_atomic(table, os.path.join(out, "results.md"))
    print("\n" + table)


if __name__ == "__main__":
    run_main(main)
