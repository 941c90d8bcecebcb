// Comm: argument checks, op accounting, the default (rank-order, deterministic) collectives, and the local
// (threads) backend with run_local.
#include "harness/cp/comm.h"

#include <algorithm>
#include <condition_variable>
#include <deque>
#include <map>
#include <mutex>
#include <new>
#include <sstream>
#include <thread>

#include "harness/cp/launcher.h"
#include "harness/train/device.h"

namespace cpharness::cp {

CommError::CommError(const std::string& message, std::string op, int rank, int peer)
    : std::runtime_error(message), op_(std::move(op)), rank_(rank), peer_(peer) {}

const char* comm_op_name(CommOp op) {
  switch (op) {
    case CommOp::RingExchange: return "ring_exchange";
    case CommOp::Exchange: return "exchange";
    case CommOp::AllReduce: return "all_reduce";
    case CommOp::Broadcast: return "broadcast";
    case CommOp::Barrier: return "barrier";
  }
  return "?";
}

int64_t CommStats::total_ops() const {
  int64_t s = 0;
  for (auto v : calls) s += v;
  return s;
}

int64_t CommStats::total_bytes() const {
  int64_t s = 0;
  for (auto v : bytes_sent) s += v;
  return s;
}

std::string CommStats::to_string() const {
  std::ostringstream os;
  for (int i = 0; i < kNumCommOps; ++i) {
    if (i) os << "; ";
    os << comm_op_name(static_cast<CommOp>(i)) << ": " << calls[i] << " ops, " << tensors_sent[i] << " tensors, "
       << bytes_sent[i] << " B";
  }
  return os.str();
}

const char* backend_name(Backend b) {
  switch (b) {
    case Backend::Local: return "local";
    case Backend::Mpi: return "mpi";
    case Backend::Nccl: return "nccl";
  }
  return "?";
}

Backend parse_backend(const std::string& name) {
  if (name == "local") return Backend::Local;
  if (name == "mpi") return Backend::Mpi;
  if (name == "nccl") return Backend::Nccl;
  throw std::invalid_argument("unknown comm backend '" + name + "' (expected local, mpi or nccl)");
}

// ---- Comm: checks and accounting ----------------------------------------------------------------------------

std::string Comm::where(CommOp op) const {
  return "rank " + std::to_string(rank()) + " (" + backend_name(backend()) + ") " + comm_op_name(op);
}

void Comm::check_peer(int peer, CommOp op, const char* what) const {
  if (peer < 0 || peer >= size())
    throw CommError(where(op) + ": " + what + " rank " + std::to_string(peer) + " is outside [0, " +
                        std::to_string(size()) + ")",
                    comm_op_name(op), rank(), peer);
}

namespace {

int64_t payload_bytes(const std::vector<at::Tensor>& ts) {
  int64_t b = 0;
  for (const auto& t : ts) b += static_cast<int64_t>(t.numel()) * static_cast<int64_t>(t.element_size());
  return b;
}

std::vector<at::Tensor> contiguous_all(const std::vector<at::Tensor>& ts) {
  std::vector<at::Tensor> out;
  out.reserve(ts.size());
  for (const auto& t : ts) out.push_back(t.contiguous());
  return out;
}

}  // namespace

void Comm::transfer(const std::vector<at::Tensor>& send, int dst, std::vector<at::Tensor>& recv, int src, CommOp op,
                    Clock::time_point deadline) {
  const auto where = transfer_device();
  bool staged = false;
  if (where) {
    for (const auto& t : send) staged = staged || t.device() != *where;
    for (const auto& t : recv) staged = staged || t.device() != *where;
  }
  if (!staged) return sendrecv(send, dst, recv, src, op, deadline);
  std::vector<at::Tensor> send_staged, recv_staged;
  for (const auto& t : send) send_staged.push_back(t.to(*where).contiguous());
  for (const auto& t : recv) recv_staged.push_back(at::empty(t.sizes(), t.options().device(*where)));
  sendrecv(send_staged, dst, recv_staged, src, op, deadline);
  for (size_t i = 0; i < recv.size(); ++i) recv[i].copy_(recv_staged[i]);
}

std::vector<at::Tensor> Comm::ring_exchange(const std::vector<at::Tensor>& send) {
  std::vector<at::Tensor> recv;
  recv.reserve(send.size());
  for (const auto& t : send) recv.push_back(at::empty(t.sizes(), t.options().memory_format(at::MemoryFormat::Contiguous)));
  const int n = size();
  const auto deadline = Clock::now() + timeout_;
  auto s = contiguous_all(send);
  auto& st = stats_;
  st.calls[static_cast<int>(CommOp::RingExchange)] += 1;
  st.tensors_sent[static_cast<int>(CommOp::RingExchange)] += static_cast<int64_t>(s.size());
  st.bytes_sent[static_cast<int>(CommOp::RingExchange)] += payload_bytes(s);
  transfer(s, (rank() + 1) % n, recv, (rank() - 1 + n) % n, CommOp::RingExchange, deadline);
  return recv;
}

void Comm::exchange(const std::vector<at::Tensor>& send, int dst, std::vector<at::Tensor>& recv, int src) {
  check_peer(dst, CommOp::Exchange, "destination");
  check_peer(src, CommOp::Exchange, "source");
  const auto deadline = Clock::now() + timeout_;
  auto s = contiguous_all(send);
  // Receive into contiguous buffers; copy back into any non-contiguous caller tensor afterwards.
  std::vector<at::Tensor> r;
  r.reserve(recv.size());
  for (const auto& t : recv) {
    if (!t.defined())
      throw CommError(where(CommOp::Exchange) + ": receive buffer is undefined", "exchange", rank(), src);
    r.push_back(t.is_contiguous() ? t : at::empty(t.sizes(), t.options().memory_format(at::MemoryFormat::Contiguous)));
  }
  auto& st = stats_;
  st.calls[static_cast<int>(CommOp::Exchange)] += 1;
  st.tensors_sent[static_cast<int>(CommOp::Exchange)] += static_cast<int64_t>(s.size());
  st.bytes_sent[static_cast<int>(CommOp::Exchange)] += payload_bytes(s);
  transfer(s, dst, r, src, CommOp::Exchange, deadline);
  for (size_t i = 0; i < recv.size(); ++i)
    if (!r[i].is_same(recv[i])) recv[i].copy_(r[i]);
}

std::vector<at::Tensor> Comm::exchange(const std::vector<at::Tensor>& send, int dst, int src) {
  std::vector<at::Tensor> recv;
  recv.reserve(send.size());
  for (const auto& t : send) recv.push_back(at::empty(t.sizes(), t.options().memory_format(at::MemoryFormat::Contiguous)));
  exchange(send, dst, recv, src);
  return recv;
}

void Comm::all_reduce(at::Tensor& t) {
  const auto k = t.scalar_type();
  if (k != at::kFloat && k != at::kDouble && k != at::kLong)
    throw CommError(where(CommOp::AllReduce) + ": dtype " + std::string(c10::toString(k)) +
                        " not supported (float32, float64, int64)",
                    "all_reduce", rank());
  if (!t.is_contiguous())
    throw CommError(where(CommOp::AllReduce) + ": tensor must be contiguous", "all_reduce", rank());
  const auto deadline = Clock::now() + timeout_;
  stats_.calls[static_cast<int>(CommOp::AllReduce)] += 1;
  stats_.bytes_sent[static_cast<int>(CommOp::AllReduce)] += payload_bytes({t});
  if (size() <= 1) return;
  const auto where = transfer_device();
  if (!where || t.device() == *where) return do_all_reduce(t, deadline);
  auto staged = t.to(*where).contiguous();
  do_all_reduce(staged, deadline);
  t.copy_(staged);
}

void Comm::broadcast(at::Tensor& t, int root) {
  check_peer(root, CommOp::Broadcast, "root");
  if (!t.is_contiguous())
    throw CommError(where(CommOp::Broadcast) + ": tensor must be contiguous", "broadcast", rank());
  const auto deadline = Clock::now() + timeout_;
  stats_.calls[static_cast<int>(CommOp::Broadcast)] += 1;
  if (rank() == root) stats_.bytes_sent[static_cast<int>(CommOp::Broadcast)] += payload_bytes({t});
  if (size() <= 1) return;
  const auto where = transfer_device();
  if (!where || t.device() == *where) return do_broadcast(t, root, deadline);
  auto staged = t.to(*where).contiguous();
  do_broadcast(staged, root, deadline);
  t.copy_(staged);
}

void Comm::barrier() {
  const auto deadline = Clock::now() + timeout_;
  stats_.calls[static_cast<int>(CommOp::Barrier)] += 1;
  if (size() > 1) do_barrier(deadline);
}

// Rank-order reduction on rank 0, then rank 0 sends the result to every rank: ((t0 + t1) + t2) + ..., the same
// bits on every rank and on every backend that uses it.
void Comm::do_all_reduce(at::Tensor& t, Clock::time_point deadline) {
  const int n = size();
  std::vector<at::Tensor> none;
  if (rank() == 0) {
    std::vector<at::Tensor> tmp{at::empty_like(t)};
    for (int r = 1; r < n; ++r) {
      transfer(none, -1, tmp, r, CommOp::AllReduce, deadline);
      t.add_(tmp[0]);
    }
    std::vector<at::Tensor> out{t};
    for (int r = 1; r < n; ++r) transfer(out, r, none, -1, CommOp::AllReduce, deadline);
  } else {
    std::vector<at::Tensor> mine{t.clone()};
    transfer(mine, 0, none, -1, CommOp::AllReduce, deadline);
    std::vector<at::Tensor> res{t};
    transfer(none, -1, res, 0, CommOp::AllReduce, deadline);
  }
}

void Comm::do_broadcast(at::Tensor& t, int root, Clock::time_point deadline) {
  std::vector<at::Tensor> none;
  std::vector<at::Tensor> buf{t};
  if (rank() == root) {
    for (int r = 0; r < size(); ++r)
      if (r != root) transfer(buf, r, none, -1, CommOp::Broadcast, deadline);
  } else {
    transfer(none, -1, buf, root, CommOp::Broadcast, deadline);
  }
}

void Comm::do_barrier(Clock::time_point deadline) {
  const int n = size();
  std::vector<at::Tensor> none;
  std::vector<at::Tensor> token{at::zeros({1}, at::kLong)};
  if (rank() == 0) {
    for (int r = 1; r < n; ++r) transfer(none, -1, token, r, CommOp::Barrier, deadline);
    for (int r = 1; r < n; ++r) transfer(token, r, none, -1, CommOp::Barrier, deadline);
  } else {
    transfer(token, 0, none, -1, CommOp::Barrier, deadline);
    transfer(none, -1, token, 0, CommOp::Barrier, deadline);
  }
}

// ---- local backend ------------------------------------------------------------------------------------------

struct LocalWorld::State {
  struct Message {
    CommOp op;
    std::vector<at::Tensor> tensors;
    std::shared_ptr<const train::StreamHandoff> handoff;  // ranks on one GPU on streams of their own
  };
  explicit State(int n) : size(n) {}
  int size;
  std::mutex mu;
  std::condition_variable cv;
  std::map<std::pair<int, int>, std::deque<Message>> boxes;  // (src, dst) -> FIFO
  bool aborted = false;
  int failed_rank = -1;
  std::string reason;
};

namespace {

// Waits on `cv` until `ready()` or `deadline`, not counting time the whole process spent stopped (SIGSTOP, Ctrl-Z,
// a paused container): the peers were stopped too, so that time blames none of them. It waits in short slices; a
// slice that ends far later than asked means nothing ran meanwhile, and the deadline moves by the overrun.
template <class Ready>
bool wait_not_counting_stops(std::condition_variable& cv, std::unique_lock<std::mutex>& lk,
                             std::chrono::steady_clock::time_point deadline, Ready ready) {
  constexpr auto kSlice = std::chrono::milliseconds(250);
  constexpr auto kStopped = std::chrono::seconds(1);  // far beyond scheduling jitter
  while (!ready()) {
    const auto now = std::chrono::steady_clock::now();
    if (now >= deadline) return false;
    const auto until = std::min(deadline, now + kSlice);
    cv.wait_until(lk, until, ready);
    const auto overrun = std::chrono::steady_clock::now() - until;
    if (overrun > kStopped) deadline += overrun;
  }
  return true;
}

class LocalComm final : public Comm {
 public:
  LocalComm(std::shared_ptr<LocalWorld::State> st, int rank, std::chrono::milliseconds timeout)
      : Comm(timeout), st_(std::move(st)), rank_(rank) {}
  int rank() const override { return rank_; }
  int size() const override { return st_->size; }
  Backend backend() const override { return Backend::Local; }

  void terminate_job(int exit_code, const std::string& reason) override {
    std::lock_guard<std::mutex> lk(st_->mu);
    if (!st_->aborted) {
      st_->aborted = true;
      st_->failed_rank = rank_;
      st_->reason = reason;
    }
    st_->cv.notify_all();
  }

 protected:
  void sendrecv(const std::vector<at::Tensor>& send, int dst, std::vector<at::Tensor>& recv, int src, CommOp op,
                Clock::time_point deadline) override {
    const char* name = comm_op_name(op);
    if (dst >= 0) {
      LocalWorld::State::Message m{op, {}};
      m.tensors.reserve(send.size());
      for (const auto& t : send) m.tensors.push_back(t.clone(at::MemoryFormat::Contiguous));
      m.handoff = train::StreamHandoff::mark(m.tensors);
      std::lock_guard<std::mutex> lk(st_->mu);
      throw_if_aborted(op, dst);
      st_->boxes[{rank_, dst}].push_back(std::move(m));
      st_->cv.notify_all();
    }
    if (src < 0) return;
    LocalWorld::State::Message m;
    {
      std::unique_lock<std::mutex> lk(st_->mu);
      auto& box = st_->boxes[{src, rank_}];
      const bool ready = wait_not_counting_stops(st_->cv, lk, deadline, [&] { return st_->aborted || !box.empty(); });
      throw_if_aborted(op, src);
      if (!ready) {
        const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(timeout()).count();
        throw CommError(where(op) + ": timed out after " + std::to_string(ms) + " ms waiting to receive from rank " +
                            std::to_string(src),
                        name, rank_, src);
      }
      m = std::move(box.front());
      box.pop_front();
    }
    if (m.op != op)
      throw CommError(where(op) + ": rank " + std::to_string(src) + " sent a " + comm_op_name(m.op) +
                          " message (the ranks issue operations in different orders)",
                      name, rank_, src);
    if (m.tensors.size() != recv.size())
      throw CommError(where(op) + ": rank " + std::to_string(src) + " sent " + std::to_string(m.tensors.size()) +
                          " tensors, expected " + std::to_string(recv.size()),
                      name, rank_, src);
    if (m.handoff) m.handoff->accept(m.tensors);
    for (size_t i = 0; i < recv.size(); ++i) {
      const auto& in = m.tensors[i];
      if (in.sizes() != recv[i].sizes() || in.scalar_type() != recv[i].scalar_type()) {
        std::ostringstream os;
        os << where(op) << ": tensor " << i << " from rank " << src << " is " << in.sizes() << " "
           << in.scalar_type() << ", expected " << recv[i].sizes() << " " << recv[i].scalar_type();
        throw CommError(os.str(), name, rank_, src);
      }
      recv[i].copy_(in);
    }
  }

 private:
  void throw_if_aborted(CommOp op, int peer) const {  // st_->mu held
    if (!st_->aborted) return;
    throw CommError(where(op) + ": aborted because rank " + std::to_string(st_->failed_rank) +
                        " failed: " + st_->reason,
                    comm_op_name(op), rank_, st_->failed_rank);
  }

  std::shared_ptr<LocalWorld::State> st_;
  int rank_;
};

}  // namespace

LocalWorld::LocalWorld(int size) : state_(std::make_shared<State>(size)), comms_(static_cast<size_t>(size)) {
  if (size < 1) throw CommError("local world size must be >= 1, got " + std::to_string(size));
}

LocalWorld::~LocalWorld() = default;

int LocalWorld::size() const { return state_->size; }

Comm& LocalWorld::comm(int rank, std::chrono::milliseconds timeout) {
  if (rank < 0 || rank >= size())
    throw CommError("local world: rank " + std::to_string(rank) + " outside [0, " + std::to_string(size()) + ")");
  auto& c = comms_[static_cast<size_t>(rank)];
  if (!c) c = std::make_unique<LocalComm>(state_, rank, timeout);
  else c->set_timeout(timeout);
  return *c;
}

void LocalWorld::abort(int rank, const std::string& reason) {
  std::lock_guard<std::mutex> lk(state_->mu);
  if (!state_->aborted) {
    state_->aborted = true;
    state_->failed_rank = rank;
    state_->reason = reason;
  }
  state_->cv.notify_all();
}

bool LocalWorld::aborted() const {
  std::lock_guard<std::mutex> lk(state_->mu);
  return state_->aborted;
}

void run_local(int n, const std::function<void(Comm&)>& fn, std::chrono::milliseconds timeout) {
  LocalWorld world(n);
  std::vector<Comm*> comms;
  for (int r = 0; r < n; ++r) comms.push_back(&world.comm(r, timeout));
  std::mutex mu;
  std::condition_variable ended_cv;
  std::vector<bool> ended(static_cast<size_t>(n), false);
  int running = n;
  int last_ended = -1;
  int first_rank = -1;
  std::string first_what, first_op;
  int first_peer = -1;
  auto body = [&](int r) {
    try {
      fn(*comms[static_cast<size_t>(r)]);
    } catch (const std::exception& e) {
      {
        std::lock_guard<std::mutex> lk(mu);
        if (first_rank < 0) {
          first_rank = r;
          first_what = dynamic_cast<const std::bad_alloc*>(&e) ? std::string("out of memory (") + e.what() + ")" : e.what();
          if (auto* ce = dynamic_cast<const CommError*>(&e)) {
            first_op = ce->op();
            first_peer = ce->peer();
          }
        }
      }
      world.abort(r, e.what());
    } catch (...) {
      {
        std::lock_guard<std::mutex> lk(mu);
        if (first_rank < 0) {
          first_rank = r;
          first_what = "unknown exception";
        }
      }
      world.abort(r, "unknown exception");
    }
    std::lock_guard<std::mutex> lk(mu);
    ended[static_cast<size_t>(r)] = true;
    --running;
    last_ended = r;
    ended_cv.notify_all();
  };
  std::vector<std::thread> threads;
  threads.reserve(static_cast<size_t>(n));
  for (int r = 0; r < n; ++r) threads.emplace_back(body, r);
  {
    // Once a rank has ended (failed, or done), its peers either end too or wait on a Comm, which gives up within
    // its timeout: a rank still running a timeout and a grace after the last rank ended is hung.
    std::unique_lock<std::mutex> lk(mu);
    ended_cv.wait(lk, [&] { return running < n; });
    while (running > 0) {
      const auto limit = timeout + std::chrono::milliseconds(5000);  // the grace: a rank's last work after a wait
      const int before = running;
      if (ended_cv.wait_for(lk, limit, [&] { return running < before; })) continue;
      std::vector<int> hung;
      for (int r = 0; r < n; ++r)
        if (!ended[static_cast<size_t>(r)]) hung.push_back(r);
      std::string others;
      for (size_t i = 1; i < hung.size(); ++i) others += (i > 1 ? ", " : "") + std::to_string(hung[i]);
      const std::string after = first_rank >= 0 ? "rank " + std::to_string(first_rank) + " failed: " + first_what
                                                : "rank " + std::to_string(last_ended) + " ended";
      const auto ms = limit.count();
      std::string message = "rank " + std::to_string(hung.front()) + " failed or hung; evidence: it was still running " +
                            std::to_string(ms) + " ms (the timeout and a grace) after " + after;
      if (!others.empty()) message += "; ranks " + others + " were still running too";
      for (auto& ch : message)
        if (ch == '\n') ch = ' ';
      message += " [culprit: rank " + std::to_string(hung.front()) + "]";
      lk.unlock();
      // A hung thread can be neither joined nor abandoned (it may touch what this frame and its caller free).
      for (auto& t : threads) t.detach();
      end_for_hung_local_rank(hung.front(), message);
    }
  }
  for (auto& t : threads) t.join();
  if (first_rank >= 0)
    throw CommError("rank " + std::to_string(first_rank) + " failed: " + first_what, first_op, first_rank, first_peer);
}

}  // namespace cpharness::cp
