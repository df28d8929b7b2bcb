//! The admin listener: `/metrics` (Prometheus text), `/status` (a live HTML page with
//! no build step and nothing from a CDN) and `/status.json`, on a port of its own,
//! loopback by default, optionally behind basic auth; and, without auth, the probes
//! for load balancers and orchestrators: `/healthz` (corral is alive) and `/readyz`
//! (at least one worker is ready, else 503; the counts in the body).
//!
//! It only reads, through the views of `observe::metrics`.

use crate::edge::auth::BasicAuth;
use crate::edge::h1;
use crate::observe::metrics::{self, Sources};
use crate::runtime::handover;
use crate::runtime::life::Life;
use crate::transport::body::RequestBody;
use crate::transport::body::{self, ProxyBody};
use http::{header, HeaderValue, Request, Response, StatusCode};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;

const PAGE: &str = include_str!("../../assets/status.html");

/// The status listener as it runs. A reload may give it other credentials, or
/// close it and start another on a new address.
pub struct StatusListener {
    /// As bound.
    pub addr: SocketAddr,
    /// As configured (port 0 stays 0 here).
    pub configured: SocketAddr,
    auth: Arc<arc_swap::ArcSwapOption<BasicAuth>>,
    stop: tokio_util::sync::CancellationToken,
    /// Its socket, as an upgrade carries it (the accept loop owns another); let go
    /// of when it stops, so that its port is free at once.
    socket: Arc<std::sync::Mutex<Option<std::os::fd::OwnedFd>>>,
}

impl StatusListener {
    /// For an upgrade: stops accepting (connections wait in the backlog) and gives
    /// its socket to `carried`.
    pub fn carry(&self, carried: &mut handover::Carried) -> std::io::Result<Option<i32>> {
        let kept = self.socket.lock().unwrap_or_else(|e| e.into_inner());
        let Some(socket) = kept.as_ref() else {
            return Ok(None);
        };
        let fd = carried.dup(socket)?;
        self.stop.cancel();
        Ok(Some(fd))
    }

    /// New connections are asked for these credentials (None: for none).
    pub fn set_auth(&self, auth: Option<Arc<BasicAuth>>) {
        self.auth.store(auth);
    }

    /// Stops accepting; connections open now are answered until they close.
    pub fn close(&self) {
        self.stop.cancel();
    }
}

/// A status listener bound, not yet serving.
pub struct StatusSocket {
    listener: TcpListener,
    addr: SocketAddr,
    configured: SocketAddr,
}

/// The status listener an upgrade carried, configured as `configured`.
pub fn inherited(
    socket: std::net::TcpListener,
    configured: SocketAddr,
) -> std::io::Result<StatusSocket> {
    socket.set_nonblocking(true)?;
    let listener = TcpListener::from_std(socket)?;
    Ok(StatusSocket {
        addr: listener.local_addr()?,
        listener,
        configured,
    })
}

/// Binds the status listener on `addr` (not yet serving).
pub async fn bind(addr: SocketAddr) -> Result<StatusSocket, crate::observe::Error> {
    let listen_error = |cause| crate::observe::Error::Listen { addr, cause };
    let listener = TcpListener::bind(addr).await.map_err(listen_error)?;
    let local = listener.local_addr().map_err(listen_error)?;
    Ok(StatusSocket {
        listener,
        addr: local,
        configured: addr,
    })
}

/// Binds the status listener and serves it until closed or `owner` stops, which
/// ends the accept loop and every connection and waits for them.
pub async fn serve(
    addr: SocketAddr,
    sources: Arc<Sources>,
    auth: Option<Arc<BasicAuth>>,
    owner: &Life,
) -> Result<StatusListener, crate::observe::Error> {
    Ok(start(bind(addr).await?, sources, auth, owner))
}

/// Serves a bound status listener.
pub fn start(
    socket: StatusSocket,
    sources: Arc<Sources>,
    auth: Option<Arc<BasicAuth>>,
    owner: &Life,
) -> StatusListener {
    let auth = Arc::new(arc_swap::ArcSwapOption::new(auth));
    let stop = tokio_util::sync::CancellationToken::new();
    let (tasks, credentials, stopped) = (owner.clone(), auth.clone(), stop.clone());
    let listener = socket.listener;
    let copy = std::os::fd::AsFd::as_fd(&listener)
        .try_clone_to_owned()
        .ok();
    let copy = Arc::new(std::sync::Mutex::new(copy));
    let (kept, stops, drained) = (copy.clone(), stop.clone(), owner.draining());
    owner.spawn(async move {
        tokio::select! {
            _ = stops.cancelled() => {}
            _ = drained => {}
        }
        kept.lock().unwrap_or_else(|e| e.into_inner()).take();
    });
    owner.spawn_until_drained(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = stopped.cancelled() => return,
            };
            let Ok((stream, _)) = accepted else {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            };
            let (src, auth) = (sources.clone(), credentials.load_full());
            let service = move |req| answer(req, src.clone(), auth.clone());
            let draining = tasks.signal();
            let stream = crate::edge::uproot::Movable::new(stream, SEND);
            tasks.spawn(async move {
                h1::serve(
                    stream,
                    &service,
                    LIMITS,
                    &draining,
                    None,
                    Default::default(),
                )
                .await;
            });
        }
    });
    StatusListener {
        addr: socket.addr,
        configured: socket.configured,
        auth,
        stop,
        socket: copy,
    }
}

/// The status listener's connections' limits: its requests are small and few.
const LIMITS: h1::Limits = h1::Limits {
    max_head: 64 * 1024,
    header_read: std::time::Duration::from_secs(10),
    keepalive: std::time::Duration::from_secs(10),
    body_read: std::time::Duration::from_secs(10),
    shutdown: false,
    nagle: false,
};

/// A status connection that reads nothing of its answer for this long is cut.
const SEND: std::time::Duration = std::time::Duration::from_secs(10);

async fn answer(
    req: Request<RequestBody>,
    src: Arc<Sources>,
    auth: Option<Arc<BasicAuth>>,
) -> h1::Answer {
    // Probes carry no credentials (a Kubernetes probe or Docker HEALTHCHECK) and
    // tell no more than a count.
    match req.uri().path() {
        "/healthz" => return Ok(reply(StatusCode::OK, "text/plain", "ok\n".into())),
        "/readyz" => return Ok(readiness(&src)),
        _ => {}
    }
    if let Some(auth) = &auth {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .map(|v| v.as_bytes());
        if !auth.allows(given).await {
            let mut r = reply(
                StatusCode::UNAUTHORIZED,
                "text/plain",
                "401 Unauthorized\n".into(),
            );
            if let Ok(v) = HeaderValue::from_str(&format!("Basic realm=\"{}\"", auth.realm)) {
                r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
            }
            return Ok(r);
        }
    }
    Ok(match req.uri().path() {
        "/metrics" => reply(
            StatusCode::OK,
            metrics::CONTENT_TYPE,
            metrics::prometheus(&src),
        ),
        "/status.json" => reply(
            StatusCode::OK,
            "application/json",
            metrics::status_json(&src).to_string(),
        ),
        "/status" | "/" => reply(StatusCode::OK, "text/html; charset=utf-8", PAGE.to_string()),
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    })
}

/// 200 when at least one worker is ready, 503 otherwise; the counts in the body.
fn readiness(src: &Sources) -> Response<ProxyBody> {
    let (ready, total) = src.pool.up_count();
    let (status, word) = match ready {
        0 => (StatusCode::SERVICE_UNAVAILABLE, "not ready"),
        _ => (StatusCode::OK, "ready"),
    };
    let text = format!("{word}: {ready} of {total} workers ready\n");
    reply(status, "text/plain", text)
}

fn reply(status: StatusCode, kind: &'static str, text: String) -> Response<ProxyBody> {
    let mut r = Response::new(body::full(text));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}
