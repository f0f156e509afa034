// CPU registration of loft's ops (contract and math: docs/ops.md): the entry points of
// csrc/entry_points.h, whose kernels are the chunked parallel loops of csrc/cpu/sgd_cpu.cpp
// and csrc/cpu/adam_cpu.cpp (csrc/cpu/kernels.h).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../entry_points.h"
#include "kernels.h"

namespace loft {
namespace cpu {
namespace {

/// The CPU side of the entry points: the tensors are in host memory, so the checks read
/// the values of group_flags and segments in place, and the kernels run on this thread and
/// the intra-op pool (at::parallel_for), returning when done.
struct CpuBackend {
  CpuBackend(const char* /*op*/, const at::Tensor& /*params*/) {}
  bool reads_values() const { return true; }

  template <typename Buffers>
  void step(const StepArgs& args, const Buffers& buffers) const {
    run(args, buffers);
  }

  template <typename Buffers>
  void backward(const StepArgs& args, const HyperGradArgs& hyper, const Buffers& buffers) const {
    run(args, hyper, buffers);
  }
};

}  // namespace
}  // namespace cpu
}  // namespace loft

TORCH_LIBRARY_IMPL(loft, CPU, m) {
  using loft::cpu::CpuBackend;
  loft::register_ops<CpuBackend>(m);
  // adam_step with the state updated in place: CPU only.
  m.impl("adam_step_", &loft::adam_step<CpuBackend, at::Tensor>);
}
