"""Batch extraction (python -m app.database.extract): bad lines, resumption, the command line."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from app.database import extract as extract_mod
from app.database.database import VliLmdb
from app.database.extract import PairError, main, parse_pair
from app.database.models import load_model
from helpers import fast_tsne  # noqa: F401 (autouse fixture: t-SNE is A's, tested there)
from tiny_vilt import build_tiny_vilt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_tiny_vilt(tmp_path_factory.mktemp("tiny-vqa"))


def load_vilt(ckpt):
    return load_model("vilt", [ckpt], progress=False)


def write_pairs(folder, lines):
    """Images 0..3 in folder/img/, then the pairs file with the given lines (dicts or raw strings)."""
    (folder / "img").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (40 + 8 * i, 64, 3), dtype=np.uint8)).save(folder / "img" / f"{i}.png")
    (folder / "img" / "broken.png").write_text("this is not a PNG")
    path = folder / "pairs.jsonl"
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


GOOD = [
    {"image": "img/0.png", "text": "what color is the circle ?", "label": "red"},
    {"image": "img/1.png", "text": "how many squares are there ?"},
]
MIXED = GOOD + [
    "{not json",
    {"image": "img/broken.png", "text": "what shape is left ?"},
    {"image": "img/2.png"},
    "",
    {"image": "img/3.png", "text": "what shape is right ?", "label": "square"},
]


def read_db(path):
    db = VliLmdb(path)
    try:
        return {i: db.example(i) for i in db.example_ids()}
    finally:
        db.close()


def test_parse_pair(tmp_path):
    assert parse_pair('{"image": "a/b.png", "text": "hi"}', str(tmp_path)) == {
        "image": str(tmp_path / "a" / "b.png"), "text": "hi", "label": None}
    assert parse_pair('{"image": "/abs/x.jpg", "text": "hi", "label": 3}', "/base")["label"] == "3"
    for line, message in [("[1, 2]", "expected a JSON object"), ("{", "invalid JSON"),
                          ('{"image": "x.png"}', "'text'"), ('{"text": "t", "image": ""}', "'image'"),
                          ('{"image": "x", "text": "t", "label": [1]}', "'label'")]:
        with pytest.raises(PairError, match=message):
            parse_pair(line, "/base")


def test_bad_lines_are_reported_and_skipped(ckpt, tmp_path, capsys):
    pairs = write_pairs(tmp_path, MIXED)
    out = tmp_path / "db"
    rc = main(["-m", "vilt", ckpt, "--pairs", str(pairs), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "3 added, 0 already in the database, 3 failed" in err
    assert "line 3: invalid JSON" in err
    assert "line 4: not an image Pillow can read:" in err and "broken.png" in err
    assert "line 5: missing or empty field 'text'" in err
    examples = read_db(out)
    assert sorted(examples) == [0, 1, 6]  # example id = line number - 1 on a new database
    assert examples[0].text == "what color is the circle ?" and examples[0].prediction["label"] == "red"
    assert examples[0].accuracy is not None and examples[1].accuracy is None
    assert examples[6].grid == (4, 4)  # 64 x 64 image: 4 x 4 patches of 16 px


def test_resume_after_interruption(ckpt, tmp_path, monkeypatch, capsys):
    pairs = write_pairs(tmp_path, GOOD + [{"image": "img/2.png", "text": "what shape is left ?"},
                                          {"image": "img/3.png", "text": "what shape is right ?"}])
    out = tmp_path / "db"
    seen = []
    real = extract_mod.run_data_setup

    def interrupted(model, ex_id, image, text, label=None):
        if len(seen) == 2:
            raise KeyboardInterrupt
        seen.append(ex_id)
        return real(model, ex_id, image, text, label=label)

    monkeypatch.setattr(extract_mod, "run_data_setup", interrupted)
    args = ["-m", "vilt", ckpt, "--pairs", str(pairs), "--out", str(out), "--no-progress"]
    assert main(args) == 130
    assert "run the same command again to resume" in capsys.readouterr().err
    assert sorted(read_db(out)) == [0, 1]

    monkeypatch.setattr(extract_mod, "run_data_setup", real)
    assert main(args) == 0
    assert "2 added, 2 already in the database, 0 failed" in capsys.readouterr().err
    examples = read_db(out)
    assert sorted(examples) == [0, 1, 2, 3]
    assert examples[3].text == "what shape is right ?"
    assert main(args) == 0  # nothing left to do, nothing duplicated
    assert sorted(read_db(out)) == [0, 1, 2, 3]


def test_resume_after_moving_the_project(ckpt, tmp_path, capsys):
    """The remembered run is keyed by the pairs file's path relative to the database, so a copy of
    both somewhere else (another clone, another machine) resumes instead of adding duplicates."""
    import shutil

    here = tmp_path / "here"
    here.mkdir()
    pairs = write_pairs(here, GOOD)
    assert main(["-m", "vilt", ckpt, "--pairs", str(pairs), "--out", str(here / "db"), "--no-progress"]) == 0
    moved = shutil.copytree(here, tmp_path / "elsewhere")
    shutil.rmtree(here)
    assert main(["-m", "vilt", ckpt, "--pairs", str(moved / "pairs.jsonl"), "--out", str(moved / "db"),
                 "--no-progress"]) == 0
    assert "0 added, 2 already in the database, 0 failed" in capsys.readouterr().err
    assert sorted(read_db(moved / "db")) == [0, 1]


def test_second_pairs_file_continues_after_existing_ids(ckpt, tmp_path, capsys):
    first = write_pairs(tmp_path, GOOD)
    other = tmp_path / "more"
    other.mkdir()
    second = write_pairs(other, GOOD[:1])
    out = str(tmp_path / "db")
    assert main(["-m", "vilt", ckpt, "--pairs", str(first), "--out", out, "--no-progress"]) == 0
    assert main(["-m", "vilt", ckpt, "--pairs", str(second), "--out", out, "--no-progress"]) == 0
    assert sorted(read_db(out)) == [0, 1, 2]
    # an explicit --first-id that disagrees with the remembered one is refused
    assert main(["-m", "vilt", ckpt, "--pairs", str(second), "--out", out, "--first-id", "9",
                 "--no-progress"]) == 2
    assert "--first-id 9 disagrees" in capsys.readouterr().err


def test_model_and_argument_errors_exit_2(tmp_path, capsys):
    pairs = write_pairs(tmp_path, GOOD)
    assert main(["-m", "nosuchmodel", "--pairs", str(pairs), "--out", str(tmp_path / "db")]) == 2
    assert "no model module app/database/models/nosuchmodel.py" in capsys.readouterr().err
    assert main(["-m", "vilt", "x", "--pairs", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "db")]) == 2
    assert "pairs file not found" in capsys.readouterr().err


def test_command_line_as_documented(ckpt, tmp_path):
    """The real command (real t-SNE too), as docs/models.md gives it."""
    pairs = write_pairs(tmp_path, GOOD[:1])
    out = tmp_path / "db"
    proc = subprocess.run(
        [sys.executable, "-m", "app.database.extract", "-m", "vilt", ckpt, "cpu", "--pairs", str(pairs),
         "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "1 added, 0 already in the database, 0 failed" in proc.stderr
    assert "extracting" in proc.stderr  # the tqdm bar
    assert sorted(read_db(out)) == [0]


# ------------------------------------------------------------------- under torchrun (pieces; tests/test_distributed.py runs it)
def test_torchrun_launch_from_the_environment():
    assert extract_mod.torchrun_launch({}) is None
    assert extract_mod.torchrun_launch({"RANK": "0", "WORLD_SIZE": "2"}) is None  # no LOCAL_RANK: not torchrun
    launch = extract_mod.torchrun_launch({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert launch == extract_mod.Launch(rank=3, world=4, local_rank=1)
    assert launch.shard("out") == os.path.join("out", "shard-00003-of-00004")
    with pytest.raises(ValueError, match="RANK 4 is not in 0..WORLD_SIZE-1"):
        extract_mod.torchrun_launch({"RANK": "4", "WORLD_SIZE": "4", "LOCAL_RANK": "0"})
    with pytest.raises(ValueError, match="not integers"):
        extract_mod.torchrun_launch({"RANK": "x", "WORLD_SIZE": "4", "LOCAL_RANK": "0"})


def test_device_goes_to_this_ranks_gpu():
    launch = extract_mod.Launch(rank=5, world=8, local_rank=1)
    assert extract_mod.model_params(["ckpt"], None, launch) == ["ckpt"]
    assert extract_mod.model_params(["ckpt"], "cuda", launch) == ["ckpt", "cuda:1"]
    assert extract_mod.model_params(["ckpt"], "cuda", None) == ["ckpt", "cuda"]
    assert extract_mod.model_params(["ckpt"], "cuda:0", launch) == ["ckpt", "cuda:0"]  # as given
    assert extract_mod.model_params(["ckpt"], "cpu", launch) == ["ckpt", "cpu"]


def test_sharded_first_id_is_remembered_and_continues(tmp_path):
    out = str(tmp_path / "out")
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert extract_mod.sharded_first_id(str(first), out, None, 5) == 0  # a new output starts at 0
    assert extract_mod.sharded_first_id(str(first), out, None, 5) == 0  # remembered
    assert extract_mod.sharded_first_id(str(first), out, 0, 5) == 0
    with pytest.raises(ValueError, match="--first-id 3 disagrees"):
        extract_mod.sharded_first_id(str(first), out, 3, 5)
    assert extract_mod.sharded_first_id(str(second), out, None, 2) == 5  # after a.jsonl's 5 lines
    assert extract_mod.sharded_first_id(str(first), out, None, 9) == 0  # a.jsonl grew to 9 lines
    third = tmp_path / "c.jsonl"
    assert extract_mod.sharded_first_id(str(third), out, None, 1) == 9  # after a's 9 (b: ids 5, 6)
    assert extract_mod.sharded_first_id(str(tmp_path / "d.jsonl"), out, 100, 1) == 100
    runs = json.loads((tmp_path / "out" / "extract_runs.json").read_text())
    assert runs["../a.jsonl"] == {"first_id": 0, "lines": 9} and runs["../d.jsonl"]["first_id"] == 100


def test_sharded_output_must_not_be_a_database(ckpt, tmp_path):
    pairs = write_pairs(tmp_path, GOOD[:1])
    assert main(["-m", "vilt", ckpt, "--pairs", str(pairs), "--out", str(tmp_path / "db"), "--no-progress"]) == 0
    with pytest.raises(ValueError, match="is a database; a torchrun extraction writes shard databases"):
        extract_mod.sharded_first_id(str(pairs), str(tmp_path / "db"), None, 1)


def test_a_rank_takes_every_world_th_line(ckpt, tmp_path):
    pairs = write_pairs(tmp_path, MIXED)  # lines 1, 2, 7 good; 3-5 bad; 6 blank
    db = VliLmdb(tmp_path / "shard", read_only=False)
    try:
        report = extract_mod.extract(load_vilt(ckpt), str(pairs), db, str(tmp_path / "shard"), first_id=10,
                                     progress=False, log=lambda msg: None, rank=0, world=2)
        assert report.added == [10, 16] and sorted(report.failed) == [3, 5]  # lines 1, 3, 5, 7
        assert db.example(16).text == "what shape is right ?"
    finally:
        db.close()


def test_device_option_reaches_the_model(ckpt, tmp_path, capsys):
    pairs = write_pairs(tmp_path, GOOD[:1])
    assert main(["-m", "vilt", ckpt, "--pairs", str(pairs), "--out", str(tmp_path / "db"), "--device", "cpu",
                 "--no-progress"]) == 0
    assert f"Loading model Vilt({ckpt}, cpu)" in capsys.readouterr().err
    assert main(["-m", "vilt", ckpt, "--pairs", str(pairs), "--out", str(tmp_path / "db2"), "--device", "nodevice",
                 "--no-progress"]) == 2
    assert "error: cannot load model Vilt" in capsys.readouterr().err


def test_vilt_with_a_batch_size_runs_the_default_loop(ckpt, tmp_path, capsys):
    """ViLT has no batching of its own: --batch-size 3 runs its pairs one by one, with what batch size 1 stores."""
    pairs = write_pairs(tmp_path, MIXED)
    for out, extra in (("one", []), ("three", ["--batch-size", "3"])):
        assert main(["-m", "vilt", ckpt, "--pairs", str(pairs), "--out", str(tmp_path / out), "--no-progress",
                     *extra]) == 1
        assert "3 added, 0 already in the database, 3 failed" in capsys.readouterr().err
    one, three = VliLmdb(tmp_path / "one"), VliLmdb(tmp_path / "three")
    try:
        assert one.example_ids() == three.example_ids() == [0, 1, 6]
        for ex_id in one.example_ids():
            assert three.example(ex_id).tokens == one.example(ex_id).tokens
            assert three.example(ex_id).prediction == one.example(ex_id).prediction
            for layer in range(one.n_layers):
                # one float16 step: ViLT's patch shuffle (undone) may change the order of the sums
                np.testing.assert_allclose(three.attention_matrix(ex_id, layer, 0),
                                           one.attention_matrix(ex_id, layer, 0), rtol=2.0 ** -10, atol=2.0 ** -14)
    finally:
        one.close()
        three.close()
