//! Small helpers: the process clock, run ids, file-descriptor limits, and the
//! loopback-only rule for every address load goes to.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

static START: OnceLock<Instant> = OnceLock::new();

/// Nanoseconds since this process first asked; send timestamps carried in
/// messages use it, and only this process reads them back.
pub fn now_ns() -> u64 {
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// A short random tag that keeps usernames of different runs apart.
pub fn run_id() -> String {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    (0..6).map(|_| char::from(b"abcdefghijklmnopqrstuvwxyz0123456789"[rng.gen_range(0..36)])).collect()
}

/// Raises this process's soft RLIMIT_NOFILE to its hard limit (children
/// inherit it) and returns the new soft limit.
#[allow(clippy::unnecessary_cast)] // rlim_t is not u64 everywhere
pub fn raise_nofile() -> u64 {
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let want = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                return want.rlim_max as u64;
            }
        }
        lim.rlim_cur as u64
    }
}

/// The current soft RLIMIT_NOFILE.
#[allow(clippy::unnecessary_cast)] // rlim_t is not u64 everywhere
pub fn nofile() -> u64 {
    // SAFETY: as above.
    unsafe {
        let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        lim.rlim_cur as u64
    }
}

/// Fails early when `sockets` connections will not fit in the fd limit.
pub fn check_fds(sockets: usize, what: &str) -> Result<()> {
    let limit = nofile();
    if sockets as u64 + 200 > limit {
        bail!(
            "{what} needs {sockets} sockets but this process may open at most {limit} files \
             (RLIMIT_NOFILE; the soft limit is already raised to the hard limit, and a spawned \
             server inherits the same limit). Lower the count or raise the hard limit (ulimit -Hn) as root."
        );
    }
    Ok(())
}

/// The socket address of a URL's host and port, which must be on the loopback
/// network: stacker-bench sends load only to 127.0.0.0/8.
pub fn loopback_addr(url: &str) -> Result<SocketAddr> {
    let rest = url
        .split_once("://")
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow!("{url}: expected a URL like http://127.0.0.1:8080"))?;
    let hostport = rest.split(['/', '?']).next().unwrap_or(rest);
    let addrs: Vec<SocketAddr> = hostport
        .to_socket_addrs()
        .with_context(|| format!("{url}: cannot resolve {hostport} (give host:port)"))?
        .collect();
    let addr = addrs
        .iter()
        .find(|a| a.is_ipv4())
        .copied()
        .ok_or_else(|| anyhow!("{url}: no IPv4 address for {hostport}; use 127.0.0.1"))?;
    if !is_loopback(addr.ip()) {
        bail!(
            "refusing to send load to {addr}: stacker-bench only targets loopback addresses (127.0.0.0/8) \
             on this machine"
        );
    }
    Ok(addr)
}

pub fn is_loopback(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V4(v4) if v4.is_loopback())
}

/// Loopback source addresses 127.0.0.2, 127.0.0.3, … (`n` of them).
pub fn source_addrs(n: u8) -> Vec<Ipv4Addr> {
    (0..n.max(1)).map(|i| Ipv4Addr::new(127, 0, 0, 2 + i.min(250))).collect()
}

/// A free TCP port on 127.0.0.1 (bound and released; another process could
/// take it in between, which a spawned server reports as a bind error).
pub fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("cannot find a free port")?;
    Ok(listener.local_addr()?.port())
}

/// `n / seconds`, 0 when no time passed.
pub fn per_sec(n: u64, d: Duration) -> f64 {
    if d.is_zero() {
        0.0
    } else {
        n as f64 / d.as_secs_f64()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_targets() {
        assert_eq!(loopback_addr("http://127.0.0.1:8080").unwrap().port(), 8080);
        assert_eq!(loopback_addr("ws://127.0.0.5:9000/?room=1").unwrap().ip().to_string(), "127.0.0.5");
        assert!(loopback_addr("http://localhost:8080").is_ok());
        assert!(loopback_addr("http://10.0.0.1:8080").is_err());
        assert!(loopback_addr("http://192.168.1.1:80/x").is_err());
        assert!(loopback_addr("127.0.0.1:80").is_err());
    }

    #[test]
    fn source_addresses_are_loopback() {
        let addrs = source_addrs(3);
        assert_eq!(addrs, vec![Ipv4Addr::new(127, 0, 0, 2), Ipv4Addr::new(127, 0, 0, 3), Ipv4Addr::new(127, 0, 0, 4)]);
        assert!(source_addrs(255).iter().all(|a| a.is_loopback()));
    }
}
