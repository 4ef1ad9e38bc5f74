//! The applications behind a forwarder in tests, on loopback ports of their own: echo servers
//! for bytes, for lines and for HTTP requests, and the line exchange a test client speaks.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use crate::PATIENCE;

/// An echo server that returns every byte it reads until the client closes. Returns its port.
pub async fn byte_echo_server() -> anyhow::Result<u16> {
    let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buffer = [0u8; 1024];
                while let Ok(read) = socket.read(&mut buffer).await {
                    if read == 0 || socket.write_all(&buffer[..read]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    Ok(port)
}

/// A line echo server: answers each line with the same line until the client closes or sends
/// `quit`. Returns its port.
pub async fn line_echo_server() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut lines = BufReader::new(read).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if line == "quit"
                        || write
                            .write_all(format!("{line}\n").as_bytes())
                            .await
                            .is_err()
                    {
                        break;
                    }
                }
            });
        }
    });
    Ok(port)
}

/// Serves `app` on a loopback port of its own for as long as the test runs; returns the port.
pub async fn serve_http(app: axum::Router) -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(port)
}

/// An HTTP application that answers with what it received: method, path and the
/// `x-forwarded-client-cert` headers (how many, and their values).
pub async fn http_echo_server() -> anyhow::Result<u16> {
    use axum::http::{HeaderMap, Method, Uri};
    async fn echo(method: Method, uri: Uri, headers: HeaderMap) -> String {
        let xfcc: Vec<&str> = headers
            .get_all("x-forwarded-client-cert")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        format!(
            "{method} {} xfcc#{} xfcc={}\n",
            uri.path(),
            xfcc.len(),
            xfcc.join("|")
        )
    }
    serve_http(axum::Router::new().fallback(echo)).await
}

/// An HTTP application that records the request target of every request it receives and
/// answers with it; returns its port and the targets seen so far.
pub async fn recording_http_server() -> anyhow::Result<(u16, Arc<Mutex<Vec<String>>>)> {
    use axum::http::{Method, Uri};
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let record = seen.clone();
    let app = axum::Router::new().fallback(move |method: Method, uri: Uri| {
        let record = record.clone();
        async move {
            let target = uri
                .path_and_query()
                .map_or("", |pq| pq.as_str())
                .to_string();
            if let Ok(mut seen) = record.lock() {
                seen.push(target.clone());
            }
            format!("{method} {target}")
        }
    });
    Ok((serve_http(app).await?, seen))
}

/// One line over a new plain TCP connection to `port`: `Some(answer)`, or `None` when the
/// connection was closed without an answer.
pub async fn plaintext_line(port: u16, line: &str) -> anyhow::Result<Option<String>> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
    exchange(&mut stream, line).await
}

/// One line there and one back on an open connection: `Some(answer)` (what came before the
/// newline, or before the close), or `None` when it was closed without an answer.
pub async fn exchange(stream: &mut TcpStream, line: &str) -> anyhow::Result<Option<String>> {
    // A refused connection may be reset while we write; the read below tells the outcome.
    let _ = stream.write_all(format!("{line}\n").as_bytes()).await;
    let mut answer = Vec::new();
    loop {
        let mut byte = [0u8; 1];
        match tokio::time::timeout(PATIENCE, stream.read(&mut byte)).await? {
            Ok(0) | Err(_) => break,
            Ok(_) if byte[0] == b'\n' => return Ok(Some(String::from_utf8(answer)?)),
            Ok(_) => answer.push(byte[0]),
        }
    }
    Ok(if answer.is_empty() {
        None
    } else {
        Some(String::from_utf8(answer)?)
    })
}

/// Reads from `stream` until what it received contains `needle`, waiting at most `patience` for
/// each read; fails when the peer closes first. Returns everything received.
pub async fn read_until(
    stream: &mut TcpStream,
    needle: &str,
    patience: Duration,
) -> anyhow::Result<String> {
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    while !String::from_utf8_lossy(&received).contains(needle) {
        let n = tokio::time::timeout(patience, stream.read(&mut buffer)).await??;
        anyhow::ensure!(
            n > 0,
            "the connection closed before {needle:?}: {}",
            String::from_utf8_lossy(&received)
        );
        received.extend_from_slice(&buffer[..n]);
    }
    Ok(String::from_utf8_lossy(&received).into_owned())
}
