// pagedkv/common.h: error type and checking macros shared by host code and kernels.
// Torch-free and Python-free by rule: nothing under csrc/include may include torch headers.
#pragma once

#include <cstdint>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>

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
// Messages are built without std::ostream. On the GPU image (torch 2.11+cu130 wheel, Ubuntu GCC 13.3)
// inserting a number into a std::ostream from extension code crashes the process, whether or not an
// exception follows (benchmarks/RESULTS.md, "Errors on the GPU image"); strings and std::to_string
// are safe there. Enums print as their value, as an ostream printed them; other types must be
// converted by the caller (csrc/torch/checks.h does torch's).
inline void append(std::string& s, const char* x) { s += x; }
inline void append(std::string& s, const std::string& x) { s += x; }
inline void append(std::string& s, std::string_view x) { s.append(x.data(), x.size()); }
inline void append(std::string& s, char x) { s += x; }
template <typename T>
void append(std::string& s, const T& x) {
  if constexpr (std::is_enum_v<T>) {
    s += std::to_string(static_cast<long long>(x));
  } else if constexpr (std::is_integral_v<T>) {
    s += std::to_string(x);
  } else if constexpr (std::is_floating_point_v<T>) {
    char buf[32];
    std::snprintf(buf, sizeof(buf), "%g", static_cast<double>(x));  // an ostream's default format
    s += buf;
  } else {
    static_assert(sizeof(T) == 0, "convert this type to a string before passing it to a message");
  }
}
template <typename... Args>
std::string concat(const Args&... args) {
  std::string s;
  (append(s, args), ...);
  return s;
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
