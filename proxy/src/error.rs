//! The one place that maps request failures to HTTP status, stable error code and JSON body.
//!
//! Every failure knows whose fault it is: the caller's (4xx), the model's (500 `model.error`,
//! 502, 504) or capacity (429, 503). The `code` doubles as the `code` label of
//! `modelgate_requests_total`, so it must stay a small fixed set.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

pub use crate::body::Body;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    InvalidRequest(String),
    #[error("unknown access key")]
    InvalidAccessKey,
    #[error("request body exceeds the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("{reason}; retry later or deploy more replicas")]
    Busy {
        reason: &'static str,
        retry_after_secs: u64,
    },
    #[error("{exception}: {message}")]
    Model { exception: String, message: String },
    #[error("the model ran out of memory under its replica's limit ({exception}: {message}); the replica is being restarted")]
    OutOfMemory { exception: String, message: String },
    #[error("the replica was {0} while handling the request; it is being restarted")]
    MemoryLimit(String),
    #[error("unexpected model shutdown: the replica died while handling the request and is being restarted")]
    Shutdown,
    #[error("model {model:?} has no ready replica")]
    Unavailable { model: String },
    #[error(
        "the model function ran past the request timeout of {secs} s; its replica was restarted"
    )]
    Timeout { secs: f64 },
    #[error("the replica sent an invalid response: {0}")]
    BadReplicaResponse(&'static str),
    #[error("no route for {0}")]
    NotFound(String),
    #[error("method not allowed; use {allowed}")]
    MethodNotAllowed { allowed: &'static str },
    #[error("internal error")]
    Internal,
    #[error("{0} not found")]
    ResourceNotFound(&'static str),
    #[error("{0}")]
    Conflict(String),
    #[error("authentication required: {0}")]
    Unauthorized(&'static str),
    #[error("{0}")]
    Forbidden(String),
    #[error("the API key would expire after the site's maximum of {max_days} days")]
    ExpiryTooLong { max_days: i64 },
    #[error("the request body did not arrive within {secs} s; the connection is closed")]
    BodyTimeout { secs: f64 },
}

impl From<modelgate_control::store::StoreError> for ApiError {
    fn from(e: modelgate_control::store::StoreError) -> Self {
        use modelgate_control::store::StoreError;
        match e {
            StoreError::NotFound(what) => ApiError::ResourceNotFound(what),
            StoreError::Conflict(msg) => ApiError::Conflict(msg),
            StoreError::Backend(msg) => {
                tracing::error!("store: {msg}");
                ApiError::Internal
            }
        }
    }
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::InvalidAccessKey => StatusCode::UNAUTHORIZED,
            ApiError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Busy { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Model { .. } | ApiError::OutOfMemory { .. } | ApiError::MemoryLimit(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            ApiError::Shutdown | ApiError::BadReplicaResponse(_) => StatusCode::BAD_GATEWAY,
            ApiError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::ResourceNotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::ExpiryTooLong { .. } => StatusCode::BAD_REQUEST,
            ApiError::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
        }
    }

    /// The stable machine-readable code; clients and dashboards key on it.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::InvalidRequest(_) => "request.invalid",
            ApiError::InvalidAccessKey => "access_key.invalid",
            ApiError::TooLarge { .. } => "request.too_large",
            ApiError::Busy { .. } => "model.busy",
            ApiError::Model { .. } => "model.error",
            ApiError::OutOfMemory { .. } | ApiError::MemoryLimit(_) => "model.out_of_memory",
            ApiError::Shutdown => "model.shutdown",
            ApiError::BadReplicaResponse(_) => "model.invalid_response",
            ApiError::Unavailable { .. } => "model.unavailable",
            ApiError::Timeout { .. } => "model.timeout",
            ApiError::NotFound(_) => "route.not_found",
            ApiError::MethodNotAllowed { .. } => "method.not_allowed",
            ApiError::Internal => "internal.error",
            ApiError::ResourceNotFound(_) => "resource.not_found",
            ApiError::Conflict(_) => "resource.conflict",
            ApiError::Unauthorized(_) => "auth.unauthorized",
            ApiError::Forbidden(_) => "auth.forbidden",
            ApiError::ExpiryTooLong { .. } => "api_key.expiry_too_long",
            ApiError::BodyTimeout { .. } => "request.timeout",
        }
    }

    pub fn into_response(self) -> Response<Body> {
        let body = serde_json::json!({
            "success": false,
            "error": { "code": self.code(), "message": self.to_string() },
        });
        let mut resp = json_response(self.status(), serde_json::to_vec(&body).unwrap_or_default());
        match &self {
            ApiError::Busy {
                retry_after_secs, ..
            } => {
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_secs));
            }
            ApiError::MethodNotAllowed { allowed } => {
                resp.headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static(allowed));
            }
            ApiError::Unauthorized(_) => {
                resp.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"modelgate\""),
                );
            }
            ApiError::BodyTimeout { .. } => {
                // The rest of the body may still be on its way: this connection is done.
                resp.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        resp
    }
}

pub fn json_response(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut resp = Response::new(crate::body::full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn error_bodies_follow_the_contract() {
        let cases = [
            (
                ApiError::InvalidRequest("bad body".into()),
                400,
                "request.invalid",
            ),
            (ApiError::InvalidAccessKey, 401, "access_key.invalid"),
            (ApiError::TooLarge { limit: 5 }, 413, "request.too_large"),
            (
                ApiError::Busy {
                    reason: "busy",
                    retry_after_secs: 1,
                },
                429,
                "model.busy",
            ),
            (
                ApiError::Model {
                    exception: "KeyError".into(),
                    message: "'b'".into(),
                },
                500,
                "model.error",
            ),
            (ApiError::Shutdown, 502, "model.shutdown"),
            (
                ApiError::Unavailable { model: "m".into() },
                503,
                "model.unavailable",
            ),
            (ApiError::Timeout { secs: 1.0 }, 504, "model.timeout"),
            (ApiError::Unauthorized("no key"), 401, "auth.unauthorized"),
            (
                ApiError::Forbidden("not allowed".into()),
                403,
                "auth.forbidden",
            ),
        ];
        for (err, status, code) in cases {
            let resp = err.into_response();
            assert_eq!(resp.status().as_u16(), status);
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(v["success"], false);
            assert_eq!(v["error"]["code"], code);
            assert!(v["error"]["message"].as_str().unwrap().len() > 3);
        }
    }
}
