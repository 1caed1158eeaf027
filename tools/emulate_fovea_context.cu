// Host emulation of csrc/cuda/fovea_context_kernel.cu (no GPU needed): every block and thread of
// a launch is stepped on the CPU through the kernel's own pieces (make_plan, make_band,
// load_phase, store_phase with its 16-byte chunk stores), the block's one barrier modelled by
// running the load phase for all threads before the store phase. Run through
// tools/emulate_fovea_context.py, which prepares the input and compares the outputs with the
// CPU kernel's, bit for bit.
//
// Checked here: each band reads only frame rows it may (y_lo >= 0, y_hi <= H) and stages at most
// the rows the plan made room for; after the load phase every staged byte of every row the
// band reads equals the frame's byte, within the staging area (before the bin tables); the bin
// tables equal the bins; every output element is written exactly once (write counters; outputs
// start as NaN); every 16-byte store is 16-byte aligned.
//
// Usage: emulate_fovea_context TYPE N T H W S CONTEXT CHANNELS_LAST MISALIGN m0 m1 m2 s0 s1 s2 DIR
//   TYPE 0 float32, 1 float16, 2 bfloat16. DIR/clips.bin (N, T, H, W, 3) uint8,
//   DIR/offsets.bin (N, 2) int64, DIR/flip.bin (N) bytes. MISALIGN 1: the clips start one byte
//   and the outputs one element past a 16-byte boundary. Writes DIR/fovea.bin (and
//   DIR/context.bin) in TYPE, in the output's memory order.
#include "cuda/fovea_context_kernel.cu"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

using namespace vidconv::cuda;

namespace {

std::vector<int> g_writes[2];
const unsigned char* g_base[2] = {nullptr, nullptr};
size_t g_count[2] = {0, 0};
size_t g_elem = 0;
long long g_misaligned_vec = 0;
long long g_out_of_range = 0;

// The output (0 fovea, 1 context) and element a store lands on.
bool locate(const void* dst, int* which, size_t* index) {
  const auto* p = static_cast<const unsigned char*>(dst);
  for (int o = 0; o < 2; ++o) {
    if (g_base[o] != nullptr && p >= g_base[o] && p < g_base[o] + g_count[o] * g_elem) {
      *which = o;
      *index = static_cast<size_t>(p - g_base[o]) / g_elem;
      return true;
    }
  }
  return false;
}

struct CountingStore {
  template <typename T>
  void one(T* dst, T v) const {
    int o;
    size_t i;
    if (!locate(dst, &o, &i)) {
      ++g_out_of_range;
      return;
    }
    ++g_writes[o][i];
    *dst = v;
  }
  void vec(uint4* dst, uint4 v) const {
    if (reinterpret_cast<uintptr_t>(dst) % 16 != 0) {
      ++g_misaligned_vec;
    }
    int o;
    size_t i;
    const auto* last = reinterpret_cast<const unsigned char*>(dst) + 15;
    int o_last;
    size_t i_last;
    if (!locate(dst, &o, &i) || !locate(last, &o_last, &i_last) || o_last != o) {
      ++g_out_of_range;
      return;
    }
    for (size_t e = 0; e < 16 / g_elem; ++e) ++g_writes[o][i + e];
    memcpy(dst, &v, 16);
  }
};

long long g_bad_stage = 0, g_bad_table = 0, g_bad_band = 0;

template <typename out_t, bool kChannelsLast, Variant kVariant>
void run(const PreprocessArgs& a, const Plan& p) {
  std::vector<uint4> words(p.smem / 16 + 1);
  uint8_t* smem = reinterpret_cast<uint8_t*>(words.data());
  const int64_t blocks = a.n * a.t * p.bands;
  for (int64_t block = 0; block < blocks; ++block) {
    memset(smem, 0xA5, words.size() * 16);  // poison: a byte the load forgets cannot pass
    const Band b = make_band(a, p, block);
    if (b.y_lo < 0 || b.y_hi > a.h || b.y_lo > b.y_hi ||
        (kVariant != Variant::kDirect && b.y_hi - b.y_lo > p.max_rows)) {
      ++g_bad_band;
      continue;
    }
    for (int tid = 0; tid < kThreads; ++tid) {
      load_phase<kVariant>(a, p, b, smem, tid, kThreads);
    }
    // __syncthreads()
    if (kVariant != Variant::kDirect) {
      for (int y = b.y_lo; y < b.y_hi; ++y) {
        const uint8_t* staged = row_ptr<true>(b, p, smem, a, y);
        const uint8_t* frame_row = b.frame + static_cast<int64_t>(y) * a.w * 3 + b.bx0;
        if (staged + (b.bx1 - b.bx0) > smem + p.table_offset) {
          ++g_bad_stage;
          continue;
        }
        for (int x = 0; x < b.bx1 - b.bx0; ++x) g_bad_stage += staged[x] != frame_row[x];
      }
    }
    if (kVariant != Variant::kHalve && a.context != nullptr) {
      const int* xb = reinterpret_cast<const int*>(smem + p.table_offset);
      const int* yb = xb + 2 * a.size;
      const int rows = b.i1 - b.i0;
      for (int j = 0; j < a.size; ++j) {
        g_bad_table += xb[j] != bin_start(j, a.w, a.size);
        g_bad_table += xb[a.size + j] != bin_end(j, a.w, a.size);
      }
      for (int r = 0; r < rows; ++r) {
        g_bad_table += yb[r] != bin_start(b.i0 + r, a.h, a.size);
        g_bad_table += yb[rows + r] != bin_end(b.i0 + r, a.h, a.size);
      }
    }
    for (int tid = 0; tid < kThreads; ++tid) {
      store_phase<out_t, kChannelsLast, kVariant>(a, p, b, smem, tid, kThreads,
                                                  CountingStore{});
    }
  }
}

template <typename out_t, bool kChannelsLast>
void run_variant(const PreprocessArgs& a, const Plan& p) {
  switch (p.variant) {
    case Variant::kHalve:
      run<out_t, kChannelsLast, Variant::kHalve>(a, p);
      break;
    case Variant::kArea:
      run<out_t, kChannelsLast, Variant::kArea>(a, p);
      break;
    case Variant::kDirect:
      run<out_t, kChannelsLast, Variant::kDirect>(a, p);
      break;
  }
}

bool read_file(const char* dir, const char* name, void* dst, size_t bytes) {
  char path[1024];
  snprintf(path, sizeof path, "%s/%s", dir, name);
  FILE* f = fopen(path, "rb");
  const bool ok = f != nullptr && fread(dst, 1, bytes, f) == bytes;
  if (f != nullptr) fclose(f);
  if (!ok) fprintf(stderr, "cannot read %zu bytes from %s\n", bytes, path);
  return ok;
}

bool write_file(const char* dir, const char* name, const void* src, size_t bytes) {
  char path[1024];
  snprintf(path, sizeof path, "%s/%s", dir, name);
  FILE* f = fopen(path, "wb");
  const bool ok = f != nullptr && fwrite(src, 1, bytes, f) == bytes;
  if (f != nullptr) fclose(f);
  if (!ok) fprintf(stderr, "cannot write %s\n", path);
  return ok;
}

template <typename out_t>
int main_typed(PreprocessArgs a, bool misalign, const char* dir) {
  const size_t in_bytes = static_cast<size_t>(a.n) * a.t * a.h * a.w * 3;
  const size_t out_count = static_cast<size_t>(a.n) * 3 * a.t * a.size * a.size;
  const bool with_context = a.context != nullptr;
  std::vector<uint4> in_store(in_bytes / 16 + 2);
  uint8_t* clips = reinterpret_cast<uint8_t*>(in_store.data()) + (misalign ? 1 : 0);
  std::vector<int64_t> offsets(2 * a.n);
  std::vector<unsigned char> flip_bytes(a.n);
  if (!read_file(dir, "clips.bin", clips, in_bytes) ||
      !read_file(dir, "offsets.bin", offsets.data(), offsets.size() * 8) ||
      !read_file(dir, "flip.bin", flip_bytes.data(), flip_bytes.size())) {
    return 2;
  }
  bool* flips = new bool[a.n];
  for (int64_t i = 0; i < a.n; ++i) flips[i] = flip_bytes[i] != 0;
  const size_t shift = misalign ? 1 : 0;
  std::vector<uint4> out_store[2];
  out_t* outs[2] = {nullptr, nullptr};
  for (int o = 0; o < (with_context ? 2 : 1); ++o) {
    out_store[o].assign((out_count + shift) * sizeof(out_t) / 16 + 2, uint4{});
    outs[o] = reinterpret_cast<out_t*>(out_store[o].data()) + shift;
    memset(outs[o], 0xff, out_count * sizeof(out_t));  // NaN in every output type
    g_writes[o].assign(out_count, 0);
    g_base[o] = reinterpret_cast<const unsigned char*>(outs[o]);
    g_count[o] = out_count;
  }
  g_elem = sizeof(out_t);
  a.clips = clips;
  a.offsets = offsets.data();
  a.flip = flips;
  a.fovea = outs[0];
  a.context = with_context ? outs[1] : nullptr;
  const Plan plan = make_plan(a);
  if (plan.smem > kSmemMax || plan.rows_per_band < 1 || plan.bands * plan.rows_per_band < a.size) {
    fprintf(stderr, "bad plan: smem %d rows_per_band %d bands %d\n", plan.smem,
            plan.rows_per_band, plan.bands);
    return 3;
  }
  if (a.channels_last) {
    run_variant<out_t, true>(a, plan);
  } else {
    run_variant<out_t, false>(a, plan);
  }
  long long unwritten = 0, rewritten = 0;
  for (int o = 0; o < (with_context ? 2 : 1); ++o) {
    for (int w : g_writes[o]) {
      unwritten += w == 0;
      rewritten += w > 1;
    }
    if (!write_file(dir, o == 0 ? "fovea.bin" : "context.bin", outs[o],
                    out_count * sizeof(out_t))) {
      return 2;
    }
  }
  delete[] flips;
  printf("variant=%d bands=%d rows_per_band=%d smem=%d outputs=%zu bad_band=%lld "
         "bad_stage=%lld bad_table=%lld unwritten=%lld rewritten=%lld misaligned_vec=%lld "
         "out_of_range=%lld\n",
         static_cast<int>(plan.variant), plan.bands, plan.rows_per_band, plan.smem,
         out_count * (with_context ? 2 : 1), g_bad_band, g_bad_stage, g_bad_table, unwritten,
         rewritten, g_misaligned_vec, g_out_of_range);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 17) {
    fprintf(stderr,
            "usage: %s TYPE N T H W S CONTEXT CHANNELS_LAST MISALIGN m0 m1 m2 s0 s1 s2 DIR\n",
            argv[0]);
    return 2;
  }
  PreprocessArgs a{};
  const int type = atoi(argv[1]);
  a.n = atoll(argv[2]);
  a.t = atoll(argv[3]);
  a.h = atoi(argv[4]);
  a.w = atoi(argv[5]);
  a.size = atoi(argv[6]);
  const bool with_context = atoi(argv[7]) != 0;
  a.channels_last = atoi(argv[8]) != 0;
  const bool misalign = atoi(argv[9]) != 0;
  for (int c = 0; c < 3; ++c) {
    // The launcher's constants: float(mean), 1.0f / float(std).
    a.mean[c] = static_cast<float>(atof(argv[10 + c]));
    a.inv_std[c] = 1.0f / static_cast<float>(atof(argv[13 + c]));
  }
  // Any non-null pointer marks "with context" until main_typed sets the real one.
  static char marker;
  a.context = with_context ? &marker : nullptr;
  a.out_type = static_cast<OutType>(type);
  switch (a.out_type) {
    case OutType::kFloat32:
      return main_typed<float>(a, misalign, argv[16]);
    case OutType::kFloat16:
      return main_typed<__half>(a, misalign, argv[16]);
    case OutType::kBFloat16:
      return main_typed<__nv_bfloat16>(a, misalign, argv[16]);
  }
  fprintf(stderr, "unknown TYPE %d\n", type);
  return 2;
}
