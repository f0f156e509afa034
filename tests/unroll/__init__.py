"""Long inner loops and long runs: ``loft.unroll``, ``truncate``, first order, memory."""
