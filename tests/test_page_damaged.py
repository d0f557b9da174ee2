"""A damaged example is said in the page, and the rest of the database stays usable."""
import json

from app import ids
from app.database.database import VliLmdb
from app.server import create_app
from helpers import fast_tsne, make_db, make_record  # noqa: F401 (fixture)
from test_page_validation import Page


def _damaged_db(tmp_path, damaged: int):
    path = tmp_path / "db"
    writer, _ = make_db(path, [make_record(i, text=f"caption number {i}") for i in range(3)])
    writer.close()
    data = bytearray((path / "data.mdb").read_bytes())
    needle = f"caption number {damaged}".encode()
    at = data.find(needle)
    while at >= 0:  # every copy: free pages may hold stale ones, the live value is among them
        data[at + 2] ^= 0x20
        at = data.find(needle, at + 1)
    (path / "data.mdb").write_bytes(bytes(data))
    return VliLmdb(path)


def _banner(node):
    """The error banner's (text, style) in a layout."""
    if isinstance(node, list):
        return next((b for b in map(_banner, node) if b), None)
    if isinstance(node, dict):
        props = node.get("props", {})
        if props.get("id") == ids.PAGE_ERROR:
            return props.get("children"), props.get("style")
        return next((b for b in map(_banner, props.values()) if b), None)
    return None


def _select(page, ex_id) -> dict:
    """The whole answer to choosing example ``ex_id`` (outputs, and what the error handler set)."""
    d = page.dependency(f"{ids.PREDICTION}.children", f"{ids.EXAMPLE_SELECT}.value")
    outputs = [{"id": ids.PREDICTION, "property": "children"}, {"id": ids.PAGE_ERROR, "property": "children"},
               {"id": ids.PAGE_ERROR, "property": "style"}]
    body = {"output": d["output"], "outputs": outputs, "state": [], "changedPropIds": [f"{ids.EXAMPLE_SELECT}.value"],
            "inputs": [{"id": ids.EXAMPLE_SELECT, "property": "value", "value": ex_id}]}
    r = page.client.post("/_dash-update-component", data=json.dumps(body), content_type="application/json")
    assert r.status_code == 200
    return json.loads(r.data)


def test_selecting_a_damaged_example_says_so_and_the_others_still_open(tmp_path):
    db = _damaged_db(tmp_path, damaged=1)
    page = Page(create_app(db))
    assert _banner(json.loads(page.client.get("/_dash-layout").data)) == ("", {"display": "none"})
    banner = _select(page, 1)["sideUpdate"][ids.PAGE_ERROR]
    assert "example 1, description: the stored value is damaged" in banner["children"]
    assert banner["style"] == {}
    answer = _select(page, 2)["response"]
    assert "caption number 2" in json.dumps(answer[ids.PREDICTION])
    assert answer[ids.PAGE_ERROR] == {"children": "", "style": {"display": "none"}}
    db.close()


def test_a_damaged_first_example_still_opens_the_page(tmp_path):
    db = _damaged_db(tmp_path, damaged=0)
    client = create_app(db).server.test_client()
    response = client.get("/_dash-layout")
    assert response.status_code == 200
    text, style = _banner(json.loads(response.data))
    assert "example 0, description: the stored value is damaged" in text and style == {}
    db.close()
