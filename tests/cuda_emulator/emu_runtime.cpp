// The runtime of the CPU emulation of CUDA: scheduler, collectives, launch limits and the
// memory checks (docs/emulator.md describes them). build.py compiles it once per variant after
// emu_runtime.h (CLLM_EMU_RUNTIME_IMPL defined: the shared declarations, not the CUDA macros),
// optimised and NOT instrumented, and links it into every kernel library.
//
// Execution model: the blocks of a launch run one after another (ascending or descending linear
// index, or a chosen subset); the threads of a block are fibers on one OS thread, switching only
// at __syncthreads, __syncwarp, shuffles, ballots, mma and ldmatrix. Kernel code calls `access`
// (through the __tsan_* callbacks) before every load and store: bounds, and a shadow cell per
// 2-byte granule of shared and global memory for the race checks. A failed check abandons the
// thread at once (the access never happens) and ends the launch with one message. cp.async
// copies are kept per thread and land when the thread waits for their group.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>
#include <sys/mman.h>
#include <unistd.h>
#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace cllm_emu {

KernelView KV;

// ---------------------------------------------------------------- fibers
#if defined(__x86_64__)
// A context switch without a system call (glibc's swapcontext saves the signal mask, a syscall
// per switch): push the callee-saved registers, MXCSR and the x87 control word, swap stacks.
extern "C" void cllm_emu_switch(void** save_sp, void* load_sp);
asm(R"(
    .text
    .p2align 4
    .globl cllm_emu_switch
    .hidden cllm_emu_switch
    .type cllm_emu_switch,@function
cllm_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size cllm_emu_switch,.-cllm_emu_switch
)");
#endif

enum FiberState { READY, WAITING, DONE };

struct Fiber {
#if defined(__x86_64__)
    void* sp = nullptr;
#else
    ucontext_t ctx;
#endif
    dim3 tid;
    int linear = 0, warp = 0, lane = 0;
    FiberState state = READY;
    unsigned xcount = 0;  // warp collectives passed (selects the exchange double buffer)
    uintptr_t stack_lo = 0, stack_hi = 0;
};

// A meeting point: __syncthreads (the block) or a warp collective (one warp).
struct Rendezvous {
    int expected = 0, arrived = 0;
    std::vector<int> waiters;    // capacity kept across blocks
    int nwait = 0;
    const void* site = nullptr;  // call site of the first arrival
    int line = 0, first = 0;     // its source line and thread
    const char* what = "";
    void reset(int n) {
        expected = n;
        arrived = nwait = 0;
        if ((int)waiters.size() < n) waiters.resize(n);
    }
};

// Per-warp exchange buffers, double-buffered by call parity: a lane can only start call k + 2
// after every lane arrived at call k + 1, i.e. after every lane finished reading call k.
struct WarpBuf {
    uint64_t x[2][32];
    uint32_t a[2][32][4], b[2][32][2];
    float c[2][32][4], d[2][32][4];
    int ld_num[2], ld_trans[2];  // ldmatrix's shape, for the completion
};

// ---------------------------------------------------------------- memory checking state
// One shadow cell per 2-byte granule: the last write and the last read(s), each with the
// block (a serial number unique across launches), thread, and the block's __syncthreads and
// the thread's warp's __syncwarp generations at the time.
struct Cell {
    uint32_t w_blk, w_bgen, w_wgen;
    uint16_t w_thr, w_flags;
    uint32_t r_blk, r_bgen, r_wgen;
    uint16_t r_thr, r_flags;
};
static_assert(sizeof(Cell) == 32, "shadow cell layout (fake_cupy.py allocates 16 bytes per byte)");
enum : uint16_t { W_ATOMIC = 1, R_MULTI_THREAD = 1, R_MULTI_WARP = 2, R_MULTI_BLOCK = 4 };

// The launch description fake_cupy.py passes (ctypes mirror there).
struct ArgDesc {
    uint64_t lo, hi;    // the bytes of the argument as passed
    uint64_t base;      // start of its allocation (the shadow covers the allocation)
    Cell* shadow;       // null: bounds checked, races not tracked (sparse test arrays)
    const char* name;   // parameter name, for messages
    uint64_t itemsize;
};
struct LaunchOptions {
    int thread_reverse, block_reverse;
    uint64_t dyn_smem, max_dyn_smem;  // bytes requested; the kernel's attribute (0: default)
    int nargs;
    const ArgDesc* args;
    int64_t nblocks;                  // < 0: every block; else run only blocks[0..nblocks)
    const uint64_t* blocks;           // linear block indices
    uint32_t first_serial;            // serial of the launch's first block: unique across all
                                      // kernel libraries, since they share the shadows
};

struct SharedArray { const void* tag; uintptr_t lo, hi; const char* name; };

// A cp.async not yet waited for: the source bytes as read at issue, written to `dst` when the
// issuing thread waits for its group (group 0: not committed yet).
struct AsyncCopy {
    unsigned char* dst;
    const unsigned char* src;
    uint32_t bytes, src_bytes, group;
    int line;
    unsigned char data[16];
};
// shared_valid per granule: 0 outside every array, 1 inside, 2 inside and the destination of a
// pending cp.async (every access fails until its thread waits)
enum : uint8_t { GRANULE_PENDING = 2 };

constexpr size_t SHARED_STATIC_MAX = 48 * 1024;        // without the opt-in
constexpr size_t SHARED_OPTIN_MAX = 227 * 1024;        // sm_90 sharedMemPerBlockOptin
constexpr size_t SHARED_REDZONE = 256;                 // gap after each array (overruns fail)
constexpr size_t SHARED_DYN_OFFSET = 64 * 1024 + 8 * SHARED_REDZONE;
constexpr size_t SHARED_ARENA = SHARED_DYN_OFFSET + SHARED_OPTIN_MAX + SHARED_REDZONE;

struct Runtime {
    dim3 grid, block, bidx;
    int nthreads = 0, nwarps = 0;
    std::vector<Fiber> fibers;
    std::vector<char*> stacks;
    size_t stack_size = 0;
    Rendezvous block_bar;
    std::vector<Rendezvous> warp_bars;
    std::vector<WarpBuf> wbuf;
    std::vector<int> warp_exited;
    std::vector<uint32_t> wgen;  // per warp: completed __syncwarp calls in this block
    uint32_t bgen = 0;           // completed __syncthreads in this block
#if defined(__x86_64__)
    void* sched_sp = nullptr;
#else
    ucontext_t sched;
#endif
    Fiber* cur = nullptr;
    bool checking = false;  // a kernel thread is running: its memory accesses are checked
    void (*body)(void**) = nullptr;
    void** body_args = nullptr;
    const char* kernel = "";
    std::string error;
    const LaunchOptions* opt = nullptr;
    std::vector<uint64_t> order;  // linear block indices in the order they run
    // memory checking
    uint32_t block_serial = 0, launch_first = 1;
    const ArgDesc* last_arg = nullptr;
    char* shared = nullptr;
    Cell* shared_shadow = nullptr;
    uint8_t* shared_valid = nullptr;  // per granule: inside a declared array
    size_t shared_static = 0, shared_top = 0, shared_dirty = 0;
    std::vector<SharedArray> shared_arrays;
    std::vector<std::vector<AsyncCopy>> async;  // per thread of the block: pending cp.async
    std::vector<uint32_t> async_groups;         // per thread: cp.async groups committed
};

static Runtime R;


static inline std::string thread_str(int linear) {
    const unsigned bx = R.block.x, by = R.block.y;
    char b[64];
    snprintf(b, sizeof b, "(%u,%u,%u)", linear % bx, (linear / bx) % by, linear / (bx * by));
    return b;
}

static inline std::string block_str(uint64_t lin) {
    char b[64];
    snprintf(b, sizeof b, "(%llu,%llu,%llu)", (unsigned long long)(lin % R.grid.x),
             (unsigned long long)((lin / R.grid.x) % R.grid.y),
             (unsigned long long)(lin / ((uint64_t)R.grid.x * R.grid.y)));
    return b;
}

static inline std::string where() {
    if (!R.cur) return "";
    return " [block " + block_str(R.order.empty() ? 0 : R.order[R.block_serial - R.launch_first])
           + " thread " + thread_str(R.cur->linear) + "]";
}

static inline void to_scheduler() {
#if defined(__x86_64__)
    cllm_emu_switch(&R.cur->sp, R.sched_sp);
#else
    swapcontext(&R.cur->ctx, &R.sched);
#endif
}

// Records the first error; inside a thread, abandons it at once (the failing access or
// collective never happens) and the launch ends with this message.
[[gnu::noinline]] static void fail(const std::string& msg) {
    if (R.error.empty()) R.error = msg + where();
    if (R.cur) {
        R.cur->state = DONE;
        to_scheduler();  // never resumed
    }
}

static inline void release(Rendezvous& bar) {
    for (int k = 0; k < bar.nwait; ++k) R.fibers[bar.waiters[k]].state = READY;
    bar.nwait = 0;
    bar.arrived = 0;
}

static inline void wait_here(Rendezvous& bar) {
    R.cur->state = WAITING;
    bar.waiters[bar.nwait++] = R.cur->linear;
    to_scheduler();
}

static inline void arrive_check(Rendezvous& bar, const void* site, int line, const char* what) {
    if (bar.arrived == 0) {
        bar.site = site;
        bar.line = line;
        bar.what = what;
        bar.first = R.cur->linear;
    } else if (bar.site != site) {
        fail(std::string(what) + " (line " + std::to_string(line) + ") and " + bar.what
             + " (line " + std::to_string(bar.line) + ", thread " + thread_str(bar.first)
             + ") are different call sites: divergent "
             + (&bar == &R.block_bar ? "__syncthreads" : "warp collective"));
    }
}

using Complete = void (*)(WarpBuf&, int);

// All 32 lanes meet at one call site; the last to arrive runs `done` (if any) for the warp.
static inline void warp_meet(const void* site, int line, const char* what, Complete done, int p) {
    Fiber* f = R.cur;
    Rendezvous& bar = R.warp_bars[f->warp];
    if (R.warp_exited[f->warp])
        fail(std::string(what) + " (line " + std::to_string(line) + ") with "
             + std::to_string(R.warp_exited[f->warp])
             + (R.warp_exited[f->warp] == 1 ? " lane" : " lanes")
             + " of the warp returned: a full-mask warp collective needs all 32 (divergent warp"
               " collective)");
    arrive_check(bar, site, line, what);
    if (++bar.arrived == 32) {
        if (done) done(R.wbuf[f->warp], p);
        release(bar);
        return;
    }
    wait_here(bar);
}

// ---------------------------------------------------------------- memory access checks
static inline const ArgDesc* find_arg(uintptr_t a, size_t n) {
    const LaunchOptions* o = R.opt;
    for (int k = 0; k < o->nargs; ++k) {
        const ArgDesc& g = o->args[k];
        if (a >= g.lo && a + n <= g.hi) return &g;
    }
    return nullptr;
}

[[gnu::noinline]] static void out_of_bounds(uintptr_t a, size_t n, bool write) {
    // the argument whose bytes lie nearest, for the message
    const LaunchOptions* o = R.opt;
    std::string near;
    uint64_t best = ~0ull;
    for (int k = 0; k < o->nargs; ++k) {
        const ArgDesc& g = o->args[k];
        if (g.hi <= g.lo) continue;
        uint64_t d;
        std::string s;
        char b[160];
        if (a >= g.hi) {
            d = a - g.hi;
            snprintf(b, sizeof b, "%llu bytes past the end of `%s` (%llu bytes)",
                     (unsigned long long)d, g.name, (unsigned long long)(g.hi - g.lo));
        } else if (a < g.lo) {
            d = g.lo - a;
            snprintf(b, sizeof b, "%llu bytes before the start of `%s`", (unsigned long long)d,
                     g.name);
        } else {
            d = 0;
            snprintf(b, sizeof b, "straddling the end of `%s` (%llu bytes) at byte %llu", g.name,
                     (unsigned long long)(g.hi - g.lo), (unsigned long long)(a - g.lo));
        }
        if (d < best) { best = d; near = b; }
    }
    char m[128];
    snprintf(m, sizeof m, "out-of-bounds %s of %zu bytes at %#llx: ", write ? "write" : "read", n,
             (unsigned long long)a);
    fail(std::string(R.kernel) + ": " + m
         + (near.empty() ? std::string("the kernel has no array arguments") : near)
         + "; not inside any argument array, __shared__ array or the thread's stack");
}

enum Verdict { OK, UNINIT, RAW, WAW, WAR };

// Check one granule access against its shadow cell and record it. `epoch`: the first block
// serial whose accesses are unordered with ours unless a barrier says otherwise (this block for
// shared memory, the launch's first block for global memory).
static inline Verdict check_cell(Cell& c, bool write, bool atomic, uint32_t epoch, bool shared) {
    const uint32_t blk = R.block_serial;
    const int me = R.cur->linear, warp = me >> 5;
    const uint32_t bgen = R.bgen, wgen = R.wgen[warp];
    if (c.w_blk >= epoch) {  // written in this block (shared) or launch (global)
        const bool ordered = c.w_blk == blk && (c.w_thr == me || c.w_bgen != bgen
                             || ((c.w_thr >> 5) == warp && c.w_wgen != wgen));
        if (!ordered && !(atomic && (c.w_flags & W_ATOMIC))) return write ? WAW : RAW;
    } else if (shared && !write) {
        return UNINIT;
    }
    if (write) {
        // (an atomic too: a plain read and an atomic write race; atomics record no reads,
        // so two atomics still never do)
        if (c.r_blk >= epoch) {
            bool ordered;
            if (c.r_blk != blk || (c.r_flags & R_MULTI_BLOCK)) ordered = false;
            else if (c.r_bgen != bgen) ordered = true;
            else if (c.r_thr == me && !(c.r_flags & R_MULTI_THREAD)) ordered = true;
            else ordered = !(c.r_flags & R_MULTI_WARP) && (c.r_thr >> 5) == warp
                           && c.r_wgen != wgen;
            if (!ordered) return WAR;
        }
        c.w_blk = blk;
        c.w_bgen = bgen;
        c.w_wgen = wgen;
        c.w_thr = (uint16_t)me;
        c.w_flags = atomic ? W_ATOMIC : 0;
    } else if (c.r_blk == blk && c.r_bgen == bgen) {
        if (c.r_thr != me) {
            c.r_flags |= R_MULTI_THREAD;
            if ((c.r_thr >> 5) != warp) c.r_flags |= R_MULTI_WARP;
            c.r_thr = (uint16_t)me;
        }
        c.r_wgen = wgen;
    } else {
        const bool other_block = c.r_blk >= epoch
                                 && (c.r_blk != blk || (c.r_flags & R_MULTI_BLOCK));
        c.r_blk = blk;
        c.r_bgen = bgen;
        c.r_wgen = wgen;
        c.r_thr = (uint16_t)me;
        c.r_flags = other_block ? R_MULTI_BLOCK : 0;
    }
    return OK;
}

// The message for a failed check of `obj` (e.g. "Ks+136" or "dlogits[5]").
[[gnu::noinline]] static void report(Verdict v, const Cell& c, const char* space,
                                    const std::string& obj) {
    if (v == UNINIT) {
        fail(std::string(R.kernel) + ": read of " + space + " memory `" + obj
             + "` that no thread of this block wrote (uninitialised)");
        return;
    }
    const bool other_write = v != WAR;
    const uint32_t blk = other_write ? c.w_blk : c.r_blk;
    const int other = other_write ? c.w_thr : c.r_thr;
    const char* kind = v == RAW ? "read after write" : v == WAW ? "write after write"
                                                                 : "write after read";
    std::string who;
    if (!other_write && (c.r_flags & R_MULTI_BLOCK)) {
        who = "another block of the same launch (blocks are unordered: a block reading what"
              " another block writes in one launch)";
    } else if (blk == R.block_serial) {
        who = "thread " + thread_str(other) + " of this block";
        if (!other_write && (c.r_flags & R_MULTI_THREAD)) who += " (and others)";
        who += (other >> 5) == R.cur->warp ? ", with no __syncthreads or __syncwarp between"
                                           : ", with no __syncthreads between";
    } else {
        who = "block " + block_str(R.order[blk - R.launch_first])
              + " of the same launch (blocks are unordered: a missing atomic, or a block"
                " reading another block's output)";
    }
    fail(std::string(R.kernel) + ": " + space + " memory race (" + kind + ") on `" + obj + "`: "
         + (v == RAW ? "read" : "written") + " here, " + (other_write ? "written" : "read")
         + " by " + who);
}

static inline const SharedArray* shared_array_at(uintptr_t a) {
    for (const SharedArray& s : R.shared_arrays)
        if (a >= s.lo && a < s.hi) return &s;
    return nullptr;
}

[[gnu::noinline]] static void shared_out_of_bounds(uintptr_t a, size_t n, bool write) {
    const SharedArray* s = shared_array_at(a);
    char m[200];
    if (s) {
        snprintf(m, sizeof m, "straddles the end of `%s`", s->name);
    } else {
        const SharedArray* p = nullptr;
        for (const SharedArray& t : R.shared_arrays)
            if (t.hi <= a && (!p || t.hi > p->hi)) p = &t;
        if (p) snprintf(m, sizeof m, "%llu bytes past the end of `%s` (%llu bytes)",
                        (unsigned long long)(a - p->hi), p->name,
                        (unsigned long long)(p->hi - p->lo));
        else snprintf(m, sizeof m, "before every declared array");
    }
    fail(std::string(R.kernel) + ": out-of-bounds " + (write ? "write" : "read") + " of "
         + std::to_string(n) + " bytes of shared memory: " + m);
}

// An access to the destination of a cp.async whose thread has not waited for it yet.
[[gnu::noinline]] static void pending_access(uintptr_t a, bool write) {
    const AsyncCopy* c = nullptr;
    int owner = -1;
    for (size_t t = 0; t < R.async.size() && !c; ++t)
        for (const AsyncCopy& k : R.async[t])
            if (a + 2 > (uintptr_t)k.dst && a < (uintptr_t)k.dst + k.bytes) {
                c = &k;
                owner = (int)t;
                break;
            }
    const SharedArray* s = shared_array_at(a);
    const std::string obj = std::string(s ? s->name : "?") + "+"
                            + std::to_string(a - (s ? s->lo : (uintptr_t)R.shared)) + " bytes";
    std::string who = "?";
    if (c) {
        who = (owner == R.cur->linear ? std::string("this thread") : "thread " + thread_str(owner))
              + " at line " + std::to_string(c->line) + ", "
              + (c->group ? "group " + std::to_string(c->group) + " not waited for"
                          : std::string("not committed"));
    }
    fail(std::string(R.kernel) + ": " + (write ? "write to" : "read of")
         + " a pending cp.async destination `" + obj + "` (issued by " + who
         + "): the issuing thread must cp.async.wait_group / wait_all for its group, and other "
           "threads __syncthreads after that, before the data is there");
}

static inline void shared_access(uintptr_t a, size_t n, bool write, bool atomic) {
    const uintptr_t base = (uintptr_t)R.shared;
    const size_t g0 = (a - base) >> 1, g1 = (a + n - 1 - base) >> 1;
    for (size_t g = g0; g <= g1; ++g) {
        if (g >= SHARED_ARENA / 2 || !R.shared_valid[g]) shared_out_of_bounds(a, n, write);
        if (R.shared_valid[g] == GRANULE_PENDING) pending_access(base + 2 * g, write);
        const Verdict v = check_cell(R.shared_shadow[g], write, atomic, R.block_serial, true);
        if (v != OK) {
            const SharedArray* s = shared_array_at(a);
            report(v, R.shared_shadow[g], "shared",
                   std::string(s ? s->name : "?") + "+" + std::to_string(a - (s ? s->lo : base))
                   + " bytes");
        }
    }
}

static inline void global_access(const ArgDesc& g, uintptr_t a, size_t n, bool write,
                                  bool atomic) {
    const size_t g0 = (a - g.base) >> 1, g1 = (a + n - 1 - g.base) >> 1;
    for (size_t k = g0; k <= g1; ++k) {
        const Verdict v = check_cell(g.shadow[k], write, atomic, R.launch_first, false);
        if (v != OK)
            report(v, g.shadow[k], "global", std::string(g.name) + "["
                   + std::to_string((a - g.lo) / (g.itemsize ? g.itemsize : 1)) + "]");
    }
}

// Every load and store of kernel code comes here (through the __tsan_* callbacks).
static inline void access(const void* p, size_t n, bool write, bool atomic = false) {
    if (!R.checking) return;  // not a kernel thread (static initialisers of the library)
    const uintptr_t a = (uintptr_t)p;
    if (a - (uintptr_t)R.shared < SHARED_ARENA) { shared_access(a, n, write, atomic); return; }
    const ArgDesc* g = R.last_arg;
    if (!(g && a >= g->lo && a + n <= g->hi)) {
        if (a - (uintptr_t)&KV < sizeof KV) return;
        if (a - R.cur->stack_lo < R.cur->stack_hi - R.cur->stack_lo) return;
        g = find_arg(a, n);
        if (!g) { out_of_bounds(a, n, write); return; }
        R.last_arg = g;
    }
    if (g->shadow) global_access(*g, a, n, write, atomic);
}

// ---------------------------------------------------------------- shared memory

static inline void shared_mark(uintptr_t lo, size_t bytes, const char* name, const void* tag) {
    const uintptr_t base = (uintptr_t)R.shared;
    const size_t g0 = (lo - base) >> 1, g1 = (lo + bytes - base + 1) >> 1;
    for (size_t g = g0; g < g1; ++g) R.shared_valid[g] = 1;
    R.shared_arrays.push_back({tag, lo, lo + bytes, name});
}

// `__shared__ T name[...]` in a kernel: the block's copy (the same address for every block of a
// launch, refilled with 0xFF bytes before each block: NaN for float/double/bf16).
void* shared_decl(SharedTag* tag, size_t bytes, size_t align) {
    for (const SharedArray& s : R.shared_arrays)
        if (s.tag == tag) return (void*)s.lo;
    size_t off = (R.shared_top + align - 1) / align * align;
    R.shared_static = (R.shared_static + align - 1) / align * align + bytes;
    if (R.shared_static > SHARED_STATIC_MAX)
        fail(std::string(R.kernel) + ": " + std::to_string(R.shared_static)
             + " bytes of static __shared__ memory (at `" + tag->name + "`): more than the 48 KB"
               " a block may declare statically (use dynamic shared memory and the opt-in)");
    if (off + bytes > SHARED_DYN_OFFSET) fail("emulator: shared arena too small");
    R.shared_top = off + bytes + SHARED_REDZONE;
    if (R.shared_top > R.shared_dirty) R.shared_dirty = R.shared_top;
    memset(R.shared + off, 0xFF, bytes);
    shared_mark((uintptr_t)R.shared + off, bytes, tag->name, tag);
    return R.shared + off;
}

// `extern __shared__ T name[]`: the dynamic shared memory of the launch.
void* shared_dynamic(SharedTag* tag) {
    for (const SharedArray& s : R.shared_arrays)
        if (s.tag == tag) return (void*)s.lo;
    const size_t bytes = R.opt->dyn_smem;
    memset(R.shared + SHARED_DYN_OFFSET, 0xFF, bytes);
    shared_mark((uintptr_t)R.shared + SHARED_DYN_OFFSET, bytes, tag->name, tag);
    return R.shared + SHARED_DYN_OFFSET;
}

static inline void check_dynamic_limits() {
    const uint64_t dyn = R.opt->dyn_smem;
    const uint64_t attr = R.opt->max_dyn_smem;  // 0: never set
    char m[300];
    if (attr && R.shared_static + attr > SHARED_OPTIN_MAX) {
        snprintf(m, sizeof m, "%s: max_dynamic_shared_size_bytes = %llu with %zu bytes static:"
                 " more than the %zu bytes per block the device allows", R.kernel,
                 (unsigned long long)attr, R.shared_static, SHARED_OPTIN_MAX);
        fail(m);
    } else if (dyn > (attr ? attr : SHARED_STATIC_MAX - R.shared_static)) {
        snprintf(m, sizeof m, "%s: %llu bytes of dynamic shared memory (+ %zu static) without "
                 "the opt-in: above %llu bytes set max_dynamic_shared_size_bytes "
                 "(cudaFuncSetAttribute) first", R.kernel, (unsigned long long)dyn,
                 R.shared_static,
                 (unsigned long long)(attr ? attr : SHARED_STATIC_MAX - R.shared_static));
        fail(m);
    }
}

// ---------------------------------------------------------------- the launch
// cp.async copies never waited for end with their block (nothing read them: that would fail).
static inline void drop_pending_copies() {
    const uintptr_t base = (uintptr_t)R.shared;
    for (int t = 0; t < R.nthreads; ++t) {
        for (const AsyncCopy& c : R.async[t])
            for (size_t g = ((uintptr_t)c.dst - base) >> 1;
                 g < ((uintptr_t)c.dst + c.bytes - base) >> 1; ++g)
                R.shared_valid[g] = 1;
        R.async[t].clear();
        R.async_groups[t] = 0;
    }
}

static inline void fiber_exit() {
    Fiber* f = R.cur;
    f->state = DONE;
    // a returned thread no longer counts for __syncthreads (std::barrier::arrive_and_drop)
    --R.block_bar.expected;
    if (R.block_bar.arrived > 0 && R.block_bar.arrived >= R.block_bar.expected) {
        ++R.bgen;
        release(R.block_bar);
    }
    Rendezvous& wb = R.warp_bars[f->warp];
    ++R.warp_exited[f->warp];
    if (wb.arrived > 0) {
        fail("a lane returned while " + std::to_string(wb.arrived) + " lanes of its warp wait at "
             + wb.what + " (line " + std::to_string(wb.line) + "): divergent warp collective");
    }
    to_scheduler();
}

static inline void fiber_main() {
    R.body(R.body_args);
    fiber_exit();
}

static inline void fiber_start(Fiber& f, char* stack, size_t size) {
    f.stack_lo = (uintptr_t)stack;
    f.stack_hi = (uintptr_t)stack + size;
#if defined(__x86_64__)
    uintptr_t top = ((uintptr_t)stack + size) & ~(uintptr_t)15;
    uint64_t* sp = (uint64_t*)top;
    *--sp = 0;                              // fiber_main's (never used) return address
    *--sp = (uint64_t)(uintptr_t)&fiber_main;  // cllm_emu_switch returns here
    for (int k = 0; k < 6; ++k) *--sp = 0;  // rbp rbx r12 r13 r14 r15
    uint32_t csr[2];
    asm volatile("stmxcsr %0" : "=m"(csr[0]));
    asm volatile("fnstcw %0" : "=m"(*(uint16_t*)&csr[1]));
    *--sp = (uint64_t)csr[0] | ((uint64_t)(csr[1] & 0xffff) << 32);
    f.sp = sp;
#else
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = stack;
    f.ctx.uc_stack.ss_size = size;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_main, 0);
#endif
}

static inline void run_fiber(Fiber& f) {
    R.cur = &f;
    KV.tid = f.tid;
    R.checking = true;
#if defined(__x86_64__)
    cllm_emu_switch(&R.sched_sp, f.sp);
#else
    swapcontext(&R.sched, &f.ctx);
#endif
    R.checking = false;
}

static inline bool ensure_memory(int n) {
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    const size_t ss = 128 * 1024;
    if ((int)R.stacks.size() < n || R.stack_size != ss) {
        for (char* s : R.stacks) munmap(s - page, R.stack_size + page);
        R.stacks.clear();
        for (int i = 0; i < n; ++i) {
            // a PROT_NONE page below each stack: an overflow faults instead of corrupting
            char* m = (char*)mmap(nullptr, ss + page, PROT_READ | PROT_WRITE,
                                  MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (m == MAP_FAILED) return false;
            mprotect(m, page, PROT_NONE);
            R.stacks.push_back(m + page);
        }
        R.stack_size = ss;
    }
    if (!R.shared) {
        R.shared = (char*)mmap(nullptr, SHARED_ARENA, PROT_READ | PROT_WRITE,
                               MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        R.shared_shadow = (Cell*)mmap(nullptr, SHARED_ARENA / 2 * sizeof(Cell),
                                      PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        R.shared_valid = (uint8_t*)calloc(SHARED_ARENA / 2, 1);
        if (R.shared == MAP_FAILED || R.shared_shadow == MAP_FAILED || !R.shared_valid)
            return false;
    }
    return true;
}

// ---------------------------------------------------------------- denormals (-ftz=true)
// CuPy compiles every kernel with -ftz=true (cllm_gpu/kernels.py CUPY_ADDED_OPTIONS): the
// GPU's single-precision arithmetic flushes denormal inputs and results to signed zero. The
// emulated kernels run with the SSE control register's FTZ (bit 15: denormal results -> 0) and
// DAZ (bit 6: denormal inputs read as 0) bits set: every fiber starts from the MXCSR of the
// thread that launches (fiber_start) and keeps its own across switches (cllm_emu_switch); the
// caller's MXCSR is restored after the launch. (x86 flushes doubles too, the GPU does not; the
// tensor-core product below is computed without the flush: mma has no .ftz and -ftz does not
// reach inline PTX.)
#if defined(__x86_64__)
static constexpr uint32_t MXCSR_FTZ_DAZ = (1u << 15) | (1u << 6);
static inline uint32_t read_mxcsr() {
    uint32_t c;
    asm volatile("stmxcsr %0" : "=m"(c));
    return c;
}
static inline void write_mxcsr(uint32_t c) { asm volatile("ldmxcsr %0" : : "m"(c)); }
#else
static constexpr uint32_t MXCSR_FTZ_DAZ = 0;
static inline uint32_t read_mxcsr() { return 0; }
static inline void write_mxcsr(uint32_t) {}
#endif
// The MXCSR of a scope: `bits` set (ftz) or cleared (!ftz), the old value back at its end.
struct FlushDenormals {
    uint32_t saved;
    explicit FlushDenormals(bool ftz) : saved(read_mxcsr()) {
        write_mxcsr(ftz ? saved | MXCSR_FTZ_DAZ : saved & ~MXCSR_FTZ_DAZ);
    }
    ~FlushDenormals() { write_mxcsr(saved); }
};

static int launch_blocks(const char* name, const unsigned* grid, const unsigned* block,
                         const LaunchOptions* opt, void (*body)(void**), void** args,
                         int max_threads);

// Runs `body` as the kernel `name` over the grid, with denormals flushed as -ftz=true does.
// Returns 0, or 1 with R.error set.
int launch(const char* name, const unsigned* grid, const unsigned* block,
           const LaunchOptions* opt, void (*body)(void**), void** args, int max_threads) {
    FlushDenormals ftz(true);
    return launch_blocks(name, grid, block, opt, body, args, max_threads);
}

static int launch_blocks(const char* name, const unsigned* grid, const unsigned* block,
                          const LaunchOptions* opt, void (*body)(void**), void** args,
                          int max_threads) {
    R.error.clear();
    R.kernel = name;
    R.grid = {grid[0], grid[1], grid[2]};
    R.block = {block[0], block[1], block[2]};
    R.opt = opt;
    R.body = body;
    R.body_args = args;
    R.last_arg = nullptr;
    R.cur = nullptr;
    KV.bdim = R.block;
    KV.gdim = R.grid;
    const int n = (int)(block[0] * block[1] * block[2]);
    char m[200];
    if (n <= 0 || n > 1024 || n % 32) {
        snprintf(m, sizeof m, "%s: %d threads per block; the emulator runs whole warps (a "
                 "positive multiple of 32, at most 1024)", name, n);
        R.error = m;
        return 1;
    }
    if (max_threads > 0 && n > max_threads) {
        snprintf(m, sizeof m, "%s: %d threads per block exceed its __launch_bounds__(%d) (the "
                 "launch fails: too many resources requested)", name, n, max_threads);
        R.error = m;
        return 1;
    }
    if (!ensure_memory(n)) { R.error = "emulator: mmap failed"; return 1; }
    R.nthreads = n;
    R.nwarps = n / 32;
    R.fibers.assign(n, Fiber());
    R.warp_bars.resize(R.nwarps);
    R.wbuf.resize(R.nwarps);
    R.warp_exited.assign(R.nwarps, 0);
    R.wgen.assign(R.nwarps, 0);
    if ((int)R.async.size() < n) R.async.resize(n);
    for (auto& v : R.async) v.clear();  // (shared_valid is reset below)
    R.async_groups.assign(n, 0);
    // which blocks run, in which order
    const uint64_t total = (uint64_t)grid[0] * grid[1] * grid[2];
    R.order.clear();
    if (opt->nblocks >= 0) {
        for (int64_t k = 0; k < opt->nblocks; ++k) {
            if (opt->blocks[k] >= total) {
                R.error = "emulator: block subset outside the grid";
                return 1;
            }
            R.order.push_back(opt->blocks[k]);
        }
    } else {
        R.order.resize(total);
        for (uint64_t k = 0; k < total; ++k) R.order[k] = opt->block_reverse ? total - 1 - k : k;
    }
    R.launch_first = opt->first_serial;
    R.block_serial = R.launch_first - 1;
    // shared memory: the layout is rebuilt by the first block of the launch
    memset(R.shared_valid, 0, SHARED_ARENA / 2);
    R.shared_arrays.clear();
    R.shared_static = 0;
    R.shared_top = 0;
    for (size_t bi = 0; bi < R.order.size(); ++bi) {
        const uint64_t lin = R.order[bi];
        R.bidx = {(unsigned)(lin % grid[0]), (unsigned)((lin / grid[0]) % grid[1]),
                  (unsigned)(lin / ((uint64_t)grid[0] * grid[1]))};
        KV.bidx = R.bidx;
        ++R.block_serial;
        R.bgen = 0;
        R.block_bar.reset(n);
        for (int w = 0; w < R.nwarps; ++w) {
            R.warp_bars[w].reset(32);
            R.warp_exited[w] = 0;
            R.wgen[w] = 0;
        }
        // every block sees fresh (0xFF) shared memory: the arrays are refilled as declared
        if (bi > 0) {
            for (const SharedArray& s : R.shared_arrays) memset((void*)s.lo, 0xFF, s.hi - s.lo);
        }
        for (int i = 0; i < n; ++i) {
            Fiber& f = R.fibers[i];
            f = Fiber();
            f.linear = i;
            f.tid = {(unsigned)i % block[0], ((unsigned)i / block[0]) % block[1],
                     (unsigned)i / (block[0] * block[1])};
            f.warp = i / 32;
            f.lane = i % 32;
            fiber_start(f, R.stacks[i], R.stack_size);
        }
        int pos = 0, done = 0;
        while (done < n) {
            int pick = -1;
            for (int k = 0; k < n; ++k) {
                int i = pos + k;
                if (i >= n) i -= n;
                const int idx = opt->thread_reverse ? n - 1 - i : i;
                if (R.fibers[idx].state == READY) {
                    pick = idx;
                    pos = i + 1 == n ? 0 : i + 1;
                    break;
                }
            }
            if (pick < 0) {
                int wb = 0, ww = 0;
                for (auto& f : R.fibers) if (f.state == WAITING) ++wb;
                for (auto& b : R.warp_bars) ww += b.nwait;
                snprintf(m, sizeof m, "%s: deadlock in block %s: %d threads waiting (%d at warp "
                         "collectives, %d at __syncthreads), %d returned", name,
                         block_str(lin).c_str(), wb, ww, wb - ww, done);
                R.error = m;
                R.cur = nullptr;
                return 1;
            }
            run_fiber(R.fibers[pick]);
            if (!R.error.empty()) { R.cur = nullptr; return 1; }
            if (R.fibers[pick].state == DONE) ++done;
        }
        R.cur = nullptr;
        drop_pending_copies();
        if (bi == 0) {
            check_dynamic_limits();
            if (!R.error.empty()) return 1;
        }
    }
    return 0;
}

// ---------------------------------------------------------------- warp collectives
static void check_mask(unsigned mask, const char* what) {
    if (mask != 0xffffffffu) fail(std::string(what) + ": only the full mask is emulated");
}

uint64_t warp_exchange(uint64_t raw, ShflKind kind, int arg, int width, unsigned mask,
                       const void* site, int line, const char* what) {
    check_mask(mask, what);
    if (width != 32) fail(std::string(what) + ": width != 32 not emulated");
    Fiber* f = R.cur;
    const int lane = f->lane;
    int src = lane;
    if (kind == SHFL_XOR) src = (lane ^ arg) & 31;
    else if (kind == SHFL_IDX) src = arg & 31;
    else src = lane + arg < 32 ? lane + arg : lane;  // SHFL_DOWN
    WarpBuf& W = R.wbuf[f->warp];
    const int p = f->xcount++ & 1;
    W.x[p][lane] = raw;
    warp_meet(site, line, what, nullptr, p);
    return W.x[p][src];
}

unsigned warp_ballot(int pred, unsigned mask, const void* site, int line) {
    check_mask(mask, "__ballot_sync");
    Fiber* f = R.cur;
    WarpBuf& W = R.wbuf[f->warp];
    const int p = f->xcount++ & 1;
    W.x[p][f->lane] = pred ? 1 : 0;
    warp_meet(site, line, "__ballot_sync", nullptr, p);
    unsigned r = 0;
    for (int l = 0; l < 32; ++l)
        if (W.x[p][l]) r |= 1u << l;
    return r;
}

static void syncwarp_complete(WarpBuf&, int) { ++R.wgen[R.cur->warp]; }

void warp_sync(unsigned mask, const void* site, int line) {
    check_mask(mask, "__syncwarp");
    warp_meet(site, line, "__syncwarp", syncwarp_complete, 0);
}

void block_sync(const void* site, int line) {
    Rendezvous& bar = R.block_bar;
    arrive_check(bar, site, line, "__syncthreads");
    if (++bar.arrived >= bar.expected) {
        ++R.bgen;
        release(bar);
        return;
    }
    wait_here(bar);
}

// The whole warp's mma, computed once by the last lane to arrive (emu_ptx.cpp).
static void mma_complete(WarpBuf& W, int p) {
    FlushDenormals keep(false);  // the exact product (emu_ptx.cpp), denormals kept
    mma_m16n8k16_bf16(W.a[p], W.b[p], W.c[p], W.d[p]);
}

F4 mma_bf16(const void* site, int line, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
             uint32_t b0, uint32_t b1, float c0, float c1, float c2, float c3) {
    Fiber* f = R.cur;
    WarpBuf& W = R.wbuf[f->warp];
    const int p = f->xcount++ & 1;
    const int lane = f->lane;
    W.a[p][lane][0] = a0; W.a[p][lane][1] = a1; W.a[p][lane][2] = a2; W.a[p][lane][3] = a3;
    W.b[p][lane][0] = b0; W.b[p][lane][1] = b1;
    W.c[p][lane][0] = c0; W.c[p][lane][1] = c1; W.c[p][lane][2] = c2; W.c[p][lane][3] = c3;
    warp_meet(site, line, "mma.sync.aligned", mma_complete, p);
    F4 d;
    for (int i = 0; i < 4; ++i) d.v[i] = W.d[p][lane][i];
    return d;
}

// ---------------------------------------------------------------- ldmatrix, cp.async
// Shared-window addresses (cvta.to.shared) are offsets into the block's shared arena.
uint64_t shared_window(const void* p) {
    const uintptr_t a = (uintptr_t)p;
    if (a - (uintptr_t)R.shared >= SHARED_ARENA) {
        char m[160];
        snprintf(m, sizeof m, "__cvta_generic_to_shared of %p: not a shared-memory address", p);
        fail(std::string(R.kernel) + ": " + m);
    }
    return a - (uintptr_t)R.shared;
}

// The arena address of a shared-window address `w` of `n` bytes that must be `align`-aligned.
static unsigned char* from_window(uint64_t w, size_t n, size_t align, const char* what, int line) {
    char m[240];
    if (w >= SHARED_ARENA || w + n > SHARED_ARENA) {
        snprintf(m, sizeof m, "%s (line %d): address %#llx is not in the shared window (a "
                 "generic pointer without __cvta_generic_to_shared?)", what, line,
                 (unsigned long long)w);
        fail(std::string(R.kernel) + ": " + m);
    }
    if (w % align) {
        snprintf(m, sizeof m, "%s (line %d): shared address %#llx not %zu-byte aligned", what,
                 line, (unsigned long long)w, align);
        fail(std::string(R.kernel) + ": " + m);
    }
    return (unsigned char*)R.shared + w;
}

static void ldmatrix_complete(WarpBuf& W, int p) {
    const unsigned char* rows[32];
    for (int l = 0; l < 32; ++l) rows[l] = (const unsigned char*)R.shared + W.x[p][l];
    ldmatrix_m8n8_b16(rows, W.ld_num[p], W.ld_trans[p] != 0, W.a[p]);
}

// Lanes 0 .. 8 * num - 1 give the row addresses (the others' are not used); each reads its
// 16-byte row through the shared-memory checks before the warp meets.
U4 ldmatrix_b16(const void* site, int line, uint64_t addr, int num, int trans) {
    Fiber* f = R.cur;
    WarpBuf& W = R.wbuf[f->warp];
    const int p = f->xcount++ & 1;
    const int lane = f->lane;
    if (lane < 8 * num) {
        unsigned char* row = from_window(addr, 16, 16, "ldmatrix", line);
        shared_access((uintptr_t)row, 16, false, false);
    } else {
        addr = 0;
    }
    W.x[p][lane] = addr;
    W.ld_num[p] = num;
    W.ld_trans[p] = trans;
    warp_meet(site, line, "ldmatrix.sync.aligned", ldmatrix_complete, p);
    U4 r;
    for (int i = 0; i < 4; ++i) r.v[i] = i < num ? W.a[p][lane][i] : 0u;
    return r;
}

// cp.async: bounds and races checked at issue (the source read, the destination write); the
// source bytes are kept and written at the wait; until then the destination granules are
// marked pending and any access to them fails.
void cp_async(uint64_t dst_w, const void* src, int cp_size, int src_size, int cg, int line) {
    char m[200];
    if ((cp_size != 4 && cp_size != 8 && cp_size != 16) || (cg && cp_size != 16)
        || src_size < 0 || src_size > cp_size) {
        snprintf(m, sizeof m, "cp.async.%s (line %d): cp-size %d, src-size %d (the ISA allows "
                 "4, 8, 16 for .ca, 16 for .cg, and src-size <= cp-size)", cg ? "cg" : "ca",
                 line, cp_size, src_size);
        fail(std::string(R.kernel) + ": " + m);
    }
    unsigned char* dst = from_window(dst_w, cp_size, cp_size, "cp.async destination", line);
    const uintptr_t s = (uintptr_t)src;
    if (s % cp_size || s - (uintptr_t)R.shared < SHARED_ARENA
        || s - R.cur->stack_lo < R.cur->stack_hi - R.cur->stack_lo) {
        snprintf(m, sizeof m, "cp.async (line %d): source %p is %s", line, src,
                 s % cp_size ? "not aligned to cp-size" : "not global memory");
        fail(std::string(R.kernel) + ": " + m);
    }
    if (src_size) access(src, src_size, false);
    shared_access((uintptr_t)dst, cp_size, true, false);
    AsyncCopy c;
    c.dst = dst;
    c.src = (const unsigned char*)src;
    c.bytes = cp_size;
    c.src_bytes = src_size;
    c.group = 0;
    c.line = line;
    memset(c.data, 0, sizeof c.data);  // src-size < cp-size: the rest is zero-filled
    memcpy(c.data, src, src_size);
    const uintptr_t base = (uintptr_t)R.shared;
    for (size_t g = ((uintptr_t)dst - base) >> 1; g < ((uintptr_t)dst + cp_size - base) >> 1; ++g)
        R.shared_valid[g] = GRANULE_PENDING;
    R.async[R.cur->linear].push_back(c);
}

void cp_async_commit() {
    const int me = R.cur->linear;
    const uint32_t g = ++R.async_groups[me];
    for (AsyncCopy& c : R.async[me])
        if (!c.group) c.group = g;
}

// wait_group n: every committed group but the n most recent is complete; n < 0: wait_all
// (commit, then wait_group 0).
void cp_async_wait(int n, int line) {
    const int me = R.cur->linear;
    if (n < 0) {
        cp_async_commit();
        n = 0;
    }
    std::vector<AsyncCopy>& v = R.async[me];
    const uint32_t upto = R.async_groups[me] > (uint32_t)n ? R.async_groups[me] - n : 0;
    const uintptr_t base = (uintptr_t)R.shared;
    size_t keep = 0;
    for (size_t k = 0; k < v.size(); ++k) {
        AsyncCopy c = v[k];
        if (!c.group || c.group > upto) {
            v[keep++] = c;
            continue;
        }
        if (memcmp(c.src, c.data, c.src_bytes)) {
            fail(std::string(R.kernel) + ": the source of a cp.async (line "
                 + std::to_string(c.line) + ") changed before the wait for it (line "
                 + std::to_string(line) + "): the copy may read old or new data");
        }
        const size_t g0 = ((uintptr_t)c.dst - base) >> 1;
        for (size_t g = g0; g < g0 + c.bytes / 2; ++g) R.shared_valid[g] = 1;
        shared_access((uintptr_t)c.dst, c.bytes, true, false);  // the write, as of now
        memcpy(c.dst, c.data, c.bytes);
    }
    v.resize(keep);
}

// atomicAdd: a read-modify-write the race check treats as atomic (two atomics never race).
template <typename T> static T atomic_add(T* p, T v) {
    access(p, sizeof(T), true, true);
    const T old = *p;
    *p = old + v;
    return old;
}
int atomic_add_i32(int* p, int v) { return atomic_add(p, v); }
unsigned atomic_add_u32(unsigned* p, unsigned v) { return atomic_add(p, v); }
float atomic_add_f32(float* p, float v) { return atomic_add(p, v); }
double atomic_add_f64(double* p, double v) { return atomic_add(p, v); }

const char* last_error() { return R.error.c_str(); }

}  // namespace cllm_emu

// ---------------------------------------------------------------- instrumentation callbacks
// g++ -fsanitize=thread calls these for every load and store of kernel code; there is no TSan
// runtime behind them.
extern "C" {
void __tsan_init() {}
void __tsan_func_entry(void*) {}
void __tsan_func_exit() {}
#define CLLM_EMU_TSAN(N)                                                                       \
    void __tsan_read##N(void* p) { ::cllm_emu::access(p, N, false); }                   \
    void __tsan_write##N(void* p) { ::cllm_emu::access(p, N, true); }                   \
    void __tsan_unaligned_read##N(void* p) { ::cllm_emu::access(p, N, false); }         \
    void __tsan_unaligned_write##N(void* p) { ::cllm_emu::access(p, N, true); }
CLLM_EMU_TSAN(1)
CLLM_EMU_TSAN(2)
CLLM_EMU_TSAN(4)
CLLM_EMU_TSAN(8)
CLLM_EMU_TSAN(16)
#undef CLLM_EMU_TSAN
void __tsan_read_range(void* p, unsigned long n) { if (n) ::cllm_emu::access(p, n, false); }
void __tsan_write_range(void* p, unsigned long n) { if (n) ::cllm_emu::access(p, n, true); }

// -fsanitize=bounds,alignment: report through the emulator (file and line of the kernel source)
struct CllmUbsanLoc { const char* file; uint32_t line, column; };
struct CllmUbsanMismatch { CllmUbsanLoc loc; const void* type; unsigned char log_align, kind; };
void __ubsan_handle_out_of_bounds_abort(void* data, void*) {
    const CllmUbsanLoc* l = (const CllmUbsanLoc*)data;
    ::cllm_emu::fail(std::string(::cllm_emu::R.kernel) + ": index out of bounds of a fixed-size "
                     "array at " + l->file + ":" + std::to_string(l->line));
}
void __ubsan_handle_type_mismatch_v1_abort(void* data, void* ptr) {
    const CllmUbsanMismatch* d = (const CllmUbsanMismatch*)data;
    char m[200];
    snprintf(m, sizeof m, "%s at %s:%u (address %p, %u-byte alignment needed)",
             ptr ? "misaligned access" : "null pointer access", d->loc.file, d->loc.line, ptr,
             1u << d->log_align);
    ::cllm_emu::fail(std::string(::cllm_emu::R.kernel) + ": " + m);
}
}

