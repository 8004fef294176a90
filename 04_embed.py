"""
Stage 4: feed every item through the tuned LLM to get its enhanced embedding.

Reads  out/<dataset>/sft_adapter/, out/<dataset>/sft_head.pt      (03_sft.py)
Writes out/<dataset>/item_emb.pt        [num_items + 1, hidden_size] float32, row 0 (padding) zeros
       out/<dataset>/item_emb_base.pt   the same from the base LLM without SFT (--base: a control for 05_student.py)

$ python 04_embed.py --data beauty
$ python 04_embed.py --data beauty --base     # the control: what the untuned LLM gives
Each item goes through the same prompt as a user in 03_sft.py, as a history of one item; its embedding is
the final hidden state of the last token, the state the SFT head learned to read a category from.
"""
import argparse
import os
import time

import torch
from tqdm import tqdm

from common import (LoRALLM, PromptBuilder, add_common_args, all_reduce_sum, check_made_from, check_positive,
                    file_fingerprint, load_artifact, load_dataset, load_llm, load_tuned_llm, pack_prompts, pick_device, require,
                    run_main, save_atomic, setup_distributed, stage_dir, token_batches)


@torch.no_grad()
def embed_items(model, builder, num_items, max_tokens, device, rank=0, world=1):
    """[num_items + 1, hidden] embeddings. Under torchrun each process embeds every world-th item into a
    table of zeros and one all-reduce sums the tables: every row is filled by exactly one process."""
    items = list(range(1 + rank, num_items + 1, world))
    prompts = [builder([item]) for item in items]
    item_emb = torch.zeros(num_items + 1, model.head.in_features, device=device)
    for batch in tqdm(token_batches([len(p.ids) for p in prompts], max_tokens, shuffle=False), desc="items", leave=False):
        rows = torch.tensor([items[i] for i in batch], device=device)
        item_emb[rows] = model.hidden(pack_prompts([prompts[i] for i in batch], device)).float()
    return all_reduce_sum(item_emb, world).cpu()  # one copy at the end: no wait for the GPU inside the loop


def base_llm(state, device):
    """The control: the LLM 03_sft.py started from, untouched (a fresh LoRA adapter is the identity), reading the
    items as SFT did; item tokens exist only after SFT, so then the IDs are written out as text."""
    base, tokenizer = load_llm(state["args"]["llm"], device)
    item_repr = state["args"]["item_repr"]
    item_repr = item_repr if item_repr in ("text", "code", "title") else "text"
    return LoRALLM(base, state["num_outputs"]).to(device).eval(), tokenizer, item_repr


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, seed=False)
    parser.add_argument("--max-tokens", type=int, default=8192, help="tokens per batch (per process under torchrun)")
    parser.add_argument("--base", action="store_true", help="embed with the base LLM, without SFT (a control), "
                        "into item_emb_base.pt")
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
    if args.base:
        state = load_artifact(os.path.join(out, "sft_head.pt"))
        model, tokenizer, item_repr = base_llm(state, device)
    else:
        model, tokenizer, state = load_tuned_llm(args, device)
        item_repr = state["args"]["item_repr"]
    builder = PromptBuilder(tokenizer, item_repr, data["num_items"], data.get("item_titles"))

    start = time.time()
    item_emb = embed_items(model, builder, data["num_items"], args.max_tokens, device, rank, world)
    seconds = time.time() - start
    if rank > 0:
        return
    name = "item_emb_base.pt" if args.base else "item_emb.pt"
    meta = {"args": vars(args), "dataset_fingerprint": data["fingerprint"],
            "sft_fingerprint": file_fingerprint(os.path.join(out, "sft_head.pt")), "seconds": seconds}
    save_atomic(item_emb, os.path.join(out, name), meta)
    print(f"embed: {data['num_items']} items -> {name} {tuple(item_emb.shape)} in {seconds:.1f} s on {world} x "
          f"{device.type}; next: python 05_student.py --data {args.data}")


if __name__ == "__main__":
    run_main(main)
