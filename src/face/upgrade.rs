//! Protocol upgrades through `idem proxy` (websockets): which ones pass, and the spliced
//! connections once both sides switched, each closed when idle too long or when the proxy
//! stops.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A spliced connection with no byte either way for this long is closed (websocket clients
/// ping well within it).
pub const SPLICE_IDLE_MAX: Duration = Duration::from_secs(300);

/// Protocols never let through, whatever is configured: `h2c` would hand the client an
/// HTTP/2 connection to the upstream on which later requests skip the proxy's checks.
pub const NEVER_UPGRADED: &[&str] = &["h2c", "h2"];

/// The protocol a request asks to switch to, if the proxy lets it: a GET whose `Upgrade`
/// header (named in `Connection`) is one protocol of `allowed` (case-insensitive). Anything
/// else is forwarded as a plain request, without its upgrade headers.
pub fn upgrade_asked(
    method: &Method,
    headers: &HeaderMap,
    allowed: &[String],
    connection_tokens: &[HeaderName],
) -> Option<HeaderValue> {
    if method != Method::GET || !connection_tokens.contains(&header::UPGRADE) {
        return None;
    }
    let value = headers.get(header::UPGRADE)?;
    let asked = value.to_str().ok()?.trim();
    let ok = !NEVER_UPGRADED.iter().any(|n| n.eq_ignore_ascii_case(asked))
        && allowed.iter().any(|a| a.eq_ignore_ascii_case(asked));
    ok.then(|| value.clone())
}

/// Whether the upstream switched to the protocol that was asked for.
pub fn switched_to(asked: &HeaderValue, answer: &HeaderMap) -> bool {
    answer
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .zip(asked.to_str().ok())
        .is_some_and(|(got, asked)| got.trim().eq_ignore_ascii_case(asked.trim()))
}

/// Copies bytes both ways between a client and the upstream once both switched protocols,
/// until either side closes, nothing moved for `idle`, or `stop` turns true.
pub async fn splice(
    client: hyper::upgrade::OnUpgrade,
    upstream: reqwest::Response,
    idle: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let (client, upstream) = match (client.await, upstream.upgrade().await) {
        (Ok(c), Ok(u)) => (c, u),
        (Err(e), _) => {
            tracing::debug!(error = %e, "the client did not switch protocols");
            return;
        }
        (_, Err(e)) => {
            tracing::warn!(error = %e, "the upstream did not switch protocols");
            return;
        }
    };
    let started = Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let mut client = Active {
        io: hyper_util::rt::TokioIo::new(client),
        started,
        last: last.clone(),
    };
    let mut upstream = Active {
        io: upstream,
        started,
        last: last.clone(),
    };
    let idle_out = async {
        loop {
            let seen = Duration::from_millis(last.load(Ordering::Relaxed));
            let quiet = started.elapsed().saturating_sub(seen);
            if quiet >= idle {
                return;
            }
            tokio::time::sleep(idle - quiet).await;
        }
    };
    tokio::select! {
        r = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "an upgraded connection ended");
            }
        }
        _ = idle_out => tracing::debug!(?idle, "an upgraded connection was idle too long: closed"),
        _ = stop.wait_for(|s| *s) => tracing::debug!("stopping: an upgraded connection closed"),
    }
}

/// An I/O stream that notes when bytes last moved through it (ms since `started`).
struct Active<T> {
    io: T,
    started: Instant,
    last: Arc<AtomicU64>,
}

impl<T> Active<T> {
    fn moved(&self) {
        let ms = self.started.elapsed().as_millis().min(u128::from(u64::MAX)) as u64;
        self.last.store(ms, Ordering::Relaxed);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Active<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.moved();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Active<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn asked(method: Method, upgrade: &str, allowed: &[&str]) -> Option<HeaderValue> {
        let mut h = HeaderMap::new();
        h.insert(header::UPGRADE, HeaderValue::from_str(upgrade).unwrap());
        let allowed: Vec<String> = allowed.iter().map(|s| s.to_string()).collect();
        upgrade_asked(&method, &h, &allowed, &[header::UPGRADE])
    }

    #[test]
    fn only_allowed_protocols_on_get_are_upgraded_and_never_h2c() {
        assert!(asked(Method::GET, "websocket", &["websocket"]).is_some());
        assert!(asked(Method::GET, "WebSocket", &["websocket"]).is_some());
        assert!(asked(Method::POST, "websocket", &["websocket"]).is_none());
        assert!(asked(Method::GET, "echo", &["websocket"]).is_none());
        assert!(asked(Method::GET, "h2c", &["websocket", "h2c"]).is_none());
        // Not named in Connection: no upgrade.
        let mut h = HeaderMap::new();
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(upgrade_asked(&Method::GET, &h, &["websocket".into()], &[]).is_none());
    }

    #[test]
    fn the_upstream_must_switch_to_what_was_asked() {
        let mut answer = HeaderMap::new();
        answer.insert(header::UPGRADE, HeaderValue::from_static("WebSocket"));
        assert!(switched_to(&HeaderValue::from_static("websocket"), &answer));
        assert!(!switched_to(&HeaderValue::from_static("echo"), &answer));
        assert!(!switched_to(
            &HeaderValue::from_static("websocket"),
            &HeaderMap::new()
        ));
    }
}
