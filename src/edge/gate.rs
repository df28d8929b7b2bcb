//! The gate: what every request passes before the proxy sees it, in this order —
//! strict head rules (`http1::check`), the redirect to https, path normalisation
//! (`path`), the declared body size, basic auth (`auth`), and the refusal of an
//! upgrade request with a body — and the access log line written around it all.
//!
//! It owns those checks (refused bodies are read away by the proxy's tasks); it decides nothing
//! about workers. A request it lets in goes to `Proxy::route`, told whether its
//! normalised path is on the Engine.IO path.

use crate::config::Config;
use crate::edge::auth::BasicAuth;
use crate::http1::check::{self, Refused};
use crate::http1::{content_length, is_websocket_upgrade};
use crate::observe::access::{self, AccessLog};
use crate::proxy::answer::short;
use crate::proxy::forward::Peer;
use crate::proxy::route::Proxy;
use crate::transport::body::{ProxyBody, RequestBody};
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body::Body as _;
use http_body_util::BodyExt;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

/// The checks, the access log, and the proxy behind them.
pub struct Gate {
    cfg: Arc<Config>,
    auth: Option<Arc<BasicAuth>>,
    access: Option<AccessLog>,
    proxy: Arc<Proxy>,
}

impl Gate {
    /// A gate in front of `proxy`.
    pub fn new(
        cfg: Arc<Config>,
        auth: Option<Arc<BasicAuth>>,
        access: Option<AccessLog>,
        proxy: Arc<Proxy>,
    ) -> Gate {
        Gate {
            cfg,
            auth,
            access,
            proxy,
        }
    }

    /// The proxy behind it.
    pub fn proxy(&self) -> &Arc<Proxy> {
        &self.proxy
    }

    /// The configuration it checks against.
    pub fn cfg(&self) -> &Arc<Config> {
        &self.cfg
    }

    /// Serves one client request. Never fails: every error becomes a response.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<RequestBody>,
        peer: Peer,
    ) -> Result<Response<ProxyBody>, Infallible> {
        let Some(log) = &self.access else {
            return Ok(self.admit(req, peer).await);
        };
        let started = Instant::now();
        if !log.engineio && self.proxy.is_engineio(req.uri().path()) {
            return Ok(self.admit(req, peer).await);
        }
        let header = |name: header::HeaderName| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let (referer, agent) = (header(header::REFERER), header(header::USER_AGENT));
        let method = req.method().clone();
        let target = req
            .uri()
            .path_and_query()
            .map_or("/".into(), |p| p.to_string());
        let version = format!("{:?}", req.version());
        let addr = peer.addr;
        let resp = self.admit(req, peer).await;
        log.log(&access::Entry {
            peer: addr,
            method: method.as_str(),
            target: &target,
            version: &version,
            status: resp.status().as_u16(),
            bytes: resp.body().size_hint().exact(),
            referer: referer.as_deref(),
            user_agent: agent.as_deref(),
            duration: started.elapsed(),
        });
        Ok(resp)
    }

    /// The checks, then the proxy.
    async fn admit(&self, req: Request<RequestBody>, peer: Peer) -> Response<ProxyBody> {
        if let Err(refused) = check::request(&req) {
            return refusal(refused);
        }
        if let Some(port) = peer.redirect_https {
            return redirect_https(&req, port);
        }
        // Every decision below is made on the normalised path.
        let Some(path) = crate::edge::path::normalise(req.uri().path()) else {
            return short(StatusCode::BAD_REQUEST, "corral: bad request path\n");
        };
        if content_length(req.headers()).is_some_and(|n| n > self.cfg.limits.max_body) {
            // The unread body stays with the answer (see `body::Faults`), read away
            // by the proxy's lingering tasks.
            let unread = req.into_body().map_err(Into::into).boxed_unsync();
            return self.proxy.too_large(Some(unread));
        }
        if let Some(auth) = &self.auth {
            if !auth.is_exempt(&path)
                && !auth
                    .allows(
                        req.headers()
                            .get(header::AUTHORIZATION)
                            .map(|v| v.as_bytes()),
                    )
                    .await
            {
                return unauthorized(&auth.realm);
            }
        }
        let upgrade = is_websocket_upgrade(req.headers());
        if upgrade && !req.body().is_end_stream() {
            // Its body would have to be sent before the tunnel, and a worker that
            // answers without upgrading would be left waiting for it on a connection
            // corral reuses: refused, as nothing legitimate sends one. Judged by the
            // body's own framing, as the retry rule is, and before any routing.
            return short(
                StatusCode::BAD_REQUEST,
                "corral: an upgrade request must not carry a body\n",
            );
        }
        let engineio = self.proxy.is_engineio(&path);
        self.proxy.clone().route(req, peer, engineio, upgrade).await
    }
}

/// The answer to a head `check::request` refused (its framing was read: the
/// connection may go on). What cannot be framed was refused, and the connection
/// closed, by the HTTP/1.1 head reader.
fn refusal(refused: Refused) -> Response<ProxyBody> {
    short(refused.status(), &format!("corral: {refused}\n"))
}

fn unauthorized(realm: &str) -> Response<ProxyBody> {
    let mut resp = short(StatusCode::UNAUTHORIZED, "401 Unauthorized\n");
    if let Ok(v) = HeaderValue::from_str(&format!("Basic realm=\"{realm}\", charset=\"UTF-8\"")) {
        resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
    resp
}

/// 301 to the same host and path on https.
fn redirect_https<B>(req: &Request<B>, port: u16) -> Response<ProxyBody> {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().host())
        .unwrap_or("localhost");
    // Drop any port from Host (a bracketed IPv6 literal keeps its brackets).
    let name = match host.rfind(':') {
        Some(i) if !host[i..].contains(']') => &host[..i],
        _ => host,
    };
    let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let location = if port == 443 {
        format!("https://{name}{pq}")
    } else {
        format!("https://{name}:{port}{pq}")
    };
    let mut resp = short(StatusCode::MOVED_PERMANENTLY, "corral: use https\n");
    match HeaderValue::from_str(&location) {
        Ok(v) => {
            resp.headers_mut().insert(header::LOCATION, v);
            resp
        }
        Err(_) => short(StatusCode::BAD_REQUEST, "corral: bad Host header\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirect_keeps_host_and_path() {
        let req = Request::builder()
            .uri("/a?b=1")
            .header(header::HOST, "example.org:8080")
            .body(())
            .expect("request");
        let resp = redirect_https(&req, 8443);
        assert_eq!(resp.status(), StatusCode::MOVED_PERMANENTLY);
        assert_eq!(
            resp.headers()[header::LOCATION],
            "https://example.org:8443/a?b=1"
        );
        let req = Request::builder()
            .uri("/")
            .header(header::HOST, "[::1]:80")
            .body(())
            .expect("request");
        assert_eq!(
            redirect_https(&req, 443).headers()[header::LOCATION],
            "https://[::1]/"
        );
    }
}
