//! Running a real `idem serve` process for the benches that measure the daemon.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The bench namespace's token.
pub const TOKEN: &str = "bench-token-0123456789";

/// A config for region `region` serving the bench namespace with data in `data`.
pub fn config(region: &str, data: &Path) -> String {
    format!(
        "region = \"{region}\"\ndata_dir = {:?}\n\n[[namespaces]]\nname = \"{}\"\ntokens = [\"{TOKEN}\"]\n",
        data,
        super::NS
    )
}

/// A running daemon; killed on drop.
pub struct Daemon {
    /// The process.
    pub child: Child,
    /// Its HTTP address.
    pub addr: SocketAddr,
    /// When it was spawned.
    pub spawned: Instant,
}

impl Daemon {
    /// Spawns `idem serve` with `config_text` written to `dir/idem.toml`; returns once it
    /// listens (not once it is ready).
    pub fn spawn(dir: &Path, config_text: &str) -> Daemon {
        let path = dir.join("idem.toml");
        std::fs::write(&path, config_text).expect("write config");
        let spawned = Instant::now();
        let mut child = Command::new(env!("CARGO_BIN_EXE_idem"))
            .args(["serve", "--listen", "127.0.0.1:0", "--config"])
            .arg(&path)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn idem serve");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("listening line");
        let addr = line
            .trim()
            .strip_prefix("idem: listening on http://")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse()
            .expect("address");
        Daemon {
            child,
            addr,
            spawned,
        }
    }

    /// Waits until `/readyz` answers 200; returns the time since spawn.
    pub fn wait_ready(&self) -> Duration {
        loop {
            if get_status(self.addr, "/readyz") == Some(200) {
                return self.spawned.elapsed();
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The process's resident set size and its peak, bytes (VmRSS, VmHWM).
    pub fn rss(&self) -> (u64, u64) {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        let field = |name: &str| {
            s.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .map_or(0, |kb| kb * 1024)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    /// SIGTERM and wait (flushes the log and writes hint files).
    pub fn stop(mut self) {
        // SAFETY: sending a signal to our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A blocking `GET path`: the status, or `None` if nothing answered.
pub fn get_status(addr: SocketAddr, path: &str) -> Option<u16> {
    get(addr, path).map(|(status, _)| status)
}

/// A blocking `GET path`: status and body, or `None` if nothing answered.
pub fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: idem\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut all = String::new();
    s.read_to_string(&mut all).ok()?;
    let status = all.get(9..12)?.parse().ok()?;
    let body = all.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((status, body))
}
