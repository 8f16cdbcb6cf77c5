// A decode step's decoder layers in one call: the ops llama.py's loop calls, in its order, called
// through the dispatcher from here. Python's ~10 calls a layer cost a one-sequence step more than
// its attention (docs/engine.md, "One call a step"); the results are the loop's, bit for bit.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace {

using at::Tensor;

template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// x [T, hidden], the embedded tokens, is the residual stream and is updated in place. weights: each
// layer's qkv, o, gate_up and down as pack_vnni tiles, as float32 panels (pack_float_panels), as [N, K]
// weights for the row kernel (float32, or bf16 without panels), or (int8) as pairs of int8 tiles and scales;
// norms: each layer's input and post-attention norm weights, then the final norm's. Returns the
// final norm of the last residual, [T, hidden].
Tensor decode_layers(Tensor& x, const Tensor& cos, const Tensor& sin, Tensor& cache, const Tensor& slot_blocks,
                     const Tensor& slot_offsets, const Tensor& tables, const Tensor& lens, at::TensorList weights,
                     at::TensorList norms, int64_t heads, int64_t kv_heads, double scale, double eps) {
  static const auto linear = op<Tensor(const Tensor&, const Tensor&, int64_t)>("pdserve::linear_tiles");
  static const auto linear_int8 = op<Tensor(const Tensor&, const Tensor&, const Tensor&)>("pdserve::linear_int8");
  static const auto linear_rows = op<Tensor(const Tensor&, const Tensor&)>("pdserve::linear_rows");
  static const auto linear_float_panels =
      op<Tensor(const Tensor&, const Tensor&, int64_t)>("pdserve::linear_float_panels");
  static const auto rope_cache = op<Tensor(const Tensor&, const Tensor&, const Tensor&, Tensor&, int64_t,
                                           const Tensor&, const Tensor&, int64_t, int64_t)>("pdserve::rope_cache");
  static const auto paged_decode =
      op<Tensor(const Tensor&, const Tensor&, int64_t, const Tensor&, const Tensor&, double)>("pdserve::paged_decode");
  static const auto rms_norm = op<Tensor(const Tensor&, const Tensor&, double)>("pdserve::rms_norm");
  static const auto add_rms_norm = op<Tensor(const Tensor&, Tensor&, const Tensor&, double)>("pdserve::add_rms_norm");
  static const auto silu_mul = op<Tensor(const Tensor&)>("pdserve::silu_mul");
  static const auto gate_up_silu = op<Tensor(const Tensor&, const Tensor&, int64_t)>("pdserve::gate_up_silu");

  const int64_t layers = (static_cast<int64_t>(norms.size()) - 1) / 2, tokens = x.size(0);
  const bool int8 = static_cast<int64_t>(weights.size()) == 8 * layers;
  TORCH_CHECK(norms.size() == 2 * static_cast<size_t>(layers) + 1 && (int8 || weights.size() == 4 * static_cast<size_t>(layers)),
              "decode_layers: 2 norms a layer and the final norm; 4 weights a layer (8 for int8)");
  const bool rows = !int8 && weights[0].dim() == 2;  // weights as they are, not panels (1-D)
  const bool float_panels = !int8 && !rows && weights[0].scalar_type() == at::kFloat;  // else bf16 tiles
  auto project = [&](const Tensor& in, int64_t layer, int64_t which) {  // which: qkv, o, gate_up, down
    if (int8) return linear_int8.call(in, weights[8 * layer + 2 * which], weights[8 * layer + 2 * which + 1]);
    const Tensor& w = weights[4 * layer + which];
    if (rows) return linear_rows.call(in, w);
    if (float_panels) return linear_float_panels.call(in, w, w.numel() / in.size(1));
    return linear.call(in, w, w.numel() / in.size(1));
  };
  auto activated = [&](const Tensor& in, int64_t layer) {  // silu(gate) * up, as llama.gate_up_silu computes it
    if (int8 || rows || float_panels) return silu_mul.call(project(in, layer, 2));
    const Tensor& tiles = weights[4 * layer + 2];
    return gate_up_silu.call(in, tiles, tiles.numel() / in.size(1) / 2);
  };
  Tensor h = rms_norm.call(x, norms[0], eps);
  for (int64_t i = 0; i < layers; ++i) {
    const Tensor q = rope_cache.call(project(h, i, 0), cos, sin, cache, i, slot_blocks, slot_offsets, heads, kv_heads);
    const Tensor o = paged_decode.call(q, cache, i, tables, lens, scale).view({tokens, -1});
    h = add_rms_norm.call(project(o, i, 1), x, norms[2 * i + 1], eps);
    const Tensor m = project(activated(h, i), i, 3);
    h = add_rms_norm.call(m, x, norms[2 * i + 2], eps);
  }
  return h;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pdserve, m) {
  m.def(
      "decode_layers(Tensor(a!) x, Tensor cos, Tensor sin, Tensor(b!) cache, Tensor slot_blocks, Tensor slot_offsets, "
      "Tensor tables, Tensor lens, Tensor[] weights, Tensor[] norms, int heads, int kv_heads, float scale, float eps) "
      "-> Tensor");
}

TORCH_LIBRARY_IMPL(pdserve, CPU, m) { m.impl("decode_layers", &decode_layers); }
