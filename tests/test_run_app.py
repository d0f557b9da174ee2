"""The command line: errors are one line on stderr with exit status 2; --help works."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, timeout=120):
    return subprocess.run([sys.executable, os.path.join(ROOT, "run_app.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def assert_one_error_line(r):
    """Exit status 2, no traceback, and one line on stderr besides the progress lines."""
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip() and not l.startswith(("Opening", "Loading", "  "))]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr


def test_help():
    r = run("--help")
    assert r.returncode == 0
    for opt in ("-d", "--port", "--host", "-m", "--allow-paths"):
        assert opt in r.stdout


def test_bad_path_is_one_line_exit_2(tmp_path):
    r = run("-d", str(tmp_path / "nope"))
    assert_one_error_line(r)


def test_unpreprocessed_database_is_one_line_exit_2(tmp_path):
    import pickle

    from helpers import make_record

    from app.database.database import VliLmdb

    db = VliLmdb(tmp_path / "raw", read_only=False)
    db["0"] = pickle.dumps(make_record(0))
    db.close()
    r = run("-d", str(tmp_path / "raw"))
    assert_one_error_line(r)


def test_model_load_error_is_one_line_exit_2(small_db):
    r = run("-d", small_db.path, "-m", "no_such_model")
    assert_one_error_line(r)


def test_serve_is_a_wsgi_factory(small_db):
    """What gunicorn calls: ``gunicorn 'app.server:serve(db="...")'``."""
    from app.server import serve

    server = serve(db=small_db.path)
    client = server.test_client()
    assert client.get("/").status_code == 200
    layout = client.get("/_dash-layout").get_json()
    assert "Example 2" in str(layout)
