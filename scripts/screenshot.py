"""Screenshot of the app for docs/screenshot.png: start it on a database, click a text token so the
overlays show, save a 1440x900 PNG (headless Chromium).

    python scripts/screenshot.py [-d DB] [-o docs/screenshot.png] [--width 1440 --height 900]

Default database: example_database2 with the live model ``-m vilt shapes_vqa/vilt-shapes`` when it
exists, else example_database1.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def chrome_options(width: int, height: int):
    from selenium.webdriver.chrome.options import Options

    opts = Options()
    opts.binary_location = os.environ.get("DASH_TEST_CHROMEPATH", "/usr/bin/chromium")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", f"--window-size={width},{height}", "--hide-scrollbars",
                 f"--user-data-dir={tempfile.mkdtemp(prefix='vli-chrome-')}"):
        opts.add_argument(flag)
    return opts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-d", "--database")
    p.add_argument("-m", "--model", nargs="+")
    p.add_argument("-o", "--output", default=os.path.join(ROOT, "docs", "screenshot.png"))
    p.add_argument("--width", type=int, default=1440)
    p.add_argument("--height", type=int, default=900)
    p.add_argument("--token", type=int, help="index of the token to click (default: the first word)")
    args = p.parse_args(argv)
    db, model = args.database, args.model
    if db is None:
        if os.path.isdir(os.path.join(ROOT, "example_database2")):
            db, model = "example_database2", model or ["vilt", "shapes_vqa/vilt-shapes"]
        else:
            db = "example_database1"
    port = free_port()
    cmd = [sys.executable, os.path.join(ROOT, "run_app.py"), "-d", db, "-p", str(port)]
    if model:
        cmd += ["-m", *model]
    server = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        from selenium import webdriver
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions as EC
        from selenium.webdriver.support.ui import WebDriverWait

        driver = webdriver.Chrome(options=chrome_options(args.width, args.height))
        try:
            driver.set_window_size(args.width, args.height)
            driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
                "width": args.width, "height": args.height, "deviceScaleFactor": 1, "mobile": False})
            url = f"http://127.0.0.1:{port}/"
            for _ in range(600):  # wait for the server (model loading can take a while)
                if server.poll() is not None:
                    print(server.stdout.read(), file=sys.stderr)
                    return 1
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                        break
                except OSError:
                    time.sleep(0.2)
            driver.get(url)
            wait = WebDriverWait(driver, 30)
            sel = (f'[id=\'{{"index":{args.token},"type":"token"}}\']' if args.token is not None
                   else ".text-tokens .tok:not(.special)")
            tok = wait.until(EC.element_to_be_clickable((By.CSS_SELECTOR, sel)))
            time.sleep(1.0)
            tok.click()
            wait.until(lambda d: d.execute_script(  # the overlay shows attention (not the empty state)
                "const g=document.getElementById('image-graph').querySelector('.js-plotly-plot');"
                "return !!(g && g._fullData && g._fullData[0] && g._fullData[0].showscale);"))
            time.sleep(1.5)
            os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
            driver.save_screenshot(args.output)
            print(f"saved {args.output}")
        finally:
            driver.quit()
    finally:
        server.terminate()
        server.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
