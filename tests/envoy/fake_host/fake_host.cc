// Fake Envoy host: plays Envoy's side of the dynamic-module ABI (the callbacks the shim uses) so
// the shim's logic can be unit-tested quickly, with the real llmproxy library behind it.
//
// Built with -Wl,--wrap=llmproxy_pick_async so a test can make the library's pick "PENDING" and
// deliver the decision from another thread, exactly as the ABI allows (or late, past the shim's
// deadline: --wrap=llmproxy_router_pick_deadline_ms sets that deadline), and with
// --wrap=llmproxy_request_finish_outcome to see the status and outcome the shim reports.

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "envoy_dynamic_module_abi.h"
#include "llmproxy.h"
#include "llmproxy_envoy_internal.h"

// ---- the hooks under test: plain names (dynamic-module object), or "<prefix>envoy_..." when the
// static variant is tested (compile with the same -DLLMPROXY_ENVOY_HOOK_PREFIX as the shim) ----
#define LLMPROXY_CAT2(a, b) a##b
#define LLMPROXY_CAT(a, b) LLMPROXY_CAT2(a, b)
#ifdef LLMPROXY_ENVOY_HOOK_PREFIX
#define H(name) LLMPROXY_CAT(LLMPROXY_ENVOY_HOOK_PREFIX, name)
#else
#define H(name) name
#endif
extern "C" {
const char *H(envoy_dynamic_module_on_program_init)(void);
const void *H(envoy_dynamic_module_on_http_filter_config_new)(void *, envoy_dynamic_module_type_envoy_buffer,
                                                           envoy_dynamic_module_type_envoy_buffer);
void H(envoy_dynamic_module_on_http_filter_config_destroy)(const void *);
const void *H(envoy_dynamic_module_on_http_filter_new)(const void *, void *);
void H(envoy_dynamic_module_on_http_filter_destroy)(const void *);
int H(envoy_dynamic_module_on_http_filter_request_headers)(void *, const void *, bool);
int H(envoy_dynamic_module_on_http_filter_request_body)(void *, const void *, bool);
int H(envoy_dynamic_module_on_http_filter_request_trailers)(void *, const void *);
int H(envoy_dynamic_module_on_http_filter_response_headers)(void *, const void *, bool);
int H(envoy_dynamic_module_on_http_filter_response_body)(void *, const void *, bool);
void H(envoy_dynamic_module_on_http_filter_stream_complete)(void *, const void *);
void H(envoy_dynamic_module_on_http_filter_scheduled)(void *, const void *, uint64_t);
int H(envoy_dynamic_module_on_http_filter_local_reply)(void *, const void *, uint32_t,
                                                      envoy_dynamic_module_type_envoy_buffer, bool);
const void *H(envoy_dynamic_module_on_lb_config_new)(void *, envoy_dynamic_module_type_envoy_buffer,
                                                    envoy_dynamic_module_type_envoy_buffer);
void H(envoy_dynamic_module_on_lb_config_destroy)(const void *);
const void *H(envoy_dynamic_module_on_lb_new)(const void *, void *);
bool H(envoy_dynamic_module_on_lb_choose_host)(void *, const void *, void *, uint32_t *, uint32_t *);
void H(envoy_dynamic_module_on_lb_destroy)(const void *);
}

// ---------------------------------------------------------------------------------------------
// Fake stream state (the `f` pointer handed to the shim is a FakeStream*).

using Headers = std::vector<std::pair<std::string, std::string>>;

struct FakeStream {
  Headers req_headers;
  Headers resp_headers;
  std::vector<std::string> resp_received;  // ReceivedResponseBody chunks (the current frame)
  std::vector<std::string> buffered;  // BufferedRequestBody chunks
  std::vector<std::string> received;  // ReceivedRequestBody chunks (the current frame)
  bool received_is_buffered = false;
  uint64_t buffer_limit = 1 << 20;

  // What the shim did.
  int sent = 0;
  uint32_t sent_status = 0;
  std::string sent_body, sent_content_type, sent_details;
  int override_calls = 0;
  std::string override_host;
  bool override_strict = false;
  bool override_result = true;  // what set_upstream_override_host returns
  std::map<std::string, std::string> metadata;  // "ns/key" -> value
  int route_cache_cleared = 0;
  int continue_decoding = 0;
  bool has_response_code = false;
  uint64_t response_code = 0;
  std::string upstream_address;  // attribute upstream.address ("" = none)

  // Fault injection.
  bool throw_in_get_headers = false;

  // Scheduler events. Like Envoy's (a weak_ptr to the filter), a scheduler may outlive its stream:
  // a commit after the stream is gone lands in the shared record, and the test can see it.
  struct Commits {
    std::mutex mu;
    std::vector<uint64_t> events;
    std::thread::id thread;
    bool stream_gone = false;
    int after_gone = 0;
  };
  std::shared_ptr<Commits> commits = std::make_shared<Commits>();
  ~FakeStream() {
    std::lock_guard<std::mutex> lock(commits->mu);
    commits->stream_gone = true;
  }
  size_t committed_count() {
    std::lock_guard<std::mutex> lock(commits->mu);
    return commits->events.size();
  }

  std::string header(const std::string &name) const {
    for (const auto &h : req_headers)
      if (h.first == name) return h.second;
    return std::string();
  }
  int header_count(const std::string &name) const {
    int n = 0;
    for (const auto &h : req_headers) n += h.first == name;
    return n;
  }
};

struct FakeScheduler {
  std::shared_ptr<FakeStream::Commits> commits;
};

std::atomic<int> g_schedulers_live{0};
std::atomic<int> g_schedulers_created{0};
std::mutex g_log_mu;
std::vector<std::string> g_logs;

FakeStream *S(void *f) { return static_cast<FakeStream *>(f); }
std::string str(envoy_dynamic_module_type_module_buffer b) { return b.ptr ? std::string(b.ptr, b.length) : ""; }
std::string lower(std::string s) {
  for (char &c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

extern "C" {

void envoy_dynamic_module_callback_log(int level, envoy_dynamic_module_type_module_buffer message) {
  std::lock_guard<std::mutex> lock(g_log_mu);
  g_logs.push_back(std::to_string(level) + " " + str(message));
}
bool envoy_dynamic_module_callback_log_enabled(int level) { return level >= ENVOY_LOG_DEBUG; }

static Headers *headers_of(void *f, int header_type) {
  if (header_type == ENVOY_HEADER_REQUEST) return &S(f)->req_headers;
  if (header_type == ENVOY_HEADER_RESPONSE) return &S(f)->resp_headers;
  return nullptr;
}

bool envoy_dynamic_module_callback_http_get_header(void *f, int header_type, envoy_dynamic_module_type_module_buffer key,
                                                   envoy_dynamic_module_type_envoy_buffer *result, size_t index,
                                                   size_t *optional_size) {
  Headers *hs = headers_of(f, header_type);
  if (!hs) return false;
  std::string k = lower(str(key));
  size_t seen = 0;
  bool found = false;
  for (const auto &h : *hs) {
    if (h.first != k) continue;
    if (seen == index) {
      result->ptr = h.second.data();
      result->length = h.second.size();
      found = true;
    }
    ++seen;
  }
  if (optional_size) *optional_size = seen;
  if (!found) {
    result->ptr = nullptr;
    result->length = 0;
  }
  return found;
}

size_t envoy_dynamic_module_callback_http_get_headers_size(void *f, int header_type) {
  if (S(f)->throw_in_get_headers) throw std::runtime_error("injected fault in get_headers_size");
  return header_type == ENVOY_HEADER_REQUEST ? S(f)->req_headers.size() : 0;
}

bool envoy_dynamic_module_callback_http_get_headers(void *f, int header_type,
                                                    envoy_dynamic_module_type_envoy_http_header *out) {
  if (header_type != ENVOY_HEADER_REQUEST) return false;
  size_t i = 0;
  for (const auto &h : S(f)->req_headers) {
    out[i].key_ptr = h.first.data();
    out[i].key_length = h.first.size();
    out[i].value_ptr = h.second.data();
    out[i].value_length = h.second.size();
    ++i;
  }
  return true;
}

bool envoy_dynamic_module_callback_http_set_header(void *f, int header_type, envoy_dynamic_module_type_module_buffer key,
                                                   envoy_dynamic_module_type_module_buffer value) {
  Headers *target = headers_of(f, header_type);
  if (!target) return false;
  std::string k = lower(str(key));
  Headers &hs = *target;
  Headers kept;
  for (auto &h : hs)
    if (h.first != k) kept.push_back(h);
  if (value.length > 0) kept.emplace_back(k, str(value));
  hs.swap(kept);
  return true;
}

static std::vector<std::string> &body_of(void *f, int body_type) {
  static std::vector<std::string> empty;
  empty.clear();
  if (body_type == ENVOY_BODY_BUFFERED_REQUEST) return S(f)->buffered;
  if (body_type == ENVOY_BODY_RECEIVED_REQUEST) return S(f)->received;
  if (body_type == ENVOY_BODY_RECEIVED_RESPONSE) return S(f)->resp_received;
  return empty;
}

bool envoy_dynamic_module_callback_http_append_body(void *f, int body_type, envoy_dynamic_module_type_module_buffer data) {
  if (body_type == ENVOY_BODY_BUFFERED_RESPONSE) return false;
  body_of(f, body_type).push_back(str(data));
  return true;
}

bool envoy_dynamic_module_callback_http_drain_body(void *f, int body_type, size_t n) {
  auto &chunks = body_of(f, body_type);
  std::string all;
  for (auto &c : chunks) all += c;
  if (n > all.size()) return false;
  chunks.clear();
  if (n < all.size()) chunks.push_back(all.substr(n));
  return true;
}

size_t envoy_dynamic_module_callback_http_get_body_size(void *f, int body_type) {
  size_t n = 0;
  for (const auto &c : body_of(f, body_type)) n += c.size();
  return n;
}
size_t envoy_dynamic_module_callback_http_get_body_chunks_size(void *f, int body_type) {
  return body_of(f, body_type).size();
}
bool envoy_dynamic_module_callback_http_get_body_chunks(void *f, int body_type,
                                                        envoy_dynamic_module_type_envoy_buffer *out) {
  size_t i = 0;
  for (const auto &c : body_of(f, body_type)) {
    out[i].ptr = c.data();
    out[i].length = c.size();
    ++i;
  }
  return true;
}
bool envoy_dynamic_module_callback_http_received_buffered_request_body(void *f) { return S(f)->received_is_buffered; }

void envoy_dynamic_module_callback_http_send_response(void *f, uint32_t status_code,
                                                      envoy_dynamic_module_type_module_http_header *headers,
                                                      size_t headers_size,
                                                      envoy_dynamic_module_type_module_buffer body,
                                                      envoy_dynamic_module_type_module_buffer details) {
  FakeStream *s = S(f);
  s->sent++;
  s->sent_status = status_code;
  s->sent_body = str(body);
  s->sent_details = str(details);
  for (size_t i = 0; i < headers_size; ++i) {
    if (lower(std::string(headers[i].key_ptr, headers[i].key_length)) == "content-type") {
      s->sent_content_type.assign(headers[i].value_ptr, headers[i].value_length);
    }
  }
  // Like Envoy, a local reply ends the stream with that response code.
  s->has_response_code = true;
  s->response_code = status_code;
}

bool envoy_dynamic_module_callback_http_set_upstream_override_host(void *f, envoy_dynamic_module_type_module_buffer host,
                                                                   bool strict) {
  FakeStream *s = S(f);
  s->override_calls++;
  s->override_host = str(host);
  s->override_strict = strict;
  return s->override_result;
}
void envoy_dynamic_module_callback_http_set_dynamic_metadata_string(void *f, envoy_dynamic_module_type_module_buffer ns,
                                                                    envoy_dynamic_module_type_module_buffer key,
                                                                    envoy_dynamic_module_type_module_buffer value) {
  S(f)->metadata[str(ns) + "/" + str(key)] = str(value);
}
bool envoy_dynamic_module_callback_http_filter_get_attribute_int(void *f, int attribute_id, uint64_t *result) {
  if (attribute_id != ENVOY_ATTRIBUTE_RESPONSE_CODE || !S(f)->has_response_code) return false;
  *result = S(f)->response_code;
  return true;
}
bool envoy_dynamic_module_callback_http_filter_get_attribute_string(void *f, int attribute_id,
                                                                    envoy_dynamic_module_type_envoy_buffer *result) {
  if (attribute_id != ENVOY_ATTRIBUTE_UPSTREAM_ADDRESS || S(f)->upstream_address.empty()) return false;
  result->ptr = S(f)->upstream_address.data();
  result->length = S(f)->upstream_address.size();
  return true;
}
void envoy_dynamic_module_callback_http_set_buffer_limit(void *f, uint64_t limit) { S(f)->buffer_limit = limit; }
uint64_t envoy_dynamic_module_callback_http_get_buffer_limit(void *f) { return S(f)->buffer_limit; }
void envoy_dynamic_module_callback_http_clear_route_cache(void *f) { S(f)->route_cache_cleared++; }

void *envoy_dynamic_module_callback_http_filter_scheduler_new(void *f) {
  g_schedulers_live++;
  g_schedulers_created++;
  return new FakeScheduler{S(f)->commits};
}
void envoy_dynamic_module_callback_http_filter_scheduler_commit(void *sched, uint64_t event_id) {
  auto &c = *static_cast<FakeScheduler *>(sched)->commits;
  std::lock_guard<std::mutex> lock(c.mu);
  if (c.stream_gone) {
    c.after_gone++;  // Envoy would drop it (weak_ptr); a correct shim never does this
    return;
  }
  c.events.push_back(event_id);
  c.thread = std::this_thread::get_id();
}
void envoy_dynamic_module_callback_http_filter_scheduler_delete(void *sched) {
  g_schedulers_live--;
  delete static_cast<FakeScheduler *>(sched);
}
void envoy_dynamic_module_callback_http_filter_continue_decoding(void *f) { S(f)->continue_decoding++; }

}  // extern "C"

// ---- a fake cluster load balancer and its per-attempt context ----
struct FakeLb {
  std::vector<std::vector<std::string>> healthy;  // per priority: "ip:port" of the healthy hosts
};
struct FakeLbContext {
  FakeStream *stream = nullptr;  // its request headers are the LB's downstream headers
};

extern "C" {

size_t envoy_dynamic_module_callback_lb_get_priority_set_size(void *lb) { return static_cast<FakeLb *>(lb)->healthy.size(); }
size_t envoy_dynamic_module_callback_lb_get_healthy_hosts_count(void *lb, uint32_t priority) {
  auto &h = static_cast<FakeLb *>(lb)->healthy;
  return priority < h.size() ? h[priority].size() : 0;
}
bool envoy_dynamic_module_callback_lb_get_healthy_host_address(void *lb, uint32_t priority, size_t index,
                                                               envoy_dynamic_module_type_envoy_buffer *result) {
  auto &h = static_cast<FakeLb *>(lb)->healthy;
  if (priority >= h.size() || index >= h[priority].size()) return false;
  result->ptr = h[priority][index].data();
  result->length = h[priority][index].size();
  return true;
}
bool envoy_dynamic_module_callback_lb_context_get_downstream_header(void *ctx,
                                                                    envoy_dynamic_module_type_module_buffer key,
                                                                    envoy_dynamic_module_type_envoy_buffer *result,
                                                                    size_t index, size_t *optional_size) {
  auto *c = static_cast<FakeLbContext *>(ctx);
  return envoy_dynamic_module_callback_http_get_header(c->stream, ENVOY_HEADER_REQUEST, key, result, index,
                                                       optional_size);
}

// ---- --wrap of the library's pick_async: optionally PENDING, decided on another thread ----
llmproxy_status __real_llmproxy_pick_async(llmproxy_router *, const llmproxy_header *, size_t, const uint8_t *, size_t,
                                           llmproxy_pick_callback, void *, llmproxy_request **);
}  // extern "C"

struct PendingMode {
  bool enabled = false;
  bool decide_before_return = false;  // callback runs (on another thread) before pick_async returns
  bool late = false;                  // callback held until deliver_late() (past any deadline)
  int delay_ms = 20;
  std::vector<std::thread> threads;
  std::vector<std::function<void()>> held;  // late deliveries
} g_pending;

extern "C" llmproxy_status __wrap_llmproxy_pick_async(llmproxy_router *router, const llmproxy_header *headers,
                                                      size_t n, const uint8_t *body, size_t body_len,
                                                      llmproxy_pick_callback cb, void *user_data,
                                                      llmproxy_request **out) {
  if (!g_pending.enabled) return __real_llmproxy_pick_async(router, headers, n, body, body_len, cb, user_data, out);
  // Copy the inputs (they are only lent for the call), decide later on a helper thread.
  std::vector<std::pair<std::string, std::string>> hs;
  for (size_t i = 0; i < n; ++i)
    hs.emplace_back(std::string(headers[i].name, headers[i].name_len), std::string(headers[i].value, headers[i].value_len));
  std::string b(reinterpret_cast<const char *>(body), body_len);
  int delay = g_pending.delay_ms;
  *out = nullptr;
  auto decide = [router, hs, b, cb, user_data, delay] {
    std::this_thread::sleep_for(std::chrono::milliseconds(delay));
    std::vector<llmproxy_header> lh;
    for (const auto &h : hs) lh.push_back(llmproxy_header{h.first.data(), h.first.size(), h.second.data(), h.second.size()});
    llmproxy_request *req = nullptr;
    llmproxy_pick(router, lh.data(), lh.size(), reinterpret_cast<const uint8_t *>(b.data()), b.size(), &req);
    cb(user_data, req);
  };
  if (g_pending.late) {
    g_pending.held.push_back(decide);
    return LLMPROXY_PENDING;
  }
  g_pending.threads.emplace_back(decide);
  if (g_pending.decide_before_return) {
    g_pending.threads.back().join();
    g_pending.threads.pop_back();
  }
  return LLMPROXY_PENDING;
}

// Delivers the held (late) decisions, each on its own thread.
static void deliver_late() {
  for (auto &d : g_pending.held) g_pending.threads.emplace_back(d);
  g_pending.held.clear();
}

// ---- --wrap of llmproxy_router_pick_deadline_ms: the shim's deadline for PENDING picks ----
extern "C" uint64_t __real_llmproxy_router_pick_deadline_ms(const llmproxy_router *router);
uint64_t g_pick_deadline_ms = 0;  // 0: the library's value
extern "C" uint64_t __wrap_llmproxy_router_pick_deadline_ms(const llmproxy_router *router) {
  return g_pick_deadline_ms ? g_pick_deadline_ms : __real_llmproxy_router_pick_deadline_ms(router);
}

// ---- --wrap of llmproxy_request_finish_outcome: records the status and outcome the shim reports ----
extern "C" void __real_llmproxy_request_finish_outcome(llmproxy_request *req, uint32_t status, uint32_t outcome);
struct Finish {
  uint32_t status;
  uint32_t outcome;
  bool operator==(const Finish &o) const { return status == o.status && outcome == o.outcome; }
};
std::mutex g_finish_mu;
std::vector<Finish> g_finished;

extern "C" void __wrap_llmproxy_request_finish_outcome(llmproxy_request *req, uint32_t status, uint32_t outcome) {
  {
    std::lock_guard<std::mutex> lock(g_finish_mu);
    g_finished.push_back(Finish{status, outcome});
  }
  __real_llmproxy_request_finish_outcome(req, status, outcome);
}

static uint32_t last_finish() {
  std::lock_guard<std::mutex> lock(g_finish_mu);
  return g_finished.empty() ? 0xffffffffu : g_finished.back().status;
}

static Finish last_finish_outcome() {
  std::lock_guard<std::mutex> lock(g_finish_mu);
  return g_finished.empty() ? Finish{0xffffffffu, 0xffffffffu} : g_finished.back();
}

static size_t finish_count() {
  std::lock_guard<std::mutex> lock(g_finish_mu);
  return g_finished.size();
}

static void join_pending_threads() {
  for (auto &t : g_pending.threads) t.join();
  g_pending.threads.clear();
}

// ---------------------------------------------------------------------------------------------
// Tiny test harness.

static int g_failed_checks = 0;
static std::string g_current;

#define CHECK(cond)                                                                       \
  do {                                                                                    \
    if (!(cond)) {                                                                        \
      std::fprintf(stderr, "  %s:%d: %s: CHECK failed: %s\n", __FILE__, __LINE__,          \
                   g_current.c_str(), #cond);                                             \
      ++g_failed_checks;                                                                  \
    }                                                                                     \
  } while (0)
#define CHECK_EQ(a, b)                                                                    \
  do {                                                                                    \
    auto _a = (a);                                                                        \
    auto _b = (b);                                                                        \
    if (!(_a == _b)) {                                                                    \
      std::fprintf(stderr, "  %s:%d: %s: CHECK_EQ failed: %s == %s\n", __FILE__, __LINE__, \
                   g_current.c_str(), #a, #b);                                            \
      ++g_failed_checks;                                                                  \
    }                                                                                     \
  } while (0)

static const char *kEndpointsA[] = {"127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003"};

static std::string config_json(const std::string &extra = "") {
  return std::string(R"({"protocol":"openai","algorithm":"inference_lb",)") +
         R"("model_mapping_rule":{"m-a":{"rules":[{"scene_name":"chat-a","cluster":"pool_a","backend":"vllm"}]},)" +
         R"("m-b":{"rules":[{"scene_name":"chat-b","cluster":"pool_b","backend":"sglang"}]},)" +
         R"("m-t":{"rules":[{"scene_name":"chat-t","cluster":"pool_a","backend":"vllm","target_model":"served-t"}]},)" +
         R"("m-tr":{"rules":[{"scene_name":"tr","cluster":"pool_b","backend":"triton","target_model":"ensemble",)" +
         R"("chat_template":"llama3"}]}},)" +
         R"("clusters":{"pool_a":{"endpoints":["127.0.0.1:9001","127.0.0.1:9002","127.0.0.1:9003"]},)" +
         R"("pool_b":{"endpoints":["127.0.0.1:9101"]}},)" + R"("max_body_bytes":4194304)" + extra + "}";
}

static const void *new_config(const std::string &json, const char *name = "llmproxy") {
  return H(envoy_dynamic_module_on_http_filter_config_new)(
      nullptr, envoy_dynamic_module_type_envoy_buffer{name, std::strlen(name)},
      envoy_dynamic_module_type_envoy_buffer{json.data(), json.size()});
}

static uint64_t in_flight(const void *cfg) { return llmproxy_router_in_flight(llmproxy_envoy_config_router(cfg)); }

static Headers post_headers(const std::string &path = "/v1/chat/completions", Headers extra = {}) {
  Headers h{{":method", "POST"}, {":path", path}, {":authority", "gw"}, {":scheme", "http"},
            {"content-type", "application/json"}};
  for (auto &e : extra) h.push_back(e);
  return h;
}

static std::string chat(const std::string &model, const std::string &text, bool stream = false) {
  return R"({"model":")" + model + R"(","stream":)" + (stream ? "true" : "false") +
         R"(,"messages":[{"role":"user","content":")" + text + R"("}]})";
}

struct Stream {
  FakeStream fs;
  const void *m = nullptr;
  explicit Stream(const void *cfg) { m = H(envoy_dynamic_module_on_http_filter_new)(cfg, &fs); }
  ~Stream() { H(envoy_dynamic_module_on_http_filter_destroy)(m); }
  int headers(bool eos = false) { return H(envoy_dynamic_module_on_http_filter_request_headers)(&fs, m, eos); }
  // Delivers one body frame: everything received before is moved to the buffer (as Envoy does
  // when the filter returned StopIterationAndBuffer).
  int body(const std::string &frame, bool eos) {
    for (auto &r : fs.received) fs.buffered.push_back(r);
    fs.received = {frame};
    return H(envoy_dynamic_module_on_http_filter_request_body)(&fs, m, eos);
  }
  int trailers() {
    for (auto &r : fs.received) fs.buffered.push_back(r);
    fs.received.clear();
    return H(envoy_dynamic_module_on_http_filter_request_trailers)(&fs, m);
  }
  void respond(uint32_t code, const std::string &chunk) {
    fs.has_response_code = true;
    fs.response_code = code;
    fs.resp_headers = {{":status", std::to_string(code)}};
    H(envoy_dynamic_module_on_http_filter_response_headers)(&fs, m, false);
    H(envoy_dynamic_module_on_http_filter_response_body)(&fs, m, false);
    (void)chunk;
  }
  void complete() { H(envoy_dynamic_module_on_http_filter_stream_complete)(&fs, m); }
  // A local reply by Envoy (the router after the filter): announced to the hook, then encoded.
  void envoy_local_reply(uint32_t code, const std::string &details) {
    H(envoy_dynamic_module_on_http_filter_local_reply)(
        &fs, m, code, envoy_dynamic_module_type_envoy_buffer{details.data(), details.size()}, false);
    fs.has_response_code = true;
    fs.response_code = code;
    fs.resp_headers = {{":status", std::to_string(code)}};
    H(envoy_dynamic_module_on_http_filter_response_headers)(&fs, m, false);
  }
  // Headers through end of body: a routed request, forwarded.
  void route(const std::string &body) {
    fs.req_headers = post_headers();
    headers(false);
    this->body(body, true);
  }
  int response_headers(Headers h, bool eos = false) {
    fs.resp_headers = std::move(h);
    for (const auto &kv : fs.resp_headers) {
      if (kv.first == ":status") {  // like Envoy: the response code is known from here on
        fs.has_response_code = true;
        fs.response_code = std::stoul(kv.second);
      }
    }
    return H(envoy_dynamic_module_on_http_filter_response_headers)(&fs, m, eos);
  }
  // One upstream response frame; returns what goes on to the client.
  std::string response_body(const std::string &frame, bool eos) {
    fs.resp_received = {frame};
    H(envoy_dynamic_module_on_http_filter_response_body)(&fs, m, eos);
    std::string out;
    for (auto &c : fs.resp_received) out += c;
    return out;
  }
  std::string request_body_now() const {
    std::string all;
    for (auto &c : fs.buffered) all += c;
    for (auto &c : fs.received) all += c;
    return all;
  }
  std::string resp_header(const std::string &name) const {
    for (const auto &h : fs.resp_headers)
      if (h.first == name) return h.second;
    return std::string();
  }
};

static bool is_pool_a(const std::string &ep) {
  for (const char *e : kEndpointsA)
    if (ep == e) return true;
  return false;
}

// ---------------------------------------------------------------------------------------------
// Tests.

static void test_program_init() { CHECK_EQ(std::string(H(envoy_dynamic_module_on_program_init)()), std::string("v0.2.0")); }

static void test_bad_config_rejected_with_message() {
  size_t logs_before = g_logs.size();
  const void *cfg = new_config(R"({"protocol":"openai","no_such_key":1})");
  CHECK(cfg == nullptr);
  bool logged = false;
  for (size_t i = logs_before; i < g_logs.size(); ++i)
    if (g_logs[i].find("invalid llmproxy config") != std::string::npos && g_logs[i].find("no_such_key") != std::string::npos)
      logged = true;
  CHECK(logged);
  CHECK(new_config("{not json") == nullptr);
  CHECK(new_config("") == nullptr);
}

static void test_passthrough_untouched_but_routing_headers_stripped(const void *cfg) {
  Stream s(cfg);
  s.fs.req_headers = {{":method", "GET"},
                      {":path", "/v1/models"},
                      {"accept", "application/json"},
                      {"x-gateway-destination-endpoint", "10.0.0.9:8000"},
                      {"x-llmproxy-cluster", "pool_b"},
                      {"x-llmproxy-endpoint", "10.0.0.9:8000"}};
  CHECK_EQ(s.headers(true), (int)ENVOY_HEADERS_CONTINUE);
  CHECK_EQ(s.fs.header("accept"), std::string("application/json"));
  CHECK_EQ(s.fs.header_count("x-gateway-destination-endpoint"), 0);
  CHECK_EQ(s.fs.header_count("x-llmproxy-cluster"), 0);
  CHECK_EQ(s.fs.header_count("x-llmproxy-endpoint"), 0);
  CHECK(s.fs.route_cache_cleared >= 1);
  CHECK_EQ(s.fs.override_calls, 0);
  CHECK_EQ(s.fs.sent, 0);
  CHECK_EQ(in_flight(cfg), 0u);
  // GET on an inference path and POST elsewhere pass through too.
  Stream g(cfg);
  g.fs.req_headers = {{":method", "GET"}, {":path", "/v1/chat/completions"}};
  CHECK_EQ(g.headers(true), (int)ENVOY_HEADERS_CONTINUE);
  Stream e(cfg);
  e.fs.req_headers = post_headers("/v1/embeddings");
  CHECK_EQ(e.headers(false), (int)ENVOY_HEADERS_CONTINUE);
  CHECK_EQ(e.body("{}", true), (int)ENVOY_BODY_CONTINUE);
  CHECK_EQ(e.fs.override_calls, 0);
}

static void test_routed_full_lifecycle(const void *cfg) {
  Stream s(cfg);
  s.fs.req_headers = post_headers("/v1/chat/completions?x=1",
                                  {{"x-gateway-destination-endpoint", "127.0.0.1:9003"},
                                   {"X-LLMProxy-Endpoint", "127.0.0.1:9003"},
                                   {"x-llmproxy-cluster", "pool_b"}});
  std::string body = chat("m-a", "hello there, a prompt split across frames");
  size_t cut = body.size() / 2;
  CHECK_EQ(s.headers(false), (int)ENVOY_HEADERS_STOP_ITERATION);
  CHECK_EQ(s.fs.buffer_limit, (uint64_t)4194304);  // raised to max_body_bytes
  CHECK_EQ(s.body(body.substr(0, cut), false), (int)ENVOY_BODY_STOP_ITERATION_AND_BUFFER);
  CHECK_EQ(s.fs.override_calls, 0);
  // The last frame is only in Received; the first half only in Buffered.
  CHECK_EQ(s.body(body.substr(cut), true), (int)ENVOY_BODY_CONTINUE);
  CHECK_EQ(s.fs.sent, 0);
  CHECK_EQ(s.fs.override_calls, 1);
  CHECK(is_pool_a(s.fs.override_host));
  CHECK(s.fs.override_strict);
  CHECK_EQ(s.fs.header("x-llmproxy-cluster"), std::string("pool_a"));
  CHECK_EQ(s.fs.header_count("x-llmproxy-cluster"), 1);
  CHECK_EQ(s.fs.header("x-llmproxy-endpoint"), s.fs.override_host);
  CHECK_EQ(s.fs.header_count("x-llmproxy-endpoint"), 1);
  CHECK_EQ(s.fs.header("x-llmproxy-scene"), std::string("chat-a"));
  CHECK_EQ(s.fs.header_count("x-gateway-destination-endpoint"), 0);
  CHECK(s.fs.route_cache_cleared >= 1);
  CHECK_EQ(s.fs.metadata["llmproxy/endpoint"], s.fs.override_host);
  CHECK_EQ(s.fs.metadata["llmproxy/cluster"], std::string("pool_a"));
  CHECK_EQ(s.fs.metadata["llmproxy/model"], std::string("m-a"));
  CHECK_EQ(s.fs.metadata["llmproxy/scene"], std::string("chat-a"));
  CHECK_EQ(s.fs.metadata["llmproxy/backend"], std::string("vllm"));
  CHECK_EQ(in_flight(cfg), 1u);
  s.respond(200, "data: {}\n\n");
  CHECK_EQ(in_flight(cfg), 1u);
  size_t finishes = finish_count();
  s.complete();
  CHECK_EQ(in_flight(cfg), 0u);
  CHECK_EQ(finish_count(), finishes + 1);
  CHECK_EQ(last_finish(), 200u);
}

static void test_second_model_other_cluster(const void *cfg) {
  Stream s(cfg);
  s.fs.req_headers = post_headers();
  s.headers(false);
  CHECK_EQ(s.body(chat("m-b", "x"), true), (int)ENVOY_BODY_CONTINUE);
  CHECK_EQ(s.fs.override_host, std::string("127.0.0.1:9101"));
  CHECK_EQ(s.fs.header("x-llmproxy-cluster"), std::string("pool_b"));
  CHECK_EQ(s.fs.metadata["llmproxy/backend"], std::string("sglang"));
  s.complete();
  CHECK_EQ(in_flight(cfg), 0u);
}

static void test_body_already_buffered_by_earlier_filter(const void *cfg) {
  Stream s(cfg);
  s.fs.req_headers = post_headers();
  s.headers(false);
  std::string body = chat("m-a", "buffered elsewhere");
  // An earlier filter buffered the body: Envoy hands it as Received and also reports it buffered.
  s.fs.buffered = {body};
  s.fs.received = {body};
  s.fs.received_is_buffered = true;
  CHECK_EQ(H(envoy_dynamic_module_on_http_filter_request_body)(&s.fs, s.m, true), (int)ENVOY_BODY_CONTINUE);
  CHECK_EQ(s.fs.sent, 0);
  CHECK(is_pool_a(s.fs.override_host));
  s.complete();
}

static void expect_error(const void *cfg, const std::string &body, uint32_t status, const char *code) {
  Stream s(cfg);
  s.fs.req_headers = post_headers();
  s.headers(false);
  CHECK_EQ(s.body(body, true), (int)ENVOY_BODY_STOP_ITERATION_NO_BUFFER);
  CHECK_EQ(s.fs.sent, 1);
  CHECK_EQ(s.fs.sent_status, status);
  CHECK_EQ(s.fs.sent_content_type, std::string("application/json"));
  CHECK(s.fs.sent_body.find("\"error\"") != std::string::npos);
  CHECK(s.fs.sent_body.find(code) != std::string::npos);
  CHECK_EQ(s.fs.override_calls, 0);
  s.complete();
  CHECK_EQ(in_flight(cfg), 0u);
  CHECK_EQ(last_finish(), status);  // our own 4xx reply, not an endpoint failure
}

static void test_errors(const void *cfg) {
  expect_error(cfg, "{\"model\": ", 400, "invalid_request");
  expect_error(cfg, chat("no-such-model", "hi"), 404, "model_not_found");
}

static void test_missing_body_is_400(const void *cfg) {
  Stream s(cfg);
  s.fs.req_headers = post_headers();
  CHECK_EQ(s.headers(true), (int)ENVOY_HEADERS_STOP_ITERATION);
  CHECK_EQ(s.fs.sent, 1);
  CHECK_EQ(s.fs.sent_status, 400u);
  CHECK_EQ(s.fs.sent_content_type, std::string("application/json"));
  s.complete();
  CHECK_EQ(in_flight(cfg), 0u);
}

static void test_too_large(const void *cfg) {
  {  // declared by content-length: rejected before reading the body
    Stream s(cfg);
    s.fs.req_headers = post_headers("/v1/chat/completions", {{"content-length", "5000000"}});
    CHECK_EQ(s.headers(false), (int)ENVOY_HEADERS_STOP_ITERATION);
    CHECK_EQ(s.fs.sent_status, 413u);
    // The shim's own error, in the library's shape (llmproxy_error_body).
    for (const char *part : {"\"code\":\"request_too_large\"", "\"type\":\"invalid_request_error\"",
                             "\"param\":null",
                             "\"message\":\"request body of 5000000 bytes is larger than the limit of 4194304 bytes\""}) {
      CHECK(s.fs.sent_body.find(part) != std::string::npos);
    }
    CHECK_EQ(s.fs.sent_body.front(), '{');
    CHECK_EQ(s.fs.sent_body.back(), '}');
    CHECK_EQ(s.body("x", false), (int)ENVOY_BODY_STOP_ITERATION_NO_BUFFER);
    s.complete();
  }
  {  // chunked: rejected as soon as the buffered + received size crosses the limit
    Stream s(cfg);
    s.fs.req_headers = post_headers();
    s.headers(false);
    std::string mb(1 << 20, 'a');
    for (int i = 0; i < 4; ++i) CHECK_EQ(s.body(mb, false), (int)ENVOY_BODY_STOP_ITERATION_AND_BUFFER);
    CHECK_EQ(s.fs.sent, 0);
    CHECK_EQ(s.body("a", false), (int)ENVOY_BODY_STOP_ITERATION_NO_BUFFER);
    CHECK_EQ(s.fs.sent_status, 413u);
    CHECK_EQ(s.fs.sent_content_type, std::string("application/json"));
    s.complete();
  }
  CHECK_EQ(in_flight(cfg), 0u);
}

static void test_large_prompt_ok(const void *cfg) {
  Stream s(cfg);
  s.fs.req_headers = post_headers();
  s.headers(false);
  std::string body = chat("m-a", std::string(2 * 1000 * 1000, 'p'));
  // ~2 MB in 64 KiB frames.
  size_t off = 0;
  int last = -1;
  while (off < body.size()) {
    size_t n = std::min<size_t>(65536, body.size() - off);
    last = s.body(body.substr(off, n), off + n == body.size());
    off += n;
  }
  CHECK_EQ(last, (int)ENVOY_BODY_CONTINUE);
  CHECK_EQ(s.fs.sent, 0);
  CHECK(is_pool_a(s.fs.override_host));
  s.complete();
}

static void test_trailers_end_the_body(const void *cfg) {
  Stream s(cfg);
  s.fs.req_headers = post_headers();
  s.headers(false);
  std::string body = chat("m-a", "with trailers");
  CHECK_EQ(s.body(body, false), (int)ENVOY_BODY_STOP_ITERATION_AND_BUFFER);
  CHECK_EQ(s.trailers(), (int)ENVOY_TRAILERS_CONTINUE);
  CHECK(is_pool_a(s.fs.override_host));
  s.complete();
  CHECK_EQ(in_flight(cfg), 0u);
}

static void test_prefix_stickiness_through_shim(const void *cfg) {
  std::string prefix(4096, 's');
  std::string first;
  for (int i = 0; i < 5; ++i) {
    Stream s(cfg);
    s.fs.req_headers = post_headers();
    s.headers(false);
    s.body(chat("m-a", prefix + " question " + std::to_string(i)), true);
    if (i == 0) first = s.fs.override_host;
    CHECK_EQ(s.fs.override_host, first);
    s.respond(200, "{}");
    s.complete();
  }
}

static void test_metrics_surface(const void *cfg) {
  Stream s(cfg);
  s.fs.req_headers = {{":method", "GET"}, {":path", LLMPROXY_ENVOY_DEFAULT_METRICS_PATH}};
  CHECK_EQ(s.headers(true), (int)ENVOY_HEADERS_STOP_ITERATION);
  CHECK_EQ(s.fs.sent_status, 200u);
  CHECK(s.fs.sent_content_type.find("text/plain") == 0);
  CHECK(s.fs.sent_body.find("llmproxy_envoy_in_flight 0\n") != std::string::npos);
  CHECK(s.fs.sent_body.find("llmproxy_envoy_routed_total") != std::string::npos);
  s.complete();
  // POST to the metrics path is not the metrics surface.
  Stream p(cfg);
  p.fs.req_headers = post_headers(LLMPROXY_ENVOY_DEFAULT_METRICS_PATH);
  CHECK_EQ(p.headers(false), (int)ENVOY_HEADERS_CONTINUE);
  CHECK_EQ(p.fs.sent, 0);
}

static void test_override_refused_is_503(const void *cfg) {
  Stream s(cfg);
  s.fs.override_result = false;
  s.fs.req_headers = post_headers();
  s.headers(false);
  CHECK_EQ(s.body(chat("m-a", "x"), true), (int)ENVOY_BODY_STOP_ITERATION_NO_BUFFER);
  CHECK_EQ(s.fs.sent_status, 503u);
  CHECK_EQ(s.fs.sent_content_type, std::string("application/json"));
  s.complete();
  CHECK_EQ(in_flight(cfg), 0u);
  // Never forwarded: the client got our 503, which says nothing about the endpoint.
  CHECK(last_finish_outcome() == (Finish{503, LLMPROXY_OUTCOME_LOCAL}));
}

static void test_reset_without_response_finishes(const void *cfg) {
  Stream s(cfg);
  s.fs.req_headers = post_headers();
  s.headers(false);
  s.body(chat("m-a", "reset"), true);
  CHECK_EQ(in_flight(cfg), 1u);
  s.complete();  // no response, no local reply: the client went away before any response
  CHECK_EQ(in_flight(cfg), 0u);
  CHECK(last_finish_outcome() == (Finish{499, LLMPROXY_OUTCOME_LOCAL}));
  // Envoy's reply to an upstream reset before the response: the endpoint's failure.
  Stream u(cfg);
  u.route(chat("m-a", "upstream down"));
  u.envoy_local_reply(503, "upstream_reset_before_response_started{connection_termination}");
  u.complete();
  CHECK(last_finish_outcome() == (Finish{503, LLMPROXY_OUTCOME_ENDPOINT_FAILED}));
  CHECK_EQ(in_flight(cfg), 0u);
}

static void test_destroy_without_complete_finishes(const void *cfg) {
  {
    Stream s(cfg);
    s.fs.req_headers = post_headers();
    s.headers(false);
    s.body(chat("m-a", "destroyed"), true);
    CHECK_EQ(in_flight(cfg), 1u);
  }
  CHECK_EQ(in_flight(cfg), 0u);
}

static constexpr uint64_t kResumeEventId = 1;  // the only event the shim commits

static bool wait_commit(FakeStream &fs, int ms) {
  for (int i = 0; i < ms; ++i) {
    {
      if (fs.committed_count() > 0) return true;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return false;
}

static void test_pending_resumes_via_scheduler(const void *cfg) {
  g_pending.enabled = true;
  int live_before = g_schedulers_live.load();
  {
    Stream s(cfg);
    s.fs.req_headers = post_headers();
    s.headers(false);
    CHECK_EQ(s.body(chat("m-a", "async"), true), (int)ENVOY_BODY_STOP_ITERATION_AND_BUFFER);
    CHECK_EQ(s.fs.override_calls, 0);
    CHECK(wait_commit(s.fs, 2000));
    join_pending_threads();
    {
      std::lock_guard<std::mutex> lock(s.fs.commits->mu);
      CHECK_EQ(s.fs.commits->events.size(), (size_t)1);
      CHECK(s.fs.commits->thread != std::this_thread::get_id());
    }
    CHECK_EQ(s.fs.override_calls, 0);  // nothing touched off the worker thread
    H(envoy_dynamic_module_on_http_filter_scheduled)(&s.fs, s.m, s.fs.commits->events[0]);
    CHECK_EQ(s.fs.continue_decoding, 1);
    CHECK(is_pool_a(s.fs.override_host));
    CHECK_EQ(s.fs.header("x-llmproxy-cluster"), std::string("pool_a"));
    CHECK_EQ(in_flight(cfg), 1u);
    s.respond(200, "x");
    s.complete();
    CHECK_EQ(in_flight(cfg), 0u);
  }
  CHECK_EQ(g_schedulers_live.load(), live_before);
  {  // pending error: local reply from on_scheduled, no continue
    Stream s(cfg);
    s.fs.req_headers = post_headers();
    s.headers(false);
    CHECK_EQ(s.body(chat("nope", "async"), true), (int)ENVOY_BODY_STOP_ITERATION_AND_BUFFER);
    CHECK(wait_commit(s.fs, 2000));
    join_pending_threads();
    H(envoy_dynamic_module_on_http_filter_scheduled)(&s.fs, s.m, s.fs.commits->events[0]);
    CHECK_EQ(s.fs.sent_status, 404u);
    CHECK_EQ(s.fs.continue_decoding, 0);
    s.complete();
  }
  g_pending.enabled = false;
  CHECK_EQ(in_flight(cfg), 0u);
}

static void test_target_model_rewrite(const void *cfg) {
  Stream s(cfg);
  std::string body = chat("m-t", "rewrite me");
  s.fs.req_headers = post_headers("/v1/chat/completions", {{"content-length", std::to_string(body.size())}});
  s.headers(false);
  size_t cut = body.size() / 3;
  s.body(body.substr(0, cut), false);
  CHECK_EQ(s.body(body.substr(cut), true), (int)ENVOY_BODY_CONTINUE);
  std::string sent = s.request_body_now();
  CHECK(sent.find("\"served-t\"") != std::string::npos);
  CHECK(sent.find("\"m-t\"") == std::string::npos);
  CHECK(sent.find("rewrite me") != std::string::npos);
  CHECK_EQ(s.fs.header("content-length"), std::to_string(sent.size()));
  CHECK_EQ(s.fs.header(":path"), std::string("/v1/chat/completions"));  // path unchanged
  CHECK_EQ(s.fs.metadata["llmproxy/model"], std::string("m-t"));
  CHECK_EQ(s.fs.metadata["llmproxy/upstream_model"], std::string("served-t"));
  // A plain OpenAI backend: the response is not transcoded.
  s.response_headers({{":status", "200"}, {"content-type", "application/json"}, {"content-length", "2"}});
  CHECK_EQ(s.resp_header("content-length"), std::string("2"));
  CHECK_EQ(s.response_body("{}", true), std::string("{}"));
  s.complete();
  CHECK_EQ(in_flight(cfg), 0u);
}

static void test_triton_generate_stream_transcoded(const void *cfg) {
  Stream s(cfg);
  s.fs.req_headers = post_headers();
  s.headers(false);
  CHECK_EQ(s.body(chat("m-tr", "tell me", true), true), (int)ENVOY_BODY_CONTINUE);
  CHECK_EQ(s.fs.header(":path"), std::string("/v2/models/ensemble/generate_stream"));
  std::string sent = s.request_body_now();
  CHECK(sent.find("\"text_input\"") != std::string::npos);
  CHECK(sent.find("tell me") != std::string::npos);
  CHECK(s.fs.route_cache_cleared >= 1);
  s.response_headers({{":status", "200"}, {"content-type", "text/event-stream"}, {"content-length", "999"}});
  CHECK_EQ(s.resp_header("content-length"), std::string(""));  // the length changes
  std::string first = s.response_body("data: {\"model_name\":\"ensemble\",\"text_output\":\"Hel\"}\n\ndata: {\"model", false);
  CHECK(first.find("chat.completion.chunk") != std::string::npos);
  CHECK(first.find("Hel") != std::string::npos);
  CHECK(first.find("text_output") == std::string::npos);
  std::string rest = s.response_body("_name\":\"ensemble\",\"text_output\":\"lo\"}\n\n", true);
  CHECK(rest.find("lo") != std::string::npos);
  CHECK(rest.find("[DONE]") != std::string::npos);
  s.complete();
  CHECK_EQ(last_finish(), 200u);
  CHECK_EQ(in_flight(cfg), 0u);
}

static void test_pending_decided_before_pick_returns(const void *cfg) {
  g_pending.enabled = true;
  g_pending.decide_before_return = true;
  g_pending.delay_ms = 0;
  int created = g_schedulers_created.load();
  {
    Stream s(cfg);
    s.fs.req_headers = post_headers();
    s.headers(false);
    // The decision is already there when pick_async says PENDING: applied at once.
    CHECK_EQ(s.body(chat("m-a", "raced"), true), (int)ENVOY_BODY_CONTINUE);
    CHECK(is_pool_a(s.fs.override_host));
    CHECK_EQ(s.fs.continue_decoding, 0);
    CHECK_EQ(s.fs.committed_count(), (size_t)0);
    CHECK_EQ(g_schedulers_created.load(), created);  // no scheduler was needed
    s.respond(200, "x");
    s.complete();
  }
  g_pending.enabled = false;
  g_pending.decide_before_return = false;
  g_pending.delay_ms = 20;
  CHECK_EQ(in_flight(cfg), 0u);
}

static void test_synchronous_pick_needs_no_scheduler(const void *cfg) {
  int created = g_schedulers_created.load();
  Stream s(cfg);
  s.fs.req_headers = post_headers();
  s.headers(false);
  CHECK_EQ(s.body(chat("m-a", "sync"), true), (int)ENVOY_BODY_CONTINUE);
  CHECK_EQ(g_schedulers_created.load(), created);
  s.complete();
}

static void test_pending_stream_gone_before_decision(const void *cfg) {
  g_pending.enabled = true;
  g_pending.delay_ms = 50;
  int live_before = g_schedulers_live.load();
  FakeStream *dangling = nullptr;
  {
    Stream s(cfg);
    s.fs.req_headers = post_headers();
    s.headers(false);
    CHECK_EQ(s.body(chat("m-a", "abandoned"), true), (int)ENVOY_BODY_STOP_ITERATION_AND_BUFFER);
    s.complete();
    dangling = &s.fs;
  }  // filter destroyed before the decision arrives
  (void)dangling;
  join_pending_threads();  // the callback ran after the stream died
  CHECK_EQ(in_flight(cfg), 0u);
  CHECK_EQ(last_finish(), 499u);
  CHECK_EQ(g_schedulers_live.load(), live_before);
  {  // decision delivered (committed) but the stream completes before on_scheduled runs
    Stream s(cfg);
    s.fs.req_headers = post_headers();
    s.headers(false);
    s.body(chat("m-a", "late"), true);
    CHECK(wait_commit(s.fs, 2000));
    join_pending_threads();
    s.complete();
    CHECK_EQ(in_flight(cfg), 0u);
    H(envoy_dynamic_module_on_http_filter_scheduled)(&s.fs, s.m, 1);  // stale event: ignored
    CHECK_EQ(s.fs.override_calls, 0);
    CHECK_EQ(s.fs.continue_decoding, 0);
  }
  g_pending.enabled = false;
  g_pending.delay_ms = 20;
  CHECK_EQ(g_schedulers_live.load(), live_before);
}

static void test_exceptions_do_not_escape(const void *cfg) {
  Stream s(cfg);
  s.fs.req_headers = post_headers();
  s.fs.throw_in_get_headers = true;
  int r = s.headers(false);  // must return normally, and fail closed
  CHECK_EQ(r, (int)ENVOY_HEADERS_STOP_ITERATION);
  CHECK_EQ(s.fs.sent_status, 500u);
  CHECK_EQ(s.fs.sent_content_type, std::string("application/json"));
  CHECK(s.fs.sent_body.find("\"code\":\"internal_error\"") != std::string::npos);
  CHECK(s.fs.sent_body.find("\"type\":\"server_error\"") != std::string::npos);
  CHECK(s.fs.sent_body.find("\"message\":\"llmproxy filter error\"") != std::string::npos);
  CHECK_EQ(s.fs.override_calls, 0);
  s.fs.throw_in_get_headers = false;
  s.complete();
  {  // an exception in the body phase (pick reads the headers again): 500, nothing forwarded
    Stream b(cfg);
    b.fs.req_headers = post_headers();
    CHECK_EQ(b.headers(false), (int)ENVOY_HEADERS_STOP_ITERATION);
    b.fs.throw_in_get_headers = true;
    CHECK_EQ(b.body(chat("m-a", "boom"), true), (int)ENVOY_BODY_STOP_ITERATION_NO_BUFFER);
    CHECK_EQ(b.fs.sent_status, 500u);
    CHECK_EQ(b.fs.override_calls, 0);
    b.fs.throw_in_get_headers = false;
    b.complete();
    CHECK_EQ(in_flight(cfg), 0u);
  }
  Stream m(cfg);
  m.fs.req_headers = {{":method", "GET"}, {":path", LLMPROXY_ENVOY_DEFAULT_METRICS_PATH}};
  m.headers(true);
  CHECK(m.fs.sent_body.find("llmproxy_envoy_hook_exceptions_total 0\n") == std::string::npos);
}

// ---- failure classification: only the endpoint's own failures count against it ----

static std::string metrics_of(const void *cfg) {
  char *out = nullptr;
  size_t len = 0;
  llmproxy_router_metrics(llmproxy_envoy_config_router(cfg), &out, &len);
  std::string text(out ? out : "", out ? len : 0);
  llmproxy_string_free(out);
  return text;
}

static bool has_line(const std::string &text, const std::string &line) {
  return text.find(line + "\n") != std::string::npos;
}

static void test_outcome_of_each_ending(const void *cfg) {
  struct Case {
    uint32_t code;
    const char *details;
    llmproxy_outcome outcome;
  };
  // Envoy 1.40's local replies after the request was forwarded (details as seen on the binary).
  const Case cases[] = {
      {504, "response_timeout", LLMPROXY_OUTCOME_LOCAL},  // route timeout: a long generation
      {504, "upstream_per_try_timeout", LLMPROXY_OUTCOME_LOCAL},
      {503, "upstream_reset_before_response_started{remote_connection_failure|delayed_connect_error:_Connection_refused}",
       LLMPROXY_OUTCOME_ENDPOINT_FAILED},
      {503, "upstream_reset_before_response_started{connection_termination}", LLMPROXY_OUTCOME_ENDPOINT_FAILED},
      {503, "upstream_reset_before_response_started{remote_reset}", LLMPROXY_OUTCOME_ENDPOINT_FAILED},
      {503, "upstream_reset_before_response_started{overflow}", LLMPROXY_OUTCOME_LOCAL},  // circuit breaker
      {503, "upstream_reset_before_response_started{local_reset}", LLMPROXY_OUTCOME_LOCAL},
      {503, "no_healthy_upstream", LLMPROXY_OUTCOME_LOCAL},
  };
  for (const Case &c : cases) {
    Stream s(cfg);
    s.route(chat("m-a", std::string("ending ") + c.details));
    CHECK_EQ(s.fs.override_calls, 1);
    s.envoy_local_reply(c.code, c.details);
    s.complete();
    if (!(last_finish_outcome() == Finish{c.code, static_cast<uint32_t>(c.outcome)})) {
      std::fprintf(stderr, "  case %u %s: finished with (%u, %u)\n", c.code, c.details, last_finish_outcome().status,
                   last_finish_outcome().outcome);
      ++g_failed_checks;
    }
  }
  {  // the endpoint's own 503: the status is the endpoint's, the library judges it
    Stream s(cfg);
    s.route(chat("m-a", "endpoint says 503"));
    s.response_headers({{":status", "503"}});
    s.complete();
    CHECK(last_finish_outcome() == (Finish{503, LLMPROXY_OUTCOME_UPSTREAM}));
  }
  {  // a response from the picked host
    Stream s(cfg);
    s.route(chat("m-a", "fine"));
    s.fs.upstream_address = s.fs.override_host;
    s.response_headers({{":status", "200"}});
    s.complete();
    CHECK(last_finish_outcome() == (Finish{200, LLMPROXY_OUTCOME_UPSTREAM}));
  }
  {  // a response from a host the library did not pick: Envoy's own LB retried, the pick failed
    Stream s(cfg);
    s.route(chat("m-a", "served elsewhere"));
    s.fs.upstream_address = s.fs.override_host == kEndpointsA[0] ? kEndpointsA[1] : kEndpointsA[0];
    s.response_headers({{":status", "200"}});
    s.complete();
    CHECK(last_finish_outcome() == (Finish{200, LLMPROXY_OUTCOME_ENDPOINT_FAILED}));
  }
  {  // the client went away after forwarding, before any response
    Stream s(cfg);
    s.route(chat("m-a", "client gone"));
    s.complete();
    CHECK(last_finish_outcome() == (Finish{499, LLMPROXY_OUTCOME_LOCAL}));
  }
  CHECK_EQ(in_flight(cfg), 0u);
}

// A client can make a request run past the route timeout; that must not eject the endpoint.
// pool_b has one endpoint, so every m-b request goes there.
static void test_route_timeouts_do_not_eject_but_connect_failures_do() {
  const void *cfg = new_config(config_json(R"(,"ejection":{"consecutive_failures":3,"eject_ms":60000})"));
  CHECK(cfg != nullptr);
  if (!cfg) return;
  const std::string ep = "cluster=\"pool_b\",endpoint=\"127.0.0.1:9101\"}";
  for (int i = 0; i < 5; ++i) {
    Stream s(cfg);
    s.route(chat("m-b", "long generation " + std::to_string(i)));
    CHECK_EQ(s.fs.override_host, std::string("127.0.0.1:9101"));
    s.envoy_local_reply(504, "response_timeout");
    s.complete();
  }
  std::string m = metrics_of(cfg);
  CHECK(has_line(m, "llmproxy_endpoint_failures_total{" + ep + " 0"));
  CHECK(has_line(m, "llmproxy_endpoint_ejected{" + ep + " 0"));
  for (int i = 0; i < 3; ++i) {
    Stream s(cfg);
    s.route(chat("m-b", "connect failure " + std::to_string(i)));
    s.envoy_local_reply(503, "upstream_reset_before_response_started{remote_connection_failure}");
    s.complete();
  }
  m = metrics_of(cfg);
  CHECK(has_line(m, "llmproxy_endpoint_failures_total{" + ep + " 3"));
  CHECK(has_line(m, "llmproxy_endpoint_ejected{" + ep + " 1"));
  H(envoy_dynamic_module_on_http_filter_config_destroy)(cfg);
}

// ---- the LB policy: an Envoy retry re-picks through the library ----

struct LbHarness {
  const void *config = H(envoy_dynamic_module_on_lb_config_new)(nullptr, envoy_dynamic_module_type_envoy_buffer{"llmproxy", 8},
                                                                envoy_dynamic_module_type_envoy_buffer{"", 0});
  FakeLb lb;
  const void *m = H(envoy_dynamic_module_on_lb_new)(config, &lb);
  ~LbHarness() {
    H(envoy_dynamic_module_on_lb_destroy)(m);
    H(envoy_dynamic_module_on_lb_config_destroy)(config);
  }
  // One host choice; "" when the LB chose none.
  std::string choose(FakeLbContext &ctx) {
    uint32_t p = 99, i = 99;
    if (!H(envoy_dynamic_module_on_lb_choose_host)(&lb, m, &ctx, &p, &i)) return "";
    if (p >= lb.healthy.size() || i >= lb.healthy[p].size()) return "<bad index>";
    return lb.healthy[p][i];
  }
};

static void test_lb_retry_repicks_through_library() {
  const void *cfg = new_config(config_json());
  CHECK(cfg != nullptr);
  if (!cfg) return;
  LbHarness lb;
  lb.lb.healthy = {{kEndpointsA[0], kEndpointsA[1], kEndpointsA[2]}};
  {
    Stream s(cfg);
    s.route(chat("m-a", "retry me"));
    const std::string first = s.fs.override_host;
    CHECK(is_pool_a(first));
    CHECK(!s.fs.header("x-llmproxy-ticket").empty());
    // The router drops the override on a retry and asks the cluster's LB.
    FakeLbContext retry{&s.fs};
    const std::string second = lb.choose(retry);
    CHECK(is_pool_a(second));
    CHECK(second != first);
    CHECK_EQ(s.fs.header("x-llmproxy-endpoint"), second);  // what the retry sends upstream
    CHECK_EQ(s.fs.metadata["llmproxy/endpoint"], second);
    CHECK_EQ(in_flight(cfg), 1u);  // the accounting moved, not doubled
    const std::string third = lb.choose(retry);
    CHECK(is_pool_a(third) && third != first && third != second);
    CHECK_EQ(lb.choose(retry), std::string(""));  // nothing untried left: Envoy answers 503
    CHECK_EQ(in_flight(cfg), 0u);
    s.envoy_local_reply(503, "no_healthy_upstream");
    s.complete();
    const std::string m = metrics_of(cfg);
    CHECK(has_line(m, "llmproxy_retries_total 3"));
    for (const std::string &ep : {first, second, third}) {
      CHECK(has_line(m, "llmproxy_endpoint_failures_total{cluster=\"pool_a\",endpoint=\"" + ep + "\"} 1"));
    }
  }
  {  // the library's pick is not a healthy host in Envoy's view: re-picked again
    lb.lb.healthy = {{kEndpointsA[1]}, {kEndpointsA[2]}};  // two priorities, 9001 not healthy
    Stream s(cfg);
    s.route(chat("m-a", "another retry"));
    FakeLbContext retry{&s.fs};
    const std::string chosen = lb.choose(retry);
    CHECK(chosen == kEndpointsA[1] || chosen == kEndpointsA[2]);
    CHECK(chosen != s.fs.override_host);
    CHECK_EQ(s.fs.header("x-llmproxy-endpoint"), chosen);
    s.fs.upstream_address = chosen;
    s.respond(200, "x");
    s.complete();
    CHECK(last_finish_outcome() == (Finish{200, LLMPROXY_OUTCOME_UPSTREAM}));  // the retry's endpoint answered
  }
  {  // requests the filter did not route (pass-through, or a stream that ended): round robin
    lb.lb.healthy = {{kEndpointsA[0], kEndpointsA[1]}};
    FakeStream bare;
    bare.req_headers = {{":method", "GET"}, {":path", "/v1/models"}};
    FakeLbContext ctx{&bare};
    std::string a = lb.choose(ctx), b = lb.choose(ctx), c = lb.choose(ctx);
    CHECK(a != b && a == c);
    bare.req_headers.emplace_back("x-llmproxy-ticket", "123456789");  // unknown ticket: the same
    CHECK(is_pool_a(lb.choose(ctx)));
    lb.lb.healthy = {{}};
    CHECK_EQ(lb.choose(ctx), std::string(""));
  }
  CHECK_EQ(in_flight(cfg), 0u);
  H(envoy_dynamic_module_on_http_filter_config_destroy)(cfg);
}

// ---- the shim's own deadline for PENDING picks ----


static void test_pending_past_deadline_decides_locally(const void *cfg) {
  g_pending.enabled = true;
  g_pending.late = true;
  g_pick_deadline_ms = 100;
  const void *c = new_config(config_json());  // reads the (wrapped) deadline
  int live_before = g_schedulers_live.load();
  {
    Stream s(c);
    s.fs.req_headers = post_headers();
    s.headers(false);
    auto t0 = std::chrono::steady_clock::now();
    CHECK_EQ(s.body(chat("m-a", "the lookup never answers"), true), (int)ENVOY_BODY_STOP_ITERATION_AND_BUFFER);
    const bool resumed = wait_commit(s.fs, 2000);  // by the watchdog: the callback is held back
    auto waited = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - t0).count();
    CHECK(resumed);
    CHECK(waited >= 90 && waited < 600);
    CHECK_EQ(s.fs.override_calls, 0);  // nothing touched off the worker thread
    H(envoy_dynamic_module_on_http_filter_scheduled)(&s.fs, s.m, kResumeEventId);
    CHECK_EQ(s.fs.continue_decoding, 1);
    CHECK(is_pool_a(s.fs.override_host));
    CHECK_EQ(in_flight(c), 1u);
    deliver_late();  // the library's decision comes after all: finished, never applied
    join_pending_threads();
    CHECK(last_finish_outcome() == (Finish{499, LLMPROXY_OUTCOME_LOCAL}));
    CHECK_EQ(in_flight(c), 1u);
    CHECK_EQ(s.fs.override_calls, 1);
    CHECK_EQ(s.fs.committed_count(), (size_t)1);
    s.respond(200, "x");
    s.complete();
    CHECK_EQ(in_flight(c), 0u);
    Stream mtr(c);
    mtr.fs.req_headers = {{":method", "GET"}, {":path", LLMPROXY_ENVOY_DEFAULT_METRICS_PATH}};
    mtr.headers(true);
    CHECK(mtr.fs.sent_body.find("llmproxy_envoy_pending_timeouts_total 1\n") != std::string::npos);
  }
  {  // the stream ends before the deadline: the watchdog leaves it alone, the late decision is finished
    auto gone = std::make_shared<FakeStream::Commits>();
    {
      Stream s(c);
      gone = s.fs.commits;
      s.fs.req_headers = post_headers();
      s.headers(false);
      s.body(chat("m-a", "client leaves"), true);
      s.complete();
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(250));  // past the deadline
    {
      std::lock_guard<std::mutex> lock(gone->mu);
      CHECK_EQ(gone->after_gone, 0);
      CHECK(gone->events.empty());
    }
    deliver_late();
    join_pending_threads();
    CHECK(last_finish_outcome() == (Finish{499, LLMPROXY_OUTCOME_LOCAL}));
    CHECK_EQ(in_flight(c), 0u);
  }
  CHECK_EQ(g_schedulers_live.load(), live_before);
  H(envoy_dynamic_module_on_http_filter_config_destroy)(c);
  g_pending.enabled = false;
  g_pending.late = false;
  g_pick_deadline_ms = 0;
  (void)cfg;
}

static void test_config_knobs() {
  const void *cfg = new_config(config_json(R"(,"strict_endpoint_override":false,"cluster_header":"X-Route-Cluster")"));
  CHECK(cfg != nullptr);
  if (!cfg) return;
  {
    Stream s(cfg);
    s.fs.req_headers = post_headers("/v1/chat/completions", {{"x-route-cluster", "evil"}});
    s.headers(false);
    s.body(chat("m-b", "knobs"), true);
    CHECK(!s.fs.override_strict);
    CHECK_EQ(s.fs.header("x-route-cluster"), std::string("pool_b"));
    CHECK_EQ(s.fs.header_count("x-route-cluster"), 1);
    s.complete();
  }
  H(envoy_dynamic_module_on_http_filter_config_destroy)(cfg);
}

int main() {
  struct T {
    const char *name;
    std::function<void(const void *)> fn;
  };
  const void *cfg = new_config(config_json());
  if (!cfg) {
    std::fprintf(stderr, "config_new failed for the test config:\n");
    for (auto &l : g_logs) std::fprintf(stderr, "  %s\n", l.c_str());
    std::printf("0 passed, 1 failed\n");
    return 1;
  }
  std::vector<T> tests = {
      {"program_init", [](const void *) { test_program_init(); }},
      {"bad_config_rejected_with_message", [](const void *) { test_bad_config_rejected_with_message(); }},
      {"passthrough_untouched_but_routing_headers_stripped", test_passthrough_untouched_but_routing_headers_stripped},
      {"routed_full_lifecycle", test_routed_full_lifecycle},
      {"second_model_other_cluster", test_second_model_other_cluster},
      {"body_already_buffered_by_earlier_filter", test_body_already_buffered_by_earlier_filter},
      {"errors_400_404", test_errors},
      {"missing_body_is_400", test_missing_body_is_400},
      {"too_large_413", test_too_large},
      {"large_prompt_ok", test_large_prompt_ok},
      {"trailers_end_the_body", test_trailers_end_the_body},
      {"prefix_stickiness_through_shim", test_prefix_stickiness_through_shim},
      {"metrics_surface", test_metrics_surface},
      {"override_refused_is_503", test_override_refused_is_503},
      {"reset_without_response_finishes", test_reset_without_response_finishes},
      {"destroy_without_complete_finishes", test_destroy_without_complete_finishes},
      {"pending_resumes_via_scheduler", test_pending_resumes_via_scheduler},
      {"pending_stream_gone_before_decision", test_pending_stream_gone_before_decision},
      {"pending_decided_before_pick_returns", test_pending_decided_before_pick_returns},
      {"target_model_rewrite", test_target_model_rewrite},
      {"triton_generate_stream_transcoded", test_triton_generate_stream_transcoded},
      {"synchronous_pick_needs_no_scheduler", test_synchronous_pick_needs_no_scheduler},
      {"exceptions_do_not_escape", test_exceptions_do_not_escape},
      {"config_knobs", [](const void *) { test_config_knobs(); }},
      {"outcome_of_each_ending", test_outcome_of_each_ending},
      {"route_timeouts_do_not_eject_but_connect_failures_do",
       [](const void *) { test_route_timeouts_do_not_eject_but_connect_failures_do(); }},
      {"lb_retry_repicks_through_library", [](const void *) { test_lb_retry_repicks_through_library(); }},
      {"pending_past_deadline_decides_locally", test_pending_past_deadline_decides_locally},
  };
  int passed = 0, failed = 0;
  for (auto &t : tests) {
    g_current = t.name;
    int before = g_failed_checks;
    t.fn(cfg);
    bool ok = g_failed_checks == before;
    std::printf("%s %s\n", ok ? "PASS" : "FAIL", t.name);
    (ok ? passed : failed)++;
  }
  CHECK_EQ(in_flight(cfg), 0u);
  H(envoy_dynamic_module_on_http_filter_config_destroy)(cfg);
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 && g_failed_checks == 0 ? 0 : 1;
}
