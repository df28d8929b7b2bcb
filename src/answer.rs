//! corral's own answers: short plain-text errors, Engine.IO's "Session ID unknown"
//! (counted: it is the thrash metric), and the answer when a worker cannot be
//! reached. Shared by the request path and the tunnel; it decides nothing.

use crate::body::{self, ProxyBody};
use crate::engineio;
use crate::forward::Ticket;
use crate::metrics::Metrics;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
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
pub(crate) fn unknown_sid_counted(metrics: &Metrics) -> Response<ProxyBody> {
    metrics.unknown_sid.fetch_add(1, Ordering::Relaxed);
    unknown_sid()
}

/// The answer when a worker refuses connections: a session died with it, so its
/// client is told the session is unknown and starts anew; anything else gets 502.
pub(crate) fn unreachable(
    metrics: &Metrics,
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
