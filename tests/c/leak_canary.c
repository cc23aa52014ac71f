/*
 * Canary for the memory checkers: leaks a request handle on purpose (picked, never finished).
 * `make -C tests/c run-canary` expects LeakSanitizer and valgrind to fail on it, which shows
 * that both see allocations made by the library behind the C ABI, so their silence on
 * test_llmproxy.c means something.
 */
#include <stdio.h>
#include <string.h>

#include "llmproxy.h"

static const char CONFIG[] =
    "{\"model_mapping_rule\":{\"m\":{\"rules\":[{\"cluster\":\"c\",\"backend\":\"vllm\"}]}},"
    "\"clusters\":{\"c\":{\"endpoints\":[\"127.0.0.1:8001\"]}}}";
static const char BODY[] = "{\"model\":\"m\",\"prompt\":\"hello\"}";

int main(void) {
    llmproxy_router *router = NULL;
    if (llmproxy_router_new(CONFIG, strlen(CONFIG), &router, NULL, 0) != LLMPROXY_OK) return 2;
    llmproxy_request *request = NULL;
    if (llmproxy_pick(router, NULL, 0, (const uint8_t *)BODY, strlen(BODY), &request) != LLMPROXY_OK)
        return 2;
    /* Forget the handle: the request is never finished, so it is leaked. */
    *(llmproxy_request *volatile *)&request = NULL;
    llmproxy_router_free(router);
    puts("leaked one request on purpose");
    return 0;
}
