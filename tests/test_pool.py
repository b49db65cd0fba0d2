"""Fused pooling and preprocessing kernels vs their plain-torch forms (tlfast.extract.ops)."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

# Without a GPU the Triton kernel runs in Triton's CPU interpreter, which must be chosen before
# triton is first imported; with one, the same test runs the compiled kernel on the device.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tlfast._native import _C
from tlfast.extract import ops

needs_native = pytest.mark.skipif(_C is None, reason="tlfast._C is not built")

# Odd shapes: steps and dims that are not multiples of any vector width; a batch of one.
POOL_SHAPES = [(37, 41, 19), (1, 1, 1), (5, 129, 384), (3, 7, 1000)]


def _mask(b: int, t: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = (torch.arange(t)[None] < lengths[:, None]).long()
    if b > 2:
        mask[1] = 0  # an all-padding row pools to zeros, not NaN
        mask[2] = (torch.rand(t, generator=g) > 0.5).long()  # holes, not only a right-padded prefix
    return mask


@needs_native
@pytest.mark.parametrize("shape", POOL_SHAPES)
@pytest.mark.parametrize("normalize", [True, False])
def test_cpu_pool_matches_torch(shape, normalize):
    x = torch.randn(*shape)
    mask = _mask(shape[0], shape[1])
    got = ops.masked_mean_pool(x, mask, normalize)
    want = ops.masked_mean_pool_reference(x.double(), mask, normalize).float()
    assert got.dtype == torch.float32 and got.shape == (shape[0], shape[2])
    torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-5)
    if shape[0] > 2:
        assert torch.equal(got[1], torch.zeros(shape[2]))
    if normalize:
        norms = got.norm(dim=1)
        assert torch.allclose(norms[mask.any(1)], torch.ones(()), atol=1e-5)


@needs_native
def test_cpu_pool_checks_its_arguments():
    x = np.zeros((2, 3, 4), np.float32)
    with pytest.raises(ValueError, match="mask must have shape"):
        _C.masked_mean_pool_cpu(x, np.ones((2, 4), np.int64), True, 1)
    with pytest.raises(TypeError, match="int64"):
        _C.masked_mean_pool_cpu(x, np.ones((2, 3), np.int32), True, 1)
    with pytest.raises(ValueError, match="3-D"):
        _C.masked_mean_pool_cpu(x[0], np.ones((2, 3), np.int64), True, 1)
    with pytest.raises(ValueError, match="contiguous"):
        _C.masked_mean_pool_cpu(np.zeros((2, 4, 3), np.float32).transpose(0, 2, 1), np.ones((2, 3), np.int64),
                                True, 1)


def test_pool_falls_back_for_other_dtypes_and_autograd():
    x = torch.randn(4, 9, 6, dtype=torch.float64, requires_grad=True)
    mask = _mask(4, 9)
    out = ops.masked_mean_pool(x, mask)
    out.sum().backward()  # the plain form keeps autograd working
    assert x.grad is not None
    with pytest.raises(ValueError, match="batch, steps"):
        ops.masked_mean_pool(x.detach(), mask[:, :5])


@pytest.fixture(scope="module")
def triton_pool():
    pytest.importorskip("triton")
    from tlfast.triton.masked_mean_pool import masked_mean_pool

    return masked_mean_pool


@pytest.mark.parametrize("shape", [(7, 41, 19), (2, 300, 33), (1, 1, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("normalize", [True, False])
def test_triton_pool_matches_torch(triton_pool, shape, dtype, normalize):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(*shape).to(dtype)
    mask = _mask(shape[0], shape[1], seed=1)
    got = triton_pool(x.to(device), mask.to(device), normalize).cpu()
    want = ops.masked_mean_pool_reference(x.double(), mask, normalize).float()
    tol = {torch.float32: 2e-6, torch.float16: 1e-3}[dtype]  # fp16 inputs are exact; fp32 sums differ in order
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_pool_on_gpu_matches_torch(dtype):
    x = torch.randn(37, 41, 384, device="cuda").to(dtype)
    mask = _mask(37, 41).cuda()
    got = ops.masked_mean_pool(x, mask)
    want = ops.masked_mean_pool_reference(x.double(), mask).float()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# --- image preprocessing ------------------------------------------------------------------

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _images(n=3, h=37, w=29, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, h, w, c), dtype=torch.uint8, generator=g)


@needs_native
@pytest.mark.parametrize("layout", ["nhwc", "nchw", "nchw-view", "cropped"])
def test_cpu_preprocess_matches_torch(layout):
    x = _images()
    if layout == "nhwc":
        got, want = ops.image_preprocess(x, MEAN, STD), ops.image_preprocess_reference(x.double(), MEAN, STD)
    elif layout == "nchw":
        y = x.permute(0, 3, 1, 2).contiguous()
        got = ops.image_preprocess(y, MEAN, STD, channels_last=False)
        want = ops.image_preprocess_reference(y.double(), MEAN, STD, channels_last=False)
    elif layout == "nchw-view":  # a non-contiguous view is read through its strides, no copy
        y = x.permute(0, 3, 1, 2)
        got = ops.image_preprocess(y, MEAN, STD, channels_last=False)
        want = ops.image_preprocess_reference(x.double(), MEAN, STD)
    else:
        y = x[:, 3:30:2, 1:20]
        got, want = ops.image_preprocess(y, MEAN, STD), ops.image_preprocess_reference(y.double(), MEAN, STD)
    assert got.is_contiguous() and got.dtype == torch.float32
    torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=1e-6)


@needs_native
@pytest.mark.parametrize("channels", [1, 4])
def test_cpu_preprocess_other_channel_counts(channels):
    x = _images(c=channels)
    mean, std = (0.5,) * channels, (0.25,) * channels
    torch.testing.assert_close(ops.image_preprocess(x, mean, std), ops.image_preprocess_reference(x, mean, std),
                               atol=1e-5, rtol=1e-6)


def test_preprocess_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        ops.image_preprocess(torch.zeros(1, 4, 4, 3))
    with pytest.raises(ValueError, match="one per channel"):
        ops.image_preprocess(_images(), (0.5,), (0.5,))
    if _C is not None:
        with pytest.raises(ValueError, match="negative strides"):
            _C.image_preprocess_cpu(np.zeros((1, 4, 4, 3), np.uint8)[:, ::-1], True, [1.0] * 3, [0.0] * 3, 1)


@pytest.mark.gpu
@pytest.mark.parametrize("channels_last", [True, False])
def test_cuda_preprocess_matches_torch(channels_last):
    if not getattr(_C, "built_with_cuda", False):
        pytest.skip("tlfast._C was built without CUDA")
    x = _images(n=5, h=224, w=223).cuda()
    y = x if channels_last else x.permute(0, 3, 1, 2)
    got = ops.image_preprocess(y, MEAN, STD, channels_last=channels_last)
    want = ops.image_preprocess_reference(x.double(), MEAN, STD).float()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-6)
