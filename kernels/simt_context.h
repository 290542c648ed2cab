// Execution contexts of the SIMT emulator (simt_emulator.h; docs/architecture.md §9): a stack
// and the saved registers of one emulated GPU thread, and the switch between two of them.
// On x86-64 the switch is a few instructions of assembly (the callee-saved registers; the
// contexts share the launching thread's floating-point environment, which kernels do not
// change); elsewhere, or with -DGEM_SIMT_UCONTEXT, POSIX ucontext (glibc's swapcontext makes
// a system call per switch, ~7x slower).
#pragma once

#include <cstddef>
#include <cstdint>

#if !defined(__x86_64__) && !defined(GEM_SIMT_UCONTEXT)
#define GEM_SIMT_UCONTEXT 1
#endif
#if defined(GEM_SIMT_UCONTEXT)
#include <ucontext.h>
#endif

namespace simt::detail {

#if defined(GEM_SIMT_UCONTEXT)
struct Context {
  ucontext_t uc;
};

inline void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }

inline void init_context(Context& c, const ucontext_t& blank, char* stack, size_t bytes,
                         void (*entry)()) {
  c.uc = blank;
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = bytes;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
#else
struct Context {
  void* sp = nullptr;
};

// Pushes the callee-saved registers on the running stack, stores its stack pointer in *from,
// loads `to` and pops the same from there.
[[maybe_unused]] __attribute__((naked, noinline)) static void swap_stacks(void** /*from*/,
                                                                          void* /*to*/) {
  __asm__(
      "pushq %rbp\n\t"
      "pushq %rbx\n\t"
      "pushq %r12\n\t"
      "pushq %r13\n\t"
      "pushq %r14\n\t"
      "pushq %r15\n\t"
      "movq %rsp, (%rdi)\n\t"
      "movq %rsi, %rsp\n\t"
      "popq %r15\n\t"
      "popq %r14\n\t"
      "popq %r13\n\t"
      "popq %r12\n\t"
      "popq %rbx\n\t"
      "popq %rbp\n\t"
      "ret\n\t");
}

inline void switch_context(Context& from, Context& to) { swap_stacks(&from.sp, to.sp); }

// A fresh stack whose first switch "returns" into entry() with the ABI's alignment
// (rsp = 8 mod 16 at function entry), zero callee-saved registers and a null return address
// (entry never returns).
inline void init_context(Context& c, char* stack, size_t bytes, void (*entry)()) {
  auto top = reinterpret_cast<uintptr_t>(stack + bytes) & ~uintptr_t{15};
  auto* sp = reinterpret_cast<uint64_t*>(top);
  *--sp = 0;                                   // entry's return address: never used
  *--sp = reinterpret_cast<uint64_t>(entry);   // popped by `ret`
  for (int i = 0; i < 6; ++i) *--sp = 0;       // rbp, rbx, r12-r15
  c.sp = sp;
}
#endif

}  // namespace simt::detail
