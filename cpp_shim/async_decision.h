// llmproxy Envoy shim: the hand-off of a PENDING pick's decision between the threads that may
// end it (the library's callback thread, the shim's deadline watchdog) and the worker thread of
// the stream (which applies it, or leaves). Neither foreign thread touches a filter or a stream:
// they change this shared state under its lock and wake the worker through the stream's Envoy
// scheduler (commit and delete are allowed from any thread; a commit after the stream is gone
// is a no-op). Whoever takes the scheduler out of the state commits and deletes it.
//
//   Waiting --deliver--> Delivered --take--> Taken       the decision is applied on the worker
//   Waiting --expire---> Overdue   --take--> Taken       the worker decides locally; a later
//                                                         decision is finished, never applied
//   any     --abandon--> Abandoned                        the stream ended; a decision that
//                                                         arrives (or waits) is finished
#ifndef LLMPROXY_ENVOY_ASYNC_DECISION_H
#define LLMPROXY_ENVOY_ASYNC_DECISION_H

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "llmproxy.h"

namespace llmproxy_envoy {

// The scheduler event that resumes a stream waiting for its decision.
constexpr uint64_t kResumeEvent = 1;

class AsyncDecision : public std::enable_shared_from_this<AsyncDecision> {
 public:
  // What the worker finds.
  struct Result {
    enum Kind { NotYet, Decided, Overdue } kind;
    llmproxy_request *req;  // Decided: the library's decision (NULL only if it broke its contract)
  };

  // llmproxy_pick_async with this state as the callback's target (the callback holds a reference
  // until it has delivered). PENDING: the decision comes through deliver(); any other status:
  // *out is the decision, the callback never runs.
  llmproxy_status pick_async(llmproxy_router *router, const std::vector<llmproxy_header> &headers,
                             const std::string &body, llmproxy_request **out);

  // Worker, after PENDING: the decision if it already arrived; else creates the stream's
  // scheduler, starts the deadline (the watchdog expires the pick after `deadline_ms`) and
  // returns NotYet.
  Result arm(void *envoy_filter, uint64_t deadline_ms);
  // Worker, at the resume event: the delivered decision, Overdue, or NotYet (nothing to do).
  Result take();
  // Worker, when the stream ends first: nothing reaches the stream any more.
  void abandon() noexcept;

  // The library's callback thread: hands the decision over, or finishes it when nobody will
  // apply it (499, LOCAL).
  void deliver(llmproxy_request *req) noexcept;
  // The watchdog: the deadline passed without a decision; the worker is to decide locally.
  void expire() noexcept;

 private:
  enum class Stage { Waiting, Delivered, Overdue, Taken, Abandoned };

  Result take_locked();

  std::mutex mu_;
  Stage stage_ = Stage::Waiting;
  void *scheduler_ = nullptr;           // the stream's, while the worker waits
  llmproxy_request *result_ = nullptr;  // Delivered, not yet taken
};

}  // namespace llmproxy_envoy

#endif
