// pagedkv/common.h: error type and checking macros shared by host code and kernels.
// Torch-free and Python-free by rule: nothing under csrc/include may include torch headers.
#pragma once

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

#if defined(__CUDACC__)
#define PKV_HD __host__ __device__ __forceinline__
#else
#define PKV_HD inline
#endif

namespace pagedkv {

// Every failure in the core is a pagedkv::Error carrying file, line and the offending values.
// The bindings translate it into a Python exception; the library never aborts.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Raised when an allocation would exceed the block or byte budget. Kept distinct so Python can
// map it to pagedkv.BudgetExhaustedError (a MemoryError).
class BudgetError : public Error {
 public:
  using Error::Error;
};

namespace detail {
template <typename... Args>
std::string concat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}
}  // namespace detail

}  // namespace pagedkv

#define PKV_CHECK(cond, ...)                                                                   \
  do {                                                                                         \
    if (!(cond)) {                                                                             \
      throw ::pagedkv::Error(::pagedkv::detail::concat(__VA_ARGS__, " [", __FILE__, ":",      \
                                                       __LINE__, "]"));                        \
    }                                                                                          \
  } while (0)

#define PKV_CUDA_TRY(expr)                                                                     \
  do {                                                                                         \
    cudaError_t pkv_err_ = (expr);                                                             \
    if (pkv_err_ != cudaSuccess) return pkv_err_;                                              \
  } while (0)
