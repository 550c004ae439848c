// One UCX node: a UCP context and worker, progressed by the threads that wait on it (and a
// background thread between them), a listener, endpoints to peers, and request/reply messaging
// over UCP active messages.
//
// Messages are opaque byte buffers (runtime/offload frames them). A request carries a call id in
// its active-message header; the reply carries the same id back, so a reply finds its caller
// even when the request's own frame was too broken to parse. Messages up to a per-endpoint eager
// limit go eagerly, larger ones by UCP's active-message rendezvous (RNDV pulls the payload straight
// into the receiver's buffer instead of one huge eager message).
//
// Rendezvous protocol: with PEER error handling, UCX 1.13 gives rendezvous only lanes whose memory
// domain can invalidate a registration or that are connected point to point, which on one host
// leaves cma out (and sysv/posix cannot register memory at all) but lets tcp in: under UCX's
// default scheme an endpoint whose active messages use shared memory sends its rendezvous data by
// tcp put_zcopy, several times slower than copies through shared memory. So the node sets UCX's
// rendezvous scheme to get_zcopy (options.rendezvous_scheme): lanes that cannot get take no
// rendezvous role and the data goes as active-message fragments on the AM lane (shared memory
// here, tcp between hosts), straight into the receive buffer; RDMA lanes read it. That is the
// protocol ucx_perftest -e uses too (its endpoints, made from worker addresses, get no tcp
// rendezvous lanes), and on tcp it measured even with put_zcopy (bench/RESULTS.md).
// The eager limit follows the endpoint's lanes (EagerLimit(); read once wire-up is done):
// options.eager_limit normally, options.eager_limit_shared_memory where active messages use
// shared memory but rendezvous data would leave it (a scheme that gives tcp a rendezvous role):
// then large eager copies through shared memory beat rendezvous over tcp.
//
// Reliability: every endpoint uses error-handling mode PEER and UCX keepalive
// (options.keepalive_interval). Every call has a deadline (options.call_timeout unless given): a
// peer that dies, resets the connection or stays silent fails each outstanding call to it with an
// error by then (Unavailable on a peer error, DeadlineExceeded on silence). Shutdown() cancels
// outstanding calls, force-closes endpoints with a bounded wait and joins the thread; it never
// hangs.
//
// Memory: message buffers come from a BufferPool and go back to it when sent or consumed, so
// steady traffic reuses the same host allocations (and UCX's registration cache hits for
// rendezvous). Messages are host memory: SupportsCudaMemory() says whether this UCX build could
// take device pointers (Debian's UCX 1.13 cannot), so a CUDA worker gives the pool a pinned-memory
// allocator and copies between frames and the device itself.
//
// Threads and progress: one lock guards the UCP worker (UCS_THREAD_MODE_SERIALIZED) and the
// node's state, and any thread may take it to progress the worker. The hot paths are driven by
// the threads that use them, with no hand-off between threads: Call() sends from the caller's
// thread; Await() progresses the worker on the caller's thread until the reply is there,
// spinning for options.busy_poll after the last activity (yielding the core between polls, so a
// peer on the same core still runs), then sleeping on the worker's wakeup fd (and a per-thread
// eventfd another thread writes when it completes this thread's wait), each sleep bounded by the
// nearest deadline; a server thread takes requests with NextRequest(), which
// waits the same way, and answers with Reply(), which sends from its thread. A background
// progress thread covers the idle gaps (no thread waiting in Await or NextRequest): incoming
// connections, keepalive, calls nobody awaits yet, requests while the server thread computes;
// it steps back while a thread drives. Request handlers (SetRequestHandler) run inside progress
// on whichever thread progresses, with the lock held: they must not block, wait or call
// Shutdown(), but may Reply() (the send leaves after the progress call returns). Every public
// method is thread-safe.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "runtime/transport/buffer_pool.h"

namespace ferry::transport {

using PeerId = uint64_t;

struct UcxNodeOptions {
  std::string name = "ucx";     // names the node in logs
  std::string tls;              // UCX_TLS for this context ("tcp", "sm", ...); empty: environment
  // Connection managers for listen/connect, in order (UCX_SOCKADDR_TLS_PRIORITY, e.g. "tcp" or
  // "rdmacm,tcp"); empty: UCX's default. Without RDMA devices use "tcp": a listener on port 0
  // picked by rdmacm may leave the tcp manager unbound on that port.
  std::string connection_managers;
  absl::Duration keepalive_interval = absl::Seconds(1);
  absl::Duration call_timeout = absl::Seconds(2);  // default bound for Call()
  absl::Duration busy_poll = absl::Microseconds(50);  // spin this long after activity, then sleep
  size_t max_message_bytes = size_t{1} << 31;  // larger incoming messages are refused
  // UCX_RNDV_SCHEME for this context (see the top of this file); empty: the environment's, or
  // UCX's default (auto).
  std::string rendezvous_scheme = "get_zcopy";
  // Messages up to the eager limit go eagerly; larger ones by rendezvous (UCX's own threshold
  // picks rendezvous from ~8 KiB, whose handshake costs extra wake-ups of both sides). Each
  // endpoint takes one of two limits by its lanes (see the top of this file):
  // eager_limit_shared_memory where active messages use shared memory but rendezvous data would
  // go over the network, eager_limit otherwise. Above the larger limit, rendezvous spares the receiver UCX's
  // whole-message copy of an eager message.
  size_t eager_limit = size_t{256} << 10;
  size_t eager_limit_shared_memory = size_t{64} << 20;
};

// Messages this node received, by the protocol UCX delivered them with.
struct UcxNodeStats {
  uint64_t eager_received = 0;
  uint64_t rendezvous_received = 0;
};

// Incoming request: the peer, the call id to answer, and the message (or why it could not be
// received, e.g. too large; the server should still answer so the caller does not wait).
using RequestHandler =
    std::function<void(PeerId peer, uint64_t call_id, absl::StatusOr<Buffer> message)>;
struct IncomingRequest {
  PeerId peer = 0;
  uint64_t call_id = 0;
  absl::Status status;  // not OK: the message could not be received (it is empty then)
  Buffer message;
};

using CallResult = absl::StatusOr<Buffer>;

// A call's reply to come: returned by UcxNode::Call, redeemed once by UcxNode::Await (which
// progresses the node until it is in). Movable; ready() may be asked from any thread. Not a
// std::future: completing a std::promise costs a futex wake-up (a system call) per reply even
// with nobody asleep on it, a measurable part of a small message's round trip.
class ReplyFuture {
 public:
  ReplyFuture() = default;
  bool valid() const { return slot_ != nullptr; }
  bool ready() const { return slot_ != nullptr && slot_->done.load(std::memory_order_acquire); }

 private:
  friend class UcxNode;
  struct Slot {
    std::atomic<bool> done{false};
    CallResult result;  // written once, before done is set
  };
  explicit ReplyFuture(std::shared_ptr<Slot> slot) : slot_(std::move(slot)) {}
  std::shared_ptr<Slot> slot_;
};

class UcxNode {
 public:
  static absl::StatusOr<std::unique_ptr<UcxNode>> Create(const UcxNodeOptions& options);
  ~UcxNode();  // Shutdown()
  UcxNode(const UcxNode&) = delete;
  UcxNode& operator=(const UcxNode&) = delete;

  // A node serves requests either through a handler (set before Listen(); it runs inside
  // progress, see above) or, with none set, through a queue that NextRequest() drains.
  void SetRequestHandler(RequestHandler handler);

  // Queue mode: the next request, progressing the worker on this thread while it waits (at most
  // `timeout`). DeadlineExceeded when none came in time, Cancelled once the node shuts down,
  // FailedPrecondition when a handler is set.
  absl::StatusOr<IncomingRequest> NextRequest(absl::Duration timeout);

  // Listens on host:port (port 0 picks one); returns the port bound.
  absl::StatusOr<int> Listen(const std::string& host, int port);

  // Connects to a listener and completes a handshake with it; a peer that cannot be reached is
  // an error within the call timeout.
  absl::StatusOr<PeerId> Connect(const std::string& host, int port);

  // Sends a request. The reply always comes: the peer's, or an error no later than `timeout`
  // (call_timeout when zero) after the call.
  ReplyFuture Call(PeerId peer, Buffer message, absl::Duration timeout = {});

  // Waits for a call's reply with a bound (the call's own deadline plus slack), progressing the
  // worker on this thread meanwhile, and takes it (the future is invalid afterwards).
  CallResult Await(ReplyFuture& future, absl::Duration timeout = {});

  // Answers a request (sends from this thread). Errors (the peer is gone) are returned, not
  // logged.
  absl::Status Reply(PeerId peer, uint64_t call_id, Buffer message);

  // UCX's description of the endpoint (lanes and transports), to check which transport runs.
  absl::StatusOr<std::string> DescribePeer(PeerId peer);

  // The eager limit for messages to this peer (see UcxNodeOptions), from the transports of the
  // endpoint's lanes; options.eager_limit until UCX has chosen them.
  absl::StatusOr<size_t> EagerLimit(PeerId peer);

  UcxNodeStats stats();

  // Drops the endpoint; outstanding calls to it fail with Cancelled.
  void Disconnect(PeerId peer);

  // The error the peer's endpoint reported, or OK while it is healthy.
  absl::Status PeerStatus(PeerId peer);

  void Shutdown();

  // Whether this UCX build registers CUDA device memory (ucp_context_query's memory types).
  bool SupportsCudaMemory() const;

  BufferPool& buffers() { return buffers_; }
  const UcxNodeOptions& options() const { return options_; }

  class Impl;

 private:
  explicit UcxNode(const UcxNodeOptions& options);

  UcxNodeOptions options_;
  BufferPool buffers_;
  std::unique_ptr<Impl> impl_;
};

}  // namespace ferry::transport
