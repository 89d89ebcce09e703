"""The compiled arithmetic shared by every weight format: common.py (rmsnorm, RoPE, softmax,
attention, SwiGLU), simd.py (LLVM intrinsics Numba cannot express) and jit.py (the fastmath
choice, the kernel registry and the families compiled from it)."""
