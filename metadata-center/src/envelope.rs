//! The aigw response envelope and its error codes, and request-body decoding that reproduces the
//! origin's (gin `ShouldBindJSON`) error messages.
//!
//! Every JSON response is `{"status":"OK"|"ERROR","error":null|{code,message,reason},"data":…,
//! "trace_id":…}`; the HTTP status of an error is `code / 100000`.

#[cfg(feature = "server")]
use axum::response::{IntoResponse, Response};
use http::StatusCode;
#[cfg(feature = "server")]
use http::{header, HeaderValue};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde::Serialize;

pub const CODE_INVALID_PARAMS: i64 = 40001400;
pub const CODE_UNAUTHORIZED: i64 = 40101001;
pub const CODE_INTERNAL: i64 = 50001000;
pub const MSG_INVALID_PARAMS: &str = "Invalid input parameters";

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ApiError {
    pub code: i64,
    pub message: String,
    pub reason: String,
}

impl ApiError {
    /// `40001400` with the bare message and the given reason.
    pub fn invalid(reason: impl Into<String>) -> Self {
        ApiError {
            code: CODE_INVALID_PARAMS,
            message: MSG_INVALID_PARAMS.to_string(),
            reason: reason.into(),
        }
    }

    pub fn http_status(&self) -> StatusCode {
        StatusCode::from_u16((self.code / 100_000) as u16)
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }
}

#[cfg(feature = "server")]
#[derive(Serialize)]
struct Envelope<'a, T: Serialize> {
    status: &'static str,
    error: Option<&'a ApiError>,
    data: T,
    #[serde(skip_serializing_if = "str::is_empty")]
    trace_id: &'a str,
}

#[cfg(feature = "server")]
fn json_response(status: StatusCode, body: Vec<u8>) -> Response {
    let mut resp = (status, body).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    resp
}

/// HTTP 200, `status:"OK"`, `error:null`.
#[cfg(feature = "server")]
pub fn ok<T: Serialize>(trace_id: &str, data: T) -> Response {
    match serde_json::to_vec(&Envelope {
        status: "OK",
        error: None,
        data,
        trace_id,
    }) {
        Ok(body) => json_response(StatusCode::OK, body),
        Err(e) => fail(
            trace_id,
            &ApiError {
                code: CODE_INTERNAL,
                message: "Internal server error".into(),
                reason: e.to_string(),
            },
        ),
    }
}

/// Error envelope with HTTP status `code / 100000`.
#[cfg(feature = "server")]
pub fn fail(trace_id: &str, err: &ApiError) -> Response {
    let env = Envelope {
        status: "ERROR",
        error: Some(err),
        data: (),
        trace_id,
    };
    // Serialising plain strings and integers cannot fail.
    let body = serde_json::to_vec(&env).unwrap_or_default();
    json_response(err.http_status(), body)
}

/// A request body type: its Go struct name (used in messages), the Go type of each JSON field
/// (for type-mismatch messages) and its validation rules.
pub trait WireRequest: DeserializeOwned + Default {
    const GO_STRUCT: &'static str;
    /// What the rules depend on besides the body (a limit from the settings, say); `()` when
    /// they are fixed. The server passes the configured limits (`decode_with`).
    type Limits: Default;
    fn go_type(field: &str) -> &'static str;
    fn validate(&self, limits: &Self::Limits) -> Result<(), ApiError>;
}

/// Validator-style reason for a failed rule, as go-playground/validator prints it.
pub fn validation_error(go_struct: &str, go_field: &str, tag: &str) -> ApiError {
    ApiError::invalid(format!(
        "Key: '{go_struct}.{go_field}' Error:Field validation for '{go_field}' failed on the '{tag}' tag"
    ))
}

/// `decode_with` the default limits.
pub fn decode<T: WireRequest>(body: &[u8]) -> Result<T, ApiError> {
    decode_with(body, &T::Limits::default())
}

/// Decode a JSON body like gin's `ShouldBindJSON`: the Content-Type is ignored, unknown fields
/// are ignored, `null` fields count as absent, only the first JSON value is read, then the
/// validation rules run against `limits`.
pub fn decode_with<T: WireRequest>(body: &[u8], limits: &T::Limits) -> Result<T, ApiError> {
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(ApiError::invalid("EOF"));
    }
    // the plain reader first; only a body it refuses is read again to learn the field's path
    // (the same reader under `serde_path_to_error`, which costs every element a frame)
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = match Option::<T>::deserialize(&mut de) {
        Ok(v) => v.unwrap_or_default(),
        Err(first) => {
            let mut de = serde_json::Deserializer::from_slice(body);
            return Err(
                match serde_path_to_error::deserialize::<_, Option<T>>(&mut de) {
                    Err(e) => map_json_error::<T>(body, &e.path().to_string(), e.into_inner()),
                    // not expected (the same reader): the first error, without a path
                    Ok(_) => map_json_error::<T>(body, "", first),
                },
            );
        }
    };
    value.validate(limits)?;
    Ok(value)
}

fn map_json_error<T: WireRequest>(body: &[u8], path: &str, e: serde_json::Error) -> ApiError {
    use serde_json::error::Category;
    match e.classify() {
        Category::Eof => ApiError::invalid("unexpected EOF"),
        Category::Syntax => ApiError {
            code: CODE_INVALID_PARAMS,
            message: format!("{MSG_INVALID_PARAMS}: invalid JSON format"),
            reason: go_syntax_reason(body, &e),
        },
        Category::Data | Category::Io => {
            let text = e.to_string();
            let Some(json_type) = json_type_of(&text) else {
                return ApiError::invalid(text);
            };
            // Go reports struct fields only; array indices are not part of the path.
            let field: String = strip_indices(path);
            if field.is_empty() || field == "." {
                return ApiError::invalid(format!(
                    "json: cannot unmarshal {json_type} into Go value of type {}",
                    T::GO_STRUCT
                ));
            }
            let go_type = T::go_type(&field);
            let qualified = format!("{}.{}", T::GO_STRUCT, field);
            ApiError {
                code: CODE_INVALID_PARAMS,
                message: format!("{MSG_INVALID_PARAMS}: field {qualified} should be {go_type}, not {json_type}"),
                reason: format!("json: cannot unmarshal {json_type} into Go struct field {qualified} of type {go_type}"),
            }
        }
    }
}

fn strip_indices(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    let mut depth = 0;
    for c in path.chars() {
        match c {
            '[' => depth += 1,
            ']' => depth -= 1,
            _ if depth == 0 => out.push(c),
            _ => {}
        }
    }
    out
}

/// Go's name for the JSON value kind in serde's "invalid type/value: …" messages.
fn json_type_of(msg: &str) -> Option<String> {
    let rest = msg
        .strip_prefix("invalid type: ")
        .or_else(|| msg.strip_prefix("invalid value: "))?;
    let number = |prefix: &str| -> Option<String> {
        let r = rest.strip_prefix(prefix)?;
        let lit = r.split('`').nth(1)?;
        Some(format!("number {lit}"))
    };
    if rest.starts_with("string") {
        Some("string".into())
    } else if rest.starts_with("boolean") {
        Some("bool".into())
    } else if rest.starts_with("map") {
        Some("object".into())
    } else if rest.starts_with("sequence") {
        Some("array".into())
    } else if let Some(n) = number("integer ") {
        Some(n)
    } else if let Some(n) = number("floating point ") {
        Some(n)
    } else {
        Some("value".into())
    }
}

/// Go's `encoding/json` SyntaxError text for the common cases.
fn go_syntax_reason(body: &[u8], e: &serde_json::Error) -> String {
    let text = e.to_string();
    let c = offending_char(body, e.line(), e.column());
    let ch = quote_char(c);
    let ctx = if text.starts_with("expected value")
        || text.starts_with("trailing comma") && c == Some(']')
    {
        "looking for beginning of value"
    } else if text.starts_with("key must be a string") || text.starts_with("trailing comma") {
        "looking for beginning of object key string"
    } else if text.starts_with("expected `:`") {
        "after object key"
    } else if text.starts_with("expected `,` or `}`") {
        "after object key:value pair"
    } else if text.starts_with("expected `,` or `]`") {
        "after array element"
    } else if text.starts_with("invalid number") || text.starts_with("number out of range") {
        "in numeric literal"
    } else if text.starts_with("expected ident") {
        "in literal"
    } else if text.starts_with("control character") {
        "in string literal"
    } else if text.starts_with("invalid escape") || text.starts_with("invalid unicode") {
        "in string escape code"
    } else {
        return text;
    };
    format!("invalid character {ch} {ctx}")
}

/// The character at serde's (1-based line, 1-based column) position.
fn offending_char(body: &[u8], line: usize, column: usize) -> Option<char> {
    let text = String::from_utf8_lossy(body);
    let l = text.split('\n').nth(line.checked_sub(1)?)?;
    l.chars().nth(column.saturating_sub(1))
}

fn quote_char(c: Option<char>) -> String {
    match c {
        Some('\'') => r"'\''".to_string(),
        Some('"') => "'\"'".to_string(),
        Some(c) if !c.is_control() => format!("'{c}'"),
        Some(c) => format!("'{}'", c.escape_default()),
        None => "''".to_string(),
    }
}

#[cfg(feature = "server")]
impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        fail("", &self)
    }
}

#[cfg(all(test, feature = "server"))]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Deserialize, Default, Debug)]
    struct Probe {
        request_id: Option<String>,
        prompt_length: Option<i32>,
        prompt_hash: Option<Vec<u64>>,
    }
    impl WireRequest for Probe {
        const GO_STRUCT: &'static str = "InferenceRequest";
        type Limits = ();
        fn go_type(field: &str) -> &'static str {
            match field {
                "prompt_length" => "int32",
                "prompt_hash" => "uint64",
                _ => "string",
            }
        }
        fn validate(&self, _: &()) -> Result<(), ApiError> {
            match &self.request_id {
                Some(s) if !s.is_empty() => Ok(()),
                _ => Err(validation_error(
                    "InferenceRequest",
                    "RequestID",
                    "required",
                )),
            }
        }
    }

    #[test]
    fn origin_pinned_invalid_json() {
        let e = decode::<Probe>(b"invalid-json").unwrap_err();
        assert_eq!(e.code, 40001400);
        assert_eq!(e.http_status(), StatusCode::BAD_REQUEST);
        assert_eq!(e.message, "Invalid input parameters: invalid JSON format");
        assert_eq!(
            e.reason,
            "invalid character 'i' looking for beginning of value"
        );
    }

    #[test]
    fn other_syntax_errors_read_like_go() {
        let r = |b: &str| decode::<Probe>(b.as_bytes()).unwrap_err().reason;
        assert_eq!(
            r(r#"{"request_id" 1}"#),
            "invalid character '1' after object key"
        );
        assert_eq!(
            r(r#"{"request_id":"a" "x":1}"#),
            "invalid character '\"' after object key:value pair"
        );
        assert_eq!(
            r(r#"{1:2}"#),
            "invalid character '1' looking for beginning of object key string"
        );
        assert_eq!(
            r(r#"{"prompt_hash":[1 2]}"#),
            "invalid character '2' after array element"
        );
        assert_eq!(r(r#"{"request_id":"a","#), "unexpected EOF");
        assert_eq!(r("  "), "EOF");
    }

    #[test]
    fn type_mismatch_names_the_field() {
        let e = decode::<Probe>(br#"{"request_id":"r","prompt_length":"12"}"#).unwrap_err();
        assert_eq!(e.message, "Invalid input parameters: field InferenceRequest.prompt_length should be int32, not string");
        assert_eq!(
            e.reason,
            "json: cannot unmarshal string into Go struct field InferenceRequest.prompt_length of type int32"
        );
        let e = decode::<Probe>(br#"{"request_id":"r","prompt_hash":[1,-2]}"#).unwrap_err();
        assert_eq!(e.message, "Invalid input parameters: field InferenceRequest.prompt_hash should be uint64, not number -2");
        let e = decode::<Probe>(br#"{"request_id":"r","prompt_length":3000000000}"#).unwrap_err();
        assert!(
            e.message
                .ends_with("should be int32, not number 3000000000"),
            "{}",
            e.message
        );
    }

    #[test]
    fn validation_failure_has_bare_message() {
        let e = decode::<Probe>(br#"{"prompt_length":1}"#).unwrap_err();
        assert_eq!(e.message, "Invalid input parameters");
        assert!(
            e.reason
                .contains("'RequestID' failed on the 'required' tag"),
            "{}",
            e.reason
        );
        // null counts as absent, like Go.
        assert!(decode::<Probe>(br#"{"request_id":null}"#).is_err());
        assert!(decode::<Probe>(b"null").is_err());
    }

    #[test]
    fn lenient_like_gin() {
        // Unknown fields ignored, trailing data after the first value ignored (json.Decoder).
        let p =
            decode::<Probe>(br#"{"request_id":"r","cluster":"","ip":"","x":{"y":[1]}} trailing"#)
                .unwrap();
        assert_eq!(p.request_id.as_deref(), Some("r"));
        assert_eq!(p.prompt_length, None);
        assert_eq!(p.prompt_hash, None);
    }

    #[test]
    fn envelope_shape() {
        let resp = ok("t-1", serde_json::json!([1]));
        assert_eq!(resp.status(), StatusCode::OK);
        let body = serde_json::to_value(Envelope {
            status: "OK",
            error: None,
            data: 5,
            trace_id: "t",
        })
        .unwrap();
        assert_eq!(
            body,
            serde_json::json!({"status":"OK","error":null,"data":5,"trace_id":"t"})
        );
        let err = ApiError::invalid("why");
        let body = serde_json::to_value(Envelope {
            status: "ERROR",
            error: Some(&err),
            data: (),
            trace_id: "t",
        })
        .unwrap();
        assert_eq!(
            body,
            serde_json::json!({"status":"ERROR","error":{"code":40001400,"message":"Invalid input parameters","reason":"why"},"data":null,"trace_id":"t"})
        );
    }
}
