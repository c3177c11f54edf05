// Matrix products run by Intel MKL's GEMM, as an XLA FFI custom call for CPUs.
//
//   out[m, n] = sum_k op(a)[m, k] * op(b)[k, n]
//
// where op(x) is x or its transpose (read in place, as BLAS does), a and b
// are both float32 (cblas_sgemm) or both bfloat16 (cblas_gemm_bf16bf16f32,
// accumulated in float32), and out is float32. Row-major, as XLA passes its
// default layouts. On the ViT's shapes MKL ran float32 products about 1.3x
// and the bfloat16 weight gradients (a transposed) about 1.9x faster than
// XLA:CPU's YNNPACK and oneDNN 3.2 (docs/performance-cpu.md).

#include <cstdint>
#include <mutex>

#include "mkl_cblas.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// One product at a time: each one runs on every core (MKL's OpenMP team),
// and XLA may call two custom calls at once from its own threads.
std::mutex& GemmMutex() {
  static std::mutex* mutex = new std::mutex();  // Used until exit.
  return *mutex;
}

ffi::Error Gemm(ffi::AnyBuffer a, ffi::AnyBuffer b,
                ffi::Result<ffi::AnyBuffer> out, bool transpose_a,
                bool transpose_b) {
  const auto a_dims = a.dimensions(), b_dims = b.dimensions(),
             out_dims = out->dimensions();
  if (a_dims.size() != 2 || b_dims.size() != 2 || out_dims.size() != 2) {
    return ffi::Error::InvalidArgument("mkl_gemm: operands must be matrices");
  }
  const int64_t m = transpose_a ? a_dims[1] : a_dims[0];
  const int64_t k = transpose_a ? a_dims[0] : a_dims[1];
  const int64_t k_b = transpose_b ? b_dims[1] : b_dims[0];
  const int64_t n = transpose_b ? b_dims[0] : b_dims[1];
  if (k != k_b || out_dims[0] != m || out_dims[1] != n) {
    return ffi::Error::InvalidArgument(
        "mkl_gemm: the operands' and the result's shapes do not match");
  }
  if (out->element_type() != ffi::DataType::F32 ||
      a.element_type() != b.element_type()) {
    return ffi::Error::InvalidArgument(
        "mkl_gemm: operands must be both bfloat16 or both float32, the "
        "result float32");
  }
  if (m == 0 || n == 0) return ffi::Error::Success();
  const CBLAS_TRANSPOSE op_a = transpose_a ? CblasTrans : CblasNoTrans;
  const CBLAS_TRANSPOSE op_b = transpose_b ? CblasTrans : CblasNoTrans;
  // Leading dimensions: the row length of each buffer as stored.
  const MKL_INT lda = a_dims[1], ldb = b_dims[1], ldc = n;
  float* c = static_cast<float*>(out->untyped_data());
  std::lock_guard<std::mutex> lock(GemmMutex());
  switch (a.element_type()) {
    case ffi::DataType::F32:
      cblas_sgemm(CblasRowMajor, op_a, op_b, m, n, k, 1.0f,
                  static_cast<const float*>(a.untyped_data()), lda,
                  static_cast<const float*>(b.untyped_data()), ldb, 0.0f, c,
                  ldc);
      return ffi::Error::Success();
    case ffi::DataType::BF16:
      cblas_gemm_bf16bf16f32(
          CblasRowMajor, op_a, op_b, m, n, k, 1.0f,
          static_cast<const MKL_BF16*>(a.untyped_data()), lda,
          static_cast<const MKL_BF16*>(b.untyped_data()), ldb, 0.0f, c, ldc);
      return ffi::Error::Success();
    default:
      return ffi::Error::InvalidArgument(
          "mkl_gemm: operands must be bfloat16 or float32");
  }
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(VitJaxMklGemm, Gemm,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<bool>("transpose_a")
                                  .Attr<bool>("transpose_b"));
