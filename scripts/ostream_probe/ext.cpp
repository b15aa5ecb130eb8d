// Ops for scripts/ostream_probe/run.sh: each formats a message or throws one way (s1, s2: a number into
// an ostream without throwing; s4, s7: constant messages; s5: a message built with std::to_string;
// s6, g, h: TORCH_CHECK_TYPE / _VALUE / TORCH_CHECK with a number; s8: a std exception).
#include <torch/library.h>
#include <ATen/ATen.h>
#include <pybind11/pybind11.h>
#include <sstream>
at::Tensor f(const at::Tensor& x) { TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat, "x must be float, got ", x.scalar_type()); return x; }
at::Tensor g(const at::Tensor& x) { TORCH_CHECK_VALUE(x.dim() == 1, "x must be 1-d, got ", x.dim()); return x; }
at::Tensor h(const at::Tensor& x) { TORCH_CHECK(x.dim() == 1, "x must be 1-d, got ", x.dim()); return x; }
at::Tensor s1(const at::Tensor& x) { return at::zeros({static_cast<int64_t>(c10::str("a ", x.dim()).size())}); }
at::Tensor s2(const at::Tensor& x) { std::ostringstream os; os << x.dim(); return at::zeros({static_cast<int64_t>(os.str().size())}); }
at::Tensor s3(const at::Tensor& x) { std::ostringstream os; os << "abc"; return at::zeros({static_cast<int64_t>(os.str().size())}); }
at::Tensor s4(const at::Tensor& x) { TORCH_CHECK_VALUE(x.dim() == 1, "constant message"); return x; }
at::Tensor s5(const at::Tensor& x) { TORCH_CHECK_VALUE(x.dim() == 1, std::string("x must be 1-d, got ") + std::to_string(x.dim())); return x; }
at::Tensor s6(const at::Tensor& x) { TORCH_CHECK_TYPE(x.dim() == 1, "x must be 1-d, got ", x.dim()); return x; }
at::Tensor s7(const at::Tensor& x) { TORCH_CHECK(x.dim() == 1, "constant message"); return x; }
at::Tensor s8(const at::Tensor& x) { throw std::invalid_argument("plain std exception"); }
TORCH_LIBRARY(diagx, m) {
  m.def("f(Tensor x) -> Tensor"); m.def("g(Tensor x) -> Tensor"); m.def("h(Tensor x) -> Tensor");
  m.def("s1(Tensor x) -> Tensor"); m.def("s2(Tensor x) -> Tensor"); m.def("s3(Tensor x) -> Tensor");
  m.def("s4(Tensor x) -> Tensor"); m.def("s5(Tensor x) -> Tensor"); m.def("s6(Tensor x) -> Tensor");
  m.def("s7(Tensor x) -> Tensor"); m.def("s8(Tensor x) -> Tensor");
}
TORCH_LIBRARY_IMPL(diagx, CPU, m) {
  m.impl("f", &f); m.impl("g", &g); m.impl("h", &h); m.impl("s1", &s1); m.impl("s2", &s2); m.impl("s3", &s3);
  m.impl("s4", &s4); m.impl("s5", &s5); m.impl("s6", &s6); m.impl("s7", &s7); m.impl("s8", &s8);
}
PYBIND11_MODULE(diagx, m) {}
