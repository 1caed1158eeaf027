// Hopper (sm_90a) fused spatio-temporal convolution as an implicit GEMM on wgmma, CUDA runtime
// only (no torch headers). Same GEMM as st_conv3d_kernel.cu:
//
//   out[m, k] = act(bias[k] + sum_r A[m, r] * W[k, r])
//   m = (n, t', h', w'), k over the K filters, r = (dt, dy, dx, c) over kt*kh*kw*C
//
// What is ours, and why (everything in this file is; no CUTLASS/CuTe, hand-written PTX instead,
// which keeps the build a plain nvcc call and lets the host emulation run the very same code):
//
// - Block tile 128 (positions) x 128 (filters) x 64 (reduction), 4-stage pipeline in shared
//   memory, 128B-swizzled K-major operands (one 64-element bf16/fp16 row is one 128-byte swizzle
//   row), read by wgmma.mma_async.m64n128k16 through shared-memory matrix descriptors.
// - Warp specialisation: warpgroup 0 is the producer, warpgroups 1 and 2 are consumers, each
//   owning 64 rows of the tile (one m64n128 accumulator, 64 fp32 registers per thread).
//   Per stage an mbarrier "full" (128 cp.async arrivals + 1 expect_tx arrival + the bulk copy's
//   bytes) and "empty" (256 consumer arrivals). Consumers keep one wgmma group in flight.
// - B (the weight) comes by bulk copy, the TMA engine without a tensor map: the launcher first
//   repacks the weight so each (filter tile, reduction tile) block is 16 KiB contiguous in the
//   stage's swizzled layout, and one producer thread issues cp.async.bulk with an
//   arrive.expect_tx on "full" per stage.
// - A (the implicit im2col rows) is gathered by the producer warpgroup with 16-byte cp.async
//   (zero-fill for padding, edges and the ragged reduction end), each thread signalling "full"
//   with cp.async.mbarrier.arrive.noinc, so it never waits for its own copies. Why not TMA for
//   A: a tile of 128 consecutive output positions wraps across output rows, frames and clips,
//   and strides go up to 3 (conv1), so
//   neither a tiled box per tap nor the im2col mode's single (w, h) pixel window covers an
//   M-tile without splitting it into pieces of one output row (often 13 or 27 positions, far
//   below a 128-row box) -- and encoding tensor maps needs the driver API
//   (cuTensorMapEncode*), which this runtime-only file avoids. The gather is therefore 128
//   threads of cp.async; the consumers make those generic-proxy writes visible to wgmma (async
//   proxy) with fence.proxy.async after their wait on "full".
// - Per-reduction-vector table of (input offset, tap) built once per block in shared memory:
//   the main loop decodes r with one table load, no integer division.
// - Persistent tile loop (grid = min(tiles, SMs)), tiles in filter-fastest order so a
//   position tile's gathers are L2 hits after the first; the pipeline state runs on across tiles,
//   so the producer prefetches the next tile while the consumers run this tile's epilogue.
// - Fused epilogue straight from the wgmma accumulator fragments: bias, ReLU, cast, each output
//   element written once (NTHWK, i.e. (N, K, T', H', W') in channels_last_3d memory).
// - Split-K for layers whose 128x128 tiles leave SMs idle (the 14x14 / 7x7 layers at batch 32,
//   the multires streams): the persistent loop runs over work units (tile, reduction slice);
//   every unit stores its fp32 partial tile to a workspace and arrives on a per-tile counter
//   (release fence, atomic), and the last to arrive (acquire fence) sums the slices in slice
//   order and runs the epilogue once. No unit waits for another (no co-residency assumption),
//   and the sum order is fixed, so results are the same whichever unit finishes last.
//   split_k = 1 skips all of it: the same code path and results as without split-K.
// - Grouped launch: two problems of identical sizes with their own input, weight, bias and
//   output (the multires fovea and context streams) in one persistent launch, their work units
//   interleaved in one schedule (Sm90Second holds the second problem's pointers); one problem is
//   the plain launch.
//
// The per-thread pieces (tap table, producer address arithmetic and operand selection, the
// swizzle, the descriptors, pipeline stage/phase bookkeeping, accumulator -> output mapping,
// the weight repack, the whole block routine) are __host__ __device__:
// tools/emulate_st_conv_sm90.py runs every thread of a block as a host thread through
// sm90_block() itself, with the hardware pieces (mbarrier phases and transaction bytes, wgmma and
// its fragment layout, the 128B swizzle, cp.async, cp.async.bulk) modelled from the PTX ISA by
// tools/emulate_st_conv_sm90.cu behind the VIDCONV_SM90_HOST_MODEL hooks below.
//
// For targets other than sm_90a the kernel body is a trap and the launcher reports kSm90NotBuilt
// (it checks which binary the runtime would load), so the file compiles for sm_80 too.
#include "cuda/st_conv3d_sm90_kernel.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <atomic>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__CUDA_ARCH__)
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define ST90_HOPPER 1
#else
#define ST90_OTHER_DEVICE 1
#endif
#endif

#ifdef __CUDA_ARCH__
#define ST90_UNROLL _Pragma("unroll")
#else
#define ST90_UNROLL
#endif

namespace vidconv {
namespace cuda {

#if !defined(__CUDA_ARCH__) && defined(VIDCONV_SM90_HOST_MODEL)
// The hardware the host emulation models (tools/emulate_st_conv_sm90.cu defines these). Without
// VIDCONV_SM90_HOST_MODEL the host side of the PTX wrappers aborts: nothing but the emulator
// runs the kernel's code on the host.
namespace sm90_host_model {
uint32_t smem_address(const void* p);
void block_sync();
void mbar_init(uint64_t* bar, int count);
void mbar_arrive(uint64_t* bar);
void mbar_arrive_cp_async(uint64_t* bar);
void mbar_arrive_expect_tx(uint64_t* bar, int bytes);
void bulk_copy(void* dst, const void* src, int bytes, uint64_t* bar);
void mbar_wait(uint64_t* bar, unsigned parity);
void fence_proxy_async();
void wgmma_fence();
void wgmma_m64n128k16(float* d, uint64_t desc_a, uint64_t desc_b, bool bf16);
void wgmma_commit();
void wgmma_wait(int pending);
void consumer_sync();
bool consumer_sync_or(bool value);
void fence_gpu();
unsigned atomic_add(unsigned* counter, unsigned value);
void partial_store(float* dst, const float (&v)[4]);
void partial_load(const float* src, float (&v)[4]);
}  // namespace sm90_host_model
#define ST90_HOST(call) sm90_host_model::call
#else
#define ST90_HOST(call) std::abort()
#endif

// Named, not anonymous: the sm_80 pass compiles the helpers without using them (the kernel body
// is a trap there), which an anonymous namespace would turn into unused-function errors.
namespace sm90 {

constexpr int kBM = 128, kBN = 128, kBK = 64;  // kBK 16-bit elements = one 128-byte row
constexpr int kStages = 4;
constexpr int kMaxSplitK = 16;  // sm90_status_message quotes this limit
constexpr int kMaxGroup = 2;    // problems of one grouped launch (the two multires streams)
constexpr int kVec = 8;                          // 16-bit elements per 16-byte copy
constexpr int kVecPerRow = kBK / kVec;           // 8 chunks of 16 bytes per swizzle row
constexpr int kProducerThreads = 128, kConsumerThreads = 256;
constexpr int kThreads = kProducerThreads + kConsumerThreads;
constexpr int kRowBytes = kBK * 2;                                  // 128
constexpr int kOperandBytes = kBM * kRowBytes;                      // 16 KiB (A; B the same)
constexpr int kStageBytes = 2 * kOperandBytes;                      // 32 KiB
constexpr int kBarrierOffset = kStages * kStageBytes;               // full[], then empty[]
constexpr int kTableOffset = kBarrierOffset + 2 * kStages * 8;
constexpr int kSmemAlign = 1024;  // the 128B swizzle pattern repeats every 8 rows = 1024 bytes
constexpr int kMaxSmemBytes = 232448;  // sm_90 opt-in maximum per block (227 KiB)
constexpr int kMaxTableEntries = (kMaxSmemBytes - kSmemAlign - kTableOffset) / 8;
static_assert(kMaxTableEntries == 12536, "sm90_status_message quotes this limit");
static_assert(kBN == kBM, "the producer loads A and B rows with the same thread map");
static_assert(kProducerThreads % kVecPerRow == 0 && kBM % (kProducerThreads / kVecPerRow) == 0,
              "producer thread map");

// ---- PTX wrappers (host: the emulator's model) -----------------------------------------------

__host__ __device__ __forceinline__ uint32_t smem_addr(const void* p) {
#if defined(__CUDA_ARCH__)
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
#elif defined(VIDCONV_SM90_HOST_MODEL)
  return sm90_host_model::smem_address(p);
#else
  (void)p;
  std::abort();
#endif
}

__host__ __device__ __forceinline__ void block_sync() {
#if defined(__CUDA_ARCH__)
  __syncthreads();
#else
  ST90_HOST(block_sync());
#endif
}

__host__ __device__ __forceinline__ void mbar_init(uint64_t* bar, int count) {
#if ST90_HOPPER
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count)
               : "memory");
#elif ST90_OTHER_DEVICE
  (void)bar, (void)count;
  __trap();
#else
  (void)bar, (void)count;
  ST90_HOST(mbar_init(bar, count));
#endif
}

// Makes the barrier initialisation visible to the other threads (and the async proxy) before
// the block barrier that follows it.
__host__ __device__ __forceinline__ void fence_mbar_init() {
#if ST90_HOPPER
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#elif ST90_OTHER_DEVICE
  __trap();
#endif
}

__host__ __device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
#if ST90_HOPPER
  asm volatile(
      "{\n .reg .b64 state;\n mbarrier.arrive.shared::cta.b64 state, [%0];\n}\n" ::"r"(
          smem_addr(bar))
      : "memory");
#elif ST90_OTHER_DEVICE
  (void)bar;
  __trap();
#else
  (void)bar;
  ST90_HOST(mbar_arrive(bar));
#endif
}

// One arrival on `bar` once every cp.async this thread issued so far has landed (.noinc: the
// arrival is one of the count given at init, not an extra one).
__host__ __device__ __forceinline__ void cp_async_arrive(uint64_t* bar) {
#if ST90_HOPPER
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(smem_addr(bar))
               : "memory");
#elif ST90_OTHER_DEVICE
  (void)bar;
  __trap();
#else
  (void)bar;
  ST90_HOST(mbar_arrive_cp_async(bar));
#endif
}

// One arrival on `bar` that also makes the phase wait for `bytes` more bytes of bulk copies.
__host__ __device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, int bytes) {
#if ST90_HOPPER
  asm volatile(
      "{\n .reg .b64 state;\n mbarrier.arrive.expect_tx.shared::cta.b64 state, [%0], %1;\n}\n" ::
          "r"(smem_addr(bar)),
      "r"(bytes)
      : "memory");
#elif ST90_OTHER_DEVICE
  (void)bar, (void)bytes;
  __trap();
#else
  (void)bar, (void)bytes;
  ST90_HOST(mbar_arrive_expect_tx(bar, bytes));
#endif
}

// Bulk copy (the TMA engine, no tensor map) of `bytes` contiguous bytes global -> shared; its
// completion counts the bytes off `bar`'s transaction count.
__host__ __device__ __forceinline__ void bulk_copy(void* dst, const void* src, int bytes,
                                                   uint64_t* bar) {
#if ST90_HOPPER
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::
          "r"(smem_addr(dst)),
      "l"(src), "r"(bytes), "r"(smem_addr(bar))
      : "memory");
#elif ST90_OTHER_DEVICE
  (void)dst, (void)src, (void)bytes, (void)bar;
  __trap();
#else
  (void)dst, (void)src, (void)bytes, (void)bar;
  ST90_HOST(bulk_copy(dst, src, bytes, bar));
#endif
}

// Blocks until the barrier's phase of parity `parity` has completed (a fresh barrier counts its
// phase "-1", parity 1, as completed).
__host__ __device__ __forceinline__ void mbar_wait(uint64_t* bar, unsigned parity) {
#if ST90_HOPPER
  const uint32_t addr = smem_addr(bar);
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        " selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(addr), "r"(parity)
        : "memory");
  } while (done == 0);
#elif ST90_OTHER_DEVICE
  (void)bar, (void)parity;
  __trap();
#else
  (void)bar, (void)parity;
  ST90_HOST(mbar_wait(bar, parity));
#endif
}

// 16-byte async copy global -> shared; valid = false writes 16 zero bytes.
__host__ __device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
#if defined(__CUDA_ARCH__)
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 16 : 0)
               : "memory");
#else
  // The emulator's cp.async lands at once; the mbarrier model then orders it like the hardware.
  if (valid) {
    std::memcpy(dst, src, 16);
  } else {
    std::memset(dst, 0, 16);
  }
#endif
}

__host__ __device__ __forceinline__ void cp_async_wait_all() {
#if defined(__CUDA_ARCH__)
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

// cp.async writes through the generic proxy, wgmma reads through the async proxy.
__host__ __device__ __forceinline__ void fence_proxy_async() {
#if ST90_HOPPER
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#elif ST90_OTHER_DEVICE
  __trap();
#else
  ST90_HOST(fence_proxy_async());
#endif
}

__host__ __device__ __forceinline__ void wgmma_fence() {
#if ST90_HOPPER
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#elif ST90_OTHER_DEVICE
  __trap();
#else
  ST90_HOST(wgmma_fence());
#endif
}

__host__ __device__ __forceinline__ void wgmma_commit() {
#if ST90_HOPPER
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#elif ST90_OTHER_DEVICE
  __trap();
#else
  ST90_HOST(wgmma_commit());
#endif
}

// Waits until at most `kPending` committed wgmma groups of this thread are still in flight.
template <int kPending>
__host__ __device__ __forceinline__ void wgmma_wait() {
#if ST90_HOPPER
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
#elif ST90_OTHER_DEVICE
  __trap();
#else
  ST90_HOST(wgmma_wait(kPending));
#endif
}

// Keeps the compiler from moving accumulator reads/writes across the asynchronous wgmma.
__host__ __device__ __forceinline__ void fence_accumulator(float (&d)[64]) {
#if defined(__CUDA_ARCH__)
ST90_UNROLL
  for (int i = 0; i < 64; ++i) {
    asm volatile("" : "+f"(d[i])::"memory");
  }
#else
  (void)d;
#endif
}

#if ST90_HOPPER
#define ST90_WGMMA_REGS                                                                        \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
  "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, "  \
  "%38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, "  \
  "%56, %57, %58, %59, %60, %61, %62, %63}"
#define ST90_WGMMA_OUTS                                                                       \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),          \
      "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),  \
      "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]),            \
      "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]),            \
      "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),            \
      "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]),            \
      "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]),            \
      "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]),            \
      "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),            \
      "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]),            \
      "+f"(d[62]), "+f"(d[63])
#endif

template <typename T>
struct Wgmma;

// D[64 x 128] += A[64 x 16] * B[128 x 16]^T, both operands K-major in shared memory (no
// transpose), scale-d 1 (the accumulator is zeroed per tile), fp32 accumulation.
template <>
struct Wgmma<__nv_bfloat16> {
  __host__ __device__ __forceinline__ static void run(float (&d)[64], uint64_t da, uint64_t db) {
#if ST90_HOPPER
    asm volatile("wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " ST90_WGMMA_REGS
                 ", %64, %65, 1, 1, 1, 0, 0;\n"
                 : ST90_WGMMA_OUTS
                 : "l"(da), "l"(db));
#elif ST90_OTHER_DEVICE
    (void)d, (void)da, (void)db;
    __trap();
#else
    (void)d, (void)da, (void)db;
    ST90_HOST(wgmma_m64n128k16(d, da, db, true));
#endif
  }
};

template <>
struct Wgmma<__half> {
  __host__ __device__ __forceinline__ static void run(float (&d)[64], uint64_t da, uint64_t db) {
#if ST90_HOPPER
    asm volatile("wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 " ST90_WGMMA_REGS
                 ", %64, %65, 1, 1, 1, 0, 0;\n"
                 : ST90_WGMMA_OUTS
                 : "l"(da), "l"(db));
#elif ST90_OTHER_DEVICE
    (void)d, (void)da, (void)db;
    __trap();
#else
    (void)d, (void)da, (void)db;
    ST90_HOST(wgmma_m64n128k16(d, da, db, false));
#endif
  }
};

// ---- split-K handshake: named barrier, gpu-scope fence and atomic, L2 partials ----------------

// The 256 consumer threads only (named barrier 1; the producer warpgroup never waits on it).
__host__ __device__ __forceinline__ void consumer_sync() {
#if ST90_HOPPER
  asm volatile("bar.sync 1, 256;\n" ::: "memory");
#elif ST90_OTHER_DEVICE
  __trap();
#else
  ST90_HOST(consumer_sync());
#endif
}

// consumer_sync() that also returns whether `value` was true in any consumer thread.
__host__ __device__ __forceinline__ bool consumer_sync_or(bool value) {
#if ST90_HOPPER
  uint32_t any = 0;
  asm volatile(
      "{\n .reg .pred p, q;\n setp.ne.u32 q, %1, 0;\n bar.red.or.pred p, 1, 256, q;\n"
      " selp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(any)
      : "r"(static_cast<uint32_t>(value))
      : "memory");
  return any != 0;
#elif ST90_OTHER_DEVICE
  (void)value;
  __trap();
  return false;
#elif defined(VIDCONV_SM90_HOST_MODEL)
  return sm90_host_model::consumer_sync_or(value);
#else
  (void)value;
  std::abort();
#endif
}

// Orders this thread's (and, after a barrier, its block's) global accesses before / after the
// ones that follow, at GPU scope: the release before a tile counter arrival and the acquire after
// the last one.
__host__ __device__ __forceinline__ void fence_gpu() {
#if ST90_HOPPER
  asm volatile("fence.acq_rel.gpu;\n" ::: "memory");
#elif ST90_OTHER_DEVICE
  __trap();
#else
  ST90_HOST(fence_gpu());
#endif
}

__host__ __device__ __forceinline__ unsigned atomic_add_gpu(unsigned* counter, unsigned value) {
#if ST90_HOPPER
  return atomicAdd(counter, value);
#elif ST90_OTHER_DEVICE
  (void)counter, (void)value;
  __trap();
  return 0;
#elif defined(VIDCONV_SM90_HOST_MODEL)
  return sm90_host_model::atomic_add(counter, value);
#else
  (void)counter, (void)value;
  std::abort();
#endif
}

// Four fp32 partial sums to / from the workspace, cached in L2 only (.cg): another SM reads them.
__host__ __device__ __forceinline__ void partial_store(float* dst, const float (&v)[4]) {
#if ST90_HOPPER
  __stcg(reinterpret_cast<float4*>(dst), make_float4(v[0], v[1], v[2], v[3]));
#elif ST90_OTHER_DEVICE
  (void)dst, (void)v;
  __trap();
#else
  (void)dst, (void)v;
  ST90_HOST(partial_store(dst, v));
#endif
}

__host__ __device__ __forceinline__ void partial_load(const float* src, float (&v)[4]) {
#if ST90_HOPPER
  const float4 f = __ldcg(reinterpret_cast<const float4*>(src));
  v[0] = f.x, v[1] = f.y, v[2] = f.z, v[3] = f.w;
#elif ST90_OTHER_DEVICE
  (void)src, (void)v;
  __trap();
#else
  (void)src, (void)v;
  ST90_HOST(partial_load(src, v));
#endif
}

// ---- layout: swizzle, descriptors, shared-memory map -------------------------------------------

// Byte offset, within an operand tile, of 16-byte chunk `chunk` (0-7) of row `row` in the 128B
// swizzle: the chunk index is XORed with the row's position in its 8-row (1024-byte) group.
// The tile must start 1024-byte aligned for this to match what wgmma reads.
__host__ __device__ __forceinline__ int sw128_offset(int row, int chunk) {
  return row * kRowBytes + ((chunk ^ (row & 7)) << 4);
}

// Shared-memory matrix descriptor of a K-major 128B-swizzled operand starting at shared address
// `addr`: start address >> 4 (bits 0-13), leading byte offset (bits 16-29; unused for swizzled
// K-major layouts, 1 by convention), stride byte offset 1024 >> 4 between 8-row groups
// (bits 32-45), base offset 0, swizzle mode 1 = 128B (bits 62-63). Moving along K inside the
// 128-byte row is a plain start-address offset: the hardware swizzles absolute address bits.
__host__ __device__ __forceinline__ uint64_t sw128_desc(uint32_t addr) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (uint64_t{1} << 16) |
         (static_cast<uint64_t>(1024 >> 4) << 32) | (uint64_t{1} << 62);
}

__host__ __device__ __forceinline__ int stage_a_offset(int stage) { return stage * kStageBytes; }
__host__ __device__ __forceinline__ int stage_b_offset(int stage) {
  return stage * kStageBytes + kOperandBytes;
}

// Dynamic shared memory a launch needs for a reduction of n_vec 16-byte vectors.
__host__ __device__ __forceinline__ int sm90_smem_bytes(int n_vec) {
  return kSmemAlign + kTableOffset + 8 * n_vec;
}

// The first 1024-byte aligned address at or after `raw` (the dynamic shared memory base is only
// guaranteed 16-byte aligned).
__host__ __device__ __forceinline__ unsigned char* align_smem(unsigned char* raw) {
  return raw + ((kSmemAlign - (smem_addr(raw) & (kSmemAlign - 1))) & (kSmemAlign - 1));
}

// ---- pipeline bookkeeping ----------------------------------------------------------------------

// Which stage the next reduction tile goes through and the parity of that stage's current
// round; producer and consumers each keep one and advance it once per reduction tile, across
// tiles, so both walk the same sequence.
struct PipeState {
  int stage = 0;
  unsigned phase = 0;
  __host__ __device__ __forceinline__ void advance() {
    if (++stage == kStages) {
      stage = 0;
      phase ^= 1u;
    }
  }
};

// Sizes every thread of a launch agrees on, computed once on the host.
struct Sm90Plan {
  int m_total;  // N*T'*H'*W'
  int tiles_n;  // filter tiles per position tile
  int n_tiles;  // tiles of the launch
  int n_vec;    // 16-byte vectors in the reduction, kt*kh*kw*C/8
  int k_tiles;  // reduction tiles, the last one ragged
  int split_k;  // reduction slices per tile (1: each tile is one work unit)
  int groups;   // problems of identical sizes in the launch (1 or 2), each n_tiles tiles
  int n_units;  // work units, groups * n_tiles * split_k
};

// split_k in [1, k_tiles] (sm90_check_split), so that every slice has a reduction tile.
__host__ __device__ __forceinline__ Sm90Plan sm90_plan(const StConvArgs& p, int split_k = 1,
                                                       int groups = 1) {
  Sm90Plan plan{};
  plan.m_total = p.n * p.to * p.ho * p.wo;
  plan.tiles_n = (p.k + kBN - 1) / kBN;
  plan.n_tiles = (plan.m_total + kBM - 1) / kBM * plan.tiles_n;
  plan.n_vec = p.kt * p.kh * p.kw * (p.c / kVec);
  plan.k_tiles = (plan.n_vec + kVecPerRow - 1) / kVecPerRow;
  plan.split_k = split_k;
  plan.groups = groups;
  plan.n_units = groups * plan.n_tiles * split_k;
  return plan;
}

// One work unit of the persistent schedule: reduction tiles [kt_begin, kt_end) of tile `tile` of
// problem `group`. Slice-major, then problem, then tile (unit = (slice * groups + group) *
// n_tiles + tile), so with split_k = 1 and one problem the units are today's tiles in today's
// order, and neighbouring blocks still share position tiles. `wtile` = group * n_tiles + tile
// numbers the tiles of all problems (workspace slots and counters).
struct WorkUnit {
  int group, tile, wtile, slice, kt_begin, kt_end;
};
__host__ __device__ __forceinline__ WorkUnit work_unit(const Sm90Plan& plan, int unit) {
  WorkUnit u;
  const int tiles_all = plan.groups * plan.n_tiles;
  u.slice = unit / tiles_all;
  u.wtile = unit - u.slice * tiles_all;
  u.group = plan.groups > 1 && u.wtile >= plan.n_tiles ? 1 : 0;
  u.tile = u.wtile - u.group * plan.n_tiles;
  // Balanced slices: sizes differ by at most one reduction tile, none empty when split_k <=
  // k_tiles.
  u.kt_begin = static_cast<int>(static_cast<long long>(u.slice) * plan.k_tiles / plan.split_k);
  u.kt_end = static_cast<int>(static_cast<long long>(u.slice + 1) * plan.k_tiles / plan.split_k);
  return u;
}

struct TileOrigin {
  int m0, n0;
};
// Filter tiles fastest, so consecutive tiles (of one persistent block and of its neighbours)
// share a position tile.
__host__ __device__ __forceinline__ TileOrigin tile_origin(int tile, int tiles_n) {
  return {(tile / tiles_n) * kBM, (tile % tiles_n) * kBN};
}

// ---- split-K workspace -------------------------------------------------------------------------
//
// With split_k > 1 every unit writes its fp32 partial tile to the workspace, slot (tile, slice),
// in the consumers' fragment order: float4 j (registers 4j..4j+3) of consumer thread c at
// (j * 256 + c) * 4, so each warp's float4 store covers 512 contiguous bytes. Then one counter
// per tile (zeroed by the launcher on the stream) counts the arrived units; the unit that arrives
// last sums all slices of its tile in slice order (reading its own back too: summing it from the
// registers instead kept a second 64-float array live, 167 registers against 154) and runs the
// epilogue once. Nobody waits for anybody, so no residency assumption and no deadlock; the sum
// order is fixed, so the result does not depend on which unit came last.
constexpr int kTileFloats = kBM * kBN;                  // one fp32 partial tile, 64 KiB
constexpr int kAccVec4 = 64 / 4;                         // float4s per consumer thread
static_assert(kAccVec4 * 4 * kConsumerThreads == kTileFloats, "partial tile layout");

struct Sm90SplitK {
  float* partials;     // groups * n_tiles * split_k * kTileFloats floats, 16-byte aligned
  unsigned* counters;  // groups * n_tiles, zero at launch
};

__host__ __device__ __forceinline__ long long splitk_partial_bytes(const Sm90Plan& plan) {
  return plan.split_k > 1 ? static_cast<long long>(plan.groups) * plan.n_tiles * plan.split_k *
                                kTileFloats * 4
                          : 0;
}

__host__ __device__ __forceinline__ long long splitk_workspace_bytes(const Sm90Plan& plan) {
  return plan.split_k > 1 ? splitk_partial_bytes(plan) + 4LL * plan.groups * plan.n_tiles : 0;
}

// The second problem of a grouped launch (groups = 2): its own input, packed weight, bias and
// output; the first one's are the StConvArgs'. Sizes are the StConvArgs' for both.
struct Sm90Second {
  const void* input;
  const void* weight;
  const float* bias;
  void* out;
};

// Stores unit u's partial tile, arrives on its tile's counter; if it arrived last, replaces acc
// by the tile's full sum (slices in order) and returns true: the caller then runs the epilogue.
// Called by all 256 consumer threads (ctid) together.
__host__ __device__ __forceinline__ bool splitk_combine(const Sm90Plan& plan,
                                                        const Sm90SplitK& ws, const WorkUnit& u,
                                                        int ctid, float (&acc)[64]) {
  const long long tile_base = static_cast<long long>(u.wtile) * plan.split_k * kTileFloats;
  float* own = ws.partials + tile_base + static_cast<long long>(u.slice) * kTileFloats;
ST90_UNROLL
  for (int j = 0; j < kAccVec4; ++j) {
    const float v[4] = {acc[4 * j], acc[4 * j + 1], acc[4 * j + 2], acc[4 * j + 3]};
    partial_store(own + (j * kConsumerThreads + ctid) * 4, v);
  }
  consumer_sync();  // every consumer's stores are ordered before thread 0's release
  bool last = false;
  if (ctid == 0) {
    fence_gpu();  // release: this unit's partials before its arrival
    last = atomic_add_gpu(&ws.counters[u.wtile], 1u) ==
           static_cast<unsigned>(plan.split_k - 1);
    if (last) {
      fence_gpu();  // acquire: the other units' partials, released before their arrivals
    }
  }
  if (!consumer_sync_or(last)) {
    return false;
  }
  // Slice order from the workspace, this unit's own slice included (its stores precede these
  // loads in program order): one fixed sum order, whichever unit got here.
  const float* slots = ws.partials + tile_base + ctid * 4;
ST90_UNROLL
  for (int j = 0; j < kAccVec4; ++j) {
    float sum[4];
    partial_load(slots + j * kConsumerThreads * 4, sum);
    for (int s = 1; s < plan.split_k; ++s) {
      float v[4];
      partial_load(slots + static_cast<long long>(s) * kTileFloats + j * kConsumerThreads * 4, v);
ST90_UNROLL
      for (int e = 0; e < 4; ++e) {
        sum[e] += v[e];
      }
    }
ST90_UNROLL
    for (int e = 0; e < 4; ++e) {
      acc[4 * j + e] = sum[e];
    }
  }
  return true;
}

// ---- packed weight -----------------------------------------------------------------------------
//
// The weight (K, R) is repacked once per launch so that the B operand of filter tile nt and
// reduction tile kt is one contiguous 16 KiB block already in the stage's 128B-swizzled layout
// (zero past K and past the reduction): one bulk copy per stage then fills the whole B tile,
// and the producer threads only gather A.

// Byte offset in the packed weight of 16-byte reduction vector gv of filter kf.
__host__ __device__ __forceinline__ long long packed_weight_offset(const Sm90Plan& plan, int kf,
                                                                   int gv) {
  return (static_cast<long long>(kf / kBN) * plan.k_tiles + gv / kVecPerRow) * kOperandBytes +
         sw128_offset(kf % kBN, gv % kVecPerRow);
}

__host__ __device__ __forceinline__ long long packed_weight_bytes(const Sm90Plan& plan) {
  return static_cast<long long>(plan.tiles_n) * plan.k_tiles * kOperandBytes;
}

// Moves vector gv of filter kf from the (K, kt, kh, kw, C) weight to its packed place.
__host__ __device__ __forceinline__ void pack_weight_vector(const unsigned char* w,
                                                            unsigned char* packed,
                                                            const Sm90Plan& plan, int kf, int gv) {
  const unsigned char* src = w + (static_cast<long long>(kf) * plan.n_vec + gv) * 16;
  *reinterpret_cast<uint4*>(packed + packed_weight_offset(plan, kf, gv)) =
      *reinterpret_cast<const uint4*>(src);
}

__global__ void sm90_pack_weight_kernel(const unsigned char* w, unsigned char* packed,
                                        const Sm90Plan plan, int k) {
  const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < static_cast<long long>(k) * plan.n_vec) {
    pack_weight_vector(w, packed, plan, static_cast<int>(i / plan.n_vec),
                       static_cast<int>(i % plan.n_vec));
  }
}

// ---- per-tap table -----------------------------------------------------------------------------

// One reduction vector r/8: its offset from the window's first input element, and its tap
// (dt | dy << 8 | dx << 16) for the bounds checks.
struct TapEntry {
  int delta;
  int tap;
};

__host__ __device__ __forceinline__ TapEntry tap_entry(const StConvArgs& p, int gv) {
  const int cv_count = p.c / kVec;
  const int cv = gv % cv_count;
  int tap = gv / cv_count;
  const int dx = tap % p.kw;
  tap /= p.kw;
  const int dy = tap % p.kh;
  const int dt = tap / p.kh;
  const long long delta = ((static_cast<long long>(dt) * p.h + dy) * p.w + dx) * p.c +
                          static_cast<long long>(cv) * kVec;
  return {static_cast<int>(delta), dt | (dy << 8) | (dx << 16)};
}

// ---- producer ----------------------------------------------------------------------------------
//
// Producer thread `ptid` owns 16-byte chunk ptid % 8 of rows ptid / 8 + 16 i (i < 8) of the A
// tile. Its rows' output-position decode happens once per tile (start_tile); per reduction tile
// it reads one table entry and issues 8 cp.asyncs. Thread 0 also issues the B tile's bulk copy
// from the packed weight.
template <typename T>
struct Sm90Producer {
  static constexpr int kRowStep = kProducerThreads / kVecPerRow;  // 16
  static constexpr int kRows = kBM / kRowStep;                    // 8
  const T* x;
  const unsigned char* w_packed;
  long long a_base[kRows];  // element offset of the row's window origin (may be "negative")
  int a_t0[kRows], a_h0[kRows], a_w0[kRows];
  long long b_block;  // packed block index of the tile's first reduction tile
  int chunk, row0, n_vec, t, h, wd;
  bool leader;  // issues the B bulk copy

  __host__ __device__ __forceinline__ Sm90Producer(const StConvArgs& p, int ptid)
      : x(static_cast<const T*>(p.input)), w_packed(static_cast<const unsigned char*>(p.weight)) {
    leader = ptid == 0;
    chunk = ptid % kVecPerRow;
    row0 = ptid / kVecPerRow;
    n_vec = p.kt * p.kh * p.kw * (p.c / kVec);
    t = p.t;
    h = p.h;
    wd = p.w;
  }

  // The problem of the next unit (a grouped launch's two share every size).
  __host__ __device__ __forceinline__ void set_problem(const void* input, const void* weight) {
    x = static_cast<const T*>(input);
    w_packed = static_cast<const unsigned char*>(weight);
  }

  __host__ __device__ __forceinline__ void start_tile(const StConvArgs& p, const Sm90Plan& plan,
                                                      int m0, int n0) {
    b_block = static_cast<long long>(n0 / kBN) * plan.k_tiles;
ST90_UNROLL
    for (int i = 0; i < kRows; ++i) {
      const int m = m0 + row0 + i * kRowStep;
      if (m < plan.m_total) {
        int r = m;
        const int ow = r % p.wo;
        r /= p.wo;
        const int oh = r % p.ho;
        r /= p.ho;
        const int ot = r % p.to;
        const int n = r / p.to;
        a_t0[i] = ot * p.st - p.pt;
        a_h0[i] = oh * p.sh - p.ph;
        a_w0[i] = ow * p.sw - p.pw;
        a_base[i] = static_cast<long long>(n) * p.t * p.h * p.w * p.c +
                    ((static_cast<long long>(a_t0[i]) * p.h + a_h0[i]) * p.w + a_w0[i]) * p.c;
      } else {
        // Rows past M read nothing: a start this far out fails every bounds check.
        a_base[i] = 0;
        a_t0[i] = INT_MIN / 2;
        a_h0[i] = 0;
        a_w0[i] = 0;
      }
    }
  }

  // Issues reduction tile `kt`'s copies into the stage at a_tile / b_tile (1024-byte aligned)
  // whose "full" barrier is `full`.
  __host__ __device__ __forceinline__ void load(const TapEntry* table, int kt,
                                                unsigned char* a_tile, unsigned char* b_tile,
                                                uint64_t* full) const {
    if (leader) {
      mbar_arrive_expect_tx(full, kOperandBytes);
      bulk_copy(b_tile, w_packed + (b_block + kt) * kOperandBytes, kOperandBytes, full);
    }
    const int gv = kt * kVecPerRow + chunk;
    const bool in_k = gv < n_vec;
    const TapEntry e = in_k ? table[gv] : TapEntry{0, 0};
    const int dt = e.tap & 0xFF, dy = (e.tap >> 8) & 0xFF, dx = e.tap >> 16;
ST90_UNROLL
    for (int i = 0; i < kRows; ++i) {
      const int ti = a_t0[i] + dt, hi = a_h0[i] + dy, wi = a_w0[i] + dx;
      const bool ok = in_k && static_cast<unsigned>(ti) < static_cast<unsigned>(t) &&
                      static_cast<unsigned>(hi) < static_cast<unsigned>(h) &&
                      static_cast<unsigned>(wi) < static_cast<unsigned>(wd);
      const T* src = ok ? x + a_base[i] + e.delta : x;
      cp_async16(a_tile + sw128_offset(row0 + i * kRowStep, chunk), src, ok);
    }
  }
};

// ---- epilogue ----------------------------------------------------------------------------------

// Row (within the consumer's 64) and column (within the 128) of accumulator register i of
// thread t (0-127) of a warpgroup, the m64nNk16 fp32 D fragment: warp t/32 holds rows 16*warp..
// +15; register pair (i, i+1) sits at row lane/4 (+8 for (i/2) odd), columns 8*(i/4) + 2*(lane%4)
// and the next one.
struct AccPos {
  int row, col;
};
__host__ __device__ __forceinline__ AccPos acc_position(int t, int i) {
  const int warp = t >> 5, lane = t & 31;
  return {warp * 16 + (lane >> 2) + 8 * ((i >> 1) & 1), (i >> 2) * 8 + 2 * (lane & 3) + (i & 1)};
}

template <typename T>
__host__ __device__ __forceinline__ T to_out(float v);
template <>
__host__ __device__ __forceinline__ __half to_out<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__host__ __device__ __forceinline__ __nv_bfloat16 to_out<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Two adjacent outputs of one row; one 32-bit store when K is even (then the pair is aligned:
// columns come in even pairs), else one or two 16-bit stores.
template <typename T>
struct Sm90PairStore {
  T* out;
  T* out_second;  // problem 1's output in a grouped launch
  int k;
  __host__ __device__ __forceinline__ void operator()(int group, int m, int col, float v0,
                                                      float v1, bool has1) const {
    T* dst = (group == 0 ? out : out_second) + static_cast<long long>(m) * k + col;
    if ((k & 1) == 0) {
      uint32_t bits;
      const T pair[2] = {to_out<T>(v0), to_out<T>(v1)};
      std::memcpy(&bits, pair, 4);
      *reinterpret_cast<uint32_t*>(dst) = bits;
    } else {
      dst[0] = to_out<T>(v0);
      if (has1) {
        dst[1] = to_out<T>(v1);
      }
    }
  }
};

template <class Store>
__host__ __device__ __forceinline__ void sm90_epilogue(const StConvArgs& p, int m_total,
                                                       TileOrigin o, int wg, int t,
                                                       const float (&acc)[64], int group,
                                                       const float* bias, const Store& store) {
ST90_UNROLL
  for (int i = 0; i < 64; i += 2) {
    const AccPos pos = acc_position(t, i);
    const int m = o.m0 + wg * 64 + pos.row;
    const int col = o.n0 + pos.col;
    if (m < m_total && col < p.k) {
      const bool has1 = col + 1 < p.k;
      float v0 = acc[i] + (bias ? bias[col] : 0.f);
      float v1 = acc[i + 1] + ((bias && has1) ? bias[col + 1] : 0.f);
      if (p.relu) {
        v0 = fmaxf(v0, 0.f);
        v1 = fmaxf(v1, 0.f);
      }
      store(group, m, col, v0, v1, has1);
    }
  }
}

// ---- the block ---------------------------------------------------------------------------------

template <typename T>
__host__ __device__ __forceinline__ void run_producer(const StConvArgs& p, const Sm90Plan& plan,
                                                      unsigned char* smem,
                                                      const TapEntry* table, uint64_t* full,
                                                      uint64_t* empty, int ptid, int block,
                                                      int grid, const Sm90Second& second) {
  Sm90Producer<T> producer(p, ptid);
  PipeState ps;
  for (int unit = block; unit < plan.n_units; unit += grid) {
    const WorkUnit u = work_unit(plan, unit);
    const TileOrigin o = tile_origin(u.tile, plan.tiles_n);
    if (u.group == 0) {
      producer.set_problem(p.input, p.weight);
    } else {
      producer.set_problem(second.input, second.weight);
    }
    producer.start_tile(p, plan, o.m0, o.n0);
    for (int kt = u.kt_begin; kt < u.kt_end; ++kt) {
      mbar_wait(&empty[ps.stage], ps.phase ^ 1u);  // round 0 passes: the stage starts free
      producer.load(table, kt, smem + stage_a_offset(ps.stage), smem + stage_b_offset(ps.stage),
                    &full[ps.stage]);
      cp_async_arrive(&full[ps.stage]);
      ps.advance();
    }
  }
  cp_async_wait_all();  // nothing in flight when the thread leaves
}

template <typename T, class Store>
__host__ __device__ __forceinline__ void run_consumer(const StConvArgs& p, const Sm90Plan& plan,
                                                      unsigned char* smem, uint64_t* full,
                                                      uint64_t* empty, int ctid, int block,
                                                      int grid, const Sm90SplitK& ws,
                                                      const Sm90Second& second,
                                                      const Store& store) {
  const int wg = ctid / kProducerThreads;  // consumer warpgroup 0 or 1: rows 64*wg .. +63
  const int t = ctid % kProducerThreads;
  float acc[64];
  PipeState ps;       // the stage the next reduction tile arrives in
  PipeState release;  // the oldest stage this thread still reads (one behind ps within a tile)
  for (int unit = block; unit < plan.n_units; unit += grid) {
    const WorkUnit u = work_unit(plan, unit);
    const TileOrigin o = tile_origin(u.tile, plan.tiles_n);
ST90_UNROLL
    for (int i = 0; i < 64; ++i) {
      acc[i] = 0.f;
    }
    for (int kt = u.kt_begin; kt < u.kt_end; ++kt) {
      mbar_wait(&full[ps.stage], ps.phase);
      fence_proxy_async();
      fence_accumulator(acc);
      wgmma_fence();
      const uint32_t a = smem_addr(smem + stage_a_offset(ps.stage) + wg * 64 * kRowBytes);
      const uint32_t b = smem_addr(smem + stage_b_offset(ps.stage));
ST90_UNROLL
      for (int kk = 0; kk < kBK / 16; ++kk) {
        Wgmma<T>::run(acc, sw128_desc(a + kk * 32), sw128_desc(b + kk * 32));
      }
      wgmma_commit();
      // One group stays in flight: the previous reduction tile's is done, so its stage goes
      // back to the producer while this one's multiplies run.
      wgmma_wait<1>();
      fence_accumulator(acc);
      if (kt > u.kt_begin) {
        mbar_arrive(&empty[release.stage]);
        release.advance();
      }
      ps.advance();
    }
    wgmma_wait<0>();
    fence_accumulator(acc);
    mbar_arrive(&empty[release.stage]);
    release.advance();
    if (plan.split_k > 1 && !splitk_combine(plan, ws, u, ctid, acc)) {
      continue;  // another unit of this tile arrives later and writes it
    }
    sm90_epilogue(p, plan.m_total, o, wg, t, acc, u.group, u.group == 0 ? p.bias : second.bias,
                  store);
  }
}

// One block of the persistent launch: thread `tid` of `grid` blocks, block index `block`;
// smem_raw is the dynamic shared memory (sm90_smem_bytes(plan.n_vec) bytes).
template <typename T, class Store>
__host__ __device__ __forceinline__ void sm90_block(const StConvArgs& p, const Sm90Plan& plan,
                                                    unsigned char* smem_raw, int tid, int block,
                                                    int grid, const Sm90SplitK& ws,
                                                    const Sm90Second& second,
                                                    const Store& store) {
  unsigned char* smem = align_smem(smem_raw);
  TapEntry* table = reinterpret_cast<TapEntry*>(smem + kTableOffset);
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + kBarrierOffset);
  uint64_t* empty = full + kStages;
  for (int gv = tid; gv < plan.n_vec; gv += kThreads) {
    table[gv] = tap_entry(p, gv);  // divisions here, once per block, not in the main loop
  }
  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(&full[s], kProducerThreads + 1);  // + the leader's expect_tx arrival
      mbar_init(&empty[s], kConsumerThreads);
    }
    fence_mbar_init();
  }
  block_sync();
  if (tid < kProducerThreads) {
    run_producer<T>(p, plan, smem, table, full, empty, tid, block, grid, second);
  } else {
    run_consumer<T>(p, plan, smem, full, empty, tid - kProducerThreads, block, grid, ws, second,
                    store);
  }
}

// 1 in the binary of a target with the Hopper body (sm_90a), 0 in every other one. A 9.0 device
// also loads an sm_90 (no "a") or sm_80 binary when that is all the extension holds, and an
// sm_90 one reports binaryVersion 90 like sm_90a, so the launcher reads this flag from the
// binary the runtime picked instead.
#if ST90_HOPPER
__device__ int has_hopper_body_flag = 1;
#else
__device__ int has_hopper_body_flag = 0;
#endif

template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
    st_conv3d_sm90_kernel(const StConvArgs p, const Sm90Plan plan, const Sm90SplitK ws,
                          const Sm90Second second) {
#if ST90_HOPPER
  extern __shared__ __align__(16) unsigned char st90_smem[];
  sm90_block<T>(p, plan, st90_smem, static_cast<int>(threadIdx.x), static_cast<int>(blockIdx.x),
                static_cast<int>(gridDim.x), ws, second,
                Sm90PairStore<T>{static_cast<T*>(p.out), static_cast<T*>(second.out), p.k});
#elif defined(__CUDA_ARCH__)
  // Not Hopper: the launcher never starts this (it reports kSm90NotBuilt first).
  (void)p, (void)plan, (void)ws, (void)second;
  __trap();
#endif
}

}  // namespace sm90

using namespace sm90;

const char* sm90_status_message(int status) {
  switch (status) {
    case kSm90Ok: return "ok";
    case kSm90NotBuilt:
      return "the extension was not built with sm_90a code for the Hopper kernel "
             "(TORCH_CUDA_ARCH_LIST must contain 9.0a)";
    case kSm90WrongDevice: return "the Hopper kernel needs a device of compute capability 9.0";
    case kSm90UnsupportedType: return "the Hopper kernel takes float16 or bfloat16 only";
    case kSm90UnsupportedShape:
      return "the Hopper kernel takes kernel extents below 256 and a reduction of at most "
             "12536 8-channel vectors (kt*kh*kw*C/8)";
    case kSm90LaunchFailed: return "a CUDA runtime call before the launch failed";
    case kSm90BadSplit:
      return "split_k must be in [1, 16] and at most the reduction's 64-wide tiles "
             "(kt*kh*kw*C/64, rounded up)";
    case kSm90GroupMismatch:
      return "a grouped launch takes 1 or 2 problems of identical sizes, strides, padding and "
             "activation";
    default: return "unknown status";
  }
}

const char* sm90_tile_name() { return "128x128x64"; }

int sm90_check_shape(const StConvArgs& args, ConvType type) {
  if (type == ConvType::kFloat32) {
    return kSm90UnsupportedType;
  }
  if (args.c % kVec != 0 || args.kt > 255 || args.kh > 255 || args.kw > 255) {
    return kSm90UnsupportedShape;
  }
  const long long n_vec = static_cast<long long>(args.kt) * args.kh * args.kw * (args.c / kVec);
  // The largest table offset, and the weight's last element, must fit in 32 / 64 bits.
  const long long max_delta =
      ((static_cast<long long>(args.kt - 1) * args.h + (args.kh - 1)) * args.w + (args.kw - 1)) *
          args.c + args.c;
  if (n_vec > kMaxTableEntries || max_delta > INT_MAX) {
    return kSm90UnsupportedShape;
  }
  return kSm90Ok;
}

namespace {

// Whether the binary the runtime loads on `device` holds the Hopper body (has_hopper_body_flag),
// read once per device. The read is a synchronous copy; under CUDA graph capture (a first call
// inside torch.cuda.graph) it runs in relaxed capture mode, which permits it.
bool has_hopper_body(int device) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> known[kMaxDevices];  // 0 unknown, 1 yes, 2 no
  if (device < 0 || device >= kMaxDevices) {
    return false;
  }
  int state = known[device].load();
  if (state == 0) {
    cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
    (void)cudaThreadExchangeStreamCaptureMode(&mode);
    int flag = 0;
    const bool read =
        cudaMemcpyFromSymbol(&flag, has_hopper_body_flag, sizeof flag) == cudaSuccess;
    (void)cudaThreadExchangeStreamCaptureMode(&mode);
    if (!read) {
      (void)cudaGetLastError();  // "no kernel image for this device": our answer, not an error
    }
    state = read && flag == 1 ? 1 : 2;
    known[device].store(state);
  }
  return state == 1;
}

}  // namespace

long long sm90_packed_weight_bytes(const StConvArgs& args) {
  return packed_weight_bytes(sm90_plan(args));
}

int sm90_reduction_tiles(const StConvArgs& args) { return sm90_plan(args).k_tiles; }

int sm90_check_split(const StConvArgs& args, int split_k) {
  const Sm90Plan plan = sm90_plan(args);
  if (split_k < 1 || split_k > kMaxSplitK || split_k > plan.k_tiles ||
      static_cast<long long>(plan.n_tiles) * split_k > INT_MAX) {
    return kSm90BadSplit;
  }
  return kSm90Ok;
}

int sm90_choose_split(const StConvArgs& args, int sms) {
  const Sm90Plan plan = sm90_plan(args);
  int split = 1;
  // Double while the tiles leave SMs idle and every slice keeps a full pipeline's worth of
  // reduction tiles (fewer would leave the 4 stages never all in flight).
  while (split * 2 <= kMaxSplitK && static_cast<long long>(plan.n_tiles) * split < sms &&
         plan.k_tiles / (split * 2) >= kStages) {
    split *= 2;
  }
  return split;
}

long long sm90_workspace_bytes(const StConvArgs& args, int split_k, int groups) {
  return sm90_check_split(args, split_k) == kSm90Ok && groups >= 1 && groups <= kMaxGroup
             ? splitk_workspace_bytes(sm90_plan(args, split_k, groups))
             : 0;
}

int sm90_check_group(const StConvArgs* args, int count) {
  if (count < 1 || count > kMaxGroup) {
    return kSm90GroupMismatch;
  }
  for (int g = 1; g < count; ++g) {
    const StConvArgs& a = args[0];
    const StConvArgs& b = args[g];
    const bool same = a.n == b.n && a.c == b.c && a.t == b.t && a.h == b.h && a.w == b.w &&
                      a.k == b.k && a.kt == b.kt && a.kh == b.kh && a.kw == b.kw &&
                      a.st == b.st && a.sh == b.sh && a.sw == b.sw && a.pt == b.pt &&
                      a.ph == b.ph && a.pw == b.pw && a.to == b.to && a.ho == b.ho &&
                      a.wo == b.wo && a.relu == b.relu;
    if (!same) {
      return kSm90GroupMismatch;
    }
  }
  return kSm90Ok;
}

int launch_st_conv3d_sm90_grouped(const StConvArgs* args, int count, ConvType type,
                                  void* const* packed_weights, int split_k, void* workspace,
                                  cudaStream_t stream) {
  if (sm90_check_group(args, count) != kSm90Ok) {
    return kSm90GroupMismatch;
  }
  const int shape = sm90_check_shape(args[0], type);
  if (shape != kSm90Ok) {
    return shape;
  }
  if (sm90_check_split(args[0], split_k) != kSm90Ok ||
      static_cast<long long>(sm90_plan(args[0]).n_tiles) * split_k * count > INT_MAX) {
    return kSm90BadSplit;
  }
  int device = 0, major = 0, minor = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    return kSm90LaunchFailed;
  }
  if (major != 9 || minor != 0) {
    return kSm90WrongDevice;
  }
  if (!has_hopper_body(device)) {
    return kSm90NotBuilt;
  }
  const void* kernel = type == ConvType::kFloat16
                           ? reinterpret_cast<const void*>(&st_conv3d_sm90_kernel<__half>)
                           : reinterpret_cast<const void*>(&st_conv3d_sm90_kernel<__nv_bfloat16>);
  const Sm90Plan plan = sm90_plan(args[0], split_k, count);
  const int smem = sm90_smem_bytes(plan.n_vec);
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem) !=
      cudaSuccess) {
    return kSm90LaunchFailed;
  }
  for (int g = 0; g < count; ++g) {
    if (cudaMemsetAsync(packed_weights[g], 0, static_cast<size_t>(packed_weight_bytes(plan)),
                        stream) != cudaSuccess) {
      return kSm90LaunchFailed;
    }
    const long long vectors = static_cast<long long>(args[g].k) * plan.n_vec;
    sm90_pack_weight_kernel<<<static_cast<int>((vectors + 255) / 256), 256, 0, stream>>>(
        static_cast<const unsigned char*>(args[g].weight),
        static_cast<unsigned char*>(packed_weights[g]), plan, args[g].k);
  }
  Sm90SplitK ws{nullptr, nullptr};
  if (split_k > 1) {
    ws.partials = static_cast<float*>(workspace);
    ws.counters = reinterpret_cast<unsigned*>(static_cast<unsigned char*>(workspace) +
                                              splitk_partial_bytes(plan));
    if (cudaMemsetAsync(ws.counters, 0,
                        sizeof(unsigned) * static_cast<size_t>(plan.groups * plan.n_tiles),
                        stream) != cudaSuccess) {
      return kSm90LaunchFailed;
    }
  }
  StConvArgs packed = args[0];
  packed.weight = packed_weights[0];
  Sm90Second second{nullptr, nullptr, nullptr, nullptr};
  if (count > 1) {
    second = {args[1].input, packed_weights[1], args[1].bias, args[1].out};
  }
  const int grid = plan.n_units < sms ? plan.n_units : sms;
  if (type == ConvType::kFloat16) {
    st_conv3d_sm90_kernel<__half><<<grid, kThreads, smem, stream>>>(packed, plan, ws, second);
  } else {
    st_conv3d_sm90_kernel<__nv_bfloat16><<<grid, kThreads, smem, stream>>>(packed, plan, ws,
                                                                           second);
  }
  return kSm90Ok;
}

int launch_st_conv3d_sm90(const StConvArgs& args, ConvType type, void* packed_weight,
                          int split_k, void* workspace, cudaStream_t stream) {
  return launch_st_conv3d_sm90_grouped(&args, 1, type, &packed_weight, split_k, workspace,
                                       stream);
}

}  // namespace cuda
}  // namespace vidconv

#undef ST90_UNROLL
#undef ST90_HOST
