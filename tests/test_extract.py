"""Extractor mechanics on tiny random modules: batching, order, pooling, layers, inputs, errors.

The real pretrained models are tested in test_extract_models.py.
"""
from __future__ import annotations

import io
import sys

import numpy as np
import pytest
import torch
from torch import nn

import tlfast
from tlfast.extract import batching, ops


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 5, 3, stride=2))
        self.head = nn.Linear(5, 4)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


class TinyGRU(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(40, 8)
        self.rnn = nn.GRU(8, 7, batch_first=True)

    def forward(self, ids):
        return self.rnn(self.emb(ids))  # (output, h_n): pooled from output


def _images(n=5, h=16, w=12, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def _seqs(n=17, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 40, int(rng.integers(1, 15))).tolist() for _ in range(n)]


# --- batch planning ---------------------------------------------------------------------------

@pytest.mark.parametrize("batch_size,max_tokens", [(4, None), (100, 30), (3, 10), (1, 1)])
def test_plan_batches_covers_every_item_once_within_budget(batch_size, max_tokens):
    lengths = np.random.default_rng(1).integers(1, 25, 57)
    batches = batching.plan_batches(lengths, batch_size, max_tokens)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(57))
    for b in batches:
        assert len(b) <= batch_size
        longest = lengths[b].max()
        assert max_tokens is None or len(b) * longest <= max_tokens or len(b) == 1
    # sorted longest first: padding inside a batch is small
    firsts = [lengths[b].max() for b in batches]
    assert firsts == sorted(firsts, reverse=True)


def test_prefetch_keeps_order_and_propagates_errors():
    assert list(batching.prefetch(lambda x: x * 2, range(7))) == [0, 2, 4, 6, 8, 10, 12]

    def boom(x):
        if x == 3:
            raise KeyError("bad batch")
        return x

    with pytest.raises(KeyError):
        list(batching.prefetch(boom, range(6)))


# --- from_module: CNN ---------------------------------------------------------------------------

def test_cnn_features_from_named_layer_match_manual_forward():
    model = TinyCNN()
    ext = tlfast.Extractor.from_module(model, layer="features", normalize=False)
    x = _images()
    got = ext.extract(x, batch_size=2)
    pixels = ops.image_preprocess_reference(torch.from_numpy(x))
    with torch.no_grad():
        want = model.features(pixels).mean((2, 3))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert ext.dim == 5


def test_cnn_layer_stops_the_forward_pass_there():
    model = TinyCNN()
    model.head.register_forward_hook(lambda *a: pytest.fail("the head must not run for layer='features.0'"))
    feats = tlfast.Extractor.from_module(model, layer="features.0").extract(_images(2))
    assert feats.shape == (2, 8)
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(2))


def test_cnn_whole_module_and_custom_preprocess_and_layouts():
    model = TinyCNN()
    calls = []

    def preprocess(batch):  # receives uint8 NHWC on the device
        calls.append(batch.shape)
        return batch.permute(0, 3, 1, 2).float() / 255.0

    ext = tlfast.Extractor.from_module(model, preprocess=preprocess, normalize=False)
    x = _images(3)
    got = ext.extract(x)
    with torch.no_grad():
        want = model(torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255.0)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert calls == [(3, 16, 12, 3)]
    nchw = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    torch.testing.assert_close(ext.extract(nchw), got)
    torch.testing.assert_close(ext.extract(list(x)), got)  # a list of HWC arrays


def test_images_from_files_and_pil_are_resized(tmp_path):
    from PIL import Image

    x = _images(3, 40, 30)
    paths = []
    for i, a in enumerate(x):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(a).save(paths[-1])
    ext = tlfast.Extractor.from_module(TinyCNN(), layer="features", image_size=16)
    from_files = ext.extract([str(p) for p in paths])
    from_pil = ext.extract([Image.fromarray(a) for a in x])
    from_arrays = ext.extract(x)
    torch.testing.assert_close(from_files, from_pil)
    torch.testing.assert_close(from_files, from_arrays)
    with pytest.raises(ValueError, match="no image file"):
        ext.extract([str(tmp_path / "missing.png")])


# --- from_module: sequence encoders ---------------------------------------------------------------

def test_gru_masked_pooling_equals_pooling_each_sequence_alone():
    model = TinyGRU()
    seqs = _seqs()
    ext = tlfast.Extractor.from_module(model)
    got = ext.extract(seqs, batch_size=4)
    with torch.no_grad():
        want = torch.stack([nn.functional.normalize(model(torch.tensor([s]))[0][0].mean(0), dim=0) for s in seqs])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # the token budget changes the batches, never the result or its order
    torch.testing.assert_close(ext.extract(seqs, max_tokens=20), got, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ext.extract(seqs[::-1], batch_size=17), got.flip(0), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ext.extract([torch.tensor(s) for s in seqs]), got, atol=1e-6, rtol=1e-6)


def test_sequence_module_taking_attention_mask_gets_it():
    class MaskAware(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(40, 4)
            self.masks = []

        def forward(self, ids, attention_mask=None):
            self.masks.append(attention_mask)
            return self.emb(ids)

    m = MaskAware()
    out = tlfast.Extractor.from_module(m, normalize=False).extract([[1, 2, 3], [4]])
    assert m.masks[0].tolist() == [[1, 1, 1], [1, 0, 0]]
    with torch.no_grad():
        torch.testing.assert_close(out[1], m.emb.weight[4])


def test_runs_under_inference_mode():
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(torch.is_inference_mode_enabled())
            return x.float().unsqueeze(-1).repeat(1, 1, 3)

    out = tlfast.Extractor.from_module(Probe(), normalize=False).extract([[1, 2], [3]])
    assert seen == [True]
    torch.testing.assert_close(out, torch.tensor([[1.5] * 3, [3.0] * 3]))


# --- progress -----------------------------------------------------------------------------------

def test_progress_bar_on_request_and_off_by_default(monkeypatch, capsys):
    ext = tlfast.Extractor.from_module(TinyGRU())
    seqs = _seqs(40)
    buf = io.StringIO()
    monkeypatch.setattr(sys, "stderr", buf)
    ext.extract(seqs, batch_size=4, progress=True)
    assert "40/40" in buf.getvalue()
    buf.truncate(0)
    ext.extract(seqs, batch_size=4)  # not a terminal: no bar
    ext.extract(seqs, batch_size=4, progress=False)
    assert buf.getvalue().strip("\x00") == ""


def test_progress_auto_on_for_a_terminal_with_many_batches(monkeypatch):
    ext = tlfast.Extractor.from_module(TinyGRU())

    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty = Tty()
    monkeypatch.setattr(sys, "stderr", tty)
    ext.extract(_seqs(4), batch_size=4)  # one batch: no bar even on a terminal
    assert tty.getvalue() == ""
    ext.extract(_seqs(40), batch_size=4)
    assert "40/40" in tty.getvalue()


# --- errors -------------------------------------------------------------------------------------

def test_input_errors_name_the_problem():
    seq = tlfast.Extractor.from_module(TinyGRU())
    cnn = tlfast.Extractor.from_module(TinyCNN())
    with pytest.raises(ValueError, match="empty"):
        seq.extract([])
    with pytest.raises(ValueError, match="no image file"):  # no tokenizer: strings are image paths
        seq.extract(["a string"])
    with pytest.raises(ValueError, match=r"data\[1\] is an empty sequence"):
        seq.extract([[1, 2], []])
    with pytest.raises(TypeError, match="uint8"):
        cnn.extract(np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="4-D"):
        cnn.extract(np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="channel axis"):
        cnn.extract(np.zeros((2, 8, 8, 5), np.uint8))
    with pytest.raises(ValueError, match="different sizes"):
        cnn.extract([np.zeros((8, 8, 3), np.uint8), np.zeros((9, 8, 3), np.uint8)])
    with pytest.raises(TypeError, match=r"data\[0\] is a int"):
        cnn.extract([3])
    with pytest.raises(ValueError, match="batch_size"):
        cnn.extract(_images(1), batch_size=0)
    with pytest.raises(ValueError, match="max_tokens"):
        seq.extract([[1]], max_tokens=-5)
    with pytest.raises(ValueError, match="not a submodule"):
        tlfast.Extractor.from_module(TinyCNN(), layer="nope")
    with pytest.raises(TypeError, match="nn.Module"):
        tlfast.Extractor.from_module(lambda x: x)
    with pytest.raises(ValueError, match="unknown model"):
        tlfast.Extractor.from_pretrained("bert-of-nowhere")
    with pytest.raises(ValueError, match="backend"):
        tlfast.Extractor.from_pretrained("minilm", backend="tensorrt")
    with pytest.raises(ValueError, match="device"):
        tlfast.Extractor.from_module(TinyCNN(), device="tpu")


def test_import_tlfast_stays_light():
    import subprocess

    code = ("import sys, tlfast; heavy = [m for m in ('transformers', 'onnxruntime', 'onnx', 'PIL', "
            "'sentence_transformers', 'triton') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
