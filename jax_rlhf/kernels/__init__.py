"""Hand-written kernels that XLA does not give us: bf16 matmuls on the CPU's matrix unit (AMX) through MKL.

See `jax_rlhf.kernels.gemm` for when they run (CPU + AMX-BF16 + bf16 operands) and how to force XLA.
"""
from jax_rlhf.kernels.build import KernelUnavailable
from jax_rlhf.kernels.gemm import (bf16_dot, cpu_flags, gemm_bf16, get_mode, matmul, mode, set_mode, use_mkl,
                                   xla_dot)

__all__ = ['KernelUnavailable', 'bf16_dot', 'cpu_flags', 'gemm_bf16', 'get_mode', 'matmul', 'mode', 'set_mode',
           'use_mkl', 'xla_dot']
