"""The README's picture of the page: a drawn 1 answered, a notMNIST letter refused, side by side.

    python benchmarks/page_screenshot.py --guide out/guide.pt --data-dir DIR    # writes docs/page.png

It serves the page for the trained posterior in --guide, drives Debian's chromium with
Playwright (as tests/test_page.py does), and also prints how long the server took to answer
one drawing with 100 samples (best of 20; the page shows that time under each answer).
"""

import argparse
import base64
import io
import os
import shutil
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
import bnn_mnist as bm  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--guide", default="out/guide.pt")
    p.add_argument("--data-dir", default="data", help="holding notMNIST-459/ (the letter dropped on the page)")
    p.add_argument("--out", default=str(ROOT / "docs" / "page.png"))
    args = p.parse_args(argv)
    from PIL import Image
    from playwright.sync_api import sync_playwright
    os.environ["BNN_MNIST_DATA"] = args.data_dir  # the test module checks it at import
    from test_page import draw, verdict  # the test's own strokes

    net = bm.load_guide(args.guide)
    letter = sorted(Path(args.data_dir, "notMNIST-459/A").glob("*.png"))[1]  # a plain white A on black
    # what the page sends for a drawing: a 280 x 280 PNG, dark ink on white (here a test digit)
    x, _ = bm.load_mnist(args.data_dir, train=False)
    drawing = Image.fromarray((255 - 255 * x[0].reshape(28, 28)).byte().numpy()).resize((280, 280))
    png = io.BytesIO()
    drawing.save(png, format="PNG")
    body = ('{"image": "data:image/png;base64,%s"}' % base64.b64encode(png.getvalue()).decode()).encode()
    state = bm.PageServer(net)
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        state.predict(body)
        times.append(time.perf_counter() - t0)
    print(f"one answer to a 280 x 280 drawing (decode, prepare, 100 samples): best {1000 * min(times):.0f} ms, "
          f"median {1000 * sorted(times)[10]:.0f} ms over 20")

    httpd = bm.make_server(net, port=0)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    shots = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1320, "height": 520})
        page.goto(f"http://127.0.0.1:{httpd.server_address[1]}/")
        draw(page, [(150, 45), (140, 120), (135, 190), (132, 240)])
        print("drawn 1:", verdict(page))
        shots.append(Image.open(io.BytesIO(page.screenshot(full_page=True, clip={"x": 0, "y": 0, "width": 1240, "height": 470}))))
        page.click("#clear")
        page.set_input_files("#file", str(letter))
        page.wait_for_timeout(1500)
        print("letter:", verdict(page))
        shots.append(Image.open(io.BytesIO(page.screenshot(full_page=True, clip={"x": 0, "y": 0, "width": 1240, "height": 470}))))
        browser.close()
    httpd.shutdown()
    w, h = shots[0].size
    both = Image.new("RGB", (w, 2 * h), "white")
    for k, shot in enumerate(shots):
        both.paste(shot, (0, k * h))
    both.resize((w * 3 // 4, h * 3 // 2), Image.LANCZOS).save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
