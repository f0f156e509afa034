"""The differentiable optimisers: parity with torch.optim and an independent unroll, state,
per-tensor updates, per-element hyperparameters, misuse and non-finite values."""
