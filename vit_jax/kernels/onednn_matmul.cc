// A 2-D matrix product run by oneDNN, as an XLA FFI custom call for CPUs.
//
// XLA:CPU runs bfloat16 products in YNNPACK, copying an operand first where
// the product reads it transposed (the backward pass). oneDNN reads it in
// place through strides. This call hands one product to oneDNN:
//
//   out[M, N] = op(a) @ op(b),  op(x) = x or x^T (attributes transpose_a/b),
//
// with a and b both bfloat16 or both float32 (row-major, as XLA passes them)
// and out float32. Transposes are read through strides, never
// copied. Primitives are created once per shape and kept.

#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using Key = std::tuple<int64_t, int64_t, int64_t, bool, bool, int>;

struct Cache {
  std::mutex mutex;  // One product at a time: each one uses every core.
  dnnl::engine engine{dnnl::engine::kind::cpu, 0};
  dnnl::stream stream{engine};
  std::map<Key, dnnl::matmul> primitives;
};

Cache& GetCache() {
  static Cache* cache = new Cache();  // Never destroyed: used until exit.
  return *cache;
}

bool ToDnnl(ffi::DataType type, dnnl::memory::data_type* out) {
  switch (type) {
    case ffi::DataType::BF16:
      *out = dnnl::memory::data_type::bf16;
      return true;
    case ffi::DataType::F32:
      *out = dnnl::memory::data_type::f32;
      return true;
    default:
      return false;
  }
}

ffi::Error Matmul(ffi::AnyBuffer a, ffi::AnyBuffer b,
                  ffi::Result<ffi::AnyBuffer> out, bool transpose_a,
                  bool transpose_b) {
  auto a_dims = a.dimensions();
  auto b_dims = b.dimensions();
  auto out_dims = out->dimensions();
  if (a_dims.size() != 2 || b_dims.size() != 2 || out_dims.size() != 2) {
    return ffi::Error::InvalidArgument("onednn_matmul takes 2-D arrays");
  }
  const int64_t m = transpose_a ? a_dims[1] : a_dims[0];
  const int64_t k = transpose_a ? a_dims[0] : a_dims[1];
  const int64_t k_b = transpose_b ? b_dims[1] : b_dims[0];
  const int64_t n = transpose_b ? b_dims[0] : b_dims[1];
  if (k != k_b || out_dims[0] != m || out_dims[1] != n) {
    return ffi::Error::InvalidArgument("onednn_matmul: shapes do not match");
  }
  dnnl::memory::data_type in_type;
  const auto out_type = dnnl::memory::data_type::f32;
  if (a.element_type() != b.element_type() ||
      !ToDnnl(a.element_type(), &in_type) ||
      out->element_type() != ffi::DataType::F32) {
    return ffi::Error::InvalidArgument(
        "onednn_matmul: operands must be both bfloat16 or both float32, the "
        "result float32");
  }
  using tag = dnnl::memory::format_tag;
  // A transposed operand is the row-major array read column-major ('ba').
  dnnl::memory::desc a_desc({m, k}, in_type, transpose_a ? tag::ba : tag::ab);
  dnnl::memory::desc b_desc({k, n}, in_type, transpose_b ? tag::ba : tag::ab);
  dnnl::memory::desc out_desc({m, n}, out_type, tag::ab);

  Cache& cache = GetCache();
  std::lock_guard<std::mutex> lock(cache.mutex);
  try {
    Key key{m, k, n, transpose_a, transpose_b, static_cast<int>(in_type)};
    auto found = cache.primitives.find(key);
    if (found == cache.primitives.end()) {
      dnnl::matmul::primitive_desc desc(cache.engine, a_desc, b_desc,
                                        out_desc);
      found = cache.primitives.emplace(key, dnnl::matmul(desc)).first;
    }
    dnnl::memory a_mem(a_desc, cache.engine, a.untyped_data());
    dnnl::memory b_mem(b_desc, cache.engine, b.untyped_data());
    dnnl::memory out_mem(out_desc, cache.engine, out->untyped_data());
    found->second.execute(cache.stream, {{DNNL_ARG_SRC, a_mem},
                                         {DNNL_ARG_WEIGHTS, b_mem},
                                         {DNNL_ARG_DST, out_mem}});
    cache.stream.wait();
  } catch (const dnnl::error& error) {
    return ffi::Error::Internal(error.what());
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(VitJaxOnednnMatmul, Matmul,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<bool>("transpose_a")
                                  .Attr<bool>("transpose_b"));
