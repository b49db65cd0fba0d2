"""The ``cuda`` backend and its kernels (csrc/cuda): block select and divergence tiles vs tlfast.reference.

Everything that launches a kernel is ``gpu``-marked.  Without a device (CI) the tests here check
that the module imports, that the backend says why it is unavailable, and that the CUDA entry
points refuse to run instead of crashing.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import tlfast
from conftest import TOL, make_inputs
from test_triton import assert_knn
from tlfast import reference as ref
from tlfast._native import _C
from tlfast.backends import cuda as cuda_backend
from tlfast.metrics import METRICS

ALL = sorted(METRICS)
needs_cuda_build = pytest.mark.skipif(_C is None or not _C.built_with_cuda,
                                      reason="tlfast._C built without CUDA (TLFAST_CUDA=OFF or no nvcc)")


def test_unavailable_without_device_says_why():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    inf = tlfast.backends()["cuda"]
    assert not inf.available and inf.reason
    q, c = make_inputs("ip", 5, 9, 3)
    with pytest.raises(RuntimeError, match="cuda"):
        tlfast.knn(q, c, 2, "ip", backend="cuda")


@needs_cuda_build
def test_entry_points_refuse_without_device():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(RuntimeError, match="CUDA device"):
        _C.select_k_cuda(0, 1, 1, 1, 0, 0, 0, 0, False, -1, False, 1, 0, 0, 0)
    with pytest.raises(RuntimeError, match="CUDA device"):
        _C.divergence_cuda(0, 1, 1, 0, 1, 1, 1, 0, 3, 0, 1, 0)


def knn_cuda(q, c, k, metric, exclude_self=False):
    return tlfast.knn(q, c, k, metric, backend="cuda", exclude_self=exclude_self)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("metric", ALL)
def test_knn_matches_reference(metric, dtype):
    for nq, n, d in ((37, 411, 19), (129, 40000, 64)):  # the second crosses corpus chunks
        q, c = make_inputs(metric, nq, n, d, seed=nq, dtype=dtype)
        q, c = q.cuda(), c.cuda()
        for k in (1, 7, min(n, 411), 2048 if n > 2048 else n):
            assert_knn(q, c, k, metric, *knn_cuda(q, c, k, metric))


@pytest.mark.gpu
@pytest.mark.parametrize("metric", ALL)
def test_exclude_self_and_pairwise(metric):
    x, _ = make_inputs(metric, 300, 1, 33, seed=2)
    x = x.cuda()
    for k in (1, 299):
        assert_knn(x, x, k, metric, *knn_cuda(x, x, k, metric, exclude_self=True), exclude_self=True)
    torch.testing.assert_close(tlfast.pairwise(x, x, metric, backend="cuda"), ref.pairwise(x, x, metric),
                               **TOL[torch.float32])


@pytest.mark.gpu
def test_select_k_ties_and_prior_merge():
    # Integer-valued tiles: many exact ties, which must go to the smaller index; a tile split into
    # two calls (the second merging into the first's lists) must equal a stable sort of the whole.
    torch.manual_seed(0)
    rows, cols, k = 70, 5000, 300
    tile = torch.randint(-50, 50, (rows, cols), device="cuda").float()
    tile[3, 17] = float("nan")  # counts as the worst value
    values = torch.empty(rows, k, device="cuda")
    indices = torch.empty(rows, k, dtype=torch.int64, device="cuda")
    stream = torch.cuda.current_stream().cuda_stream
    half = 2600
    for j, (a, b) in enumerate(((0, half), (half, cols))):
        part = tile[:, a:b].contiguous()
        _C.select_k_cuda(part.data_ptr(), part.stride(0), rows, b - a, a, 0, 0, 0, False, -1, j > 0, k,
                         values.data_ptr(), indices.data_ptr(), stream)
    key = torch.where(torch.isnan(tile), float("-inf"), tile)
    order = torch.sort(-key, dim=1, stable=True).indices[:, :k]
    assert torch.equal(indices, order)
    assert torch.equal(values, key.gather(1, order))


@pytest.mark.gpu
def test_entry_points_reject_bad_arguments():
    tile = torch.zeros(4, 8, device="cuda")
    out_v = torch.empty(4, 2, device="cuda")
    out_i = torch.empty(4, 2, dtype=torch.int64, device="cuda")
    host = torch.zeros(4, 8)
    stream = torch.cuda.current_stream().cuda_stream
    with pytest.raises(ValueError, match="device memory"):
        _C.select_k_cuda(host.data_ptr(), 8, 4, 8, 0, 0, 0, 0, False, -1, False, 2, out_v.data_ptr(),
                         out_i.data_ptr(), stream)
    with pytest.raises(ValueError, match="k must be"):
        _C.select_k_cuda(tile.data_ptr(), 8, 4, 8, 0, 0, 0, 0, False, -1, False, 4096, out_v.data_ptr(),
                         out_i.data_ptr(), stream)
    with pytest.raises(ValueError, match="stride"):
        _C.divergence_cuda(tile.data_ptr(), 2, 4, tile.data_ptr(), 8, 4, 8, 0, 3, tile.data_ptr(), 8, stream)
    with pytest.raises(ValueError, match="block select limit"):
        q, c = make_inputs("ip", 3, 3000, 4)
        knn_cuda(q.cuda(), c.cuda(), 2049, "ip")


@pytest.mark.gpu
def test_numpy_inputs_round_trip():
    q, c = make_inputs("kl", 11, 500, 16, seed=9)
    res = tlfast.knn(q.numpy(), c.numpy(), 5, "kl", backend="cuda")
    assert isinstance(res.values, np.ndarray) and isinstance(res.indices, np.ndarray)
    assert_knn(q, c, 5, "kl", torch.from_numpy(res.values), torch.from_numpy(res.indices))


@pytest.mark.gpu
def test_kl_zero_support_gives_inf():
    q, c = make_inputs("kl", 6, 300, 24, seed=5)
    c[::7, 3] = 0.0
    c = c / c.sum(1, keepdim=True)
    q, c = q.cuda(), c.cuda()
    values, indices = knn_cuda(q, c, 300, "kl")
    assert_knn(q, c, 300, "kl", values, indices)
    assert int(torch.isinf(values).sum(1).min()) == len(range(0, 300, 7))


def test_backend_module_names_itself():
    assert cuda_backend.NAME == "cuda" and "cuda" in tlfast.backends()
