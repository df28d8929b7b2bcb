//! What /proc tells of processes and their sockets (through the `procfs` crate): a
//! process's state, parent and group, the sockets a port has, and which process
//! group holds a socket. The supervisor asks it whether a worker's own group listens
//! on its port and which of its children are zombies; the queue watch asks which
//! worker holds a connection to the embedded broker.
//!
//! It reads /proc and nothing else; where /proc cannot tell, it says so. Reading
//! every process's descriptors blocks: the async callers use the `*_off_runtime`
//! forms, which run on tokio's blocking pool and never on a serving thread.

use procfs::net::{TcpNetEntry, TcpState};
use procfs::process::{FDTarget, Process};
use std::collections::{HashMap, HashSet};

/// Whether a process of process group `pgid` holds a socket listening on `port`
/// (from /proc). Where /proc cannot tell, it says yes.
pub fn port_held_by_group(port: u16, pgid: u32) -> bool {
    let inodes: HashSet<u64> = tcp_entries()
        .filter(|e| e.state == TcpState::Listen && e.local_address.port() == port)
        .map(|e| e.inode)
        .collect();
    if inodes.is_empty() {
        return true;
    }
    processes()
        .filter(|p| proc_stat(p).is_some_and(|s| s.pgrp == pgid))
        .any(|p| socket_inodes(&p).any(|i| inodes.contains(&i)))
}

/// As [`port_held_by_group`], on the blocking pool.
pub async fn port_held_by_group_off_runtime(port: u16, pgid: u32) -> bool {
    tokio::task::spawn_blocking(move || port_held_by_group(port, pgid))
        .await
        .unwrap_or(true)
}

/// What /proc says of a process: its state letter, parent and group.
pub struct ProcStat {
    pub state: char,
    pub ppid: u32,
    pub pgrp: u32,
}

fn proc_stat(p: &Process) -> Option<ProcStat> {
    let stat = p.stat().ok()?;
    Some(ProcStat {
        state: stat.state,
        ppid: u32::try_from(stat.ppid).ok()?,
        pgrp: u32::try_from(stat.pgrp).ok()?,
    })
}

/// Every process /proc lists (those that end while it is read are left out).
fn processes() -> impl Iterator<Item = Process> {
    procfs::process::all_processes()
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
}

/// The TCP sockets of this machine's network namespace, IPv4 and IPv6.
fn tcp_entries() -> impl Iterator<Item = TcpNetEntry> {
    let v4 = procfs::net::tcp().into_iter().flatten();
    v4.chain(procfs::net::tcp6().into_iter().flatten())
}

/// The inodes of the sockets process `p` holds.
fn socket_inodes(p: &Process) -> impl Iterator<Item = u64> {
    p.fd()
        .into_iter()
        .flatten()
        .filter_map(|fd| match fd.ok()?.target {
            FDTarget::Socket(inode) => Some(inode),
            _ => None,
        })
}

/// Children of this process that have exited and are not yet reaped.
pub fn zombie_children() -> Vec<i32> {
    let me = std::process::id();
    processes()
        .filter(|p| proc_stat(p).is_some_and(|s| s.state == 'Z' && s.ppid == me))
        .map(|p| p.pid)
        .collect()
}

/// As [`zombie_children`], on the blocking pool.
pub async fn zombie_children_off_runtime() -> Vec<i32> {
    tokio::task::spawn_blocking(zombie_children)
        .await
        .unwrap_or_default()
}

/// For each `(local port, remote port)` connection of this machine, the process
/// group of a process holding its socket, looked for among the groups in `groups`
/// only (each process's descriptors are read once).
pub fn socket_groups(pairs: &[(u16, u16)], groups: &[u32]) -> HashMap<(u16, u16), u32> {
    let by_inode: HashMap<u64, (u16, u16)> = tcp_entries()
        .filter(|e| e.state == TcpState::Established)
        .map(|e| ((e.local_address.port(), e.remote_address.port()), e.inode))
        .filter(|(pair, _)| pairs.contains(pair))
        .map(|(pair, inode)| (inode, pair))
        .collect();
    let mut owners = HashMap::new();
    if by_inode.is_empty() {
        return owners;
    }
    for p in processes() {
        let Some(pgrp) = proc_stat(&p).map(|s| s.pgrp).filter(|g| groups.contains(g)) else {
            continue;
        };
        for inode in socket_inodes(&p) {
            if let Some(pair) = by_inode.get(&inode) {
                owners.insert(*pair, pgrp);
            }
        }
    }
    owners
}

/// As [`socket_groups`], on the blocking pool.
pub async fn socket_groups_off_runtime(
    pairs: Vec<(u16, u16)>,
    groups: Vec<u32>,
) -> HashMap<(u16, u16), u32> {
    tokio::task::spawn_blocking(move || socket_groups(&pairs, &groups))
        .await
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn my_group() -> u32 {
        proc_stat(&Process::myself().expect("myself"))
            .expect("stat")
            .pgrp
    }

    #[test]
    fn a_connection_is_traced_to_the_group_holding_it() {
        let server = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let client = std::net::TcpStream::connect(server.local_addr().expect("addr")).expect("c");
        let local = client.local_addr().expect("local").port();
        let remote = server.local_addr().expect("addr").port();
        let me = my_group();
        let owners = socket_groups(&[(local, remote)], &[me]);
        assert_eq!(owners.get(&(local, remote)), Some(&me));
        assert!(socket_groups(&[(local, remote)], &[me + 1_000_000]).is_empty());
    }

    #[test]
    fn a_listening_port_is_traced_to_its_group() {
        let server = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = server.local_addr().expect("addr").port();
        assert!(port_held_by_group(port, my_group()));
        assert!(!port_held_by_group(port, my_group() + 1_000_000));
    }
}
