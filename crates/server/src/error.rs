//! The one place domain errors become HTTP responses.

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use stacker_domain::Error;
use stacker_proto::http::Envelope;

/// A domain error on its way to the client as an envelope.
#[derive(Debug)]
pub struct ApiError(pub Error);

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        ApiError(e)
    }
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match &self.0 {
            Error::BadRequest(_) => StatusCode::BAD_REQUEST,
            Error::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Error::Forbidden(_) => StatusCode::FORBIDDEN,
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::Conflict(_) => StatusCode::CONFLICT,
            Error::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Error::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            Error::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::Store(_) | Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// What the client reads: never storage or internal detail.
    pub(crate) fn client_message(&self) -> String {
        match &self.0 {
            Error::Store(_) | Error::Internal(_) => "internal error".into(),
            other => other.to_string(),
        }
    }
}

/// An error envelope with the given status.
pub fn error_response(status: StatusCode, msg: String) -> Response {
    let body = Envelope::<()> { code: status.as_u16(), msg, data: None };
    (status, Json(body)).into_response()
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::error!(error = %self.0, "request failed");
        }
        error_response(status, self.client_message())
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        let status = rejection.status();
        ApiError(match status {
            StatusCode::PAYLOAD_TOO_LARGE => Error::TooLarge("request body is too large".into()),
            StatusCode::UNSUPPORTED_MEDIA_TYPE => {
                Error::BadRequest("expected a JSON body with Content-Type: application/json".into())
            }
            _ => Error::BadRequest(format!("invalid request body: {}", rejection.body_text())),
        })
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        ApiError(Error::BadRequest(format!("invalid query: {}", rejection.body_text())))
    }
}
