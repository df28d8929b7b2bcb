//! What /proc tells of processes and their sockets: a process's state, parent and
//! group, the sockets a port has, and which process group holds a socket. The
//! supervisor asks it whether a worker's own group listens on its port; the queue
//! watch asks which worker holds a connection to the embedded broker.
//!
//! It reads /proc and nothing else; where /proc cannot tell, it says so.

use std::collections::HashMap;

/// Whether a process of process group `pgid` holds a socket listening on `port`
/// (from /proc). Where /proc cannot tell, it says yes.
pub fn port_held_by_group(port: u16, pgid: u32) -> bool {
    let inodes = listening_inodes(port);
    if inodes.is_empty() {
        return true;
    }
    let wanted: Vec<String> = inodes.iter().map(|i| format!("socket:[{i}]")).collect();
    all_pids()
        .filter(|pid| proc_stat(*pid).is_some_and(|p| p.pgrp == pgid))
        .any(|pid| {
            std::fs::read_dir(format!("/proc/{pid}/fd"))
                .into_iter()
                .flatten()
                .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .any(|link| wanted.iter().any(|w| link.as_os_str() == w.as_str()))
        })
}

/// Inodes of the TCP sockets listening on `port` (IPv4 and IPv6).
fn listening_inodes(port: u16) -> Vec<u64> {
    let port_hex = format!("{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .flat_map(|text| {
            text.lines()
                .skip(1)
                .filter_map(|line| {
                    let f: Vec<&str> = line.split_whitespace().collect();
                    let local_port = f.get(1)?.rsplit(':').next()?;
                    (local_port == port_hex && f.get(3) == Some(&"0A"))
                        .then(|| f.get(9)?.parse().ok())
                        .flatten()
                })
                .collect::<Vec<u64>>()
        })
        .collect()
}

/// What /proc says of a process: its state letter, parent and group.
pub struct ProcStat {
    pub state: char,
    pub ppid: u32,
    pub pgrp: u32,
}

pub fn proc_stat(pid: u32) -> Option<ProcStat> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) S ppid pgrp ...": comm may hold spaces and parentheses.
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace();
    Some(ProcStat {
        state: fields.next()?.chars().next()?,
        ppid: fields.next()?.parse().ok()?,
        pgrp: fields.next()?.parse().ok()?,
    })
}

/// The pids /proc lists.
pub fn all_pids() -> impl Iterator<Item = u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
}

/// Inodes of the established TCP connections from local `port` to remote
/// `remote_port` (IPv4 and IPv6), i.e. the client side of a connection to a server
/// on this machine whose peer address corral sees as `:port`.
fn established_inodes(pairs: &[(u16, u16)]) -> HashMap<(u16, u16), u64> {
    let mut found = HashMap::new();
    for text in ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
    {
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let port_of =
                |field: Option<&&str>| u16::from_str_radix(field?.rsplit(':').next()?, 16).ok();
            let (Some(local), Some(remote)) = (port_of(f.get(1)), port_of(f.get(2))) else {
                continue;
            };
            if f.get(3) == Some(&"01") && pairs.contains(&(local, remote)) {
                if let Some(inode) = f.get(9).and_then(|i| i.parse().ok()) {
                    found.insert((local, remote), inode);
                }
            }
        }
    }
    found
}

/// For each `(local port, remote port)` connection of this machine, the process
/// group of a process holding its socket, looked for among the groups in `groups`
/// only (each process's descriptors are read once).
pub fn socket_groups(pairs: &[(u16, u16)], groups: &[u32]) -> HashMap<(u16, u16), u32> {
    let inodes = established_inodes(pairs);
    let by_inode: HashMap<String, (u16, u16)> = inodes
        .iter()
        .map(|(pair, inode)| (format!("socket:[{inode}]"), *pair))
        .collect();
    let mut owners = HashMap::new();
    if by_inode.is_empty() {
        return owners;
    }
    for pid in all_pids() {
        let Some(pgrp) = proc_stat(pid)
            .map(|p| p.pgrp)
            .filter(|g| groups.contains(g))
        else {
            continue;
        };
        let links = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .into_iter()
            .flatten()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok());
        for link in links {
            if let Some(pair) = link.to_str().and_then(|l| by_inode.get(l)) {
                owners.insert(*pair, pgrp);
            }
        }
    }
    owners
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_is_traced_to_the_group_holding_it() {
        let server = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let client = std::net::TcpStream::connect(server.local_addr().expect("addr")).expect("c");
        let local = client.local_addr().expect("local").port();
        let remote = server.local_addr().expect("addr").port();
        let me = proc_stat(std::process::id()).expect("stat").pgrp;
        let owners = socket_groups(&[(local, remote)], &[me]);
        assert_eq!(owners.get(&(local, remote)), Some(&me));
        assert!(socket_groups(&[(local, remote)], &[me + 1_000_000]).is_empty());
    }
}
