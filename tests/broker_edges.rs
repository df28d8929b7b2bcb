//! The embedded broker at its edges, over real sockets: AUTH compares whole
//! passwords, clients are capped, and the replies Redis's own pub/sub tests and
//! harness rely on (CLIENT REPLY, FLUSHALL, PUBSUB arity, arity before NOAUTH).

use corral::broker::{self, OutputLimit, Settings};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn settings(password: Option<&str>, max_clients: usize) -> Settings {
    Settings {
        password: password.map(str::to_owned),
        max_bulk: 1 << 20,
        max_args: 1 << 16,
        max_command: 4 << 20,
        max_clients,
        output: OutputLimit {
            hard: 32 << 20,
            soft: 8 << 20,
            soft_for: Duration::from_secs(60),
        },
    }
}

async fn start(password: Option<&str>, max_clients: usize) -> SocketAddr {
    // The test's runtime, ending with the test, ends the broker's tasks.
    let owner = corral::Life::new();
    let (_, addr) = broker::start(
        "127.0.0.1:0".parse().expect("addr"),
        settings(password, max_clients),
        &owner,
    )
    .await
    .expect("broker");
    addr
}

/// The broker's tasks are its owner's: stopping the owner closes every client's
/// connection and the listener, and returns only once they have ended.
#[tokio::test]
async fn stopping_the_owner_ends_the_broker() {
    let owner = corral::Life::new();
    let (_, addr) = broker::start(
        "127.0.0.1:0".parse().expect("addr"),
        settings(None, 10),
        &owner,
    )
    .await
    .expect("broker");
    let mut client = tokio::net::TcpStream::connect(addr).await.expect("connect");
    client.write_all(&cmd(&[b"PING"])).await.expect("ping");
    let mut buf = [0u8; 64];
    let n = client.read(&mut buf).await.expect("pong");
    assert_eq!(&buf[..n], b"+PONG\r\n");
    assert_eq!(
        owner.stop(Duration::from_secs(5)).await,
        0,
        "every task ended"
    );
    let n = tokio::time::timeout(Duration::from_secs(2), client.read(&mut buf))
        .await
        .expect("the connection ends");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the listener is closed"
    );
}

/// A RESP command in multibulk form.
fn cmd(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Sends `bytes` and reads until `expect` bytes arrived or 300 ms pass quietly.
async fn talk(s: &mut TcpStream, bytes: &[u8], expect: usize) -> String {
    s.write_all(bytes).await.expect("write");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while got.len() < expect {
        match tokio::time::timeout(Duration::from_millis(300), s.read(&mut buf)).await {
            Ok(Ok(0)) | Err(_) | Ok(Err(_)) => break,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test]
async fn auth_refuses_the_password_padded_with_nuls() {
    let addr = start(Some("s3cret"), 100).await;
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let mut padded = b"s3cret".to_vec();
    padded.extend(std::iter::repeat_n(0u8, 256));
    let r = talk(&mut s, &cmd(&[b"AUTH", &padded]), 10).await;
    assert!(r.starts_with("-WRONGPASS"), "{r:?}");
    let r = talk(&mut s, &cmd(&[b"PING"]), 7).await;
    assert!(r.starts_with("-NOAUTH"), "{r:?}");
    let r = talk(&mut s, &cmd(&[b"AUTH", b"s3cret"]), 5).await;
    assert_eq!(r, "+OK\r\n");
}

#[tokio::test]
async fn clients_beyond_the_cap_are_told_and_closed() {
    let addr = start(None, 2).await;
    let mut a = TcpStream::connect(addr).await.expect("connect");
    let mut b = TcpStream::connect(addr).await.expect("connect");
    assert_eq!(talk(&mut a, &cmd(&[b"PING"]), 7).await, "+PONG\r\n");
    assert_eq!(talk(&mut b, &cmd(&[b"PING"]), 7).await, "+PONG\r\n");
    let mut c = TcpStream::connect(addr).await.expect("connect");
    let r = talk(&mut c, &cmd(&[b"PING"]), 100).await;
    assert_eq!(r, "-ERR max number of clients reached\r\n");
    // A slot freed is a slot given again.
    drop(a);
    // Given back once the broker has seen the close.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let mut d = TcpStream::connect(addr).await.expect("connect");
        let r = talk(&mut d, &cmd(&[b"PING"]), 7).await;
        if r == "+PONG\r\n" {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{r}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn client_reply_off_on_and_skip() {
    let addr = start(None, 100).await;
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let mut batch = cmd(&[b"CLIENT", b"REPLY", b"OFF"]);
    batch.extend(cmd(&[b"PING"]));
    batch.extend(cmd(&[b"CLIENT", b"REPLY", b"ON"]));
    batch.extend(cmd(&[b"CLIENT", b"REPLY", b"SKIP"]));
    batch.extend(cmd(&[b"ECHO", b"skipped"]));
    batch.extend(cmd(&[b"ECHO", b"seen"]));
    assert_eq!(talk(&mut s, &batch, 15).await, "+OK\r\n$4\r\nseen\r\n");
}

#[tokio::test]
async fn resp3_subscription_pushes_pass_client_reply_off() {
    let addr = start(None, 100).await;
    let mut sub = TcpStream::connect(addr).await.expect("connect");
    let hello = talk(&mut sub, &cmd(&[b"HELLO", b"3"]), 20).await;
    assert!(hello.starts_with('%'), "{hello:?}");
    let mut batch = cmd(&[b"CLIENT", b"REPLY", b"OFF"]);
    batch.extend(cmd(&[b"SUBSCRIBE", b"channel"]));
    let r = talk(&mut sub, &batch, 30).await;
    assert_eq!(r, ">3\r\n$9\r\nsubscribe\r\n$7\r\nchannel\r\n:1\r\n");
    let mut publisher = TcpStream::connect(addr).await.expect("connect");
    assert_eq!(
        talk(&mut publisher, &cmd(&[b"PUBLISH", b"channel", b"hello"]), 4).await,
        ":1\r\n"
    );
    let msg = talk(&mut sub, b"", 30).await;
    assert_eq!(
        msg,
        ">3\r\n$7\r\nmessage\r\n$7\r\nchannel\r\n$5\r\nhello\r\n"
    );
}

#[tokio::test]
async fn redis_compatible_answers() {
    let addr = start(Some("pw"), 100).await;
    let mut s = TcpStream::connect(addr).await.expect("connect");
    // Arity is checked before authentication, as Redis orders them.
    let r = talk(&mut s, &cmd(&[b"PUBLISH", b"only-one"]), 10).await;
    assert_eq!(
        r,
        "-ERR wrong number of arguments for 'publish' command\r\n"
    );
    let r = talk(&mut s, &cmd(&[b"PUBLISH", b"a", b"b"]), 10).await;
    assert!(r.starts_with("-NOAUTH"), "{r:?}");
    assert_eq!(talk(&mut s, &cmd(&[b"AUTH", b"pw"]), 5).await, "+OK\r\n");
    assert_eq!(talk(&mut s, &cmd(&[b"FLUSHALL"]), 5).await, "+OK\r\n");
    assert_eq!(
        talk(&mut s, &cmd(&[b"FLUSHDB", b"ASYNC"]), 5).await,
        "+OK\r\n"
    );
    let r = talk(&mut s, &cmd(&[b"PUBSUB", b"CHANNELS", b"a*", b"extra"]), 10).await;
    assert_eq!(
        r,
        "-ERR unknown subcommand or wrong number of arguments for 'CHANNELS'. Try PUBSUB HELP.\r\n"
    );
    let r = talk(
        &mut s,
        &cmd(&[b"PUBSUB", b"SHARDCHANNELS", b"a*", b"x"]),
        10,
    )
    .await;
    assert!(r.contains("'SHARDCHANNELS'. Try PUBSUB HELP."), "{r:?}");
    assert_eq!(
        talk(&mut s, &cmd(&[b"PUBSUB", b"CHANNELS", b"a*"]), 4).await,
        "*0\r\n"
    );
}

/// A command trickled in small packets is parsed as it comes (the parser's own test
/// counts the work); here, that it arrives whole over a socket and that a command
/// over the total-size bound is refused.
#[tokio::test]
async fn trickled_and_oversized_commands() {
    let addr = start(None, 100).await;
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let mut args: Vec<Vec<u8>> = vec![b"PUBSUB".to_vec(), b"NUMSUB".to_vec()];
    args.extend((0..2000).map(|i| format!("ch{i}").into_bytes()));
    let refs: Vec<&[u8]> = args.iter().map(|a| a.as_slice()).collect();
    let whole = cmd(&refs);
    for piece in whole.chunks(60) {
        s.write_all(piece).await.expect("write");
        s.flush().await.expect("flush");
    }
    let r = talk(&mut s, b"", 8).await;
    assert!(r.starts_with("*4000\r\n"), "{:?}", &r[..r.len().min(40)]);
    // 5 arguments of 1 MiB: each within max_bulk, together over max_command.
    let mut big = TcpStream::connect(addr).await.expect("connect");
    let chunk = vec![b'x'; 1 << 20];
    let mut bytes = b"*5\r\n".to_vec();
    for _ in 0..5 {
        bytes.extend_from_slice(format!("${}\r\n", chunk.len()).as_bytes());
        bytes.extend_from_slice(&chunk);
        bytes.extend_from_slice(b"\r\n");
    }
    let _ = big.write_all(&bytes).await;
    let r = talk(&mut big, b"", 20).await;
    assert!(
        r.starts_with("-ERR Protocol error: command larger than"),
        "{r:?}"
    );
}
