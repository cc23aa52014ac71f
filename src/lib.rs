//! llmproxy: an LLM inference load balancer that runs inside the proxy.
