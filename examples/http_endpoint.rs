//! An HTTP endpoint behind an `Idempotency-Key` header, with the semantics
//! of the IETF draft "The Idempotency-Key HTTP Header Field":
//!
//! - no key: `400 Bad Request`;
//! - first request: processed once, its response (status and body) saved;
//! - a retry with the same key and payload: the saved response, replayed;
//! - a retry while the first is still being processed: `409 Conflict`;
//! - the same key with a different payload: `422 Unprocessable Content`
//!   (idemkv's fingerprint check).
//!
//! The server is a deliberately tiny HTTP/1.1 loop so the example needs no
//! web framework. `cargo run --example http_endpoint` starts it on a free
//! port against `idemkv up` and plays a client that retries.
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use idemkv::pb::api::{self, claim_response::Outcome};
use idemkv::Client;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// FNV-1a: a stable fingerprint of the request body.
fn fingerprint(body: &[u8]) -> Vec<u8> {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in body {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h.to_be_bytes().to_vec()
}

pub struct Shop {
    client: Client,
    /// Orders actually created (the side effect we must not repeat).
    pub orders: AtomicU32,
}

impl Shop {
    pub fn new(client: Client) -> Arc<Shop> {
        Arc::new(Shop {
            client,
            orders: AtomicU32::new(0),
        })
    }

    /// Handle `POST /orders`; returns (status, body).
    pub async fn create_order(&self, key: Option<&str>, body: &[u8]) -> (u16, String) {
        let Some(key) = key.filter(|k| !k.is_empty()) else {
            return (400, "an Idempotency-Key header is required".into());
        };
        let claim = api::ClaimRequest {
            namespace: "http".into(),
            key: key.as_bytes().to_vec(),
            owner: "shop".into(),
            lease_ms: 10_000,
            fingerprint: Some(fingerprint(body)),
            ..Default::default()
        };
        let token = match self.client.claim(claim).await {
            Ok(Outcome::Acquired(a)) => a.token,
            Ok(Outcome::InProgress(_)) => {
                return (409, "a request with this key is being processed".into())
            }
            Ok(Outcome::Completed(c)) => {
                return (
                    c.code.unwrap_or(200) as u16,
                    String::from_utf8_lossy(&c.result).into_owned(),
                )
            }
            Ok(Outcome::Failed(f)) => return (500, f.last_error),
            Err(e) if e.reason() == Some("FINGERPRINT_MISMATCH") => {
                return (
                    422,
                    "this Idempotency-Key was used with a different payload".into(),
                )
            }
            Err(e) => return (503, e.to_string()),
        };
        // The side effect, done once per key.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let n = self.orders.fetch_add(1, Ordering::SeqCst) + 1;
        let response = format!(
            "{{\"order\":{n},\"request\":{}}}",
            String::from_utf8_lossy(body)
        );
        let done = api::CompleteRequest {
            namespace: "http".into(),
            key: key.as_bytes().to_vec(),
            token,
            result: response.clone().into_bytes(),
            code: Some(201),
            ..Default::default()
        };
        match self.client.complete(done).await {
            Ok(_) => (201, response),
            Err(e) => (503, e.to_string()),
        }
    }
}

async fn serve_conn(shop: Arc<Shop>, stream: TcpStream) -> std::io::Result<()> {
    let mut r = BufReader::new(stream);
    let mut line = String::new();
    r.read_line(&mut line).await?;
    let (mut key, mut len) = (None, 0usize);
    loop {
        let mut h = String::new();
        r.read_line(&mut h).await?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((name, value)) = h.split_once(':') {
            match name.trim().to_ascii_lowercase().as_str() {
                "idempotency-key" => key = Some(value.trim().trim_matches('"').to_string()),
                "content-length" => len = value.trim().parse().unwrap_or(0),
                _ => {}
            }
        }
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body).await?;
    let (status, text) = if line.starts_with("POST /orders ") {
        shop.create_order(key.as_deref(), &body).await
    } else {
        (404, "not found".into())
    };
    let reply = format!(
        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{text}",
        text.len()
    );
    r.into_inner().write_all(reply.as_bytes()).await
}

/// Serve HTTP on `listener` until the task is dropped.
pub async fn serve(shop: Arc<Shop>, listener: TcpListener) {
    while let Ok((stream, _)) = listener.accept().await {
        let shop = shop.clone();
        tokio::spawn(async move {
            let _ = serve_conn(shop, stream).await;
        });
    }
}

/// A minimal HTTP client: POST /orders, returns (status, body).
pub async fn post(
    addr: std::net::SocketAddr,
    key: Option<&str>,
    body: &str,
) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr).await?;
    let key = key
        .map(|k| format!("idempotency-key: \"{k}\"\r\n"))
        .unwrap_or_default();
    let req = format!(
        "POST /orders HTTP/1.1\r\nhost: shop\r\n{key}content-length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

#[allow(dead_code)]
#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let shop = Shop::new(Client::from_env()?);
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(serve(shop.clone(), listener));
    println!("shop listening on http://{addr}");
    let key = format!("order-{}", std::process::id());
    let first =
        tokio::spawn(async move { post(addr, Some(&key), "{\"sku\":\"tea\",\"qty\":2}").await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let key = format!("order-{}", std::process::id());
    println!(
        "retry while processing  -> {:?}",
        post(addr, Some(&key), "{\"sku\":\"tea\",\"qty\":2}").await?
    );
    println!("first request           -> {:?}", first.await??);
    println!(
        "retry after the timeout -> {:?}",
        post(addr, Some(&key), "{\"sku\":\"tea\",\"qty\":2}").await?
    );
    println!(
        "same key, other payload -> {:?}",
        post(addr, Some(&key), "{\"sku\":\"tea\",\"qty\":9}").await?
    );
    println!(
        "no key                  -> {:?}",
        post(addr, None, "{}").await?
    );
    println!("orders created: {}", shop.orders.load(Ordering::SeqCst));
    Ok(())
}
