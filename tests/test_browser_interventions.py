"""The Interventions panel in headless Chromium with a tiny ViLT loaded, as a person uses it: press "Ablate
each head", watch the run in the background (the page stays usable), see the layers x heads heatmap of
the answer's score without each head, and click a head to select it in the head summary."""
import copy

import numpy as np
import pytest

from app import ids
from app.database.database import VliLmdb
from app.server import create_app
from conftest import browser_available
from test_app_e2e import click_graph_point, graph_js, wait_for_steady_plot, wait_until
from test_page_interventions import patches_of, records, vilt  # noqa: F401 - the fixtures

pytestmark = pytest.mark.skipif(not browser_available(), reason="needs /usr/bin/chromium and chromedriver")


def test_ablate_each_head_and_open_the_one_that_matters(dash_duo, tmp_path, vilt, records):  # noqa: F811
    db = VliLmdb(tmp_path / "db", read_only=False)
    for record in records:
        db.add_record(copy.deepcopy(record))
    app = create_app(db, model=vilt)
    try:
        dash_duo.start_server(app)
        button = dash_duo.wait_for_element("#" + ids.IV_SWEEP, timeout=15)
        dash_duo.driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", button)
        button.click()
        z = wait_until(lambda: graph_js(dash_duo, ids.IV_SWEEP_GRAPH,
                                        "const t = gd._fullData && gd._fullData[0];"
                                        "return t && t.z && Array.from(t.z, row => Array.from(row));"),
                       timeout=60, what="the sweep's heatmap")
        record = records[0]
        original = vilt.predict(record["image"], record["text"], patches_of(record))
        expected = np.array([[vilt.ablate(record["image"], record["text"], [(l, h)], patches=patches_of(record))
                              ["scores"][original["index"]] for h in range(4)] for l in range(2)]) - original["score"]
        assert np.allclose(np.array(z), expected, atol=1e-5)
        assert dash_duo.find_element("#" + ids.IV_SWEEP_GRAPH).is_displayed()
        assert f"Re-run answer '{original['answer']}'" in dash_duo.find_element("#" + ids.IV_SWEEP_TEXT).text
        dash_duo.wait_for_text_to_equal("#" + ids.IV_RUN_STATUS, "", timeout=10)  # the progress bar has gone
        layer, head = np.unravel_index(int(np.argmin(expected)), expected.shape)  # the head the answer needs most
        graph = dash_duo.find_element("#" + ids.IV_SWEEP_GRAPH)
        dash_duo.driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", graph)
        wait_for_steady_plot(dash_duo, ids.IV_SWEEP_GRAPH)  # shown just now: plotly resizes it to its box
        click_graph_point(dash_duo, ids.IV_SWEEP_GRAPH, int(head), int(layer))
        dash_duo.wait_for_contains_text("#" + ids.HEAD_TITLE, f"layer {layer + 1}, head {head + 1}", timeout=10)
        outline = graph_js(dash_duo, ids.HEAD_GRAPH, "return gd.layout.shapes && gd.layout.shapes.length;")
        assert outline == 1  # the head summary outlines it
        assert dash_duo.get_logs() == []
    finally:
        db.close()
