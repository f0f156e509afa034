"""Batched tasks (``innerloop_ctx(..., tasks=N)``): exactness against ``N`` sequential inner
loops, the batched forward (native layers and vmap), unroll/truncate/first order, higher."""
