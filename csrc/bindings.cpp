// pybind11 bindings of tlfast._C: argument plumbing and precondition checks only, no maths.
// Every entry point checks ranks, sizes, dtypes and contiguity itself, so a wrong call from
// Python raises instead of reading out of bounds.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>

#include "cpu/check_rows.h"
#include "cpu/knn.h"
#include "cuda/device.h"

namespace py = pybind11;
using tlfast::cpu::Metric;

namespace {

void check_matrix(const py::array& a, const char* name) {
  if (!py::isinstance<py::array_t<float>>(a) || !a.dtype().is(py::dtype::of<float>()))
    throw py::type_error(std::string(name) + " must be a float32 array");
  if (a.ndim() != 2) throw py::value_error(std::string(name) + " must be 2-D (rows, dim)");
  if (!(a.flags() & py::array::c_style)) throw py::value_error(std::string(name) + " must be C-contiguous");
  if (a.shape(0) < 1 || a.shape(1) < 1) throw py::value_error(std::string(name) + " must be non-empty");
}

Metric check_metric(int metric) {
  if (metric < 0 || metric > 4) throw py::value_error("metric code must be in [0, 4]");
  return static_cast<Metric>(metric);
}

void check_pair(const py::array& q, const py::array& c, int threads) {
  check_matrix(q, "queries");
  check_matrix(c, "corpus");
  if (q.shape(1) != c.shape(1)) throw py::value_error("queries and corpus must have the same dim");
  if (threads < 1) throw py::value_error("threads must be >= 1");
}

py::tuple knn_cpu(const py::array& q, const py::array& c, int64_t k, int metric, bool exclude_self, int threads) {
  check_pair(q, c, threads);
  const Metric m = check_metric(metric);
  const int64_t nq = q.shape(0), n = c.shape(0), d = q.shape(1);
  const int64_t eligible = exclude_self ? n - 1 : n;
  if (k < 1 || k > eligible) throw py::value_error("k must be in [1, " + std::to_string(eligible) + "]");
  if (exclude_self && nq > n) throw py::value_error("exclude_self needs queries to be the corpus");
  py::array_t<float> values({nq, k});
  py::array_t<int64_t> indices({nq, k});
  const float* qp = static_cast<const float*>(q.data());
  const float* cp = static_cast<const float*>(c.data());
  float* vp = values.mutable_data();
  int64_t* ip = indices.mutable_data();
  {
    py::gil_scoped_release release;
    tlfast::cpu::knn(qp, nq, cp, n, d, k, m, exclude_self, threads, vp, ip);
  }
  return py::make_tuple(values, indices);
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

py::tuple check_rows(const py::array& x, int checks, double tol, int threads) {
  if (x.ndim() != 2) throw py::value_error("x must be 2-D (rows, dim)");
  if (!(x.flags() & py::array::c_style)) throw py::value_error("x must be C-contiguous");
  if (x.shape(0) < 1 || x.shape(1) < 1) throw py::value_error("x must be non-empty");
  if (threads < 1) throw py::value_error("threads must be >= 1");
  const bool f32 = x.dtype().is(py::dtype::of<float>());
  if (!f32 && !x.dtype().is(py::dtype::of<double>())) throw py::type_error("x must be a float32 or float64 array");
  const int64_t n = x.shape(0), d = x.shape(1);
  const void* data = x.data();
  tlfast::cpu::RowCheckResult r;
  {
    py::gil_scoped_release release;
    r = f32 ? tlfast::cpu::check_rows<float>(static_cast<const float*>(data), n, d, checks, tol, threads)
            : tlfast::cpu::check_rows<double>(static_cast<const double*>(data), n, d, checks, tol, threads);
  }
  return py::make_tuple(r.row, r.problem, r.row_sum);
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
  m.def("pairwise_cpu", &pairwise_cpu, py::arg("queries"), py::arg("corpus"), py::arg("metric"),
        py::arg("threads"), "Full (nq, n) float32 matrix of metric values.");
  m.def("check_rows", &check_rows, py::arg("x"), py::arg("checks"), py::arg("tol"), py::arg("threads"),
        "One pass over rows: (first bad row or -1, problem code, that row's sum). checks: 1 finite, "
        "2 non-zero rows, 4 probability rows (>= 0, sum 1 within tol).");
  m.def("cuda_device_count", &cuda_device_count,
        "(count, reason): CUDA devices visible to the runtime, and why there are none.");
}
