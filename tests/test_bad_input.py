"""Every mistake a user can make gets exit code 2, one line on stderr naming the problem and the fix,
and no new file in the out directory."""
import os

import pytest

from conftest import copy_artifacts, run_stage

S3REC_CASES = {  # file content -> words the error must contain
    "non-integer item": ("1 5 6 x7\n", "Bad.txt:1: item 'x7' is not a non-negative decimal ID"),
    "non-integer user": ("u1 5 6 7\n", "Bad.txt:1: user 'u1' is not a non-negative decimal ID"),
    "negative item": ("1 5 6 7\n2 5 -5 7\n", "Bad.txt:2: item '-5' is not a non-negative decimal ID"),
    "exponent item": ("1 5 6 1e3\n", "Bad.txt:1: item '1e3' is not a non-negative decimal ID"),
    "hexadecimal item": ("1 5 0x1F 7\n", "Bad.txt:1: item '0x1F' is not a non-negative decimal ID"),
    "float item": ("1 3.0 6 7\n", "Bad.txt:1: item '3.0' is not a non-negative decimal ID"),
    "signed user": ("+1 5 6 7\n", "Bad.txt:1: user '+1' is not a non-negative decimal ID"),
    "too few interactions": ("1 5 6 7\n2 5\n", "fewer than 3 interactions"),
    "user on two lines": ("1 5 6 7\n1 8 9 10\n", "appears on two lines"),
    "empty file": ("\n\n", "holds no interactions"),
}
RECBOLE_HEADER = "user_id:token\titem_id:token\ttimestamp:float\n"
RECBOLE_CASES = {
    "header lacks timestamp": ("user_id:token\titem_id:token\n1\t2\n", "header lacks timestamp"),
    "wrong column count": (RECBOLE_HEADER + "1\t2\t3\n1\t3\n", "2 columns where the header has 3"),
    "second header": (RECBOLE_HEADER + "1\t2\t3\n" + RECBOLE_HEADER, "a second header line"),
    "timestamp not a number": (RECBOLE_HEADER + "1\t2\tnoon\n", "'noon' is not a number"),
    "negative item": (RECBOLE_HEADER + "1\t2\t3\n1\t-5\t4\n", "bad.inter:3: item '-5' is not a non-negative decimal ID"),
    "empty .inter": ("", "is empty"),
}


def snapshot(directory):
    return {os.path.join(root, f): os.path.getmtime(os.path.join(root, f))
            for root, _, files in os.walk(directory) for f in files}


def assert_clean_failure(proc, words, out, before):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], proc.stderr
    assert snapshot(out) == before  # nothing written, nothing half-written


FILE_CASES = ([("Bad.txt", *case) for case in S3REC_CASES.values()] +
              [("bad.inter", *case) for case in RECBOLE_CASES.values()])


@pytest.mark.parametrize("filename,content,words", FILE_CASES, ids=list(S3REC_CASES) + list(RECBOLE_CASES))
def test_malformed_data_file(tmp_path, filename, content, words):
    (tmp_path / filename).write_text(content)
    before = snapshot(tmp_path)
    proc = run_stage("01_prepare.py", "--data-file", tmp_path / filename, "--out", tmp_path / "out", check=False)
    assert_clean_failure(proc, words, tmp_path, before)


def test_file_that_is_not_text(tmp_path):
    (tmp_path / "Photo.txt").write_bytes(bytes(range(128, 256)) * 4)
    before = snapshot(tmp_path)
    proc = run_stage("01_prepare.py", "--data-file", tmp_path / "Photo.txt", "--out", tmp_path / "out", check=False)
    assert_clean_failure(proc, "is not a text file", tmp_path, before)


def test_missing_file_and_unknown_dataset(tmp_path):
    proc = run_stage("01_prepare.py", "--data-file", tmp_path / "nowhere.txt", "--out", tmp_path / "out", check=False)
    assert_clean_failure(proc, "not found", tmp_path, {})
    proc = run_stage("01_prepare.py", "--data", "amazon-books", "--out", tmp_path / "out", check=False)
    assert_clean_failure(proc, "unknown dataset 'amazon-books'", tmp_path, {})


@pytest.fixture
def prepared(pipeline, tmp_path):
    """A private copy of the pipeline's artifacts, so a stage that wrongly wrote something would show."""
    return copy_artifacts(pipeline, tmp_path / "out", "dataset.json", "teacher.pt", "sft_head.pt", "item_emb.pt")


STAGE_CASES = [
    ("02_teacher.py", ["--epochs", "-1"], "--epochs must be positive"),
    ("02_teacher.py", ["--batch-size", "0"], "--batch-size must be positive"),
    ("02_teacher.py", ["--dim", "30", "--heads", "4"], "must be divisible by --heads"),
    ("02_teacher.py", ["--name", "../teacher"], "--name '../teacher' must be a file name"),
    ("03_sft.py", ["--k", "1000"], "larger than the number of items"),
    ("03_sft.py", ["--val-frac", "1.5"], "--val-frac must lie between 0 and 1"),
    ("03_sft.py", ["--max-items", "0"], "--max-items must be positive"),
    ("04_embed.py", ["--max-tokens", "0"], "--max-tokens must be positive"),
    ("05_student.py", ["--models", "sasrec,transformer"], "unknown --models entry transformer"),
    ("05_student.py", ["--lr", "-0.1"], "--lr must be positive"),
    ("baselines/llm_trsr.py", ["--candidates", "5"], "--candidates must be at least 11"),
    ("baselines/llm_trsr.py", ["--block-size", "0"], "--block-size must be positive"),
]


@pytest.mark.parametrize("script,args,words", STAGE_CASES)
def test_out_of_range_arguments(prepared, script, args, words):
    before = snapshot(prepared)
    proc = run_stage(script, "--data", "synth", "--out", prepared, "--device", "cpu", *args, check=False)
    assert_clean_failure(proc, words, prepared, before)


@pytest.mark.parametrize("script,needs", [("02_teacher.py", "01_prepare.py"), ("03_sft.py", "02_teacher.py"),
                                          ("04_embed.py", "03_sft.py"), ("05_student.py", "04_embed.py"),
                                          ("baselines/llm_trsr.py", "02_teacher.py")])
def test_stage_run_before_the_one_it_needs(pipeline, tmp_path, script, needs):
    earlier = {"02_teacher.py": [], "03_sft.py": ["dataset.json"], "04_embed.py": ["dataset.json", "teacher.pt"],
               "05_student.py": ["dataset.json", "teacher.pt", "sft_head.pt"],
               "baselines/llm_trsr.py": ["dataset.json"]}[script]
    out = copy_artifacts(pipeline, tmp_path / "out", *earlier)
    before = snapshot(out)
    proc = run_stage(script, "--data", "synth", "--out", out, "--device", "cpu", check=False)
    assert_clean_failure(proc, f"python {needs}", out, before)


def test_llm_that_is_not_a_causal_lm(prepared, tmp_path, tiny_llm, monkeypatch):
    from transformers import T5Config
    T5Config(vocab_size=300, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2).save_pretrained(tmp_path / "t5")
    (tmp_path / "fake.gguf").write_text("not a GGUF file")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # where a GGUF would be converted
    for llm, words in ((tmp_path, "is not a model"), (tmp_path / "t5", "is an encoder-decoder model"),
                       (tmp_path / "fake.gguf", "could not be loaded")):
        before = snapshot(prepared)
        proc = run_stage("03_sft.py", "--data", "synth", "--out", prepared, "--llm", llm, "--k", 4, "--device", "cpu", check=False)
        assert_clean_failure(proc, words, prepared, before)
    assert not list((tmp_path / "cache").rglob("*"))  # no half-converted copy left behind


@pytest.mark.parametrize("script,args", [("03_sft.py", ["--k", 4]), ("baselines/delrec.py", [])])
def test_data_changed_after_the_teacher(prepared, script, args):
    dataset = prepared / "synth" / "dataset.json"
    dataset.write_text(dataset.read_text().replace('"name"', '"name" ', 1))  # same data, other bytes: a new fingerprint
    before = snapshot(prepared)
    proc = run_stage(script, "--data", "synth", "--out", prepared, *args, "--device", "cpu", check=False)
    assert_clean_failure(proc, "was made from a different dataset_fingerprint", prepared, before)


def test_titles_asked_of_a_dataset_without_them(prepared, tiny_llm):
    before = snapshot(prepared)
    proc = run_stage("03_sft.py", "--data", "synth", "--out", prepared, "--llm", tiny_llm, "--k", 4, "--item-repr", "title",
                     "--device", "cpu", check=False)
    assert_clean_failure(proc, "--item-repr title needs item titles", prepared, before)


def test_text_asked_of_a_dataset_without_it(prepared, tiny_llm):
    for flag in ("--text", "--titles"):
        before = snapshot(prepared)
        proc = run_stage("04_embed.py", "--data", "synth", "--out", prepared, "--llm", tiny_llm, flag, "--device", "cpu",
                         check=False)
        assert_clean_failure(proc, f"{flag} needs item titles, and this dataset has none: RecBole data carries them in "
                             "the .item file beside the .inter", prepared, before)


def test_an_llm_too_big_for_the_memory_is_refused_before_loading(prepared, tiny_llm, tmp_path):
    """A 70B-shaped config (its weights never exist): refused from the parameter count, before any allocation."""
    from transformers import AutoTokenizer, LlamaConfig
    big = tmp_path / "big_llm"
    AutoTokenizer.from_pretrained(tiny_llm).save_pretrained(big)
    LlamaConfig(vocab_size=300, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                num_attention_heads=64, num_key_value_heads=8).save_pretrained(big)
    before = snapshot(prepared)
    proc = run_stage("03_sft.py", "--data", "synth", "--out", prepared, "--llm", big, "--k", 4, "--device", "cpu", check=False)
    assert_clean_failure(proc, "has 68.5B parameters: its float32 weights alone need 255.0 GiB", prepared, before)
    assert "choose an LLM of at most about" in proc.stderr


def test_device_torch_does_not_know(prepared):
    for device, words in (("gpu", "--device gpu is not a device torch knows"), ("mps", "only cpu and cuda devices")):
        before = snapshot(prepared)
        proc = run_stage("02_teacher.py", "--data", "synth", "--out", prepared, "--device", device, check=False)
        assert_clean_failure(proc, words, prepared, before)


DAMAGES = {"truncated": lambda data: data[: len(data) // 2], "empty": lambda data: b"",
           "not its format": lambda data: b"<html>not an artifact</html>", "a word": lambda data: b"junk\n"}
DAMAGED_CASES = [  # artifact, the stage that reads it (and its options), the fix the error must name
    ("dataset.json", "02_teacher.py", [], "rerun python 01_prepare.py --data synth"),
    ("teacher.pt", "03_sft.py", ["--k", 4], "rerun python 02_teacher.py --data synth"),
    ("teacher.pt.meta.json", "03_sft.py", ["--k", 4], "rerun python 02_teacher.py --data synth"),
    ("sft_head.pt", "04_embed.py", ["--base"], "rerun python 03_sft.py --data synth"),
    ("item_emb.pt", "05_student.py", [], "rerun python 04_embed.py --data synth"),
    ("students.ckpt.pt", "05_student.py", [], "delete it and rerun the command that wrote it"),
]


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("artifact,script,args,fix", DAMAGED_CASES, ids=[c[0] for c in DAMAGED_CASES])
def test_damaged_artifact(prepared, artifact, script, args, fix, damage):
    """An artifact damaged outside the program: one line naming the file and the stage to rerun, nothing written."""
    path = prepared / "synth" / artifact
    path.write_bytes(DAMAGES[damage](path.read_bytes() if path.exists() else b'{"settings": 1}'))
    before = snapshot(prepared)
    proc = run_stage(script, "--data", "synth", "--out", prepared, "--device", "cpu", *args, check=False)
    assert_clean_failure(proc, f"{path} is damaged", prepared, before)
    assert fix in proc.stderr
