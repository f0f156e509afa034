// The CPU kernels (csrc/cpu/sgd_cpu.cpp, csrc/cpu/adam_cpu.cpp) as the CPU registration
// (csrc/cpu/ops_cpu.cpp) calls them: checked arguments and plain pointers
// (csrc/kernel_args.h), one overload per op. Each returns when its work is done.
#pragma once

#include "../kernel_args.h"

namespace loft {
namespace cpu {

void run(const StepArgs& args, const SgdStepBuffers& buffers);
void run(const StepArgs& args, const HyperGradArgs& hyper, const SgdBackwardBuffers& buffers);
void run(const StepArgs& args, const AdamStepBuffers& buffers);
void run(const StepArgs& args, const AdamInplaceBuffers& buffers);
void run(const StepArgs& args, const HyperGradArgs& hyper, const AdamBackwardBuffers& buffers);

}  // namespace cpu
}  // namespace loft
