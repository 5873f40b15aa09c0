// CPU stand-ins for the CUDA that the kernels in csrc/ use, so that a host C++ compiler can build them
// (-DLLM2COMP_CPU_EMULATION, included by csrc/device.cuh) and tests can run them without a GPU.
//
// Every CUDA thread is a fiber with its own stack. One block runs at a time; its threads switch only at
// __syncthreads and at warp collectives (shuffles, ldmatrix, mma), in an order the test picks (forward,
// reverse or shuffled), so a missing barrier shows up as a wrong result under some order. Checked as it
// happens, each failure an emu::Error naming the block and thread:
// - a barrier or collective some threads never reach (deadlock), lanes of one warp at different collectives;
// - a collective while lanes of the warp have exited, or a lane exiting while its warp waits;
// - ldmatrix and cp.async addresses outside the dynamic shared memory, or not 16-byte aligned;
// - dynamic shared memory over 48 KiB without cudaFuncSetAttribute, or over the device's opt-in maximum (sm_90's
//   227 KiB unless a test emulates a smaller device); a failed cudaFuncSetAttribute is also the next
//   cudaGetLastError(), which every launch returns, as on a GPU;
// - cp.async copies not waited for when the thread exits, cp.async sources not 16-byte aligned;
// - races on the dynamic shared memory between cp.async writes and ldmatrix reads, whatever the order: a read
//   of 16 bytes whose copy is in flight or landed (by another thread) since the last barrier, a copy over 16
//   bytes another thread read since the last barrier or that another copy has not landed in yet; an ldmatrix
//   of 16 bytes no cp.async has written in the block. Plain loads and stores, and static __shared__ arrays,
//   are not tracked.
// cp.async copies land at cp_async_wait (or, if the test asks, when issued), and dynamic shared memory
// starts as 0xff bytes (NaN in every float format), so a tile read before its copy has landed reads NaN.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

// One block runs at a time, so a static array is the running block's shared memory.
#undef __shared__
#define __shared__ static
#define __launch_bounds__(...)

namespace llm2comp {
namespace emu {

struct Error : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// Stops the grid with `message`: inside a thread, switches to the scheduler for good, which throws it.
[[noreturn]] void fail(const std::string& message);

const uint3& thread_idx();
const uint3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();
void syncthreads();

// The warp's 32 lanes each pass `in` and receive `out`; when the last lane arrives, fn(ins, outs) computes
// every lane's output from every lane's input (arrays indexed by lane). Lanes must agree on `op` and `fn`.
using CollectiveFn = void (*)(const void* const* ins, void* const* outs);
void warp_collective(const char* op, CollectiveFn fn, const void* in, void* out);

// Fails unless [p, p + bytes) lies in the running block's dynamic shared memory and p is 16-byte aligned.
void check_shared_16(const void* p, size_t bytes, const char* op);
// The current thread reads the 16 bytes at p (checked as above): fails on a race with a copy into them, one
// still in flight or landed since the last barrier by another thread, and on bytes no copy has written.
void shared_read_16(const void* p, const char* op);
unsigned char* dynamic_shared_memory();

// Work counted over launches, per warp instruction: what tests check a kernel's cost against.
struct Counts {
    int64_t ldmatrix_phases = 0;      // each ldmatrix.x4 has 4 (the 8 rows of one matrix each)
    int64_t ldmatrix_wavefronts = 0;  // shared-memory wavefronts they took: = phases when conflict-free
    int64_t mma = 0;                  // mma.sync.m16n8k16 instructions
    int64_t cp_async_bytes = 0;       // bytes cp.async read from global memory (zero-fills not counted)
};
// Bank accounting of ldmatrix.x4: rows[l] points to lane l's row address. Each of its four phases takes as many
// wavefronts as the most distinct 4-byte words any of the 32 banks serves.
void count_ldmatrix_wavefronts(const void* const* rows);
void count_mma();
// The counts since the last call, which resets them.
Counts take_counts();

void cp_async(void* dst, const void* src, bool valid);
void cp_async_commit();
void cp_async_wait(int groups_left);

// The order in which a block's runnable threads resume: 0 forward, 1 reverse, 2 shuffled (from seed); and
// whether cp.async copies land when issued (a copy overwriting a tile others still read shows) rather than
// at cp_async_wait (the default: a tile read before its wait shows).
void set_schedule(int order, uint64_t seed, bool land_copies_at_issue);

// The emulated device's opt-in maximum of dynamic shared memory per block (0: sm_90's 227 KiB); returns the
// previous value.
size_t set_device_dynamic_smem(size_t bytes);

// Runs body() as every thread of every block of the grid; throws Error on the first failure.
void run_grid(const void* kernel, dim3 grid, dim3 block, size_t dynamic_smem, const std::function<void()>& body);

template <typename T>
float half_to_float(uint16_t bits) {
    if constexpr (std::is_same<T, __half>::value) {
        __half_raw raw;
        raw.x = bits;
        return __half2float(__half(raw));
    } else {
        __nv_bfloat16_raw raw;
        raw.x = bits;
        return __bfloat162float(__nv_bfloat16(raw));
    }
}

inline uint16_t half_word(uint32_t reg, int upper) { return static_cast<uint16_t>(upper ? reg >> 16 : reg & 0xffffu); }

}  // namespace emu

using std::max;
using std::min;

// The PTX wrappers of device.cuh, from the PTX ISA's fragment layouts for mma.m16n8k16 and ldmatrix.

template <typename T>
void mma_16816(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    struct In {
        uint32_t a[4], b[2];
        float c[4];
    } in;
    memcpy(in.a, a, sizeof in.a);
    memcpy(in.b, b, sizeof in.b);
    memcpy(in.c, c, sizeof in.c);
    emu::warp_collective("mma.sync.m16n8k16", +[](const void* const* ins, void* const* outs) {
        emu::count_mma();
        float A[16][16], B[16][8], C[16][8];
        for (int lane = 0; lane < 32; ++lane) {
            const In& x = *static_cast<const In*>(ins[lane]);
            const int g = lane / 4, t = lane % 4;
            for (int e = 0; e < 2; ++e) {
                A[g][2 * t + e] = emu::half_to_float<T>(emu::half_word(x.a[0], e));
                A[g + 8][2 * t + e] = emu::half_to_float<T>(emu::half_word(x.a[1], e));
                A[g][2 * t + 8 + e] = emu::half_to_float<T>(emu::half_word(x.a[2], e));
                A[g + 8][2 * t + 8 + e] = emu::half_to_float<T>(emu::half_word(x.a[3], e));
                B[2 * t + e][g] = emu::half_to_float<T>(emu::half_word(x.b[0], e));
                B[2 * t + 8 + e][g] = emu::half_to_float<T>(emu::half_word(x.b[1], e));
                C[g][2 * t + e] = x.c[e];
                C[g + 8][2 * t + e] = x.c[2 + e];
            }
        }
        for (int lane = 0; lane < 32; ++lane) {
            float* d = static_cast<float*>(outs[lane]);
            const int g = lane / 4, t = lane % 4;
            for (int i = 0; i < 4; ++i) {
                const int row = g + 8 * (i / 2), col = 2 * t + i % 2;
                float acc = C[row][col];
                for (int kk = 0; kk < 16; ++kk) acc += A[row][kk] * B[kk][col];
                d[i] = acc;
            }
        }
    }, &in, c);
}

template <bool TRANS>
void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
    emu::shared_read_16(row, "ldmatrix");
    emu::warp_collective(TRANS ? "ldmatrix.x4.trans" : "ldmatrix.x4", +[](const void* const* ins, void* const* outs) {
        emu::count_ldmatrix_wavefronts(ins);
        for (int lane = 0; lane < 32; ++lane) {
            uint32_t* out = static_cast<uint32_t*>(outs[lane]);
            const int g = lane / 4, t = lane % 4;
            for (int j = 0; j < 4; ++j) {  // matrix j: rows from the addresses of lanes 8j .. 8j + 7
                uint16_t e[2];
                for (int i = 0; i < 2; ++i) {
                    const int row = TRANS ? 2 * t + i : g, col = TRANS ? g : 2 * t + i;
                    const auto* p = *static_cast<const uint16_t* const*>(ins[8 * j + row]);
                    e[i] = p[col];
                }
                out[j] = static_cast<uint32_t>(e[0]) | (static_cast<uint32_t>(e[1]) << 16);
            }
        }
    }, &row, r);
}

inline void cp_async_16(void* dst, const void* src, bool valid) { emu::cp_async(dst, src, valid); }
inline void cp_async_commit() { emu::cp_async_commit(); }
template <int N>
void cp_async_wait() { emu::cp_async_wait(N); }

template <typename T>
T* dynamic_smem() {
    return reinterpret_cast<T*>(emu::dynamic_shared_memory());
}

// kernel<<<grid, block, smem_bytes, stream>>>(args...), run on the CPU; emu::Error on a failed check.
template <typename... Params, typename... Args>
cudaError_t launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t,
                          Args&&... args) {
    const std::tuple<Params...> params(std::forward<Args>(args)...);
    emu::run_grid(reinterpret_cast<const void*>(kernel), grid, block, smem_bytes,
                  [&] { std::apply(kernel, params); });
    return cudaGetLastError();  // as after a real launch: an earlier failed runtime call shows here
}

}  // namespace llm2comp

#define threadIdx (::llm2comp::emu::thread_idx())
#define blockIdx (::llm2comp::emu::block_idx())
#define blockDim (::llm2comp::emu::block_dim())
#define gridDim (::llm2comp::emu::grid_dim())

// cuda_runtime.h declares this overload for nvcc only.
template <typename T>
cudaError_t cudaFuncSetAttribute(T* kernel, cudaFuncAttribute attr, int value) {
    return cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), attr, value);
}

inline void __syncthreads() { ::llm2comp::emu::syncthreads(); }

template <typename T>
T __shfl_xor_sync(unsigned mask, T x, int lane_mask) {
    if (mask != 0xffffffffu) ::llm2comp::emu::fail("__shfl_xor_sync: only full-warp masks are emulated");
    struct In {
        T x;
        int lane_mask;
    } in{x, lane_mask};
    T out;
    ::llm2comp::emu::warp_collective("shfl.xor", +[](const void* const* ins, void* const* outs) {
        for (int lane = 0; lane < 32; ++lane) {
            const int m = static_cast<const In*>(ins[lane])->lane_mask;
            *static_cast<T*>(outs[lane]) = static_cast<const In*>(ins[lane ^ m])->x;
        }
    }, &in, &out);
    return out;
}

// Threads never run at the same time, so a plain read-modify-write is atomic.
inline float atomicAdd(float* p, float v) {
    const float old = *p;
    *p = old + v;
    return old;
}
