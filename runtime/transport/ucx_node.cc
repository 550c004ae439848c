#include "runtime/transport/ucx_node.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <deque>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <unordered_map>
#include <vector>

#include <ucp/api/ucp.h>

#include "absl/strings/str_cat.h"
#include "ferry/status.h"
#include "runtime/common/log.h"
#include "runtime/transport/ucx_status.h"

namespace ferry::transport {
namespace {

constexpr unsigned kAmRequest = 11;
constexpr unsigned kAmReply = 12;
constexpr unsigned kAmPing = 13;  // answered by the transport itself: the connect handshake

using Clock = std::chrono::steady_clock;

Clock::duration ToClock(absl::Duration d) {
  return std::chrono::duration_cast<Clock::duration>(
      std::chrono::nanoseconds(absl::ToInt64Nanoseconds(d)));
}

// Longest sleep of a waiting thread or the progress thread between deadline checks, when no
// nearer deadline bounds it.
constexpr auto kMaxSleep = std::chrono::milliseconds(10);
// While threads drive progress themselves, the progress thread looks back this often to take
// over when they stop (a server thread computing a long request, a caller gone).
constexpr auto kStandbyCheck = std::chrono::milliseconds(5);

absl::StatusOr<sockaddr_in> ResolveIpv4(const std::string& host, int port) {
  if (port < 0 || port > 65535) return absl::InvalidArgumentError(absl::StrCat("bad port ", port));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  if (host.empty() || host == "0.0.0.0") {
    addr.sin_addr.s_addr = htonl(INADDR_ANY);
    return addr;
  }
  if (inet_pton(AF_INET, host.c_str(), &addr.sin_addr) == 1) return addr;
  addrinfo hints{};
  hints.ai_family = AF_INET;
  addrinfo* result = nullptr;
  if (getaddrinfo(host.c_str(), nullptr, &hints, &result) != 0 || result == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("cannot resolve host '", host, "'"));
  }
  addr.sin_addr = reinterpret_cast<sockaddr_in*>(result->ai_addr)->sin_addr;
  freeaddrinfo(result);
  return addr;
}

// This thread's eventfd: another thread writes it to end this thread's sleep in a wait.
int ThreadWakeFd() {
  struct WakeFd {
    int fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    ~WakeFd() {
      if (fd >= 0) close(fd);
    }
  };
  thread_local WakeFd wake;
  return wake.fd;
}

void Signal(int fd) {
  uint64_t one = 1;
  [[maybe_unused]] ssize_t n = write(fd, &one, sizeof(one));
}

void Drain(int fd) {
  uint64_t count;
  [[maybe_unused]] ssize_t n = read(fd, &count, sizeof(count));
}

// poll() on up to two fds (negative ones left out) for at most `timeout` (rounded up to 1 ms).
void Sleep(int fd_a, int fd_b, Clock::duration timeout) {
  pollfd fds[2];
  int count = 0;
  for (int fd : {fd_a, fd_b}) {
    if (fd >= 0) fds[count++] = {fd, POLLIN, 0};
  }
  const auto ms = std::chrono::ceil<std::chrono::milliseconds>(timeout).count();
  poll(fds, count, static_cast<int>(std::clamp<int64_t>(ms, 0, 1000)));
}

// ucp_ep_print_info's text.
std::string EndpointInfo(ucp_ep_h ep) {
  char* buffer = nullptr;
  size_t size = 0;
  FILE* stream = open_memstream(&buffer, &size);
  if (stream == nullptr) return {};
  ucp_ep_print_info(ep, stream);
  fclose(stream);
  std::string text(buffer, size);
  free(buffer);
  return text;
}

// Transports whose active messages and copies go through memory both processes (or one) can see.
bool IsSharedMemoryTransport(std::string_view transport) {
  return transport == "sysv" || transport == "posix" || transport == "xpmem" ||
         transport == "self" || transport == "cma" || transport == "knem";
}

// What an endpoint's lanes say about its protocols, from ucp_ep_print_info's text, whose lane
// lines read "lane[1]:  2:sysv/memory.0 md[1] -> md[1]/sysv/sysdev[255] am am_bw#0 keepalive".
struct EndpointLanes {
  std::string am_transport;  // the active-message lane's; empty before wire-up (only a cm lane)
  // Some rendezvous (rma_bw) lane leaves shared memory; without rma_bw lanes, rendezvous sends
  // its data as active messages on the AM lane.
  bool rendezvous_over_network = false;
};

EndpointLanes ParseEndpointLanes(std::string_view info) {
  EndpointLanes lanes;
  while (!info.empty()) {
    const size_t end = std::min(info.find('\n'), info.size());
    std::string_view line = info.substr(0, end);
    info.remove_prefix(std::min(end + 1, info.size()));
    const size_t lane = line.find("lane[");
    const size_t arrow = line.find("->");
    if (lane == std::string_view::npos || arrow == std::string_view::npos) continue;
    // "lane[N]: R:transport/device.path ..."
    const size_t colon = line.find(':', line.find("]:", lane) + 2);
    const size_t slash = line.find('/', colon);
    if (colon == std::string_view::npos || slash == std::string_view::npos) continue;
    const std::string_view transport = line.substr(colon + 1, slash - colon - 1);
    bool am = false, rma_bw = false;
    std::string_view uses = line.substr(arrow + 2);
    while (!uses.empty()) {
      const size_t space = std::min(uses.find(' '), uses.size());
      const std::string_view use = uses.substr(0, space);
      uses.remove_prefix(std::min(space + 1, uses.size()));
      if (use == "am") am = true;
      if (use.substr(0, 7) == "rma_bw#") rma_bw = true;
    }
    if (am) lanes.am_transport = std::string(transport);
    if (rma_bw && !IsSharedMemoryTransport(transport)) lanes.rendezvous_over_network = true;
  }
  return lanes;
}

}  // namespace

class UcxNode::Impl {
 public:
  explicit Impl(UcxNode* node) : node_(node), options_(node->options_) {}
  ~Impl() { Stop(); }

  absl::Status Init();
  void Stop();

  absl::StatusOr<int> Listen(const std::string& host, int port);
  absl::StatusOr<PeerId> Connect(const std::string& host, int port);
  ReplyFuture Call(PeerId peer, Buffer message, absl::Duration timeout,
                   unsigned am_id = kAmRequest);
  CallResult Await(ReplyFuture& future, absl::Duration timeout);
  absl::StatusOr<IncomingRequest> NextRequest(absl::Duration timeout);
  absl::Status Reply(PeerId peer, uint64_t call_id, Buffer message);
  absl::StatusOr<std::string> DescribePeer(PeerId peer);
  absl::StatusOr<size_t> EagerLimit(PeerId peer);
  UcxNodeStats stats() {
    std::lock_guard<std::recursive_mutex> lock(mutex_);
    return stats_;
  }
  void Disconnect(PeerId peer);
  absl::Status PeerStatus(PeerId peer);
  void SetRequestHandler(RequestHandler handler);
  bool SupportsCudaMemory() const { return cuda_memory_; }

 private:
  struct Peer {
    ucp_ep_h ep = nullptr;
    std::string name;
    absl::Status error;  // set once the endpoint failed
    std::optional<size_t> eager_limit;  // unknown until UCX has chosen the endpoint's lanes
  };
  struct PendingCall {
    PeerId peer;
    Clock::time_point deadline;
    std::shared_ptr<ReplyFuture::Slot> reply;
  };
  struct SendOp {
    Impl* impl;
    uint64_t call_id;
    bool is_request;
    PeerId peer;
    Buffer data;
  };
  struct RecvOp {
    Impl* impl;
    uint64_t call_id;
    bool is_request;
    PeerId peer;
    Buffer data;
  };
  // A send asked for inside a callback; it leaves once the progress call has returned.
  struct DeferredSend {
    PeerId peer;
    unsigned am_id;
    uint64_t call_id;
    Buffer data;
    bool is_request;
  };

  // Progresses the worker until it has nothing more to do, then runs what callbacks deferred and
  // checks call deadlines (against `now`, the caller's clock reading: reading the clock is a
  // noticeable cost in a small message's round trip on VMs). Lock held. Returns whether anything
  // happened.
  bool ProgressLocked(Clock::time_point now);
  // Progresses on this thread until ready() or the deadline (spin, then sleep; see the header).
  template <typename Ready>
  void Drive(Ready ready, Clock::time_point deadline);
  // The nearest call deadline, capped at `limit`. Lock held.
  Clock::time_point NextWakeLocked(Clock::time_point limit) const;
  // Ends the sleep of every thread waiting in Drive (some state it may wait for changed). Lock
  // held; a no-op while none sleeps.
  void WakeSleepersLocked();
  void Loop();
  void ShutdownLocked();
  void CheckDeadlines();
  // Hands a call its reply (or error); a pending call's caller then erases it. Lock held.
  static void Complete(ReplyFuture::Slot& reply, CallResult result) {
    reply.result = std::move(result);
    reply.done.store(true, std::memory_order_release);
  }
  void FailCall(uint64_t call_id, absl::Status status);
  void FailPeer(PeerId peer, absl::Status status);
  void ClosePeerEndpoint(Peer& peer);
  void CloseEndpoint(ucp_ep_h ep);
  // Sends now, or, inside a callback, after the progress call (the data then always leaves
  // or its call fails).
  absl::Status SendOrDefer(PeerId peer, unsigned am_id, uint64_t call_id, Buffer data,
                           bool request);
  absl::Status SendAm(PeerId peer, unsigned am_id, uint64_t call_id, Buffer data, bool request);
  PeerId AddPeer(ucp_ep_h ep, std::string name);
  // The eager limit for this peer's endpoint, learnt from its lanes once UCX has chosen them.
  size_t EagerLimitLocked(PeerId id, Peer& peer);
  absl::StatusOr<ucp_ep_h> CreateEndpoint(ucp_ep_params_t& params);
  void Deliver(bool is_request, PeerId peer, uint64_t call_id, absl::StatusOr<Buffer> data);
  absl::Status Stopped() const {
    return absl::CancelledError(absl::StrCat(options_.name, ": shut down"));
  }

  static void OnConnRequest(ucp_conn_request_h request, void* arg);
  static void OnEndpointError(void* arg, ucp_ep_h ep, ucs_status_t status);
  static ucs_status_t OnAmRequest(void* arg, const void* header, size_t header_length,
                                  void* data, size_t length, const ucp_am_recv_param_t* param);
  static ucs_status_t OnAmReply(void* arg, const void* header, size_t header_length, void* data,
                                size_t length, const ucp_am_recv_param_t* param);
  static ucs_status_t OnAmPing(void* arg, const void* header, size_t header_length, void* data,
                               size_t length, const ucp_am_recv_param_t* param);
  ucs_status_t OnAm(bool is_request, const void* header, size_t header_length, void* data,
                    size_t length, const ucp_am_recv_param_t* param);
  static void OnSendDone(void* request, ucs_status_t status, void* user_data);
  static void OnRecvDone(void* request, ucs_status_t status, size_t length, void* user_data);

  UcxNode* node_;
  const UcxNodeOptions& options_;
  int wake_fd_ = -1;     // wakes the progress thread
  int worker_fd_ = -1;   // the UCP worker's wakeup fd; -1: none (sleeps are short polls)
  bool cuda_memory_ = false;
  std::thread thread_;
  std::atomic<bool> stopping_{false};
  std::once_flag stop_once_;
  std::atomic<int> drivers_{0};  // threads in Drive

  // Everything below is guarded by mutex_, which also serialises every call into UCX. Recursive:
  // a request handler may Reply() from inside progress.
  std::recursive_mutex mutex_;
  ucp_context_h context_ = nullptr;
  ucp_worker_h worker_ = nullptr;  // null once shut down
  ucp_listener_h listener_ = nullptr;
  bool in_progress_ = false;  // inside ucp_worker_progress (callbacks): no sends, no progress
  RequestHandler handler_;
  std::deque<IncomingRequest> requests_;  // queue mode
  std::vector<DeferredSend> deferred_sends_;
  std::vector<ucp_ep_h> deferred_closes_;
  std::vector<int> sleepers_;  // wake fds of threads sleeping in Drive
  std::unordered_map<PeerId, Peer> peers_;
  std::unordered_map<ucp_ep_h, PeerId> peer_of_ep_;
  std::unordered_map<uint64_t, PendingCall> calls_;
  PeerId next_peer_ = 1;
  uint64_t next_call_ = 1;
  Clock::time_point next_deadline_check_{};
  int64_t inflight_ops_ = 0;  // sends and rendezvous receives UCX still owns
  UcxNodeStats stats_;
};

absl::Status UcxNode::Impl::Init() {
  ucp_config_t* config = nullptr;
  FERRY_RETURN_IF_ERROR(UcsToStatus(ucp_config_read(nullptr, nullptr, &config), "ucp_config_read"));
  absl::Status status = absl::OkStatus();
  const std::string keepalive =
      absl::StrCat(absl::ToInt64Microseconds(options_.keepalive_interval), "us");
  status.Update(UcsToStatus(ucp_config_modify(config, "KEEPALIVE_INTERVAL", keepalive.c_str()),
                            "ucp_config_modify KEEPALIVE_INTERVAL"));
  if (!options_.connection_managers.empty()) {
    status.Update(UcsToStatus(ucp_config_modify(config, "SOCKADDR_TLS_PRIORITY",
                                                options_.connection_managers.c_str()),
                              "ucp_config_modify SOCKADDR_TLS_PRIORITY"));
  }
  if (!options_.rendezvous_scheme.empty()) {
    status.Update(UcsToStatus(
        ucp_config_modify(config, "RNDV_SCHEME", options_.rendezvous_scheme.c_str()),
        "ucp_config_modify RNDV_SCHEME"));
  }
  if (!options_.tls.empty()) {
    status.Update(UcsToStatus(ucp_config_modify(config, "TLS", options_.tls.c_str()),
                              "ucp_config_modify TLS"));
  }
  ucp_params_t params{};
  params.field_mask = UCP_PARAM_FIELD_FEATURES | UCP_PARAM_FIELD_MT_WORKERS_SHARED |
                      UCP_PARAM_FIELD_NAME;
  params.features = UCP_FEATURE_AM | UCP_FEATURE_WAKEUP;
  params.mt_workers_shared = 0;
  params.name = options_.name.c_str();
  if (status.ok()) {
    status = UcsToStatus(ucp_init(&params, config, &context_), "ucp_init");
  }
  ucp_config_release(config);
  FERRY_RETURN_IF_ERROR(status);

  ucp_context_attr_t context_attr{};
  context_attr.field_mask = UCP_ATTR_FIELD_MEMORY_TYPES;
  if (ucp_context_query(context_, &context_attr) == UCS_OK) {
    cuda_memory_ = (context_attr.memory_types & UCS_BIT(UCS_MEMORY_TYPE_CUDA)) != 0;
  }

  ucp_worker_params_t worker_params{};
  worker_params.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
  // Any thread may progress or send, one at a time, under mutex_.
  worker_params.thread_mode = UCS_THREAD_MODE_SERIALIZED;
  FERRY_RETURN_IF_ERROR(
      UcsToStatus(ucp_worker_create(context_, &worker_params, &worker_), "ucp_worker_create"));
  if (ucp_worker_get_efd(worker_, &worker_fd_) != UCS_OK) {
    worker_fd_ = -1;  // no wakeup support on these transports: poll with short sleeps instead
    FERRY_LOG_WARN("{}: no ucp wakeup fd; polling", options_.name);
  }
  wake_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (wake_fd_ < 0) return absl::InternalError("eventfd failed");

  for (auto [id, cb] : {std::pair{kAmRequest, &Impl::OnAmRequest},
                        std::pair{kAmReply, &Impl::OnAmReply}, std::pair{kAmPing, &Impl::OnAmPing}}) {
    ucp_am_handler_param_t handler{};
    handler.field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_CB |
                         UCP_AM_HANDLER_PARAM_FIELD_ARG | UCP_AM_HANDLER_PARAM_FIELD_FLAGS;
    handler.id = id;
    handler.cb = cb;
    handler.arg = this;
    handler.flags = UCP_AM_FLAG_WHOLE_MSG;
    FERRY_RETURN_IF_ERROR(UcsToStatus(ucp_worker_set_am_recv_handler(worker_, &handler),
                                      "ucp_worker_set_am_recv_handler"));
  }
  thread_ = std::thread([this] { Loop(); });
  return absl::OkStatus();
}

void UcxNode::Impl::Stop() {
  std::call_once(stop_once_, [this] {
    stopping_ = true;
    {
      // Threads sleeping in Drive leave before the worker (and its fd) goes away.
      std::lock_guard<std::recursive_mutex> lock(mutex_);
      WakeSleepersLocked();
    }
    if (thread_.joinable()) {
      Signal(wake_fd_);
      thread_.join();
    }
    {
      std::lock_guard<std::recursive_mutex> lock(mutex_);
      if (worker_ != nullptr) ShutdownLocked();
      if (listener_ != nullptr) ucp_listener_destroy(listener_);
      if (worker_ != nullptr) ucp_worker_destroy(worker_);
      if (context_ != nullptr) ucp_cleanup(context_);
      listener_ = nullptr;
      worker_ = nullptr;
      context_ = nullptr;
    }
    if (wake_fd_ >= 0) close(wake_fd_);
    wake_fd_ = -1;
  });
}

bool UcxNode::Impl::ProgressLocked(Clock::time_point now) {
  if (worker_ == nullptr || in_progress_) return false;
  bool active = false;
  in_progress_ = true;
  while (ucp_worker_progress(worker_) != 0) active = true;
  in_progress_ = false;
  while (!deferred_sends_.empty() || !deferred_closes_.empty()) {
    active = true;
    std::vector<DeferredSend> sends;
    sends.swap(deferred_sends_);
    for (DeferredSend& send : sends) {
      absl::Status sent = SendAm(send.peer, send.am_id, send.call_id, std::move(send.data),
                                 send.is_request);
      if (!sent.ok() && send.is_request) FailCall(send.call_id, std::move(sent));
    }
    std::vector<ucp_ep_h> closes;
    closes.swap(deferred_closes_);
    for (ucp_ep_h ep : closes) CloseEndpoint(ep);
  }
  if (now >= next_deadline_check_) {
    CheckDeadlines();
    next_deadline_check_ = now + std::chrono::milliseconds(1);
  }
  return active;
}

Clock::time_point UcxNode::Impl::NextWakeLocked(Clock::time_point limit) const {
  for (const auto& [id, call] : calls_) limit = std::min(limit, call.deadline);
  return limit;
}

void UcxNode::Impl::WakeSleepersLocked() {
  for (int fd : sleepers_) Signal(fd);
}

template <typename Ready>
void UcxNode::Impl::Drive(Ready ready, Clock::time_point deadline) {
  ++drivers_;
  const auto busy_poll = ToClock(options_.busy_poll);
  auto spin_until = Clock::now() + busy_poll;
  while (!ready() && !stopping_) {
    const auto now = Clock::now();  // the one clock reading of a spin (see ProgressLocked)
    if (now >= deadline) break;
    std::unique_lock<std::recursive_mutex> lock(mutex_, std::try_to_lock);
    if (!lock.owns_lock()) {
      // Another thread is progressing (briefly: nobody sleeps holding the lock) and completes
      // whatever it receives, ours included.
      std::this_thread::yield();
      continue;
    }
    if (worker_ == nullptr || in_progress_) break;  // shut down, or called from a callback
    if (ProgressLocked(now)) spin_until = now + busy_poll;
    if (ready()) break;
    if (now < spin_until) {
      // Spin politely: on a machine with fewer free cores than spinning threads, the peer this
      // thread waits for may be runnable on this core, and a plain spin would hold it off until
      // the spin ends (measured: round trips of about twice busy_poll). sched_yield lets it run
      // and costs one syscall when nothing else wants the core.
      lock.unlock();
      std::this_thread::yield();
      continue;
    }
    // Nothing for a while: sleep until UCX has events, another thread wakes us, or a deadline.
    if (worker_fd_ >= 0 && ucp_worker_arm(worker_) == UCS_ERR_BUSY) continue;
    const int wake = ThreadWakeFd();
    const Clock::time_point until = NextWakeLocked(std::min(deadline, now + kMaxSleep));
    sleepers_.push_back(wake);
    lock.unlock();
    Sleep(wake, worker_fd_, worker_fd_ >= 0 ? until - now : std::chrono::milliseconds(1));
    Drain(wake);
    lock.lock();
    sleepers_.erase(std::find(sleepers_.begin(), sleepers_.end(), wake));
    spin_until = Clock::now() + busy_poll;  // events come in bursts: spin again first
  }
  --drivers_;
}

void UcxNode::Impl::Loop() {
  auto last_activity = Clock::now();
  const auto busy_poll = ToClock(options_.busy_poll);
  while (!stopping_) {
    if (drivers_ > 0) {
      // Threads drive progress themselves; stay out of their way (no lock contention, no
      // wake-ups on the worker fd), but look back soon in case they stop.
      Sleep(wake_fd_, -1, kStandbyCheck);
      Drain(wake_fd_);
      continue;
    }
    std::unique_lock<std::recursive_mutex> lock(mutex_);
    if (drivers_ > 0) continue;
    const auto now = Clock::now();
    if (ProgressLocked(now)) {
      last_activity = now;
      continue;
    }
    if (now - last_activity < busy_poll) {
      lock.unlock();
      std::this_thread::yield();  // as in Drive
      continue;
    }
    if (worker_fd_ >= 0 && ucp_worker_arm(worker_) == UCS_ERR_BUSY) continue;
    const Clock::time_point until = NextWakeLocked(now + kMaxSleep);
    lock.unlock();
    Sleep(wake_fd_, worker_fd_, worker_fd_ >= 0 ? until - now : std::chrono::milliseconds(1));
    Drain(wake_fd_);
    last_activity = Clock::now();  // spin again briefly after a wake-up
  }
}

void UcxNode::Impl::ShutdownLocked() {
  // Fail what is outstanding, then close endpoints with a bounded wait.
  for (auto& [id, call] : calls_) {
    Complete(*call.reply, absl::CancelledError(absl::StrCat(options_.name, ": shutting down")));
  }
  calls_.clear();
  for (IncomingRequest& request : requests_) {
    node_->buffers_.Release(std::move(request.message));
  }
  requests_.clear();
  for (DeferredSend& send : deferred_sends_) node_->buffers_.Release(std::move(send.data));
  deferred_sends_.clear();
  // Error callbacks fired by the closes below find no peer and do nothing (no second close).
  peer_of_ep_.clear();
  std::vector<void*> closing;
  auto close = [&](ucp_ep_h ep) {
    ucp_request_param_t param{};
    param.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
    param.flags = UCP_EP_CLOSE_FLAG_FORCE;
    void* request = ucp_ep_close_nbx(ep, &param);
    if (request != nullptr && !UCS_PTR_IS_ERR(request)) closing.push_back(request);
  };
  for (ucp_ep_h ep : deferred_closes_) close(ep);
  deferred_closes_.clear();
  for (auto& [id, peer] : peers_) {
    if (peer.ep == nullptr) continue;
    close(peer.ep);
    peer.ep = nullptr;
  }
  const auto deadline = Clock::now() + std::chrono::seconds(1);
  while (Clock::now() < deadline) {
    in_progress_ = true;
    ucp_worker_progress(worker_);
    in_progress_ = false;
    bool all_done = inflight_ops_ == 0;
    for (void* request : closing) {
      if (ucp_request_check_status(request) == UCS_INPROGRESS) all_done = false;
    }
    if (all_done) break;
  }
  for (void* request : closing) {
    if (ucp_request_check_status(request) != UCS_INPROGRESS) ucp_request_free(request);
  }
  // Whatever callbacks deferred meanwhile goes nowhere now.
  for (DeferredSend& send : deferred_sends_) node_->buffers_.Release(std::move(send.data));
  deferred_sends_.clear();
  deferred_closes_.clear();
  peers_.clear();
  peer_of_ep_.clear();
}

void UcxNode::Impl::CheckDeadlines() {
  if (calls_.empty()) return;
  const auto now = Clock::now();
  std::vector<uint64_t> expired;
  for (auto& [id, call] : calls_) {
    if (call.deadline <= now) expired.push_back(id);
  }
  for (uint64_t id : expired) {
    FailCall(id, absl::DeadlineExceededError(
                     absl::StrCat(options_.name, ": no reply to call ", id, " in time")));
  }
}

void UcxNode::Impl::FailCall(uint64_t call_id, absl::Status status) {
  auto it = calls_.find(call_id);
  if (it == calls_.end()) return;
  Complete(*it->second.reply, std::move(status));
  calls_.erase(it);
  WakeSleepersLocked();
}

void UcxNode::Impl::FailPeer(PeerId peer_id, absl::Status status) {
  std::vector<uint64_t> failed;
  for (auto& [id, call] : calls_) {
    if (call.peer == peer_id) failed.push_back(id);
  }
  for (uint64_t id : failed) FailCall(id, status);
}

void UcxNode::Impl::CloseEndpoint(ucp_ep_h ep) {
  ucp_request_param_t param{};
  param.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
  param.flags = UCP_EP_CLOSE_FLAG_FORCE;
  void* request = ucp_ep_close_nbx(ep, &param);
  // A forced close completes without the peer; free the request whenever it finishes.
  if (request != nullptr && !UCS_PTR_IS_ERR(request)) ucp_request_free(request);
}

void UcxNode::Impl::ClosePeerEndpoint(Peer& peer) {
  if (peer.ep == nullptr) return;
  peer_of_ep_.erase(peer.ep);
  if (in_progress_) {
    deferred_closes_.push_back(peer.ep);
  } else {
    CloseEndpoint(peer.ep);
  }
  peer.ep = nullptr;
}

PeerId UcxNode::Impl::AddPeer(ucp_ep_h ep, std::string name) {
  const PeerId id = next_peer_++;
  peers_[id] = Peer{ep, std::move(name), absl::OkStatus()};
  peer_of_ep_[ep] = id;
  return id;
}

absl::StatusOr<ucp_ep_h> UcxNode::Impl::CreateEndpoint(ucp_ep_params_t& params) {
  params.field_mask |= UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE | UCP_EP_PARAM_FIELD_ERR_HANDLER;
  params.err_mode = UCP_ERR_HANDLING_MODE_PEER;
  params.err_handler.cb = &Impl::OnEndpointError;
  params.err_handler.arg = this;
  ucp_ep_h ep = nullptr;
  FERRY_RETURN_IF_ERROR(UcsToStatus(ucp_ep_create(worker_, &params, &ep), "ucp_ep_create"));
  return ep;
}

void UcxNode::Impl::OnConnRequest(ucp_conn_request_h request, void* arg) {
  Impl* self = static_cast<Impl*>(arg);
  if (self->stopping_) {
    ucp_listener_reject(self->listener_, request);
    return;
  }
  ucp_ep_params_t params{};
  params.field_mask = UCP_EP_PARAM_FIELD_CONN_REQUEST;
  params.conn_request = request;
  absl::StatusOr<ucp_ep_h> ep = self->CreateEndpoint(params);
  if (!ep.ok()) {
    FERRY_LOG_ERROR("{}: accepting a connection failed: {}", self->options_.name,
                    ep.status().ToString());
    return;
  }
  const PeerId id = self->AddPeer(*ep, "accepted");
  FERRY_LOG_DEBUG("{}: accepted peer {}", self->options_.name, id);
}

void UcxNode::Impl::OnEndpointError(void* arg, ucp_ep_h ep, ucs_status_t status) {
  Impl* self = static_cast<Impl*>(arg);
  auto it = self->peer_of_ep_.find(ep);
  if (it == self->peer_of_ep_.end()) return;
  const PeerId id = it->second;
  Peer& peer = self->peers_[id];
  peer.error = UcsToStatus(status, absl::StrCat(self->options_.name, ": peer ", id, " (",
                                                peer.name, ") failed"));
  // A peer error is decided here, so it is logged here (once). A client going away is routine
  // for a server; a server going away is not, for its clients.
  if (peer.name == "accepted") {
    FERRY_LOG_INFO("{}", peer.error.ToString());
  } else {
    FERRY_LOG_WARN("{}", peer.error.ToString());
  }
  self->FailPeer(id, peer.error);
  // The endpoint is unusable; close it outside the callback.
  self->peer_of_ep_.erase(it);
  self->deferred_closes_.push_back(ep);
  peer.ep = nullptr;
}

ucs_status_t UcxNode::Impl::OnAmRequest(void* arg, const void* header, size_t header_length,
                                        void* data, size_t length,
                                        const ucp_am_recv_param_t* param) {
  return static_cast<Impl*>(arg)->OnAm(true, header, header_length, data, length, param);
}

ucs_status_t UcxNode::Impl::OnAmReply(void* arg, const void* header, size_t header_length,
                                      void* data, size_t length,
                                      const ucp_am_recv_param_t* param) {
  return static_cast<Impl*>(arg)->OnAm(false, header, header_length, data, length, param);
}

ucs_status_t UcxNode::Impl::OnAmPing(void* arg, const void* header, size_t header_length,
                                     void* /*data*/, size_t /*length*/,
                                     const ucp_am_recv_param_t* param) {
  Impl* self = static_cast<Impl*>(arg);
  if (header_length != sizeof(uint64_t) ||
      (param->recv_attr & UCP_AM_RECV_ATTR_FIELD_REPLY_EP) == 0) {
    return UCS_OK;
  }
  auto it = self->peer_of_ep_.find(param->reply_ep);
  if (it == self->peer_of_ep_.end()) return UCS_OK;
  uint64_t call_id;
  std::memcpy(&call_id, header, sizeof(call_id));
  self->SendOrDefer(it->second, kAmReply, call_id, Buffer(0), false).IgnoreError();
  return UCS_OK;
}

ucs_status_t UcxNode::Impl::OnAm(bool is_request, const void* header, size_t header_length,
                                 void* data, size_t length, const ucp_am_recv_param_t* param) {
  if (header_length != sizeof(uint64_t)) {
    FERRY_LOG_WARN("{}: dropping a message with a {}-byte transport header", options_.name,
                   header_length);
    return UCS_OK;
  }
  uint64_t call_id;
  std::memcpy(&call_id, header, sizeof(call_id));
  PeerId peer = 0;
  if (is_request) {
    if ((param->recv_attr & UCP_AM_RECV_ATTR_FIELD_REPLY_EP) == 0 || param->reply_ep == nullptr) {
      FERRY_LOG_WARN("{}: dropping a request without a reply endpoint", options_.name);
      return UCS_OK;
    }
    auto it = peer_of_ep_.find(param->reply_ep);
    if (it == peer_of_ep_.end()) return UCS_OK;  // endpoint already failed
    peer = it->second;
  } else if (calls_.count(call_id) == 0) {
    return UCS_OK;  // a late reply to a call that already timed out
  }
  if (length > options_.max_message_bytes) {
    Deliver(is_request, peer, call_id,
            absl::ResourceExhaustedError(absl::StrCat("message of ", length,
                                                      " bytes exceeds the limit of ",
                                                      options_.max_message_bytes)));
    return UCS_OK;  // not receiving a rendezvous payload drops it
  }
  Buffer buffer = node_->buffers_.Acquire(length);
  if ((param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) == 0) {
    ++stats_.eager_received;
    if (length > 0) std::memcpy(buffer.data(), data, length);
    Deliver(is_request, peer, call_id, std::move(buffer));
    return UCS_OK;
  }
  // Rendezvous: UCX pulls the payload straight into our buffer.
  ++stats_.rendezvous_received;
  auto* op = new RecvOp{this, call_id, is_request, peer, std::move(buffer)};
  ucp_request_param_t recv_param{};
  recv_param.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
  recv_param.cb.recv_am = &Impl::OnRecvDone;
  recv_param.user_data = op;
  void* request = ucp_am_recv_data_nbx(worker_, data, op->data.data(), length, &recv_param);
  if (request == nullptr) {
    OnRecvDone(nullptr, UCS_OK, length, op);
  } else if (UCS_PTR_IS_ERR(request)) {
    OnRecvDone(nullptr, UCS_PTR_STATUS(request), 0, op);
  } else {
    ++inflight_ops_;
  }
  return UCS_OK;
}

void UcxNode::Impl::OnRecvDone(void* request, ucs_status_t status, size_t /*length*/,
                               void* user_data) {
  std::unique_ptr<RecvOp> op(static_cast<RecvOp*>(user_data));
  Impl* self = op->impl;
  if (request != nullptr) {
    --self->inflight_ops_;
    ucp_request_free(request);
  }
  if (status != UCS_OK) {
    self->node_->buffers_.Release(std::move(op->data));
    self->Deliver(op->is_request, op->peer, op->call_id,
                  UcsToStatus(status, absl::StrCat(self->options_.name, ": rendezvous receive")));
    return;
  }
  self->Deliver(op->is_request, op->peer, op->call_id, std::move(op->data));
}

void UcxNode::Impl::Deliver(bool is_request, PeerId peer, uint64_t call_id,
                            absl::StatusOr<Buffer> data) {
  if (is_request) {
    if (handler_) {
      handler_(peer, call_id, std::move(data));
    } else {
      IncomingRequest request{peer, call_id, data.status(), Buffer()};
      if (data.ok()) request.message = std::move(*data);
      requests_.push_back(std::move(request));
      WakeSleepersLocked();
    }
    return;
  }
  auto it = calls_.find(call_id);
  if (it == calls_.end()) {
    if (data.ok()) node_->buffers_.Release(std::move(*data));
    return;
  }
  Complete(*it->second.reply, std::move(data));
  calls_.erase(it);
  WakeSleepersLocked();
}

absl::Status UcxNode::Impl::SendOrDefer(PeerId peer, unsigned am_id, uint64_t call_id,
                                        Buffer data, bool request) {
  if (in_progress_) {
    deferred_sends_.push_back(DeferredSend{peer, am_id, call_id, std::move(data), request});
    return absl::OkStatus();
  }
  return SendAm(peer, am_id, call_id, std::move(data), request);
}

absl::Status UcxNode::Impl::SendAm(PeerId peer_id, unsigned am_id, uint64_t call_id, Buffer data,
                                   bool request) {
  auto it = peers_.find(peer_id);
  if (it == peers_.end()) {
    node_->buffers_.Release(std::move(data));
    return absl::NotFoundError(absl::StrCat(options_.name, ": unknown peer ", peer_id));
  }
  if (!it->second.error.ok() || it->second.ep == nullptr) {
    node_->buffers_.Release(std::move(data));
    return it->second.error.ok() ? absl::UnavailableError(absl::StrCat(
                                       options_.name, ": peer ", peer_id, " disconnected"))
                                 : it->second.error;
  }
  // Small messages go eagerly on every transport; only larger ones need the endpoint's limit.
  const bool eager = data.size() <= std::min(options_.eager_limit_shared_memory,
                                             options_.eager_limit) ||
                     data.size() <= EagerLimitLocked(peer_id, it->second);
  auto* op = new SendOp{this, call_id, request, peer_id, std::move(data)};
  ucp_request_param_t param{};
  param.op_attr_mask =
      UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_FLAGS;
  param.cb.send = &Impl::OnSendDone;
  param.user_data = op;
  // REPLY: the receiver learns which endpoint to answer on.
  param.flags = UCP_AM_SEND_FLAG_REPLY | (eager ? UCP_AM_SEND_FLAG_EAGER : UCP_AM_SEND_FLAG_RNDV);
  // The header is copied by UCX before ucp_am_send_nbx returns; the data stays with op.
  void* status_ptr = ucp_am_send_nbx(it->second.ep, am_id, &op->call_id, sizeof(op->call_id),
                                     op->data.data(), op->data.size(), &param);
  if (status_ptr == nullptr) {
    node_->buffers_.Release(std::move(op->data));
    delete op;
    return absl::OkStatus();
  }
  if (UCS_PTR_IS_ERR(status_ptr)) {
    node_->buffers_.Release(std::move(op->data));
    delete op;
    return UcsToStatus(UCS_PTR_STATUS(status_ptr),
                       absl::StrCat(options_.name, ": send to peer ", peer_id));
  }
  ++inflight_ops_;
  return absl::OkStatus();
}

void UcxNode::Impl::OnSendDone(void* request, ucs_status_t status, void* user_data) {
  std::unique_ptr<SendOp> op(static_cast<SendOp*>(user_data));
  Impl* self = op->impl;
  --self->inflight_ops_;
  ucp_request_free(request);
  self->node_->buffers_.Release(std::move(op->data));
  if (status != UCS_OK && op->is_request) {
    self->FailCall(op->call_id, UcsToStatus(status, absl::StrCat(self->options_.name,
                                                                 ": send to peer ", op->peer)));
  }
}

absl::StatusOr<int> UcxNode::Impl::Listen(const std::string& host, int port) {
  FERRY_ASSIGN_OR_RETURN(sockaddr_in addr, ResolveIpv4(host, port));
  std::lock_guard<std::recursive_mutex> lock(mutex_);
  if (worker_ == nullptr) return Stopped();
  if (listener_ != nullptr) return absl::FailedPreconditionError("already listening");
  ucp_listener_params_t params{};
  params.field_mask = UCP_LISTENER_PARAM_FIELD_SOCK_ADDR | UCP_LISTENER_PARAM_FIELD_CONN_HANDLER;
  params.sockaddr.addr = reinterpret_cast<const sockaddr*>(&addr);
  params.sockaddr.addrlen = sizeof(addr);
  params.conn_handler.cb = &Impl::OnConnRequest;
  params.conn_handler.arg = this;
  FERRY_RETURN_IF_ERROR(UcsToStatus(ucp_listener_create(worker_, &params, &listener_),
                                    absl::StrCat(options_.name, ": listen on ", host, ":", port)));
  ucp_listener_attr_t attr{};
  attr.field_mask = UCP_LISTENER_ATTR_FIELD_SOCKADDR;
  FERRY_RETURN_IF_ERROR(UcsToStatus(ucp_listener_query(listener_, &attr), "ucp_listener_query"));
  return static_cast<int>(ntohs(reinterpret_cast<const sockaddr_in*>(&attr.sockaddr)->sin_port));
}

absl::StatusOr<PeerId> UcxNode::Impl::Connect(const std::string& host, int port) {
  FERRY_ASSIGN_OR_RETURN(sockaddr_in addr, ResolveIpv4(host, port));
  PeerId id = 0;
  {
    std::lock_guard<std::recursive_mutex> lock(mutex_);
    if (worker_ == nullptr) return Stopped();
    if (in_progress_) return absl::FailedPreconditionError("Connect() inside a callback");
    ucp_ep_params_t params{};
    params.field_mask = UCP_EP_PARAM_FIELD_FLAGS | UCP_EP_PARAM_FIELD_SOCK_ADDR;
    params.flags = UCP_EP_PARAMS_FLAGS_CLIENT_SERVER;
    params.sockaddr.addr = reinterpret_cast<const sockaddr*>(&addr);
    params.sockaddr.addrlen = sizeof(addr);
    FERRY_ASSIGN_OR_RETURN(ucp_ep_h ep, CreateEndpoint(params));
    id = AddPeer(ep, absl::StrCat(host, ":", port));
  }
  // Handshake: one small message, answered by the peer's transport, completes UCX's wire-up
  // before any real traffic. (UCX 1.13 asserts when larger AM sends queued during wire-up are
  // replayed onto shared-memory lanes; a small first message avoids that and also makes an
  // unreachable peer an error here.)
  ReplyFuture ping = Call(id, Buffer(0), options_.call_timeout, kAmPing);
  CallResult reply = Await(ping, options_.call_timeout);
  if (!reply.ok()) {
    Disconnect(id);
    return absl::Status(reply.status().code(),
                        absl::StrCat("connect to ", host, ":", port, ": ",
                                     reply.status().message()));
  }
  node_->buffers_.Release(std::move(*reply));
  return id;
}

ReplyFuture UcxNode::Impl::Call(PeerId peer, Buffer message, absl::Duration timeout,
                                unsigned am_id) {
  if (timeout <= absl::ZeroDuration()) timeout = options_.call_timeout;
  auto reply = std::make_shared<ReplyFuture::Slot>();
  ReplyFuture future(reply);
  std::lock_guard<std::recursive_mutex> lock(mutex_);
  if (stopping_ || worker_ == nullptr) {
    node_->buffers_.Release(std::move(message));
    Complete(*reply, Stopped());
    return future;
  }
  const uint64_t call_id = next_call_++;
  calls_.emplace(call_id, PendingCall{peer, Clock::now() + ToClock(timeout), std::move(reply)});
  // No wake-up of the progress thread: the caller awaits next (and drives the send), and a call
  // nobody awaits is progressed by the progress thread within its next deadline check.
  absl::Status sent = SendOrDefer(peer, am_id, call_id, std::move(message), true);
  if (!sent.ok()) FailCall(call_id, std::move(sent));
  return future;
}

CallResult UcxNode::Impl::Await(ReplyFuture& future, absl::Duration timeout) {
  if (!future.valid()) return absl::InvalidArgumentError("Await: no call (already awaited?)");
  auto ready = [&] { return future.ready(); };
  if (timeout <= absl::ZeroDuration()) timeout = options_.call_timeout;
  // The call's own deadline completes it; the slack covers a descheduled process.
  const auto deadline = Clock::now() + ToClock(timeout + absl::Seconds(1));
  if (!ready()) Drive(ready, deadline);
  // After shutdown every call is complete; a caller inside a callback (which must not wait)
  // gets its future only if it was already done.
  if (!ready()) {
    return stopping_ ? Stopped()
                     : absl::DeadlineExceededError(absl::StrCat(options_.name,
                                                                ": call not completed"));
  }
  std::shared_ptr<ReplyFuture::Slot> slot = std::move(future.slot_);
  return std::move(slot->result);
}

absl::StatusOr<IncomingRequest> UcxNode::Impl::NextRequest(absl::Duration timeout) {
  // Reading requests_ needs the lock; Drive's ready() tries it (uncontended while this thread is
  // the one progressing, and the recursive lock is this thread's own after a progress call).
  auto ready = [&] {
    std::unique_lock<std::recursive_mutex> lock(mutex_, std::try_to_lock);
    return lock.owns_lock() && (!requests_.empty() || handler_ || worker_ == nullptr);
  };
  if (!ready()) Drive(ready, Clock::now() + ToClock(timeout));
  std::lock_guard<std::recursive_mutex> lock(mutex_);
  if (handler_) return absl::FailedPreconditionError("a request handler is set");
  if (requests_.empty()) {
    if (stopping_ || worker_ == nullptr) return Stopped();
    return absl::DeadlineExceededError(absl::StrCat(options_.name, ": no request in time"));
  }
  IncomingRequest request = std::move(requests_.front());
  requests_.pop_front();
  return request;
}

absl::Status UcxNode::Impl::Reply(PeerId peer, uint64_t call_id, Buffer message) {
  std::lock_guard<std::recursive_mutex> lock(mutex_);
  if (stopping_ || worker_ == nullptr) {
    node_->buffers_.Release(std::move(message));
    return Stopped();
  }
  return SendOrDefer(peer, kAmReply, call_id, std::move(message), false);
}

absl::StatusOr<std::string> UcxNode::Impl::DescribePeer(PeerId peer_id) {
  std::lock_guard<std::recursive_mutex> lock(mutex_);
  auto it = peers_.find(peer_id);
  if (it == peers_.end() || it->second.ep == nullptr) {
    return absl::NotFoundError(absl::StrCat("no endpoint for peer ", peer_id));
  }
  std::string text = EndpointInfo(it->second.ep);
  if (text.empty()) return absl::InternalError("ucp_ep_print_info gave nothing");
  return text;
}

absl::StatusOr<size_t> UcxNode::Impl::EagerLimit(PeerId peer_id) {
  std::lock_guard<std::recursive_mutex> lock(mutex_);
  auto it = peers_.find(peer_id);
  if (it == peers_.end() || it->second.ep == nullptr) {
    return absl::NotFoundError(absl::StrCat("no endpoint for peer ", peer_id));
  }
  return EagerLimitLocked(peer_id, it->second);
}

size_t UcxNode::Impl::EagerLimitLocked(PeerId id, Peer& peer) {
  if (peer.eager_limit.has_value()) return *peer.eager_limit;
  if (peer.ep == nullptr) return options_.eager_limit;
  const EndpointLanes lanes = ParseEndpointLanes(EndpointInfo(peer.ep));
  if (lanes.am_transport.empty()) return options_.eager_limit;  // lanes not chosen yet
  const bool split = IsSharedMemoryTransport(lanes.am_transport) && lanes.rendezvous_over_network;
  peer.eager_limit = split ? options_.eager_limit_shared_memory : options_.eager_limit;
  FERRY_LOG_DEBUG("{}: peer {} active messages over {}, rendezvous over {}, eager up to {} bytes",
                  options_.name, id, lanes.am_transport,
                  lanes.rendezvous_over_network ? "the network" : "shared memory or the AM lane",
                  *peer.eager_limit);
  return *peer.eager_limit;
}

void UcxNode::Impl::Disconnect(PeerId peer_id) {
  std::lock_guard<std::recursive_mutex> lock(mutex_);
  auto it = peers_.find(peer_id);
  if (it == peers_.end() || worker_ == nullptr) return;
  FailPeer(peer_id, absl::CancelledError(absl::StrCat("peer ", peer_id, " disconnected")));
  ClosePeerEndpoint(it->second);
  peers_.erase(it);
}

absl::Status UcxNode::Impl::PeerStatus(PeerId peer_id) {
  std::lock_guard<std::recursive_mutex> lock(mutex_);
  auto it = peers_.find(peer_id);
  if (it == peers_.end()) return absl::NotFoundError(absl::StrCat("unknown peer ", peer_id));
  return it->second.error;
}

void UcxNode::Impl::SetRequestHandler(RequestHandler handler) {
  std::lock_guard<std::recursive_mutex> lock(mutex_);
  handler_ = std::move(handler);
}

UcxNode::UcxNode(const UcxNodeOptions& options) : options_(options) {}

UcxNode::~UcxNode() { Shutdown(); }

absl::StatusOr<std::unique_ptr<UcxNode>> UcxNode::Create(const UcxNodeOptions& options) {
  std::unique_ptr<UcxNode> node(new UcxNode(options));
  node->impl_ = std::make_unique<Impl>(node.get());
  FERRY_RETURN_IF_ERROR(node->impl_->Init());
  return node;
}

void UcxNode::SetRequestHandler(RequestHandler handler) {
  impl_->SetRequestHandler(std::move(handler));
}

absl::StatusOr<IncomingRequest> UcxNode::NextRequest(absl::Duration timeout) {
  return impl_->NextRequest(timeout);
}

absl::StatusOr<int> UcxNode::Listen(const std::string& host, int port) {
  return impl_->Listen(host, port);
}

absl::StatusOr<PeerId> UcxNode::Connect(const std::string& host, int port) {
  return impl_->Connect(host, port);
}

ReplyFuture UcxNode::Call(PeerId peer, Buffer message, absl::Duration timeout) {
  return impl_->Call(peer, std::move(message), timeout);
}

CallResult UcxNode::Await(ReplyFuture& future, absl::Duration timeout) {
  return impl_->Await(future, timeout);
}

absl::Status UcxNode::Reply(PeerId peer, uint64_t call_id, Buffer message) {
  return impl_->Reply(peer, call_id, std::move(message));
}

absl::StatusOr<std::string> UcxNode::DescribePeer(PeerId peer) { return impl_->DescribePeer(peer); }

absl::StatusOr<size_t> UcxNode::EagerLimit(PeerId peer) { return impl_->EagerLimit(peer); }

UcxNodeStats UcxNode::stats() { return impl_->stats(); }

void UcxNode::Disconnect(PeerId peer) { impl_->Disconnect(peer); }

absl::Status UcxNode::PeerStatus(PeerId peer) { return impl_->PeerStatus(peer); }

bool UcxNode::SupportsCudaMemory() const { return impl_->SupportsCudaMemory(); }

void UcxNode::Shutdown() {
  if (impl_) impl_->Stop();
}

}  // namespace ferry::transport
