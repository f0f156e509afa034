"""The fused ops against the reference: values, gradients, opcheck, rounding, CUDA, fuzzing and
malformed calls."""
