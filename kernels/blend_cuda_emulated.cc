// The CUDA blending kernel (blend_cuda.cu) compiled as C++20 against the SIMT emulator
// (simt_emulator.h): an XLA FFI CPU target, rasterize(..., backend="cuda-emulated"), that runs
// the CUDA kernel's own code thread by thread so that CI tests it without a GPU
// (docs/architecture.md §9). Not a copy of the kernel: the same source, another compiler.
#define GEM_SIMT_EMULATOR 1
#include "blend_cuda.cu"
