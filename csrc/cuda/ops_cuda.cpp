// CUDA registration of loft's ops (contract and math: docs/ops.md): the entry points of
// csrc/entry_points.h (the argument checks and messages of every backend) under a device
// guard, on the current stream: one main kernel per call (csrc/cuda/*_kernels.cu, through
// the torch-free launchers of csrc/cuda/launchers.h) and a launch check after every kernel.
//
// The segment table and group_flags live on the device; their values are checked on a
// host copy (a few bytes, but a synchronisation of the current stream). While the stream
// is being captured into a CUDA graph no host copy is allowed, so the value checks are
// skipped then: run the step once outside the capture (the usual warm-up) to check them.
//
// A host-compiled file (not .cu): it includes ATen, which nvcc compiles several times
// slower, and it needs nothing from the device compiler.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "../entry_points.h"
#include "launchers.h"

namespace loft {
namespace cuda {
namespace {

/// params: as on the CPU (csrc/checks.h), and on a CUDA device (the other arguments are
/// checked to be on the same device). Returns params.
const at::Tensor& check_cuda_params(const char* op, const at::Tensor& params) {
  check_params(op, params);
  TORCH_CHECK(params.is_cuda(), op, ": params must be a CUDA tensor, got ", params.device());
  return params;
}

/// Whether `stream` is capturing a CUDA graph (then no host synchronisation is allowed).
bool is_capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  return status != cudaStreamCaptureStatusNone;
}

/// The CUDA side of the entry points: a CUDA params, the device guard for the whole op,
/// and its kernels on the current stream, each launch checked.
class CudaBackend {
 public:
  CudaBackend(const char* op, const at::Tensor& params)
      : guard_(check_cuda_params(op, params).device()),
        stream_(c10::cuda::getCurrentCUDAStream(params.device().index()).stream()),
        capturing_(is_capturing(stream_)),
        options_(params.options()) {}

  bool reads_values() const { return !capturing_; }

  template <typename Buffers>
  void step(const StepArgs& args, const Buffers& buffers) const {
    launch(args, buffers, stream_);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  /// The main kernel writes per-block partial sums of the [G] hyperparameter terms, and
  /// the reduce kernel adds them into the [G] gradients.
  template <typename Buffers>
  void backward(const StepArgs& args, const HyperGradArgs& hyper, const Buffers& buffers) const {
    constexpr int kNumHyper = Buffers::kNumHyper;
    const int64_t blocks = grid_blocks(args.segments.numel);
    const int64_t groups = args.segments.groups;
    at::Tensor partials =
        at::empty({hyper.mask ? blocks * groups * kNumHyper : 0}, options_.dtype(at::kDouble));
    double* data = hyper.mask ? partials.mutable_data_ptr<double>() : nullptr;
    launch(args, hyper, buffers, data, stream_);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    launch_hyper_grad_reduce(hyper, args.hyper.is_double, data, blocks, groups, kNumHyper, stream_);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

 private:
  c10::cuda::CUDAGuard guard_;
  cudaStream_t stream_;
  bool capturing_;
  at::TensorOptions options_;
};

}  // namespace
}  // namespace cuda
}  // namespace loft

TORCH_LIBRARY_IMPL(loft, CUDA, m) { loft::register_ops<loft::cuda::CudaBackend>(m); }
