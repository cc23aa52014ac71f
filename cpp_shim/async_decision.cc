// llmproxy Envoy shim: the PENDING decision hand-off (AsyncDecision, see async_decision.h) and the
// watchdog that keeps each pending pick's deadline.

#include "async_decision.h"

#include <chrono>
#include <condition_variable>
#include <map>
#include <thread>
#include <utility>

#include "common.h"

namespace llmproxy_envoy {
namespace {

// A decision nobody will apply: the stream is gone or was decided locally.
void finish_unapplied(llmproxy_request *req) {
  llmproxy_request_finish_outcome(req, kClientGoneStatus, LLMPROXY_OUTCOME_LOCAL);
}

// Wakes the worker (on_scheduled runs there) and releases the scheduler; any thread.
void resume(void *scheduler) {
  if (!scheduler) return;
  envoy_dynamic_module_callback_http_filter_scheduler_commit(scheduler, kResumeEvent);
  envoy_dynamic_module_callback_http_filter_scheduler_delete(scheduler);
}

// The llmproxy_pick_callback: `user_data` is a heap-held reference to the state.
void on_pick_done(void *user_data, llmproxy_request *req) noexcept {
  try {
    std::unique_ptr<std::shared_ptr<AsyncDecision>> ref(static_cast<std::shared_ptr<AsyncDecision> *>(user_data));
    (*ref)->deliver(req);
  } catch (...) {
    // Nothing sensible to do on a foreign thread; never let it unwind into the library.
  }
}

// ---- Deadline for PENDING picks ----
// Envoy 1.40's HTTP filter ABI has no timer, so one shim-wide thread (started at the first
// PENDING pick, never stopped: the module pins itself in memory) watches the deadlines and
// expires the overdue decisions. It holds them weakly: a stream that ended is forgotten.
class PickWatchdog {
 public:
  using Clock = std::chrono::steady_clock;

  static PickWatchdog &instance() {
    static PickWatchdog *w = new PickWatchdog();  // never destroyed: its thread may outlive main()
    return *w;
  }

  // Returns false when the watchdog thread cannot run (the stream then waits for the callback).
  bool watch(const std::shared_ptr<AsyncDecision> &decision, uint64_t deadline_ms) noexcept {
    try {
      std::lock_guard<std::mutex> lock(mu_);
      if (!started_) {
        std::thread([this] { run(); }).detach();
        started_ = true;
      }
      due_.emplace(Clock::now() + std::chrono::milliseconds(deadline_ms), decision);
      cv_.notify_one();
      return true;
    } catch (...) {
      return false;
    }
  }

 private:
  void run() noexcept {
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      if (due_.empty()) {
        cv_.wait(lock);
      } else if (Clock::now() < due_.begin()->first) {
        cv_.wait_until(lock, due_.begin()->first);
      } else {
        std::shared_ptr<AsyncDecision> decision = due_.begin()->second.lock();
        due_.erase(due_.begin());
        lock.unlock();
        if (decision) decision->expire();
        lock.lock();
      }
    }
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::multimap<Clock::time_point, std::weak_ptr<AsyncDecision>> due_;
  bool started_ = false;
};

}  // namespace

llmproxy_status AsyncDecision::pick_async(llmproxy_router *router, const std::vector<llmproxy_header> &headers,
                                          const std::string &body, llmproxy_request **out) {
  auto *ref = new std::shared_ptr<AsyncDecision>(shared_from_this());
  const llmproxy_status st =
      llmproxy_pick_async(router, headers.data(), headers.size(), reinterpret_cast<const uint8_t *>(body.data()),
                          body.size(), on_pick_done, ref, out);
  if (st != LLMPROXY_PENDING) delete ref;  // the callback never runs
  return st;
}

AsyncDecision::Result AsyncDecision::arm(void *envoy_filter, uint64_t deadline_ms) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stage_ != Stage::Waiting) return take_locked();
    scheduler_ = envoy_dynamic_module_callback_http_filter_scheduler_new(envoy_filter);
  }
  PickWatchdog::instance().watch(shared_from_this(), deadline_ms);
  return Result{Result::NotYet, nullptr};
}

AsyncDecision::Result AsyncDecision::take() {
  std::lock_guard<std::mutex> lock(mu_);
  return take_locked();
}

AsyncDecision::Result AsyncDecision::take_locked() {
  switch (stage_) {
    case Stage::Delivered:
      stage_ = Stage::Taken;
      return Result{Result::Decided, std::exchange(result_, nullptr)};
    case Stage::Overdue:
      stage_ = Stage::Taken;
      return Result{Result::Overdue, nullptr};
    default:
      return Result{Result::NotYet, nullptr};
  }
}

void AsyncDecision::abandon() noexcept {
  llmproxy_request *orphan = nullptr;
  void *scheduler = nullptr;
  {
    std::lock_guard<std::mutex> lock(mu_);
    stage_ = Stage::Abandoned;
    orphan = std::exchange(result_, nullptr);
    scheduler = std::exchange(scheduler_, nullptr);
  }
  if (orphan) finish_unapplied(orphan);
  if (scheduler) envoy_dynamic_module_callback_http_filter_scheduler_delete(scheduler);
}

void AsyncDecision::deliver(llmproxy_request *req) noexcept {
  void *scheduler = nullptr;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stage_ == Stage::Waiting) {
      stage_ = Stage::Delivered;
      result_ = std::exchange(req, nullptr);
      scheduler = std::exchange(scheduler_, nullptr);  // NULL when it arrived before arm()
    }
  }
  if (req) finish_unapplied(req);
  resume(scheduler);
}

void AsyncDecision::expire() noexcept {
  void *scheduler = nullptr;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stage_ != Stage::Waiting || scheduler_ == nullptr) return;  // decided in time, or gone
    stage_ = Stage::Overdue;
    scheduler = std::exchange(scheduler_, nullptr);
  }
  resume(scheduler);
}

}  // namespace llmproxy_envoy
