"""The command line: errors are one line on stderr with exit status 2; --help works."""
import os
import re
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, timeout=120):
    return subprocess.run([sys.executable, os.path.join(ROOT, "run_app.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def assert_one_error_line(r):
    """Exit status 2, no traceback, and one line on stderr besides the progress lines."""
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip() and not l.startswith(("Opening", "Loading", "Loaded", "  "))]
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


def test_invalid_port_is_one_line_exit_2(small_db):
    for port in ("99999", "-1", "http"):
        r = run("-d", small_db.path, "-p", port)
        assert_one_error_line(r)
        assert "invalid port" in r.stderr


def test_a_busy_port_is_said_before_the_model_loads(small_db):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        r = run("-d", small_db.path, "-p", str(port), "-m", "vilt", "no/such/checkpoint")
    assert_one_error_line(r)
    assert f"port {port}" in r.stderr and "Loading model" not in r.stderr and "running" not in r.stdout


def test_it_says_it_runs_once_it_listens(small_db):
    """With -p 0 (any free port) the address printed is the one bound, open at once."""
    server = subprocess.Popen([sys.executable, os.path.join(ROOT, "run_app.py"), "-d", small_db.path, "-p", "0"],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = server.stdout.readline()  # the first line of stdout: the server prints nothing else first
        match = re.search(r"open http://127\.0\.0\.1:(\d+)/ in your browser", line)
        assert match, line
        with socket.create_connection(("127.0.0.1", int(match[1])), timeout=10) as conn:
            conn.sendall(b"GET /_dash-layout HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            conn.settimeout(30)
            assert conn.recv(12) == b"HTTP/1.1 200"
    finally:
        server.terminate()
        server.wait(30)


def test_debug_is_refused_on_a_public_host(tmp_path):
    """Refused first, before the database is even opened (a missing one here: nothing is ever bound)."""
    r = run("-d", str(tmp_path / "nope"), "--host", "0.0.0.0", "--debug")
    assert_one_error_line(r)
    assert "--debug" in r.stderr and "127.0.0.1" in r.stderr and "Opening" not in r.stderr


def test_a_public_host_is_warned_and_its_address_shown(small_db, monkeypatch, capsys):
    """In-process, listening on 127.0.0.1 in fact (tests never listen on the network)."""
    import app.server as server_module

    real_listen = server_module._listen
    monkeypatch.setattr(server_module, "_listen", lambda host, port: real_listen("127.0.0.1", 0))
    monkeypatch.setattr(server_module, "_serve_forever", lambda server: None)
    assert server_module.main(["-d", small_db.path, "--host", "0.0.0.0", "-p", "0"]) == 0
    out, err = capsys.readouterr()
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: listening on 0.0.0.0: anyone on your network can open the app"]
    assert f"open http://{socket.gethostname()}:" in out
    assert server_module.network_warning("::", True).endswith("open the app and add examples with the loaded model")
    assert [server_module.is_loopback(h) for h in ("127.0.0.1", "localhost", "::1", "0.0.0.0", "", "::")] == \
        [True, True, True, False, False, False]


def test_a_model_that_does_not_fit_the_database_is_refused_at_start(small_db, tmp_path):
    from tiny_vilt import build_tiny_vilt

    checkpoint = build_tiny_vilt(tmp_path / "tiny")  # 2 layers x 4 heads, hidden 32; small_db: 3 x 4, 8
    r = run("-d", small_db.path, "-p", "0", "-m", "vilt", checkpoint)
    assert_one_error_line(r)
    assert ("model Vilt has 2 layers x 4 heads, hidden size 32, but the database "
            f"{small_db.path} has 3 layers x 4 heads, hidden size 8") in r.stderr
    assert "running" not in r.stdout


def test_serve_refuses_a_model_that_does_not_fit_the_database(small_db, tmp_path):
    """gunicorn's factory too: the worker does not start."""
    from tiny_vilt import build_tiny_vilt

    from app.server import serve

    with pytest.raises(SystemExit, match="model Vilt has 2 layers x 4 heads, hidden size 32, but the database"):
        serve(db=small_db.path, model="vilt", params=[build_tiny_vilt(tmp_path / "tiny")])


def test_a_model_without_its_parameters_says_which_it_takes(small_db):
    r = run("-d", small_db.path, "-p", "0", "-m", "vilt")
    assert_one_error_line(r)
    assert "error: Vilt needs CHECKPOINT [DEVICE]: -m vilt CHECKPOINT [DEVICE]" in r.stderr
