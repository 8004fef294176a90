"""
Stage 5: train future SRS models with and without the LLM-enhanced item embeddings.

Reads  out/<dataset>/dataset.json, out/<dataset>/item_emb.pt        (01_prepare.py, 04_embed.py)
       out/<dataset>/item_emb_base.pt, categories.pt                (04_embed.py --base, 03_sft.py: the controls)
       out/<dataset>/item_emb_text.pt, item_emb_title.pt            (04_embed.py --text, --titles: item text)
Writes out/<dataset>/results.json   test metrics of every (loss, model, variant, seed) under both protocols, subgroups,
                                    best epochs, validation, history
       out/<dataset>/results.md     the tables: lifts over vanilla, mean ± std over seeds, best epochs, subgroups
       out/<dataset>/results.png    the lifts per seed, both protocols (only where matplotlib is installed)
       out/<dataset>/student.pt     the enhanced SASRec of the first seed (for the baselines' side-by-side)

$ python 05_student.py --data beauty --seeds 42 43 44
$ python 05_student.py --data beauty --variants vanilla,enhanced,base-llm,categories    # with both controls
$ python 05_student.py --data beauty --loss ce,bce --seeds 42 43 44    # our protocol beside the paper's (reproduce.sh)

Variants, all trained alike (same seeds, settings and initial weights apart from the item table):
  vanilla   a plain ID embedding table;
  enhanced  fused with the LLM-enhanced embeddings of 04_embed.py (P2Rec);
  base-llm  fused with embeddings of the LLM before SFT (04_embed.py --base): what the SFT adds;
  categories fused with the one-hot k-means categories of 03_sft.py, no LLM: what the LLM adds over them;
  teacher   fused with the teacher's own item table (02_teacher.py): all the clusters were cut from;
and beyond the paper's ID-only setting, where the dataset has item titles (ml-100k):
  text       fused with each item's text through the base LLM (04_embed.py --text): what text alone gives;
  p2rec-text fused with P2Rec's embeddings from an SFT that names items by title (03_sft.py --item-repr title,
             04_embed.py --titles): what P2Rec's SFT adds on top of text.
How an SRS model takes them (--fuse, or per variant: text+align; common.ItemEmbedding): init (the ID table starts
from them), add (a learned map of them is added at every step) or align (a loss pulls the ID table toward a learned
map of them).
Two training losses (--loss): ce, full-softmax cross-entropy over all items (ours, the strong baseline), and bce,
binary cross-entropy with one sampled negative per position (SASRec's original, what the papers' baselines use).
Every run stops on its own, --patience epochs after its best validation NDCG@10. Every test metric comes twice:
full ranking over all items (ours) and 'sampled_', the target among 100 items the user never interacted with (the
papers'), the same candidates for every run.
On a GPU all runs of one structure train together as one (common.RunGroup): the same runs, a fraction of the time.
"""
import argparse
import os
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (FUSIONS, KS, LOSSES, Dropout, ItemEmbedding, SASRec, UserError, add_common_args, add_train_args,
                    check_made_from, check_positive, clearly_above, command_that_makes, current_artifact,
                    current_teacher, file_fingerprint, format_metrics, llm_features, load_artifact, load_dataset,
                    matching_checkpoint, pick_device, rank_metrics, require, run_main, run_settings, save_atomic,
                    seed_everything, stage_dir, train_popularity, train_recommender)

METRICS = [f"{m}@{k}" for m in ("HR", "NDCG") for k in KS]
VARIANTS = ("vanilla", "enhanced", "base-llm", "categories", "teacher", "text", "p2rec-text")
# The LLM embeddings a variant reads: (file, the SFT it was made from); common.MADE_BY names the command behind each.
EMBEDDINGS = {"enhanced": ("item_emb.pt", "sft_head.pt"), "base-llm": ("item_emb_base.pt", "sft_head.pt"),
              "p2rec-text": ("item_emb_title.pt", "sft_head_title.pt"), "text": ("item_emb_text.pt", None)}
SUBGROUPS = ("tail items", "head items", "short users", "long users")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, seed=False)
    add_train_args(parser)
    parser.add_argument("--loss", default="ce", help="comma-separated: ce (full-softmax cross-entropy) and/or bce (binary "
                        "cross-entropy, one sampled negative per position)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42], help="one run of every variant per model and seed")
    parser.add_argument("--models", default="sasrec,gru4rec", help="comma-separated: sasrec, gru4rec")
    parser.add_argument("--variants", default="vanilla,enhanced", help=f"comma-separated: {', '.join(VARIANTS)}; a "
                        "variant may name its own fusion, such as text+align")
    parser.add_argument("--fuse", choices=FUSIONS, default="init", help="how the item table takes the embeddings, where "
                        "a variant names none")
    parser.add_argument("--align-weight", type=float, default=1.0, help="weight of the align loss (--fuse align)")
    parser.add_argument("--blocks", type=int, default=2, help="SASRec self-attention blocks")
    parser.add_argument("--heads", type=int, default=1, help="SASRec attention heads")
    parser.add_argument("--together", choices=("auto", "yes", "no"), default="auto",
                        help="train runs of one structure together (auto: on a GPU, where it saves time; on a CPU "
                             "one at a time is as fast)")
    args = parser.parse_args()
    check_positive(args, "epochs", "patience", "batch_size", "lr", "maxlen", "dim", "blocks", "heads", "align_weight")
    args.models, args.variants, args.loss = args.models.split(","), args.variants.split(","), args.loss.split(",")
    for option, given, known in (("--models", args.models, ("sasrec", "gru4rec")), ("--loss", args.loss, LOSSES),
                                 ("--variants", [variant_parts(v, args)[0] for v in args.variants], VARIANTS),
                                 ("--variants fusion", [variant_parts(v, args)[1] for v in args.variants], FUSIONS)):
        unknown = [name for name in given if name not in known]
        if unknown:
            raise UserError(f"unknown {option} entry {unknown[0]}: choose from {', '.join(known)}")
    if "vanilla" not in args.variants:
        raise UserError("--variants must include vanilla: every lift is measured against it")
    return args


class GRU4Rec(nn.Module):
    """GRU4Rec (Hidasi et al., ICLR 2016) with full-softmax cross-entropy: a GRU over the item embeddings,
    scored against the same item table. The GRU (PyTorch's equations) is written out step by step, so that
    torch.func.vmap can train several runs at once (nn.GRU has no batching rule); a padding step leaves the
    state as it was, so a user's states do not depend on how much padding its batch carries."""

    def __init__(self, items, dropout=0.5):
        super().__init__()
        dim = items.id_emb.embedding_dim
        self.items = items
        self.drop = Dropout(dropout)
        self.input_gates, self.hidden_gates = nn.Linear(dim, 3 * dim), nn.Linear(dim, 3 * dim)
        for weight in (*self.input_gates.parameters(), *self.hidden_gates.parameters()):
            nn.init.uniform_(weight, -dim ** -0.5, dim ** -0.5)  # nn.GRU's initialisation

    def item_table(self):
        return self.items.table()

    def forward(self, seq, table=None):
        table = self.item_table() if table is None else table
        real = seq > 0
        from_input = self.input_gates(self.drop(table[seq]))  # [B, L, 3 dim], every step at once
        state = from_input.new_zeros(seq.shape[0], table.shape[1])
        states = []
        for t in range(seq.shape[1]):
            reset_x, update_x, new_x = from_input[:, t].chunk(3, -1)
            reset_h, update_h, new_h = self.hidden_gates(state).chunk(3, -1)
            reset, update = torch.sigmoid(reset_x + reset_h), torch.sigmoid(update_x + update_h)
            candidate = torch.tanh(new_x + reset * new_h)
            state = torch.where(real[:, t, None], (1 - update) * candidate + update * state, state)
            states.append(state)
        return torch.stack(states, 1)


def variant_parts(variant, args):
    """'text+align' -> ('text', 'align'); a variant without '+' takes --fuse: 'text' -> ('text', args.fuse)."""
    name, _, fuse = variant.partition("+")
    return name, fuse or args.fuse


def build_model(name, num_items, args, features, fuse):
    xavier = name == "sasrec" and args.init == "xavier"
    items = ItemEmbedding(num_items, args.dim, features, fuse, args.align_weight, xavier)
    if name == "sasrec":
        return SASRec(items, args.maxlen, args.blocks, args.heads, args.dropout, xavier)
    return GRU4Rec(items, args.dropout)


# ----------------------------------------------------------------------------- the variants' item embeddings

def variant_features(args, data, out):
    """{variant (without its fusion): llm_features(...) or None (vanilla)}, after checking that every input is current."""
    variants = {variant_parts(v, args)[0] for v in args.variants}
    features = {"vanilla": None}
    for variant in variants & EMBEDDINGS.keys():
        features[variant] = llm_features(current_embeddings(args, data, out, *EMBEDDINGS[variant]), args.dim)
    if "categories" in variants:
        path = current_artifact(args, data, "categories.pt", command_that_makes("categories.pt", args.data),
                                f"the data changed since 03_sft.py ran: rerun stages 02-04 for --data {args.data}")
        categories = load_artifact(path)["item_categories"]
        one_hot = F.one_hot(categories.clamp(min=0)).float()
        one_hot[0] = 0
        features["categories"] = llm_features(one_hot, args.dim)
    if "teacher" in variants:
        features["teacher"] = llm_features(load_artifact(current_teacher(args, data))["item_emb"], args.dim)
    return features


def current_embeddings(args, data, out, name, sft_head):
    made_by = command_that_makes(name, args.data)
    path = current_artifact(args, data, name, made_by,
                            f"the data changed since the embeddings were made: rerun stages 02-04 for --data {args.data}")
    if sft_head is not None:
        sft_path = require(os.path.join(out, sft_head), command_that_makes(sft_head, args.data))
        check_made_from(path + ".meta.json", "sft_fingerprint", file_fingerprint(sft_path),
                        f"03_sft.py ran again after {name} was made: rerun {made_by}",
                        args.force)
    emb = load_artifact(path)
    if emb.shape[0] != data["num_items"] + 1:
        raise UserError(f"{path} has {emb.shape[0] - 1} items, the dataset {data['num_items']}: rerun {made_by}")
    return emb


# ----------------------------------------------------------------------------- training, grouped

def plan_groups(runs, together):
    """Runs of one loss that can be stacked (same model structure: same parameter names and shapes) go into one
    group; without `together`, every run is a group of its own."""
    groups = {}
    for run in runs:
        structure = tuple((name, tuple(t.shape)) for name, t in run["model"].state_dict().items())
        groups.setdefault((run["loss"], structure) if together else id(run), []).append(run)
    return list(groups.values())


def build_runs(args, data, features):
    runs = []
    for loss in args.loss:
        for model_name in args.models:
            for seed in args.seeds:
                for variant in args.variants:
                    seed_everything(seed)  # the same initial weights for every variant and loss of a seed, item fusion aside
                    name, fuse = variant_parts(variant, args)
                    model = build_model(model_name, data["num_items"], args, features[name], fuse)
                    runs.append({"loss": loss, "model_name": model_name, "variant": variant, "seed": seed, "model": model})
    return runs


# ----------------------------------------------------------------------------- subgroups and the table

def subgroup_masks(sequences, num_items):
    """Test users by their target (tail: the 80% least popular items in training; head: the rest) and by their
    history (short: at most 5 training items; long: more)."""
    popularity = train_popularity(sequences, num_items)
    head = torch.zeros(num_items + 1, dtype=torch.bool)
    head[1 + popularity[1:].argsort(descending=True)[: num_items // 5]] = True
    is_head = head[torch.tensor([seq[-1] for seq in sequences])]
    short = torch.tensor([len(seq) - 2 <= 5 for seq in sequences])
    return {"tail items": ~is_head, "head items": is_head, "short users": short, "long users": ~short}


def mean_std(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)


def cell(values):
    mean, std = mean_std(values)
    return f"{mean:.4f}" + (f" ± {std:.4f}" if std is not None else "")


def arms(runs):
    """{(loss, model): {variant: [runs, in seed order]}}, in the order the runs came."""
    out = {}
    for r in runs:
        out.setdefault((r["loss"], r["model"]), {}).setdefault(r["variant"], []).append(r)
    return out


def paired_lifts(variant_runs, vanilla_runs, metric):
    """The variant's lift over vanilla in % for each seed (each run against the vanilla run of its seed)."""
    vanilla = {r["seed"]: r["test"][metric] for r in vanilla_runs}
    return [100 * (r["test"][metric] / vanilla[r["seed"]] - 1) for r in variant_runs]


def lift_cell(variant_runs, vanilla_runs, metric):
    """'+x.x% ± s.s': the mean and std of the per-seed lifts; '*' where the variant's mean is above vanilla's by more
    than twice the larger of the two arms' standard deviations (our bar for a lift)."""
    lifts = mean_std(paired_lifts(variant_runs, vanilla_runs, metric))
    (mean, std), (base, base_std) = (mean_std([r["test"][metric] for r in rs]) for rs in (variant_runs, vanilla_runs))
    clear = std is not None and clearly_above(mean, std, base, base_std)
    return f"{lifts[0]:+.1f}%" + (f" ± {lifts[1]:.1f}" if lifts[1] is not None else "") + " *" * clear


def epochs_cell(of):
    """Best epochs over seeds, '!' where a run stopped at --epochs before --patience ran out."""
    best = sorted(r["best_epoch"] for r in of)
    return (f"{best[0]}" if best[0] == best[-1] else f"{best[0]}-{best[-1]}") + "!" * any(not r["converged"] for r in of)


LIFT_METRICS = ("NDCG@10", "HR@10", "sampled_NDCG@10", "sampled_HR@10")


def markdown_table(runs, dataset, fuse):
    """The lifts over vanilla under both protocols, then per protocol the mean (± std over seeds) of each test
    metric with the best epochs, then NDCG@10 / HR@10 by subgroup."""
    candidates = runs[0]["sampled_candidates"]
    lines = [f"Test split of {dataset}; item tables fused by '{fuse}' where a variant names no other. Full: the target "
             f"ranked among all items (history not masked). Sampled: among itself and {candidates - 1} items the user never interacted with "
             f"(the same for every run). Best epochs: by validation NDCG@10 (full), '!' where a run stopped at "
             f"--epochs before --patience ran out.", "",
             "Lift over vanilla: mean ± std of the per-seed lifts; * where the variant's mean is above vanilla's by "
             "more than twice the larger standard deviation of the two.", "",
             "| loss | model | variant | " + " | ".join(m.replace("sampled_", "sampled ") for m in LIFT_METRICS)
             + " | best epochs |", "|---" * (len(LIFT_METRICS) + 4) + "|"]
    for (loss, model), of in arms(runs).items():
        for variant, rs in of.items():
            cells = ([cell([r["test"][m] for r in rs]) for m in LIFT_METRICS] if variant == "vanilla"
                     else [lift_cell(rs, of["vanilla"], m) for m in LIFT_METRICS])
            lines.append(f"| {loss} | {model} | {variant} | " + " | ".join(cells) + f" | {epochs_cell(rs)} |")
    for title, prefix in (("Full ranking", ""), (f"Sampled ({candidates} candidates)", "sampled_")):
        lines += ["", f"{title}, mean ± std over seeds:", "",
                  "| loss | model | variant | seeds | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 4) + "|"]
        for (loss, model), of in arms(runs).items():
            for variant, rs in of.items():
                lines.append(f"| {loss} | {model} | {variant} | {len(rs)} | "
                             + " | ".join(cell([r["test"][prefix + m] for r in rs]) for m in METRICS) + " |")
    lines += ["", "By subgroup (full ranking; NDCG@10, then HR@10):", "",
              "| loss | model | variant | " + " | ".join(SUBGROUPS) + " |", "|---" * (len(SUBGROUPS) + 3) + "|"]
    for (loss, model), of in arms(runs).items():
        for variant, rs in of.items():
            cells = [f"{mean_std([r['subgroups'][g]['NDCG@10'] for r in rs])[0]:.4f} / "
                     f"{mean_std([r['subgroups'][g]['HR@10'] for r in rs])[0]:.4f}" if g in rs[0]["subgroups"] else "-"
                     for g in SUBGROUPS]
            lines.append(f"| {loss} | {model} | {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def save_chart(runs, path, title):
    """The lift of NDCG@10 and HR@10 over vanilla per loss, model and variant, full ranking above and sampled below:
    a bar for the mean, one dot per seed (paired with the vanilla run of that seed). Drawn only where matplotlib is
    installed (optional)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = arms(runs)
    variants = [v for v in dict.fromkeys(r["variant"] for r in runs) if v != "vanilla"]
    if not variants:
        return False
    fig, axes = plt.subplots(2, len(panels), figsize=(3.2 * len(panels) + 1, 6), squeeze=False, sharey="row")
    for row, prefix in enumerate(("", "sampled_")):
        for ax, ((loss, model), of) in zip(axes[row], panels.items()):
            for offset, metric in ((-0.2, "NDCG@10"), (0.2, "HR@10")):
                for x, variant in enumerate(variants):
                    lifts = paired_lifts(of[variant], of["vanilla"], prefix + metric)
                    ax.bar(x + offset, statistics.mean(lifts), width=0.4, color="C0" if metric == "NDCG@10" else "C1",
                           label=metric if x == 0 else None)
                    ax.scatter([x + offset] * len(lifts), lifts, color="black", s=8, zorder=3)
            ax.axhline(0, color="grey", linewidth=0.8)
            ax.set_xticks(range(len(variants)), variants, fontsize=8)
            ax.set_title(f"{model}, {loss}, {'sampled' if prefix else 'full ranking'}", fontsize=9)
        axes[row][0].set_ylabel("test lift over vanilla (%)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=110)
    os.replace(path + ".tmp.png", path)
    return True


def finished_groups(checkpoint, settings, force):
    """{group name: its runs' results} from an interrupted run of the same command, else {}."""
    saved = matching_checkpoint(checkpoint, settings, force)
    if saved is None:
        return {}
    print(f"resuming from {checkpoint}: {len(saved['finished'])} group(s) of runs were done")
    return saved["finished"]


def train_group(group, name, args, data, device, masks, out):
    """Train one group of runs (trained together on a GPU), print a line per run, and return their results."""
    trained = train_recommender([r["model"] for r in group], [r["seed"] for r in group], data["sequences"], args,
                                device, desc=name, loss=group[0]["loss"])
    results = []
    for run, result in zip(group, trained):
        ranks = result.pop("test_ranks")
        result["subgroups"] = {g: {"users": int(mask.sum()), **rank_metrics(ranks[mask])}
                               for g, mask in masks.items() if mask.any()}  # ml-100k has no short users
        results.append({"loss": run["loss"], "model": run["model_name"], "variant": run["variant"], "seed": run["seed"],
                        **result})
        print(f"{run['loss']:3s} {run['model_name']:8s} {run['variant']:16s} seed {run['seed']}: best epoch "
              f"{result['best_epoch']:4d} of {result['last_epoch']:4d}{'' if result['converged'] else ' (hit --epochs)'}, "
              f"test {format_metrics(result['test'])} | sampled {format_metrics(result['test'], 'sampled_')}")
        if (run["loss"], run["model_name"], run["variant"], run["seed"]) == (args.loss[0], "sasrec", "enhanced", args.seeds[0]):
            save_atomic({"state": run["model"].state_dict(), "item_emb": run["model"].item_table().detach().cpu(),
                         "args": vars(args)}, os.path.join(out, "student.pt"))
    return results


def main():
    args = parse_args()
    data = load_dataset(args)
    out = stage_dir(args)
    features = variant_features(args, data, out)
    device = pick_device(args.device)
    together = args.together == "yes" or (args.together == "auto" and device.type == "cuda")
    masks = subgroup_masks(data["sequences"], data["num_items"])

    inputs = {name: file_fingerprint(os.path.join(out, name)) for name in [e[0] for e in EMBEDDINGS.values()] + ["categories.pt"]
              if os.path.exists(os.path.join(out, name))}
    # Every finished group of runs is kept here: after Ctrl-C or kill -9 the same command trains only what is left.
    checkpoint = os.path.join(out, "students.ckpt.pt")
    settings = run_settings(args, dataset_fingerprint=data["fingerprint"], inputs=inputs)
    finished = finished_groups(checkpoint, settings, args.force)
    results, start = [], time.time()
    for group in plan_groups(build_runs(args, data, features), together):
        name = f"{group[0]['loss']} {group[0]['model_name']} " + ", ".join(f"{r['variant']} s{r['seed']}" for r in group)
        if name not in finished:
            finished[name] = train_group(group, name, args, data, device, masks, out)
            save_atomic({"settings": settings, "finished": finished}, checkpoint)
        results += finished[name]

    meta = {"args": vars(args), "dataset_fingerprint": data["fingerprint"], "inputs": inputs}
    save_atomic({"runs": results}, os.path.join(out, "results.json"), meta)
    table = markdown_table(results, args.data, args.fuse)
    save_atomic(table, os.path.join(out, "results.md"))
    print("\n" + table)
    os.remove(checkpoint)
    chart = save_chart(results, os.path.join(out, "results.png"), f"{args.data}, fused by '{args.fuse}'")
    print(f"students: {len(results)} runs in {time.time() - start:.0f} s on {device}; tables in {os.path.join(out, 'results.md')}"
          + (f", chart in {os.path.join(out, 'results.png')}" if chart else ""))


if __name__ == "__main__":
    run_main(main)
