// Kernels with one deliberate bug each, for tests/kernels/test_cuda_emulator.py to show that the emulator
// catches what it claims to catch (cpu_emulation.h).
#include "cpu_emulation.h"
#include "device.cuh"

namespace {

constexpr int kThreads = 64;

// Thread t writes t + salt to slot t and reads slot t - 1 with no barrier in between: under the forward
// order thread t - 1 has already written, under the reverse order it has not.
__global__ void missing_barrier_kernel(float* out, float salt) {
    __shared__ float slots[kThreads];
    slots[threadIdx.x] = float(threadIdx.x) + salt;
    out[threadIdx.x] = slots[threadIdx.x == 0 ? 0 : threadIdx.x - 1];
}

// Half of a warp at a shuffle, the other half at the block barrier: neither can complete.
__global__ void divergent_warp_kernel() {
    if (threadIdx.x % 32 < 16) {
        __shfl_xor_sync(0xffffffffu, 1.0f, 1);
    } else {
        __syncthreads();
    }
}

__global__ void shuffle_after_exit_kernel() {
    if (threadIdx.x % 32 == 5) return;
    __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}

__global__ void misaligned_ldmatrix_kernel() {
    uint32_t r[4];
    llm2comp::ldmatrix_x4<false>(r, llm2comp::dynamic_smem<__nv_bfloat16>() + 4 + 8 * (threadIdx.x % 8));
}

__global__ void read_before_wait_kernel(const float* src, float* out) {
    float* tile = llm2comp::dynamic_smem<float>();
    llm2comp::cp_async_16(tile + 4 * threadIdx.x, src + 4 * threadIdx.x, true);
    llm2comp::cp_async_commit();
    __syncthreads();  // no cp_async_wait before the barrier
    out[threadIdx.x] = tile[4 * ((threadIdx.x + 1) % kThreads)];
    __syncthreads();
    llm2comp::cp_async_wait<0>();
}

__global__ void unwaited_copy_kernel(const float* src) {
    llm2comp::cp_async_16(llm2comp::dynamic_smem<float>() + 4 * threadIdx.x, src + 4 * threadIdx.x, true);
    llm2comp::cp_async_commit();
}

// Each lane copies 16 bytes into granule `lane` (after a first round of copies and a barrier, so that every
// granule holds data) and has ldmatrix read granule lane + 1, another lane's: with no barrier between the
// copies and the reads (`barrier_after_copy` false), a read-after-write race; with one, a fresh copy into
// the granules after the reads is a write-after-read race.
__global__ void shared_race_kernel(const float* src, bool barrier_after_copy) {
    auto* tile = llm2comp::dynamic_smem<__nv_bfloat16>();  // 32 granules of 8 elements
    const int lane = threadIdx.x;
    for (int round = 0; round < 2; ++round) {
        llm2comp::cp_async_16(tile + 8 * lane, src + 4 * lane, true);
        llm2comp::cp_async_commit();
        llm2comp::cp_async_wait<0>();
        if (round == 0 || barrier_after_copy) __syncthreads();
    }
    uint32_t r[4];
    llm2comp::ldmatrix_x4<false>(r, tile + 8 * ((lane + 1) % 32));
    if (barrier_after_copy) {
        llm2comp::cp_async_16(tile + 8 * lane, src + 4 * lane, true);
        llm2comp::cp_async_commit();
        llm2comp::cp_async_wait<0>();
    }
}

// ldmatrix of shared memory nothing wrote.
__global__ void uninitialized_read_kernel() {
    uint32_t r[4];
    llm2comp::ldmatrix_x4<false>(r, llm2comp::dynamic_smem<__nv_bfloat16>() + 8 * threadIdx.x);
}

__global__ void empty_kernel() {}

}  // namespace

namespace llm2comp {

// Launches the kernel with bug `bug` on `buffer` (5 * kThreads floats, 16-byte aligned); salt: what
// missing_barrier adds.
cudaError_t launch_faulty(int bug, float* buffer, float salt) {
    switch (bug) {
        case 0: return launch_kernel(missing_barrier_kernel, 1, kThreads, 0, nullptr, buffer, salt);
        case 1: return launch_kernel(divergent_warp_kernel, 1, kThreads, 0, nullptr);
        case 2: return launch_kernel(shuffle_after_exit_kernel, 1, kThreads, 0, nullptr);
        case 3: return launch_kernel(misaligned_ldmatrix_kernel, 1, 32, 1024, nullptr);
        case 4: return launch_kernel(read_before_wait_kernel, 1, kThreads, 16 * kThreads, nullptr, buffer,
                                     buffer + 4 * kThreads);
        case 5: return launch_kernel(unwaited_copy_kernel, 1, kThreads, 16 * kThreads, nullptr, buffer);
        case 6: return launch_kernel(empty_kernel, 1, 32, 64 << 10, nullptr);
        case 7: return launch_kernel(shared_race_kernel, 1, 32, 512, nullptr, buffer, false);
        case 8: return launch_kernel(shared_race_kernel, 1, 32, 512, nullptr, buffer, true);
        case 9: return launch_kernel(uninitialized_read_kernel, 1, 32, 512, nullptr);
    }
    return cudaErrorInvalidValue;
}

}  // namespace llm2comp
