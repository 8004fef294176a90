"""
Benchmark: LLM time of P2Rec's user-level SFT against instance-level SFT (E4SRec-style), the paper's Fig. 4.

Reads  out/<dataset>/dataset.json                        (01_prepare.py)
Writes out/<dataset>/bench_sft.json, and bench_sft.png when matplotlib is installed

$ python bench_sft.py --data beauty                                      # the default LLM
$ python bench_sft.py --data beauty --config qwen2.5-0.5b                # random weights of a known shape (GPU)

Per level, the code that 03_sft.py and 04_embed.py run, with the same prompts, LoRA and batching:
- training: one epoch over all users' train splits (user level: one sample per user; instance level:
  one per train position; on Beauty 22,363 against 131,413 samples). The user-level targets are random distributions: the cost does not depend on
  their values, so the benchmark needs no teacher.
- inference: what each paradigm needs the LLM for at recommendation time. P2Rec: 04_embed.py's one
  pass over all items (the student recommends without the LLM afterwards). Instance level: one
  forward pass per test user, scoring all items.
MFU counts 4 x (non-embedding parameters) FLOPs per real token for LoRA training (forward plus the
backward to the activations; frozen weights get no gradient) and 2 x for inference, against the
GPU's dense bf16 peak.
"""
import argparse
import importlib
import os
import textwrap
import time

import torch

from common import (DEFAULT_LLM, LoRALLM, PromptBuilder, UserError, add_common_args,
                    load_config_and_tokenizer, load_dataset, load_llm, pick_device, run_main, save_atomic,
                    seed_everything, stage_dir)

sft = importlib.import_module("03_sft")  # the stage scripts' own functions: the benchmark times their code
embed = importlib.import_module("04_embed")

# Shapes of public checkpoints (their config.json), for random-weight runs where no weights exist.
CONFIGS = {
    "qwen2.5-0.5b": ("qwen2", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                   num_attention_heads=14, num_key_value_heads=2, rope_theta=1e6)),
    "qwen2.5-1.5b": ("qwen2", dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                   num_attention_heads=12, num_key_value_heads=2, rope_theta=1e6)),
    "llama-3.2-1b": ("llama", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                   num_attention_heads=32, num_key_value_heads=8, rope_theta=5e5)),
    "qwen2.5-7b": ("qwen2", dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                 num_attention_heads=28, num_key_value_heads=4, rope_theta=1e6)),
    "llama-2-7b": ("llama", dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                 num_attention_heads=32, num_key_value_heads=32, rope_theta=1e4)),
}
PEAK_BF16_TFLOPS = {"H100 80GB HBM3": 989, "H100 PCIe": 756, "H100 NVL": 835, "H200": 989, "A100": 312}


def peak_flops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tf * 1e12 for key, tf in PEAK_BF16_TFLOPS.items() if key in name), None)


def build_base(args, tokenizer, device):
    """The default or given LLM, or random weights of a known shape (with --llm's tokenizer)."""
    if not args.config:
        return load_llm(args.llm, device)[0]
    from transformers import AutoConfig, AutoModel
    kind, shape = CONFIGS[args.config]
    config = AutoConfig.for_model(kind, vocab_size=len(tokenizer), **shape)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        return AutoModel.from_config(config, dtype=dtype, attn_implementation="sdpa")


def non_embedding_params(base):
    return sum(p.numel() for p in base.parameters()) - base.get_input_embeddings().weight.numel()


def level_samples(level, data, builder, args):
    """(train set, inference set) of one level, as sft.Samples. The user-level targets are random distributions
    and random categories: the cost does not depend on their values."""
    users = list(range(len(data["sequences"])))
    if level == "user":
        prior = torch.distributions.Dirichlet(torch.ones(args.k)).sample((len(users),))
        item_categories = torch.randint(args.k, (data["num_items"] + 1,))
        train = sft.user_level_samples(data["sequences"], users, builder, args.max_items, prior, item_categories)
        return train, sft.Samples([builder([item]) for item in range(1, data["num_items"] + 1)], None)
    train = sft.instance_level_samples(data["sequences"], users, builder, args.max_items)
    test_prompts = [builder(seq[:-1][-args.max_items:]) for seq in data["sequences"]]  # train + valid -> test item
    return train, sft.Samples(test_prompts, torch.tensor([seq[-1] for seq in data["sequences"]]))


def timed(device, fn):
    """(result, seconds, peak GiB) of fn()."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.time()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None
    return result, time.time() - start, peak


def bench_level(level, data, tokenizer, args, device):
    builder = PromptBuilder(tokenizer, args.item_repr, data["num_items"], data.get("item_titles"))
    train_set, infer_set = level_samples(level, data, builder, args)
    base = build_base(args, tokenizer, device)
    sft.batch_defaults(args, device, train_set.prompts, base.config)  # as 03_sft.py; a later level keeps the first one's budget
    params = non_embedding_params(base)
    num_outputs = args.k if level == "user" else data["num_items"] + 1
    model = LoRALLM(base, num_outputs, args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_targets,
                    item_repr=args.item_repr, num_items=data["num_items"],
                    teacher_item_emb=torch.randn(data["num_items"] + 1, 64)).to(device)
    sft.prepare_llm(model, args)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=device.type == "cuda")
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    max_tokens = sft.fit_max_tokens(model, train_set, args.max_tokens, device)
    batches = sft.prompt_batches(train_set.prompts, max_tokens, shuffle=True, generator=torch.Generator().manual_seed(0))
    prefix_weight = args.prefix_weight if level == "user" else 0.0

    def train_epoch(some_batches):
        return sft.run_epoch(model, train_set, some_batches, device, opt, schedule, prefix_weight=prefix_weight)

    # --fraction < 1 times the first part of the shuffled epoch and scales by tokens (7B instance level: an
    # epoch is many minutes). Warm-up outside the clock: CUDA context, kernels and cuBLAS plans; with --compile
    # the timed batches themselves, which holds the compile and every recompile.
    timed_batches = batches[:max(1, round(len(batches) * args.fraction))]
    share = sum(len(train_set.prompts[i].ids) for b in timed_batches for i in b) / sum(len(p.ids) for p in train_set.prompts)
    warmup = timed_batches if args.compile else sorted(batches, key=len)[:: max(1, len(batches) // 3)][:3]
    _, warmup_s, _ = timed(device, lambda: train_epoch(warmup))
    _, train_s, train_peak = timed(device, lambda: train_epoch(timed_batches))
    train_s /= share

    if level == "user":
        infer = lambda: embed.embed_items(model, embed.item_prompts(builder, data["num_items"]), max_tokens, device)  # noqa: E731
    else:
        infer_batches = sft.prompt_batches(infer_set.prompts, max_tokens, shuffle=False)
        infer = lambda: sft.run_epoch(model, infer_set, infer_batches, device)  # noqa: E731
    if args.compile:
        infer()  # the blocks compile once more for inference (no gradients, eval mode): not timed
    _, infer_s, infer_peak = timed(device, infer)

    peak = peak_flops(device)
    rows = []
    for phase, prompts, seconds, mem, flops_per_token in (("train epoch", train_set.prompts, train_s, train_peak, 4),
                                                          ("inference", infer_set.prompts, infer_s, infer_peak, 2)):
        tokens = sum(len(p.ids) for p in prompts)
        rows.append({"level": level, "phase": phase, "samples": len(prompts), "tokens": tokens, "seconds": seconds,
                     "tokens_per_s": tokens / seconds, "samples_per_s": len(prompts) / seconds, "peak_gib": mem,
                     "mfu": flops_per_token * params * tokens / seconds / peak if peak else None,
                     "max_tokens": max_tokens, "warmup_s": warmup_s if phase == "train epoch" else None,
                     "timed_share": share if phase == "train epoch" else 1.0})
    return rows, params


def print_table(rows, title):
    print(f"\n{title}")
    print(f"{'level':9s} {'phase':12s} {'samples':>8s} {'tokens':>10s} {'seconds':>8s} {'tokens/s':>10s} "
          f"{'samples/s':>10s} {'peak GiB':>8s} {'MFU':>6s}")
    for r in rows:
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        scaled = f"  (timed {100 * r['timed_share']:.0f}% of the epoch, scaled)" if r["timed_share"] < 1 else ""
        print(f"{r['level']:9s} {r['phase']:12s} {r['samples']:8d} {r['tokens']:10d} {r['seconds']:8.2f} "
              f"{r['tokens_per_s']:10.0f} {r['samples_per_s']:10.0f} {peak:>8s} {mfu:>6s}{scaled}")


def ratios(rows):
    by = {(r["level"], r["phase"]): r for r in rows}
    out = {}
    for phase in ("train epoch", "inference"):
        user, inst = by.get(("user", phase)), by.get(("instance", phase))
        if user and inst:
            out[phase] = {"time_ratio": inst["seconds"] / user["seconds"], "token_ratio": inst["tokens"] / user["tokens"]}
    return out


def save_chart(rows, path, title):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(5, 3.5))
    phases = ("train epoch", "inference")
    for offset, level in ((-0.2, "user"), (0.2, "instance")):
        seconds = [next((r["seconds"] for r in rows if r["level"] == level and r["phase"] == p), 0) for p in phases]
        ax.bar([i + offset for i in range(len(phases))], seconds, width=0.4, label=f"{level}-level")
    ax.set_xticks(range(len(phases)), phases)
    ax.set_ylabel("LLM time (s)")
    ax.set_title(textwrap.fill(title, 70), fontsize=8)  # the title names model, GPU and settings: wrap it
    ax.legend()
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=120)
    os.replace(path + ".tmp.png", path)
    return True


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--llm", default=DEFAULT_LLM, help="LLM (and, with --config, only its tokenizer)")
    parser.add_argument("--config", choices=sorted(CONFIGS), help="random weights of this public model's shape")
    parser.add_argument("--levels", default="user,instance", help="comma-separated: user, instance")
    parser.add_argument("--fraction", type=float, default=1.0,
                        help="time this share of the training epoch's (shuffled) batches and scale to the whole epoch")
    sft.add_sft_args(parser)
    args = parser.parse_args()
    sft.check_sft_args(args)
    if not 0 < args.fraction <= 1:
        raise UserError(f"--fraction must lie in (0, 1], got {args.fraction}")
    levels = args.levels.split(",")
    if any(level not in ("user", "instance") for level in levels):
        raise UserError(f"--levels {args.levels}: choose from user, instance")

    data = load_dataset(args)
    device = pick_device(args.device)
    seed_everything(args.seed)
    _, tokenizer = load_config_and_tokenizer(args.llm)
    rows = []
    for level in levels:
        level_rows, params = bench_level(level, data, tokenizer, args, device)
        rows += level_rows
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the level's model is gone: give its memory back before the next one
    model_name = f"{args.config} shape, random weights" if args.config else args.llm
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    title = (f"{args.data}, {model_name} ({params / 1e6:.1f}M non-embedding params), {device_name}, "
             f"items as {args.item_repr}, LoRA r{args.lora_r} {args.lora_targets}, batches of <= {rows[0]['max_tokens']} tokens")
    print_table(rows, title)
    for r in rows:
        if r["warmup_s"] is not None:
            what = "compile + one epoch" if args.compile else "3 batches"
            print(f"{r['level']}-level warm-up ({what}, not timed): {r['warmup_s']:.1f} s")
    result = {"title": title, "args": vars(args), "device": device_name, "rows": rows, "ratios": ratios(rows)}
    for phase, r in result["ratios"].items():
        print(f"{phase}: instance-level / user-level time {r['time_ratio']:.2f}x, tokens {r['token_ratio']:.2f}x")
    out = stage_dir(args)
    save_atomic(result, os.path.join(out, "bench_sft.json"))
    if save_chart(rows, os.path.join(out, "bench_sft.png"), title):
        print(f"chart: {os.path.join(out, 'bench_sft.png')}")


if __name__ == "__main__":
    run_main(main)
