import json

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
             (["--data-file", bad], "not an integer"),
             (["--data-file", short], "--drop-short")]
    for args, message in cases:
        proc = run_stage("01_prepare.py", *args, "--out", tmp_path / "out", check=False)
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.json"))
