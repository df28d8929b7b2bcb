//! systemd's readiness protocol (`Type=notify`, sd_notify(3)): a datagram to the
//! Unix socket named in `NOTIFY_SOCKET` saying `READY=1` once a worker is ready,
//! `RELOADING=1` and `READY=1` around a rolling restart, `STOPPING=1` at shutdown.
//! Without `NOTIFY_SOCKET` (not under systemd) it does nothing. It only tells; it
//! decides nothing.

use std::os::unix::net::UnixDatagram;

/// Sends `state` (newline-separated `KEY=value` lines) to systemd, if it listens.
/// A failure is logged and otherwise ignored: the service still runs.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    if let Err(e) = send(&path, state) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

fn send(path: &std::ffi::OsStr, state: &str) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let socket = UnixDatagram::unbound()?;
    let bytes = path.as_bytes();
    // "@name" is a socket in the abstract namespace.
    if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        socket.send_to_addr(state.as_bytes(), &addr)?;
    } else {
        socket.send_to(state.as_bytes(), path)?;
    }
    Ok(())
}

/// `RELOADING=1` with the monotonic time systemd's `Type=notify-reload` asks for.
pub fn reloading(status: &str) {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the struct it is given.
    unsafe {
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts);
    }
    let usec = ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000;
    notify(&format!(
        "RELOADING=1\nMONOTONIC_USEC={usec}\nSTATUS={status}"
    ));
}
