// The one file that talks to Python. Entry points take plain values: device pointers as integers
// (tensor.data_ptr()), sizes, dtype codes and the stream (torch.cuda.current_stream().cuda_stream),
// so the module never links torch and one build serves every torch version. Argument errors raise
// ValueError before anything is launched.
#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>

#include "device_query.h"
#include "kernels.h"

#ifndef MUON_KERNELS_CUDA_ARCHS
#error "MUON_KERNELS_CUDA_ARCHS must be defined by the build (CMakeLists.txt)"
#endif

namespace py = pybind11;
using namespace muon_kernels;

namespace {

template <typename T = void>
T* ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}
cudaStream_t stream_of(uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }
DType dtype_of(int code) { return static_cast<DType>(code); }
CodePath path_of(int code) { return static_cast<CodePath>(code); }

NormalizeParams normalize_params(uintptr_t in, int in_dtype, std::array<int64_t, 3> in_strides, int64_t batch,
                                 int64_t rows, int64_t cols, uintptr_t partial, uintptr_t denom, float norm_scale,
                                 float norm_offset, float floor) {
  NormalizeParams p;
  p.in = ptr(in);
  p.in_dtype = dtype_of(in_dtype);
  p.in_stride_batch = in_strides[0];
  p.in_stride_row = in_strides[1];
  p.in_stride_col = in_strides[2];
  p.batch = batch;
  p.rows = rows;
  p.cols = cols;
  p.partial = ptr<float>(partial);
  p.denom = ptr<float>(denom);
  p.norm_scale = norm_scale;
  p.norm_offset = norm_offset;
  p.floor = floor;
  return p;
}

TensorList tensor_list(std::vector<uintptr_t> grads, std::vector<uintptr_t> tensors, std::vector<int64_t> numels,
                       std::vector<int64_t> stack_offsets, std::vector<int64_t> rows, std::vector<int64_t> cols,
                       std::vector<uint8_t> transposed, std::vector<int64_t> row_strides,
                       std::vector<uint8_t> neuron_cols = {}) {
  TensorList list{std::move(grads), std::move(tensors), std::move(numels),     std::move(stack_offsets),
                  std::move(rows),  std::move(cols),    std::move(transposed), std::move(neuron_cols)};
  list.row_strides = std::move(row_strides);
  return list;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "muon_kernels CUDA extension (torch-free; CUDA runtime only)";
  m.attr("PAD") = kPad;
  m.attr("NORM_TILE") = py::make_tuple(kNormTileRows, kNormTileCols);

  m.def("build_info", [] {
    py::dict info;
    info["archs"] = MUON_KERNELS_CUDA_ARCHS;
    info["cuda_version"] = CUDART_VERSION;
    return info;
  }, "The CUDA archs and runtime version this module was compiled for.");
  m.def("device_query", [] {
    DeviceQuery q = query_devices();
    py::dict out;
    out["device_count"] = q.device_count;
    out["driver_version"] = q.driver_version;
    out["runtime_version"] = q.runtime_version;
    out["error"] = q.error;
    out["capabilities"] = q.capabilities;
    out["names"] = q.names;
    return out;
  }, "Device count, driver/runtime versions and compute capabilities, or the CUDA error that prevented them.");

  m.def("normalize",
        [](uintptr_t in, int in_dtype, std::array<int64_t, 3> in_strides, int64_t batch, int64_t rows, int64_t cols,
           uintptr_t out, int out_dtype, int64_t out_rows, int64_t out_cols, uintptr_t partial, uintptr_t denom,
           float norm_scale, float norm_offset, float floor, uintptr_t stream) {
          NormalizeParams p = normalize_params(in, in_dtype, in_strides, batch, rows, cols, partial, denom, norm_scale,
                                               norm_offset, floor);
          p.out = ptr(out);
          p.out_dtype = dtype_of(out_dtype);
          p.out_rows = out_rows;
          p.out_cols = out_cols;
          normalize(p, stream_of(stream));
        },
        py::arg("input"), py::arg("in_dtype"), py::arg("in_strides"), py::arg("batch"), py::arg("rows"),
        py::arg("cols"), py::arg("out"), py::arg("out_dtype"), py::arg("out_rows"), py::arg("out_cols"),
        py::arg("partial"), py::arg("denom"), py::arg("norm_scale"), py::arg("norm_offset"), py::arg("floor"),
        py::arg("stream"),
        "out = cast(input / max(norm_scale·‖input‖_F + norm_offset, floor)) per matrix; zeros in out's padding.");

  m.def("symmetric_matmul",
        [](uintptr_t p, uintptr_t d, uintptr_t c, int dtype, int64_t batch, int64_t rows, int64_t k, float alpha,
           float beta, int path, uintptr_t stream, int64_t splits, uintptr_t split_partial, uintptr_t split_counters) {
          symmetric_matmul({ptr(p), ptr(d), ptr(c), dtype_of(dtype), batch, rows, k, alpha, beta, splits,
                            ptr<float>(split_partial), ptr<int32_t>(split_counters)},
                           path_of(path), stream_of(stream));
        },
        py::arg("p"), py::arg("d"), py::arg("c"), py::arg("dtype"), py::arg("batch"), py::arg("m"), py::arg("k"),
        py::arg("alpha"), py::arg("beta"), py::arg("path"), py::arg("stream"), py::arg("splits") = 1,
        py::arg("split_partial") = 0, py::arg("split_counters") = 0,
        "c = alpha·p·pᵀ + beta·d on padded stacks (d may be 0: none); upper tiles only, mirrored store. "
        "splits > 1: K cut into slices summed in a fixed order in the same launch (split_partial: "
        "split_partial_elements floats; split_counters: batch · symmetric_tiles(m) int32 zeros, left at zero).");

  m.def("split_partial_elements", &split_partial_elements, py::arg("batch"), py::arg("m"), py::arg("splits"),
        "fp32 elements of the workspace a (batch, m, m) symmetric product split into `splits` K slices needs.");

  m.def("ns_update",
        [](uintptr_t b, uintptr_t x, uintptr_t out, int dtype, int out_dtype, int64_t batch, int64_t rows, int64_t n,
           int64_t out_rows, int64_t out_cols, float a, int path, uintptr_t stream) {
          ns_update({ptr(b), ptr(x), ptr(out), dtype_of(dtype), dtype_of(out_dtype), batch, rows, n, out_rows,
                     out_cols, a},
                    path_of(path), stream_of(stream));
        },
        py::arg("b"), py::arg("x"), py::arg("out"), py::arg("dtype"), py::arg("out_dtype"), py::arg("batch"),
        py::arg("m"), py::arg("n"), py::arg("out_rows"), py::arg("out_cols"), py::arg("a"), py::arg("path"),
        py::arg("stream"), "out = a·x + b·x on padded stacks; out may be the unpadded result.");

  m.def("newton_schulz",
        [](uintptr_t in, int in_dtype, std::array<int64_t, 3> in_strides, int64_t batch, int64_t rows, int64_t cols,
           uintptr_t x, uintptr_t y, uintptr_t a, uintptr_t b, int work_dtype, uintptr_t out, int out_dtype,
           uintptr_t partial, uintptr_t denom, std::vector<float> coefficients, float norm_scale, float norm_offset,
           float floor, int path, uintptr_t stream, int64_t gram_splits, int64_t square_splits,
           uintptr_t split_partial, uintptr_t split_counters) {
          NewtonSchulzParams p;
          p.normalize = normalize_params(in, in_dtype, in_strides, batch, rows, cols, partial, denom, norm_scale,
                                         norm_offset, floor);
          p.x = ptr(x);
          p.y = ptr(y);
          p.a = ptr(a);
          p.b = ptr(b);
          p.work_dtype = dtype_of(work_dtype);
          p.out = ptr(out);
          p.out_dtype = dtype_of(out_dtype);
          p.coefficients = std::move(coefficients);
          p.gram_splits = gram_splits;
          p.square_splits = square_splits;
          p.split_partial = ptr<float>(split_partial);
          p.split_counters = ptr<int32_t>(split_counters);
          newton_schulz(p, path_of(path), stream_of(stream));
        },
        py::arg("input"), py::arg("in_dtype"), py::arg("in_strides"), py::arg("batch"), py::arg("rows"),
        py::arg("cols"), py::arg("x"), py::arg("y"), py::arg("a"), py::arg("b"), py::arg("work_dtype"),
        py::arg("out"), py::arg("out_dtype"), py::arg("partial"), py::arg("denom"), py::arg("coefficients"),
        py::arg("norm_scale"), py::arg("norm_offset"), py::arg("floor"), py::arg("path"), py::arg("stream"),
        py::arg("gram_splits") = 1, py::arg("square_splits") = 1, py::arg("split_partial") = 0,
        py::arg("split_counters") = 0,
        "The whole recurrence: normalize, then per step A = x·xᵀ, B = b·A + c·A·A, x = a·x + B·x "
        "(x·xᵀ and A·A split along K into gram_splits / square_splits slices when > 1).");

  m.def("fused_momentum",
        [](std::vector<uintptr_t> grads, std::vector<uintptr_t> bufs, std::vector<int64_t> numels,
           std::vector<int64_t> stack_offsets, std::vector<int64_t> rows, std::vector<int64_t> cols,
           std::vector<uint8_t> transposed, int grad_dtype, int buf_dtype, uintptr_t momenta, uintptr_t stack,
           bool ema, bool nesterov, uintptr_t stream, std::vector<int64_t> row_strides) {
          fused_momentum(tensor_list(std::move(grads), std::move(bufs), std::move(numels), std::move(stack_offsets),
                                     std::move(rows), std::move(cols), std::move(transposed), std::move(row_strides)),
                         dtype_of(grad_dtype), dtype_of(buf_dtype), ptr<const float>(momenta), ptr(stack), ema,
                         nesterov, stream_of(stream));
        },
        py::arg("grads"), py::arg("bufs"), py::arg("numels"), py::arg("stack_offsets"), py::arg("rows"),
        py::arg("cols"), py::arg("transposed"), py::arg("grad_dtype"), py::arg("buf_dtype"), py::arg("momenta"),
        py::arg("stack"), py::arg("ema"), py::arg("nesterov"), py::arg("stream"),
        py::arg("row_strides") = std::vector<int64_t>{},
        "Momentum (+ Nesterov) on every buffer, the update written into the stack; one launch per 32 tensors. "
        "row_strides: per tensor, elements between rows (split pieces that are column blocks); empty: contiguous.");

  m.def("low_precision_momentum",
        [](std::vector<uintptr_t> grads, std::vector<uintptr_t> bufs, std::vector<int64_t> numels,
           std::vector<int64_t> stack_offsets, std::vector<int64_t> rows, std::vector<int64_t> cols,
           std::vector<uint8_t> transposed, int grad_dtype, uintptr_t momenta, uintptr_t stack, bool ema,
           bool nesterov, bool int8, bool stochastic, std::vector<uintptr_t> scales, std::vector<uintptr_t> steps,
           std::vector<uint32_t> seeds, uintptr_t stream, std::vector<int64_t> row_strides) {
          TensorList list = tensor_list(std::move(grads), std::move(bufs), std::move(numels), std::move(stack_offsets),
                                        std::move(rows), std::move(cols), std::move(transposed),
                                        std::move(row_strides));
          list.scales = std::move(scales);
          list.steps = std::move(steps);
          list.seeds = std::move(seeds);
          low_precision_momentum(list, dtype_of(grad_dtype), ptr<const float>(momenta), ptr(stack), ema, nesterov,
                                 LowPrecisionMomentum{int8, stochastic}, stream_of(stream));
        },
        py::arg("grads"), py::arg("bufs"), py::arg("numels"), py::arg("stack_offsets"), py::arg("rows"),
        py::arg("cols"), py::arg("transposed"), py::arg("grad_dtype"), py::arg("momenta"), py::arg("stack"),
        py::arg("ema"), py::arg("nesterov"), py::arg("int8"), py::arg("stochastic"), py::arg("scales"),
        py::arg("steps"), py::arg("seeds"), py::arg("stream"), py::arg("row_strides") = std::vector<int64_t>{},
        "Momentum stored as int8 + block scales or stochastically rounded bf16; U into the stack (gradients' dtype "
        "for int8, bf16 otherwise).");

  m.def("fused_apply_update",
        [](std::vector<uintptr_t> params, std::vector<int64_t> numels, std::vector<int64_t> stack_offsets,
           std::vector<int64_t> rows, std::vector<int64_t> cols, std::vector<uint8_t> transposed, int param_dtype,
           uintptr_t alphas, uintptr_t decays, uintptr_t stack, int stack_dtype, bool cautious, uintptr_t stream,
           std::vector<uint8_t> neuron_cols, uintptr_t row_scale, uintptr_t gains, uintptr_t shrink, int64_t nmax,
           std::vector<int64_t> row_strides) {
          VariantFactors variant{ptr<const float>(row_scale), ptr<const float>(gains), ptr<const float>(shrink), nmax};
          fused_apply_update(tensor_list({}, std::move(params), std::move(numels), std::move(stack_offsets),
                                         std::move(rows), std::move(cols), std::move(transposed),
                                         std::move(row_strides), std::move(neuron_cols)),
                             dtype_of(param_dtype), ptr<const float>(alphas), ptr<const float>(decays),
                             ptr<const void>(stack), dtype_of(stack_dtype), cautious, variant, stream_of(stream));
        },
        py::arg("params"), py::arg("numels"), py::arg("stack_offsets"), py::arg("rows"), py::arg("cols"),
        py::arg("transposed"), py::arg("param_dtype"), py::arg("alphas"), py::arg("decays"), py::arg("stack"),
        py::arg("stack_dtype"), py::arg("cautious"), py::arg("stream"), py::arg("neuron_cols") = std::vector<uint8_t>{},
        py::arg("row_scale") = 0, py::arg("gains") = 0, py::arg("shrink") = 0, py::arg("nmax") = 0,
        py::arg("row_strides") = std::vector<int64_t>{},
        "W = round(W·decay) + alpha·round(O) for every parameter; cautious: the decay only where W·O >= 0; "
        "variants (gains, row_scale, shrink: device pointers or 0) as in VariantFactors.");

  m.attr("VARIANT_NEURONS") = kVariantNeurons;
  m.attr("VARIANT_TABLE_COLUMNS") = kVariantTableColumns;
  m.def("variant_statistics",
        [](uintptr_t ortho, int ortho_dtype, int param_dtype, uintptr_t table, int64_t matrices, int64_t m_,
           int64_t n, uintptr_t row_scale, uintptr_t partials, float weight, float eps, bool normuon, bool hyperball,
           uintptr_t stream) {
          VariantStatisticsParams p;
          p.ortho = ptr<const void>(ortho);
          p.ortho_dtype = dtype_of(ortho_dtype);
          p.param_dtype = dtype_of(param_dtype);
          p.table = ptr<const int64_t>(table);
          p.matrices = matrices;
          p.m = m_;
          p.n = n;
          p.row_scale = ptr<float>(row_scale);
          p.partials = ptr<float>(partials);
          p.weight = weight;
          p.eps = eps;
          p.normuon = normuon;
          p.hyperball = hyperball;
          variant_statistics(p, stream_of(stream));
        },
        py::arg("ortho"), py::arg("ortho_dtype"), py::arg("param_dtype"), py::arg("table"), py::arg("matrices"),
        py::arg("m"), py::arg("n"), py::arg("row_scale"), py::arg("partials"), py::arg("weight"), py::arg("eps"),
        py::arg("normuon"), py::arg("hyperball"), py::arg("stream"),
        "Per-neuron statistics of the variants (NorMuon's v and s, hyperball sums) into (matrices, blocks, 4) partials.");
}
