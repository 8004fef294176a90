"""Shared fixtures: a small synthetic dataset with known structure, a tiny random LLaMA, and one run of
the five stages on them (session-scoped, so every stage's test reads the same artifacts)."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

NUM_GROUPS, GROUP_SIZE, NUM_USERS = 4, 10, 80
SFT_ARGS = ["--k", 4, "--epochs", 3, "--lr", 3e-3, "--max-tokens", 512]
TEACHER_ARGS = ["--epochs", 20, "--batch-size", 16, "--lr", 5e-3, "--dim", 32, "--maxlen", 20, "--dropout", 0.2]


def run_stage(script, *args, check=True):
    """Run a stage script as a user would; returns the CompletedProcess."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def run_torchrun(script, *args, nproc=2):
    """Run a stage under `torchrun --nproc_per_node nproc` (gloo on CPU), as a multi-GPU user would on GPUs."""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                           os.path.join(ROOT, script), *map(str, args)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, f"torchrun {script} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return proc


def kill_when_checkpointed(script, args, checkpoint, timeout=300, ready=None):
    """Start a stage as a real subprocess and SIGKILL it as soon as its first epoch checkpoint exists (and, when
    given, `ready(checkpoint contents)` holds)."""
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not checkpoint.exists() or (ready and not ready(torch.load(checkpoint, weights_only=False))):
        assert proc.poll() is None, f"{script} ended before it could be killed"
        assert time.time() < deadline, f"{script} wrote no checkpoint in {timeout} s"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def batch_on_a_gpu_that_fits(module, pipeline, tmp_path, args, metrics, fits, monkeypatch, capsys):
    """Run a baseline's main() in this process, on the synthetic pipeline's artifacts, as on a GPU whose free memory
    holds `fits` samples a training step: each trial step of common.fit_batch_size runs for real (on the CPU), and
    a larger one raises out-of-memory. Returns what the run printed and the batch size its `metrics` JSON records."""
    import common

    def fit_batch_size(trial_step, params, batch_size, device):
        def trial(n):
            trial_step(n)
            if n > fits:
                raise torch.OutOfMemoryError("CUDA out of memory")
        return common.fit_batch_size(trial, params, batch_size, torch.device("cuda"))

    out = copy_artifacts(pipeline, tmp_path, "dataset.json", "teacher.pt", "student.pt")
    monkeypatch.setattr(module, "fit_batch_size", fit_batch_size)
    monkeypatch.setattr(sys, "argv", [module.__file__, "--data", "synth", "--out", str(out), "--device", "cpu",
                                      *map(str, args)])
    module.main()
    return capsys.readouterr().out, json.loads((out / "synth" / metrics).read_text())["args"]["batch_size"]


def baseline_whole_and_resumed(pipeline, tmp_path, script, args, name, ready=None):
    """Run a baseline script (`args` after --data/--out) once whole, and once killed when its first epoch
    checkpoint (out/synth/<name>.ckpt.pt) exists (and `ready` holds: kill_when_checkpointed) and then run again;
    returns the two runs' metrics."""
    results = {}
    for run in ("whole", "killed"):
        out = copy_artifacts(pipeline, tmp_path / run, "dataset.json", "teacher.pt", "student.pt")
        command = ["--data", "synth", "--out", out, *args]
        checkpoint, metrics = out / "synth" / f"{name}.ckpt.pt", out / "synth" / f"{name}_metrics.json"
        if run == "killed":
            kill_when_checkpointed(script, command, checkpoint, ready=ready)
            assert not metrics.exists()
        proc = run_stage(script, *command)
        assert ("resuming from" in proc.stdout) == (run == "killed") and not checkpoint.exists()
        result = json.loads(metrics.read_text())
        for seed in result["per_seed"].values():  # wall times differ run to run; the LLM's share is part of the whole
            assert 0 < seed.pop("llm_seconds") <= seed.pop("seconds")
        results[run] = {key: result[key] for key in ("metrics", "std", "per_seed")}
    return results["whole"], results["killed"]


def copy_artifacts(pipeline, out, *names):
    """Copy some of the pipeline's artifacts (and their .meta.json) into OUT/synth, to rerun a stage apart."""
    (out / "synth").mkdir(parents=True, exist_ok=True)
    for name in names:
        if (pipeline / name).is_dir():
            shutil.copytree(pipeline / name, out / "synth" / name)
            continue
        for suffix in ("", ".meta.json"):
            if (pipeline / (name + suffix)).exists():
                (out / "synth" / (name + suffix)).write_bytes((pipeline / (name + suffix)).read_bytes())
    return out


def write_synthetic(path, seed=0):
    """S3-Rec file: items 1..40 in 4 groups of 10; each user walks forward through one group
    (item i is mostly followed by i+1), so a sequential model can learn it and k-means can find the groups."""
    rng = random.Random(seed)
    lines = []
    for user in range(1, NUM_USERS + 1):
        group = user % NUM_GROUPS
        pos = rng.randrange(GROUP_SIZE)
        seq = []
        for _ in range(rng.randint(6, 14)):
            seq.append(group * GROUP_SIZE + pos + 1)
            pos = (pos + 1) % GROUP_SIZE if rng.random() < 0.9 else rng.randrange(GROUP_SIZE)
        lines.append(" ".join(map(str, [user] + seq)))
    path.write_text("\n".join(lines) + "\n")
    attributes = {str(i): [(i - 1) // GROUP_SIZE] for i in range(1, NUM_GROUPS * GROUP_SIZE + 1)}
    (path.parent / (path.stem + "_item2attributes.json")).write_text(json.dumps(attributes))
    return path


def make_tiny_llm(path, arch="llama"):
    """A randomly initialised causal LM with a small BPE tokenizer, saved like any HF model directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    corpus = ["A shopper's items, oldest first: 1, 22, 333. The categories these items belong to:",
              "Answer: Yes Answer: No item title genre 0123456789 user history summary candidate"] + ["Answer: Yes No"] * 5
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<unk>", "<s>"],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="<s>")
    fast.save_pretrained(path)
    size = dict(vocab_size=fast.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    import torch
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**size)) if arch == "llama" else Qwen2ForCausalLM(Qwen2Config(**size))
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llm(tmp_path_factory):
    return str(make_tiny_llm(tmp_path_factory.mktemp("tiny_llama")))


@pytest.fixture(scope="session")
def synthetic_file(tmp_path_factory):
    return str(write_synthetic(tmp_path_factory.mktemp("data") / "Synth.txt"))


def write_synthetic_recbole(path, seed=0):
    """The synthetic data as RecBole files with item text: the .inter, and a .item giving each item a title and
    its group as genre, as ml-100k's carries them."""
    inter, items = ["user_id:token\titem_id:token\ttimestamp:float"], ["item_id:token\tmovie_title:token_seq\tclass:token_seq"]
    for line in write_synthetic(path.with_suffix(".txt"), seed).read_text().splitlines():
        user, *seq = line.split()
        inter += [f"{user}\t{item}\t{t}" for t, item in enumerate(seq)]
    items += [f"{i}\tFilm {i}\tgenre{(i - 1) // GROUP_SIZE}" for i in range(1, NUM_GROUPS * GROUP_SIZE + 1)]
    path.write_text("\n".join(inter) + "\n")
    path.with_suffix(".item").write_text("\n".join(items) + "\n")
    return path


@pytest.fixture(scope="session")
def titled(tmp_path_factory, tiny_llm):
    """Stages 01-04 on the synthetic data with titles, beyond the paper's ID-only setting: the SFT that names items by
    title (03_sft.py --item-repr title, 04_embed.py --titles) and the base LLM over item text (04_embed.py --text)."""
    out = tmp_path_factory.mktemp("titled")
    inter = write_synthetic_recbole(tmp_path_factory.mktemp("recbole") / "titled.inter")
    common = ["--data", "titled", "--out", out, "--device", "cpu"]
    run_stage("01_prepare.py", "--data-file", inter, *common)
    run_stage("02_teacher.py", *common, *TEACHER_ARGS)
    run_stage("03_sft.py", *common, "--llm", tiny_llm, "--item-repr", "title", *SFT_ARGS)
    run_stage("04_embed.py", *common, "--titles")
    run_stage("04_embed.py", *common, "--text", "--llm", tiny_llm)
    return out / "titled"


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory, tiny_llm, synthetic_file):
    """Run all five stages once on the synthetic data with tiny settings; returns the out dir of the dataset."""
    out = tmp_path_factory.mktemp("out")
    common = ["--data", "synth", "--out", out, "--device", "cpu"]
    run_stage("01_prepare.py", "--data-file", synthetic_file, *common)
    run_stage("02_teacher.py", *common, *TEACHER_ARGS)
    run_stage("03_sft.py", *common, "--llm", tiny_llm, *SFT_ARGS)
    run_stage("04_embed.py", *common)
    run_stage("05_student.py", *common, "--epochs", 5, "--batch-size", 16, "--lr", 5e-3, "--dim", 32, "--maxlen", 20, "--dropout", 0.2)
    return out / "synth"
