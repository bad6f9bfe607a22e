// bf16 x bf16 -> fp32 GEMM for XLA:CPU through MKL's cblas_gemm_bf16bf16f32 (AMX / AVX512-BF16 on the CPUs
// that have them), exposed as an XLA FFI handler. Built on first use by jax_rlhf/kernels/build.py.
//
//   c[m, n] = op(a) @ op(b),  op(a) = a [m, k] or a^T with a [k, m] (trans_a), op(b) = b [k, n] or b^T with
//   b [n, k] (trans_b). Row-major, dense; fp32 accumulation and output.
#include <cstdint>
#include <cstring>
#include <limits>

#include <mkl.h>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

static ffi::Error Bf16GemmImpl(ffi::Buffer<ffi::BF16> a, ffi::Buffer<ffi::BF16> b,
                               ffi::ResultBuffer<ffi::F32> c, bool trans_a, bool trans_b) {
  auto ad = a.dimensions();
  auto bd = b.dimensions();
  auto cd = c->dimensions();
  if (ad.size() != 2 || bd.size() != 2 || cd.size() != 2) {
    return ffi::Error::InvalidArgument("bf16_gemm: operands and result must be 2-D");
  }
  const int64_t m = trans_a ? ad[1] : ad[0];
  const int64_t k = trans_a ? ad[0] : ad[1];
  const int64_t kb = trans_b ? bd[1] : bd[0];
  const int64_t n = trans_b ? bd[0] : bd[1];
  if (k != kb || cd[0] != m || cd[1] != n) {
    return ffi::Error::InvalidArgument("bf16_gemm: shapes do not agree");
  }
  const int64_t big = std::numeric_limits<MKL_INT>::max();
  if (m > big || n > big || k > big || ad[1] > big || bd[1] > big) {
    return ffi::Error::InvalidArgument("bf16_gemm: a dimension exceeds MKL_INT");
  }
  float* out = c->typed_data();
  if (m == 0 || n == 0) return ffi::Error::Success();
  if (k == 0) {
    std::memset(out, 0, sizeof(float) * m * n);
    return ffi::Error::Success();
  }
  cblas_gemm_bf16bf16f32(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans,
                         (MKL_INT)m, (MKL_INT)n, (MKL_INT)k, 1.0f,
                         reinterpret_cast<const MKL_BF16*>(a.typed_data()), (MKL_INT)ad[1],
                         reinterpret_cast<const MKL_BF16*>(b.typed_data()), (MKL_INT)bd[1], 0.0f, out, (MKL_INT)n);
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxRlhfBf16Gemm, Bf16GemmImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("trans_a")
                                  .Attr<bool>("trans_b"));
