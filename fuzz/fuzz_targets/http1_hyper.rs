//! The same bytes to corral's HTTP/1 rules (`http1`, the head and body readers its
//! client session uses) and to hyper's HTTP/1 server, the oracle: where both take
//! the first request, they must agree on its method, target and body (so on where
//! the next request begins). A refusal on either side is no disagreement on
//! framing: corral refuses more than hyper does, on purpose.
#![no_main]
use http_body_util::BodyExt;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use libfuzzer_sys::fuzz_target;
use std::sync::{Arc, Mutex, OnceLock};
use tokio::io::AsyncWriteExt;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    })
}

type Seen = Arc<Mutex<Option<Option<(String, String, Vec<u8>)>>>>;

/// hyper's first request of `data`: Some(None) when its body failed, None when no
/// request came out at all.
fn hyper_first(data: &[u8]) -> Option<Option<(String, String, Vec<u8>)>> {
    let seen: Seen = Arc::new(Mutex::new(None));
    let record = seen.clone();
    runtime().block_on(async move {
        let (mut client, server) = tokio::io::duplex(data.len() + 64 * 1024);
        let _ = client.write_all(data).await;
        let _ = client.shutdown().await;
        let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
            let record = record.clone();
            async move {
                let method = req.method().as_str().to_owned();
                let target = req.uri().to_string();
                let body = req.into_body().collect().await.ok().map(|b| b.to_bytes().to_vec());
                let mut first = record.lock().expect("lock");
                if first.is_none() {
                    *first = Some(body.map(|b| (method, target, b)));
                }
                Ok::<_, std::convert::Infallible>(hyper::Response::new(
                    http_body_util::Empty::<bytes::Bytes>::new(),
                ))
            }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(server), service);
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), conn).await;
        drop(client);
    });
    let first = seen.lock().expect("lock").take();
    first
}

fuzz_target!(|data: &[u8]| {
    let ours = corral::fuzzing::first_request(data);
    let theirs = hyper_first(data);
    let Some(ours) = ours else { return };
    match theirs {
        Some(Some((method, target, body))) => {
            assert_eq!(ours.method, method, "method");
            // hyper shows an authority-form or absolute target as it parsed it.
            if target.starts_with('/') {
                assert_eq!(ours.target, target, "target");
            }
            assert_eq!(ours.body, body, "body of {}", String::from_utf8_lossy(data));
        }
        Some(None) | None => {}
    }
});
