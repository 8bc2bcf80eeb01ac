"""Your own images: MNIST's preparation on known answers, `predict` on files, and the page's
server answering bad requests with a 4xx and good ones correctly, several at once."""

import base64
import io
import json
import re
import socket
import struct
import sys
import threading
import time
from pathlib import Path
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

import bnn_mnist as bm
from conftest import ready_net


def bar(h=12, w=4):
    """A light bar on black, as an MNIST '1' is: (h, w) ones."""
    return np.ones((h, w), dtype=np.float32)


def says(message, text):
    """text is message, each "..." in it standing for words of a library's own (PIL's, json's)."""
    return re.fullmatch(re.escape(message).replace(re.escape("..."), ".+"), text) is not None


def fine_grain():
    """Paper's grain, (40, 40): 0.19 and 0.21 in a checkerboard, as many of each on the border (sd 0.0148)."""
    return np.where(np.add.outer(np.arange(40), np.arange(40)) % 2 == 0, 0.19, 0.21)


def png_bytes(gray):
    """A grayscale PNG of gray levels in [0, 1]."""
    buffer = io.BytesIO()
    Image.fromarray((np.asarray(gray) * 255).round().astype(np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def same_up_to_a_pixel(a, b, atol):
    """a and b (784,) equal within atol after shifting b by at most one pixel each way."""
    a, b = a.reshape(28, 28), b.reshape(28, 28)
    return any(torch.allclose(a, torch.roll(b, (dy, dx), (0, 1)), atol=atol) for dy in (-1, 0, 1) for dx in (-1, 0, 1))


def centre_of_mass(x):
    img = x.reshape(28, 28)
    rows, cols = torch.arange(28.0), torch.arange(28.0)
    return float((img.sum(1) * rows).sum() / img.sum()), float((img.sum(0) * cols).sum() / img.sum())


def test_a_shifted_digit_is_cropped_fitted_into_20_pixels_and_centred_by_mass():
    picture = np.zeros((60, 90), dtype=np.float32)
    picture[5:35, 60:70] = 1.0  # a 30 x 10 bar near the top-right corner
    picture[5:10, 60:80] = 1.0  # with a flag: its mass is off the bar's centre
    x = bm.prepare_image(picture)
    assert x.shape == (784,) and 0 <= x.min() and x.max() <= 1
    rows, cols = torch.nonzero(x.reshape(28, 28) > 0.05, as_tuple=True)
    assert rows.max() - rows.min() + 1 == 20  # the longer side fitted to 20
    assert 12 <= cols.max() - cols.min() + 1 <= 14  # 20 wide scaled by 20 / 30, aspect kept
    cy, cx = centre_of_mass(x)
    assert abs(cy - 14) <= 0.5 and abs(cx - 14) <= 0.5  # as MNIST's digits


def test_a_bar_already_20_pixels_long_keeps_its_size_exactly():
    """Cropped to the ink on all four sides, nothing more and nothing less: 20 x 5 stays 20 x 5."""
    field = bm.prepare_image(np.pad(bar(20, 5), ((5, 7), (9, 3)))).reshape(28, 28)
    assert int((field.sum(0) > 0).sum()) == 5 and int((field.sum(1) > 0).sum()) == 20


def test_dark_ink_on_light_paper_is_inverted_to_mnists_light_ink_on_black():
    picture = np.zeros((40, 40), dtype=np.float32)
    picture[8:32, 18:24] = 1.0
    as_mnist = bm.prepare_image(picture)
    pencil = picture.copy()
    pencil[8:11, 10:18] = 0.3  # a faint stroke, 30% of the ink: on white paper as on black, it is ink
    assert torch.equal(bm.prepare_image(1 - pencil), bm.prepare_image(pencil))
    photo = 0.92 - 0.8 * picture + 0.03 * np.random.default_rng(0).random((40, 40))  # grey paper, noisy
    from_photo = bm.prepare_image(photo.astype(np.float32))
    assert from_photo.reshape(28, 28)[0, 0] == 0 and from_photo.max() > 0.9  # the background is black
    assert same_up_to_a_pixel(from_photo, as_mnist, atol=0.15)  # centring rounds a centre of mass at .5


def test_chalk_on_a_gray_board_is_light_ink_and_a_tie_keeps_the_light_strokes():
    """The ink is whichever extreme lies farther from the ground; at equal distances, MNIST's light ink."""
    chalk = np.pad(bar(20, 5), 6)
    chalk[6:9, 2:6] = 0.3  # a faint stroke, 30% of the ink: the ground's shade must not make it paper
    assert torch.allclose(bm.prepare_image(0.4 + 0.6 * chalk), bm.prepare_image(chalk), atol=1e-5)
    light = 0.5 + 0.5 * chalk  # a mid-gray ground, a light stroke: 0.5 above it
    both = light.copy()
    both[2:5, 2:30] = 0.0  # and a dark one: 0.5 below it
    assert torch.equal(bm.prepare_image(both), bm.prepare_image(light))


@pytest.mark.parametrize("turn", ["upright", "on its side"])
def test_a_digit_cropped_tight_to_its_ink_reads_as_the_same_digit_with_a_margin(turn):
    """The ground is read from the picture's border (all four sides): mostly ground even where the ink touches it."""
    tee = np.zeros((40, 3), dtype=np.float32)
    tee[0, :] = tee[:, 1] = 1.0  # a narrow T, its bar along the top edge and its stem down the middle
    tee = tee if turn == "upright" else tee.T.copy()  # on its side: the stem along the middle row
    assert torch.equal(bm.prepare_image(tee), bm.prepare_image(np.pad(tee, 5)))


def test_a_png_file_an_rgba_drawing_and_an_array_give_the_same_input(tmp_path):
    picture = np.zeros((50, 50), dtype=np.float32)
    picture[10:40, 22:28] = 1.0
    path = tmp_path / "digit.png"
    path.write_bytes(png_bytes(1 - picture))  # black ink on white, as written on paper
    rgba = np.zeros((50, 50, 4), dtype=np.uint8)
    rgba[..., 3] = (picture * 255).astype(np.uint8)  # black ink on a transparent canvas
    drawn = Image.fromarray(rgba, mode="RGBA")
    a, b, c = bm.prepare_image(path), bm.prepare_image(drawn), bm.prepare_image(picture)
    assert torch.allclose(a, c, atol=0.02) and torch.allclose(b, c, atol=0.02)


@pytest.mark.parametrize("image, message", [
    (np.zeros((30, 30)), "no ink: the picture is one flat shade"),
    (np.full((30, 30), 0.7), "no ink: the picture is one flat shade"),
    (b"not an image at all", "not an image (UnidentifiedImageError: cannot identify image file ...)"),
    (b"", "not an image (UnidentifiedImageError: cannot identify image file ...)"),
    (np.full((3, 3), np.nan), "pixels must be finite gray levels in [0, 1]"),
    (np.ones((2, 2, 2)), "pixels must be a 2-D grid of at most 4096 x 4096 gray levels, got shape (2, 2, 2)"),
    ("no/such/file.png", "no such file"),
])
def test_pictures_that_cannot_be_answered_raise_one_clear_error(image, message):
    with pytest.raises(bm.ImageError) as e:
        bm.prepare_image(image)
    assert says(message, str(e.value))


def trained_like(hidden=16):
    net = ready_net(hidden, init_scale=0.3)
    net.rule = {"mutual_information": 0.05, "expected_entropy": 1.0}
    return net


def test_answer_gives_the_verdict_the_rule_gives_from_its_samples():
    net = trained_like()
    x = bm.prepare_image(np.pad(bar(20, 5), 5))
    gen = torch.Generator().manual_seed(0)
    result = bm.answer(x, net, 50, gen)
    probs = bm.sample_probs_local(x[None], net, 50, torch.Generator().manual_seed(0))
    u = bm.uncertainty(probs)
    refused = bool(bm.refuses(u, net.rule)[0])
    assert result["samples"] == probs[:, 0].tolist() and len(result["samples"]) == 50
    assert result["mean"] == probs[:, 0].mean(0).tolist()  # the mean over the samples, as the bar chart draws it
    assert result["answer"] == (None if refused else int(probs.mean(0).argmax()))
    assert result["scores"]["mutual_information"] == pytest.approx(float(u["mutual_information"][0]))
    assert ("I don't know" if refused else "mean probability") in bm.describe(result)


def save_net(tmp_path, net):
    bm.save_guide(tmp_path / "guide.pt", net)
    return tmp_path / "guide.pt"


def test_predict_command_answers_every_file_it_can_and_exits_1_naming_the_others(tmp_path, capsys):
    guide = save_net(tmp_path, trained_like())
    good, empty, text = tmp_path / "seven.png", tmp_path / "blank.png", tmp_path / "notes.txt"
    good.write_bytes(png_bytes(1 - np.pad(bar(20, 5), 10)))
    empty.write_bytes(png_bytes(np.ones((30, 30))))
    text.write_text("hello")
    with pytest.raises(SystemExit) as e:
        bm.main(["predict", str(good), str(empty), str(text), "--guide", str(guide), "--out-dir", str(tmp_path / "o")])
    assert e.value.code == 1
    out, err = capsys.readouterr()
    assert out.startswith(f"{good}: ") and ("I don't know" in out or "mean probability" in out)
    assert f"error: {empty}: no ink" in err and f"error: {text}: not an image" in err
    assert len(err.strip().splitlines()) == 2
    assert (tmp_path / "o" / "seven.png.png").stat().st_size > 0


def test_predict_and_serve_say_what_to_run_when_there_is_no_trained_posterior(tmp_path, capsys):
    for command in (["predict", "x.png"], ["serve"]):
        with pytest.raises(SystemExit) as e:
            bm.main([*command, "--guide", str(tmp_path / "none.pt")])
        assert e.value.code == 1
        assert "no trained posterior at" in capsys.readouterr().err


@pytest.fixture
def server():
    net = trained_like()
    httpd = bm.make_server(net, port=0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", net
    httpd.shutdown()
    httpd.server_close()


def post(url, body, headers=None):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url + "/predict", data=data, headers=headers or {}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        with e:  # closes its socket
            return e.code, json.loads(e.read())


def headers_only(url, method, path, length):
    """(status, headers, body) of a request sent with no body and the Content-Length given (None: no header).

    urllib always sends the true length; http.client lets a test announce a wrong one or none."""
    import http.client

    connection = http.client.HTTPConnection(url.removeprefix("http://"), timeout=10)
    try:
        connection.putrequest(method, path)
        if length is not None:
            connection.putheader("Content-Length", length)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, response.headers, response.read()
    finally:
        connection.close()


ROWS = "pixels must be a non-empty list of rows of numbers, all rows one length"
LEVELS = "pixels must be finite gray levels in [0, 1]"
SEND = 'send {"image": "<data URL or base64>"} or {"pixels": [[gray levels]]}'


@pytest.mark.parametrize("body, status, message", [  # the whole message; ... stands for a reader's own words
    (b"{not json", 400, "the body is not JSON: Expecting property name ..."),  # json's own words after ours
    (b"", 400, "the body is not JSON: Expecting value: ..."),  # an empty body is not too large
    ({"image": 3}, 400, "image must be a string: a data URL or base64"),
    ({"image": "data:image/png;base64,@@@"}, 400, "image is not base64"),
    ({"image": "data:image/png;base64,AA,iVBORw0K"}, 400, "image is not base64"),  # a comma in the data
    ({"image": base64.b64encode(b"plain text").decode()}, 422, "not an image (UnidentifiedImageError: ..."),
    ({"pixels": [[0.1, 0.2], [0.3]]}, 400, ROWS),
    ({"pixels": [[[0.5]]]}, 400, ROWS),
    ({"pixels": [[0.5, 2.0]]}, 422, LEVELS),
    (b'{"pixels": [[NaN, 1.0]]}', 422, LEVELS),
    ({"pixels": [[0.0] * 5] * 5}, 422, "no ink: the picture is one flat shade"),
    ({"image": "x", "pixels": [[1]]}, 400, SEND),
    ([1, 2], 400, SEND),
])
def test_bad_requests_get_a_4xx_with_a_message_and_the_server_keeps_serving(server, body, status, message):
    url, _ = server
    code, reply = post(url, body)
    assert code == status and says(message, reply["error"])
    picture = np.pad(bar(20, 5), 6)
    assert post(url, {"pixels": picture.tolist()})[0] == 200  # still serving


def test_an_oversized_body_a_wrong_path_and_a_file_name_are_refused(server):
    url, _ = server
    status, _, body = headers_only(url, "POST", "/predict", str(bm.MAX_BODY + 1))  # refused before it is read
    assert status == 413 and json.loads(body) == {"error": f"the body is larger than {bm.MAX_BODY} bytes"}
    code, reply = post(url, b" " * bm.MAX_BODY)  # the largest allowed is read (and then is no JSON)
    assert code == 400 and reply["error"].startswith("the body is not JSON")
    for path in ("/bnn_mnist.py", "/../README.md", "/predict/../guide.pt", "/etc/passwd"):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(url + path, timeout=10)
        with e.value:
            assert e.value.code == 404 and json.loads(e.value.read()) == {"error": "not found"}
            assert e.value.headers["Content-Type"] == "application/json"
    with urllib.request.urlopen(url + "/", timeout=10) as r:
        assert r.status == 200 and b"<canvas" in r.read()


def test_requests_at_once_each_get_their_own_answer(server):
    url, net = server
    pictures = [np.pad(bar(20, 3 + k), 6) for k in range(6)]
    expected = [bm.prepare_image(p).tolist() for p in pictures]
    replies = [None] * 6

    def ask(k):
        replies[k] = post(url, {"image": base64.b64encode(png_bytes(pictures[k])).decode()})

    threads = [threading.Thread(target=ask, args=(k,)) for k in range(6)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall_ms = 1000 * (time.perf_counter() - t0)
    for (code, reply), x in zip(replies, expected):
        assert code == 200 and reply["prepared"] == pytest.approx(x, abs=0.02)
        assert 0 < reply["ms"] < wall_ms  # the page's "(N ms)": the net's time, within the request's
        assert len(reply["samples"]) == bm.DEFAULTS.unc_samples and reply["verdict"] in ("I don't know", *"0123456789")
        assert sum(reply["mean"]) == pytest.approx(1, abs=1e-5)


def test_serve_runs_until_ctrl_c_and_stops_cleanly(tmp_path):
    import signal
    import subprocess

    from conftest import ROOT, as_from_a_terminal, cli_env

    guide = save_net(tmp_path, trained_like())
    proc = subprocess.Popen([sys.executable, str(ROOT / "bnn_mnist.py"), "serve", "--guide", str(guide), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(),
                            preexec_fn=as_from_a_terminal)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving the page on http://127.0.0.1:"), line
        url = line.split()[4].rstrip("/")
        with urllib.request.urlopen(url + "/", timeout=10) as r:
            assert r.status == 200
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 0 and out.strip() == "stopped" and err == ""


def test_a_dim_photo_a_16_bit_scan_and_a_sideways_phone_photo_are_read_the_right_way_up(tmp_path):
    picture = np.zeros((40, 40), dtype=np.float32)
    picture[8:32, 18:24] = 1.0
    picture[8:12, 18:30] = 1.0  # a 7: not the same turned
    expected = bm.prepare_image(picture)
    dim = 0.45 - 0.35 * picture  # grey paper in a dark room, darker ink
    assert same_up_to_a_pixel(bm.prepare_image(dim), expected, atol=0.1)
    scan = Image.fromarray(((1 - picture) * 60000 + 2000).astype(np.uint16))  # mode I;16
    buffer = io.BytesIO()
    scan.save(buffer, format="PNG")
    assert same_up_to_a_pixel(bm.prepare_image(buffer.getvalue()), expected, atol=0.1)
    sideways = Image.fromarray(((1 - np.rot90(picture, 1)) * 255).astype(np.uint8))  # stored turned left
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the camera was turned; viewers turn the picture back
    path = tmp_path / "photo.jpg"
    sideways.save(path, format="JPEG", exif=exif, quality=95)
    assert same_up_to_a_pixel(bm.prepare_image(path), expected, atol=0.25)


def test_a_broken_png_is_not_an_image():
    whole = png_bytes(np.pad(bar(20, 5), 5))
    for broken in (whole[: len(whole) // 2], whole[:40] + b"\x00" * 40 + whole[80:]):
        with pytest.raises(bm.ImageError, match="not an image"):
            bm.prepare_image(broken)


def test_predict_names_each_figure_apart_and_a_guide_without_a_rule_is_one_line(tmp_path, capsys):
    guide = save_net(tmp_path, trained_like())
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "1.png").write_bytes(png_bytes(1 - np.pad(bar(20, 5), 10)))
    bm.main(["predict", str(tmp_path / "a/1.png"), str(tmp_path / "b/1.png"), "--guide", str(guide),
             "--out-dir", str(tmp_path / "o")])
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["1.png-2.png", "1.png.png"]
    (tmp_path / "flat.png").write_bytes(png_bytes(np.ones((28, 28))))
    answers = bm.predict_files([tmp_path / "flat.png", tmp_path / "a/1.png"], bm.load_trained(guide), 5,
                               log=lambda *a, **k: None)  # a file that cannot be answered: its message, the rest answered
    assert answers[tmp_path / "flat.png"] == "no ink: the picture is one flat shade"
    prepared = answers[tmp_path / "a/1.png"]["prepared"]  # what the net saw, for a notebook to draw
    assert len(answers[tmp_path / "a/1.png"]["samples"]) == 5  # the samples asked for
    assert torch.equal(prepared, bm.prepare_image(tmp_path / "a/1.png"))
    assert capsys.readouterr().out.splitlines()[-1] == f"figures in {tmp_path / 'o'}"
    bm.main(["predict", str(tmp_path / "a/1.png"), "--guide", str(guide), "--out-dir", str(tmp_path / "p"), "--no-plots"])
    assert not (tmp_path / "p").exists() and "figures in" not in capsys.readouterr().out
    no_rule = ready_net(16)
    bm.save_guide(tmp_path / "bare.pt", no_rule)
    with pytest.raises(SystemExit) as e:
        bm.main(["predict", str(tmp_path / "a/1.png"), "--guide", str(tmp_path / "bare.pt")])
    assert e.value.code == 1 and "has no refusal rule" in capsys.readouterr().err


def test_a_notebooks_make_server_listens_where_the_readme_says(monkeypatch):
    import socketserver

    monkeypatch.setattr(socketserver.TCPServer, "server_bind", lambda self: None)  # 8000 may be taken here
    monkeypatch.setattr(socketserver.TCPServer, "server_activate", lambda self: None)
    httpd = bm.make_server(trained_like())
    assert httpd.server_address == ("127.0.0.1", 8000)  # http://127.0.0.1:8000/, as `serve` prints it
    httpd.server_close()


def test_serve_listens_where_it_says_with_the_samples_asked_and_stops_on_ctrl_c(tmp_path, capsys, monkeypatch):
    """In a notebook, as from a terminal: the line names the address really listened on, Ctrl-C stops."""
    guide = save_net(tmp_path, trained_like())
    made, make = [], bm.make_server
    written = io.BytesIO()  # stdout as a pipe buffers it: the line must be out before serving starts
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(written, encoding="utf-8"))

    def make_then_ctrl_c(net, host, port, num_samples):
        httpd = make(net, host, 0, num_samples)  # port 0 here: 8000 may be taken on this machine
        made.append((host, port, num_samples, httpd))

        def serve_a_page_then_ctrl_c():
            assert written.getvalue().endswith(b"(Ctrl-C stops)\n")  # flushed: a reader of the pipe sees it now
            thread = threading.Thread(target=type(httpd).serve_forever, args=(httpd,), daemon=True)
            thread.start()
            url = f"http://127.0.0.1:{httpd.server_address[1]}"
            with urllib.request.urlopen(url + "/", timeout=10) as r:
                assert r.status == 200 and b"<canvas" in r.read()
                assert r.headers["Content-Type"] == "text/html; charset=utf-8"
            code, reply = post(url, {"pixels": np.pad(bar(20, 5), 6).tolist()})
            assert code == 200 and len(reply["samples"]) == num_samples  # the guide's net, the samples asked
            httpd.shutdown()
            raise KeyboardInterrupt
        httpd.serve_forever = serve_a_page_then_ctrl_c
        return httpd

    monkeypatch.setattr(bm, "make_server", make_then_ctrl_c)
    bm.main(["serve", "--guide", str(guide), "--unc-samples", "7"])
    bm.main(["serve", "--guide", str(guide), "--port", "0"])
    assert [m[:3] for m in made] == [("127.0.0.1", 8000, 7), ("127.0.0.1", 0, bm.DEFAULTS.unc_samples)]
    assert all(type(m[1]) is int for m in made)
    ports = [m[3].server_address[1] for m in made]
    sys.stdout.flush()
    assert written.getvalue().decode() == "".join(f"serving the page on http://127.0.0.1:{port}/  (Ctrl-C stops)\nstopped\n"
                                              for port in ports)
    assert all(m[3].socket.fileno() == -1 for m in made)  # closed, the port given back
    monkeypatch.setattr(bm, "make_server", make)
    with socket.socket() as taken:  # a port another program holds
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit) as e:
            bm.main(["serve", "--guide", str(guide), "--port", str(port)])
    assert e.value.code == 1
    assert capsys.readouterr().err == f"error: cannot listen on 127.0.0.1:{port}: Address already in use\n"


def test_stopping_the_server_does_not_wait_for_a_connection_left_open():
    """Ctrl-C ends `serve` at once even while a browser holds a connection open, its request unfinished."""
    httpd = bm.make_server(trained_like(), port=0)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    idle = socket.create_connection(httpd.server_address, timeout=10)
    try:
        idle.sendall(b"GET / HTTP/1.1\r\n")  # headers never finished: its handler waits for them
        time.sleep(0.3)  # accepted, handler started
        httpd.shutdown()
        closing = threading.Thread(target=httpd.server_close)
        closing.start()
        closing.join(5)
        assert not closing.is_alive()
    finally:
        idle.close()


def test_a_page_gone_before_its_answer_leaves_no_traceback_and_other_failures_still_show(server, capsys, monkeypatch):
    url, net = server
    pixels = {"pixels": np.pad(bar(20, 5), 6).tolist()}
    body = json.dumps(pixels).encode()
    request = b"POST /predict HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body) + body

    def ask_and_leave():  # a tab closed before its answer: the connection reset, the reply cannot be written
        with socket.create_connection(("127.0.0.1", urllib.parse.urlsplit(url).port)) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.sendall(request)
        time.sleep(0.3)  # the server's thread answers into the reset connection

    for _ in range(3):
        ask_and_leave()
    assert post(url, pixels)[0] == 200  # still serving
    assert "Traceback" not in capsys.readouterr().err  # the serve terminal stays quiet
    monkeypatch.setattr(net, "rule", {})  # a failure of the server's own: still shown
    ask_and_leave()
    err = capsys.readouterr().err
    for _ in range(100):  # a loaded machine: wait for the server's thread to report
        if "ValueError: this net has no refusal rule" in err:
            break
        time.sleep(0.1)
        err += capsys.readouterr().err
    assert "ValueError: this net has no refusal rule" in err
    assert "Exception occurred during processing of request from ('127.0.0.1', " in err  # who asked, as Python says


def test_the_page_is_never_cached_and_a_body_without_its_length_is_refused_with_a_reason(server):
    """A browser must not show an old answer for a new drawing; a request without Content-Length gets 411."""
    url, _ = server
    for method, path, length in (("GET", "/", None), ("POST", "/predict", "many"), ("POST", "/predict", None)):
        status, headers, body = headers_only(url, method, path, length)
        assert headers["Cache-Control"] == "no-store"
        assert int(headers["Content-Length"]) == len(body) > 0  # a client keeping the connection needs it
        if method == "POST":
            assert status == 411 and json.loads(body) == {"error": "a Content-Length is required"}


def test_answer_without_a_rule_and_predict_with_a_bad_flag_say_what_to_do(capsys):
    net = trained_like()
    net.rule = None  # a net trained by hand, no rule fitted yet
    with pytest.raises(ValueError) as e:
        bm.answer(torch.rand(784), net)
    assert str(e.value) == "this net has no refusal rule: load a guide saved by a run (out/guide.pt)"
    with pytest.raises(SystemExit) as e:
        bm.main(["predict", "--samples-please", "x.png"])
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith("usage: bnn_mnist.py predict ")
    with pytest.raises(SystemExit) as e:
        bm.main(["serve", "--port", "http"])
    assert e.value.code == 2 and capsys.readouterr().err.startswith("usage: bnn_mnist.py serve ")
    with pytest.raises(SystemExit) as e:
        bm.main(["predict", "x.png", "--seed", "one"])
    assert e.value.code == 2 and "argument --seed: invalid int value: 'one'" in capsys.readouterr().err


@pytest.mark.parametrize("mode, order", [("I;16", "<u2"), ("I;16L", "<u2"), ("I;16B", ">u2")])
def test_a_16_bit_scan_in_either_byte_order_reads_as_its_gray_levels(mode, order):
    picture = np.pad(bar(20, 5), 6) * 0.8 + 0.1  # (32, 17) gray levels
    levels = (picture * 65535).round()
    scan = Image.frombytes(mode, picture.shape[::-1], levels.astype(order).tobytes())
    assert torch.allclose(bm.prepare_image(scan), bm.prepare_image(levels / 65535), atol=1e-4)


def test_grainy_paper_is_cut_at_half_the_inks_span_at_most_so_a_faint_stroke_stays():
    """The grain cut is 6 noise sds of the border, but never above half the ink: on very grainy paper
    a stroke at 60% of the ink's brightness is still ink (a digit, not an empty picture)."""
    clean = np.full((40, 40), 0.2, dtype=np.float32)  # a dark ground
    clean[8:32, 18:22] = 1.0  # the stroke
    clean[8:11, 10:18] = 0.7  # a faint flag: ink at (0.7 - 0.2) / 0.8 = 62% of the span
    grainy = clean.copy()
    grainy[0, ::2] = grainy[-1, ::2] = grainy[:, 0][::2] = 0.1  # the border's grain: +-0.1 around 0.2
    grainy[0, 1::2] = grainy[-1, 1::2] = 0.3
    grainy[1::2, 0] = grainy[1::2, -1] = 0.3
    grainy[::2, -1] = 0.1
    assert torch.allclose(bm.prepare_image(grainy), bm.prepare_image(clean), atol=1e-5)


def test_slightly_grainy_paper_is_cut_at_six_robust_sds_of_its_border_so_a_faint_stroke_above_stays():
    """The border's spread (1.4826 x its median absolute deviation: a normal sd) sets the cut, not a guess."""
    clean = np.full((40, 40), 0.2, dtype=np.float32)  # a dark ground
    clean[8:32, 18:22] = 1.0  # the stroke
    clean[8:11, 10:18] = 0.32  # a faint flag: ink at 0.12 / 0.8 = 15% of the span
    grain = fine_grain()
    grainy = clean.copy()  # grain +-0.01: sd 0.0148 of 0.8, six of them 11% of the span, under the flag's 15%
    grainy[[0, -1]], grainy[:, [0, -1]] = grain[[0, -1]], grain[:, [0, -1]]
    assert torch.allclose(bm.prepare_image(grainy), bm.prepare_image(clean), atol=1e-5)
    speck = grainy.copy()
    speck[30:33, 5:8] = 0.2 + 0.8 * 0.09  # 9%: under six robust sds (11%), over six plain MADs (7.4%)
    assert torch.allclose(bm.prepare_image(speck), bm.prepare_image(grainy), atol=1e-5)


def test_a_mark_at_the_grain_cuts_floor_is_ink_and_one_just_under_it_is_paper():
    """On clean paper the cut is its floor, 2% of the ink's span: ink below it is ground, ink at it is kept."""
    clean = np.zeros((40, 40))
    clean[8:32, 18:22] = 1.0  # the stroke
    at, under = clean.copy(), clean.copy()
    at[8:11, 10:18], under[8:11, 10:18] = 0.02, 0.019  # a faint flag at, and just under, the floor
    assert torch.equal(bm.prepare_image(under), bm.prepare_image(clean))
    assert not torch.equal(bm.prepare_image(at), bm.prepare_image(clean))


def test_gray_levels_in_float64_or_as_nested_lists_give_exactly_the_float32_input():
    """A notebook's array may be float64 (NumPy's default) or a list: the levels are read as float32 first."""
    picture = np.zeros((40, 40))
    picture[5:35, 15:22] = np.random.default_rng(0).random((30, 7)) * 0.9 + 0.1  # shades, not just 0 and 1
    as_float32 = bm.prepare_image(picture.astype(np.float32))
    assert torch.equal(bm.prepare_image(picture), as_float32)
    assert torch.equal(bm.prepare_image(picture.tolist()), as_float32)


def test_the_grain_cut_is_measured_against_the_inks_span_so_faint_ink_on_grainy_paper_loses_its_specks():
    """Grain of sd 0.015 beside ink only 0.5 above the ground is 3% of the span: six sds, 18%, are cut."""
    clean = fine_grain()  # +-0.01 around 0.2
    clean[8:32, 18:22] = 0.7  # a faint stroke: the span is 0.5
    specks = clean.copy()
    specks[5:7, 5:30] = 0.25  # grain's blotches at 10% of the span: under the cut
    assert torch.equal(bm.prepare_image(specks), bm.prepare_image(clean))


def test_describe_says_the_verdict_and_each_score_against_its_threshold():
    result = {"verdict": "7", "mean": [0.01] * 7 + [0.91] + [0.01] * 2, "rule": {"max_median_prob": 0.2,
              "mutual_information": 0.15}, "scores": {"max_median_prob": 0.2, "mutual_information": 0.0312}}
    assert bm.describe(result) == ("7 (mean probability 0.91 for 7; highest class median 0.200 <= 0.2; "
                                   "mutual information 0.0312 <= threshold 0.1500)")
    result["verdict"], result["scores"] = "I don't know", {"max_median_prob": 0.6, "mutual_information": 0.4}
    assert bm.describe(result) == ("I don't know (mean probability 0.91 for 7; highest class median 0.600 > 0.2; "
                                   "mutual information 0.4000 > threshold 0.1500)")
    result["verdict"], result["scores"] = "7", {"max_median_prob": 0.2, "mutual_information": 0.15}
    assert bm.describe(result).endswith("mutual information 0.1500 <= threshold 0.1500)")  # at it: accepted
    sure = bm.answer(bm.prepare_image(np.pad(bar(20, 5), 5)), never_refuses(trained_like()), 5)
    assert sure["verdict"] == str(sure["answer"]) and sure["answer"] in range(10)


def never_refuses(net):
    net.rule = {"mutual_information": 10.0}  # no image has that much: every answer is a class
    return net


def test_a_dash_one_pixel_high_stays_one_pixel_high():
    dash = np.zeros((9, 30), dtype=np.float32)
    dash[4, 5:25] = 1.0  # a minus sign: 20 x 1
    rows = bm.prepare_image(dash).reshape(28, 28).sum(1) > 0
    assert int(rows.sum()) == 1
    cols = bm.prepare_image(dash.T.copy()).reshape(28, 28).sum(0) > 0  # a one drawn as a plain stroke: 1 x 20
    assert int(cols.sum()) == 1


def test_predict_and_serve_look_for_the_runs_guide_and_write_into_its_folder(tmp_path, monkeypatch, capsys):
    """Without --guide: out/guide.pt, where a default run saves it; figures go to out/predictions/."""
    monkeypatch.chdir(tmp_path)
    for command in (["predict", "x.png"], ["serve"]):
        with pytest.raises(SystemExit):
            bm.main(command)
        assert capsys.readouterr().err.startswith(f"error: no trained posterior at {Path('out') / 'guide.pt'}")
    (tmp_path / "out").mkdir()
    save_net(tmp_path / "out", trained_like())
    (tmp_path / "seven.png").write_bytes(png_bytes(np.pad(bar(20, 5), 5)))
    bm.main(["predict", "seven.png", "--unc-samples", "7"])
    assert (tmp_path / "out" / "predictions" / "seven.png.png").stat().st_size > 0
    with pytest.raises(SystemExit) as e:
        bm.main(["predict", "seven.png", "--unc-samples", "0"])
    assert e.value.code == 2 and "argument --unc-samples: must be > 0" in capsys.readouterr().err


def test_the_page_answers_at_its_two_addresses_with_a_query_and_names_a_wrong_path(server):
    url, _ = server
    for path in ("/?v=2", "/index.html", "/index.html?v=2"):
        with urllib.request.urlopen(url + path, timeout=10) as r:
            assert r.status == 200 and b"<canvas" in r.read()
    request = urllib.request.Request(url + "/guess", data=b"{}", method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=10)
    with e.value:
        assert e.value.code == 404 and e.value.headers["Content-Type"] == "application/json"
        assert json.loads(e.value.read()) == {"error": "not found"}


@pytest.mark.parametrize("heavy", ["top", "bottom", "left", "right"])
def test_a_digit_heavy_at_one_end_is_kept_whole_on_the_canvas(heavy):
    """Centring by mass would push a T's stem off the canvas: it stops at the edge instead."""
    tee = np.zeros((30, 30), dtype=np.float32)
    tee[2:6, 3:27] = 1.0  # a heavy bar
    tee[6:28, 14:16] = 1.0  # a thin stem: the mass sits near the top
    turned = {"top": tee, "bottom": tee[::-1], "left": tee.T, "right": tee.T[:, ::-1]}[heavy]
    field = bm.prepare_image(turned.copy()).reshape(28, 28)
    if heavy in ("left", "right"):
        field = field.T  # columns as rows
    edge = -1 if heavy in ("top", "left") else 0  # the stem's end reaches the far edge
    assert int((field.sum(1) > 0).sum()) == 20 and float(field[edge].sum()) > 0  # all 20 rows, to the edge


def test_pictures_up_to_4096_pixels_a_side_are_read_and_larger_ones_refused():
    line = np.zeros((3, 4096), dtype=np.float32)
    line[1, 100:4000] = 1.0
    assert bm.prepare_image(line).sum() > 0
    with pytest.raises(bm.ImageError, match="at most 4096 x 4096"):
        bm.prepare_image(np.zeros((3, 4097), dtype=np.float32))


@pytest.mark.parametrize("size", [(8000, 5001), (40_000_001, 1)])  # 40,008,000 pixels; one past 40 million
def test_a_picture_file_over_40_million_pixels_is_refused_before_it_is_decoded(size):
    huge = io.BytesIO()
    Image.new("1", size).save(huge, format="PNG")  # 5 kB on disk
    with pytest.raises(bm.ImageError) as e:
        bm.prepare_image(huge.getvalue())
    assert str(e.value) == f"the picture is too large ({size[0]} x {size[1]} pixels)"


def test_a_picture_file_of_exactly_40_million_pixels_is_decoded_and_read():
    flat = io.BytesIO()
    Image.new("1", (8000, 5000)).save(flat, format="PNG")
    with pytest.raises(bm.ImageError) as e:
        bm.prepare_image(flat.getvalue())
    assert str(e.value) == "no ink: the picture is one flat shade"  # read to its pixels, not refused for its size


def test_a_reader_error_without_words_is_still_one_line(monkeypatch, tmp_path):
    def silent(*a, **k):
        raise ValueError()

    monkeypatch.setattr(Image, "open", silent)
    with pytest.raises(bm.ImageError) as e:
        bm.prepare_image(png_bytes(np.pad(bar(20, 5), 5)))
    assert str(e.value) == "not an image (ValueError: )"


def test_a_gray_drawing_with_transparency_is_on_white_paper():
    ink = np.pad(bar(20, 5), 5)  # 1 where drawn
    drawing = np.stack([np.zeros_like(ink), ink], -1)  # LA: black strokes, transparent elsewhere (gray 0 there too)
    la = Image.fromarray((drawing * 255).astype(np.uint8), mode="LA")
    on_paper = 1 - ink  # the same strokes, black on white
    assert torch.allclose(bm.prepare_image(la), bm.prepare_image(on_paper), atol=1e-6)
    indices, alpha = Image.fromarray(np.zeros(ink.shape, np.uint8)), Image.fromarray((ink * 255).astype(np.uint8))
    pa = Image.merge("PA", (indices, alpha))  # a palette drawing with transparency: black, drawn where opaque
    pa.putpalette([0, 0, 0] * 256)
    assert torch.allclose(bm.prepare_image(pa), bm.prepare_image(on_paper), atol=1e-6)
    p = Image.fromarray(ink.astype(np.uint8), mode="L").convert("P")  # index 1 where drawn, 0 elsewhere
    p.putpalette([0, 0, 0] * 256)  # every index black: index 0 the transparent one (a GIF's, a PNG's tRNS)
    p.info["transparency"] = 0
    assert torch.allclose(bm.prepare_image(p), bm.prepare_image(on_paper), atol=1e-6)


@pytest.mark.parametrize("mode, top, expected", [("F", 0.8, 0.8), ("I", 255, 1.0), ("I", 65535, 1.0),
                                                 ("I", 2, 2 / 255), ("I", 256, 256 / 65535),
                                                 ("I", 32768, 32768 / 65535), ("I", 100000, 1.0), ("L", 255, 1.0),
                                                 ("L", 51, 0.2), ("F", -0.5, 0.0), ("F", 1.0, 1.0)])
def test_a_scans_gray_levels_are_read_on_the_scale_its_values_use(mode, top, expected):
    """0-1 floats as they are (below 0: black), values up to 255 as 8-bit, above as 16-bit (beyond 16 bits:
    white); 8-bit: /255."""
    picture = np.zeros((10, 10))
    picture[2:8, 4:6] = top
    levels = bm._gray_levels(Image.fromarray(picture.astype({"F": np.float32, "I": np.int32, "L": np.uint8}[mode]), mode=mode))
    assert levels.max() == pytest.approx(expected) and levels.min() == 0
