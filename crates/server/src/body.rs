//! A REST request body as the handlers take it: read whole (within
//! `--max-body-bytes`), or the error its rejection stands for.

use axum::{body::Bytes, extract::rejection::BytesRejection, http::StatusCode};

use crate::{error::ApiError, AppState};

pub type Body = Result<Bytes, BytesRejection>;

/// The request body, or the error its rejection stands for (over the limit, or
/// unreadable).
pub fn body_bytes(s: &AppState, body: Body) -> Result<Bytes, ApiError> {
    body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge {
                limit: s.cfg.max_body_bytes,
            }
        } else {
            ApiError::Malformed(r.body_text())
        }
    })
}
