"""The database-wide token map in headless Chromium, as a person uses it: press "Show the token map", see the
WebGL scatter of every token of the 12 examples (fitted in the background, with a progress bar), click a
word's dot and land on its example with that word selected and the example's tokens ringed."""
import re

import pytest
from selenium.common.exceptions import TimeoutException

from app import ids
from app.server import create_app
from conftest import browser_available
from test_app_e2e import click_graph_point, graph_js, wait_for_steady_plot, wait_until
from test_token_map import db  # noqa: F401 - 12 examples of 16 tokens: text and image tokens apart

pytestmark = pytest.mark.skipif(not browser_available(), reason="needs /usr/bin/chromium and chromedriver")


def test_show_the_map_and_open_a_clicked_word(dash_duo, db):  # noqa: F811 - the fixture
    dash_duo.start_server(create_app(db))
    button = dash_duo.wait_for_element("#" + ids.TOKEN_MAP_OPEN, timeout=15)
    dash_duo.driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", button)
    button.click()
    title = wait_until(lambda: graph_js(dash_duo, ids.TOKEN_MAP_GRAPH,
                                        "return gd._fullData.length > 0 && gd._fullLayout.title.text;"),
                       timeout=60,
                       what="the token map")
    assert title == "192 tokens of 12 examples — after layer 2 of 2"
    assert not dash_duo.find_element("#" + ids.TOKEN_MAP_OPEN).is_displayed()  # shown: the button has gone
    # drawn with WebGL (plotly says so in the graph when the browser has none)
    drawn = graph_js(dash_duo, ids.TOKEN_MAP_GRAPH, "return [gd._fullData.map(t => t.type), "
                     "gd.querySelectorAll('canvas').length, gd.innerText.includes('WebGL')];")
    assert set(drawn[0]) == {"scattergl"} and drawn[1] > 0 and not drawn[2]
    names = graph_js(dash_duo, ids.TOKEN_MAP_GRAPH, "return gd._fullData.map(t => t.name);")
    assert names[:3] == ["text", "image", "special"]
    # a word's dot (of the text trace, the one farthest from any other, so that the click is its own): its hover
    # names the word and its example
    x, y, text = graph_js(dash_duo, ids.TOKEN_MAP_GRAPH, """
        const all = gd._fullData.slice(0, 3).flatMap(t => Array.from(t.x, (x, i) => [x, t.y[i]]));
        const t = gd._fullData[0];
        let best = 0, room = -1;
        for (let i = 0; i < t.x.length; i++) {
            const d = Math.min(...all.map(([x, y]) => (x - t.x[i]) ** 2 + (y - t.y[i]) ** 2 || Infinity));
            if (d > room) { room = d; best = i; }
        }
        return [t.x[best], t.y[best], t.text[best]];""")
    word, ex_id, token = re.fullmatch(r"(.+) · example (\d+), token (\d+)", text).groups()
    graph = dash_duo.find_element("#" + ids.TOKEN_MAP_GRAPH)
    dash_duo.driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", graph)
    wait_for_steady_plot(dash_duo, ids.TOKEN_MAP_GRAPH)
    for attempt in range(3):  # WebGL picks the point under the mouse a frame after it moves there
        click_graph_point(dash_duo, ids.TOKEN_MAP_GRAPH, x, y, hover_s=0.5)
        try:
            dash_duo.wait_for_contains_text("#" + ids.EXAMPLE_SELECT, f"Example {ex_id}", timeout=5)
            break
        except TimeoutException:
            if attempt == 2:
                raise
    dash_duo.wait_for_contains_text("#" + ids.ATT_TITLE, word, timeout=10)
    assert db.example(int(ex_id)).tokens[int(token)] == word
    ring = wait_until(lambda: graph_js(dash_duo, ids.TOKEN_MAP_GRAPH,
                                       "const t = gd._fullData[gd._fullData.length - 1];"
                                       "return t.x.length == 16 && t.name;"), what="the example's tokens ringed")
    assert ring == f"example {ex_id}"
    assert dash_duo.get_logs() == []
