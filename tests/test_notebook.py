"""The module used from a real Jupyter kernel: import, train a few steps, plot inline."""

import nbformat
from nbclient import NotebookClient

from conftest import ROOT


def test_notebook_trains_and_plots_inline(data_dir, tmp_path):
    cells = [
        f"import sys; sys.path.insert(0, {str(ROOT)!r})\nimport bnn_mnist as bm",
        f"x, y = bm.load_mnist({str(data_dir)!r}, train=True)\n"
        "net = bm.BNN(784, 16, 10)\n"
        "out = bm.train(net, x, y, epochs=2, batch_size=64, lr=1e-2, max_batches=5)\n"
        "print(len(out['losses']), out['losses'][1] < out['losses'][0])",
        "probs = bm.sample_probs(x[:1], net, 20)\n"
        "fig = bm.plot(x[0], probs[:, 0], label=y[0])",
        "bm.save_guide('guide.pt', net, 1.0)\nnet2 = bm.load_guide('guide.pt')\n"
        "print(tuple(bm.predict_prob(x[:3], net2).shape))",
    ]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    NotebookClient(nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [c.outputs for c in nb.cells]
    assert outputs[0] == []  # importing prints nothing
    text = "".join(o.get("text", "") for o in outputs[1])
    assert "2 True" in text and "epoch 2/2  loss" in text
    images = [o for o in outputs[2] if o.output_type == "display_data" and "image/png" in o.data]
    assert len(images) == 1 and len(images[0].data["image/png"]) > 5000
    assert "(3, 10)" in outputs[3][0]["text"]
