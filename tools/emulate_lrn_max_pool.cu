// Host emulation of csrc/cuda/lrn_max_pool_kernel.cu (no GPU needed): every block and thread of
// a launch is stepped on the CPU through the kernel's own pieces (make_plan, thread_setup,
// write_pads, load_element, normalize_element, store_outputs), the two barriers of each window
// element modelled by running a phase for all threads of the block before the next. Run through
// tools/emulate_lrn_max_pool.py, which prepares the input and compares the output with PyTorch.
//
// Checked here: after every load phase, every shared-memory entry of every active position's
// row holds exactly the square (in the accumulator type) of the input channel it stands for, or
// zero in the padding; every output element is written exactly once; the plan's block shape
// (threads, shared memory) stays within what the launcher may launch.
//
// Usage: emulate_lrn_max_pool TYPE N T C H W kh kw size alpha beta k ceil_mode misalign DIR
//   TYPE 0 float32, 1 float16, 2 bfloat16, 3 float64. DIR/x.bin (N, T, H, W, C) in TYPE.
//   misalign 1: the input and output start one element past a 16-byte boundary (the scalar
//   path). Writes DIR/out.bin (N, T, H', W', C) in TYPE, starting from 0xFF bytes (NaN).
#include "cuda/lrn_max_pool_kernel.cu"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

using namespace vidconv::cuda;
using namespace vidconv::cuda::lrn_pool;

namespace {

std::vector<int> g_writes;
long long g_bad_smem = 0;
const unsigned char* g_out_base = nullptr;
size_t g_elem = 0;

struct CountingStore {
  template <typename T>
  void operator()(T* dst, T v) const {
    ++g_writes[(reinterpret_cast<const unsigned char*>(dst) - g_out_base) / sizeof(T)];
    *dst = v;
  }
  void vec(uint4* dst, uint4 v) const {
    if (reinterpret_cast<uintptr_t>(dst) % 16 != 0) {
      fprintf(stderr, "misaligned 16-byte store\n");
      exit(3);
    }
    const size_t first = (reinterpret_cast<const unsigned char*>(dst) - g_out_base) / g_elem;
    for (size_t e = 0; e < 16 / g_elem; ++e) ++g_writes[first + e];
    *dst = v;
  }
};

bool same_bits(double a, double b) { return std::memcmp(&a, &b, sizeof a) == 0; }
bool same_bits(float a, float b) { return std::memcmp(&a, &b, sizeof a) == 0; }

template <typename T, typename Acc, int L, bool kVector>
void run(const LrnPoolArgs& a, const Plan& plan) {
  std::vector<Acc> smem(plan.smem_bytes / sizeof(Acc));
  const T* x = static_cast<const T*>(a.x);
  for (int64_t block = 0; block < plan.blocks; ++block) {
    // Poison, so an entry the kernel forgets to write cannot pass as zero.
    std::memset(smem.data(), 0x7f, smem.size() * sizeof(Acc));
    std::vector<ThreadState<T, Acc, L>> threads;
    for (int tid = 0; tid < plan.threads; ++tid) {
      threads.push_back(thread_setup<T, Acc, L>(a, plan, block, tid));
    }
    for (int tid = 0; tid < plan.threads; ++tid) {
      write_pads(plan, a.c, tid, plan.threads, smem.data());
    }
    for (int e = 0; e < a.kh * a.kw; ++e) {
      for (auto& s : threads) load_element<T, Acc, L, kVector>(a, plan, e, s, smem.data());
      // __syncthreads(): check the rows of positions that load this element.
      for (int p = 0; p < plan.positions; ++p) {
        const int64_t m = block * plan.positions + p;
        if (m >= plan.outputs) continue;
        const int j = static_cast<int>(m % a.wo), i = static_cast<int>((m / a.wo) % a.ho);
        const int64_t frame = m / a.wo / a.ho;
        const int hh = i * a.kh + e / a.kw, ww = j * a.kw + e % a.kw;
        if (hh >= a.h || ww >= a.w) continue;
        const T* px = x + ((frame * a.h + hh) * a.w + ww) * a.c;
        for (int q = 0; q < plan.row; ++q) {
          const int ch = q - plan.lo;
          Acc want = Acc(0);
          if (ch >= 0 && ch < a.c) {
            const Acc v = to_acc(px[ch]);
            want = v * v;
          }
          g_bad_smem += !same_bits(smem[p * plan.row + q], want);
        }
      }
      for (auto& s : threads) normalize_element<T, Acc, L>(a, plan, s, smem.data());
      // __syncthreads()
    }
    for (auto& s : threads) store_outputs<T, Acc, L, kVector>(a, s, CountingStore{});
  }
}

template <typename T, typename Acc>
int main_typed(LrnPoolArgs a, const char* dir, bool misalign) {
  const size_t in_count = static_cast<size_t>(a.frames) * a.h * a.w * a.c;
  const size_t out_count = static_cast<size_t>(a.frames) * a.ho * a.wo * a.c;
  const size_t shift = misalign ? 1 : 0;
  // 16-byte aligned storage; `shift` elements in for the misaligned case.
  std::vector<uint4> in_store((in_count + shift) * sizeof(T) / 16 + 2);
  std::vector<uint4> out_store((out_count + shift) * sizeof(T) / 16 + 2);
  T* x = reinterpret_cast<T*>(in_store.data()) + shift;
  T* out = reinterpret_cast<T*>(out_store.data()) + shift;
  char path[1024];
  snprintf(path, sizeof path, "%s/x.bin", dir);
  FILE* f = fopen(path, "rb");
  if (f == nullptr || fread(x, sizeof(T), in_count, f) != in_count) {
    fprintf(stderr, "cannot read %zu elements from %s\n", in_count, path);
    return 2;
  }
  fclose(f);
  std::memset(out, 0xff, out_count * sizeof(T));
  a.x = x;
  a.out = out;
  Plan plan;
  const char* why = nullptr;
  if (!make_plan(a, &plan, &why)) {
    printf("refused=1 why=%s\n", why);
    return 0;
  }
  if (plan.threads > kMaxThreads || plan.threads % 32 != 0 || plan.smem_bytes > kMaxSmem ||
      plan.groups * plan.positions > plan.threads) {
    fprintf(stderr, "bad plan: threads %d smem %d\n", plan.threads, plan.smem_bytes);
    return 3;
  }
  g_writes.assign(out_count, 0);
  g_out_base = reinterpret_cast<const unsigned char*>(out);
  g_elem = sizeof(T);
  constexpr int L = 16 / sizeof(T);
  if (plan.vector) {
    run<T, Acc, L, true>(a, plan);
  } else {
    run<T, Acc, L, false>(a, plan);
  }
  long long unwritten = 0, rewritten = 0;
  for (int w : g_writes) {
    unwritten += w == 0;
    rewritten += w > 1;
  }
  snprintf(path, sizeof path, "%s/out.bin", dir);
  f = fopen(path, "wb");
  if (f == nullptr || fwrite(out, sizeof(T), out_count, f) != out_count) {
    fprintf(stderr, "cannot write %s\n", path);
    return 2;
  }
  fclose(f);
  printf("refused=0 vector=%d threads=%d positions=%d blocks=%lld outputs=%zu bad_smem=%lld "
         "unwritten=%lld rewritten=%lld\n",
         plan.vector ? 1 : 0, plan.threads, plan.positions, static_cast<long long>(plan.blocks),
         out_count, g_bad_smem, unwritten, rewritten);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 16) {
    fprintf(stderr,
            "usage: %s TYPE N T C H W kh kw size alpha beta k ceil_mode misalign DIR\n", argv[0]);
    return 2;
  }
  const int type = atoi(argv[1]);
  LrnPoolArgs a{};
  const int64_t n = atoll(argv[2]), t = atoll(argv[3]);
  a.frames = n * t;
  a.c = atoi(argv[4]);
  a.h = atoi(argv[5]);
  a.w = atoi(argv[6]);
  a.kh = atoi(argv[7]);
  a.kw = atoi(argv[8]);
  a.size = atoi(argv[9]);
  a.alpha_n = atof(argv[10]) / a.size;
  a.beta = atof(argv[11]);
  a.k = atof(argv[12]);
  const bool ceil_mode = atoi(argv[13]) != 0;
  const bool misalign = atoi(argv[14]) != 0;
  a.ho = ceil_mode ? (a.h + a.kh - 1) / a.kh : a.h / a.kh;
  a.wo = ceil_mode ? (a.w + a.kw - 1) / a.kw : a.w / a.kw;
  a.type = static_cast<LrnPoolType>(type);
  switch (a.type) {
    case LrnPoolType::kFloat32:
      return main_typed<float, float>(a, argv[15], misalign);
    case LrnPoolType::kFloat16:
      return main_typed<__half, float>(a, argv[15], misalign);
    case LrnPoolType::kBFloat16:
      return main_typed<__nv_bfloat16, float>(a, argv[15], misalign);
    case LrnPoolType::kFloat64:
      return main_typed<double, double>(a, argv[15], misalign);
  }
  fprintf(stderr, "unknown TYPE %d\n", type);
  return 2;
}
