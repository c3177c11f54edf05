// Attention softmax(q k^T * scale) v computed in cache-sized blocks by
// oneDNN, as XLA FFI custom calls for CPUs (forward and backward).
//
// As separate operations, attention writes its float32 logits to memory,
// reads them back for the softmax and writes the weights for the second
// product: at 577 tokens (ViT-B/16 at 384 px, batch 8) 128 MB per layer,
// several times over, which bounded it by the memory's bandwidth. Here each
// (image, head) is one task, the tasks run in parallel over the cores
// (OpenMP, each oneDNN primitive on one core), and a task takes its queries
// a block at a time through the two products and the softmax while the
// block's logits (at most kBlockBytes) stay in the core's cache. Every
// rounding is the one of the separate operations
// (vit_jax.models.attention.product_attention): float32 logits times the
// scale, softmax in float32, weights rounded to the inputs' dtype, products
// accumulated in float32 and rounded to the dtype. The backward pass
// recomputes each block's weights, unless the forward pass was given an
// array to keep them in (where they are small enough to keep: see
// vit_jax/kernels/onednn.py), which the backward pass then reads instead.
//
// Arrays are row-major (batch, tokens, heads, head_dim), bfloat16 or
// float32, all of one dtype. A task copies its keys, values and query
// blocks into dense buffers first: oneDNN runs products of views whose rows
// are strided (the heads interleaved) only in a slower generic GEMM.

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using dnnl::memory;
using Dims = memory::dims;
using Type = memory::data_type;

// The float32 logits of one block of queries take at most this (a quarter
// of a recent Xeon core's 2 MB L2 cache; 128 KB to 2 MB were measured, and
// 512 KB was fastest at 197 and 577 tokens: docs/performance-cpu.md).
constexpr int64_t kBlockBytes = 512 * 1024;

struct Shape {
  int64_t batch, queries, keys, heads, head_dim;
  Type type;
  float scale;
  bool operator<(const Shape& o) const {
    return std::tie(batch, queries, keys, heads, head_dim, type, scale) <
           std::tie(o.batch, o.queries, o.keys, o.heads, o.head_dim, o.type,
                    o.scale);
  }
  int64_t row_stride() const { return heads * head_dim; }
  int64_t block() const {
    const int64_t rows = std::max<int64_t>(16, kBlockBytes / (4 * keys));
    return std::min(queries, rows);
  }
};

// A primitive and its descriptor, which gives the memory layouts of its
// arguments and of the scratchpad each thread passes it (so that threads
// running one primitive at once never share one).
template <typename Primitive>
struct Op {
  typename Primitive::primitive_desc desc;
  Primitive primitive;
  size_t scratch_bytes() const { return desc.scratchpad_desc().get_size(); }
};

template <typename Primitive>
Op<Primitive> MakeOp(const typename Primitive::primitive_desc& desc) {
  return {desc, Primitive(desc)};
}

dnnl::engine& Engine() {
  static dnnl::engine* engine = new dnnl::engine(dnnl::engine::kind::cpu, 0);
  return *engine;
}

dnnl::primitive_attr Attr(float scale = 1.0f, bool accumulate = false) {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  dnnl::post_ops ops;
  if (accumulate) ops.append_sum(1.0f);
  if (scale != 1.0f) {
    ops.append_eltwise(dnnl::algorithm::eltwise_linear, scale, 0.0f);
  }
  attr.set_post_ops(ops);
  return attr;
}

// out (m, n) = scale * a (m, k) x b (k, n) (+ out, to accumulate), each
// operand a view of a buffer with the given strides.
Op<dnnl::matmul> Matmul(int64_t m, int64_t k, int64_t n, Type a_type,
                        Dims a_strides, Type b_type, Dims b_strides,
                        Type out_type, Dims out_strides, float scale = 1.0f,
                        bool accumulate = false) {
  return MakeOp<dnnl::matmul>(dnnl::matmul::primitive_desc(
      Engine(), memory::desc({m, k}, a_type, a_strides),
      memory::desc({k, n}, b_type, b_strides),
      memory::desc({m, n}, out_type, out_strides), Attr(scale, accumulate)));
}

// The primitives of one block of `rows` queries.
struct Block {
  Op<dnnl::matmul> logits, out;  // Forward.
  Op<dnnl::softmax_forward> softmax;
  Op<dnnl::matmul> weights_grad, query_grad, key_grad, value_grad;
  size_t scratch_bytes() const {
    return std::max({logits.scratch_bytes(), out.scratch_bytes(),
                     softmax.scratch_bytes(), weights_grad.scratch_bytes(),
                     query_grad.scratch_bytes(), key_grad.scratch_bytes(),
                     value_grad.scratch_bytes()});
  }
};

// The logits' product (rows, dp) x (dp, keys), dp >= head_dim, whose k^T
// is the transposed view of dense (keys, dp) keys. oneDNN copies its
// right-hand operand into its own blocked layout anyway, so the view costs
// it nothing more and saves a transposed copy made element by element
// (ViT-B/16's layer at 197 tokens, bfloat16, one thread of a Zen 5 EPYC:
// forward and backward 1.15x faster without that copy).
Op<dnnl::matmul> LogitsProduct(const Shape& s, int64_t rows, int64_t dp) {
  return Matmul(rows, dp, s.keys, s.type, {dp, 1}, s.type, {1, dp},
                Type::f32, {s.keys, 1}, s.scale);
}

// The contracted size of the two products over head_dim (q k^T and
// out_grad v^T), whose operands are copied with zero columns up to it:
// head_dim, unless oneDNN would run these bfloat16 products without AMX
// and runs them with AMX at the next multiple of 32. oneDNN 3.2 does so for
// 64 contracted elements against 577 keys (not 197): (227, 64) x (64, 577)
// took 0.20 ms without AMX, padded to 96 0.07 ms with it.
int64_t PaddedDim(const Shape& s, int64_t rows) {
  const auto amx = [&](int64_t dp) {
    const std::string impl = LogitsProduct(s, rows, dp).desc.impl_info_str();
    return impl.find("amx") != std::string::npos;
  };
  if (s.type != Type::bf16 || amx(s.head_dim)) return s.head_dim;
  const int64_t padded = (s.head_dim / 32 + 1) * 32;
  return amx(padded) ? padded : s.head_dim;
}

// Every operand is a dense buffer of the thread's workspace.
Block MakeBlock(const Shape& s, int64_t rows, int64_t dp) {
  const int64_t d = s.head_dim, t = s.keys;
  const Type f32 = Type::f32, x = s.type;
  Block b{};
  // Logits (rows, keys) = scale * q (rows, dp) x k^T (dp, keys), both padded
  // to dp.
  b.logits = LogitsProduct(s, rows, dp);
  b.softmax = MakeOp<dnnl::softmax_forward>(
      dnnl::softmax_forward::primitive_desc(
          Engine(), dnnl::prop_kind::forward_inference,
          dnnl::algorithm::softmax_accurate,
          memory::desc({rows, t}, f32, {t, 1}),
          memory::desc({rows, t}, x, {t, 1}), 1, Attr()));
  // Out (rows, d) = weights (rows, keys) x v (keys, d), rounded to the dtype.
  b.out = Matmul(rows, t, d, x, {t, 1}, x, {d, 1}, x, {d, 1});
  // Weights' gradient (rows, keys) = out_grad (rows, dp) x v^T (dp, keys),
  // v^T a transposed view as k^T above.
  b.weights_grad = Matmul(rows, dp, t, x, {dp, 1}, x, {1, dp}, f32, {t, 1});
  // q's gradient (rows, d) = logits_grad (rows, keys) x k (keys, d).
  b.query_grad = Matmul(rows, t, d, x, {t, 1}, x, {d, 1}, x, {d, 1});
  // k's (keys, d) += logits_grad^T (keys, rows) x q (rows, d); v's likewise
  // from the weights and out_grad. Accumulated in float32 over the blocks.
  b.key_grad = Matmul(t, rows, d, x, {1, t}, x, {d, 1}, f32, {d, 1}, 1.0f,
                      /*accumulate=*/true);
  b.value_grad = Matmul(t, rows, d, x, {1, t}, x, {d, 1}, f32, {d, 1}, 1.0f,
                        /*accumulate=*/true);
  return b;
}

struct Plan {
  Shape shape;
  std::vector<Block> blocks;  // The full block, then a shorter last one.
  int64_t padded_dim;         // See PaddedDim.
  size_t scratch_bytes = 0;
  const Block& ForRows(int64_t rows) const {
    return rows == shape.block() ? blocks[0] : blocks.back();
  }
};

const Plan& GetPlan(const Shape& s) {
  static std::mutex* mutex = new std::mutex();
  static auto* plans = new std::map<Shape, std::unique_ptr<Plan>>();
  std::lock_guard<std::mutex> lock(*mutex);
  auto& plan = (*plans)[s];
  if (plan) return *plan;
  // Each primitive runs on one thread of `Parallel`'s region; oneDNN sizes
  // its work and scratchpad for the threads it sees when it is created.
  struct OneThread {
    int threads = omp_get_max_threads();
    OneThread() { omp_set_num_threads(1); }
    ~OneThread() { omp_set_num_threads(threads); }
  } one_thread;
  auto made = std::make_unique<Plan>();
  made->shape = s;
  const int64_t block = s.block(), last = s.queries % block;
  made->padded_dim = PaddedDim(s, block);
  made->blocks.push_back(MakeBlock(s, block, made->padded_dim));
  if (last) made->blocks.push_back(MakeBlock(s, last, made->padded_dim));
  for (const Block& b : made->blocks) {
    made->scratch_bytes = std::max(made->scratch_bytes, b.scratch_bytes());
  }
  plan = std::move(made);
  return *plan;
}

size_t Bytes(Type type) { return type == Type::bf16 ? 2 : 4; }

// What one thread works with: its stream, scratchpad and block buffers.
struct Workspace {
  dnnl::stream stream{Engine()};
  std::vector<char> scratch, logits, weights, logits_grad;
  // Dense copies of one (image, head)'s keys and values, also padded to the
  // plan's `padded_dim` columns with zeros, and of one block's queries and
  // out_grad (also padded), and its result (the output or the queries'
  // gradient).
  std::vector<char> key, value, key_padded, value_padded, query, query_padded;
  std::vector<char> out_grad, out_grad_padded, result;
  std::vector<float> key_grad, value_grad;
  // Each primitive's arguments, made on its first run and then pointed at
  // each run's buffers: making them cost some 2-3 us a run, a tenth of a
  // ViT-B/16 layer's attention at 197 tokens.
  std::unordered_map<const void*, std::unordered_map<int, memory>> arguments;
  explicit Workspace(const Plan& plan) {
    const Shape& s = plan.shape;
    const size_t cells = s.block() * s.keys, bytes = Bytes(s.type);
    scratch.resize(std::max<size_t>(plan.scratch_bytes, 1));
    logits.resize(cells * 4);
    weights.resize(cells * bytes);
    logits_grad.resize(cells * bytes);
    for (auto* keys : {&key, &value}) keys->resize(s.keys * s.head_dim * bytes);
    for (auto* keys : {&key_padded, &value_padded}) {
      keys->resize(s.keys * plan.padded_dim * bytes);  // Zeros.
    }
    for (auto* block : {&query, &out_grad, &result}) {
      block->resize(s.block() * s.head_dim * bytes);
    }
    for (auto* block : {&query_padded, &out_grad_padded}) {
      block->resize(s.block() * plan.padded_dim * bytes);  // Zeros.
    }
    key_grad.resize(s.keys * s.head_dim);
    value_grad.resize(s.keys * s.head_dim);
  }
};

// Copies `rows` rows of `row_bytes` from rows `stride_bytes` apart into a
// dense buffer (whose rows are `dense_bytes` apart, by default `row_bytes`),
// or back.
void Gather(char* dense, const char* strided, int64_t rows, size_t row_bytes,
            size_t stride_bytes, size_t dense_bytes = 0) {
  dense_bytes = dense_bytes ? dense_bytes : row_bytes;
  for (int64_t i = 0; i < rows; ++i) {
    std::memcpy(dense + i * dense_bytes, strided + i * stride_bytes,
                row_bytes);
  }
}

void Scatter(char* strided, const char* dense, int64_t rows, size_t row_bytes,
             size_t stride_bytes) {
  for (int64_t i = 0; i < rows; ++i) {
    std::memcpy(strided + i * stride_bytes, dense + i * row_bytes, row_bytes);
  }
}

// Runs a primitive on raw pointers, with the thread's scratchpad.
template <typename Primitive>
void Run(Workspace& w, const Op<Primitive>& p,
         std::initializer_list<std::pair<int, void*>> args) {
  std::unordered_map<int, memory>& memories = w.arguments[&p];
  if (memories.empty()) {
    const auto desc = [&](int arg) {
      return p.desc.query_md(dnnl::query::exec_arg_md, arg);
    };
    for (const auto& [arg, data] : args) {
      memories.emplace(arg, memory(desc(arg), Engine(), data));
    }
    memories.emplace(DNNL_ARG_SCRATCHPAD, memory(desc(DNNL_ARG_SCRATCHPAD),
                                                 Engine(), w.scratch.data()));
  } else {
    for (const auto& [arg, data] : args) memories.at(arg).set_data_handle(data);
  }
  p.primitive.execute(w.stream, memories);
}

// The weights (rows, keys) of one block, softmax(scale * q k^T), into
// `weights` (dense rows), from its dense (padded) query block and the
// workspace's padded keys.
void Weights(Workspace& w, const Block& b, char* query, char* weights) {
  Run(w, b.logits, {{DNNL_ARG_SRC, query},
                    {DNNL_ARG_WEIGHTS, w.key_padded.data()},
                    {DNNL_ARG_DST, w.logits.data()}});
  Run(w, b.softmax, {{DNNL_ARG_SRC, w.logits.data()}, {DNNL_ARG_DST, weights}});
}

float ToFloat(float x) { return x; }

float ToFloat(uint16_t bfloat16) {
  const uint32_t bits = uint32_t{bfloat16} << 16;
  float value;
  std::memcpy(&value, &bits, 4);
  return value;
}

template <typename T>
T FromFloat(float value);

template <>
float FromFloat<float>(float value) {
  return value;
}

// Rounds to the nearest bfloat16, ties to even (as XLA's convert does).
template <>
uint16_t FromFloat<uint16_t>(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  const bool nan = (bits & 0x7fffffffu) > 0x7f800000u;
  bits = nan ? (bits | 0x00400000u) : bits + 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

// What the forward and backward calls share: the shape and its plan, the
// inputs, and how rows of (batch, tokens, heads, head_dim) arrays lie.
struct Call {
  Shape s;
  const Plan* plan;
  const char *q, *k, *v;
  size_t row_bytes, stride_bytes, padded_bytes;
  // The byte offset of (image, token, head) in an array of `tokens` tokens.
  size_t Offset(int64_t image, int64_t token, int64_t head,
                int64_t tokens) const {
    return ((image * tokens + token) * s.heads + head) * row_bytes;
  }
  // Copies `rows` rows of one head from `array` into a dense buffer (with
  // rows of `padded_dim` if `padded`), or back.
  void Gather(char* dense, const char* array, int64_t rows,
              bool padded = false) const {
    ::Gather(dense, array, rows, row_bytes, stride_bytes,
             padded ? padded_bytes : row_bytes);
  }
  void Scatter(char* array, const char* dense, int64_t rows) const {
    ::Scatter(array, dense, rows, row_bytes, stride_bytes);
  }
  // Where the weights of (image, head)'s query `first` start in a kept
  // (batch, heads, queries, keys) array.
  char* KeptWeights(char* kept, int64_t image, int64_t head,
                    int64_t first) const {
    const int64_t row = (image * s.heads + head) * s.queries + first;
    return kept + row * s.keys * Bytes(s.type);
  }
};

// The array that keeps the weights, or null where the call was given an
// empty one (then they are recomputed); an error for any other size or a
// dtype other than the query's.
ffi::Error FindKept(const Shape& s, ffi::DataType query_type,
                    const ffi::AnyBuffer& weights, char** kept) {
  *kept = nullptr;
  if (weights.element_count() == 0) return ffi::Error::Success();
  const size_t expected = s.batch * s.heads * s.queries * s.keys;
  if (weights.element_count() != expected ||
      weights.element_type() != query_type) {
    return ffi::Error::InvalidArgument(
        "onednn_attention: the kept weights must be an empty array or a "
        "(batch, heads, queries, keys) one of the query's dtype");
  }
  *kept = static_cast<char*>(weights.untyped_data());
  return ffi::Error::Success();
}

ffi::Error Check(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                 Shape* shape) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 ||
      !std::equal(kd.begin(), kd.end(), vd.begin()) || qd[0] != kd[0] ||
      qd[2] != kd[2] || qd[3] != kd[3]) {
    return ffi::Error::InvalidArgument(
        "onednn_attention: query, key and value must be (batch, tokens, "
        "heads, head_dim) arrays of one batch, heads and head_dim, key and "
        "value of one shape");
  }
  if (q.element_type() != k.element_type() ||
      q.element_type() != v.element_type() ||
      (q.element_type() != ffi::DataType::BF16 &&
       q.element_type() != ffi::DataType::F32)) {
    return ffi::Error::InvalidArgument(
        "onednn_attention: query, key and value must all be bfloat16 or all "
        "float32");
  }
  shape->batch = qd[0];
  shape->queries = qd[1];
  shape->keys = kd[1];
  shape->heads = qd[2];
  shape->head_dim = qd[3];
  shape->type =
      q.element_type() == ffi::DataType::BF16 ? Type::bf16 : Type::f32;
  return ffi::Error::Success();
}

// Runs body(workspace, task) for tasks 0..tasks-1 over the cores, each
// thread with its own workspace; one call at a time, since each uses every
// core. oneDNN runs each primitive on the calling thread inside the
// parallel region. Errors are caught where they happen (none may leave an
// OpenMP region) and the first is returned.
template <typename Body>
ffi::Error Parallel(const Plan& plan, int64_t tasks, const Body& body) {
  static std::mutex* running = new std::mutex();
  std::lock_guard<std::mutex> lock(*running);
  std::mutex mutex;
  std::string failure;
  const auto fail = [&](const char* what) {
    std::lock_guard<std::mutex> lock(mutex);
    if (failure.empty()) failure = what;
  };
#pragma omp parallel
  {
    std::unique_ptr<Workspace> w;
    try {
      w = std::make_unique<Workspace>(plan);
    } catch (const std::exception& error) {
      fail(error.what());
    }
#pragma omp for schedule(dynamic)
    for (int64_t task = 0; task < tasks; ++task) {
      if (!w) continue;
      try {
        body(*w, task);
      } catch (const std::exception& error) {
        fail(error.what());
      }
    }
    if (w) {
      try {
        w->stream.wait();
      } catch (const std::exception& error) {
        fail(error.what());
      }
    }
  }
  if (failure.empty()) return ffi::Error::Success();
  return ffi::Error::Internal("onednn_attention: " + failure);
}

// Plans the primitives of a shape (once per shape); a oneDNN error, such as
// a dtype this CPU cannot compute, becomes the call's error.
ffi::Error Prepare(const Shape& s, const Plan** plan) {
  try {
    *plan = &GetPlan(s);
  } catch (const dnnl::error& error) {
    return ffi::Error::Internal(std::string("onednn_attention: ") +
                                error.what());
  }
  return ffi::Error::Success();
}

// Checks the inputs and plans their shape (once per shape).
ffi::Error Start(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                 float scale, Call* call) {
  Shape& s = call->s;
  if (ffi::Error error = Check(q, k, v, &s); error.failure()) return error;
  s.scale = scale;
  if (ffi::Error error = Prepare(s, &call->plan); error.failure()) {
    return error;
  }
  call->q = static_cast<const char*>(q.untyped_data());
  call->k = static_cast<const char*>(k.untyped_data());
  call->v = static_cast<const char*>(v.untyped_data());
  call->row_bytes = s.head_dim * Bytes(s.type);
  call->stride_bytes = s.row_stride() * Bytes(s.type);
  call->padded_bytes = call->plan->padded_dim * Bytes(s.type);
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                   ffi::Result<ffi::AnyBuffer> out,
                   ffi::Result<ffi::AnyBuffer> weights, float scale) {
  Call c;
  if (ffi::Error error = Start(q, k, v, scale, &c); error.failure()) {
    return error;
  }
  const Shape& s = c.s;
  char* o = static_cast<char*>(out->untyped_data());
  char* kept;
  if (ffi::Error error = FindKept(s, q.element_type(), *weights, &kept);
      error.failure()) {
    return error;
  }
  // One task per (image, head), whose keys and values are copied once.
  return Parallel(*c.plan, s.batch * s.heads, [&](Workspace& w, int64_t task) {
    const int64_t image = task / s.heads, head = task % s.heads;
    const size_t kv_at = c.Offset(image, 0, head, s.keys);
    c.Gather(w.key_padded.data(), c.k + kv_at, s.keys, /*padded=*/true);
    c.Gather(w.value.data(), c.v + kv_at, s.keys);
    for (int64_t first = 0; first < s.queries; first += s.block()) {
      const int64_t rows = std::min(s.block(), s.queries - first);
      const Block& b = c.plan->ForRows(rows);
      const size_t at = c.Offset(image, first, head, s.queries);
      c.Gather(w.query_padded.data(), c.q + at, rows, /*padded=*/true);
      char* p = kept ? c.KeptWeights(kept, image, head, first)
                     : w.weights.data();
      Weights(w, b, w.query_padded.data(), p);
      Run(w, b.out, {{DNNL_ARG_SRC, p},
                     {DNNL_ARG_WEIGHTS, w.value.data()},
                     {DNNL_ARG_DST, w.result.data()}});
      c.Scatter(o + at, w.result.data(), rows);
    }
  });
}

// Softmax backward for one block, rounded to the dtype T:
// logits_grad = P * (dP - rowsum(dO * O)) * scale, with P the block's
// weights, dP in `logits`, dO the dense out_grad block and O the (strided)
// forward result.
template <typename T>
inline __attribute__((always_inline)) void SoftmaxGrad(Workspace& w,
                                                       const Shape& s,
                                                       int64_t rows,
                                                       const char* out,
                                                       const char* weights) {
  const int64_t d = s.head_dim, t = s.keys, r = s.row_stride();
  const T* o = reinterpret_cast<const T*>(out);
  const T* og = reinterpret_cast<const T*>(w.out_grad.data());
  const float* dp = reinterpret_cast<const float*>(w.logits.data());
  const T* p = reinterpret_cast<const T*>(weights);
  T* ds = reinterpret_cast<T*>(w.logits_grad.data());
  for (int64_t i = 0; i < rows; ++i) {
    float row = 0.0f;
    // Without the pragma the sum is one chain of dependent additions (a
    // float sum may not be reordered): half the function's time.
#pragma omp simd reduction(+ : row)
    for (int64_t j = 0; j < d; ++j) {
      row += ToFloat(og[i * d + j]) * ToFloat(o[i * r + j]);
    }
#pragma omp simd
    for (int64_t j = 0; j < t; ++j) {
      const int64_t e = i * t + j;
      ds[e] = FromFloat<T>(ToFloat(p[e]) * (dp[e] - row) * s.scale);
    }
  }
}

// SoftmaxGrad compiled for AVX-512 and AVX2 as well, picked when loaded.
__attribute__((target_clones("avx512f", "avx2", "default"))) void
SoftmaxGradFor(Workspace& w, const Shape& s, int64_t rows, const char* out,
               const char* weights) {
  if (s.type == Type::bf16) {
    SoftmaxGrad<uint16_t>(w, s, rows, out, weights);
  } else {
    SoftmaxGrad<float>(w, s, rows, out, weights);
  }
}

// Rounds a dense (keys, head_dim) float32 gradient to T into its strided
// place.
template <typename T>
void ScatterRounded(char* strided, const float* dense, const Shape& s) {
  T* out = reinterpret_cast<T*>(strided);
  for (int64_t i = 0; i < s.keys; ++i) {
    for (int64_t j = 0; j < s.head_dim; ++j) {
      out[i * s.row_stride() + j] = FromFloat<T>(dense[i * s.head_dim + j]);
    }
  }
}

ffi::Error Backward(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                    ffi::AnyBuffer out, ffi::AnyBuffer out_grad,
                    ffi::AnyBuffer weights, ffi::Result<ffi::AnyBuffer> q_grad,
                    ffi::Result<ffi::AnyBuffer> k_grad,
                    ffi::Result<ffi::AnyBuffer> v_grad, float scale) {
  Call c;
  if (ffi::Error error = Start(q, k, v, scale, &c); error.failure()) {
    return error;
  }
  if (out.element_type() != q.element_type() ||
      out_grad.element_type() != q.element_type() ||
      out.element_count() != q.element_count() ||
      out_grad.element_count() != q.element_count()) {
    return ffi::Error::InvalidArgument(
        "onednn_attention_backward: out and out_grad must have the query's "
        "shape and dtype");
  }
  const Shape& s = c.s;
  const char* o = static_cast<const char*>(out.untyped_data());
  const char* og = static_cast<const char*>(out_grad.untyped_data());
  char* qg = static_cast<char*>(q_grad->untyped_data());
  char* kg = static_cast<char*>(k_grad->untyped_data());
  char* vg = static_cast<char*>(v_grad->untyped_data());
  char* kept;
  if (ffi::Error error = FindKept(s, q.element_type(), weights, &kept);
      error.failure()) {
    return error;
  }
  // One task per (image, head): its key and value gradients add up over
  // the blocks of queries.
  return Parallel(*c.plan, s.batch * s.heads, [&](Workspace& w, int64_t task) {
    const int64_t image = task / s.heads, head = task % s.heads;
    const size_t kv_at = c.Offset(image, 0, head, s.keys);
    // The products over head_dim read the padded keys, the queries'
    // gradient dense ones: the same copy where the plan does not pad.
    c.Gather(w.key_padded.data(), c.k + kv_at, s.keys, /*padded=*/true);
    char* key = w.key_padded.data();
    if (c.padded_bytes != c.row_bytes) {
      key = w.key.data();
      c.Gather(key, c.k + kv_at, s.keys);
    }
    c.Gather(w.value_padded.data(), c.v + kv_at, s.keys, /*padded=*/true);
    std::fill(w.key_grad.begin(), w.key_grad.end(), 0.0f);
    std::fill(w.value_grad.begin(), w.value_grad.end(), 0.0f);
    for (int64_t first = 0; first < s.queries; first += s.block()) {
      const int64_t rows = std::min(s.block(), s.queries - first);
      const Block& b = c.plan->ForRows(rows);
      const size_t at = c.Offset(image, first, head, s.queries);
      c.Gather(w.query.data(), c.q + at, rows);
      c.Gather(w.out_grad.data(), og + at, rows);
      // The products over head_dim take padded copies where the plan pads.
      char* query = w.query.data();
      char* out_grad_rows = w.out_grad.data();
      if (c.padded_bytes != c.row_bytes) {
        query = w.query_padded.data();
        out_grad_rows = w.out_grad_padded.data();
        c.Gather(query, c.q + at, rows, /*padded=*/true);
        c.Gather(out_grad_rows, og + at, rows, /*padded=*/true);
      }
      // The weights the forward pass kept, or computed again.
      char* p = w.weights.data();
      if (kept) {
        p = c.KeptWeights(kept, image, head, first);
      } else {
        Weights(w, b, query, p);
      }
      Run(w, b.weights_grad, {{DNNL_ARG_SRC, out_grad_rows},
                              {DNNL_ARG_WEIGHTS, w.value_padded.data()},
                              {DNNL_ARG_DST, w.logits.data()}});
      w.stream.wait();
      SoftmaxGradFor(w, s, rows, o + at, p);
      Run(w, b.query_grad, {{DNNL_ARG_SRC, w.logits_grad.data()},
                            {DNNL_ARG_WEIGHTS, key},
                            {DNNL_ARG_DST, w.result.data()}});
      c.Scatter(qg + at, w.result.data(), rows);
      Run(w, b.key_grad, {{DNNL_ARG_SRC, w.logits_grad.data()},
                          {DNNL_ARG_WEIGHTS, w.query.data()},
                          {DNNL_ARG_DST, w.key_grad.data()}});
      Run(w, b.value_grad, {{DNNL_ARG_SRC, p},
                            {DNNL_ARG_WEIGHTS, w.out_grad.data()},
                            {DNNL_ARG_DST, w.value_grad.data()}});
    }
    if (s.type == Type::bf16) {
      ScatterRounded<uint16_t>(kg + kv_at, w.key_grad.data(), s);
      ScatterRounded<uint16_t>(vg + kv_at, w.value_grad.data(), s);
    } else {
      ScatterRounded<float>(kg + kv_at, w.key_grad.data(), s);
      ScatterRounded<float>(vg + kv_at, w.value_grad.data(), s);
    }
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(VitJaxOnednnAttention, Forward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(VitJaxOnednnAttentionBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<float>("scale"));
