"""
Stage 4: feed every item through the tuned LLM to get its enhanced embedding.

Reads  out/<dataset>/sft_adapter/, out/<dataset>/sft_head.pt      (03_sft.py)
Writes out/<dataset>/item_emb.pt        [num_items + 1, hidden_size] float32, row 0 (padding) zeros
       out/<dataset>/item_emb_base.pt   the same from the base LLM without SFT (--base: a control for 05_student.py)
Beyond the paper's ID-only setting, where the dataset has item titles (ml-100k):
       out/<dataset>/item_emb_title.pt  through the LLM tuned on titles (03_sft.py --item-repr title): P2Rec-text
       out/<dataset>/item_emb_text.pt   each item's text (title, genres) through the base --llm, no SFT (--text)

$ python 04_embed.py --data beauty
$ python 04_embed.py --data beauty --base     # the control: what the untuned LLM gives
$ python 04_embed.py --data ml-100k --text    # what item text alone gives
Each item goes through the same prompt as a user in 03_sft.py, as a history of one item; its embedding is
the final hidden state of the last token, the state the SFT head learned to read a category from. --text has no
prompt and no head to feed: the final hidden states are averaged over the text's tokens.
"""
import argparse
import os
import time

import torch
from tqdm import tqdm

from common import (LoRALLM, Prompt, PromptBuilder, add_common_args, all_reduce_sum, check_made_from, check_positive,
                    command_that_makes, file_fingerprint, item_texts, llm_fingerprint, load_artifact, load_dataset,
                    load_llm, load_tuned_llm, pack_prompts, pick_device, require, run_main, save_atomic,
                    setup_distributed, sft_files, stage_dir, token_batches)

TEXT_TOKENS = 64  # ml-100k's texts (title and genres): 14 tokens on average with SmolLM2's tokenizer, all within 64


@torch.no_grad()
def embed_items(model, prompts, max_tokens, device, rank=0, world=1, pool="last"):
    """[num_items + 1, hidden] embeddings of `prompts` (one per item, index 0 unused): the last token's final hidden
    state, or with pool 'mean' their average over the prompt. Under torchrun each process embeds every world-th
    item into a table of zeros and one all-reduce sums the tables: every row is filled by exactly one process."""
    items = list(range(1 + rank, len(prompts), world))
    lengths = [len(prompts[item].ids) for item in items]
    item_emb = torch.zeros(len(prompts), model.head.in_features, device=device)
    for batch in tqdm(token_batches(lengths, max_tokens, shuffle=False), desc="items", leave=False):
        rows = torch.tensor([items[i] for i in batch], device=device)
        packed = pack_prompts([prompts[items[i]] for i in batch], device)
        item_emb[rows] = (model.mean_hidden(packed) if pool == "mean" else model.hidden(packed)).float()
    return all_reduce_sum(item_emb, world).cpu()  # one copy at the end: no wait for the GPU inside the loop


def base_llm(state, device):
    """The control: the LLM 03_sft.py started from, untouched (a fresh LoRA adapter is the identity), reading the
    items as SFT did; item tokens exist only after SFT, so then the IDs are written out as text."""
    base, tokenizer = load_llm(state["args"]["llm"], device)
    item_repr = state["args"]["item_repr"]
    item_repr = item_repr if item_repr in ("text", "code", "title") else "text"
    return LoRALLM(base, state["num_outputs"]).to(device).eval(), tokenizer, item_repr


def item_prompts(builder, num_items):
    """Each item alone as 03_sft.py's prompt of a history of one item (index 0, padding, has none)."""
    return [None] + [builder([item]) for item in range(1, num_items + 1)]


def text_prompts(tokenizer, texts):
    ids = [tokenizer(text, add_special_tokens=False).input_ids[:TEXT_TOKENS] for text in texts]
    return [Prompt(i, [0] * len(i), []) for i in ids]


def check_sft(args, data, out, files):
    """Stop unless the SFT was made from the current dataset and teacher."""
    made_by = command_that_makes(files["head"], args.data)
    sft_meta = require(os.path.join(out, files["head"] + ".meta.json"), made_by)
    check_made_from(sft_meta, "dataset_fingerprint", data["fingerprint"],
                    f"the data changed since SFT: rerun {command_that_makes('teacher.pt', args.data)} and {made_by}", args.force)
    teacher_path = require(os.path.join(out, "teacher.pt"), command_that_makes("teacher.pt", args.data))
    check_made_from(sft_meta, "teacher_fingerprint", file_fingerprint(teacher_path),
                    f"the teacher was retrained after SFT, so its categories are stale: rerun {made_by}", args.force)


def embedder(args, data, device):
    """What the flags ask for: (model, a prompt per item, pooling, the name to save under, meta naming the inputs)."""
    out = stage_dir(args)
    if args.text:
        texts = item_texts(data)  # before the LLM loads: a dataset without text stops at once
        base, tokenizer = load_llm(args.llm, device)
        model = LoRALLM(base, 1).to(device).eval()
        return model, text_prompts(tokenizer, texts), "mean", "item_emb_text.pt", {"llm": llm_fingerprint(args.llm)}
    files = sft_files("title" if args.titles else "item-token")
    if args.titles:
        PromptBuilder.check_titles("title", data.get("item_titles"), "--titles")
    check_sft(args, data, out, files)
    if args.base:
        state = load_artifact(os.path.join(out, files["head"]))
        model, tokenizer, item_repr = base_llm(state, device)
    else:
        model, tokenizer, state = load_tuned_llm(args, device, files)
        item_repr = state["args"]["item_repr"]
    builder = PromptBuilder(tokenizer, item_repr, data["num_items"], data.get("item_titles"))
    name = "item_emb_base.pt" if args.base else files["item_emb"]
    inputs = {"sft_fingerprint": file_fingerprint(os.path.join(out, files["head"]))}
    return model, item_prompts(builder, data["num_items"]), "last", name, inputs


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, seed=False, llm=True)
    parser.add_argument("--max-tokens", type=int, default=8192, help="tokens per batch (per process under torchrun)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--base", action="store_true", help="embed with the base LLM, without SFT (a control), "
                       "into item_emb_base.pt")
    which.add_argument("--titles", action="store_true", help="embed by titles through the LLM tuned on them "
                       "(03_sft.py --item-repr title) into item_emb_title.pt")
    which.add_argument("--text", action="store_true", help="embed each item's text (title, genres) through the base "
                       "--llm, averaged over its tokens, into item_emb_text.pt (needs no SFT; the other embeddings use "
                       "the LLM that 03_sft.py tuned, whatever --llm says)")
    args = parser.parse_args()
    check_positive(args, "max_tokens")

    data = load_dataset(args)
    device, rank, world = setup_distributed(pick_device(args.device))
    model, prompts, pool, name, inputs = embedder(args, data, device)
    start = time.time()
    item_emb = embed_items(model, prompts, args.max_tokens, device, rank, world, pool)
    seconds = time.time() - start
    if rank > 0:
        return
    meta = {"args": vars(args), "dataset_fingerprint": data["fingerprint"], **inputs, "seconds": seconds}
    save_atomic(item_emb, os.path.join(stage_dir(args), name), meta)
    print(f"embed: {data['num_items']} items -> {name} {tuple(item_emb.shape)} in {seconds:.1f} s on {world} x "
          f"{device.type}; next: python 05_student.py --data {args.data}")


if __name__ == "__main__":
    run_main(main)
