"""Links that reopen a view, in headless Chromium: the link the "Copy link" button copies opens the
same view in a fresh browser (a new profile), and back and forward step through the views."""
from types import SimpleNamespace

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

from app import figures, ids
from app.panels.links import default_state, search_to_state
from app.server import create_app
from conftest import CHROMEDRIVER_DIR, N_LAYERS, browser_available, pytest_setup_options
from test_app_e2e import click_graph_point, close, graph_js, overlay_z, token_css, wait_until

pytestmark = pytest.mark.skipif(not browser_available(), reason="needs /usr/bin/chromium and chromedriver")

COPIED = f"return window.dash_component_api.getLayout('{ids.COPY_LINK}').props.content || null;"


def text_of(driver, element_id) -> str:
    return driver.execute_script(f"const e = document.getElementById('{element_id}'); return e ? e.innerText : '';")


def shows(driver, element_id, text) -> bool:
    return text in text_of(driver, element_id)


def wait_for_view(driver, example, head_title, attention_title, what):
    """Wait until the page shows ``example`` ("Example 1"), the head summary's selected head and
    the attention panel's title."""
    wait_until(lambda: shows(driver, ids.EXAMPLE_SELECT, example) and shows(driver, ids.HEAD_TITLE, head_title)
               and shows(driver, ids.ATT_TITLE, attention_title), timeout=15, what=what)


def severe_logs(driver) -> list:
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def test_a_copied_link_reopens_the_view_and_back_steps_through_views(dash_duo, small_db):
    dash_duo.start_server(create_app(small_db))
    driver = dash_duo.driver
    dash_duo.wait_for_element(token_css(3), timeout=10)
    assert driver.execute_script("return window.location.search;") == ""  # opening writes no link
    mean_head = f"layer {N_LAYERS}, mean of heads"

    # Views: token 3 of example 0; example 1; its token 4; head 3 of layer 2; a patch (the image side).
    dash_duo.find_element(token_css(3)).click()
    wait_for_view(driver, "Example 0", mean_head, "Attention from ‘circle’", "token 3 selected")
    dash_duo.find_element("#" + ids.EXAMPLE_NEXT).click()
    wait_for_view(driver, "Example 1", mean_head, "Click a text token", "example 1")
    dash_duo.find_element(token_css(4)).click()
    wait_for_view(driver, "Example 1", mean_head, "Attention from ‘red’", "token 4 selected")
    click_graph_point(dash_duo, ids.HEAD_GRAPH, 2, 1)
    wait_for_view(driver, "Example 1", "layer 2, head 3", "Attention from ‘red’ — layer 2, head 3", "head 3")
    wait_until(lambda: "head=3" in driver.execute_script("return window.location.search;"), what="the link")

    # The link the button copies (its content, set when clicked: the real clipboard is not read).
    dash_duo.find_element("#" + ids.COPY_LINK).click()
    link = wait_until(lambda: driver.execute_script(COPIED), what="the copied link")
    assert link.startswith(dash_duo.server_url) and link == driver.current_url
    assert search_to_state(link[link.index("?"):], small_db) == {
        **default_state(small_db), "ex": 1, "tokens": [4], "head": {"layer": 1, "head": 2}}

    info = small_db.example(1)
    patch = info.coords.index((1, 0))
    click_graph_point(dash_duo, ids.IMAGE_GRAPH, 15, 5)  # cell (x=1, y=0) of 10x10-pixel patches
    wait_for_view(driver, "Example 1", "layer 2, head 3", "patch (1, 0)", "a patch selected")
    assert search_to_state(driver.execute_script("return window.location.search;"), small_db)["tokens"] == [patch]

    # The link in a fresh browser: the same example, head, selected token and overlay.
    # dash_duo's flags (headless, no sandbox, no network services...) with a new --user-data-dir.
    fresh = webdriver.Chrome(service=Service(f"{CHROMEDRIVER_DIR}/chromedriver"), options=pytest_setup_options())
    try:
        fresh.get(link)
        wait_for_view(fresh, "Example 1", "layer 2, head 3", "Attention from ‘red’ — layer 2, head 3",
                      "the linked view in a fresh browser")
        expected = figures.overlay_grid(small_db.attention(1, 1, 2, [4]), info.coords, info.grid)
        as_duo = SimpleNamespace(driver=fresh)  # test_app_e2e's helpers take dash_duo for its driver
        wait_until(lambda: close(overlay_z(as_duo), expected), what="the linked view's overlay")
        shape = graph_js(as_duo, ids.HEAD_GRAPH, "const s = gd.layout.shapes[0]; return [s.x0, s.y0];")
        assert shape == [1.5, 0.5]  # head 3 of layer 2 outlined in the head summary
        assert "outline" in fresh.find_element("css selector", token_css(4)).get_attribute("style")
        assert fresh.current_url == link  # restoring it wrote no other link
        assert severe_logs(fresh) == []
    finally:
        fresh.quit()

    # Back: the token, then head 3 of layer 2 again; back: the layer mean; example 1 bare; token 3
    # of example 0; the page as it opened. Forward: token 3 of example 0 again.
    driver.back()
    wait_for_view(driver, "Example 1", "layer 2, head 3", "Attention from ‘red’ — layer 2, head 3",
                  "back to token 4 (the text side again)")
    assert dash_duo.find_element(f"#{ids.SIDE} input[value='text']").is_selected()
    driver.back()
    wait_for_view(driver, "Example 1", mean_head, "Attention from ‘red’", "back to the layer mean")
    driver.back()
    wait_for_view(driver, "Example 1", mean_head, "Click a text token", "back to example 1 bare")
    driver.back()
    wait_for_view(driver, "Example 0", mean_head, "Attention from ‘circle’", "back to token 3 of example 0")
    driver.back()
    wait_for_view(driver, "Example 0", mean_head, "Click a text token", "back to the opening view")
    assert driver.execute_script("return window.location.search;") == ""
    driver.forward()
    wait_for_view(driver, "Example 0", mean_head, "Attention from ‘circle’", "forward to token 3")
    assert dash_duo.get_logs() == [], "browser console has errors"

