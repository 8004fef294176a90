"""
Stage 2: train the SASRec teacher whose item embeddings define P2Rec's latent categories.

Reads  out/<dataset>/dataset.json                       (01_prepare.py)
Writes out/<dataset>/teacher.pt        model weights, its item embedding table and its settings
       out/<dataset>/teacher_metrics.json  best epoch, validation and test metrics, per-epoch history

$ python 02_teacher.py --data beauty
$ python 02_teacher.py --data beauty --loss bce     # SASRec's original loss, one sampled negative per position
$ python 02_teacher.py --data beauty --loss bce --name teacher_bce  # beside teacher.pt: the papers' SASRec, which
                                                                    # the baselines then score too
Full-softmax cross-entropy over all items at every position (or --loss bce); validation NDCG@10 after every
epoch, early stopping after --patience epochs without improvement; the best epoch is kept and scored on the
test split, ranking the target against all items (and, labelled 'sampled_', against 100 sampled items).
Interrupted (Ctrl-C, kill -9)? Run the same command again: it resumes from out/<dataset>/teacher.ckpt.pt (<name>.ckpt.pt).
"""
import argparse
import os
import re

from common import (LOSSES, ItemEmbedding, SASRec, UserError, add_common_args, add_train_args, check_positive, format_metrics,
                    load_dataset, pick_device, run_main, run_settings, save_atomic, seed_everything, stage_dir,
                    train_recommender)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    add_train_args(parser)
    parser.add_argument("--loss", choices=LOSSES, default="ce", help="ce: full-softmax cross-entropy over all items; "
                        "bce: binary cross-entropy with one sampled negative per position (SASRec.pytorch's)")
    parser.add_argument("--blocks", type=int, default=2, help="self-attention blocks")
    parser.add_argument("--heads", type=int, default=1, help="attention heads")
    parser.add_argument("--name", default="teacher", help="artifact names, <name>.pt and <name>_metrics.json: the "
                        "later stages read teacher.pt; the baselines also score teacher_bce.pt where it exists")
    args = parser.parse_args()
    check_positive(args, "epochs", "patience", "batch_size", "lr", "maxlen", "dim", "blocks", "heads")
    if not re.fullmatch(r"[\w.-]+", args.name):
        raise UserError(f"--name {args.name!r} must be a file name (letters, digits, '_', '-', '.'), e.g. teacher_bce")
    if args.dim % args.heads:
        raise UserError(f"--dim {args.dim} must be divisible by --heads {args.heads}")

    data = load_dataset(args)
    device = pick_device(args.device)
    seed_everything(args.seed)  # the initial weights too, so the same seed gives the same teacher
    xavier = args.init == "xavier"
    model = SASRec(ItemEmbedding(data["num_items"], args.dim, xavier=xavier), args.maxlen, args.blocks, args.heads,
                   args.dropout, xavier)
    out = stage_dir(args)
    checkpoint = os.path.join(out, f"{args.name}.ckpt.pt")  # a killed run resumes from here
    result, = train_recommender([model], [args.seed], data["sequences"], args, device, desc="teacher",
                                loss=args.loss, checkpoint=checkpoint, settings=run_settings(args, dataset_fingerprint=data["fingerprint"]))
    result.pop("test_ranks")

    meta = {"args": vars(args), "dataset_fingerprint": data["fingerprint"]}
    save_atomic({"state": model.state_dict(), "item_emb": model.item_table().detach().cpu(), "args": vars(args),
                 "num_items": data["num_items"]}, os.path.join(out, f"{args.name}.pt"), meta)
    save_atomic(result, os.path.join(out, f"{args.name}_metrics.json"), meta)
    os.remove(checkpoint)
    print(f"teacher ({args.loss}): best epoch {result['best_epoch']} of {result['last_epoch']}"
          f"{'' if result['converged'] else ' (stopped by --epochs before --patience ran out)'}, "
          f"{result['train_s_per_epoch']:.1f} s/epoch on {device}; test {format_metrics(result['test'])} | seen items "
          f"masked: {format_metrics(result['test'], 'masked_')} | sampled ({result['sampled_candidates']} candidates): "
          f"{format_metrics(result['test'], 'sampled_')}")


if __name__ == "__main__":
    run_main(main)
