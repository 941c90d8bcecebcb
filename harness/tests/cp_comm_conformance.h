// Backend-independent Comm checks with exact expected values, shared by the local gtests (cp_comm_test.cpp) and
// the MPI driver (mpi/mpi_comm_tests.cpp). Each returns the list of failures (empty = pass) and resets stats first.
#pragma once

#include <sstream>
#include <string>
#include <vector>

#include "harness/cp/comm.h"

namespace cpharness::cp::testing {

using Failures = std::vector<std::string>;

inline void expect_equal(Failures& f, const std::string& what, const at::Tensor& got, const at::Tensor& want) {
  if (got.sizes() != want.sizes() || got.scalar_type() != want.scalar_type() || !at::equal(got, want)) {
    std::ostringstream os;
    os << what << ": got " << got.sizes() << " " << got.scalar_type() << " != expected " << want.sizes() << " "
       << want.scalar_type();
    f.push_back(os.str());
  }
}

inline void expect_count(Failures& f, const std::string& what, int64_t got, int64_t want) {
  if (got != want) f.push_back(what + ": got " + std::to_string(got) + ", expected " + std::to_string(want));
}

// What rank `r` sends in the ring: a float32 [3, 4] block, an int64 [5] vector, a bool [2, 1], an empty tensor.
inline std::vector<at::Tensor> ring_payload(int r) {
  return {at::arange(12, at::kFloat).view({3, 4}) + 100.0f * static_cast<float>(r),
          at::full({5}, static_cast<int64_t>(r) * 7 + 1, at::kLong), at::tensor({static_cast<int64_t>(r % 2 == 0), static_cast<int64_t>(r % 2 == 1)}, at::kLong).to(at::kBool).view({2, 1}),
          at::empty({0, 3}, at::kDouble)};
}

inline Failures check_ring(Comm& c) {
  Failures f;
  c.reset_stats();
  const int n = c.size(), r = c.rank();
  const auto send = ring_payload(r);
  const auto got = c.ring_exchange(send);
  const auto want = ring_payload((r - 1 + n) % n);
  if (got.size() != want.size()) f.push_back("ring: wrong tensor count");
  for (size_t i = 0; i < std::min(got.size(), want.size()); ++i)
    expect_equal(f, "ring tensor " + std::to_string(i), got[i], want[i]);
  // A second rotation: the chunk of rank r-2 arrives (cp-reference §1.4 ownership order).
  const auto got2 = c.ring_exchange(got);
  expect_equal(f, "ring step 2 tensor 0", got2[0], ring_payload((r - 2 + 2 * n) % n)[0]);
  int64_t bytes = 0;
  for (const auto& t : send) bytes += t.numel() * t.element_size();
  const auto& s = c.stats();
  expect_count(f, "ring ops", s.ops(CommOp::RingExchange), 2);
  expect_count(f, "ring tensors", s.tensors(CommOp::RingExchange), 8);
  expect_count(f, "ring bytes", s.bytes(CommOp::RingExchange), 2 * bytes);
  expect_count(f, "ring total ops", s.total_ops(), 2);
  return f;
}

// The dK/dV return: for distance d = 1..n-1, rank r sends what it holds for owner r-d to rank r-d and receives
// from rank r+d (cp-reference §1.6). The payload encodes (sender, receiver).
inline at::Tensor grad_payload(int from, int to) {
  return at::arange(6, at::kDouble).view({2, 3}) * 0.25 + static_cast<double>(from * 10 + to);
}

inline Failures check_exchange(Comm& c) {
  Failures f;
  c.reset_stats();
  const int n = c.size(), r = c.rank();
  for (int d = 1; d < n; ++d) {
    const int to = (r - d + n) % n, from = (r + d) % n;
    std::vector<at::Tensor> send{grad_payload(r, to), grad_payload(r, to).to(at::kFloat)};
    std::vector<at::Tensor> recv{at::empty({2, 3}, at::kDouble), at::empty({2, 3}, at::kFloat)};
    c.exchange(send, to, recv, from);
    expect_equal(f, "exchange d=" + std::to_string(d) + " dK", recv[0], grad_payload(from, r));
    expect_equal(f, "exchange d=" + std::to_string(d) + " dV", recv[1], grad_payload(from, r).to(at::kFloat));
  }
  // Self exchange and the shape-inferring overload.
  const auto self = c.exchange({grad_payload(r, r)}, r, r);
  expect_equal(f, "self exchange", self.at(0), grad_payload(r, r));
  // A non-contiguous receive buffer is filled too.
  auto base = at::zeros({3, 2}, at::kDouble);
  std::vector<at::Tensor> nc{base.t()};
  c.exchange({grad_payload(r, r)}, r, nc, r);
  expect_equal(f, "non-contiguous receive", base.t().contiguous(), grad_payload(r, r));
  const auto& s = c.stats();
  expect_count(f, "exchange ops", s.ops(CommOp::Exchange), (n - 1) + 2);
  expect_count(f, "exchange tensors", s.tensors(CommOp::Exchange), 2 * (n - 1) + 2);
  expect_count(f, "exchange bytes", s.bytes(CommOp::Exchange), (n - 1) * (48 + 24) + 2 * 48);
  expect_count(f, "ring ops during exchange", s.ops(CommOp::RingExchange), 0);
  return f;
}

inline at::Tensor reduce_input(int r, at::ScalarType t) {
  auto g = at::detail::createCPUGenerator(1234 + static_cast<uint64_t>(r));
  if (t == at::kLong) return at::randint(-1000, 1000, {4, 5}, g, at::kLong);
  return at::randn({4, 5}, g, at::TensorOptions().dtype(t));
}

inline Failures check_all_reduce(Comm& c) {
  Failures f;
  c.reset_stats();
  const int n = c.size(), r = c.rank();
  int64_t bytes = 0;
  for (auto t : {at::kFloat, at::kDouble, at::kLong}) {
    auto x = reduce_input(r, t);
    bytes += x.numel() * x.element_size();
    c.all_reduce(x);
    auto want = reduce_input(0, t);  // rank-order sum: ((x0 + x1) + x2) + ...: the same bits on every rank
    for (int q = 1; q < n; ++q) want.add_(reduce_input(q, t));
    expect_equal(f, std::string("all_reduce ") + c10::toString(t), x, want);
  }
  auto bad = at::zeros({2}, at::kInt);
  try {
    c.all_reduce(bad);
    f.push_back("all_reduce int32 did not throw");
  } catch (const CommError&) {
  }
  const auto& s = c.stats();
  expect_count(f, "all_reduce ops", s.ops(CommOp::AllReduce), 3);
  expect_count(f, "all_reduce bytes", s.bytes(CommOp::AllReduce), bytes);
  return f;
}

inline Failures check_broadcast_barrier(Comm& c) {
  Failures f;
  c.reset_stats();
  const int n = c.size(), r = c.rank(), root = n - 1;
  auto want = at::arange(10, at::kLong) * 3 + 5;
  auto x = r == root ? want.clone() : at::full({10}, -1, at::kLong);
  c.broadcast(x, root);
  expect_equal(f, "broadcast", x, want);
  auto y = r == 0 ? at::full({2, 2}, 0.5, at::kFloat) : at::zeros({2, 2}, at::kFloat);
  c.broadcast(y, 0);
  expect_equal(f, "broadcast root 0", y, at::full({2, 2}, 0.5, at::kFloat));
  c.barrier();
  c.barrier();
  const auto& s = c.stats();
  expect_count(f, "broadcast ops", s.ops(CommOp::Broadcast), 2);
  expect_count(f, "broadcast bytes", s.bytes(CommOp::Broadcast), (r == root ? 80 : 0) + (r == 0 ? 16 : 0));
  expect_count(f, "barrier ops", s.ops(CommOp::Barrier), 2);
  expect_count(f, "barrier bytes", s.bytes(CommOp::Barrier), 0);
  return f;
}

// A large message (8 MiB, past every eager limit) around the ring.
inline Failures check_large(Comm& c) {
  Failures f;
  const int n = c.size(), r = c.rank();
  auto mk = [](int q) { return at::arange(1 << 21, at::kFloat) + static_cast<float>(q); };
  const auto got = c.ring_exchange({mk(r)});
  expect_equal(f, "large ring", got.at(0), mk((r - 1 + n) % n));
  return f;
}

inline Failures check_all(Comm& c) {
  Failures all;
  for (auto* fn : {&check_ring, &check_exchange, &check_all_reduce, &check_broadcast_barrier, &check_large}) {
    auto f = fn(c);
    all.insert(all.end(), f.begin(), f.end());
  }
  return all;
}

}  // namespace cpharness::cp::testing
