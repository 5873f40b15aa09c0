// The scheduler behind cpu_emulation.h: ucontext fibers for the threads of one block at a time.
#include "cpu_emulation.h"

#include <ucontext.h>

#include <cstdlib>
#include <deque>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <vector>

namespace llm2comp {
namespace emu {
namespace {

constexpr size_t kStackBytes = size_t(256) << 10;
constexpr size_t kDefaultDynamicSmem = size_t(48) << 10;  // without cudaFuncSetAttribute
constexpr size_t kSm90DynamicSmem = size_t(227) << 10;    // sm_90's opt-in maximum per block

enum class State { kRunnable, kAtBarrier, kAtCollective, kDone };

struct Copy {
    void* dst;
    const void* src;
    bool valid;
    bool landed;
};

// Race bookkeeping of one 16-byte granule of dynamic shared memory (the unit of cp.async and of an ldmatrix
// row). Epochs count the block's completed barriers.
struct Granule {
    int64_t write_epoch = -1, read_epoch = -1;
    int writer = -1;        // the thread whose copy landed last
    int reader = -1;        // the thread that read in read_epoch, kSeveral if more than one did
    int in_flight_by = -1;  // the thread whose copy into it has not been waited for
};
constexpr int kSeveral = -2;

struct Thread {
    uint3 idx;
    int linear = 0;
    State state = State::kRunnable;
    ucontext_t context;
    std::vector<Copy> open_group;
    std::deque<std::vector<Copy>> committed;
};

struct Warp {
    int exited = 0;
    int arrived = 0;
    const char* op = nullptr;
    CollectiveFn fn = nullptr;
    const void* ins[32];
    void* outs[32];
};

// The running launch.
struct Launch {
    dim3 grid, block;
    uint3 block_idx;
    const std::function<void()>* body;
    std::unique_ptr<uint4[]> smem;  // uint4: 16-byte aligned
    size_t smem_bytes = 0;
    std::vector<Granule> granules;
    int64_t epoch = 0;
    std::vector<Thread> threads;
    std::vector<Warp> warps;
    int live = 0, at_barrier = 0;
    ucontext_t scheduler;
    Thread* current = nullptr;
    std::string error;
};

Launch* running = nullptr;
std::vector<std::unique_ptr<char[]>> stacks;   // reused across launches
std::map<const void*, int> max_dynamic_smem;   // per kernel, from cudaFuncSetAttribute
size_t device_dynamic_smem = kSm90DynamicSmem;  // the emulated device's opt-in maximum per block
cudaError_t last_error = cudaSuccess;           // what cudaGetLastError() returns (and clears)
int schedule = 0;                              // 0 forward, 1 reverse, 2 shuffled
bool copies_at_issue = false;                  // cp.async lands when issued, not at cp_async_wait
std::mt19937_64 rng;
Counts counts;

std::string str(const uint3& v) {
    return "(" + std::to_string(v.x) + "," + std::to_string(v.y) + "," + std::to_string(v.z) + ")";
}

Thread& current() {
    if (running == nullptr || running->current == nullptr) throw Error("CUDA device code called outside a kernel");
    return *running->current;
}

Warp& warp_of(const Thread& t) { return running->warps[t.linear / 32]; }

void yield() { swapcontext(&current().context, &running->scheduler); }

void release_barrier_if_complete() {
    Launch& l = *running;
    if (l.at_barrier == 0 || l.at_barrier != l.live) return;
    for (Thread& t : l.threads) {
        if (t.state == State::kAtBarrier) t.state = State::kRunnable;
    }
    l.at_barrier = 0;
    ++l.epoch;
}

void thread_main() {
    (*running->body)();
    Thread& t = current();
    if (!t.open_group.empty() || !t.committed.empty()) fail("exits with cp.async copies it never waited for");
    Warp& w = warp_of(t);
    if (w.arrived > 0) fail(std::string("exits while its warp waits at ") + w.op);
    t.state = State::kDone;
    ++w.exited;
    --running->live;
    release_barrier_if_complete();
    swapcontext(&t.context, &running->scheduler);  // never resumed
}

std::string deadlock_report() {
    std::map<std::string, int> waiting;
    for (const Thread& t : running->threads) {
        if (t.state == State::kAtBarrier) ++waiting["__syncthreads"];
        if (t.state == State::kAtCollective) ++waiting[warp_of(t).op];
    }
    std::string report = "deadlock in block " + str(running->block_idx) + ":";
    for (const auto& [op, n] : waiting) report += " " + std::to_string(n) + " threads at " + op + ";";
    return report + " " + std::to_string(running->live) + " threads live";
}

void run_block() {
    Launch& l = *running;
    const unsigned bx = l.block.x, by = l.block.y;
    const int n = static_cast<int>(bx * by * l.block.z);
    l.threads.assign(n, Thread{});
    l.warps.assign((n + 31) / 32, Warp{});
    l.warps.back().exited = l.warps.size() * 32 - n;  // a partial last warp: its missing lanes count as exited
    l.live = n;
    l.at_barrier = 0;
    memset(l.smem.get(), 0xff, l.smem_bytes);
    l.granules.assign(l.smem_bytes / 16, Granule{});
    l.epoch = 0;
    for (int i = 0; i < n; ++i) {
        Thread& t = l.threads[i];
        t.linear = i;
        t.idx = make_uint3(i % bx, (i / bx) % by, i / (bx * by));
        getcontext(&t.context);
        t.context.uc_stack.ss_sp = stacks[i].get();
        t.context.uc_stack.ss_size = kStackBytes;
        t.context.uc_link = nullptr;
        makecontext(&t.context, thread_main, 0);
    }
    std::vector<int> order(n);
    std::iota(order.begin(), order.end(), 0);
    if (schedule == 1) std::reverse(order.begin(), order.end());
    while (l.live > 0) {
        if (schedule == 2) std::shuffle(order.begin(), order.end(), rng);
        bool ran = false;
        for (int i : order) {
            if (l.threads[i].state != State::kRunnable) continue;
            l.current = &l.threads[i];
            swapcontext(&l.scheduler, &l.threads[i].context);
            l.current = nullptr;
            if (!l.error.empty()) throw Error(l.error);
            ran = true;
        }
        if (!ran) throw Error(deadlock_report());
    }
}

}  // namespace

void fail(const std::string& message) {
    if (running == nullptr || running->current == nullptr) throw Error(message);
    running->error = "block " + str(running->block_idx) + " thread " + str(running->current->idx) + ": " + message;
    swapcontext(&running->current->context, &running->scheduler);
    std::abort();  // the scheduler never resumes a failed thread
}

const uint3& thread_idx() { return current().idx; }
const uint3& block_idx() { return running->block_idx; }
const dim3& block_dim() { return running->block; }
const dim3& grid_dim() { return running->grid; }

void syncthreads() {
    current().state = State::kAtBarrier;
    ++running->at_barrier;
    release_barrier_if_complete();
    yield();
}

void warp_collective(const char* op, CollectiveFn fn, const void* in, void* out) {
    Thread& t = current();
    Warp& w = warp_of(t);
    if (w.exited > 0) fail(std::string(op) + " in a warp with " + std::to_string(w.exited) + " exited lanes");
    if (w.arrived == 0) {
        w.op = op;
        w.fn = fn;
    } else if (w.fn != fn) {
        fail(std::string("lanes of one warp at different collectives: ") + op + " and " + w.op);
    }
    const int lane = t.linear % 32;
    w.ins[lane] = in;
    w.outs[lane] = out;
    t.state = State::kAtCollective;
    if (++w.arrived == 32) {
        fn(w.ins, w.outs);
        w.arrived = 0;
        for (int i = 0; i < 32; ++i) running->threads[t.linear - lane + i].state = State::kRunnable;
    }
    yield();
}

void check_shared_16(const void* p, size_t bytes, const char* op) {
    const auto* base = reinterpret_cast<const unsigned char*>(running->smem.get());
    const auto* c = static_cast<const unsigned char*>(p);
    if (c < base || c + bytes > base + running->smem_bytes) {
        fail(std::string(op) + ": address outside the dynamic shared memory (offset " + std::to_string(c - base) +
             " of " + std::to_string(running->smem_bytes) + " bytes)");
    }
    if ((c - base) % 16 != 0) fail(std::string(op) + ": shared address not 16-byte aligned");
}

void count_ldmatrix_wavefronts(const void* const* rows) {
    for (int j = 0; j < 4; ++j) {
        std::map<int, std::vector<uintptr_t>> words_of_bank;
        for (int r = 0; r < 8; ++r) {
            const auto address = reinterpret_cast<uintptr_t>(*static_cast<const void* const*>(rows[8 * j + r]));
            for (uintptr_t word = address / 4; word < address / 4 + 4; ++word) {
                auto& words = words_of_bank[static_cast<int>(word % 32)];
                if (std::find(words.begin(), words.end(), word) == words.end()) words.push_back(word);
            }
        }
        size_t most = 1;
        for (const auto& [bank, words] : words_of_bank) most = std::max(most, words.size());
        ++counts.ldmatrix_phases;
        counts.ldmatrix_wavefronts += static_cast<int64_t>(most);
    }
}

void count_mma() { ++counts.mma; }

Counts take_counts() {
    const Counts taken = counts;
    counts = Counts{};
    return taken;
}

unsigned char* dynamic_shared_memory() { return reinterpret_cast<unsigned char*>(running->smem.get()); }

Granule& granule(const void* p) {
    return running->granules[(static_cast<const unsigned char*>(p) - dynamic_shared_memory()) / 16];
}

void land(Copy& c) {
    if (c.landed) return;
    if (c.valid) {
        memcpy(c.dst, c.src, 16);
    } else {
        memset(c.dst, 0, 16);
    }
    c.landed = true;
}

void cp_async(void* dst, const void* src, bool valid) {
    check_shared_16(dst, 16, "cp.async");
    if (reinterpret_cast<uintptr_t>(src) % 16 != 0) fail("cp.async: global source not 16-byte aligned");
    Thread& t = current();
    Granule& g = granule(dst);
    if (g.in_flight_by >= 0) {
        fail("shared-memory race: cp.async into 16 bytes that thread " + std::to_string(g.in_flight_by) +
             "'s copy has not landed in yet");
    }
    if (g.read_epoch == running->epoch && g.reader != t.linear) {
        fail("shared-memory race (write after read): cp.async over 16 bytes that " +
             (g.reader == kSeveral ? std::string("other threads") : "thread " + std::to_string(g.reader)) +
             " read since the last __syncthreads");
    }
    g.in_flight_by = t.linear;
    if (valid) counts.cp_async_bytes += 16;
    t.open_group.push_back(Copy{dst, src, valid, false});
    if (copies_at_issue) land(t.open_group.back());
}

void cp_async_commit() {
    Thread& t = current();
    t.committed.push_back(std::move(t.open_group));
    t.open_group.clear();
}

void cp_async_wait(int groups_left) {
    Thread& t = current();
    while (static_cast<int>(t.committed.size()) > groups_left) {
        for (Copy& c : t.committed.front()) {
            land(c);
            Granule& g = granule(c.dst);
            g.in_flight_by = -1;
            g.write_epoch = running->epoch;
            g.writer = t.linear;
        }
        t.committed.pop_front();
    }
}

void shared_read_16(const void* p, const char* op) {
    check_shared_16(p, 16, op);
    const int me = current().linear;
    Granule& g = granule(p);
    if (g.in_flight_by >= 0) {
        fail(std::string("shared-memory race: ") + op + " reads 16 bytes that thread " +
             std::to_string(g.in_flight_by) + "'s cp.async has not landed in (no cp_async_wait and barrier)");
    }
    if (g.writer < 0) {
        fail(std::string(op) + " reads 16 bytes of shared memory that no copy has written in this block");
    }
    if (g.write_epoch == running->epoch && g.writer != me) {
        fail(std::string("shared-memory race (read after write): ") + op + " reads 16 bytes that thread " +
             std::to_string(g.writer) + "'s copy landed in since the last __syncthreads");
    }
    if (g.read_epoch != running->epoch) {
        g.read_epoch = running->epoch;
        g.reader = me;
    } else if (g.reader != me) {
        g.reader = kSeveral;
    }
}

void run_grid(const void* kernel, dim3 grid, dim3 block, size_t dynamic_smem, const std::function<void()>& body) {
    if (running != nullptr) throw Error("a kernel launched from inside a kernel");
    const size_t threads = size_t(block.x) * block.y * block.z;
    if (threads == 0 || threads > 1024 || block.z > 64) throw Error("invalid block size");
    if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535 || grid.x > 0x7fffffffu) {
        throw Error("invalid grid size");
    }
    const auto opt_in = max_dynamic_smem.find(kernel);
    const size_t limit = opt_in == max_dynamic_smem.end() ? kDefaultDynamicSmem : size_t(opt_in->second);
    if (dynamic_smem > limit || dynamic_smem > device_dynamic_smem) {
        throw Error(std::to_string(dynamic_smem) + " bytes of dynamic shared memory over the kernel's limit of " +
                    std::to_string(std::min(limit, device_dynamic_smem)) +
                    " (above 48 KiB a kernel needs cudaFuncSetAttribute(MaxDynamicSharedMemorySize))");
    }
    while (stacks.size() < threads) stacks.emplace_back(new char[kStackBytes]);
    Launch launch;
    launch.grid = grid;
    launch.block = block;
    launch.body = &body;
    launch.smem_bytes = dynamic_smem;
    launch.smem.reset(new uint4[(dynamic_smem + 15) / 16 + 1]);
    running = &launch;
    try {
        for (unsigned z = 0; z < grid.z; ++z) {
            for (unsigned y = 0; y < grid.y; ++y) {
                for (unsigned x = 0; x < grid.x; ++x) {
                    launch.block_idx = make_uint3(x, y, z);
                    run_block();
                }
            }
        }
    } catch (...) {
        running = nullptr;
        throw;
    }
    running = nullptr;
}

size_t set_device_dynamic_smem(size_t bytes) {
    return std::exchange(device_dynamic_smem, bytes == 0 ? kSm90DynamicSmem : bytes);
}

void set_schedule(int order, uint64_t seed, bool land_copies_at_issue) {
    if (order < 0 || order > 2) throw Error("schedule: 0 forward, 1 reverse, 2 shuffled");
    schedule = order;
    rng.seed(seed);
    copies_at_issue = land_copies_at_issue;
}

}  // namespace emu
}  // namespace llm2comp

// As the CUDA runtime does, a failed call is also recorded for the next cudaGetLastError().
extern "C" cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
    namespace emu = llm2comp::emu;
    if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
        if (value < 0 || size_t(value) > emu::device_dynamic_smem) return emu::last_error = cudaErrorInvalidValue;
        emu::max_dynamic_smem[func] = value;
    }
    return cudaSuccess;
}

extern "C" cudaError_t cudaGetLastError() { return std::exchange(llm2comp::emu::last_error, cudaSuccess); }
