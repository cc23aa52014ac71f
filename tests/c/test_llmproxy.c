/*
 * C test of the llmproxy ABI, as a C host uses it. Run from the repository root (it reads
 * examples/config.json, the README's example). Prints one line per check and a closing
 * "N passed, N failed" line; exits non-zero on any failure.
 */
#define _POSIX_C_SOURCE 200809L /* nanosleep, sockets */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "llmproxy.h"

static int passed, failed;

#define CHECK(cond, ...)                                          \
    do {                                                          \
        if (cond) {                                               \
            passed++;                                             \
        } else {                                                  \
            failed++;                                             \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);  \
            fprintf(stderr, __VA_ARGS__);                         \
            fputc('\n', stderr);                                  \
        }                                                         \
    } while (0)

static char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = malloc((size_t)n + 1);
    if (buf && fread(buf, 1, (size_t)n, f) != (size_t)n) {
        free(buf);
        buf = NULL;
    }
    fclose(f);
    if (buf) {
        buf[n] = 0;
        *len = (size_t)n;
    }
    return buf;
}

static llmproxy_header hdr(const char *name, const char *value) {
    llmproxy_header h = {name, strlen(name), value, strlen(value)};
    return h;
}

/* Builds a chat body; the caller frees it. */
static char *chat_body(const char *model, const char *prefix, int n_prefix, const char *question) {
    size_t cap = strlen(model) + strlen(prefix) * (size_t)n_prefix + strlen(question) + 128;
    char *b = malloc(cap);
    int off = snprintf(b, cap, "{\"model\":\"%s\",\"messages\":[{\"role\":\"system\",\"content\":\"", model);
    for (int i = 0; i < n_prefix; i++) off += snprintf(b + off, cap - (size_t)off, "%s", prefix);
    snprintf(b + off, cap - (size_t)off, "\"},{\"role\":\"user\",\"content\":\"%s\"}]}", question);
    return b;
}

static llmproxy_status pick(llmproxy_router *r, const llmproxy_header *h, size_t nh, const char *body,
                            llmproxy_request **out) {
    return llmproxy_pick(r, h, nh, (const uint8_t *)body, strlen(body), out);
}

static int endpoint_index(const llmproxy_request *req) {
    size_t len = 0;
    const char *ep = llmproxy_request_endpoint(req, &len);
    if (len < 4) return -1;
    return atoi(ep + len - 4) % 100; /* 127.0.0.1:80NN -> NN */
}

static void test_invalid_config(void) {
    char err[256];
    llmproxy_router *r = (llmproxy_router *)0x1;
    const char *bad = "{\"model_mapping_rule\":{\"m\":{\"rules\":[{\"cluster\":\"c\",\"backend\":\"vllm\",\"headers\":[{\"key\":\"x\",\"value\":\"1\"}]}]}},"
                      "\"lb_mapping_rule\":{\"m\":{\"candidate_percent\":101}}}";
    llmproxy_status st = llmproxy_router_new(bad, strlen(bad), &r, err, sizeof err);
    CHECK(st == LLMPROXY_INVALID_CONFIG, "status %d", st);
    CHECK(r == NULL, "out cleared on error");
    CHECK(strstr(err, "config.lb_mapping_rule.m.candidate_percent: must be within 0") == err, "message: %s", err);

    const char *endpoint = "{\"clusters\":{\"c\":{\"endpoints\":[\"localhost:8000\"]}}}";
    st = llmproxy_router_new(endpoint, strlen(endpoint), &r, err, sizeof err);
    CHECK(st == LLMPROXY_INVALID_CONFIG && strstr(err, "config.clusters.c.endpoints[0]") == err, "message: %s", err);

    char tiny[5];
    st = llmproxy_router_new("[", 1, &r, tiny, sizeof tiny);
    CHECK(st == LLMPROXY_INVALID_CONFIG && strlen(tiny) == 4, "truncated: '%s'", tiny);
}

static void test_routing(llmproxy_router *r) {
    llmproxy_header h[2] = {hdr(":path", "/v1/chat/completions"), hdr(":method", "POST")};
    llmproxy_request *req = NULL;

    /* A chat request is routed and exposes its decision. */
    char *body = chat_body("qwen3-8b", "You are a helpful assistant. ", 1, "hello");
    llmproxy_status st = pick(r, h, 2, body, &req);
    size_t len = 0;
    CHECK(st == LLMPROXY_OK, "chat status %d", st);
    CHECK(llmproxy_request_http_status(req) == 200, "http 200");
    CHECK(strcmp(llmproxy_request_cluster(req, &len), "qwen3-8b") == 0 && len == 8, "cluster");
    CHECK(strcmp(llmproxy_request_backend(req, NULL), "vllm") == 0, "backend");
    CHECK(strcmp(llmproxy_request_scene(req, NULL), "chat") == 0, "scene");
    CHECK(strncmp(llmproxy_request_endpoint(req, NULL), "127.0.0.1:800", 13) == 0, "endpoint %s",
          llmproxy_request_endpoint(req, NULL));
    CHECK(llmproxy_router_in_flight(r) == 1, "in flight 1");
    llmproxy_request_first_token(req);
    /* The answer is read for learning, in pieces of any size; NULL is harmless. */
    const char *sse = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"}}]}\n\ndata: [DONE]\n\n";
    llmproxy_request_observe_response(req, (const uint8_t *) sse, 10, false);
    llmproxy_request_observe_response(req, (const uint8_t *) sse + 10, strlen(sse) - 10, false);
    llmproxy_request_observe_response(req, NULL, 0, true);
    llmproxy_request_observe_response(NULL, (const uint8_t *) sse, strlen(sse), true);
    llmproxy_request_finish(req, 200);
    CHECK(llmproxy_router_in_flight(r) == 0, "in flight 0");
    free(body);

    /* The header rule sends canary traffic to its own cluster and backend. */
    llmproxy_header canary[1] = {hdr("X-Env", "canary")};
    body = chat_body("qwen3-8b", "x", 1, "hello");
    pick(r, canary, 1, body, &req);
    CHECK(strcmp(llmproxy_request_endpoint(req, NULL), "127.0.0.1:8101") == 0, "canary endpoint");
    CHECK(strcmp(llmproxy_request_backend(req, NULL), "sglang") == 0, "canary backend");
    llmproxy_request_finish(req, 200);
    free(body);

    /* A completions request. */
    llmproxy_header ch[1] = {hdr(":path", "/v1/completions")};
    const char *comp = "{\"model\":\"llama-3.1-8b\",\"prompt\":\"Once upon a time\",\"stream\":true}";
    st = pick(r, ch, 1, comp, &req);
    CHECK(st == LLMPROXY_OK && llmproxy_request_is_stream(req), "completions %d", st);
    CHECK(strcmp(llmproxy_request_model(req, NULL), "llama-3.1-8b") == 0, "model");
    llmproxy_request_finish(req, 200);
}

static void test_prefix_affinity_and_balance(llmproxy_router *r) {
    llmproxy_request *req = NULL;
    /* Sequential requests that share a long system prompt stick to one endpoint. */
    int first = -1, stuck = 1;
    for (int i = 0; i < 20; i++) {
        char q[32];
        snprintf(q, sizeof q, "question %d", i);
        char *body = chat_body("qwen3-8b", "Shared tenant policy text. ", 60, q);
        pick(r, NULL, 0, body, &req);
        int ep = endpoint_index(req);
        if (first < 0) first = ep;
        if (ep != first) stuck = 0;
        llmproxy_request_first_token(req);
        llmproxy_request_finish(req, 200);
        free(body);
    }
    CHECK(stuck, "same prefix stays on endpoint %d", first);

    /* Held concurrently, the same prefix spreads once load outweighs the cache. */
    enum { HELD = 24 };
    llmproxy_request *held[HELD];
    int per[10] = {0};
    for (int i = 0; i < HELD; i++) {
        char q[32];
        snprintf(q, sizeof q, "burst %d", i);
        char *body = chat_body("qwen3-8b", "Shared tenant policy text. ", 60, q);
        pick(r, NULL, 0, body, &held[i]);
        int ep = endpoint_index(held[i]);
        if (ep >= 0 && ep < 10) per[ep]++;
        free(body);
    }
    int busiest = 0, used = 0;
    for (int i = 0; i < 10; i++) {
        if (per[i] > busiest) busiest = per[i];
        if (per[i] > 0) used++;
    }
    CHECK(used == 4, "load spreads over all 4 endpoints (used %d)", used);
    CHECK(busiest <= HELD / 2, "no endpoint takes more than half (busiest %d)", busiest);
    CHECK(llmproxy_router_in_flight(r) == HELD, "in flight %llu", (unsigned long long)llmproxy_router_in_flight(r));
    for (int i = 0; i < HELD; i++) llmproxy_request_finish(held[i], 200);
    CHECK(llmproxy_router_in_flight(r) == 0, "all released");
}

static void check_error(llmproxy_router *r, const char *body, size_t body_len, llmproxy_status want,
                        uint32_t want_http, const char *want_code) {
    llmproxy_request *req = NULL;
    llmproxy_status st = llmproxy_pick(r, NULL, 0, (const uint8_t *)body, body_len, &req);
    CHECK(st == want, "status %d, want %d", st, want);
    CHECK(req != NULL, "handle set on error");
    CHECK(llmproxy_request_http_status(req) == want_http, "http %u, want %u", llmproxy_request_http_status(req),
          want_http);
    size_t len = 0;
    const char *json = llmproxy_request_error_body(req, &len);
    CHECK(len > 0 && json[len] == 0 && strncmp(json, "{\"error\":{", 10) == 0, "error body: %s", json);
    char needle[64];
    snprintf(needle, sizeof needle, "\"code\":\"%s\"", want_code);
    CHECK(strstr(json, needle) != NULL, "code %s in %s", want_code, json);
    CHECK(llmproxy_request_endpoint(req, &len)[0] == 0 && len == 0, "no endpoint");
    llmproxy_request_finish(req, 0);
}

static void test_errors(llmproxy_router *r) {
    const char *s;
    s = "{\"model\": ";
    check_error(r, s, strlen(s), LLMPROXY_BAD_REQUEST, 400, "invalid_request");
    check_error(r, "", 0, LLMPROXY_BAD_REQUEST, 400, "invalid_request");
    s = "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]}";
    check_error(r, s, strlen(s), LLMPROXY_BAD_REQUEST, 400, "invalid_request");
    s = "{\"model\":\"qwen3-8b\",\"messages\":[]}";
    check_error(r, s, strlen(s), LLMPROXY_BAD_REQUEST, 400, "invalid_request");
    s = "{\"model\":\"gpt-unknown\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]}";
    check_error(r, s, strlen(s), LLMPROXY_MODEL_NOT_FOUND, 404, "model_not_found");

    size_t big_len = 9u << 20; /* over the 8 MiB max_body_bytes */
    char *big = malloc(big_len);
    memset(big, ' ', big_len);
    check_error(r, big, big_len, LLMPROXY_PAYLOAD_TOO_LARGE, 413, "request_too_large");
    free(big);

    /* Empty the llama cluster: 503. */
    CHECK(llmproxy_router_set_endpoints(r, "llama-3.1-8b", 12, NULL, 0) == LLMPROXY_OK, "clear endpoints");
    s = "{\"model\":\"llama-3.1-8b\",\"prompt\":\"x\"}";
    check_error(r, s, strlen(s), LLMPROXY_NO_ENDPOINT, 503, "no_endpoint");
}

static void test_set_endpoints(llmproxy_router *r) {
    llmproxy_str eps[2] = {{"127.0.0.1:8301", 14}, {"127.0.0.1:8302", 14}};
    CHECK(llmproxy_router_set_endpoints(r, "llama-3.1-8b", 12, eps, 2) == LLMPROXY_OK, "set endpoints");
    int seen[2] = {0, 0};
    for (int i = 0; i < 40; i++) {
        llmproxy_request *req = NULL;
        char body[96];
        snprintf(body, sizeof body, "{\"model\":\"llama-3.1-8b\",\"prompt\":\"prompt number %d\"}", i);
        CHECK(pick(r, NULL, 0, body, &req) == LLMPROXY_OK, "pick after set");
        const char *ep = llmproxy_request_endpoint(req, NULL);
        if (strcmp(ep, "127.0.0.1:8301") == 0) seen[0]++;
        else if (strcmp(ep, "127.0.0.1:8302") == 0) seen[1]++;
        else CHECK(0, "unexpected endpoint %s", ep);
        llmproxy_request_finish(req, 200);
    }
    CHECK(seen[0] > 0 && seen[1] > 0, "both new endpoints used (%d/%d)", seen[0], seen[1]);

    llmproxy_str bad[1] = {{"not-an-ip:80", 12}};
    CHECK(llmproxy_router_set_endpoints(r, "llama-3.1-8b", 12, bad, 1) == LLMPROXY_INVALID_ARGUMENT, "bad endpoint");
}

static void test_metrics(llmproxy_router *r) {
    char *text = NULL;
    size_t len = 0;
    CHECK(llmproxy_router_metrics(r, &text, &len) == LLMPROXY_OK && text != NULL, "metrics");
    CHECK(strlen(text) == len, "metrics length");
    CHECK(strstr(text, "llmproxy_in_flight_requests 0\n") != NULL, "in-flight gauge at 0");
    CHECK(strstr(text, "llmproxy_picks_total{outcome=\"model_not_found\"} 1\n") != NULL, "404 counted");
    CHECK(strstr(text, "# TYPE llmproxy_pick_duration_seconds histogram") != NULL, "pick histogram");
    llmproxy_string_free(text);
}

static void sleep_ms(long ms) {
    struct timespec t = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&t, NULL);
}

/* A listening socket on 127.0.0.1 that never accepts: a metadata-center that never answers.
 * Returns the fd and sets *port. */
static int never_answering_server(int *port) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t alen = sizeof a;
    if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof a) != 0 || listen(fd, 64) != 0 ||
        getsockname(fd, (struct sockaddr *)&a, &alen) != 0) {
        return -1;
    }
    *port = ntohs(a.sin_port);
    return fd;
}

/* The polling form of remote cache lookups (llmproxy_pick_start / _poll / _ticket_free), as
 * nginx uses it: every lookup waits for its timeout, the picks stay pending, one ticket is
 * freed undecided, the others are polled to their (local) decision. */
static void test_pick_tickets(void) {
    int port = 0;
    int fd = never_answering_server(&port);
    CHECK(fd >= 0, "listening socket");
    if (fd < 0) return;
    char config[512];
    snprintf(config, sizeof config,
             "{\"model_mapping_rule\":{\"m\":{\"rules\":[{\"cluster\":\"c\",\"backend\":\"vllm\"}]}},"
             "\"clusters\":{\"c\":{\"endpoints\":[\"127.0.0.1:8001\",\"127.0.0.1:8002\"]}},"
             "\"metadata_center\":{\"enabled\":true,\"host\":\"127.0.0.1\",\"port\":%d,"
             "\"cache_enabled\":true,\"timeout_ms\":100}}",
             port);
    llmproxy_router *r = NULL;
    char err[256];
    CHECK(llmproxy_router_new(config, strlen(config), &r, err, sizeof err) == LLMPROXY_OK, "router: %s", err);
    if (!r) {
        close(fd);
        return;
    }
    enum { N = 4 };
    llmproxy_pick_ticket *tickets[N];
    for (int i = 0; i < N; i++) {
        char question[32];
        snprintf(question, sizeof question, "question %d", i);
        char *body = chat_body("m", "A long shared system prompt. ", 40, question);
        llmproxy_request *req = (llmproxy_request *)0x1;
        tickets[i] = (llmproxy_pick_ticket *)0x1;
        llmproxy_status st =
            llmproxy_pick_start(r, NULL, 0, (const uint8_t *)body, strlen(body), &tickets[i], &req);
        CHECK(st == LLMPROXY_PENDING && tickets[i] != NULL && req == NULL, "pick %d pending (status %d)", i, st);
        free(body);
    }
    llmproxy_pick_ticket_free(tickets[0]); /* its decision, once made, is finished by the library */
    for (int i = 1; i < N; i++) {
        llmproxy_request *req = NULL;
        llmproxy_status st = LLMPROXY_PENDING;
        for (int waited = 0; st == LLMPROXY_PENDING && waited < 10000; waited++) {
            st = llmproxy_pick_poll(tickets[i], &req);
            if (st == LLMPROXY_PENDING) sleep_ms(1);
        }
        CHECK(st == LLMPROXY_OK && req != NULL, "ticket %d decided from local data (status %d)", i, st);
        llmproxy_request *again = (llmproxy_request *)0x1;
        CHECK(llmproxy_pick_poll(tickets[i], &again) == LLMPROXY_INVALID_ARGUMENT && again == NULL,
              "a ticket answers once");
        if (req) {
            CHECK(strncmp(llmproxy_request_endpoint(req, NULL), "127.0.0.1:800", 13) == 0, "endpoint");
            llmproxy_request_finish(req, 200);
        }
        llmproxy_pick_ticket_free(tickets[i]);
    }
    for (int waited = 0; llmproxy_router_in_flight(r) != 0 && waited < 5000; waited++) sleep_ms(1);
    CHECK(llmproxy_router_in_flight(r) == 0, "nothing left in flight");
    llmproxy_router_free(r);
    close(fd);
}

int main(void) {
    printf("llmproxy %s\n", llmproxy_version());
    test_invalid_config();
    test_pick_tickets();

    size_t len = 0;
    char *config = read_file("examples/config.json", &len);
    if (!config) {
        fprintf(stderr, "cannot read examples/config.json (run from the repository root)\n");
        return 2;
    }
    llmproxy_router *r = NULL;
    char err[512];
    llmproxy_status st = llmproxy_router_new(config, len, &r, err, sizeof err);
    free(config);
    CHECK(st == LLMPROXY_OK && r != NULL && err[0] == 0, "router from examples/config.json: %s", err);
    if (!r) return 1;

    test_routing(r);
    test_prefix_affinity_and_balance(r);
    test_errors(r);
    test_set_endpoints(r);
    test_metrics(r);
    llmproxy_router_free(r);

    printf("%d passed, %d failed\n", passed, failed);
    return failed == 0 ? 0 : 1;
}
