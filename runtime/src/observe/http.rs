//! The HTTP endpoint: one thread with a current-thread tokio runtime and
//! hyper's HTTP/1 server. Routes:
//!
//! | | |
//! |---|---|
//! | `GET /` | the live page (one file, no external assets) |
//! | `GET /metrics` | Prometheus text format |
//! | `GET /api/status` | JSON of what the page shows |
//! | `GET /health` | 200 while the pipeline makes progress or is idle, 503 when stuck |
//! | `GET /api/state?stream=S&key=K` | one key's open windows and their current values |
//! | `POST /api/savepoint` | what `rivulet savepoint` does |
//!
//! It binds where it is told and nowhere else. With credentials set
//! (`http.auth`), clients that are not on loopback must send them, and so
//! must every `POST`; without them, `POST` is taken from loopback only.

use super::Observed;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The live page.
const PAGE: &str = include_str!("page.html");
/// Request bodies larger than this are refused (413).
const MAX_BODY: usize = 4096;
/// Connections served at once; more are closed at once.
const MAX_CONNECTIONS: usize = 64;
/// How long `/api/state` waits for the keyed workers.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the endpoint's credentials come from.
#[derive(Clone, Debug, PartialEq)]
pub enum AuthSource {
    TokenEnv(String),
    TokenFile(String),
    BasicEnv(String, String),
    BasicFile(String, String),
}

/// Credentials a request must carry: the whole `Authorization` value.
#[derive(Clone, PartialEq)]
pub struct Auth(String);

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Auth(..)")
    }
}

impl AuthSource {
    /// Reads the secret; a missing or empty one is an error (the endpoint
    /// must not start open by mistake).
    pub fn resolve(&self) -> Result<Auth, String> {
        let env = |name: &str| {
            std::env::var(name)
                .map_err(|_| format!("http.auth: the environment variable {name} is not set"))
        };
        let file = |path: &str| {
            std::fs::read_to_string(path)
                .map(|s| s.trim_end_matches(['\n', '\r']).to_string())
                .map_err(|e| format!("http.auth: cannot read {path}: {e}"))
        };
        let (secret, user) = match self {
            AuthSource::TokenEnv(n) => (env(n)?, None),
            AuthSource::TokenFile(p) => (file(p)?, None),
            AuthSource::BasicEnv(u, n) => (env(n)?, Some(u)),
            AuthSource::BasicFile(u, p) => (file(p)?, Some(u)),
        };
        if secret.is_empty() {
            return Err("http.auth: the secret is empty".into());
        }
        Ok(Auth(match user {
            None => format!("Bearer {secret}"),
            Some(u) => {
                use base64::Engine as _;
                format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(format!("{u}:{secret}"))
                )
            }
        }))
    }
}

/// Checks `host:port` without resolving it.
pub fn check_listen(s: &str) -> Result<(), String> {
    let Some((host, port)) = s.rsplit_once(':') else {
        return Err(format!(
            "`{s}` is not host:port (for example 127.0.0.1:9464)"
        ));
    };
    if host.is_empty() {
        return Err(format!(
            "`{s}` has no host: write 127.0.0.1:{port} for this machine only, 0.0.0.0:{port} for every interface"
        ));
    }
    port.parse::<u16>()
        .map(|_| ())
        .map_err(|_| format!("`{port}` in `{s}` is not a port number"))
}

/// A running endpoint.
pub struct Endpoint {
    /// Where it listens (the port chosen when 0 was asked).
    pub addr: SocketAddr,
}

/// Binds `listen` now (an error is the caller's to report: exit 2), then
/// serves on its own thread until the process ends.
pub fn start(
    listen: &str,
    auth: Option<Auth>,
    observed: Arc<Observed>,
) -> Result<Endpoint, String> {
    check_listen(listen)?;
    let addrs: Vec<SocketAddr> = listen
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {listen}: {e}"))?
        .collect();
    let listener = std::net::TcpListener::bind(&addrs[..]).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            format!("cannot listen on {listen}: the address is in use (another rivulet, or another program?)")
        } else {
            format!("cannot listen on {listen}: {e}")
        }
    })?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    if auth.is_none() && !addr.ip().is_loopback() {
        tracing::warn!(%addr, "the HTTP endpoint listens beyond loopback without credentials (set http.auth); POST is refused from other hosts");
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(|e| format!("cannot start the HTTP endpoint: {e}"))?;
    std::thread::Builder::new()
        .name("rivulet-http".into())
        .spawn(move || {
            runtime.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!(error = %e, "the HTTP endpoint cannot listen");
                        return;
                    }
                };
                let sampler = observed.clone();
                tokio::spawn(async move {
                    loop {
                        sampler.sample();
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                });
                serve(listener, Arc::new(auth), observed).await;
            })
        })
        .map_err(|e| format!("cannot start the HTTP endpoint: {e}"))?;
    Ok(Endpoint { addr })
}

async fn serve(
    listener: tokio::net::TcpListener,
    auth: Arc<Option<Auth>>,
    observed: Arc<Observed>,
) {
    let open = Arc::new(AtomicUsize::new(0));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors, say: wait, then go on.
                tracing::warn!(error = %e, "the HTTP endpoint cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        if open.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
            drop(stream);
            continue;
        }
        open.fetch_add(1, Ordering::Relaxed);
        let (observed, auth, open) = (observed.clone(), auth.clone(), open.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let (observed, auth) = (observed.clone(), auth.clone());
                async move {
                    Ok::<_, std::convert::Infallible>(handle(req, peer, &auth, observed).await)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .max_buf_size(64 * 1024)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
            open.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

type Reply = Response<Full<Bytes>>;

fn reply(status: StatusCode, kind: &str, body: impl Into<Bytes>) -> Reply {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    let h = r.headers_mut();
    if let Ok(v) = kind.parse() {
        h.insert(hyper::header::CONTENT_TYPE, v);
    }
    h.insert(
        hyper::header::CACHE_CONTROL,
        hyper::header::HeaderValue::from_static("no-store"),
    );
    r
}

fn json(status: StatusCode, v: &serde_json::Value) -> Reply {
    reply(status, "application/json", v.to_string())
}

fn error(status: StatusCode, message: &str) -> Reply {
    json(status, &serde_json::json!({ "error": message }))
}

/// Whether the request may go on: `Some` is the refusal.
fn refused(req: &Request<Incoming>, peer: SocketAddr, auth: &Option<Auth>) -> Option<Reply> {
    let post = req.method() == Method::POST;
    let local = peer.ip().is_loopback();
    let given = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match auth {
        Some(Auth(want)) if (post || !local) => {
            if given.is_some_and(|g| constant_time_eq(g.as_bytes(), want.as_bytes())) {
                None
            } else {
                let mut r = error(StatusCode::UNAUTHORIZED, "credentials needed (http.auth)");
                let scheme = if want.starts_with("Basic") {
                    "Basic realm=\"rivulet\""
                } else {
                    "Bearer"
                };
                if let Ok(v) = scheme.parse() {
                    r.headers_mut().insert(hyper::header::WWW_AUTHENTICATE, v);
                }
                Some(r)
            }
        }
        None if post && !local => Some(error(
            StatusCode::FORBIDDEN,
            "POST is taken from loopback only unless http.auth is set",
        )),
        _ => None,
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn handle(
    req: Request<Incoming>,
    peer: SocketAddr,
    auth: &Option<Auth>,
    o: Arc<Observed>,
) -> Reply {
    if let Some(r) = refused(&req, peer, auth) {
        return r;
    }
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let method = req.method().clone();
    // Every body is read (and bounded) before anything else.
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("request bodies are at most {MAX_BODY} bytes"),
            )
        }
    };
    let get = method == Method::GET || method == Method::HEAD;
    match path.as_str() {
        "/" | "/index.html" if get => reply(StatusCode::OK, "text/html; charset=utf-8", PAGE),
        "/metrics" if get => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            o.render_metrics(),
        ),
        "/api/status" if get => json(StatusCode::OK, &o.status()),
        "/health" if get => {
            let h = o.health();
            let code = if h.healthy {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            json(code, &serde_json::json!(h))
        }
        "/api/state" if get => state(&o, &query).await,
        "/api/savepoint" if method == Method::POST => savepoint(&o, &body).await,
        "/" | "/index.html" | "/metrics" | "/api/status" | "/health" | "/api/state" => {
            let mut r = error(StatusCode::METHOD_NOT_ALLOWED, "use GET");
            r.headers_mut().insert(
                hyper::header::ALLOW,
                hyper::header::HeaderValue::from_static("GET, HEAD"),
            );
            r
        }
        "/api/savepoint" => {
            let mut r = error(StatusCode::METHOD_NOT_ALLOWED, "use POST");
            r.headers_mut().insert(
                hyper::header::ALLOW,
                hyper::header::HeaderValue::from_static("POST"),
            );
            r
        }
        _ => error(
            StatusCode::NOT_FOUND,
            "no such path; try /, /metrics, /api/status, /health, /api/state, /api/savepoint",
        ),
    }
}

/// `POST /api/savepoint`: a savepoint at the default place.
async fn savepoint(o: &Observed, body: &[u8]) -> Reply {
    if !body.iter().all(|b| b.is_ascii_whitespace())
        && serde_json::from_slice::<serde_json::Value>(body).is_err()
    {
        return error(
            StatusCode::BAD_REQUEST,
            "the body, when given, must be JSON",
        );
    }
    let Some(dir) = o.state_dir.clone() else {
        return error(
            StatusCode::CONFLICT,
            "this pipeline keeps no state (no `state:` section): nothing to save",
        );
    };
    let ms = super::now_ms();
    let out = dir.join("savepoints").join(format!("savepoint-{ms}.redb"));
    let done =
        tokio::task::spawn_blocking(move || crate::state::control::request_savepoint(&dir, &out))
            .await;
    match done {
        Ok(Ok(path)) => json(
            StatusCode::OK,
            &serde_json::json!({ "savepoint": path.display().to_string() }),
        ),
        Ok(Err(e)) => error(StatusCode::SERVICE_UNAVAILABLE, &e),
        Err(_) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the savepoint request failed",
        ),
    }
}

/// Decodes `%XX` and `+` of a query-string value.
fn unescape(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

fn params(query: &str) -> Option<Vec<(String, String)>> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            Some((unescape(k)?, unescape(v)?))
        })
        .collect()
}

/// The values a key field may have been given as: a number or boolean when
/// the text reads as one, and the text itself.
fn candidates(text: &str) -> Vec<crate::value::Value> {
    use crate::value::Value;
    // A number reads as a text payload's value does.
    let mut out = vec![crate::exec::text_value(text.as_bytes())];
    if text == "true" || text == "false" {
        out.push(Value::Bool(text == "true"));
    }
    let s = Value::Str(text.into());
    if !out.contains(&s) {
        out.push(s);
    }
    out
}

/// `GET /api/state`: `key=K` for a one-field key (`key=["a","b"]` or one
/// parameter per key field for more).
async fn state(o: &Arc<Observed>, query: &str) -> Reply {
    let Some(params) = params(query) else {
        return error(
            StatusCode::BAD_REQUEST,
            "the query string is not valid UTF-8 percent-encoding",
        );
    };
    let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    if let Some(s) = get("stream") {
        if s != "main" && s != o.pipeline {
            return error(
                StatusCode::NOT_FOUND,
                &format!(
                    "no stream `{s}`: this pipeline has one, `main` (or `{}`)",
                    o.pipeline
                ),
            );
        }
    }
    let Some(shape) = o.queries.shape() else {
        return error(
            StatusCode::NOT_FOUND,
            "this pipeline keeps no keyed state (no window), or is not running",
        );
    };
    let names = &shape.key_names;
    // The text of each key field.
    let parts: Vec<String> = if names.iter().all(|n| get(n).is_some()) && !names.is_empty() {
        names
            .iter()
            .filter_map(|n| get(n))
            .map(str::to_string)
            .collect()
    } else if let Some(k) = get("key") {
        match serde_json::from_str::<serde_json::Value>(k) {
            Ok(serde_json::Value::Array(a)) => a
                .iter()
                .map(|v| match v {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .collect(),
            _ => vec![k.to_string()],
        }
    } else {
        return error(
            StatusCode::BAD_REQUEST,
            &format!(
                "say which key: key=VALUE, or one parameter per key field ({})",
                names.join(", ")
            ),
        );
    };
    if parts.len() != names.len() {
        return error(
            StatusCode::BAD_REQUEST,
            &format!(
                "the key has {} fields ({}); {} given (give key=[\"a\",\"b\"] or one parameter per field)",
                names.len(),
                names.join(", "),
                parts.len()
            ),
        );
    }
    // Every combination of the ways each part may have been typed.
    let mut keys: Vec<Vec<u8>> = vec![Vec::new()];
    for p in &parts {
        let c = candidates(p);
        keys = keys
            .iter()
            .flat_map(|k| {
                c.iter().map(move |v| {
                    let mut k = k.clone();
                    crate::value::encode_key(v, &mut k);
                    k
                })
            })
            .collect();
        if keys.len() > 64 {
            return error(
                StatusCode::BAD_REQUEST,
                "the key is too ambiguous; give it as JSON",
            );
        }
    }
    let board = o.queries.clone();
    let asked = tokio::task::spawn_blocking(move || board.ask(keys, QUERY_TIMEOUT)).await;
    let (rows, watermark) = match asked {
        Ok(Ok(x)) => x,
        Ok(Err(super::query::QueryError::NoState)) => {
            return error(
                StatusCode::NOT_FOUND,
                "this pipeline keeps no keyed state, or is not running",
            )
        }
        Ok(Err(super::query::QueryError::Timeout)) | Err(_) => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "the keyed workers did not answer in time (is the pipeline stuck?)",
            )
        }
    };
    let mut windows = Vec::new();
    let mut buf = Vec::new();
    for row in &rows {
        buf.clear();
        shape.schema.write_json(row, &mut buf);
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&buf) {
            windows.push(v);
        }
    }
    windows.sort_by_key(|w| (w["window_start"].as_i64(), w["window_end"].as_i64()));
    let key: serde_json::Map<String, serde_json::Value> = names
        .iter()
        .zip(&parts)
        .map(|(n, p)| (n.clone(), serde_json::Value::String(p.clone())))
        .collect();
    json(
        StatusCode::OK,
        &serde_json::json!({
            "stream": "main",
            "key": key,
            "watermark": (watermark != i64::MAX && watermark > i64::MIN / 2).then_some(watermark),
            "windows": windows,
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_are_host_and_port() {
        assert!(check_listen("127.0.0.1:9464").is_ok());
        assert!(check_listen("[::1]:0").is_ok());
        assert!(check_listen("localhost:80").is_ok());
        assert!(check_listen("9464").unwrap_err().contains("host:port"));
        assert!(check_listen(":9464").unwrap_err().contains("0.0.0.0:9464"));
        assert!(check_listen("h:http").unwrap_err().contains("port"));
    }

    #[test]
    fn query_values_are_unescaped_and_bad_escapes_refused() {
        assert_eq!(
            params("stream=main&key=%5B%22a%20b%22%5D&x"),
            Some(vec![
                ("stream".into(), "main".into()),
                ("key".into(), "[\"a b\"]".into()),
                ("x".into(), "".into())
            ])
        );
        assert_eq!(params("key=%zz"), None);
        assert_eq!(params("key=%e2%28"), None, "not UTF-8");
    }

    #[test]
    fn credentials_come_from_the_environment_or_a_file() {
        std::env::set_var("RIVULET_TEST_TOKEN", "s3cret");
        assert_eq!(
            AuthSource::TokenEnv("RIVULET_TEST_TOKEN".into()).resolve(),
            Ok(Auth("Bearer s3cret".into()))
        );
        assert_eq!(
            AuthSource::BasicEnv("admin".into(), "RIVULET_TEST_TOKEN".into()).resolve(),
            Ok(Auth("Basic YWRtaW46czNjcmV0".into()))
        );
        let e = AuthSource::TokenEnv("RIVULET_TEST_NOT_SET".into())
            .resolve()
            .unwrap_err();
        assert!(e.contains("RIVULET_TEST_NOT_SET"), "{e}");
        let e = AuthSource::TokenFile("/nonexistent/token".into())
            .resolve()
            .unwrap_err();
        assert!(e.contains("/nonexistent/token"), "{e}");
    }
}
