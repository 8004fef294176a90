import json

import pytest

from conftest import NUM_USERS, run_stage


def test_bundled_beauty_statistics(tmp_path):
    run_stage("01_prepare.py", "--data", "beauty", "--out", tmp_path)
    stats = json.loads((tmp_path / "beauty" / "stats.json").read_text())
    assert (stats["users"], stats["items"], stats["interactions"]) == (22363, 12101, 198502)


def test_recbole_file_is_sorted_by_time_and_reindexed(tmp_path):
    inter = tmp_path / "toy.inter"
    inter.write_text("user_id:token\titem_id:token\ttimestamp:float\n"
                     "7\t500\t30\n7\t100\t10\n7\t300\t20\n8\t100\t5\n8\t300\t6\n8\t500\t7\n")
    run_stage("01_prepare.py", "--data-file", inter, "--out", tmp_path)
    data = json.loads((tmp_path / "toy" / "dataset.json").read_text())
    assert data["item_ids"] == [100, 300, 500] and data["num_items"] == 3
    assert data["sequences"] == [[1, 2, 3], [1, 2, 3]]


def test_ml100k_keeps_titles_and_genres(tmp_path):
    run_stage("01_prepare.py", "--data", "ml-100k", "--out", tmp_path)
    data = json.loads((tmp_path / "ml-100k" / "dataset.json").read_text())
    assert data["item_titles"][1] == "Toy Story"
    assert "Animation" in data["item_groups"][1]
    assert len(data["sequences"]) == 943


def test_synthetic_pipeline_dataset(pipeline):
    data = json.loads((pipeline / "dataset.json").read_text())
    assert len(data["sequences"]) == NUM_USERS
    assert data["item_groups"][1] == ["0"]
    assert (pipeline / "dataset.json.meta.json").exists()


def test_bad_inputs_give_one_line_and_write_nothing(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("1 2 3 4\n2 5 x 7\n")
    short = tmp_path / "short.txt"
    short.write_text("1 2 3 4\n2 5\n")
    cases = [(["--data", "nope"], "unknown dataset"),
             (["--data-file", tmp_path / "missing.txt"], "not found"),
             (["--data-file", bad], "bad.txt:2: item 'x' is not a non-negative decimal ID"),
             (["--data-file", short], "--drop-short")]
    for args, message in cases:
        proc = run_stage("01_prepare.py", *args, "--out", tmp_path / "out", check=False)
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.json"))


PLAIN_S3REC = "1 5 6 7 8\n2 6 7 9\n3 5 9 8 6\n"
S3REC_AS_SAVED = {  # how editors and exports write the same file
    "BOM and CRLF": "\ufeff" + PLAIN_S3REC.replace("\n", "\r\n"),
    "CR line endings": PLAIN_S3REC.replace("\n", "\r"),
    "tabs and several spaces": PLAIN_S3REC.replace(" ", "\t", 2).replace("6 7", "6    7"),
    "trailing whitespace and blank lines": PLAIN_S3REC.replace("\n", " \t \n") + "\n  \n",
}
PLAIN_INTER = "user_id:token\titem_id:token\ttimestamp:float\n7\t500\t30\n7\t100\t10\n7\t300\t20\n"
INTER_AS_SAVED = {
    "BOM and CRLF": "\ufeff" + PLAIN_INTER.replace("\n", "\r\n"),
    "trailing whitespace": PLAIN_INTER.replace("\n", "  \n"),
}


def prepare_as(tmp_path, folder, filename, content):
    (tmp_path / folder).mkdir()
    (tmp_path / folder / filename).write_bytes(content.encode("utf-8"))
    run_stage("01_prepare.py", "--data-file", tmp_path / folder / filename, "--out", tmp_path / folder / "out")
    return (tmp_path / folder / "out" / filename.rsplit(".", 1)[0] / "dataset.json").read_text()


@pytest.mark.parametrize("filename,plain,variant", [("Shop.txt", PLAIN_S3REC, v) for v in S3REC_AS_SAVED.values()] +
                         [("Shop.inter", PLAIN_INTER, v) for v in INTER_AS_SAVED.values()],
                         ids=[f"s3rec: {k}" for k in S3REC_AS_SAVED] + [f"recbole: {k}" for k in INTER_AS_SAVED])
def test_files_as_people_save_them_give_the_plain_dataset(tmp_path, filename, plain, variant):
    assert prepare_as(tmp_path, "variant", filename, variant) == prepare_as(tmp_path, "plain", filename, plain)


def test_dataset_keeps_the_file_name_and_lists_prepared_ones(tmp_path):
    (tmp_path / "My_Shop.txt").write_text(PLAIN_S3REC)
    proc = run_stage("01_prepare.py", "--data-file", tmp_path / "My_Shop.txt", "--out", tmp_path / "out")
    assert (tmp_path / "out" / "My_Shop" / "dataset.json").exists()
    assert "next: python 02_teacher.py --data My_Shop" in proc.stdout
    proc = run_stage("02_teacher.py", "--data", "my_shop", "--out", tmp_path / "out", check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1
    assert "dataset 'my_shop' is not prepared" in lines[0] and "(prepared: My_Shop)" in lines[0], lines
