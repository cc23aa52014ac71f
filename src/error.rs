//! Errors a pick can end in, with their HTTP status and OpenAI-style JSON body.
//!
//! Every error that reaches a client has the OpenAI shape
//! `{"error": {"message", "type", "param", "code"}}` and one of the statuses
//! 400, 404, 413, 500 or 503.

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
            Self::PayloadTooLarge { .. } => "payload_too_large",
            Self::NoEndpoint { .. } => "no_endpoint",
            Self::Internal { .. } => "internal",
        }
    }

    /// OpenAI error `type` and `code` for this error.
    fn type_and_code(&self) -> (&'static str, &'static str) {
        match self {
            Self::BadRequest { .. } => ("invalid_request_error", "invalid_request"),
            Self::ModelNotFound { .. } => ("invalid_request_error", "model_not_found"),
            Self::PayloadTooLarge { .. } => ("invalid_request_error", "request_too_large"),
            Self::NoEndpoint { .. } => ("service_unavailable_error", "no_endpoint"),
            Self::Internal { .. } => ("server_error", "internal_error"),
        }
    }

    /// The OpenAI-style JSON error body.
    pub fn to_json(&self) -> String {
        let (kind, code) = self.type_and_code();
        let param = match self {
            Self::BadRequest { param, .. } => *param,
            Self::ModelNotFound { .. } => Some("model"),
            _ => None,
        };
        serde_json::json!({
            "error": {
                "message": self.to_string(),
                "type": kind,
                "param": param,
                "code": code,
            }
        })
        .to_string()
    }
}

impl fmt::Display for PickError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadRequest { message, .. } => f.write_str(message),
            Self::ModelNotFound { message } => f.write_str(message),
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
}
