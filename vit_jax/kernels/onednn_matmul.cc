// Batched matrix products run by oneDNN, as an XLA FFI custom call for CPUs.
//
// XLA:CPU runs matrix products in YNNPACK, which takes each operand in one
// layout: XLA first copies an operand that a product reads transposed (the
// backward pass of a dense layer) or whose batch axes are not leading
// (attention over (batch, tokens, heads, head_dim) arrays). oneDNN reads
// any strided view in place. This call hands one product to oneDNN:
//
//   out[b..., m, n] = sum_k a[b..., m, k] * b[b..., k, n]
//
// where a, b and out are views of the row-major buffers XLA passes, given
// by `dims` (the batch sizes, then M, K and N) and each operand's element
// strides for its (batch..., rows, columns) axes. a and b are both bfloat16
// or both float32; out is float32. Primitives are created once per shape
// and kept.

#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using Dims = std::vector<int64_t>;
using Key = std::tuple<Dims, Dims, Dims, Dims, int>;

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

// The logical (batch..., rows, columns) shape of an operand.
Dims ViewDims(const Dims& batch, int64_t rows, int64_t columns) {
  Dims dims = batch;
  dims.push_back(rows);
  dims.push_back(columns);
  return dims;
}

// Whether a view with these sizes and strides stays inside a buffer of
// `elements` elements.
bool Fits(const Dims& dims, const Dims& strides, int64_t elements) {
  int64_t last = 0;
  for (size_t i = 0; i < dims.size(); ++i) {
    if (dims[i] < 1 || strides[i] < 0) return false;
    last += (dims[i] - 1) * strides[i];
  }
  return last < elements;
}

ffi::Error Matmul(ffi::AnyBuffer a, ffi::AnyBuffer b,
                  ffi::Result<ffi::AnyBuffer> out,
                  ffi::Span<const int64_t> dims,
                  ffi::Span<const int64_t> a_strides,
                  ffi::Span<const int64_t> b_strides,
                  ffi::Span<const int64_t> out_strides) {
  const size_t rank = a_strides.size();
  if (dims.size() != rank + 1 || b_strides.size() != rank ||
      out_strides.size() != rank || rank < 2) {
    return ffi::Error::InvalidArgument(
        "onednn_matmul: dims must be the batch sizes, M, K and N, and every "
        "operand needs one stride per (batch..., rows, columns) axis");
  }
  const Dims batch(dims.begin(), dims.end() - 3);
  const int64_t m = dims[rank - 2], k = dims[rank - 1], n = dims[rank];
  dnnl::memory::data_type in_type;
  if (a.element_type() != b.element_type() ||
      !ToDnnl(a.element_type(), &in_type) ||
      out->element_type() != ffi::DataType::F32) {
    return ffi::Error::InvalidArgument(
        "onednn_matmul: operands must be both bfloat16 or both float32, the "
        "result float32");
  }
  const Dims a_view(a_strides.begin(), a_strides.end());
  const Dims b_view(b_strides.begin(), b_strides.end());
  const Dims out_view(out_strides.begin(), out_strides.end());
  const auto size = [](const auto& buffer) {
    return static_cast<int64_t>(buffer.element_count());
  };
  if (!Fits(ViewDims(batch, m, k), a_view, size(a)) ||
      !Fits(ViewDims(batch, k, n), b_view, size(b)) ||
      !Fits(ViewDims(batch, m, n), out_view, size(*out))) {
    return ffi::Error::InvalidArgument(
        "onednn_matmul: a view does not fit its buffer");
  }
  dnnl::memory::desc a_desc(ViewDims(batch, m, k), in_type, a_view);
  dnnl::memory::desc b_desc(ViewDims(batch, k, n), in_type, b_view);
  dnnl::memory::desc out_desc(ViewDims(batch, m, n),
                              dnnl::memory::data_type::f32, out_view);

  Cache& cache = GetCache();
  std::lock_guard<std::mutex> lock(cache.mutex);
  try {
    Key key{Dims(dims.begin(), dims.end()), a_view, b_view, out_view,
            static_cast<int>(in_type)};
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
                                  .Attr<ffi::Span<const int64_t>>("dims")
                                  .Attr<ffi::Span<const int64_t>>("a_strides")
                                  .Attr<ffi::Span<const int64_t>>("b_strides")
                                  .Attr<ffi::Span<const int64_t>>(
                                      "out_strides"));
