//! corral in-process, as `run` builds it (`App`), on port 0 everywhere: the
//! addresses are read from the running App, not picked beforehand or scraped from
//! a log. Stopping the App ends every task it started: afterwards no listener it
//! bound (clients, status, message queue) accepts a connection.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;
use support::{exchange, Mode, RawWorker, TempDir};

fn ping(addr: SocketAddr) -> Option<Vec<u8>> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"*1\r\n$4\r\nPING\r\n").ok()?;
    let mut buf = [0u8; 16];
    let n = s.read(&mut buf).ok()?;
    Some(buf[..n].to_vec())
}

#[test]
fn an_app_on_port_zero_tells_its_addresses_and_stop_ends_everything() {
    let worker = RawWorker::start(Mode::Echo);
    let dir = TempDir::new("app");
    let text = format!(
        "listen = [\"127.0.0.1:0\", \"127.0.0.1:0\"]\nupstreams = [\"{}\"]\nadmin_socket = \"{}\"\nthreads = 1\n[admin]\nlisten = \"127.0.0.1:0\"\n[message_queue]\nembedded = true\nlisten = \"127.0.0.1:0\"\n",
        worker.addr,
        dir.0.join("admin.sock").display()
    );
    let cfg = corral::config::Config::parse(&text, "app.toml").expect("config");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let app = runtime
        .block_on(corral::run::App::start(cfg))
        .expect("starts");
    let listeners = app.listeners().to_vec();
    assert_eq!(listeners.len(), 2);
    assert!(listeners.iter().all(|a| a.port() != 0), "{listeners:?}");
    assert_ne!(listeners[0], listeners[1]);
    for addr in &listeners {
        let r = exchange(*addr, b"GET /x HTTP/1.1\r\nHost: localhost\r\n\r\n");
        assert_eq!(r.map(|r| r.status), Some(200), "{addr}");
    }
    let status = app.status().expect("status listener");
    let r = exchange(status, b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n");
    assert_eq!(r.map(|r| r.status), Some(200));
    let broker = app.broker().expect("broker");
    assert_eq!(ping(broker).as_deref(), Some(&b"+PONG\r\n"[..]));
    // A client connection to the broker left open: stop must end it too.
    let mut held = TcpStream::connect(broker).expect("connect");
    held.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    // And a kept-alive client connection, idle between requests.
    let mut idle = TcpStream::connect(listeners[0]).expect("connect");
    idle.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    idle.write_all(b"GET /y HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .expect("write");
    let reply = support::read_reply(&mut std::io::BufReader::new(&idle)).expect("reply");
    assert_eq!(reply.status, 200);

    let stopped = runtime
        .block_on(async { tokio::time::timeout(Duration::from_secs(20), app.stop("test")).await });
    assert_eq!(stopped, Ok(0), "every task and thread of corral's ended");
    let mut buf = [0u8; 8];
    assert!(matches!(held.read(&mut buf), Ok(0) | Err(_)));
    assert!(matches!(idle.read(&mut buf), Ok(0) | Err(_)));
    for addr in listeners.iter().chain([&status, &broker]) {
        assert!(TcpStream::connect(addr).is_err(), "{addr} still accepts");
    }
    assert!(!dir.0.join("admin.sock").exists(), "admin socket removed");
}
