//! Errors a pick can end in, with their HTTP status and OpenAI-style JSON body.
//!
//! Every error that reaches a client has the OpenAI shape
//! `{"error": {"message", "type", "param", "code"}}` and one of the statuses
//! 400, 404, 413, 500 or 503. [`error_json`] renders the same body for any status, for the
//! errors hosts produce themselves (`llmproxy_error_body`).

use std::fmt;

/// Why a request could not be routed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PickError {
    /// Malformed request: invalid JSON, missing model, empty messages, … (400).
    BadRequest {
        /// What is wrong, for the client.
        message: String,
        /// The offending request field, when there is one.
        param: Option<&'static str>,
    },
    /// Unknown model, or no rule of the model matches the request headers (404).
    ModelNotFound {
        /// What is missing, for the client.
        message: String,
    },
    /// Not routed, and no error: the host proxies the request untouched, as one
    /// `should_intercept` refuses (a request on a stored Responses answer whose endpoint
    /// neither this gateway nor the Metadata-Center knows). HTTP status 0: nothing to answer.
    PassThrough {
        /// Why, for the request log.
        reason: String,
    },
    /// The body is larger than `max_body_bytes` (413).
    PayloadTooLarge {
        /// Size of the body received.
        size: u64,
        /// The configured limit.
        limit: u64,
    },
    /// The chosen cluster has no usable endpoint (503).
    NoEndpoint {
        /// The cluster that had none.
        cluster: String,
    },
    /// A bug caught at the C ABI boundary (500).
    Internal {
        /// What happened.
        message: String,
    },
}

impl PickError {
    /// Builds a 400 error.
    pub fn bad_request(message: impl Into<String>, param: Option<&'static str>) -> Self {
        Self::BadRequest {
            message: message.into(),
            param,
        }
    }

    /// The HTTP status a host answers with.
    pub fn http_status(&self) -> u32 {
        match self {
            Self::BadRequest { .. } => 400,
            Self::ModelNotFound { .. } => 404,
            Self::PassThrough { .. } => 0,
            Self::PayloadTooLarge { .. } => 413,
            Self::NoEndpoint { .. } => 503,
            Self::Internal { .. } => 500,
        }
    }

    /// Short outcome label used in metrics.
    pub fn outcome(&self) -> &'static str {
        match self {
            Self::BadRequest { .. } => "bad_request",
            Self::ModelNotFound { .. } => "model_not_found",
            Self::PassThrough { .. } => "passed_through",
            Self::PayloadTooLarge { .. } => "payload_too_large",
            Self::NoEndpoint { .. } => "no_endpoint",
            Self::Internal { .. } => "internal",
        }
    }

    /// The offending request field: a bad request's own, `model` for an unknown model.
    fn param(&self) -> Option<&'static str> {
        match self {
            Self::BadRequest { param, .. } => *param,
            _ => default_param(self.http_status()),
        }
    }

    /// The OpenAI-style JSON error body.
    pub fn to_json(&self) -> String {
        render(self.http_status(), &self.to_string(), self.param())
    }
}

/// OpenAI error `type` and `code` for an HTTP status: those of the [`PickError`] with that
/// status for 400, 404, 413, 500 and 503; the upstream's failures for 502 and 504; otherwise
/// a generic request error (4xx) or server error.
pub fn type_and_code(http_status: u32) -> (&'static str, &'static str) {
    match http_status {
        404 => ("invalid_request_error", "model_not_found"),
        413 => ("invalid_request_error", "request_too_large"),
        // 400 and every other client error.
        400..=499 => ("invalid_request_error", "invalid_request"),
        502 => ("upstream_error", "upstream_unavailable"),
        503 => ("service_unavailable_error", "no_endpoint"),
        504 => ("upstream_error", "upstream_timeout"),
        501 => ("server_error", "not_implemented"),
        // 500 and everything else.
        _ => ("server_error", "internal_error"),
    }
}

/// The `param` of an error of this status when nothing more precise is known.
fn default_param(http_status: u32) -> Option<&'static str> {
    (http_status == 404).then_some("model")
}

/// The error body the library renders for an error of `http_status` with `message`, as
/// [`PickError::to_json`] does (hosts render their own errors with it through the C ABI).
pub fn error_json(http_status: u32, message: &str) -> String {
    render(http_status, message, default_param(http_status))
}

/// `{"error": {"message", "type", "param", "code"}}`.
fn render(http_status: u32, message: &str, param: Option<&str>) -> String {
    let (kind, code) = type_and_code(http_status);
    serde_json::json!({
        "error": {
            "message": message,
            "type": kind,
            "param": param,
            "code": code,
        }
    })
    .to_string()
}

impl fmt::Display for PickError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadRequest { message, .. } => f.write_str(message),
            Self::ModelNotFound { message } => f.write_str(message),
            Self::PassThrough { reason } => write!(f, "passed through: {reason}"),
            Self::PayloadTooLarge { size, limit } => write!(
                f,
                "request body of {size} bytes is larger than the limit of {limit} bytes"
            ),
            Self::NoEndpoint { cluster } => {
                write!(f, "no healthy endpoint available in cluster {cluster:?}")
            }
            Self::Internal { message } => write!(f, "internal error: {message}"),
        }
    }
}

impl std::error::Error for PickError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_body_has_openai_shape() {
        let e = PickError::bad_request("messages must not be empty", Some("messages"));
        let v: serde_json::Value = serde_json::from_str(&e.to_json()).unwrap();
        assert_eq!(v["error"]["message"], "messages must not be empty");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["param"], "messages");
        assert_eq!(v["error"]["code"], "invalid_request");
        assert_eq!(e.http_status(), 400);

        let e = PickError::NoEndpoint {
            cluster: "c\"x".into(),
        };
        let v: serde_json::Value = serde_json::from_str(&e.to_json()).unwrap();
        assert_eq!(v["error"]["param"], serde_json::Value::Null);
        assert_eq!(e.http_status(), 503);
        assert!(v["error"]["message"].as_str().unwrap().contains("c\\\"x"));
    }

    #[test]
    fn statuses() {
        assert_eq!(
            PickError::ModelNotFound {
                message: String::new()
            }
            .http_status(),
            404
        );
        assert_eq!(
            PickError::PayloadTooLarge { size: 2, limit: 1 }.http_status(),
            413
        );
        assert_eq!(
            PickError::Internal {
                message: String::new()
            }
            .http_status(),
            500
        );
    }

    #[test]
    fn a_status_and_message_render_as_the_pick_error_of_that_status() {
        let errors = [
            PickError::bad_request("body is not valid JSON", None),
            PickError::ModelNotFound {
                message: "model \"m\" not found".into(),
            },
            PickError::PayloadTooLarge { size: 9, limit: 8 },
            PickError::NoEndpoint {
                cluster: "pool".into(),
            },
            PickError::Internal {
                message: "panic".into(),
            },
        ];
        for e in errors {
            assert_eq!(error_json(e.http_status(), &e.to_string()), e.to_json());
        }
        let v: serde_json::Value = serde_json::from_str(&error_json(504, "slow")).unwrap();
        assert_eq!(
            (&v["error"]["type"], &v["error"]["code"]),
            (&"upstream_error".into(), &"upstream_timeout".into())
        );
        assert_eq!(type_and_code(429).1, "invalid_request");
        assert_eq!(type_and_code(501), ("server_error", "not_implemented"));
        assert_eq!(type_and_code(505), ("server_error", "internal_error"));
    }
}
