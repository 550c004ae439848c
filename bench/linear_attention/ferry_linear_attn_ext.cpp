// PyTorch binding of Ferry's CUDA causal linear attention (ferry/kernels/cuda_linear_attention.h).
// Built on the GPU machine by ferry_linear_attn.py through torch.utils.cpp_extension.load; the
// autograd.Function lives there. Tensors: q (T, Hq, d), k and v (T, Hkv, d), bf16 or fp16, CUDA,
// contiguous; cu_seqlens int32 (num_seqs + 1) on the same device; states float32
// (num_seqs, Hkv, stride) in the layout of ferry/kernels/linear_attention.h. Each call runs on the
// current stream.
#include <ATen/cuda/CUDAContext.h>
#include <torch/extension.h>

#include <optional>
#include <string>
#include <tuple>

#include "ferry/kernels/cuda_linear_attention.h"

namespace {

// Chunks per sequence segment (cuda_linear_attention.h): 0 lets the library choose; the
// benchmark sets others to compare.
int g_segment_chunks = 0;

using ferry::DType;
using ferry::kernels::LinearAttentionConfig;
using ferry::kernels::LinearFeatureMap;

void Check(cudaError_t error, const char* what) {
  TORCH_CHECK(error == cudaSuccess, what, ": ", cudaGetErrorString(error));
}

LinearFeatureMap ParseFeatureMap(const std::string& name) {
  if (name == "one_plus_x_max_norm") return LinearFeatureMap::kOnePlusXMaxNorm;
  if (name == "elu_plus_one") return LinearFeatureMap::kEluPlusOne;
  if (name == "identity") return LinearFeatureMap::kIdentity;
  TORCH_CHECK(false, "unknown feature map ", name,
              " (one_plus_x_max_norm, elu_plus_one or identity)");
}

LinearAttentionConfig MakeConfig(const torch::Tensor& q, const torch::Tensor& k,
                                 const torch::Tensor& v, const torch::Tensor& cu_seqlens,
                                 const std::string& feature_map, bool normalize) {
  TORCH_CHECK(q.is_cuda() && k.is_cuda() && v.is_cuda() && cu_seqlens.is_cuda(),
              "tensors must be on a CUDA device");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "q, k, v must be (T, H, d)");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous(),
              "q, k, v must be contiguous");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "q, k, v must share a dtype");
  TORCH_CHECK(k.sizes() == v.sizes() && q.size(0) == k.size(0) && q.size(2) == k.size(2),
              "shapes: q (T, Hq, d), k and v (T, Hkv, d)");
  TORCH_CHECK(cu_seqlens.scalar_type() == torch::kInt32 && cu_seqlens.dim() == 1 &&
                  cu_seqlens.size(0) >= 1,
              "cu_seqlens must be int32 (num_seqs + 1)");
  LinearAttentionConfig c;
  c.num_seqs = static_cast<int>(cu_seqlens.size(0) - 1);
  c.num_q_heads = static_cast<int>(q.size(1));
  c.num_kv_heads = static_cast<int>(k.size(1));
  c.head_dim = static_cast<int>(q.size(2));
  c.feature_map = ParseFeatureMap(feature_map);
  c.normalize = normalize;
  if (q.scalar_type() == torch::kBFloat16) {
    c.dtype = DType::kBFloat16;
  } else if (q.scalar_type() == torch::kFloat16) {
    c.dtype = DType::kFloat16;
  } else {
    TORCH_CHECK(false, "q, k, v must be bf16 or fp16");
  }
  return c;
}

int64_t StateStride(const LinearAttentionConfig& c) {
  return ferry::kernels::MakeLinearStateLayout(c.head_dim, c.num_q_heads / c.num_kv_heads).stride;
}

void CheckState(const torch::Tensor& state, const LinearAttentionConfig& c, const char* name) {
  TORCH_CHECK(state.is_cuda() && state.scalar_type() == torch::kFloat32 && state.is_contiguous() &&
                  state.numel() == int64_t{c.num_seqs} * c.num_kv_heads * StateStride(c),
              name, " must be contiguous float32 (num_seqs, Hkv, ", StateStride(c), ")");
}

// Returns (out, final_state or None, row_stats or None, out_residual or None); the last two when
// want_saved (what the backward needs).
std::tuple<torch::Tensor, std::optional<torch::Tensor>, std::optional<torch::Tensor>,
           std::optional<torch::Tensor>>
Forward(
    const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
    const torch::Tensor& cu_seqlens, const std::optional<torch::Tensor>& initial_state,
    const std::string& feature_map, bool normalize, bool want_final_state, bool want_saved) {
  const LinearAttentionConfig c = MakeConfig(q, k, v, cu_seqlens, feature_map, normalize);
  auto out = torch::empty_like(q);
  std::optional<torch::Tensor> final_state, stats, residual;
  auto f32 = q.options().dtype(torch::kFloat32);
  if (want_final_state) final_state = torch::empty({c.num_seqs, c.num_kv_heads, StateStride(c)}, f32);
  if (want_saved) {
    stats = torch::empty({q.size(0), c.num_q_heads, ferry::kernels::kLinearRowStats}, f32);
    residual = torch::empty_like(q);
  }
  if (initial_state.has_value()) CheckState(*initial_state, c, "initial_state");
  ferry::kernels::LinearAttentionForwardArgs args;
  args.config = c;
  args.cu_seqlens = cu_seqlens.data_ptr<int32_t>();
  args.total_tokens = q.size(0);
  args.q = q.data_ptr();
  args.k = k.data_ptr();
  args.v = v.data_ptr();
  args.out = out.data_ptr();
  args.initial_state = initial_state.has_value() ? initial_state->data_ptr<float>() : nullptr;
  args.final_state = final_state.has_value() ? final_state->data_ptr<float>() : nullptr;
  // A torch allocation, so that the segment sums count in torch's peak memory.
  const size_t ws_bytes =
      ferry::kernels::LinearAttentionForwardWorkspaceSize(c, q.size(0), g_segment_chunks);
  auto workspace =
      torch::empty({static_cast<int64_t>(ws_bytes)}, q.options().dtype(torch::kUInt8));
  Check(ferry::kernels::LinearAttentionForwardCuda(
            args, stats.has_value() ? stats->data_ptr<float>() : nullptr,
            residual.has_value() ? residual->data_ptr() : nullptr,
            ws_bytes > 0 ? workspace.data_ptr() : nullptr, ws_bytes,
            at::cuda::getCurrentCUDAStream(), g_segment_chunks),
        "LinearAttentionForwardCuda");
  return {out, final_state, stats, residual};
}

// Returns (dq, dk, dv, d_initial_state or None).
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, std::optional<torch::Tensor>> Backward(
    const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
    const torch::Tensor& cu_seqlens, const std::optional<torch::Tensor>& initial_state,
    const torch::Tensor& out, const torch::Tensor& out_residual, const torch::Tensor& stats,
    const torch::Tensor& dout,
    const std::string& feature_map, bool normalize, bool want_d_state) {
  const LinearAttentionConfig c = MakeConfig(q, k, v, cu_seqlens, feature_map, normalize);
  TORCH_CHECK(out.sizes() == q.sizes() && dout.sizes() == q.sizes() &&
                  out_residual.sizes() == q.sizes() && out.scalar_type() == q.scalar_type() &&
                  dout.scalar_type() == q.scalar_type() &&
                  out_residual.scalar_type() == q.scalar_type(),
              "out, out_residual and dout must match q");
  TORCH_CHECK(stats.scalar_type() == torch::kFloat32 &&
                  stats.numel() == q.size(0) * c.num_q_heads * ferry::kernels::kLinearRowStats,
              "row_stats must come from the forward");
  auto dout_c = dout.contiguous();
  auto dq = torch::empty_like(q);
  auto dk = torch::empty_like(k);
  auto dv = torch::empty_like(v);
  std::optional<torch::Tensor> d_state;
  auto f32 = q.options().dtype(torch::kFloat32);
  if (want_d_state) d_state = torch::empty({c.num_seqs, c.num_kv_heads, StateStride(c)}, f32);
  if (initial_state.has_value()) CheckState(*initial_state, c, "initial_state");
  const size_t ws_bytes =
      ferry::kernels::LinearAttentionBackwardWorkspaceSize(c, q.size(0), g_segment_chunks);
  auto workspace =
      torch::empty({static_cast<int64_t>(ws_bytes)}, q.options().dtype(torch::kUInt8));
  ferry::kernels::LinearAttentionBackwardCudaArgs args;
  args.config = c;
  args.cu_seqlens = cu_seqlens.data_ptr<int32_t>();
  args.total_tokens = q.size(0);
  args.q = q.data_ptr();
  args.k = k.data_ptr();
  args.v = v.data_ptr();
  args.initial_state = initial_state.has_value() ? initial_state->data_ptr<float>() : nullptr;
  args.out = out.data_ptr();
  args.out_residual = out_residual.data_ptr();
  args.row_stats = stats.data_ptr<float>();
  args.dout = dout_c.data_ptr();
  args.dq = dq.data_ptr();
  args.dk = dk.data_ptr();
  args.dv = dv.data_ptr();
  args.d_initial_state = d_state.has_value() ? d_state->data_ptr<float>() : nullptr;
  Check(ferry::kernels::LinearAttentionBackwardCuda(args, workspace.data_ptr(), ws_bytes,
                                                    at::cuda::getCurrentCUDAStream(),
                                                    g_segment_chunks),
        "LinearAttentionBackwardCuda");
  return {dq, dk, dv, d_state};
}

// One token per sequence: q (B, Hq, d), k and v (B, Hkv, d); states updated in place.
torch::Tensor Decode(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                     const torch::Tensor& states, const std::optional<torch::Tensor>& state_slots,
                     const std::string& feature_map, bool normalize) {
  auto cu = torch::zeros({q.size(0) + 1}, q.options().dtype(torch::kInt32));
  LinearAttentionConfig c = MakeConfig(q, k, v, cu, feature_map, normalize);
  TORCH_CHECK(states.is_cuda() && states.scalar_type() == torch::kFloat32 &&
                  states.is_contiguous() && states.dim() == 3 && states.size(1) == c.num_kv_heads &&
                  states.size(2) == StateStride(c),
              "states must be contiguous float32 (num_slots, Hkv, ", StateStride(c), ")");
  auto out = torch::empty_like(q);
  ferry::kernels::LinearAttentionDecodeArgs args;
  args.config = c;
  args.q = q.data_ptr();
  args.k = k.data_ptr();
  args.v = v.data_ptr();
  args.states = states.data_ptr<float>();
  args.num_state_slots = static_cast<int>(states.size(0));
  if (state_slots.has_value()) {
    TORCH_CHECK(state_slots->scalar_type() == torch::kInt32 && state_slots->is_cuda() &&
                    state_slots->numel() == q.size(0),
                "state_slots must be int32 (B) on the device");
    args.state_slots = state_slots->data_ptr<int32_t>();
  }
  args.out = out.data_ptr();
  Check(ferry::kernels::LinearAttentionDecodeCuda(args, at::cuda::getCurrentCUDAStream()),
        "LinearAttentionDecodeCuda");
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &Forward, "causal linear attention forward");
  m.def("backward", &Backward, "causal linear attention backward");
  m.def("decode", &Decode, "one decode step per sequence");
  m.def("set_segment_chunks", [](int chunks) { g_segment_chunks = chunks; },
        "chunks per sequence segment of later calls (0 automatic, < 0 unsplit)");
  m.def("state_stride", [](int head_dim, int group) {
    return ferry::kernels::MakeLinearStateLayout(head_dim, group).stride;
  });
}
