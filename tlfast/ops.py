"""The public kernels: validate once, pick a backend, call it."""
from __future__ import annotations

from typing import Any, NamedTuple

from . import backends as _backends
from . import precision as _precision
from ._validate import check_exclude_self, range_safe, safe_knn, scale_values, validate_k, validate_pair
from .backends import BackendInfo

__all__ = ["KnnResult", "knn", "pairwise", "backends"]


class KnnResult(NamedTuple):
    """k nearest neighbours per query, best first: ``values`` float32 (n, k), ``indices`` int64 (n, k)."""

    values: Any
    indices: Any


def backends() -> dict[str, BackendInfo]:
    """Every backend with whether it is available here, why (not), and the devices it runs on."""
    return _backends.available_backends()


def knn(queries: Any, corpus: Any, k: int, metric: str = "cosine", *, backend: str = "auto",
        exclude_self: bool = False, precision: str = "exact") -> KnnResult:
    """Exact k-nearest-neighbour search without materialising the (n, m) distance matrix.

    Args:
        queries: (n, d) numpy array or torch tensor (float16 / bfloat16 / float32 / float64).
        corpus: (m, d), same kind and device as ``queries``.
        k: neighbours per query, 1 <= k <= m (m - 1 with ``exclude_self``).
        metric: "ip", "cosine", "l2" (squared), "kl" (KL(query || corpus)) or "js"; see tlfast.METRICS.
        backend: "auto" (fastest available for the device; TLFAST_BACKEND overrides) or a name
            from ``tlfast.backends()``.
        exclude_self: queries are the corpus; drop each row's pair with itself.
        precision: "exact" (default): float32 products of the inputs as given (float64 inputs in
            float32), the k best of those values.  "bf16" / "fp16": inputs rounded to that format,
            products accumulated in float32, for matrix units (AMX, tensor cores); values are then
            approximate, |value - exact| <= 2 u |q| |c| + d 2^-23 |q| |c| for ip (u = 2^-8 for
            bf16, 2^-11 for fp16; cosine: 4 u + d 2^-23; see docs/design/low-precision.md), and
            near-ties may swap.  Exact mode may screen in low precision where that is faster,
            then certifies and re-ranks: its indices stay exact.

    Returns:
        KnnResult(values float32 (n, k), indices int64 (n, k)), best first, ties to the smaller
        corpus index; numpy in -> numpy out, torch in -> torch out on the same device.

    Equivalent to ``tlfast.reference.knn`` (and, for ip, to ``torch.topk(q @ c.T, k)`` with ties
    ordered by index) but in tiles of bounded size.
    """
    inp = validate_pair(queries, corpus, metric)
    k = validate_k(k, inp.corpus.shape[0], exclude_self, inp.queries.shape[0])
    if exclude_self:
        check_exclude_self(inp.queries, inp.corpus)
    impl = _precision.WithPrecision(_backends.resolve(backend, inp.device), precision)
    values, indices = safe_knn(impl, inp, k, bool(exclude_self))
    return KnnResult(inp.output(values), inp.output(indices))


def pairwise(x: Any, y: Any, metric: str = "cosine", *, backend: str = "auto") -> Any:
    """The full (n, m) float32 matrix of ``metric`` values between the rows of ``x`` and ``y``.

    Same input rules as :func:`knn`.  Holds n * m floats by definition; for neighbours use
    :func:`knn`, which never does.
    """
    inp = validate_pair(x, y, metric)
    impl = _backends.resolve(backend, inp.device)
    inp, value_exp = range_safe(inp)
    return inp.output(scale_values(impl.pairwise(inp.queries, inp.corpus, inp.metric), value_exp))
