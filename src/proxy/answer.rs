//! corral's own answers: short plain-text errors, Engine.IO's "Session ID unknown"
//! (counted: it is the thrash metric), and the answer when a worker cannot be
//! reached. Shared by the request path and the tunnel; it decides nothing.

use crate::counters::Counters;
use crate::engineio::protocol as engineio;
use crate::proxy::forward::Ticket;
use crate::transport::body::{self, ProxyBody};
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::BodyExt;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;

/// A short plain-text answer of corral's own.
pub(crate) fn short(status: StatusCode, text: &str) -> Response<ProxyBody> {
    let mut resp = Response::new(body::full(text.to_owned()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// What an Engine.IO server answers for a session it does not know, so that the
/// client reconnects at once instead of retrying a dead sid.
pub(crate) fn unknown_sid() -> Response<ProxyBody> {
    let mut resp = Response::new(body::full(engineio::UNKNOWN_SID_BODY));
    *resp.status_mut() = StatusCode::BAD_REQUEST;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// "Session ID unknown", counted: the thrash counter of the metrics.
pub(crate) fn unknown_sid_counted(metrics: &Counters) -> Response<ProxyBody> {
    metrics.unknown_sid.fetch_add(1, Ordering::Relaxed);
    unknown_sid()
}

/// The answer when a worker refuses connections: a session died with it, so its
/// client is told the session is unknown and starts anew; anything else gets 502.
pub(crate) fn unreachable(
    metrics: &Counters,
    ticket: &Ticket,
    addr: SocketAddr,
) -> Response<ProxyBody> {
    match ticket {
        Ticket::Session(_) => unknown_sid_counted(metrics),
        _ => short(
            StatusCode::BAD_GATEWAY,
            &format!("corral: cannot connect to worker {addr}\n"),
        ),
    }
}

/// 413; `unread` is the client's body, held until the answer has gone out (an
/// HTTP/2 stream reset before that would lose the answer).
pub fn too_large(
    limit: u64,
    unread: Option<ProxyBody>,
    owner: &crate::runtime::life::Life,
) -> Response<ProxyBody> {
    let text = format!("corral: request body larger than {limit} bytes\n");
    let unread = body::Unread::new(unread, owner);
    let body = body::Holding::new(body::full(text), unread).boxed_unsync();
    let mut resp = Response::new(body);
    *resp.status_mut() = StatusCode::PAYLOAD_TOO_LARGE;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    // The rest of the body is not read, so the connection cannot be reused.
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}
