// The tensor-core forward's CTA body (tensor_core_forward.cuh) run on the CPU, against a brute-force oracle, with
// no GPU: every CUDA thread of a CTA is a fiber, and the warp's collective operations are emulated from their PTX
// definitions (mma.sync m16n8k16: each lane computes its own outputs from the fragments every lane posted, decoded
// with the layout tables of the PTX ISA; ldmatrix.x4 and .trans from the row addresses every lane posted; cp.async
// landing at the wait, its destination poisoned until then;
// __shfl_xor_sync; __syncthreads), so the kernel's fragment bookkeeping, masks,
// online softmax, tile walk and boundary handling are checked here. What only a GPU can check (the real mma unit,
// shared-memory limits, speed) is the `gpu` label's CudaAttentionGpu tests.
// The fibers switch with _setjmp / _longjmp onto other stacks, which glibc's fortified longjmp would refuse.
#undef _FORTIFY_SOURCE
#include <gtest/gtest.h>
#include <setjmp.h>
#include <ucontext.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "kernels/cuda/tensor_core_backward.cuh"
#include "kernels/cuda/tensor_core_forward.cuh"

namespace cpharness::kernels::cuda::detail {
namespace {

// ---- A CTA of fibers ---------------------------------------------------------------------------------------------

// 128 fibers run on this thread; a fiber gives way only while it waits at a barrier. The schedule runs one warp at a
// time as far as it gets (until each of its fibers waits at the CTA barrier or has finished), the warps in a shuffled
// order each round, so one warp runs far ahead of another as real warps can: a shared tile overwritten before another
// warp has read it, or read before the barrier that publishes it, changes the result. A full round in which no fiber
// arrives at a barrier, passes one or finishes is a deadlock (threads that disagree on barriers).
class FiberCta {
 public:
  explicit FiberCta(std::function<void(int)> body) : body_(std::move(body)) {}

  void run() {
    for (int i = 0; i < kThreads; ++i) {
      getcontext(&fiber_[i]);
      fiber_[i].uc_stack.ss_sp = stacks() + size_t(i) * kStack;
      fiber_[i].uc_stack.ss_size = kStack;
      fiber_[i].uc_link = nullptr;  // a fiber never returns from entry(): it jumps back to run()
      makecontext(&fiber_[i], reinterpret_cast<void (*)()>(&FiberCta::entry), 0);
    }
    std::mt19937 order_rng(11);
    int order[kWarps];
    for (int w = 0; w < kWarps; ++w) order[w] = w;
    int finished = 0;
    while (finished < kThreads) {
      const long round_before = progress_;
      std::shuffle(order, order + kWarps, order_rng);
      for (const int w : order) {
        long warp_before;
        do {  // this warp until it makes no more progress on its own
          warp_before = progress_;
          for (int i = w * 32; i < (w + 1) * 32; ++i) {
            if (done_[i]) continue;
            current_ = i;
            running_ = this;
            switch_to(i);
            if (done_[i]) ++finished, ++progress_;
          }
        } while (progress_ != warp_before);
      }
      if (progress_ == round_before) throw std::runtime_error("emulated CTA deadlocked at a barrier");
    }
  }

  void cta_barrier() { wait(cta_arrived_, cta_generation_, kThreads); }
  void warp_barrier(int warp) { wait(warp_arrived_[warp], warp_generation_[warp], 32); }

  // Lane slots the warp collectives exchange through.
  float shfl[kWarps][32];
  uint32_t frag_a[kWarps][32][4];
  uint32_t frag_b[kWarps][32][2];
  const uint16_t* ldmatrix_row[kWarps][32];

 private:
  static constexpr size_t kStack = 256 * 1024;

  static void entry() {
    FiberCta* self = running_;
    const int i = self->current_;
    self->body_(i);
    self->done_[i] = true;
    _longjmp(self->main_jmp_, 1);
  }
  // Switches go through _setjmp / _longjmp, which leave the signal mask alone: swapcontext makes an rt_sigprocmask
  // system call per switch (millions per problem), which was more than half of this test's time. Only a fiber's
  // first start goes through setcontext (its stack was made by makecontext).
  void switch_to(int i) {
    if (_setjmp(main_jmp_)) return;  // the fiber gave way or finished
    if (!started_[i]) {
      started_[i] = true;
      setcontext(&fiber_[i]);
    }
    _longjmp(fiber_jmp_[i], 1);
  }
  void give_way() {  // on fiber current_'s stack
    if (!_setjmp(fiber_jmp_[current_])) _longjmp(main_jmp_, 1);
  }
  void wait(int& arrived, long& generation, int count) {
    const long mine = generation;
    ++progress_;
    if (++arrived == count) {
      arrived = 0;
      ++generation;
      return;
    }
    while (generation == mine) give_way();
  }

  static inline thread_local FiberCta* running_ = nullptr;
  std::function<void(int)> body_;
  // One set of fiber stacks per test thread, kept from CTA to CTA: a fresh 32 MiB per CTA (zeroed, then unmapped)
  // cost more page faults than the emulation itself.
  static char* stacks() {
    static thread_local std::unique_ptr<char[]> pool(new char[size_t(kThreads) * kStack]);
    return pool.get();
  }
  ucontext_t fiber_[kThreads]{};
  jmp_buf main_jmp_{}, fiber_jmp_[kThreads]{};
  bool started_[kThreads] = {}, done_[kThreads] = {};
  int current_ = 0;
  long progress_ = 0;
  int cta_arrived_ = 0;
  long cta_generation_ = 0;
  int warp_arrived_[kWarps] = {};
  long warp_generation_[kWarps] = {};
};

template <bool kBf16>
float from_bits(uint16_t bits) {
  if constexpr (kBf16) {
    __nv_bfloat16 x;
    memcpy(&x, &bits, 2);
    return __bfloat162float(x);
  } else {
    __half x;
    memcpy(&x, &bits, 2);
    return __half2float(x);
  }
}
template <bool kBf16>
uint16_t to_bits(float f) {
  return uint16_t(pack2<kBf16>(f, 0.f) & 0xffffu);
}

// The warp interface of tc_forward_cta, emulated (FiberCta's lane `tid`).
struct EmulatedWarp {
  FiberCta* cta;
  int tid;
  WorkCounters counted{};
  std::vector<std::pair<uint16_t*, const uint16_t*>> pending;  // this thread's copies in flight

  // PTX leaves a thread that exits with a cp.async in flight undefined: every copy must be waited for.
  ~EmulatedWarp() {
    if (!pending.empty()) ADD_FAILURE() << "thread " << tid << " ended with " << pending.size() << " cp.async copies in flight";
  }
  int thread() const { return tid; }
  void sync() { cta->cta_barrier(); }
  // cp.async as late as PTX allows: the 16 bytes land at this thread's wait, and the destination reads as NaN
  // (0xffff in bf16 and fp16) from the copy's start until then, so a read the kernel did not wait and synchronise
  // for, or a copy started while another warp still reads the old tile, changes the result.
  void copy_async_16(uint16_t* shared, const uint16_t* global) {
    if (reinterpret_cast<uintptr_t>(shared) % 16 != 0 || reinterpret_cast<uintptr_t>(global) % 16 != 0)
      ADD_FAILURE() << "cp.async address not 16-byte aligned";
    std::memset(shared, 0xff, 16);
    pending.push_back({shared, global});
  }
  void copy_async_wait_all() {
    for (const auto& [shared, global] : pending) std::memcpy(shared, global, 16);
    pending.clear();
  }
  float shfl_xor(float v, int lane_mask) {
    const int w = tid / 32, lane = tid % 32;
    cta->shfl[w][lane] = v;
    cta->warp_barrier(w);
    const float r = cta->shfl[w][lane ^ lane_mask];
    cta->warp_barrier(w);
    return r;
  }
  // PTX ISA, "ldmatrix": for .x4, threads 8j..8j+7 give the addresses of rows 0..7 of matrix j (16 bytes each,
  // 16-byte aligned); "each thread receives ... row (laneid / 4), elements 2 (laneid % 4) and 2 (laneid % 4) + 1" of
  // every matrix, register j holding matrix j, the lower column in the low half; .trans delivers the transpose (row
  // and column swapped: elements (2 (lane % 4), lane / 4) and (2 (lane % 4) + 1, lane / 4)).
  template <bool kTrans>
  void ldmatrix_x4(uint32_t r[4], const uint16_t* row) {
    const int w = tid / 32, lane = tid % 32;
    if (reinterpret_cast<uintptr_t>(row) % 16 != 0) ADD_FAILURE() << "ldmatrix row address not 16-byte aligned";
    cta->ldmatrix_row[w][lane] = row;
    cta->warp_barrier(w);
    const int g = lane / 4, t = lane % 4;
    for (int j = 0; j < 4; ++j) {
      const uint16_t* const* rows = &cta->ldmatrix_row[w][8 * j];
      const uint16_t lo = kTrans ? rows[2 * t][g] : rows[g][2 * t];
      const uint16_t hi = kTrans ? rows[2 * t + 1][g] : rows[g][2 * t + 1];
      r[j] = uint32_t(lo) | (uint32_t(hi) << 16);
    }
    cta->warp_barrier(w);
  }
  // PTX ISA, "Matrix Fragments for mma.m16n8k16" (.f16 / .bf16 A, B; .f32 C, D), groupID = lane >> 2,
  // threadID_in_group = lane % 4:
  //   A: a_i (i = 0..7), row = groupID for a0, a1, a4, a5, else groupID + 8; col = threadID_in_group * 2 + (i & 1),
  //      + 8 for i >= 4; four .b32 registers hold {a0, a1}, {a2, a3}, {a4, a5}, {a6, a7}, lower element in the low half
  //   B: b_i (i = 0..3), row = threadID_in_group * 2 + (i & 1), + 8 for i >= 2; col = groupID; {b0, b1}, {b2, b3}
  //   C: c_i (i = 0..3), row = groupID for c0, c1, else groupID + 8; col = threadID_in_group * 2 + (i & 1)
  template <bool kBf16>
  void mma(float c[4], const uint32_t a[4], const uint32_t b[2]) {
    const int w = tid / 32, lane = tid % 32;
    for (int r = 0; r < 4; ++r) cta->frag_a[w][lane][r] = a[r];
    for (int r = 0; r < 2; ++r) cta->frag_b[w][lane][r] = b[r];
    cta->warp_barrier(w);
    auto A = [&](int row, int col) {  // which lane, register and half hold A[row][col]
      const int owner = (row % 8) * 4 + (col % 8) / 2;
      const int reg = (row >= 8 ? 1 : 0) + (col >= 8 ? 2 : 0);
      return from_bits<kBf16>(uint16_t(cta->frag_a[w][owner][reg] >> (16 * (col % 2))));
    };
    auto B = [&](int row, int col) {
      const int owner = col * 4 + (row % 8) / 2;
      const int reg = row >= 8 ? 1 : 0;
      return from_bits<kBf16>(uint16_t(cta->frag_b[w][owner][reg] >> (16 * (row % 2))));
    };
    const int g = lane / 4, t = lane % 4;
    for (int i = 0; i < 4; ++i) {
      const int row = g + (i >= 2 ? 8 : 0), col = t * 2 + (i & 1);
      float acc = c[i];
      for (int k = 0; k < 16; ++k) acc += A(row, k) * B(k, col);
      c[i] = acc;
    }
    cta->warp_barrier(w);
  }
  void count_work(WorkCounters* w, unsigned long long score, unsigned long long mask, int32_t partial, int32_t full) {
    w->score_elements += score;
    w->mask_elements += mask;
    w->partial_blocks += (unsigned long long)partial;
    w->full_blocks += (unsigned long long)full;
  }
};

// Runs every CTA of the tensor-core forward's grid, one after another.
template <int D, bool kBf16>
void emulate_forward(const ForwardArgs& a) {
  using T = TcTiles<D>;
  const int64_t nq = (a.mask.q_len + a.mask.q_block - 1) / a.mask.q_block;
  const int64_t subs = (a.mask.q_block + T::kQ - 1) / T::kQ;
  std::vector<uint64_t> smem((T::smem() + 7) / 8);
  for (int64_t bz = 0; bz < a.g.batch; ++bz)
    for (int64_t by = 0; by < a.g.q_heads; ++by)
      for (int64_t bx = 0; bx < nq * subs; ++bx) {
        std::unique_ptr<FiberCta> cta;
        cta = std::make_unique<FiberCta>([&](int tid) {
          EmulatedWarp hw{cta.get(), tid};
          tc_forward_cta<D, kBf16>(a, hw, bx, by, bz, reinterpret_cast<unsigned char*>(smem.data()));
        });
        cta->run();
      }
}

// Runs every CTA of the tensor-core backward's dQ grid, then of its dK/dV grid (delta given by the caller).
template <int D, bool kBf16>
void emulate_backward(const BackwardArgs& a) {
  using Q = TcDqTiles<D>;
  using K = TcDkdvTiles<D>;
  const BlockMaskView& m = a.mask;
  const int64_t nq = (m.q_len + m.q_block - 1) / m.q_block, q_subs = (m.q_block + Q::kQ - 1) / Q::kQ;
  const int64_t nkv = (m.kv_len + m.kv_block - 1) / m.kv_block, kv_subs = (m.kv_block + K::kKV - 1) / K::kKV;
  std::vector<uint64_t> smem((std::max(Q::smem(), K::smem()) + 7) / 8);
  auto cta = [&](auto&& body) {
    std::unique_ptr<FiberCta> c;
    c = std::make_unique<FiberCta>([&](int tid) {
      EmulatedWarp hw{c.get(), tid};
      body(hw);
    });
    c->run();
  };
  auto* sm = reinterpret_cast<unsigned char*>(smem.data());
  for (int64_t bz = 0; bz < a.g.batch; ++bz) {
    for (int64_t by = 0; by < a.g.q_heads; ++by)
      for (int64_t bx = 0; bx < nq * q_subs; ++bx) cta([&](EmulatedWarp& hw) { tc_dq_cta<D, kBf16>(a, hw, bx, by, bz, sm); });
    for (int64_t by = 0; by < a.g.kv_heads; ++by)
      for (int64_t bx = 0; bx < nkv * kv_subs; ++bx)
        cta([&](EmulatedWarp& hw) { tc_dkdv_cta<D, kBf16>(a, hw, bx, by, bz, sm); });
  }
}

template <bool kBf16>
void emulate_backward_any(const BackwardArgs& a) {
  switch (compiled_head_dim(a.g.head_dim)) {
    case 64: return emulate_backward<64, kBf16>(a);
    case 128: return emulate_backward<128, kBf16>(a);
    case 256: return emulate_backward<256, kBf16>(a);
    default: return emulate_backward<512, kBf16>(a);
  }
}

template <bool kBf16>
void emulate_forward_any(const ForwardArgs& a) {
  switch (compiled_head_dim(a.g.head_dim)) {
    case 64: return emulate_forward<64, kBf16>(a);
    case 128: return emulate_forward<128, kBf16>(a);
    case 256: return emulate_forward<256, kBf16>(a);
    default: return emulate_forward<512, kBf16>(a);
  }
}

// ---- The emulated mma against a plain matrix product -------------------------------------------------------------

TEST(TensorCoreEmulation, TheEmulatedMmaIsTheMatrixProductOfTheDocumentedFragments) {
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> u(-2.f, 2.f);
  float A[16][16], B[16][8];
  for (auto& r : A)
    for (auto& x : r) x = from_bits<true>(to_bits<true>(u(rng)));
  for (auto& r : B)
    for (auto& x : r) x = from_bits<true>(to_bits<true>(u(rng)));
  float C[16][8] = {};
  std::unique_ptr<FiberCta> cta;
  cta = std::make_unique<FiberCta>([&](int tid) {
    if (tid >= 32) return;  // one warp (the other warps never meet a barrier)
    EmulatedWarp hw{cta.get(), tid};
    const int g = tid / 4, t = tid % 4;
    const uint32_t a[4] = {pack2<true>(A[g][2 * t], A[g][2 * t + 1]), pack2<true>(A[g + 8][2 * t], A[g + 8][2 * t + 1]),
                           pack2<true>(A[g][2 * t + 8], A[g][2 * t + 9]),
                           pack2<true>(A[g + 8][2 * t + 8], A[g + 8][2 * t + 9])};
    const uint32_t b[2] = {pack2<true>(B[2 * t][g], B[2 * t + 1][g]), pack2<true>(B[2 * t + 8][g], B[2 * t + 9][g])};
    float c[4] = {};
    hw.mma<true>(c, a, b);
    C[g][2 * t] = c[0], C[g][2 * t + 1] = c[1], C[g + 8][2 * t] = c[2], C[g + 8][2 * t + 1] = c[3];
  });
  cta->run();
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 8; ++j) {
      double want = 0;
      for (int k = 0; k < 16; ++k) want += double(A[i][k]) * B[k][j];
      EXPECT_NEAR(C[i][j], want, 1e-4 * (1 + std::abs(want))) << i << "," << j;
    }
}

// The three ldmatrix loaders feed the mma the operands they name: A = rows r0.. of a staged tile, B = rows of a tile
// as columns (S = Q K^T) and B = a tile read down its columns (O += P V), at offsets inside padded tiles.
TEST(TensorCoreEmulation, TheLdmatrixLoadersGiveTheOperandsTheyName) {
  constexpr int kRows = 48, kCols = 64, kStride = kCols + 8;
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> u(-2.f, 2.f);
  alignas(16) static uint16_t tile[kRows * kStride];
  for (auto& x : tile) x = to_bits<true>(u(rng));
  auto at = [&](int r, int c) { return double(from_bits<true>(tile[r * kStride + c])); };
  for (const std::array<int, 3>& offsets : {std::array{0, 0, 0}, std::array{16, 8, 24}, std::array{32, 24, 48}}) {
    const int r0 = offsets[0], n0 = offsets[1], c = offsets[2];
    float rows_by_rows[16][16] = {}, rows_by_down[16][16] = {};
    std::unique_ptr<FiberCta> cta;
    cta = std::make_unique<FiberCta>([&](int tid) {
      if (tid >= 32) return;
      EmulatedWarp hw{cta.get(), tid};
      uint32_t a[4], b[4], d[4];
      fragment_a(hw, a, tile, kStride, r0, c, tid);
      fragment_b_pair(hw, b, tile, kStride, n0, c, tid);
      fragment_b_pair_down(hw, d, tile, kStride, n0, c, tid);
      float s0[4] = {}, s1[4] = {}, v0[4] = {}, v1[4] = {};
      hw.mma<true>(s0, a, b);
      hw.mma<true>(s1, a, b + 2);
      hw.mma<true>(v0, a, d);
      hw.mma<true>(v1, a, d + 2);
      const int g = tid / 4, t = tid % 4;
      for (int e = 0; e < 4; ++e) {
        const int row = g + 8 * (e / 2), col = 2 * t + e % 2;
        rows_by_rows[row][col] = s0[e], rows_by_rows[row][col + 8] = s1[e];
        rows_by_down[row][col] = v0[e], rows_by_down[row][col + 8] = v1[e];
      }
    });
    cta->run();
    for (int i = 0; i < 16; ++i)
      for (int j = 0; j < 16; ++j) {
        double want_rows = 0, want_down = 0;
        for (int k = 0; k < 16; ++k) {
          want_rows += at(r0 + i, c + k) * at(n0 + j, c + k);  // A[i][k] B[k][j], B[k][j] = tile[n0 + j][c + k]
          want_down += at(r0 + i, c + k) * at(n0 + k, c + j);  // B[k][j] = tile[n0 + k][c + j]
        }
        EXPECT_NEAR(rows_by_rows[i][j], want_rows, 1e-4 * (1 + std::abs(want_rows))) << r0 << " " << i << "," << j;
        EXPECT_NEAR(rows_by_down[i][j], want_down, 1e-4 * (1 + std::abs(want_down))) << r0 << " " << i << "," << j;
      }
  }
}

TEST(TensorCoreEmulation, ABarrierOnlySomeThreadsReachIsReportedNotHung) {
  std::unique_ptr<FiberCta> cta;
  cta = std::make_unique<FiberCta>([&](int tid) {
    if (tid % 2) cta->cta_barrier();
  });
  EXPECT_THROW(cta->run(), std::runtime_error);
}

// ---- The forward against a brute-force oracle --------------------------------------------------------------------

struct Problem {
  int64_t batch = 1, q_heads = 1, kv_heads = 1, head_dim = 64, sq = 1, skv = 1;
  int32_t q_block = 32, kv_block = 32, mask_batch = 1;
  int64_t q_start = 0, kv_start = 0, window = 0;
  bool causal = true, has_window = false, vision = false, documents = false, padding = false, bf16 = true;
  bool vision_past_window = false;  // the 5.5 .. 5.12 rule: a group OR'd after the window
  bool out_fp32 = true;
  std::string describe() const {
    return "B" + std::to_string(batch) + " Hq" + std::to_string(q_heads) + " Hkv" + std::to_string(kv_heads) + " D" +
           std::to_string(head_dim) + " Sq" + std::to_string(sq) + " Skv" + std::to_string(skv) + " blocks " +
           std::to_string(q_block) + "x" + std::to_string(kv_block) + " starts " + std::to_string(q_start) + "/" +
           std::to_string(kv_start) + (causal ? " causal" : "") + (has_window ? " window " + std::to_string(window) : "") +
           (vision ? (vision_past_window ? " vision past window" : " vision") : "") + (documents ? " documents" : "") + (padding ? " padding" : "") +
           (bf16 ? " bf16" : " fp16") + (out_fp32 ? " out fp32" : " out 16-bit");
  }
};

// Token metadata as functions of the global index (so q and kv sides agree where their ranges overlap).
int64_t document_of(int64_t x, int64_t run) { return x % 23 == 5 ? 0 : 1 + (x / run) % 3; }
int64_t group_of(int64_t x) { return (x / 6) % 3 == 0 ? x / 6 : -1; }
bool padded(int64_t x, uint64_t seed) { return (x * 2654435761ull + seed) % 7 == 0; }

struct Inputs {
  Problem p;
  std::vector<uint16_t> q, k, v;
  std::vector<int64_t> q_doc, kv_doc, q_grp, kv_grp;
  std::vector<uint8_t> kv_pad;
  int64_t run = 5;
  uint64_t pad_seed = 0;
};

// The 16-bit inputs as doubles by logical index (q, k stored [B, H, S, D]; v stored [B, S, H, D]).
template <bool kBf16>
struct Values {
  const Inputs& in;
  double q(int64_t b, int64_t h, int64_t i, int64_t d) const {
    return from_bits<kBf16>(in.q[size_t(((b * in.p.q_heads + h) * in.p.sq + i) * in.p.head_dim + d)]);
  }
  double k(int64_t b, int64_t hk, int64_t j, int64_t d) const {
    return from_bits<kBf16>(in.k[size_t(((b * in.p.kv_heads + hk) * in.p.skv + j) * in.p.head_dim + d)]);
  }
  double v(int64_t b, int64_t hk, int64_t j, int64_t d) const {
    return from_bits<kBf16>(in.v[size_t(((b * in.p.skv + j) * in.p.kv_heads + hk) * in.p.head_dim + d)]);
  }
};

// The rule, written out again from block_sparse_attention.h's comment (not the kernel's element_allowed).
bool oracle_allowed(const Inputs& in, int64_t mb, int64_t i, int64_t j) {
  const Problem& p = in.p;
  const int64_t q = p.q_start + i, k = p.kv_start + j;
  bool ok = true;
  if (p.causal) ok = k <= q;
  const bool same_group = p.vision && in.q_grp[mb * p.sq + i] >= 0 &&
                          in.q_grp[mb * p.sq + i] == in.kv_grp[mb * p.skv + j];
  if (p.vision_past_window) {
    if (p.has_window) ok = ok && q - k < p.window;
    ok = ok || same_group;
  } else {
    ok = ok || same_group;
    if (p.has_window) ok = ok && q - k < p.window;
  }
  if (p.documents) {
    const int64_t dq = in.q_doc[mb * p.sq + i], dk = in.kv_doc[mb * p.skv + j];
    ok = ok && dq == dk && dq > 0;
  }
  if (p.padding) ok = ok && !in.kv_pad[mb * p.skv + j];
  return ok;
}

// The backward from the oracle's own out and LSE (as the ring hands over the merged ones) and a random dout,
// against dQ = scale dS K, dK = scale dS^T Q, dV = P^T dout computed in double. A bound per element: the tolerance
// times the sum of the absolute terms (P and dS are rounded to the input dtype on the tensor cores).
template <bool kBf16>
void check_backward(const Inputs& in, const ForwardArgs& fwd, std::mt19937_64& rng) {
  const Problem& p = in.p;
  const int64_t D = p.head_dim, G = p.q_heads / p.kv_heads;
  const double scale = fwd.g.scale;
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<uint16_t> dout(size_t(p.batch * p.q_heads * p.sq * D));
  for (auto& e : dout) e = to_bits<kBf16>(normal(rng));
  const Values<kBf16> x{in};
  auto o_at = [&](int64_t b, int64_t h, int64_t i, int64_t d) {
    return double(from_bits<kBf16>(dout[size_t(((b * p.q_heads + h) * p.sq + i) * D + d)]));
  };
  // Oracle P (0 off the mask), its out and LSE, delta; then the gradients and their bounds.
  const size_t nqo = size_t(p.batch * p.q_heads * p.sq), nkvo = size_t(p.batch * p.kv_heads * p.skv);
  std::vector<float> out(nqo * size_t(D), 0.f), lse(nqo, -INFINITY), delta(nqo, 0.f);
  std::vector<double> want_dq(nqo * size_t(D), 0), bound_dq(want_dq.size(), 0);
  std::vector<double> want_dk(nkvo * size_t(D), 0), bound_dk(want_dk.size(), 0), want_dv(want_dk.size(), 0),
      bound_dv(want_dk.size(), 0);
  for (int64_t b = 0; b < p.batch; ++b)
    for (int64_t h = 0; h < p.q_heads; ++h) {
      const int64_t hk = h / G, mb = p.mask_batch == 1 ? 0 : b;
      for (int64_t i = 0; i < p.sq; ++i) {
        const size_t row = size_t((b * p.q_heads + h) * p.sq + i);
        std::vector<double> s(size_t(p.skv), -INFINITY);
        double mx = -INFINITY;
        for (int64_t j = 0; j < p.skv; ++j) {
          if (!oracle_allowed(in, mb, i, j)) continue;
          double dot = 0;
          for (int64_t d = 0; d < D; ++d) dot += x.q(b, h, i, d) * x.k(b, hk, j, d);
          s[size_t(j)] = dot * scale;
          mx = std::max(mx, s[size_t(j)]);
        }
        if (mx == -INFINITY) continue;  // an empty row: lse -inf, out 0, no gradient
        double sum = 0;
        for (double x : s) sum += x == -INFINITY ? 0 : std::exp(x - mx);
        const double l = mx + std::log(sum);
        lse[row] = float(l);
        std::vector<double> P(size_t(p.skv), 0), dP(size_t(p.skv), 0);
        for (int64_t j = 0; j < p.skv; ++j)
          if (s[size_t(j)] != -INFINITY) P[size_t(j)] = std::exp(s[size_t(j)] - double(lse[row]));
        double dlt = 0;
        for (int64_t d = 0; d < D; ++d) {
          double o = 0;
          for (int64_t j = 0; j < p.skv; ++j) o += P[size_t(j)] * x.v(b, hk, j, d);
          out[row * size_t(D) + size_t(d)] = float(o);
          dlt += double(float(o)) * o_at(b, h, i, d);
        }
        delta[row] = float(dlt);
        for (int64_t j = 0; j < p.skv; ++j) {
          if (P[size_t(j)] == 0) continue;
          for (int64_t d = 0; d < D; ++d) dP[size_t(j)] += o_at(b, h, i, d) * x.v(b, hk, j, d);
          const double ds = P[size_t(j)] * (dP[size_t(j)] - double(delta[row]));
          const double ds_abs = P[size_t(j)] * (std::abs(dP[size_t(j)]) + std::abs(double(delta[row])));
          const size_t kv_row = size_t((b * p.kv_heads + hk) * p.skv + j);
          for (int64_t d = 0; d < D; ++d) {
            want_dq[row * size_t(D) + size_t(d)] += scale * ds * x.k(b, hk, j, d);
            bound_dq[row * size_t(D) + size_t(d)] += scale * ds_abs * std::abs(x.k(b, hk, j, d));
            want_dk[kv_row * size_t(D) + size_t(d)] += scale * ds * x.q(b, h, i, d);
            bound_dk[kv_row * size_t(D) + size_t(d)] += scale * ds_abs * std::abs(x.q(b, h, i, d));
            want_dv[kv_row * size_t(D) + size_t(d)] += P[size_t(j)] * o_at(b, h, i, d);
            bound_dv[kv_row * size_t(D) + size_t(d)] += P[size_t(j)] * std::abs(o_at(b, h, i, d));
          }
        }
      }
    }

  BackwardArgs a;
  a.g = fwd.g;
  a.mask = fwd.mask;
  a.q = fwd.q;
  a.k = fwd.k;
  a.v = fwd.v;
  const DType dt = kBf16 ? DType::kBFloat16 : DType::kFloat16;
  a.out = {out.data(), DType::kFloat32, p.q_heads * p.sq * D, p.sq * D, D};
  a.dout = {dout.data(), dt, p.q_heads * p.sq * D, p.sq * D, D};
  a.lse = {lse.data(), p.q_heads * p.sq, p.sq, 1};
  a.delta = {delta.data(), p.q_heads * p.sq, p.sq, 1};
  std::vector<float> dq(want_dq.size(), NAN), dk(want_dk.size(), NAN), dv(want_dk.size(), NAN);
  a.dq = {dq.data(), DType::kFloat32, p.q_heads * p.sq * D, p.sq * D, D};
  a.dk = {dk.data(), DType::kFloat32, p.kv_heads * p.skv * D, p.skv * D, D};
  a.dv = {dv.data(), DType::kFloat32, p.kv_heads * p.skv * D, p.skv * D, D};
  emulate_backward_any<kBf16>(a);

  const double tol = kBf16 ? 1.5e-2 : 3e-3;
  auto expect_close = [&](const char* what, const std::vector<float>& got, const std::vector<double>& want,
                          const std::vector<double>& bound) {
    for (size_t i = 0; i < got.size(); ++i)
      ASSERT_NEAR(got[i], want[i], tol * bound[i] + 1e-6) << what << " element " << i << " (row " << i / size_t(D)
                                                           << ", d " << i % size_t(D) << ")";
  };
  expect_close("dq", dq, want_dq, bound_dq);
  expect_close("dk", dk, want_dk, bound_dk);
  expect_close("dv", dv, want_dv, bound_dv);
}

template <bool kBf16>
void check_problem(const Problem& p, uint64_t seed) {
  SCOPED_TRACE(p.describe());
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.f, 1.f);
  Inputs in;
  in.p = p;
  in.run = 3 + int64_t(rng() % 9);
  in.pad_seed = rng();
  const int64_t D = p.head_dim;
  auto fill = [&](std::vector<uint16_t>& x, int64_t n) {
    x.resize(size_t(n));
    for (auto& e : x) e = to_bits<kBf16>(normal(rng));
  };
  fill(in.q, p.batch * p.q_heads * p.sq * D);
  fill(in.k, p.batch * p.kv_heads * p.skv * D);
  fill(in.v, p.batch * p.kv_heads * p.skv * D);
  for (int64_t mb = 0; mb < p.mask_batch; ++mb) {
    for (int64_t i = 0; i < p.sq; ++i) {
      in.q_doc.push_back(document_of(p.q_start + i + 3 * mb, in.run));
      in.q_grp.push_back(group_of(p.q_start + i + 3 * mb));
    }
    for (int64_t j = 0; j < p.skv; ++j) {
      in.kv_doc.push_back(document_of(p.kv_start + j + 3 * mb, in.run));
      in.kv_grp.push_back(group_of(p.kv_start + j + 3 * mb));
      in.kv_pad.push_back(padded(p.kv_start + j + 3 * mb, in.pad_seed));
    }
  }

  // Block lists by brute force: a tile is full when every valid (row, key) pair is allowed, empty when none is;
  // some full tiles are listed as partial (legal: the rule is then evaluated per element).
  const int64_t nq = (p.sq + p.q_block - 1) / p.q_block, nkv = (p.skv + p.kv_block - 1) / p.kv_block;
  std::vector<int> cls(size_t(p.mask_batch * nq * nkv), 0);  // 0 empty, 1 partial, 2 full
  for (int64_t mb = 0; mb < p.mask_batch; ++mb)
    for (int64_t qb = 0; qb < nq; ++qb)
      for (int64_t kb = 0; kb < nkv; ++kb) {
        int64_t allowed = 0, total = 0;
        for (int64_t i = qb * p.q_block; i < std::min(p.sq, (qb + 1) * p.q_block); ++i)
          for (int64_t j = kb * p.kv_block; j < std::min(p.skv, (kb + 1) * p.kv_block); ++j, ++total)
            allowed += oracle_allowed(in, mb, i, j);
        cls[size_t((mb * nq + qb) * nkv + kb)] = allowed == 0 ? 0 : allowed == total && rng() % 4 != 0 ? 2 : 1;
      }
  // The lists of one major order: rows x (count, indices padded to `cols`).
  auto lists = [&](bool q_major, int want, std::vector<int32_t>& num, std::vector<int32_t>& idx) {
    const int64_t rows = q_major ? nq : nkv, cols = q_major ? nkv : nq;
    for (int64_t mb = 0; mb < p.mask_batch; ++mb)
      for (int64_t r = 0; r < rows; ++r) {
        std::vector<int32_t> row;
        for (int64_t c = 0; c < cols; ++c) {
          const int64_t qb = q_major ? r : c, kb = q_major ? c : r;
          if (cls[size_t((mb * nq + qb) * nkv + kb)] == want) row.push_back(int32_t(c));
        }
        num.push_back(int32_t(row.size()));
        row.resize(size_t(cols), 0);
        idx.insert(idx.end(), row.begin(), row.end());
      }
  };
  std::vector<int32_t> partial_num, full_num, partial_idx, full_idx, partial_q_num, full_q_num, partial_q_idx, full_q_idx;
  lists(true, 1, partial_num, partial_idx);
  lists(true, 2, full_num, full_idx);
  lists(false, 1, partial_q_num, partial_q_idx);
  lists(false, 2, full_q_num, full_q_idx);

  ForwardArgs a;
  a.g = {p.batch, p.q_heads, p.kv_heads, D, 1.0f / std::sqrt(float(D))};
  BlockMaskView& m = a.mask;
  m.q_start = p.q_start, m.q_len = p.sq, m.kv_start = p.kv_start, m.kv_len = p.skv;
  m.q_block = p.q_block, m.kv_block = p.kv_block, m.batch = int32_t(p.mask_batch);
  m.partial_kv = {partial_num.data(), partial_idx.data(), int32_t(nkv)};
  m.full_kv = {full_num.data(), full_idx.data(), int32_t(nkv)};
  m.partial_q = {partial_q_num.data(), partial_q_idx.data(), int32_t(nq)};
  m.full_q = {full_q_num.data(), full_q_idx.data(), int32_t(nq)};
  m.causal = p.causal, m.has_window = p.has_window, m.window = p.window, m.vision_bidirectional = p.vision;
  m.vision_group_past_window = p.vision_past_window;
  if (p.documents) m.q_document_ids = in.q_doc.data(), m.kv_document_ids = in.kv_doc.data();
  if (p.vision) m.q_vision_group_ids = in.q_grp.data(), m.kv_vision_group_ids = in.kv_grp.data();
  if (p.padding) m.kv_padding = in.kv_pad.data();
  const DType dt = kBf16 ? DType::kBFloat16 : DType::kFloat16;
  // Strided layouts: [B, H, S, D] for q and k, [B, S, H, D] for v, so no code path assumes one.
  a.q = {in.q.data(), dt, p.q_heads * p.sq * D, p.sq * D, D};
  a.k = {in.k.data(), dt, p.kv_heads * p.skv * D, p.skv * D, D};
  a.v = {in.v.data(), dt, p.kv_heads * p.skv * D, D, p.kv_heads * D};
  std::vector<float> out32(size_t(p.batch * p.q_heads * p.sq * D), NAN);
  std::vector<uint16_t> out16(out32.size(), 0xffff);
  std::vector<float> lse(size_t(p.batch * p.q_heads * p.sq), NAN);
  if (p.out_fp32) a.out = {out32.data(), DType::kFloat32, p.q_heads * p.sq * D, p.sq * D, D};
  else a.out = {out16.data(), dt, p.q_heads * p.sq * D, p.sq * D, D};
  a.lse = {lse.data(), p.q_heads * p.sq, p.sq, 1};
  WorkCounters work;
  a.work = &work;
  emulate_forward_any<kBf16>(a);

  // The oracle in double from the same 16-bit inputs. P is rounded to the input dtype on the tensor cores: bf16
  // keeps 8 bits (relative 2^-9), fp16 11, so the bound is that rounding over the values' scale.
  const Values<kBf16> x{in};
  const double tol = kBf16 ? 1.2e-2 : 2e-3;
  int64_t allowed_pairs = 0;
  for (int64_t b = 0; b < p.batch; ++b)
    for (int64_t h = 0; h < p.q_heads; ++h) {
      const int64_t hk = h / (p.q_heads / p.kv_heads), mb = p.mask_batch == 1 ? 0 : b;
      for (int64_t i = 0; i < p.sq; ++i) {
        std::vector<double> s;
        std::vector<int64_t> keys;
        for (int64_t j = 0; j < p.skv; ++j) {
          if (!oracle_allowed(in, mb, i, j)) continue;
          double dot = 0;
          for (int64_t d = 0; d < D; ++d)
            dot += x.q(b, h, i, d) * x.k(b, hk, j, d);
          s.push_back(dot * a.g.scale);
          keys.push_back(j);
        }
        allowed_pairs += int64_t(keys.size());
        const size_t row = size_t((b * p.q_heads + h) * p.sq + i);
        auto got_out = [&](int64_t d) {
          return p.out_fp32 ? double(out32[row * D + d]) : double(from_bits<kBf16>(out16[row * D + d]));
        };
        if (keys.empty()) {
          ASSERT_TRUE(std::isinf(lse[row]) && lse[row] < 0) << "row " << i << " head " << h << ": lse " << lse[row];
          for (int64_t d = 0; d < D; ++d) ASSERT_EQ(got_out(d), 0.0) << "row " << i << " d " << d;
          continue;
        }
        double mx = -INFINITY, sum = 0;
        for (double x : s) mx = std::max(mx, x);
        for (double x : s) sum += std::exp(x - mx);
        ASSERT_NEAR(lse[row], mx + std::log(sum), 2e-4 * (1 + std::abs(mx))) << "row " << i << " head " << h;
        for (int64_t d = 0; d < D; ++d) {
          double want = 0, scale_v = 0;
          for (size_t n = 0; n < keys.size(); ++n) {
            const double vv = x.v(b, hk, keys[n], d);
            want += std::exp(s[n] - mx) / sum * vv;
            scale_v = std::max(scale_v, std::abs(vv));
          }
          const double out_rounding = p.out_fp32 ? 0 : std::abs(want) * (kBf16 ? 1.0 / 256 : 1.0 / 2048);
          ASSERT_NEAR(got_out(d), want, tol * scale_v + out_rounding + 1e-6) << "row " << i << " head " << h << " d " << d;
        }
      }
    }
  // The counters as the CPU chunk attention counts them: score elements over every listed tile and query head.
  EXPECT_GE(work.score_elements, uint64_t(allowed_pairs));
  check_backward<kBf16>(in, a, rng);
}

Problem random_problem(std::mt19937_64& rng) {
  Problem p;
  const int64_t dims[] = {64, 128, 256, 512, 40, 80, 200, 300};
  p.head_dim = dims[rng() % 8];
  p.batch = 1 + int64_t(rng() % 2);
  p.kv_heads = 1 + int64_t(rng() % 2);
  p.q_heads = p.kv_heads * int64_t(1 << (rng() % 3));
  const int32_t blocks[] = {16, 32, 64, 128};
  p.q_block = blocks[rng() % 4];
  p.kv_block = blocks[rng() % 4];
  const int64_t limit = p.head_dim > 256 ? 48 : 96;  // the emulation is slow at D 512
  p.sq = 1 + int64_t(rng() % uint64_t(limit));
  p.skv = 1 + int64_t(rng() % uint64_t(limit));
  p.q_start = int64_t(rng() % 120);
  p.kv_start = rng() % 3 == 0 ? p.q_start : int64_t(rng() % 120);
  p.causal = rng() % 5 != 0;
  p.has_window = rng() % 2 == 0;
  p.window = 1 + int64_t(rng() % 60);
  p.vision = rng() % 3 == 0;  // with no window too (transformers 5.9 .. 5.12 open groups on full layers)
  p.documents = rng() % 2 == 0;
  p.padding = rng() % 3 == 0;
  p.mask_batch = (p.documents || p.vision || p.padding || rng() % 2) ? int32_t(p.batch) : 1;
  p.bf16 = rng() % 3 != 0;
  p.out_fp32 = rng() % 2 == 0;
  p.vision_past_window = p.vision && rng() % 2 == 0;  // drawn last: the earlier draws stay as they were
  return p;
}

// 40 random problems in 4 parts of 10 (each its own seed), so that CTest's shards of this binary share them out.
class TensorCoreEmulationRandom : public ::testing::TestWithParam<int> {};

TEST_P(TensorCoreEmulationRandom, ProblemsAgreeWithTheBruteForceOracle) {
  std::mt19937_64 rng(2026 + uint64_t(GetParam()));
  for (int n = 0; n < 10; ++n) {
    const Problem p = random_problem(rng);
    if (p.bf16) check_problem<true>(p, rng());
    else check_problem<false>(p, rng());
    if (HasFatalFailure()) return;
  }
}

INSTANTIATE_TEST_SUITE_P(Parts, TensorCoreEmulationRandom, ::testing::Range(0, 4));

// Every compiled head dim (one test each, for the same reason) with every mask term.
class TensorCoreEmulationHeadDim : public ::testing::TestWithParam<int64_t> {};

TEST_P(TensorCoreEmulationHeadDim, EveryMaskTerm) {
  const int64_t d = GetParam();
  std::mt19937_64 rng(7 + uint64_t(d));
  {
    for (int variant = 0; variant < 3; ++variant) {
      Problem p;
      p.head_dim = d;
      p.batch = 2;
      p.q_heads = 4;
      p.kv_heads = 2;
      p.sq = d > 256 ? 40 : 70;
      p.skv = d > 256 ? 45 : 75;
      p.q_block = 32;
      p.kv_block = 16;
      p.q_start = 30;
      p.kv_start = variant == 2 ? 200 : 10;  // variant 2: a chunk wholly in the future, every row empty
      p.has_window = variant != 1;
      p.window = 24;
      p.vision = variant == 0;
      p.vision_past_window = p.vision && d >= 256;  // both group rules reach the tensor cores
      p.documents = true;
      p.padding = variant != 2;
      p.mask_batch = 2;
      p.bf16 = variant != 1;
      if (p.bf16) check_problem<true>(p, rng());
      else check_problem<false>(p, rng());
      if (HasFatalFailure()) return;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Dims, TensorCoreEmulationHeadDim, ::testing::Values(64, 128, 256, 512));

}  // namespace
}  // namespace cpharness::kernels::cuda::detail
