"""
Stage 1: read interaction data, re-index items, and write the leave-one-out dataset.

Reads  data/beauty/Beauty.txt (S3-Rec format: one line per user, `user item item ...`, oldest first)
       data/ml-100k/ml-100k.inter (RecBole atomic file: user_id, item_id, timestamp) and its .item file
       or any file in either format through --data-file.
Writes out/<dataset>/dataset.json  item sequences (items re-indexed 1..N, 0 = padding), item texts and
                                   pre-grouped categories where the data has them
       out/<dataset>/stats.json    users, items, interactions, sequence lengths

$ python 01_prepare.py --data beauty
$ python 01_prepare.py --data-file ~/Sports_and_Outdoors.txt      # dataset name: Sports_and_Outdoors
Every later stage splits each sequence the same way: last item = test, second last = validation.
"""
import argparse
import json
import os

from common import DATASETS, UserError, add_common_args, file_fingerprint, run_main, save_atomic

HERE = os.path.dirname(os.path.abspath(__file__))
BUNDLED = {"beauty": os.path.join(HERE, "data/beauty/Beauty.txt"), "ml-100k": os.path.join(HERE, "data/ml-100k/ml-100k.inter")}
MIN_INTERACTIONS = 3  # one for training, one for validation, one for test


def read_lines(path):
    """The file's lines as people save them: a UTF-8 byte-order mark (Windows editors, spreadsheet exports) is
    dropped, and LF, CRLF and CR line endings all end a line (splitlines)."""
    if not os.path.isfile(path):
        raise UserError(f"data file {path} not found: check the path, or use --data with one of {', '.join(DATASETS)}")
    try:
        with open(path, encoding="utf-8-sig") as f:
            return f.read().splitlines()
    except UnicodeDecodeError:
        raise UserError(f"{path} is not a text file: give an S3-Rec .txt or a RecBole .inter file")


def parse_id(token, path, lineno, what):
    """A user or item ID: plain decimal digits only. int() would also take '-5', '+5' or '٣', and a float
    parse '1e3' or '3.0': in an ID file each of these is a broken line, not a number."""
    if not (token.isascii() and token.isdigit()):
        raise UserError(f"{path}:{lineno}: {what} '{token}' is not a non-negative decimal ID; fix or remove that line")
    return int(token)


def read_s3rec(path):
    """S3-Rec lines: `user item item ...`, already in time order. Returns {user: [items]}."""
    sequences = {}
    for lineno, line in enumerate(read_lines(path), 1):
        tokens = line.split()
        if not tokens:
            continue
        user = parse_id(tokens[0], path, lineno, "user")
        if user in sequences:
            raise UserError(f"{path}:{lineno}: user {user} appears on two lines; S3-Rec files hold one line per user")
        sequences[user] = [parse_id(t, path, lineno, "item") for t in tokens[1:]]
    return sequences


def read_recbole(path):
    """RecBole .inter: tab-separated with a typed header. Sorted by timestamp per user (stable, so ties
    keep file order). Returns {user: [items]}."""
    lines = read_lines(path)
    if not lines:
        raise UserError(f"{path} is empty")
    header = [h.split(":")[0] for h in lines[0].split()]
    missing = [c for c in ("user_id", "item_id", "timestamp") if c not in header]
    if missing:
        raise UserError(f"{path}: header lacks {', '.join(missing)}; a RecBole .inter needs user_id, item_id and timestamp columns")
    u, i, t = (header.index(c) for c in ("user_id", "item_id", "timestamp"))
    events = {}
    for lineno, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        cols = line.split()  # tabs, as RecBole writes them, or any run of whitespace: no .inter value holds a space
        if len(cols) != len(header):
            raise UserError(f"{path}:{lineno}: {len(cols)} columns where the header has {len(header)}; fix or remove that line")
        if cols[0].split(":")[0] == header[0]:
            raise UserError(f"{path}:{lineno}: a second header line; remove it")
        try:
            ts = float(cols[t])
        except ValueError:
            raise UserError(f"{path}:{lineno}: timestamp '{cols[t]}' is not a number; fix or remove that line")
        user = parse_id(cols[u], path, lineno, "user")
        events.setdefault(user, []).append((ts, parse_id(cols[i], path, lineno, "item")))
    return {user: [item for _, item in sorted(ev, key=lambda e: e[0])] for user, ev in events.items()}


def read_item_texts(inter_path):
    """RecBole .item beside the .inter (ml-100k): titles for the text-based baselines, genres as the
    pre-grouped categories for the latent-category check. Returns ({item: title}, {item: [genre]})."""
    path = inter_path[:-len(".inter")] + ".item"
    if not os.path.exists(path):
        return {}, {}
    lines = read_lines(path)
    header = [h.split(":")[0] for h in lines[0].split("\t")]
    titles, genres = {}, {}
    for line in lines[1:]:
        cols = dict(zip(header, line.split("\t")))
        if cols.get("item_id", "").isdigit():
            item = int(cols["item_id"])
            titles[item] = cols.get("movie_title", cols.get("title", "")).strip()
            genres[item] = cols.get("class", cols.get("genre", "")).split()
    return titles, genres


def read_item_attributes(txt_path):
    """S3-Rec's <Name>_item2attributes.json beside the .txt: pre-grouped categories and brands per item.
    Returns ({}, {item: [attribute]}): these files carry no titles."""
    stem = os.path.basename(txt_path)[:-len(".txt")]
    path = os.path.join(os.path.dirname(txt_path), f"{stem}_item2attributes.json")
    if not os.path.exists(path):
        return {}, {}
    with open(path) as f:
        return {}, {int(k): [str(a) for a in v] for k, v in json.load(f).items()}


def dataset_name(path):
    """The name later stages take with --data: the file's name without its extension, exactly as given
    (Sports_and_Outdoors.txt -> Sports_and_Outdoors)."""
    return os.path.splitext(os.path.basename(path))[0]


def check_lengths(sequences, path, drop_short):
    short = [user for user, seq in sequences.items() if len(seq) < MIN_INTERACTIONS]
    if short and not drop_short:
        raise UserError(f"{path}: {len(short)} users have fewer than {MIN_INTERACTIONS} interactions (e.g. user {short[0]}); "
                        f"leave-one-out needs {MIN_INTERACTIONS}: pass --drop-short to drop them")
    for user in short:
        del sequences[user]
    if not sequences:
        raise UserError(f"{path}: no user has {MIN_INTERACTIONS} or more interactions")
    return len(short)


def build_dataset(name, sequences, titles, groups):
    """Re-index items 1..N in order of their original IDs (the identity on S3-Rec files). Lists indexed by
    the new ID carry the item titles and pre-grouped categories where the data has them (None otherwise)."""
    original_items = sorted({item for seq in sequences.values() for item in seq})
    new_id = {item: i + 1 for i, item in enumerate(original_items)}
    users = sorted(sequences)
    return {"name": name, "num_items": len(original_items), "user_ids": users, "item_ids": original_items,
            "sequences": [[new_id[i] for i in sequences[u]] for u in users],
            "item_titles": [""] + [titles.get(i, "") for i in original_items] if titles else None,
            "item_groups": [[]] + [groups.get(i, []) for i in original_items] if groups else None}


def statistics(data, dropped):
    lengths = [len(s) for s in data["sequences"]]
    n = sum(lengths)
    return {"users": len(lengths), "items": data["num_items"], "interactions": n,
            "avg_length": round(n / len(lengths), 2), "max_length": max(lengths),
            "density": round(n / (len(lengths) * data["num_items"]), 6), "dropped_short_users": dropped,
            "train_interactions": n - 2 * len(lengths)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, seed=False)
    parser.add_argument("--data-file", help="your own S3-Rec .txt or RecBole .inter file (then --data names it, default: the file name)")
    parser.add_argument("--drop-short", action="store_true", help=f"drop users with fewer than {MIN_INTERACTIONS} interactions instead of stopping")
    parser.set_defaults(data=None)
    args = parser.parse_args()

    if args.data_file:
        path = args.data_file
        args.data = args.data or dataset_name(path)
    elif (args.data or "ml-100k") in BUNDLED:
        args.data = args.data or "ml-100k"
        path = BUNDLED[args.data]
    else:
        raise UserError(f"unknown dataset '{args.data}': use one of {', '.join(DATASETS)}, or --data-file PATH for your own")

    if path.endswith(".inter"):
        sequences, (titles, groups) = read_recbole(path), read_item_texts(path)
    else:
        sequences, (titles, groups) = read_s3rec(path), read_item_attributes(path)
    if not sequences:
        raise UserError(f"{path} holds no interactions")
    dropped = check_lengths(sequences, path, args.drop_short)
    data = build_dataset(args.data, sequences, titles, groups)
    stats = statistics(data, dropped)

    out_dir = os.path.join(args.out, args.data)
    os.makedirs(out_dir, exist_ok=True)
    meta = {"args": vars(args), "source": path, "source_fingerprint": file_fingerprint(path)}
    save_atomic(data, os.path.join(out_dir, "dataset.json"), meta)
    save_atomic(stats, os.path.join(out_dir, "stats.json"))
    print(" ".join(f"{k} {v}" for k, v in stats.items()))
    print(f"wrote {out_dir}/dataset.json; next: python 02_teacher.py --data {args.data}")


if __name__ == "__main__":
    run_main(main)
