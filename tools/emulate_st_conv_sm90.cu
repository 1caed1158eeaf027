// Host emulation of csrc/cuda/st_conv3d_sm90_kernel.cu (no GPU needed). Every thread of every
// block runs the kernel's own block routine, sm90_block() (tap table, producer gathers, pipeline
// stage/phase bookkeeping, descriptors, consumer loop, epilogue), as a host thread; what the
// hardware does is modelled here from the PTX ISA, behind the kernel's VIDCONV_SM90_HOST_MODEL
// hooks:
//
// - mbarrier: an expected arrival count, pending arrivals and a completed-phase counter;
//   try_wait.parity(P) succeeds once the phase of parity P is the last completed one (a fresh
//   barrier counts phase "-1", parity 1, as completed). A waiter blocks (deadlock = a timeout).
//   cp.async.mbarrier.arrive.noinc is one arrival (the copies already landed: cp.async is a
//   synchronous copy here).
// - wgmma.mma_async.m64n128k16 (f32 += bf16/f16): queued at issue, executed at
//   wgmma.wait_group N for all committed groups but the newest N, so a stage released while a
//   wgmma reading it is in flight, a
//   wgmma without wgmma.fence, or one reading a stage without fence.proxy.async after the wait
//   on "full", is reported. Operands are read through the matrix descriptors exactly as the
//   ISA defines them for K-major 128B swizzle (start address, stride byte offset between 8-row
//   groups, swizzle = XOR of address bits [4:6] with bits [7:9]); the D fragment layout is the
//   ISA's m64nNk16 one (warp w rows 16w..16w+15, then the m16n8 layout repeated along N).
// - cp.async.bulk (global -> shared, complete_tx on an mbarrier) and arrive.expect_tx: the
//   barrier also counts transaction bytes; a phase completes when arrivals and bytes are done.
// - Shared memory: one buffer per block placed at shared address 48, so the kernel's own 1024-byte
//   alignment runs; accesses outside the launch's dynamic shared memory are reported.
//
// - Split-K (SPLIT > 1): the consumers' named barrier (bar.sync / bar.red.or 1, 256), the
//   gpu-scope fence, the tile counter atomic and the workspace's L2 loads/stores, with the
//   release/acquire rules of the PTX memory model checked at each step: a unit's partial stores
//   all before the consumer barrier and a gpu-scope fence after it before the counter arrival;
//   the last unit's fence after its arrival and a barrier after that before any partial load.
//   Blocks run one after another (no unit waits for another, so any order is a schedule the
//   device may run), in the order ORDER picks, which decides which unit of a tile arrives last.
//
// Checked per block: at every completion of a "full" barrier, every byte of that stage's A and
// B tiles, read through the swizzle model, is the implicit-im2col / weight element (of the
// unpacked weight: the repack is checked with it) of the tile
// and reduction tile the persistent schedule says it is (zero past an edge, in padding, past K
// or past the reduction); per output element: written exactly once. Per launch with split-K:
// every partial stored exactly once and never after its unit's arrival, none read before its
// unit arrived, every tile counter ending at SPLIT (each unit arrived once).
//
// Usage: emulate_st_conv_sm90 TYPE GRID SPLIT ORDER GROUPS N C T H W K kt kh kw st sh sw pt ph pw
//        relu has_bias DIR
//   TYPE 1 float16, 2 bfloat16; GRID the number of persistent blocks (0: one per work unit);
//   SPLIT the split-K factor (1: none); ORDER the order blocks run in (0 ascending, 1
//   descending, >1 a permutation seeded by it); GROUPS 1, or 2 for a grouped launch (a second
//   problem of the same sizes from DIR/x1.bin, w1.bin, b1.bin, written to DIR/out1.bin);
//   C already padded to a multiple of 8. DIR/x.bin (N,T,H,W,C), DIR/w.bin (K,kt,kh,kw,C) in TYPE,
//   DIR/b.bin float32 (K,) if has_bias. Writes DIR/out.bin (N,T',H',W',K), starting from NaN.
#define VIDCONV_SM90_HOST_MODEL 1
#include "cuda/st_conv3d_sm90_kernel.cu"

#include <atomic>
#include <cmath>
#include <type_traits>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <map>
#include <mutex>
#include <thread>
#include <vector>

using namespace vidconv::cuda;
using namespace vidconv::cuda::sm90;

namespace {

constexpr uint32_t kWindowBase = 48;  // shared address of the block's dynamic shared memory

struct Mbar {
  int count = 0, pending = 0;
  long long tx = 0;  // bytes still expected from bulk copies in this phase
  long long completed = 0;
  std::condition_variable cv;
};

struct Pending {
  float* d;
  uint64_t da, db;
  bool bf16;
};

// Everything one block's emulation shares between its threads.
struct BlockModel {
  std::mutex mu;
  std::vector<unsigned char> smem;
  std::map<uint32_t, Mbar> bars;  // by shared address
  std::condition_variable sync_cv;
  int sync_arrived = 0;
  long long sync_generation = 0;
  // what the checker needs
  const StConvArgs* p[kMaxGroup] = {nullptr, nullptr};  // per problem of the launch
  Sm90Plan plan{};
  int block = 0, grid = 1, split = 1;
  bool bf16 = true;
  // the consumers' named barrier (bar.sync / bar.red 1, 256)
  std::condition_variable csync_cv;
  int csync_arrived = 0;
  long long csync_generation = 0;
  bool csync_or = false, csync_result = false;
  long long csync_acquired = -1;  // the acquire epoch the barrier's completion passes on
  // split-K release / acquire bookkeeping (see the partial_* hooks)
  int dirty_threads = 0;            // consumer threads with stores not yet past the barrier
  bool synced_unfenced = false;     // stores past the barrier, no gpu fence since
  long long epoch = 0;              // counter arrivals of this block so far
  long long acquire_pending = -1;   // the epoch whose arrival came last, fence pending
  long long acquired = -1;          // the epoch whose arrival came last and was fenced
  std::vector<long long> unreleased;  // workspace slots stored since the last arrival
  uint32_t aligned = 0;  // shared address of the kernel's aligned base (from its first access)
};

BlockModel* g_block = nullptr;
std::atomic<long long> g_bad_smem{0}, g_sync_errors{0}, g_oob{0};
thread_local int t_tid = -1;
thread_local std::vector<Pending> t_pending;
thread_local std::vector<size_t> t_groups;  // sizes of the committed, unfinished groups
thread_local bool t_proxy_fenced = false, t_wgmma_fenced = false;
thread_local bool t_ws_dirty = false;     // workspace stores not yet past the consumer barrier
thread_local long long t_acquired = -1;   // acquire epoch this thread got through the barrier

// The split-K workspace of the launch (shared by all blocks, which run one after another in a
// chosen order: no unit waits for another, so every order is an interleaving the device may
// produce).
struct Workspace {
  std::mutex mu;
  float* partials = nullptr;
  unsigned* counters = nullptr;
  long long floats = 0;
  int tiles = 0, split = 1;
  std::vector<unsigned char> writes;  // per float
  std::vector<char> released;         // per slot (tile, slice)
};
Workspace g_ws;
std::atomic<long long> g_ws_errors{0};

void ws_error(const char* what) {
  if (g_ws_errors.fetch_add(1) < 5) {
    fprintf(stderr, "thread %d (block %d): %s\n", t_tid,
            g_block != nullptr ? g_block->block : -1, what);
  }
}

void sync_error(const char* what) {
  if (g_sync_errors.fetch_add(1) < 5) {
    fprintf(stderr, "thread %d: %s\n", t_tid, what);
  }
}

unsigned char* smem_at(uint32_t addr, int bytes) {
  BlockModel& b = *g_block;
  if (addr < kWindowBase || addr + bytes > kWindowBase + b.smem.size()) {
    g_oob.fetch_add(1);
    static unsigned char scratch[64];
    return scratch;
  }
  return b.smem.data() + (addr - kWindowBase);
}

template <typename T>
float to_float(const T& v);
template <>
float to_float<__half>(const __half& v) { return __half2float(v); }
template <>
float to_float<__nv_bfloat16>(const __nv_bfloat16& v) { return __bfloat162float(v); }

// The element of the implicit im2col matrix A[m, r] (r in (dt, dy, dx, c) order), from the
// definition of the convolution.
template <typename T>
T im2col(const StConvArgs& p, int m, int r) {
  const T* x = static_cast<const T*>(p.input);
  const int m_total = p.n * p.to * p.ho * p.wo;
  const int r_total = p.kt * p.kh * p.kw * p.c;
  if (m >= m_total || r >= r_total) return T(0.f);
  const int ow = m % p.wo, oh = (m / p.wo) % p.ho, ot = (m / p.wo / p.ho) % p.to;
  const int n = m / p.wo / p.ho / p.to;
  const int c = r % p.c, dx = (r / p.c) % p.kw, dy = (r / p.c / p.kw) % p.kh;
  const int dt = r / p.c / p.kw / p.kh;
  const int ti = ot * p.st - p.pt + dt, hi = oh * p.sh - p.ph + dy, wi = ow * p.sw - p.pw + dx;
  if (ti < 0 || ti >= p.t || hi < 0 || hi >= p.h || wi < 0 || wi >= p.w) return T(0.f);
  return x[((((long long)n * p.t + ti) * p.h + hi) * p.w + wi) * p.c + c];
}

template <typename T>
T weight_at(const StConvArgs& p, int kf, int r) {
  const T* w = static_cast<const T*>(p.weight);
  const int r_total = p.kt * p.kh * p.kw * p.c;
  if (kf >= p.k || r >= r_total) return T(0.f);
  return w[(long long)kf * r_total + r];
}

// Shared address of element (row, k) of a K-major 128B-swizzled operand whose 8-row groups are
// `sbo` bytes apart, starting at `start` (the ISA's canonical layout; the swizzle works on the
// absolute address).
uint32_t sw128_model_address(uint32_t start, uint32_t sbo, int row, int k) {
  const uint32_t logical = start + (row / 8) * sbo + (row % 8) * 128 + k * 2;
  return logical ^ (((logical >> 7) & 7u) << 4);
}

// Every slot of one stage against the definition, read through the swizzle model.
template <typename T>
void check_stage(BlockModel& b, int stage, long long completion) {
  // The block's it-th reduction tile, walking its work units as the schedule defines them:
  // units block, block + grid, ...; unit = slice * n_tiles + tile; slice s covers reduction
  // tiles [s * k_tiles / split, (s + 1) * k_tiles / split).
  long long it = completion * kStages + stage;
  int tile = -1, kt = -1;
  // With two problems: unit = (slice * 2 + problem) * n_tiles + tile.
  int group = 0;
  const int tiles_all = b.plan.groups * b.plan.n_tiles;
  for (int unit = b.block; unit < b.plan.n_units; unit += b.grid) {
    const int slice = unit / tiles_all;
    const long long begin = static_cast<long long>(slice) * b.plan.k_tiles / b.split;
    const long long end = static_cast<long long>(slice + 1) * b.plan.k_tiles / b.split;
    if (it < end - begin) {
      group = unit % tiles_all / b.plan.n_tiles;
      tile = unit % b.plan.n_tiles;
      kt = static_cast<int>(begin + it);
      break;
    }
    it -= end - begin;
  }
  if (tile < 0) {
    sync_error("a stage filled past the block's last work unit");
    return;
  }
  const int m0 = (tile / b.plan.tiles_n) * kBM, n0 = (tile % b.plan.tiles_n) * kBN;
  const uint32_t a = b.aligned + stage * kStageBytes, bb = a + kOperandBytes;
  long long bad = 0;
  for (int row = 0; row < kBM; ++row) {
    for (int k = 0; k < kBK; ++k) {
      const int r = kt * kBK + k;
      const T ea = im2col<T>(*b.p[group], m0 + row, r);
      const T eb = weight_at<T>(*b.p[group], n0 + row, r);
      bad += std::memcmp(smem_at(sw128_model_address(a, 1024, row, k), 2), &ea, 2) != 0;
      bad += std::memcmp(smem_at(sw128_model_address(bb, 1024, row, k), 2), &eb, 2) != 0;
    }
  }
  if (bad > 0 && g_bad_smem.load() == 0) {
    fprintf(stderr, "block %d problem %d tile %d k-tile %d stage %d: %lld wrong slots\n",
            b.block, group, tile, kt, stage, bad);
  }
  g_bad_smem.fetch_add(bad);
}

// One wgmma.mma_async.m64n128k16 for the calling thread's 64 accumulator registers.
template <typename T>
void run_wgmma(const Pending& w) {
  const int t = (t_tid - kProducerThreads) % 128;  // thread within its warpgroup
  const int warp = t / 32, lane = t % 32, group = lane / 4, in_group = lane % 4;
  for (const uint64_t desc : {w.da, w.db}) {
    if ((desc >> 62) != 1 || ((desc >> 49) & 7) != 0 || ((desc >> 32) & 0x3FFF) != 1024 / 16) {
      sync_error("descriptor is not K-major 128B swizzle with 1024-byte row groups");
      return;
    }
  }
  const uint32_t a0 = static_cast<uint32_t>(w.da & 0x3FFF) << 4;
  const uint32_t b0 = static_cast<uint32_t>(w.db & 0x3FFF) << 4;
  if (a0 % 128 + 32 > 128 || b0 % 128 + 32 > 128) {
    sync_error("a k16 slice crosses the 128-byte swizzle row");
    return;
  }
  float a[2][16];
  for (int h = 0; h < 2; ++h) {
    const int row = warp * 16 + group + 8 * h;
    for (int k = 0; k < 16; ++k) {
      T v;
      std::memcpy(&v, smem_at(sw128_model_address(a0, 1024, row, k), 2), 2);
      a[h][k] = to_float<T>(v);
    }
  }
  for (int j = 0; j < 16; ++j) {  // n8 block j: registers 4j .. 4j+3
    for (int e = 0; e < 4; ++e) {
      const int col = 8 * j + 2 * in_group + (e & 1);
      const int h = e >> 1;
      float sum = w.d[4 * j + e];
      for (int k = 0; k < 16; ++k) {
        T v;
        std::memcpy(&v, smem_at(sw128_model_address(b0, 1024, col, k), 2), 2);
        sum = std::fma(a[h][k], to_float<T>(v), sum);
      }
      w.d[4 * j + e] = sum;
    }
  }
}

}  // namespace

namespace vidconv {
namespace cuda {
namespace sm90_host_model {

uint32_t smem_address(const void* p) {
  BlockModel& b = *g_block;
  const auto* c = static_cast<const unsigned char*>(p);
  if (c < b.smem.data() || c > b.smem.data() + b.smem.size()) {
    g_oob.fetch_add(1);
    return 0;
  }
  return kWindowBase + static_cast<uint32_t>(c - b.smem.data());
}

void block_sync() {
  BlockModel& b = *g_block;
  std::unique_lock<std::mutex> lock(b.mu);
  const long long gen = b.sync_generation;
  if (++b.sync_arrived == kThreads) {
    b.sync_arrived = 0;
    ++b.sync_generation;
    b.sync_cv.notify_all();
  } else if (!b.sync_cv.wait_for(lock, std::chrono::seconds(20),
                                 [&] { return b.sync_generation != gen; })) {
    fprintf(stderr, "deadlock at the block barrier\n");
    std::_Exit(3);
  }
}

void mbar_init(uint64_t* bar, int count) {
  BlockModel& b = *g_block;
  std::lock_guard<std::mutex> lock(b.mu);
  Mbar& m = b.bars[smem_address(bar)];
  m.count = count;
  m.pending = count;
  m.completed = 0;
}

namespace {
// `arrivals` arrivals and `tx` bytes of expected (+) or completed (-) transactions; the phase
// completes when both the pending arrivals and the transaction count reach zero.
void update(uint64_t* bar, int arrivals, long long tx) {
  BlockModel& b = *g_block;
  const uint32_t addr = smem_address(bar);
  std::lock_guard<std::mutex> lock(b.mu);
  auto found = b.bars.find(addr);
  if (found == b.bars.end()) {
    sync_error("arrive on an uninitialised mbarrier");
    return;
  }
  Mbar& m = found->second;
  m.pending -= arrivals;
  m.tx += tx;
  if (m.pending < 0) sync_error("more arrivals than the mbarrier's count");
  if (m.pending == 0 && m.tx == 0) {
    const uint32_t full0 = b.aligned + kBarrierOffset;
    if (addr >= full0 && addr < full0 + 8 * kStages) {
      const int stage = static_cast<int>((addr - full0) / 8);
      if (b.bf16) {
        check_stage<__nv_bfloat16>(b, stage, m.completed);
      } else {
        check_stage<__half>(b, stage, m.completed);
      }
    }
    ++m.completed;
    m.pending = m.count;
    m.cv.notify_all();
  }
}
void arrive(uint64_t* bar) { update(bar, 1, 0); }
}  // namespace

// Which pipeline stage a shared address lies in (-1: none).
int stage_of(uint32_t addr) {
  const uint32_t base = g_block->aligned;
  if (addr < base || addr >= base + kStages * kStageBytes) return -1;
  return static_cast<int>((addr - base) / kStageBytes);
}

void mbar_arrive(uint64_t* bar) {
  const uint32_t addr = smem_address(bar);
  const uint32_t empty0 = g_block->aligned + kBarrierOffset + 8 * kStages;
  if (addr >= empty0 && addr < empty0 + 8 * kStages) {
    const int stage = static_cast<int>((addr - empty0) / 8);
    for (const Pending& w : t_pending) {
      if (stage_of(static_cast<uint32_t>(w.da & 0x3FFF) << 4) == stage ||
          stage_of(static_cast<uint32_t>(w.db & 0x3FFF) << 4) == stage) {
        sync_error("mbarrier arrive (stage release) while this thread's wgmma are in flight "
                   "on that stage");
        break;
      }
    }
  }
  arrive(bar);
}

void mbar_arrive_cp_async(uint64_t* bar) { arrive(bar); }

void mbar_arrive_expect_tx(uint64_t* bar, int bytes) { update(bar, 1, bytes); }

// cp.async.bulk: 16-byte aligned addresses, a multiple of 16 bytes; lands at once here.
void bulk_copy(void* dst, const void* src, int bytes, uint64_t* bar) {
  const uint32_t addr = smem_address(dst);
  if (addr % 16 != 0 || reinterpret_cast<uintptr_t>(src) % 16 != 0 || bytes % 16 != 0) {
    sync_error("misaligned bulk copy");
  }
  std::memcpy(smem_at(addr, bytes), src, static_cast<size_t>(bytes));
  update(bar, 0, -static_cast<long long>(bytes));
}

void mbar_wait(uint64_t* bar, unsigned parity) {
  BlockModel& b = *g_block;
  const uint32_t addr = smem_address(bar);
  std::unique_lock<std::mutex> lock(b.mu);
  auto found = b.bars.find(addr);
  if (found == b.bars.end()) {
    sync_error("wait on an uninitialised mbarrier");
    return;
  }
  Mbar& m = found->second;
  // The last completed phase is completed - 1 ("-1" for a fresh barrier, parity 1).
  const auto done = [&] { return static_cast<unsigned>((m.completed - 1) & 1) == (parity & 1); };
  if (!m.cv.wait_for(lock, std::chrono::seconds(20), done)) {
    fprintf(stderr, "deadlock: thread %d waits on mbarrier at %u for parity %u\n", t_tid, addr,
            parity);
    std::_Exit(3);
  }
  t_proxy_fenced = false;
}

void fence_proxy_async() { t_proxy_fenced = true; }

void wgmma_fence() { t_wgmma_fenced = true; }

void wgmma_m64n128k16(float* d, uint64_t desc_a, uint64_t desc_b, bool bf16) {
  if (!t_proxy_fenced) sync_error("wgmma reads cp.async data without fence.proxy.async");
  if (!t_wgmma_fenced) sync_error("wgmma without a preceding wgmma.fence");
  if (bf16 != g_block->bf16) sync_error("wgmma of the wrong element type");
  t_pending.push_back({d, desc_a, desc_b, bf16});
}

void wgmma_commit() {
  size_t committed = 0;
  for (const size_t g : t_groups) committed += g;
  t_groups.push_back(t_pending.size() - committed);
}

// wgmma.wait_group N: every committed group but the newest N completes (runs, in the model).
void wgmma_wait(int pending) {
  size_t committed = 0;
  for (const size_t g : t_groups) committed += g;
  if (committed != t_pending.size()) sync_error("wgmma.wait_group with uncommitted wgmma");
  while (t_groups.size() > static_cast<size_t>(pending)) {
    const size_t count = t_groups.front();
    for (size_t i = 0; i < count; ++i) {
      if (t_pending[i].bf16) {
        run_wgmma<__nv_bfloat16>(t_pending[i]);
      } else {
        run_wgmma<__half>(t_pending[i]);
      }
    }
    t_pending.erase(t_pending.begin(), t_pending.begin() + static_cast<long>(count));
    t_groups.erase(t_groups.begin());
  }
  t_wgmma_fenced = false;
}

// ---- split-K: the consumers' named barrier, gpu-scope fence and atomic, workspace accesses ----
//
// The rules checked (the PTX memory model's release/acquire pattern across blocks): a unit's
// partial stores must all precede the consumer barrier, and a gpu-scope fence must follow that
// barrier, before the tile counter arrival (release); the unit that arrives last must fence
// after its arrival, and every thread must pass a consumer barrier after that fence, before it
// reads any partial (acquire). A partial may be read only once its unit has arrived, may be
// stored only once, and never after its unit's arrival.

namespace {
bool consumer_barrier(bool value) {
  BlockModel& b = *g_block;
  std::unique_lock<std::mutex> lock(b.mu);
  if (t_ws_dirty) {
    t_ws_dirty = false;
    --b.dirty_threads;
    b.synced_unfenced = true;
  }
  const long long gen = b.csync_generation;
  b.csync_or = b.csync_or || value;
  if (++b.csync_arrived == kConsumerThreads) {
    b.csync_arrived = 0;
    b.csync_result = b.csync_or;
    b.csync_or = false;
    b.csync_acquired = b.acquired;
    ++b.csync_generation;
    b.csync_cv.notify_all();
  } else if (!b.csync_cv.wait_for(lock, std::chrono::seconds(20),
                                  [&] { return b.csync_generation != gen; })) {
    fprintf(stderr, "deadlock at the consumer barrier (thread %d)\n", t_tid);
    std::_Exit(3);
  }
  t_acquired = b.csync_acquired;
  return b.csync_result;
}

// Slot (tile * split + slice) and float index of a workspace address; -1 if outside.
long long ws_index(const float* f) {
  if (g_ws.partials == nullptr || f < g_ws.partials || f + 4 > g_ws.partials + g_ws.floats ||
      (f - g_ws.partials) % 4 != 0) {
    return -1;
  }
  return f - g_ws.partials;
}
}  // namespace

void consumer_sync() {
  if (t_tid < kProducerThreads) sync_error("the producer at the consumers' named barrier");
  consumer_barrier(false);
}

bool consumer_sync_or(bool value) {
  if (t_tid < kProducerThreads) sync_error("the producer at the consumers' named barrier");
  return consumer_barrier(value);
}

void fence_gpu() {
  BlockModel& b = *g_block;
  std::lock_guard<std::mutex> lock(b.mu);
  if (t_ws_dirty) {  // the thread's own stores are ordered by its own fence
    t_ws_dirty = false;
    --b.dirty_threads;
  }
  if (b.dirty_threads == 0) b.synced_unfenced = false;  // cumulative over the barrier
  if (b.acquire_pending == b.epoch) b.acquired = b.epoch;
}

unsigned atomic_add(unsigned* counter, unsigned value) {
  BlockModel& b = *g_block;
  std::lock_guard<std::mutex> lock(b.mu);
  const long long tile = counter - g_ws.counters;
  if (g_ws.counters == nullptr || tile < 0 || tile >= g_ws.tiles) {
    ws_error("atomic on an address outside the tile counters");
    return 0;
  }
  if (b.dirty_threads > 0 || b.synced_unfenced) {
    ws_error("tile counter arrival before the unit's partial stores are behind the consumer "
             "barrier and a gpu-scope fence (release)");
  }
  std::lock_guard<std::mutex> ws_lock(g_ws.mu);
  for (const long long slot : b.unreleased) {
    if (slot / g_ws.split != tile) ws_error("a counter arrival on another tile's counter");
    g_ws.released[static_cast<size_t>(slot)] = 1;
  }
  b.unreleased.clear();
  ++b.epoch;
  const unsigned old = counter[0];
  counter[0] = old + value;
  if (old + value == static_cast<unsigned>(g_ws.split)) b.acquire_pending = b.epoch;
  return old;
}

void partial_store(float* dst, const float (&v)[4]) {
  const long long i = ws_index(dst);
  if (i < 0) {
    ws_error("partial store outside the workspace (or not 16-byte aligned)");
    return;
  }
  BlockModel& b = *g_block;
  const long long slot = i / kTileFloats;
  {  // never both locks at once in this order: atomic_add takes the block's, then g_ws's
    std::lock_guard<std::mutex> lock(b.mu);
    if (!t_ws_dirty) {
      t_ws_dirty = true;
      ++b.dirty_threads;
    }
    if (b.unreleased.empty() || b.unreleased.back() != slot) b.unreleased.push_back(slot);
  }
  std::lock_guard<std::mutex> ws_lock(g_ws.mu);
  if (g_ws.released[static_cast<size_t>(slot)]) {
    ws_error("partial stored after its unit's counter arrival");
  }
  for (int e = 0; e < 4; ++e) {
    if (g_ws.writes[static_cast<size_t>(i + e)]++ != 0) ws_error("a partial stored twice");
  }
  std::memcpy(dst, v, sizeof v);
}

void partial_load(const float* src, float (&v)[4]) {
  const long long i = ws_index(src);
  if (i < 0) {
    ws_error("partial load outside the workspace (or not 16-byte aligned)");
    return;
  }
  BlockModel& b = *g_block;
  {
    std::lock_guard<std::mutex> lock(b.mu);
    if (t_acquired != b.epoch) {
      ws_error("partial read without an acquire (gpu-scope fence after the last arrival, then "
               "the consumer barrier)");
    }
  }
  std::lock_guard<std::mutex> ws_lock(g_ws.mu);
  if (!g_ws.released[static_cast<size_t>(i / kTileFloats)] ||
      g_ws.writes[static_cast<size_t>(i)] == 0) {
    ws_error("partial read before its unit stored it and arrived");
  }
  std::memcpy(v, src, sizeof v);
}

}  // namespace sm90_host_model
}  // namespace cuda
}  // namespace vidconv

namespace {

template <typename T>
std::vector<T> read_file(const char* dir, const char* name, size_t count) {
  std::vector<T> v(count);
  char path[1024];
  snprintf(path, sizeof path, "%s/%s", dir, name);
  FILE* f = fopen(path, "rb");
  if (f == nullptr || fread(v.data(), sizeof(T), count, f) != count) {
    fprintf(stderr, "cannot read %zu elements from %s\n", count, path);
    exit(2);
  }
  fclose(f);
  return v;
}

// The kernel's store, counting writes per element (problem g's counters from g * count on).
template <typename T>
struct CountingStore {
  Sm90PairStore<T> store;
  std::vector<std::atomic<int>>* writes;
  size_t count;
  void operator()(int group, int m, int col, float v0, float v1, bool has1) const {
    store(group, m, col, v0, v1, has1);
    const size_t at = group * count + static_cast<size_t>(m) * store.k + col;
    (*writes)[at].fetch_add(1);
    if (has1) (*writes)[at + 1].fetch_add(1);
  }
};

// One problem's tensors, read from DIR/x{suffix}.bin, w{suffix}.bin, b{suffix}.bin.
template <typename T>
struct Problem {
  std::vector<T> x, w, out;
  std::vector<float> bias;
  std::vector<uint4> packed;
  StConvArgs args{};
};

template <typename T>
int run(StConvArgs p, int grid_arg, int split, int order, int groups, bool has_bias,
        const char* dir) {
  const size_t x_count = (size_t)p.n * p.t * p.h * p.w * p.c;
  const size_t w_count = (size_t)p.k * p.kt * p.kh * p.kw * p.c;
  const size_t out_count = (size_t)p.n * p.to * p.ho * p.wo * p.k;
  if (groups < 1 || groups > kMaxGroup) {
    fprintf(stderr, "GROUPS must be 1 or 2, got %d\n", groups);
    return 2;
  }
  std::vector<Problem<T>> problems(static_cast<size_t>(groups));
  for (int g = 0; g < groups; ++g) {
    Problem<T>& q = problems[static_cast<size_t>(g)];
    const char* suffix = g == 0 ? "" : "1";
    char name[64];
    snprintf(name, sizeof name, "x%s.bin", suffix);
    q.x = read_file<T>(dir, name, x_count);
    snprintf(name, sizeof name, "w%s.bin", suffix);
    q.w = read_file<T>(dir, name, w_count);
    snprintf(name, sizeof name, "b%s.bin", suffix);
    if (has_bias) q.bias = read_file<float>(dir, name, p.k);
    q.out.resize(out_count);
    std::memset(q.out.data(), 0xFF, out_count * sizeof(T));
    q.args = p;
    q.args.input = q.x.data();
    q.args.weight = q.w.data();
    q.args.bias = has_bias ? q.bias.data() : nullptr;
    q.args.out = q.out.data();
  }
  std::vector<std::atomic<int>> writes(out_count * groups);
  p = problems[0].args;
  const ConvType type = std::is_same<T, __half>::value ? ConvType::kFloat16 : ConvType::kBFloat16;
  if (sm90_check_shape(p, type) != kSm90Ok) {
    fprintf(stderr, "shape unsupported: %s\n", sm90_status_message(sm90_check_shape(p, type)));
    return 4;
  }
  if (sm90_check_split(p, split) != kSm90Ok) {
    fprintf(stderr, "split unsupported: %s\n", sm90_status_message(sm90_check_split(p, split)));
    return 4;
  }
  const StConvArgs group_args[kMaxGroup] = {problems[0].args, problems[groups - 1].args};
  if (sm90_check_group(group_args, groups) != kSm90Ok) {
    fprintf(stderr, "group unsupported\n");
    return 4;
  }
  const Sm90Plan plan = sm90_plan(p, split, groups);
  const int grid = grid_arg > 0 && grid_arg < plan.n_units ? grid_arg : plan.n_units;
  // The launcher's workspace: partials (NaN: an unstored one read shows in the result), then the
  // counters, zeroed as the launcher does on the stream.
  const long long ws_bytes = sm90_workspace_bytes(p, split, groups);
  std::vector<uint4> workspace(static_cast<size_t>((ws_bytes + 15) / 16));
  std::memset(workspace.data(), 0xFF, workspace.size() * 16);
  Sm90SplitK ws{nullptr, nullptr};
  const int work_tiles = groups * plan.n_tiles;
  if (split > 1) {
    ws.partials = reinterpret_cast<float*>(workspace.data());
    ws.counters = reinterpret_cast<unsigned*>(reinterpret_cast<unsigned char*>(workspace.data()) +
                                              splitk_partial_bytes(plan));
    std::memset(ws.counters, 0, sizeof(unsigned) * static_cast<size_t>(work_tiles));
    g_ws.partials = ws.partials;
    g_ws.counters = ws.counters;
    g_ws.floats = splitk_partial_bytes(plan) / 4;
    g_ws.tiles = work_tiles;
    g_ws.split = split;
    g_ws.writes.assign(static_cast<size_t>(g_ws.floats), 0);
    g_ws.released.assign(static_cast<size_t>(work_tiles) * split, 0);
  }
  // The order blocks run in: 0 ascending, 1 descending, else a permutation seeded by `order`.
  // Blocks run one after another, so the order decides which unit of a tile arrives last.
  std::vector<int> blocks(static_cast<size_t>(grid));
  for (int i = 0; i < grid; ++i) blocks[static_cast<size_t>(i)] = order == 1 ? grid - 1 - i : i;
  if (order > 1) {
    unsigned long long state = static_cast<unsigned long long>(order) * 0x9E3779B97F4A7C15ULL;
    for (int i = grid - 1; i > 0; --i) {
      state = state * 6364136223846793005ULL + 1442695040888963407ULL;
      std::swap(blocks[static_cast<size_t>(i)], blocks[(state >> 33) % (i + 1)]);
    }
  }
  // The launcher's weight repack, through the kernel's own pack_weight_vector.
  for (Problem<T>& q : problems) {
    q.packed.assign(static_cast<size_t>(packed_weight_bytes(plan) / 16), uint4{0, 0, 0, 0});
    for (int kf = 0; kf < p.k; ++kf) {
      for (int gv = 0; gv < plan.n_vec; ++gv) {
        pack_weight_vector(static_cast<const unsigned char*>(q.args.weight),
                           reinterpret_cast<unsigned char*>(q.packed.data()), plan, kf, gv);
      }
    }
  }
  StConvArgs kernel_args = p;
  kernel_args.weight = problems[0].packed.data();
  Sm90Second second{nullptr, nullptr, nullptr, nullptr};
  if (groups > 1) {
    const Problem<T>& q = problems[1];
    second = {q.args.input, q.packed.data(), q.args.bias, q.args.out};
  }
  const CountingStore<T> store{
      {static_cast<T*>(p.out), static_cast<T*>(second.out), p.k}, &writes, out_count};
  for (const int block : blocks) {
    BlockModel model;
    model.smem.assign(static_cast<size_t>(sm90_smem_bytes(plan.n_vec)), 0xA5);
    for (int g = 0; g < groups; ++g) model.p[g] = &problems[static_cast<size_t>(g)].args;
    model.plan = plan;
    model.block = block;
    model.grid = grid;
    model.split = split;
    model.bf16 = type == ConvType::kBFloat16;
    const uint32_t raw = kWindowBase;
    model.aligned = (raw + kSmemAlign - 1) / kSmemAlign * kSmemAlign;
    g_block = &model;
    std::vector<std::thread> threads;
    threads.reserve(kThreads);
    for (int tid = 0; tid < kThreads; ++tid) {
      threads.emplace_back([&, tid] {
        t_tid = tid;
        sm90_block<T>(kernel_args, plan, model.smem.data(), tid, block, grid, ws, second,
                      store);
        if (!t_pending.empty()) sync_error("thread left with wgmma in flight");
      });
    }
    for (auto& t : threads) t.join();
    for (const auto& [addr, bar] : model.bars) {
      if (bar.pending != bar.count) sync_error("an mbarrier was left mid-phase");
    }
    g_block = nullptr;
  }
  long long unwritten = 0, rewritten = 0;
  for (auto& c : writes) {
    unwritten += c.load() == 0;
    rewritten += c.load() > 1;
  }
  // Every unit arrived exactly once, and stored its whole partial tile.
  long long counter_errors = 0, ws_unstored = 0;
  if (split > 1) {
    for (int tile = 0; tile < work_tiles; ++tile) {
      counter_errors += ws.counters[tile] != static_cast<unsigned>(split);
    }
    for (const unsigned char w : g_ws.writes) ws_unstored += w == 0;
  }
  for (int g = 0; g < groups; ++g) {
    char path[1024];
    snprintf(path, sizeof path, "%s/out%s.bin", dir, g == 0 ? "" : "1");
    FILE* f = fopen(path, "wb");
    const std::vector<T>& out = problems[static_cast<size_t>(g)].out;
    if (f == nullptr || fwrite(out.data(), sizeof(T), out_count, f) != out_count) {
      fprintf(stderr, "cannot write %s\n", path);
      return 2;
    }
    fclose(f);
  }
  printf("tile=%s blocks=%d tiles=%d k_tiles=%d split=%d groups=%d units=%d outputs=%zu "
         "bad_smem=%lld smem_oob=%lld sync_errors=%lld unwritten=%lld rewritten=%lld "
         "ws_errors=%lld ws_unstored=%lld counter_errors=%lld\n",
         sm90_tile_name(), grid, plan.n_tiles, plan.k_tiles, plan.split_k, plan.groups,
         plan.n_units, out_count * groups, g_bad_smem.load(), g_oob.load(), g_sync_errors.load(), unwritten, rewritten,
         g_ws_errors.load(), ws_unstored, counter_errors);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 24) {
    fprintf(stderr,
            "usage: %s TYPE GRID SPLIT ORDER GROUPS N C T H W K kt kh kw st sh sw pt ph pw relu "
            "has_bias DIR\n",
            argv[0]);
    return 2;
  }
  int v[22];
  for (int i = 0; i < 22; ++i) v[i] = atoi(argv[1 + i]);
  const int split = v[2], order = v[3], groups = v[4];
  for (int i = 2; i < 19; ++i) v[i] = v[i + 3];  // N .. has_bias where they were without them
  StConvArgs p{};
  p.n = v[2], p.c = v[3], p.t = v[4], p.h = v[5], p.w = v[6], p.k = v[7];
  p.kt = v[8], p.kh = v[9], p.kw = v[10], p.st = v[11], p.sh = v[12], p.sw = v[13];
  p.pt = v[14], p.ph = v[15], p.pw = v[16];
  p.relu = v[17] != 0;
  p.to = (p.t + 2 * p.pt - p.kt) / p.st + 1;
  p.ho = (p.h + 2 * p.ph - p.kh) / p.sh + 1;
  p.wo = (p.w + 2 * p.pw - p.kw) / p.sw + 1;
  const bool has_bias = v[18] != 0;
  if (v[0] == 1) return run<__half>(p, v[1], split, order, groups, has_bias, argv[23]);
  if (v[0] == 2) return run<__nv_bfloat16>(p, v[1], split, order, groups, has_bias, argv[23]);
  fprintf(stderr, "TYPE must be 1 (float16) or 2 (bfloat16), got %d\n", v[0]);
  return 2;
}
