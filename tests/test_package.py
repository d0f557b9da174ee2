"""The installable package: the wheel's contents and metadata, the ``vl-interpret`` command in a fresh
virtual environment, browsing without torch, and the notebook helpers (``app.notebook``).

The wheel is built offline (``pip wheel --no-build-isolation --no-index``) from a copy of the checkout
without its databases, so that the build leaves nothing (``build/``, ``*.egg-info``) in the checkout.
"""
from __future__ import annotations

import email
import os
import shutil
import subprocess
import sys
import types
import zipfile

import numpy as np
import pytest

from helpers import fake_tsne_maps, make_record, softmax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIST_INFO = "vl_interpret-0.1.0.dist-info"
MODEL_EXTRA = {"transformers", "safetensors", "torch", "accelerate"}  # requirements.txt lines that go to [models]
SERVE_EXTRA = {"gunicorn"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> str:
    work = tmp_path_factory.mktemp("wheel")
    source = work / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", "example_database*", "__pycache__", "build", "*.egg-info", ".venv"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(work / "dist"), str(source)], check=True, capture_output=True, timeout=120)
    (built,) = os.listdir(work / "dist")
    return str(work / "dist" / built)


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> str:
    """A fresh virtual environment with the wheel installed (its dependencies come from the system
    site-packages); returns its bin folder."""
    path = tmp_path_factory.mktemp("venv") / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(path)],
                   check=True, timeout=60)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(path / "bin" / "python"), "install", "-q",
                    "--no-deps", "--no-index", wheel], check=True, capture_output=True, timeout=120)
    return str(path / "bin")


def run_outside(command, cwd, **kwargs) -> subprocess.CompletedProcess:
    """Run ``command`` in ``cwd`` with no PYTHONPATH, so that ``app`` can only come from the venv."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=60, **kwargs)


def requirement_lines(name: str) -> list[str]:
    """The requirements of one of the checkout's requirements files, without comments and -r lines."""
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        lines = [line.split("#")[0].strip() for line in f]
    return [line for line in lines if line and not line.startswith("-r")]


def project_name(requirement: str) -> str:
    return requirement.split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip().lower()


# ------------------------------------------------------------------------------------------------ wheel
def test_wheel_holds_every_module_and_asset_and_nothing_else(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = set()
    for folder, dirs, files in os.walk(os.path.join(ROOT, "app")):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for file in files:
            if file.endswith((".py", ".css", ".js")):
                expected.add(os.path.relpath(os.path.join(folder, file), ROOT).replace(os.sep, "/"))
    assert {"app/assets/style.css", "app/assets/vli.js", "app/database/database.py", "app/cli.py",
            "app/notebook.py", "app/database/models/vilt.py"} <= expected
    assert {n for n in names if not n.startswith(DIST_INFO + "/")} == expected
    assert not any(n.endswith((".mdb", ".safetensors")) for n in names)  # databases and models stay out


def test_wheel_metadata_has_the_command_and_the_requirements_files_split_into_extras(wheel):
    archive = zipfile.ZipFile(wheel)
    entry_points = archive.read(f"{DIST_INFO}/entry_points.txt").decode()
    assert "[console_scripts]" in entry_points and "vl-interpret = app.cli:main" in entry_points
    metadata = email.message_from_bytes(archive.read(f"{DIST_INFO}/METADATA"))
    assert metadata["Name"] == "vl-interpret"
    assert set(metadata.get_all("Provides-Extra")) == {"serve", "models", "test"}
    runtime = requirement_lines("requirements.txt")
    expected = {r for r in runtime if project_name(r) not in MODEL_EXTRA | SERVE_EXTRA}
    expected |= {f'{r}; extra == "models"' for r in runtime if project_name(r) in MODEL_EXTRA}
    expected |= {f'{r}; extra == "serve"' for r in runtime if project_name(r) in SERVE_EXTRA}
    expected |= {f'{r}; extra == "test"' for r in requirement_lines("requirements-test.txt")}
    assert set(metadata.get_all("Requires-Dist")) == expected
    assert 'torch==2.13.0; extra == "models"' in expected  # the pin, and only with [models]


# ---------------------------------------------------------------------------------- installed command
def test_installed_command_runs_from_the_venv(venv, tmp_path):
    command = os.path.join(venv, "vl-interpret")
    shown = run_outside([command, "--help"], tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("usage: vl-interpret") and "-d DB" in shown.stdout
    assert "vl-interpret extract" in shown.stdout and "vl-interpret upgrade" in shown.stdout
    for subcommand, option in (("extract", "--pairs"), ("upgrade", "DB"), ("merge", "--into")):
        shown = run_outside([command, subcommand, "--help"], tmp_path)
        assert shown.returncode == 0 and option in shown.stdout, shown.stderr
    located = run_outside([os.path.join(venv, "python"), "-c",
                           "import app, app.server, os; print(app.__file__); print(sorted(os.listdir(app.server.ASSETS)))"],
                          tmp_path)
    assert located.returncode == 0, located.stderr
    module, assets = located.stdout.splitlines()
    assert module.startswith(os.path.dirname(venv)) and assets == "['style.css', 'vli.js']"


def test_installed_command_says_where_the_bundled_databases_are(venv, tmp_path):
    failed = run_outside([os.path.join(venv, "vl-interpret"), "-d", "example_database2"], tmp_path)
    assert failed.returncode == 2
    assert f"no database folder 'example_database2' in the current folder {tmp_path}" in failed.stderr
    assert "in a checkout of the VL-InterpreT repository" in failed.stderr


BROWSE_WITHOUT_TORCH = """
import sys

class NoTorch:  # as in a base install, which has no torch: importing it fails
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers", "safetensors"):
            raise ImportError(f"{name} is not installed")

sys.meta_path.insert(0, NoTorch())
import app.server
dash_app = app.server.create_app(sys.argv[1])
client = dash_app.server.test_client()
for url in ("/", "/_dash-layout", "/_dash-dependencies"):
    assert client.get(url).status_code == 200, url
print(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "safetensors")))
"""


def test_browsing_a_database_imports_no_torch(venv, small_db, tmp_path):
    browsed = run_outside([os.path.join(venv, "python"), "-c", BROWSE_WITHOUT_TORCH, small_db.path], tmp_path)
    assert browsed.returncode == 0, browsed.stderr
    assert browsed.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------ dispatch (cli)
def test_cli_hands_the_arguments_to_each_module(monkeypatch, small_db):
    import app.database.extract
    import app.database.merge
    import app.database.upgrade
    import app.server
    from app import cli

    calls = []
    for module in (app.database.extract, app.database.upgrade, app.database.merge, app.server):
        monkeypatch.setattr(module, "main", lambda argv, name=module.__name__, prog=None:
                            calls.append((name, argv, prog)) or 7)
    extract = ["-m", "vilt", "ckpt", "--pairs", "p.jsonl", "--out", "db"]
    assert cli.main(["extract", *extract]) == 7
    assert cli.main(["upgrade", "db1", "db2"]) == 7
    assert cli.main(["merge", "a", "b", "--into", "c"]) == 7
    assert cli.main(["-d", small_db.path, "-p", "0", "-m", "vilt", "ckpt"]) == 7
    assert calls == [("app.database.extract", extract, "vl-interpret extract"),
                     ("app.database.upgrade", ["db1", "db2"], "vl-interpret upgrade"),
                     ("app.database.merge", ["a", "b", "--into", "c"], "vl-interpret merge"),
                     ("app.server", ["-d", small_db.path, "-p", "0", "-m", "vilt", "ckpt"], None)]


def test_cli_from_a_checkout_points_at_its_databases(monkeypatch, tmp_path, capsys):
    from app import cli

    monkeypatch.chdir(tmp_path)
    assert cli.main(["-d", "example_database1"]) == 2
    assert f"did you mean {os.path.join(ROOT, 'example_database1')}?" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        cli.main([])  # -d is required: argparse's error, under the command's name
    assert exited.value.code == 2 and "usage: vl-interpret" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- notebook
TEXT = ["[CLS]", "is", "it", "red", "[SEP]"]
GRID = (2, 3)
N_LAYERS, N_HEADS, HIDDEN = 2, 3, 8


@pytest.fixture
def fast_tsne(monkeypatch):
    import app.database.analyses.tsne_maps as tsne_analysis

    monkeypatch.setattr(tsne_analysis, "tsne_maps", fake_tsne_maps)
    monkeypatch.setattr(tsne_analysis, "tsne_ready", lambda: None)


def vilt_like_outputs(seed: int, as_tensor):
    """Per-layer (1, heads, n, n) attentions and (1, n, hidden) hidden states of a sequence of the
    text, an image [CLS] and a 2x3 grid of patches in row-major order, and the stacked arrays."""
    rng = np.random.default_rng(seed)
    n = len(TEXT) + 1 + GRID[0] * GRID[1]
    attention = softmax(rng.normal(size=(N_LAYERS, N_HEADS, n, n)) * 2).astype(np.float32)
    hidden = rng.normal(size=(N_LAYERS + 1, n, HIDDEN)).astype(np.float32)
    attentions = tuple(as_tensor(layer[None]) for layer in attention)
    hidden_states = tuple(as_tensor(layer[None]) for layer in hidden)
    return attentions, hidden_states, attention, hidden


def example_fields(seed: int = 0) -> dict:
    coords = [(x, y) for y in range(GRID[0]) for x in range(GRID[1])]
    image = np.random.default_rng(seed).integers(0, 256, size=(32, 48, 3), dtype=np.uint8)
    return {"tokens": TEXT + ["[CLS]"] + [f"p{x}_{y}" for x, y in coords], "txt_len": len(TEXT),
            "img_coords": [None] + coords, "grid": GRID, "image": image}


def test_add_example_stores_a_hugging_face_output(tmp_path, fast_tsne):
    torch = pytest.importorskip("torch")
    from transformers.modeling_outputs import BaseModelOutput

    from app import notebook
    from app.database.database import VliLmdb

    db_path = str(tmp_path / "db")
    expected = {}
    for seed, as_tensor, wrap in ((0, torch.from_numpy, lambda a, h: BaseModelOutput(attentions=a, hidden_states=h)),
                                  (1, np.asarray, lambda a, h: types.SimpleNamespace(attentions=a, hidden_states=h))):
        attentions, hidden_states, attention, hidden = vilt_like_outputs(seed, as_tensor)
        fields = example_fields(seed)
        ex_id = notebook.add_example(db_path, wrap(attentions, hidden_states), **fields,
                                     prediction={"answer": "yes", "score": 0.9, "label": "yes"})
        expected[ex_id] = (attention, hidden, fields)
    assert sorted(expected) == [0, 1]
    with VliLmdb(db_path) as db:
        assert (db.n_layers, db.n_heads, db.hidden_size) == (N_LAYERS, N_HEADS, HIDDEN)
        for ex_id, (attention, hidden, fields) in expected.items():
            info = db.example(ex_id)
            assert list(info.tokens) == fields["tokens"] and tuple(info.grid) == GRID and info.accuracy is True
            np.testing.assert_array_equal(db.image(ex_id), fields["image"])
            for layer in range(N_LAYERS):
                for head in range(N_HEADS):  # stored as float16
                    np.testing.assert_allclose(db.attention_matrix(ex_id, layer, head), attention[layer, head],
                                               atol=1e-3)
            for layer in range(N_LAYERS + 1):
                np.testing.assert_allclose(db.hidden_states(ex_id, layer), hidden[layer], rtol=1e-3, atol=1e-3)


def test_add_example_reports_outputs_it_cannot_convert(tmp_path, fast_tsne):
    from app import notebook
    from app.database.records import RecordError

    db_path = str(tmp_path / "db")
    attentions, hidden_states, _, _ = vilt_like_outputs(0, np.asarray)
    batch_of_two = tuple(np.concatenate([a, a]) for a in attentions)
    with pytest.raises(ValueError, match=r"example 0: outputs\.attentions\[0\] has shape \(2, 3, 12, 12\), "
                                         r"expected \(1, heads, n, n\).*batch size 1"):
        notebook.add_example(db_path, types.SimpleNamespace(attentions=batch_of_two, hidden_states=hidden_states),
                             **example_fields())
    with pytest.raises(ValueError, match=r"outputs\.hidden_states is None: run the model with "
                                         r"output_hidden_states=True"):
        notebook.add_example(db_path, types.SimpleNamespace(attentions=attentions, hidden_states=None),
                             **example_fields())
    fields = {**example_fields(), "txt_len": 4}
    with pytest.raises(RecordError, match=r"example \d+, field 'img_coords'"):
        notebook.add_example(db_path, types.SimpleNamespace(attentions=attentions, hidden_states=hidden_states),
                             **fields)
    with pytest.raises(TypeError, match="expected a record dict or a model output"):
        notebook.add_example(db_path, [attentions, hidden_states])


def test_add_example_takes_a_record_and_gives_it_the_next_id(tmp_path, fast_tsne):
    from app import notebook
    from app.database.database import VliLmdb

    db_path = str(tmp_path / "db")
    record = make_record(5)
    assert notebook.add_example(db_path, record) == 5
    del record["ex_id"]
    assert notebook.add_example(db_path, record, text="a question") == 6
    with VliLmdb(db_path) as db:
        assert db.example_ids() == [5, 6]
        assert db.example(6).text == "a question" and list(db.example(6).tokens) == record["tokens"]


def test_show_runs_dash_in_jupyter_mode_and_lets_examples_be_added_meanwhile(small_db, tmp_path, monkeypatch,
                                                                             fast_tsne):
    import dash

    from app import notebook
    from app.database.models import VL_Model

    runs = []
    monkeypatch.setattr(dash.Dash, "run", lambda self, **options: runs.append((self, options)))
    db_path = str(tmp_path / "shown")
    shutil.copytree(small_db.path, db_path, ignore=shutil.ignore_patterns("lock.mdb"))
    shown = notebook.show(db_path)
    assert runs == [(shown, {"jupyter_mode": "inline", "jupyter_height": notebook.DEFAULT_HEIGHT,
                             "jupyter_width": "100%", "host": "127.0.0.1", "port": notebook.DEFAULT_PORT})]
    assert shown.server.test_client().get("/_dash-layout").status_code == 200
    before = len(shown.vli_context.db)
    ex_id = notebook.add_example(db_path, make_record(50, n_text=10, grid=(4, 5), n_layers=3, n_heads=4,
                                                      image_cls=True, hidden=8))
    assert shown.vli_context.db.example_ids()[-1] == ex_id and len(shown.vli_context.db) == before + 1

    class WrongShape(VL_Model):
        def dimensions(self):
            return (12, 12, 768)

        def data_setup(self, ex_id, image_location, input_text):
            raise AssertionError("not called")

    with pytest.raises(ValueError, match="has 12 layers x 12 heads"):
        notebook.show(db_path, model=WrongShape())
    assert len(runs) == 1
