"""The dataset panel in headless Chromium, as a person uses it: filter the examples table by text and open
a row; switch to the contrast of correct and incorrect examples, click the planted head and open the
top-ranked example with that head selected."""
import pytest
from selenium.webdriver.common.keys import Keys

from app import ids
from app.server import create_app
from conftest import browser_available
from test_app_e2e import click_graph_point, wait_until
from test_page_dataset import db  # noqa: F401 - the 24-example fixture with a planted head (layer 2, head 3)

pytestmark = pytest.mark.skipif(not browser_available(), reason="needs /usr/bin/chromium and chromedriver")


def test_filter_the_table_and_open_a_row(dash_duo, db):  # noqa: F811 - the fixture
    dash_duo.start_server(create_app(db))
    dash_duo.wait_for_contains_text("#" + ids.DATASET_STATUS, "24 of 24 examples", timeout=15)
    box = dash_duo.find_element("#" + ids.DATASET_TEXT)
    box.send_keys("red")
    box.send_keys(Keys.ENTER)  # the filter is debounced until Enter or blur
    dash_duo.wait_for_contains_text("#" + ids.DATASET_STATUS, "8 of 24 examples", timeout=10)
    texts = [cell.text for cell in dash_duo.find_elements(f"#{ids.DATASET_TABLE} td[data-dash-column='text']")]
    assert texts and all("red" in text for text in texts)
    ids_shown = [int(cell.text) for cell in dash_duo.find_elements(f"#{ids.DATASET_TABLE} td[data-dash-column='id']")]
    assert set(ids_shown) <= {i for i in range(24) if i % 3 == 0}
    row = dash_duo.find_elements(f"#{ids.DATASET_TABLE} td[data-dash-column='text']")[1]
    row.click()
    dash_duo.wait_for_contains_text("#" + ids.EXAMPLE_SELECT, f"Example {ids_shown[1]}", timeout=10)
    assert dash_duo.get_logs() == []


def test_contrast_drill_down_opens_the_top_example_with_the_head(dash_duo, db):  # noqa: F811
    dash_duo.start_server(create_app(db))
    dash_duo.wait_for_contains_text("#" + ids.DATASET_STATUS, "24 of 24 examples", timeout=15)
    dash_duo.select_dcc_dropdown("#" + ids.DATASET_STAT, value="m (custom)")
    dash_duo.find_elements(f"#{ids.DATASET_VIEW} input")[1].click()  # contrast
    dash_duo.wait_for_contains_text("#" + ids.DATASET_GRAPH_HELP, "★ 1 of 6 heads", timeout=10)
    graph = dash_duo.find_element("#" + ids.DATASET_GRAPH)
    dash_duo.driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", graph)
    click_graph_point(dash_duo, ids.DATASET_GRAPH, 2, 1)  # head 3 of layer 2, the planted one
    buttons = wait_until(lambda: dash_duo.find_elements(f"#{ids.DATASET_RANKED} button"), what="the ranked examples")
    assert "23" in buttons[0].text  # 10 + 23, the highest value of the head
    buttons[0].click()
    dash_duo.wait_for_contains_text("#" + ids.EXAMPLE_SELECT, "Example 23", timeout=10)
    dash_duo.wait_for_contains_text("#" + ids.HEAD_TITLE, "layer 2, head 3", timeout=10)
    assert dash_duo.get_logs() == []
