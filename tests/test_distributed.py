"""Extraction under torchrun (one shard database per process) and the merge of databases.

The torchrun test starts two real CPU processes (``python -m torch.distributed.run --standalone``),
resumes them on a grown pairs file, merges the shards, and compares the result with a one-process
extraction of the same pairs, example by example. Not bit for bit: ViLT shuffles the patches with
torch's RNG (the adapter undoes the shuffle), so every process sums in another order; the values are
compared at the float16 they are stored in (one float16 step) and the float32 statistics to 1e-5.
"""
import json
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from app import cli
from app.database import merge as merge_mod
from app.database.database import VliLmdb
from app.database.extract import main as extract_main
from helpers import fast_tsne, make_db, make_record  # noqa: F401 (fast_tsne: autouse fixture)
from tiny_vilt import build_tiny_vilt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = ["what color is the circle ?", "how many squares are there ?", "what shape is left ?",
         "what shape is right ?", "is there a red square ?", "how many circle are there ?",
         "what color is the square ?"]
TORCHRUN_TIMEOUT = 150  # seconds; two tiny-model ranks take about 15 s on two cores
FLOAT16_STEP = dict(rtol=2.0 ** -10, atol=2.0 ** -14)  # one float16 rounding either way


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_tiny_vilt(tmp_path_factory.mktemp("tiny-vqa"))


def pair_lines(folder):
    """Seven pairs of images of two sizes, then a line whose image is broken (line 8: rank 1)."""
    (folder / "img").mkdir(exist_ok=True)
    rng = np.random.default_rng(1)
    lines = []
    for i, text in enumerate(TEXTS):
        image = rng.integers(0, 256, (48 + 16 * (i % 2), 64, 3), dtype=np.uint8)
        Image.fromarray(image).save(folder / "img" / f"{i}.png")
        lines.append(json.dumps({"image": f"img/{i}.png", "text": text, "label": ["red", "2", "circle"][i % 3]}))
    (folder / "img" / "broken.png").write_text("not a PNG")
    lines.append(json.dumps({"image": "img/broken.png", "text": "what shape is left ?"}))
    return lines


def torchrun(ckpt, pairs, out):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
         "-m", "app.database.extract", "-m", "vilt", ckpt, "--pairs", str(pairs), "--out", str(out),
         "--device", "cpu", "--no-progress"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=TORCHRUN_TIMEOUT)


def ids_of(path):
    with VliLmdb(path) as db:
        return db.example_ids()


def assert_same_example(merged, ref, ex_id):
    a, b = merged.example(ex_id), ref.example(ex_id)
    for name in ("tokens", "txt_len", "coords", "grid", "image_size", "text", "accuracy", "notes"):
        assert getattr(a, name) == getattr(b, name), (ex_id, name)
    assert a.special.tolist() == b.special.tolist()
    assert a.prediction["answer"] == b.prediction["answer"] and a.prediction["label"] == b.prediction["label"]
    assert a.prediction["score"] == pytest.approx(b.prediction["score"], rel=1e-5)
    assert [[w for w, _p in layer] for layer in a.logit_lens] == [[w for w, _p in layer] for layer in b.logit_lens]
    assert np.array_equal(merged.image(ex_id), ref.image(ex_id))
    n = a.n_tokens
    for layer in range(merged.n_layers):
        for head in range(merged.n_heads):
            np.testing.assert_allclose(merged.attention_matrix(ex_id, layer, head),
                                       ref.attention_matrix(ex_id, layer, head), **FLOAT16_STEP)
        for query in range(n):
            np.testing.assert_allclose(merged.rollout(ex_id, layer, query), ref.rollout(ex_id, layer, query),
                                       **FLOAT16_STEP)
    for layer in range(merged.n_layers + 1):
        np.testing.assert_allclose(merged.hidden_states(ex_id, layer), ref.hidden_states(ex_id, layer),
                                   **FLOAT16_STEP)
        assert merged.tsne(ex_id, layer).shape == (n, 2)  # t-SNE is fitted per run: its layout differs
    stats_a, stats_b = merged.head_statistics(ex_id), ref.head_statistics(ex_id)
    assert stats_a.keys() == stats_b.keys()
    for name in stats_a:
        np.testing.assert_allclose(stats_a[name], stats_b[name], rtol=1e-5, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(merged.relevancy(ex_id, range(n)), ref.relevancy(ex_id, range(n)),
                               rtol=1e-4, atol=1e-6)


def assert_nearest_is_brute_force(db, layer):
    """The merged database's nearest-token index against a scan of its own stored hidden states."""
    ids = db.example_ids()
    states = {i: db.hidden_states(i, layer).astype(np.float64) for i in ids}
    unit = {i: s / np.linalg.norm(s, axis=1, keepdims=True) for i, s in states.items()}
    for ex_id in ids[:2]:
        info = db.example(ex_id)
        for token in np.flatnonzero(~info.special):
            want_text = token >= info.txt_len  # an image token looks for text, and the other way round
            best = max(float(unit[ex_id][token] @ unit[j][t]) for j in ids for t in range(db.example(j).n_tokens)
                       if not db.example(j).special[t] and (t < db.example(j).txt_len) == want_text)
            found = db.nearest_other_modality(ex_id, layer, int(token))
            assert (found.token < db.example(found.ex_id).txt_len) == want_text
            assert float(unit[ex_id][token] @ unit[found.ex_id][found.token]) == pytest.approx(best, abs=1e-5)
            assert found.similarity == pytest.approx(best, abs=1e-3)


def test_torchrun_resumes_and_merges_to_the_one_process_database(ckpt, tmp_path, capsys):
    lines = pair_lines(tmp_path)
    pairs = tmp_path / "pairs.jsonl"
    out = tmp_path / "out"
    shards = [out / "shard-00000-of-00002", out / "shard-00001-of-00002"]

    # first run on the first half, as if stopped there; line k went to rank (k - 1) % 2 as id k - 1
    pairs.write_text("\n".join(lines[:4]) + "\n")
    first = torchrun(ckpt, pairs, out)
    assert first.returncode == 0, first.stderr
    assert "all 2 ranks: 4 added, 0 already in the shards, 0 failed" in first.stderr
    assert [ids_of(s) for s in shards] == [[0, 2], [1, 3]]

    # the same command on the whole file: each rank skips what its shard holds; rank 1's broken line
    # fails it, but only after rank 0 finished too (torchrun would have stopped it otherwise)
    pairs.write_text("\n".join(lines) + "\n")
    second = torchrun(ckpt, pairs, out)
    assert second.returncode != 0
    assert "rank 0: 2 added, 2 already in the database, 0 failed" in second.stderr
    assert "rank 1: 1 added, 2 already in the database, 1 failed" in second.stderr
    assert "line 8: not an image Pillow can read" in second.stderr
    assert "all 2 ranks: 3 added, 4 already in the shards, 1 failed" in second.stderr
    assert [ids_of(s) for s in shards] == [[0, 2, 4, 6], [1, 3, 5]]

    merged = tmp_path / "merged"
    assert cli.main(["merge", *map(str, shards), "--into", str(merged), "--no-progress"]) == 0
    assert "7 merged, 0 already in the database or duplicates, 0 failed" in capsys.readouterr().err
    assert cli.main(["merge", *map(str, shards), "--into", str(merged), "--no-progress"]) == 0  # resumable
    assert "0 merged, 7 already in the database or duplicates, 0 failed" in capsys.readouterr().err

    ref = tmp_path / "one-process"
    assert extract_main(["-m", "vilt", ckpt, "--pairs", str(pairs), "--out", str(ref), "--no-progress"]) == 1
    with VliLmdb(merged) as m, VliLmdb(ref) as r:
        assert m.example_ids() == r.example_ids() == list(range(7))
        for ex_id in r.example_ids():
            assert_same_example(m, r, ex_id)
        assert_nearest_is_brute_force(m, layer=m.n_layers)


def small_db(path, texts, n_heads=2, first_id=0):
    """A database of random records with the given texts (preprocessed from pickles: each has a source hash)."""
    records = [make_record(first_id + i, n_heads=n_heads, seed=first_id + i, text=t) for i, t in enumerate(texts)]
    db, report = make_db(path, records)
    assert not report.failed
    db.close()
    return str(path)


def test_merge_keeps_ids_skips_duplicates_and_reports_conflicts(tmp_path, capsys):
    a = small_db(tmp_path / "a", ["one", "two"])
    b = small_db(tmp_path / "b", ["two", "three"], first_id=1)  # id 1 "two": the same example as a's
    c = small_db(tmp_path / "c", ["other"], first_id=2)  # id 2 taken by b's "three"
    copy_of_a = str(shutil.copytree(a, tmp_path / "copy_of_a"))
    empty = tmp_path / "empty"
    VliLmdb(empty, read_only=False).close()  # a shard that got no line
    into = str(tmp_path / "merged")
    assert merge_mod.main([a, b, c, copy_of_a, str(empty), "--into", into, "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"{empty}: no examples, passed over" in err
    assert "3 merged, 3 already in the database or duplicates, 1 failed" in err
    assert f"{c} example 2: example 2 is already in {into} with another text (--renumber merges both)" in err
    with VliLmdb(into) as merged, VliLmdb(b) as source:
        assert merged.example_ids() == [0, 1, 2]
        assert [merged.example(i).text for i in (0, 1, 2)] == ["one", "two", "three"]
        for layer in range(merged.n_layers):  # copied verbatim
            assert np.array_equal(merged.attention_matrix(2, layer, None), source.attention_matrix(2, layer, None))
        assert_nearest_is_brute_force(merged, layer=1)  # indexed for the merged database


def test_merge_renumber_resumes_and_skips_the_same_raw_record(tmp_path, capsys):
    a = small_db(tmp_path / "a", ["one", "two"])
    b = small_db(tmp_path / "b", ["uno", "dos"])  # the same ids, other examples
    copy_of_a = str(shutil.copytree(a, tmp_path / "copy_of_a"))  # the same raw records under another name
    into = str(tmp_path / "merged")
    args = [a, b, copy_of_a, "--into", into, "--renumber", "--no-progress"]
    assert merge_mod.main(args) == 0
    err = capsys.readouterr().err
    assert "4 merged, 2 already in the database or duplicates, 0 failed" in err
    assert "(same raw record): skipped" in err
    with VliLmdb(into) as merged:
        # id order, ties in the order given: a0, b0, a1, b1
        assert [merged.example(i).text for i in merged.example_ids()] == ["one", "uno", "two", "dos"]
        with VliLmdb(b) as source:
            assert np.array_equal(merged.hidden_states(3, 2), source.hidden_states(1, 2))
    assert merge_mod.main(args) == 0
    assert "0 merged, 6 already in the database or duplicates, 0 failed" in capsys.readouterr().err
    with VliLmdb(into) as merged:
        assert len(merged) == 4


def test_merge_refuses_databases_of_different_models(tmp_path, capsys):
    two = small_db(tmp_path / "two_heads", ["one"])
    four = small_db(tmp_path / "four_heads", ["two"], n_heads=4, first_id=1)
    into = tmp_path / "merged"
    assert cli.main(["merge", two, four, "--into", str(into), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err.startswith("error: the databases disagree on the model's shape: ")
    assert f"{two}: 2 layers, 2 heads, hidden size 8" in err and f"{four}: 2 layers, 4 heads, hidden size 8" in err
    assert not into.exists()  # refused before anything was written
    assert cli.main(["merge", two, "--into", two]) == 2
    assert "is one of the databases to merge" in capsys.readouterr().err


def test_merge_refuses_a_target_of_another_model(tmp_path, capsys):
    into = small_db(tmp_path / "target", ["one"], n_heads=4)
    two = small_db(tmp_path / "two_heads", ["two"], first_id=1)
    assert merge_mod.main([two, "--into", into]) == 2
    assert f"{into} (the target): 2 layers, 4 heads" in capsys.readouterr().err
    assert ids_of(into) == [0]


def test_merge_of_pending_only_folder_is_refused(tmp_path, capsys):
    path = tmp_path / "pending_only"
    db = VliLmdb(path, read_only=False)
    db["0"] = pickle.dumps(make_record(0))
    db.close()
    assert merge_mod.main([str(path), "--into", str(tmp_path / "m")]) == 2
    assert "pending record(s) but no preprocessed examples" in capsys.readouterr().err
