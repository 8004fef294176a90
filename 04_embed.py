"""
Stage 4: feed every item through the tuned LLM to get its enhanced embedding.

Reads  out/<dataset>/sft_adapter/, out/<dataset>/sft_head.pt      (03_sft.py)
Writes out/<dataset>/item_emb.pt   [num_items + 1, hidden_size] float32, row 0 (padding) zeros

$ python 04_embed.py --data beauty
Each item goes through the same prompt as a user in 03_sft.py, as a history of one item; its embedding is
the final hidden state of the last token, the state the SFT head learned to read a category from.
"""
import argparse
import os
import time

import torch
from tqdm import tqdm

from common import (PromptBuilder, add_common_args, all_reduce_sum, check_made_from, check_positive,
                    file_fingerprint, load_dataset, load_tuned_llm, pack_prompts, pick_device, require, run_main,
                    save_atomic, setup_distributed, stage_dir, token_batches)


@torch.no_grad()
def embed_items(model, builder, num_items, max_tokens, device, rank=0, world=1):
    """[num_items + 1, hidden] embeddings. Under torchrun each process embeds every world-th item into a
    table of zeros and one all-reduce sums the tables: every row is filled by exactly one process."""
    items = list(range(1 + rank, num_items + 1, world))
    prompts = [builder([item]) for item in items]
    item_emb = torch.zeros(num_items + 1, model.head.in_features, device=device)
    for batch in tqdm(token_batches([len(p[0]) for p in prompts], max_tokens, shuffle=False), desc="items", leave=False):
        rows = torch.tensor([items[i] for i in batch], device=device)
        item_emb[rows] = model.hidden(pack_prompts([prompts[i] for i in batch], device)).float()
    return all_reduce_sum(item_emb, world).cpu()  # one copy at the end: no wait for the GPU inside the loop


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, seed=False)
    parser.add_argument("--max-tokens", type=int, default=8192, help="tokens per batch (per process under torchrun)")
    args = parser.parse_args()
    check_positive(args, "max_tokens")

    data = load_dataset(args)
    device, rank, world = setup_distributed(pick_device(args.device))
    out = stage_dir(args)
    sft_meta = require(os.path.join(out, "sft_head.pt.meta.json"), f"python 03_sft.py --data {args.data}")
    check_made_from(sft_meta, "dataset_fingerprint", data["fingerprint"],
                    f"the data changed since SFT: rerun python 02_teacher.py and 03_sft.py --data {args.data}", args.force)
    teacher_path = require(os.path.join(out, "teacher.pt"), f"python 02_teacher.py --data {args.data}")
    check_made_from(sft_meta, "teacher_fingerprint", file_fingerprint(teacher_path),
                    f"the teacher was retrained after SFT, so its categories are stale: rerun python 03_sft.py --data {args.data}",
                    args.force)
    model, tokenizer, state = load_tuned_llm(args, device)
    builder = PromptBuilder(tokenizer, state["args"]["item_repr"])

    start = time.time()
    item_emb = embed_items(model, builder, data["num_items"], args.max_tokens, device, rank, world)
    seconds = time.time() - start
    if rank > 0:
        return
    meta = {"args": vars(args), "dataset_fingerprint": data["fingerprint"],
            "sft_fingerprint": file_fingerprint(os.path.join(out, "sft_head.pt")), "seconds": seconds}
    save_atomic(item_emb, os.path.join(out, "item_emb.pt"), meta)
    print(f"embed: {data['num_items']} items -> {tuple(item_emb.shape)} in {seconds:.1f} s on {world} x {device.type}; "
          f"next: python 05_student.py --data {args.data}")


if __name__ == "__main__":
    run_main(main)
