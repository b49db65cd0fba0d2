// pybind11 bindings of tlfast._C: argument plumbing and precondition checks only, no maths.
// Every entry point checks ranks, sizes, dtypes and contiguity itself, so a wrong call from
// Python raises instead of reading out of bounds.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <stdexcept>
#include <vector>

#include <string>
#include <type_traits>

#include "cpu/check_rows.h"
#include "cpu/gram.h"
#include "cpu/knn.h"
#include "cpu/pool.h"
#include "cpu/preprocess.h"
#include "cpu/sinkhorn.h"
#include "cpu/tridiag.h"
#include "cuda/device.h"
#ifdef TLFAST_WITH_CUDA
#include "cuda/divergence.h"
#include "cuda/preprocess.h"
#include "cuda/select_k.h"
#endif

namespace py = pybind11;
using tlfast::cpu::Metric;

namespace {

// dtype equivalence (numpy's PyArray_EquivTypes: same type, native byte order), not identity of
// the dtype object: an array that went through pickle carries an equal but distinct dtype object.
template <typename T>
bool has_dtype(const py::array& a) {
  return py::isinstance<py::array_t<T>>(a);
}

// T = float: float32 rows; T = uint16_t: the bit patterns of bf16 / fp16 rows (numpy has no bfloat16).
template <typename T = float>
void check_matrix(const py::array& a, const char* name) {
  if (!has_dtype<T>(a))
    throw py::type_error(std::string(name) + (std::is_same<T, float>::value
                                                  ? " must be a float32 array"
                                                  : " must be a uint16 array of bf16/fp16 bit patterns"));
  if (a.ndim() != 2) throw py::value_error(std::string(name) + " must be 2-D (rows, dim)");
  if (!(a.flags() & py::array::c_style)) throw py::value_error(std::string(name) + " must be C-contiguous");
  if (a.shape(0) < 1 || a.shape(1) < 1) throw py::value_error(std::string(name) + " must be non-empty");
}

Metric check_metric(int metric) {
  if (metric < 0 || metric > 4) throw py::value_error("metric code must be in [0, 4]");
  return static_cast<Metric>(metric);
}

template <typename T = float>
void check_pair(const py::array& q, const py::array& c, int threads) {
  check_matrix<T>(q, "queries");
  check_matrix<T>(c, "corpus");
  if (q.shape(1) != c.shape(1)) throw py::value_error("queries and corpus must have the same dim");
  if (threads < 1) throw py::value_error("threads must be >= 1");
}

// The fused kNN on float32 rows (T = float) or on bf16 / fp16 bit patterns (T = uint16_t, numpy has
// no bfloat16): the same preconditions, outputs and GIL release; `run` calls the kernel.
template <typename T, typename Run>
py::tuple knn_entry(const py::array& q, const py::array& c, int64_t k, int metric, bool exclude_self, int threads,
                    Run run) {
  check_pair<T>(q, c, threads);
  const Metric m = check_metric(metric);
  const int64_t nq = q.shape(0), n = c.shape(0), d = q.shape(1);
  const int64_t eligible = exclude_self ? n - 1 : n;
  if (k < 1 || k > eligible) throw py::value_error("k must be in [1, " + std::to_string(eligible) + "]");
  if (exclude_self && nq > n) throw py::value_error("exclude_self needs queries to be the corpus");
  py::array_t<float> values({nq, k});
  py::array_t<int64_t> indices({nq, k});
  const T* qp = static_cast<const T*>(q.data());
  const T* cp = static_cast<const T*>(c.data());
  float* vp = values.mutable_data();
  int64_t* ip = indices.mutable_data();
  {
    py::gil_scoped_release release;
    run(qp, nq, cp, n, d, m, vp, ip);
  }
  return py::make_tuple(values, indices);
}

py::tuple knn_cpu(const py::array& q, const py::array& c, int64_t k, int metric, bool exclude_self, int threads) {
  return knn_entry<float>(q, c, k, metric, exclude_self, threads,
                          [&](const float* qp, int64_t nq, const float* cp, int64_t n, int64_t d, Metric m,
                              float* vp, int64_t* ip) {
                            tlfast::cpu::knn(qp, nq, cp, n, d, k, m, exclude_self, threads, vp, ip);
                          });
}

py::tuple knn_cpu_half(const py::array& q, const py::array& c, int64_t k, int metric, int half_type,
                       bool exclude_self, int threads) {
  if (half_type != 0 && half_type != 1) throw py::value_error("half_type must be 0 (bf16) or 1 (fp16)");
  const auto type = static_cast<tlfast::cpu::HalfType>(half_type);
  return knn_entry<uint16_t>(q, c, k, metric, exclude_self, threads,
                             [&](const uint16_t* qp, int64_t nq, const uint16_t* cp, int64_t n, int64_t d,
                                 Metric m, float* vp, int64_t* ip) {
                               tlfast::cpu::knn_half(qp, nq, cp, n, d, k, m, type, exclude_self, threads, vp, ip);
                             });
}

py::array_t<float> pairwise_cpu(const py::array& q, const py::array& c, int metric, int threads) {
  check_pair(q, c, threads);
  const Metric m = check_metric(metric);
  const int64_t nq = q.shape(0), n = c.shape(0), d = q.shape(1);
  py::array_t<float> out({nq, n});
  const float* qp = static_cast<const float*>(q.data());
  const float* cp = static_cast<const float*>(c.data());
  float* op = out.mutable_data();
  {
    py::gil_scoped_release release;
    tlfast::cpu::pairwise(qp, nq, cp, n, d, m, threads, op);
  }
  return out;
}

// One fused Sinkhorn half-iteration (csrc/cpu/sinkhorn.h): row log-sum-exps of
// scale * <u_i, v_j> + beta_j and, with cost_col given, the softmax-weighted mean cost per row.
py::tuple sinkhorn_lse_cpu(const py::array& u, const py::array& v, float scale, const py::array& beta, float alpha,
                           const py::object& cost_col, int threads) {
  check_matrix(u, "u");
  check_matrix(v, "v");
  if (u.shape(1) != v.shape(1)) throw py::value_error("u and v must have the same dim");
  if (threads < 1) throw py::value_error("threads must be >= 1");
  const int64_t n = u.shape(0), m = v.shape(0), d = u.shape(1);
  auto check_vector = [m](const py::array& a, const char* name) {
    if (!a.dtype().is(py::dtype::of<float>())) throw py::type_error(std::string(name) + " must be a float32 array");
    if (a.ndim() != 1 || a.shape(0) != m) throw py::value_error(std::string(name) + " must have shape (len(v),)");
    if (!(a.flags() & py::array::c_style)) throw py::value_error(std::string(name) + " must be C-contiguous");
  };
  check_vector(beta, "beta");
  const bool with_cost = !cost_col.is_none();
  py::array cc;
  if (with_cost) {
    cc = cost_col.cast<py::array>();
    check_vector(cc, "cost_col");
  }
  py::array_t<float> lse(n);
  py::array_t<float> cost(with_cost ? n : 0);
  const float* up = static_cast<const float*>(u.data());
  const float* vp = static_cast<const float*>(v.data());
  const float* bp = static_cast<const float*>(beta.data());
  const float* cp = with_cost ? static_cast<const float*>(cc.data()) : nullptr;
  float* lp = lse.mutable_data();
  float* op = with_cost ? cost.mutable_data() : nullptr;
  {
    py::gil_scoped_release release;
    tlfast::cpu::lse_rows(up, n, vp, m, d, scale, bp, alpha, cp, threads, lp, op);
  }
  return py::make_tuple(lse, cost);
}

// g += the upper triangle of (a - shift)ᵀ(a - shift) (csrc/cpu/gram.h): a (n, d) float32, g (d, d)
// float64, shift None or (d,) float32, all C-contiguous; g is updated in place.  With codes (n,)
// int64 and sums (classes, d) float64, also sums[codes[i]] += a[i] - shift.
void gram_upper_add_cpu(const py::array& a, py::array& g, int threads, const py::object& shift,
                        const py::object& codes, const py::object& sums) {
  check_matrix(a, "a");
  if (threads < 1) throw py::value_error("threads must be >= 1");
  const int64_t n = a.shape(0), d = a.shape(1);
  if (!g.dtype().is(py::dtype::of<double>())) throw py::type_error("g must be a float64 array");
  if (g.ndim() != 2 || g.shape(0) != d || g.shape(1) != d) throw py::value_error("g must have shape (dim, dim)");
  if (!(g.flags() & py::array::c_style) || !g.writeable()) throw py::value_error("g must be C-contiguous and writeable");
  const float* sp = nullptr;
  py::array s;
  if (!shift.is_none()) {
    if (!py::isinstance<py::array>(shift)) throw py::type_error("shift must be None or a float32 array");
    s = shift.cast<py::array>();
    if (!s.dtype().is(py::dtype::of<float>())) throw py::type_error("shift must be a float32 array");
    if (s.ndim() != 1 || s.shape(0) != d) throw py::value_error("shift must have shape (dim,)");
    if (!(s.flags() & py::array::c_style)) throw py::value_error("shift must be C-contiguous");
    sp = static_cast<const float*>(s.data());
  }
  if (codes.is_none() != sums.is_none()) throw py::value_error("codes and sums must be given together");
  const int64_t* cp = nullptr;
  double* up = nullptr;
  int64_t classes = 0;
  py::array c, u;
  if (!codes.is_none()) {
    if (!py::isinstance<py::array>(codes) || !py::isinstance<py::array>(sums))
      throw py::type_error("codes and sums must be arrays");
    c = codes.cast<py::array>();
    u = sums.cast<py::array>();
    if (!c.dtype().is(py::dtype::of<int64_t>())) throw py::type_error("codes must be an int64 array");
    if (c.ndim() != 1 || c.shape(0) != n) throw py::value_error("codes must have shape (rows,)");
    if (!(c.flags() & py::array::c_style)) throw py::value_error("codes must be C-contiguous");
    if (!u.dtype().is(py::dtype::of<double>())) throw py::type_error("sums must be a float64 array");
    if (u.ndim() != 2 || u.shape(0) < 1 || u.shape(1) != d)
      throw py::value_error("sums must have shape (classes, dim)");
    if (!(u.flags() & py::array::c_style) || !u.writeable())
      throw py::value_error("sums must be C-contiguous and writeable");
    cp = static_cast<const int64_t*>(c.data());
    up = static_cast<double*>(u.mutable_data());
    classes = u.shape(0);
  }
  const float* ap = static_cast<const float*>(a.data());
  double* gp = static_cast<double*>(g.mutable_data());
  bool ok;
  {
    py::gil_scoped_release release;
    ok = tlfast::cpu::gram_upper_add(ap, n, d, threads, gp, sp, cp, classes, up);
  }
  if (!ok) throw py::value_error("codes must lie in [0, classes) (classes = sums.shape[0])");
}

// Resolvent quadratic forms of a symmetric tridiagonal T (csrc/cpu/tridiag.h): diag (d,), off (d-1,),
// u (d, cols), lam (cols,), all float64 and C-contiguous.  Returns (q1, q2, q3) (q2, q3 None unless
// more), or None when some T + lam[j] I is not numerically positive definite.
py::object tridiag_resolvent_forms_cpu(const py::array& diag, const py::array& off, const py::array& u,
                                       const py::array& lam, bool more) {
  auto f64 = [](const py::array& x, const char* name, int ndim) {
    if (!x.dtype().is(py::dtype::of<double>())) throw py::type_error(std::string(name) + " must be a float64 array");
    if (x.ndim() != ndim) throw py::value_error(std::string(name) + " must be " + std::to_string(ndim) + "-D");
    if (!(x.flags() & py::array::c_style)) throw py::value_error(std::string(name) + " must be C-contiguous");
  };
  f64(diag, "diag", 1);
  f64(off, "off", 1);
  f64(u, "u", 2);
  f64(lam, "lam", 1);
  const int64_t d = diag.shape(0), cols = u.shape(1);
  if (d < 1) throw py::value_error("diag must not be empty");
  if (off.shape(0) != d - 1) throw py::value_error("off must have shape (len(diag) - 1,)");
  if (u.shape(0) != d) throw py::value_error("u must have shape (len(diag), cols)");
  if (lam.shape(0) != cols) throw py::value_error("lam must have shape (u.shape[1],)");
  py::array_t<double> q1(cols), q2(more ? cols : 0), q3(more ? cols : 0);
  const double *dp = static_cast<const double*>(diag.data()), *op = static_cast<const double*>(off.data()),
               *up = static_cast<const double*>(u.data()), *lp = static_cast<const double*>(lam.data());
  double *p1 = q1.mutable_data(), *p2 = more ? q2.mutable_data() : nullptr, *p3 = more ? q3.mutable_data() : nullptr;
  bool ok;
  {
    py::gil_scoped_release release;
    ok = tlfast::cpu::tridiag_resolvent_forms(dp, op, d, up, cols, lp, p1, p2, p3);
  }
  if (!ok) return py::none();
  if (!more) return py::make_tuple(q1, py::none(), py::none());
  return py::make_tuple(q1, q2, q3);
}

py::tuple check_rows(const py::array& x, int checks, double tol, int threads) {
  if (x.ndim() != 2) throw py::value_error("x must be 2-D (rows, dim)");
  if (!(x.flags() & py::array::c_style)) throw py::value_error("x must be C-contiguous");
  if (x.shape(0) < 1 || x.shape(1) < 1) throw py::value_error("x must be non-empty");
  if (threads < 1) throw py::value_error("threads must be >= 1");
  const bool f32 = has_dtype<float>(x);
  if (!f32 && !has_dtype<double>(x)) throw py::type_error("x must be a float32 or float64 array");
  const int64_t n = x.shape(0), d = x.shape(1);
  const void* data = x.data();
  tlfast::cpu::RowCheckResult r;
  {
    py::gil_scoped_release release;
    r = f32 ? tlfast::cpu::check_rows<float>(static_cast<const float*>(data), n, d, checks, tol, threads)
            : tlfast::cpu::check_rows<double>(static_cast<const double*>(data), n, d, checks, tol, threads);
  }
  return py::make_tuple(r.row, r.problem, r.row_sum, r.max_abs, r.min_row_max_abs);
}

py::tuple cuda_device_count() {
#ifdef TLFAST_WITH_CUDA
  std::string why;
  const int n = tlfast::cuda::device_count(&why);
  return py::make_tuple(n, why);
#else
  return py::make_tuple(0, std::string("tlfast._C was built without CUDA (TLFAST_CUDA=OFF or no nvcc)"));
#endif
}

#ifdef TLFAST_WITH_CUDA
// CUDA entry points take raw device pointers (tensor.data_ptr()) and the caller's stream
// (torch.cuda.current_stream().cuda_stream): no copies, no synchronisation.  Pointers are checked
// to be device memory; sizes are checked by the launchers.
void require_device() {
  std::string why;
  if (tlfast::cuda::device_count(&why) == 0) throw std::runtime_error("no usable CUDA device: " + why);
}

void select_k_cuda(uintptr_t tile, int64_t ld, int64_t rows, int64_t cols, int64_t col_base, uintptr_t qterm,
                   uintptr_t cterm, int epilogue, bool smaller_is_better, int64_t exclude_row_base,
                   bool has_prior, int64_t k, uintptr_t values, uintptr_t indices, uintptr_t stream) {
  require_device();
  if (epilogue < 0 || epilogue > 2) throw py::value_error("epilogue must be 0 (none), 1 (cosine) or 2 (l2)");
  const auto ep = static_cast<tlfast::cuda::Epilogue>(epilogue);
  tlfast::cuda::check_device_pointer(reinterpret_cast<const void*>(tile), "tile");
  tlfast::cuda::check_device_pointer(reinterpret_cast<const void*>(values), "values");
  tlfast::cuda::check_device_pointer(reinterpret_cast<const void*>(indices), "indices");
  if (ep != tlfast::cuda::Epilogue::NONE) {
    tlfast::cuda::check_device_pointer(reinterpret_cast<const void*>(qterm), "qterm");
    tlfast::cuda::check_device_pointer(reinterpret_cast<const void*>(cterm), "cterm");
  }
  py::gil_scoped_release release;
  tlfast::cuda::select_k(reinterpret_cast<const float*>(tile), ld, rows, cols, col_base,
                         reinterpret_cast<const float*>(qterm), reinterpret_cast<const float*>(cterm), ep,
                         smaller_is_better, exclude_row_base, has_prior, k, reinterpret_cast<float*>(values),
                         reinterpret_cast<int64_t*>(indices), stream);
}

void divergence_cuda(uintptr_t q, int64_t ldq, int64_t nq, uintptr_t c, int64_t ldc, int64_t n, int64_t d,
                     int dtype, int metric, uintptr_t out, int64_t ldo, uintptr_t stream) {
  require_device();
  tlfast::cuda::check_device_pointer(reinterpret_cast<const void*>(q), "queries");
  tlfast::cuda::check_device_pointer(reinterpret_cast<const void*>(c), "corpus");
  tlfast::cuda::check_device_pointer(reinterpret_cast<const void*>(out), "out");
  py::gil_scoped_release release;
  tlfast::cuda::divergence_tile(reinterpret_cast<const void*>(q), ldq, nq, reinterpret_cast<const void*>(c), ldc,
                                n, d, static_cast<tlfast::cuda::DType>(dtype),
                                static_cast<tlfast::cuda::Divergence>(metric), reinterpret_cast<float*>(out), ldo,
                                stream);
}
#endif

py::array_t<float> masked_mean_pool_cpu(const py::array& x, const py::array& mask, bool normalize, int threads) {
  if (!has_dtype<float>(x)) throw py::type_error("x must be a float32 array");
  if (!has_dtype<int64_t>(mask)) throw py::type_error("mask must be an int64 array");
  if (x.ndim() != 3) throw py::value_error("x must be 3-D (batch, steps, dim)");
  if (mask.ndim() != 2) throw py::value_error("mask must be 2-D (batch, steps)");
  if (!(x.flags() & py::array::c_style) || !(mask.flags() & py::array::c_style))
    throw py::value_error("x and mask must be C-contiguous");
  if (mask.shape(0) != x.shape(0) || mask.shape(1) != x.shape(1))
    throw py::value_error("mask must have shape (batch, steps) matching x");
  if (threads < 1) throw py::value_error("threads must be >= 1");
  const int64_t b = x.shape(0), t = x.shape(1), d = x.shape(2);
  py::array_t<float> out({b, d});
  const float* xp = static_cast<const float*>(x.data());
  const int64_t* mp = static_cast<const int64_t*>(mask.data());
  float* op = out.mutable_data();
  {
    py::gil_scoped_release release;
    tlfast::cpu::masked_mean_pool(xp, mp, b, t, d, normalize, threads, op);
  }
  return out;
}

// Element strides of a uint8 image batch as (n, h, w, c), whichever axis order it is stored in.
std::array<int64_t, 4> image_strides(const py::array& x, bool channels_last) {
  std::array<int64_t, 4> s{};
  for (int i = 0; i < 4; ++i) {
    if (x.strides(i) < 0) throw py::value_error("x must not have negative strides; copy it first");
    s[i] = x.strides(i);  // itemsize is 1, so byte strides are element strides
  }
  return channels_last ? s : std::array<int64_t, 4>{s[0], s[2], s[3], s[1]};
}

void check_affine(const std::vector<float>& scale, const std::vector<float>& shift, int64_t channels) {
  if (static_cast<int64_t>(scale.size()) != channels || static_cast<int64_t>(shift.size()) != channels)
    throw py::value_error("scale and shift need one value per channel");
}

py::array_t<float> image_preprocess_cpu(const py::array& x, bool channels_last, const std::vector<float>& scale,
                                        const std::vector<float>& shift, int threads) {
  if (!has_dtype<uint8_t>(x)) throw py::type_error("x must be a uint8 array");
  if (x.ndim() != 4) throw py::value_error("x must be 4-D (NHWC or NCHW)");
  if (threads < 1) throw py::value_error("threads must be >= 1");
  const auto s = image_strides(x, channels_last);
  const int64_t n = x.shape(0);
  const int64_t h = x.shape(channels_last ? 1 : 2), w = x.shape(channels_last ? 2 : 3);
  const int64_t c = x.shape(channels_last ? 3 : 1);
  check_affine(scale, shift, c);
  py::array_t<float> out({n, c, h, w});
  const uint8_t* xp = static_cast<const uint8_t*>(x.data());
  float* op = out.mutable_data();
  {
    py::gil_scoped_release release;
    tlfast::cpu::image_preprocess(xp, n, h, w, c, s[0], s[1], s[2], s[3], scale.data(), shift.data(), threads, op);
  }
  return out;
}

#ifdef TLFAST_WITH_CUDA
// x_ptr / out_ptr: device addresses (tensor.data_ptr()); sizes and element strides as in
// image_preprocess_cpu; stream: torch.cuda.current_stream().cuda_stream.
void image_preprocess_cuda(uintptr_t x_ptr, int64_t n, int64_t h, int64_t w, int64_t c, int64_t sn, int64_t sh,
                           int64_t sw, int64_t sc, const std::vector<float>& scale,
                           const std::vector<float>& shift, uintptr_t stream, uintptr_t out_ptr) {
  if (x_ptr == 0 || out_ptr == 0) throw py::value_error("x_ptr and out_ptr must be device pointers, not null");
  if (n < 0 || h < 0 || w < 0 || c < 1) throw py::value_error("sizes must be >= 0 and channels >= 1");
  if (sn < 0 || sh < 0 || sw < 0 || sc < 0) throw py::value_error("strides must be >= 0");
  if (c > tlfast::cuda::kMaxChannels) throw py::value_error("at most 4 channels");
  check_affine(scale, shift, c);
  const std::string err = tlfast::cuda::image_preprocess(
      reinterpret_cast<const uint8_t*>(x_ptr), n, h, w, c, sn, sh, sw, sc, scale.data(), shift.data(), stream,
      reinterpret_cast<float*>(out_ptr));
  if (!err.empty()) throw std::runtime_error("image_preprocess_cuda: " + err);
}
#endif

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "tlfast native kernels (CPU OpenMP; CUDA when built with it)";
#ifdef TLFAST_WITH_CUDA
  m.attr("built_with_cuda") = true;
#else
  m.attr("built_with_cuda") = false;
#endif
  m.def("cpu_isa", &tlfast::cpu::isa, "Instruction set the CPU kernels dispatch to on this machine.");
  m.def("knn_cpu", &knn_cpu, py::arg("queries"), py::arg("corpus"), py::arg("k"), py::arg("metric"),
        py::arg("exclude_self"), py::arg("threads"),
        "Fused kNN on float32 C-contiguous arrays -> (values float32 (nq, k), indices int64 (nq, k)).");
  m.def("knn_cpu_half", &knn_cpu_half, py::arg("queries"), py::arg("corpus"), py::arg("k"), py::arg("metric"),
        py::arg("half_type"), py::arg("exclude_self"), py::arg("threads"),
        "Fused kNN on bf16 (half_type 0) / fp16 (1) inputs given as uint16 bit patterns, consumed natively.");
  m.def("cpu_half_kernel", [](int half_type) { return tlfast::cpu::half_kernel(static_cast<tlfast::cpu::HalfType>(half_type)); },
        py::arg("half_type"), "Kernel knn_cpu_half uses on this machine for bf16 (0) / fp16 (1).");
  m.def("pairwise_cpu", &pairwise_cpu, py::arg("queries"), py::arg("corpus"), py::arg("metric"),
        py::arg("threads"), "Full (nq, n) float32 matrix of metric values.");
  m.def("sinkhorn_lse_cpu", &sinkhorn_lse_cpu, py::arg("u"), py::arg("v"), py::arg("scale"), py::arg("beta"),
        py::arg("alpha"), py::arg("cost_col"), py::arg("threads"),
        "Fused Sinkhorn tile pass: row log-sum-exps of scale * <u_i, v_j> + beta_j (and the mean cost).");
  m.def("gram_upper_add_cpu", &gram_upper_add_cpu, py::arg("a"), py::arg("g"), py::arg("threads"),
        py::arg("shift") = py::none(), py::arg("codes") = py::none(), py::arg("sums") = py::none(),
        "g += the upper triangle of (a - shift).T @ (a - shift) (float32 sums over slices of at most 512 "
        "rows, then float64; shift None for a itself); with codes and sums also sums[codes[i]] += a[i] - shift.");
  m.def("tridiag_resolvent_forms_cpu", &tridiag_resolvent_forms_cpu, py::arg("diag"), py::arg("off"), py::arg("u"),
        py::arg("lam"), py::arg("more") = true,
        "(u'A^-1 u, |A^-1 u|^2, (A^-1 u)'A^-1(A^-1 u)) per column of u, A = T + lam[j] I for the symmetric "
        "tridiagonal T (diag, off), by L D L' recurrences; None when some A is not positive definite.");
  m.def("check_rows", &check_rows, py::arg("x"), py::arg("checks"), py::arg("tol"), py::arg("threads"),
        "One pass over rows: (first bad row or -1, problem code, that row's sum, max |x|, smallest "
        "non-zero row max |x|). checks: 1 finite, 2 non-zero rows, 4 probability rows (>= 0, sum 1 within tol).");
  m.def("masked_mean_pool_cpu", &masked_mean_pool_cpu, py::arg("x"), py::arg("mask"), py::arg("normalize"),
        py::arg("threads"),
        "Fused masked mean over axis 1 of x (batch, steps, dim) float32 with an int64 mask, then L2-normalise.");
  m.def("image_preprocess_cpu", &image_preprocess_cpu, py::arg("x"), py::arg("channels_last"), py::arg("scale"),
        py::arg("shift"), py::arg("threads"),
        "uint8 images (NHWC if channels_last else NCHW) -> float32 NCHW x * scale[c] + shift[c].");
#ifdef TLFAST_WITH_CUDA
  m.def("image_preprocess_cuda", &image_preprocess_cuda, py::arg("x_ptr"), py::arg("n"), py::arg("height"),
        py::arg("width"), py::arg("channels"), py::arg("stride_n"), py::arg("stride_h"), py::arg("stride_w"),
        py::arg("stride_c"), py::arg("scale"), py::arg("shift"), py::arg("stream"), py::arg("out_ptr"),
        "Device uint8 images -> float32 NCHW x * scale[c] + shift[c], queued on `stream`.");
#endif
  m.def("cuda_device_count", &cuda_device_count,
        "(count, reason): CUDA devices visible to the runtime, and why there are none.");
#ifdef TLFAST_WITH_CUDA
  m.attr("cuda_max_select_k") = tlfast::cuda::kMaxSelectK;
  m.def("select_k_cuda", &select_k_cuda, py::arg("tile"), py::arg("ld"), py::arg("rows"), py::arg("cols"),
        py::arg("col_base"), py::arg("qterm"), py::arg("cterm"), py::arg("epilogue"), py::arg("smaller_is_better"),
        py::arg("exclude_row_base"), py::arg("has_prior"), py::arg("k"), py::arg("values"), py::arg("indices"),
        py::arg("stream"),
        "Merge each row of a float32 tile (epilogue 0 none / 1 cosine / 2 l2 applied on read) into the "
        "row's running k best (values float32 [rows, k], indices int64 [rows, k]) in place; k <= 2048.");
  m.def("divergence_cuda", &divergence_cuda, py::arg("queries"), py::arg("ldq"), py::arg("nq"), py::arg("corpus"),
        py::arg("ldc"), py::arg("n"), py::arg("d"), py::arg("dtype"), py::arg("metric"), py::arg("out"),
        py::arg("ldo"), py::arg("stream"),
        "float32 [nq, n] tile of KL (metric 3) or JS (metric 4) for dtype 0 f32 / 1 f16 / 2 bf16 rows.");
#endif
}
