//! The HTTP endpoint: a small HTTP/1.1 server over `std::net`. One thread
//! accepts connections and samples the figures once a second; each
//! connection is served on its own short-lived thread (at most
//! `MAX_CONNECTIONS` at once), with keep-alive and timeouts. Requests are
//! parsed with `httparse`. Routes:
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
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The live page.
const PAGE: &str = include_str!("page.html");
/// Request bodies larger than this are refused (413).
const MAX_BODY: usize = 4096;
/// Connections served at once; more are closed at once.
const MAX_CONNECTIONS: usize = 64;
/// A request's line and headers larger than this are refused (431).
const MAX_HEAD: usize = 16 * 1024;
/// Headers per request.
const MAX_HEADERS: usize = 48;
/// How long a request's head may take to arrive, and how long a
/// keep-alive connection may stay quiet.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long writing an answer may take.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the figures behind the page's plots are sampled.
const SAMPLE_EVERY: Duration = Duration::from_secs(1);
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
    let listener = TcpListener::bind(&addrs[..]).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            format!("cannot listen on {listen}: the address is in use (another rivulet, or another program?)")
        } else {
            format!("cannot listen on {listen}: {e}")
        }
    })?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    if auth.is_none() && !addr.ip().is_loopback() {
        tracing::warn!(%addr, "the HTTP endpoint listens beyond loopback without credentials (set http.auth); POST is refused from other hosts");
    }
    std::thread::Builder::new()
        .name("rivulet-http".into())
        .spawn(move || serve(listener, Arc::new(auth), observed))
        .map_err(|e| format!("cannot start the HTTP endpoint: {e}"))?;
    Ok(Endpoint { addr })
}

/// Waits until `listener` has a connection to accept or `timeout` passed.
fn readable(listener: &TcpListener, timeout: Duration) -> bool {
    use std::os::fd::AsRawFd;
    let mut fd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
    // SAFETY: one valid pollfd, for the duration of the call.
    let n = unsafe { libc::poll(&mut fd, 1, ms) };
    n > 0
}

/// The accept loop; samples the figures between connections.
fn serve(listener: TcpListener, auth: Arc<Option<Auth>>, observed: Arc<Observed>) {
    let open = Arc::new(AtomicUsize::new(0));
    let mut next_sample = Instant::now();
    loop {
        let now = Instant::now();
        if now >= next_sample {
            observed.sample();
            next_sample = now + SAMPLE_EVERY;
        }
        if !readable(
            &listener,
            next_sample.saturating_duration_since(Instant::now()),
        ) {
            continue;
        }
        let (stream, peer) = match listener.accept() {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors, say: wait, then go on.
                tracing::warn!(error = %e, "the HTTP endpoint cannot accept a connection");
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
        };
        if open.fetch_add(1, Ordering::Relaxed) >= MAX_CONNECTIONS {
            open.fetch_sub(1, Ordering::Relaxed);
            drop(stream);
            continue;
        }
        let (observed, auth, count) = (observed.clone(), auth.clone(), open.clone());
        let spawned = std::thread::Builder::new()
            .name("rivulet-http-conn".into())
            .stack_size(256 * 1024)
            .spawn(move || {
                // Counted out even if serving panics.
                struct Open(Arc<AtomicUsize>);
                impl Drop for Open {
                    fn drop(&mut self) {
                        self.0.fetch_sub(1, Ordering::Relaxed);
                    }
                }
                let _open = Open(count);
                connection(stream, peer, &auth, &observed);
            });
        if let Err(e) = spawned {
            open.fetch_sub(1, Ordering::Relaxed);
            tracing::warn!(error = %e, "the HTTP endpoint cannot start a connection thread");
        }
    }
}

/// One parsed request.
struct Request {
    method: String,
    path: String,
    query: String,
    authorization: Option<String>,
    body: Vec<u8>,
    /// Whether the client keeps the connection open after the answer.
    keep_alive: bool,
}

/// An answer.
struct Reply {
    status: u16,
    kind: &'static str,
    body: Vec<u8>,
    headers: Vec<(&'static str, String)>,
}

impl Reply {
    fn header(mut self, name: &'static str, value: impl Into<String>) -> Reply {
        self.headers.push((name, value.into()));
        self
    }
}

/// Why a request could not be read.
enum Unreadable {
    /// The connection closed or went quiet: nothing to answer.
    Gone,
    /// A bad request: answer it, then close.
    Bad(Reply),
}

/// Serves one connection's requests until it closes, goes quiet, or a
/// request cannot be read.
fn connection(mut stream: TcpStream, peer: SocketAddr, auth: &Option<Auth>, o: &Arc<Observed>) {
    if stream.set_read_timeout(Some(READ_TIMEOUT)).is_err()
        || stream.set_write_timeout(Some(WRITE_TIMEOUT)).is_err()
    {
        return;
    }
    let _ = stream.set_nodelay(true);
    // Bytes read past the last request (a pipelined next one).
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    loop {
        let (req, reply) = match read_request(&mut stream, &mut buf) {
            Ok(req) => {
                let reply = match refused(&req, peer, auth) {
                    Some(r) => r,
                    // A bug in a handler answers 500 and the endpoint goes on.
                    None => std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        handle(&req, o)
                    }))
                    .unwrap_or_else(|_| {
                        tracing::error!(path = %req.path, "the HTTP endpoint failed to answer a request");
                        error(500, "internal error")
                    }),
                };
                (Some(req), reply)
            }
            Err(Unreadable::Gone) => return,
            Err(Unreadable::Bad(reply)) => (None, reply),
        };
        let keep = req.as_ref().is_some_and(|r| r.keep_alive);
        let head_only = req.as_ref().is_some_and(|r| r.method == "HEAD");
        if write_reply(&mut stream, &reply, keep, head_only).is_err() || !keep {
            let _ = stream.flush();
            let _ = stream.shutdown(std::net::Shutdown::Write);
            // Read what the client still sends (a refused body, say) for a
            // moment, so that closing does not reset the connection before
            // the client has read the answer.
            let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
            let _ = std::io::copy(&mut (&mut stream).take(1 << 20), &mut std::io::sink());
            return;
        }
    }
}

/// Reads one request (head and body) from `stream`; `buf` holds bytes
/// already read and keeps those past the request.
fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<Request, Unreadable> {
    let mut chunk = [0u8; 4096];
    loop {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut parsed = httparse::Request::new(&mut headers);
        match parsed.parse(buf) {
            Ok(httparse::Status::Complete(head_len)) => {
                let req = request_of(&parsed)?;
                let (req, length) = req;
                buf.drain(..head_len);
                return read_body(stream, buf, req, length);
            }
            Ok(httparse::Status::Partial) => {
                if buf.len() >= MAX_HEAD {
                    return Err(Unreadable::Bad(error(
                        431,
                        &format!("the request's line and headers are over {MAX_HEAD} bytes"),
                    )));
                }
            }
            Err(httparse::Error::TooManyHeaders) => {
                return Err(Unreadable::Bad(error(
                    431,
                    &format!("more than {MAX_HEADERS} headers"),
                )))
            }
            Err(e) => return Err(Unreadable::Bad(error(400, &format!("not HTTP: {e}")))),
        }
        match stream.read(&mut chunk) {
            Ok(0) => {
                return Err(if buf.is_empty() {
                    Unreadable::Gone
                } else {
                    Unreadable::Bad(error(400, "the request ended early"))
                })
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) if buf.is_empty() => return Err(Unreadable::Gone),
            Err(_) => return Err(Unreadable::Bad(error(408, "the request took too long"))),
        }
    }
}

/// The request a parsed head describes, and its body's length.
fn request_of(parsed: &httparse::Request<'_, '_>) -> Result<(Request, usize), Unreadable> {
    let method = parsed.method.unwrap_or("").to_string();
    let target = parsed.path.unwrap_or("/");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let version = parsed.version.unwrap_or(1);
    let mut keep_alive = version >= 1;
    let mut length = 0usize;
    let mut authorization = None;
    for h in parsed.headers.iter() {
        let value = std::str::from_utf8(h.value).unwrap_or("").trim();
        if h.name.eq_ignore_ascii_case("content-length") {
            length = value
                .parse()
                .map_err(|_| Unreadable::Bad(error(400, "Content-Length is not a number")))?;
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(Unreadable::Bad(error(
                411,
                "send the body with a Content-Length (chunked bodies are not taken)",
            )));
        } else if h.name.eq_ignore_ascii_case("connection") {
            let v = value.to_ascii_lowercase();
            if v.contains("close") {
                keep_alive = false;
            } else if v.contains("keep-alive") {
                keep_alive = true;
            }
        } else if h.name.eq_ignore_ascii_case("authorization") {
            authorization = Some(value.to_string());
        }
    }
    if length > MAX_BODY {
        return Err(Unreadable::Bad(error(
            413,
            &format!("request bodies are at most {MAX_BODY} bytes"),
        )));
    }
    Ok((
        Request {
            method,
            path: path.to_string(),
            query: query.to_string(),
            authorization,
            body: Vec::new(),
            keep_alive,
        },
        length,
    ))
}

/// Reads `length` bytes of body (some may be in `buf` already).
fn read_body(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    mut req: Request,
    length: usize,
) -> Result<Request, Unreadable> {
    while buf.len() < length {
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk) {
            Ok(0) => return Err(Unreadable::Bad(error(400, "the body ended early"))),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return Err(Unreadable::Bad(error(408, "the body took too long"))),
        }
    }
    req.body = buf.drain(..length).collect();
    Ok(req)
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "",
    }
}

fn write_reply(
    stream: &mut TcpStream,
    r: &Reply,
    keep_alive: bool,
    head_only: bool,
) -> std::io::Result<()> {
    use std::fmt::Write as _;
    let mut head = String::with_capacity(256);
    let _ = write!(
        head,
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: {}\r\n",
        r.status,
        reason(r.status),
        r.kind,
        r.body.len(),
        if keep_alive { "keep-alive" } else { "close" },
    );
    for (name, value) in &r.headers {
        let _ = write!(head, "{name}: {value}\r\n");
    }
    head.push_str("\r\n");
    if head_only || r.body.is_empty() {
        stream.write_all(head.as_bytes())
    } else {
        let mut all = head.into_bytes();
        all.extend_from_slice(&r.body);
        stream.write_all(&all)
    }
}

fn reply(status: u16, kind: &'static str, body: impl Into<Vec<u8>>) -> Reply {
    Reply {
        status,
        kind,
        body: body.into(),
        headers: Vec::new(),
    }
}

fn json(status: u16, v: &serde_json::Value) -> Reply {
    reply(status, "application/json", v.to_string())
}

fn error(status: u16, message: &str) -> Reply {
    json(status, &serde_json::json!({ "error": message }))
}

/// Whether the request may go on: `Some` is the refusal.
fn refused(req: &Request, peer: SocketAddr, auth: &Option<Auth>) -> Option<Reply> {
    let post = req.method == "POST";
    let local = peer.ip().is_loopback();
    let given = req.authorization.as_deref();
    match auth {
        Some(Auth(want)) if (post || !local) => {
            if given.is_some_and(|g| constant_time_eq(g.as_bytes(), want.as_bytes())) {
                None
            } else {
                let scheme = if want.starts_with("Basic") {
                    "Basic realm=\"rivulet\""
                } else {
                    "Bearer"
                };
                Some(
                    error(401, "credentials needed (http.auth)").header("WWW-Authenticate", scheme),
                )
            }
        }
        None if post && !local => Some(error(
            403,
            "POST is taken from loopback only unless http.auth is set",
        )),
        _ => None,
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn handle(req: &Request, o: &Arc<Observed>) -> Reply {
    let get = req.method == "GET" || req.method == "HEAD";
    match req.path.as_str() {
        "/" | "/index.html" if get => reply(200, "text/html; charset=utf-8", PAGE),
        "/metrics" if get => reply(
            200,
            "text/plain; version=0.0.4; charset=utf-8",
            o.render_metrics(),
        ),
        "/api/status" if get => json(200, &o.status()),
        "/health" if get => {
            let h = o.health();
            let code = if h.healthy { 200 } else { 503 };
            json(code, &serde_json::json!(h))
        }
        "/api/state" if get => state(o, &req.query),
        "/api/savepoint" if req.method == "POST" => savepoint(o, &req.body),
        "/" | "/index.html" | "/metrics" | "/api/status" | "/health" | "/api/state" => {
            error(405, "use GET").header("Allow", "GET, HEAD")
        }
        "/api/savepoint" => error(405, "use POST").header("Allow", "POST"),
        _ => error(
            404,
            "no such path; try /, /metrics, /api/status, /health, /api/state, /api/savepoint",
        ),
    }
}

/// `POST /api/savepoint`: a savepoint at the default place.
fn savepoint(o: &Observed, body: &[u8]) -> Reply {
    if !body.iter().all(|b| b.is_ascii_whitespace())
        && serde_json::from_slice::<serde_json::Value>(body).is_err()
    {
        return error(400, "the body, when given, must be JSON");
    }
    let Some(dir) = o.state_dir.clone() else {
        return error(
            409,
            "this pipeline keeps no state (no `state:` section): nothing to save",
        );
    };
    let ms = super::now_ms();
    let out = dir.join("savepoints").join(format!("savepoint-{ms}.redb"));
    match crate::state::control::request_savepoint(&dir, &out) {
        Ok(path) => json(
            200,
            &serde_json::json!({ "savepoint": path.display().to_string() }),
        ),
        Err(e) => error(503, &e),
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
fn state(o: &Arc<Observed>, query: &str) -> Reply {
    let Some(params) = params(query) else {
        return error(400, "the query string is not valid UTF-8 percent-encoding");
    };
    let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    // The stream: `main` (or the pipeline's name) is the first stream's
    // keyed state; a job graph's streams are asked for by name.
    let stream = get("stream").unwrap_or("main");
    let board = if stream == "main" || stream == o.pipeline {
        Some(o.queries.clone())
    } else {
        o.queries.stream(stream)
    };
    let Some(board) = board else {
        let mut known = vec!["main".to_string()];
        known.extend(o.queries.stream_names());
        return error(
            404,
            &format!(
                "no stream `{stream}` with keyed state in this run; ask for one of: {}",
                known.join(", ")
            ),
        );
    };
    let Some(shape) = board.shape() else {
        return error(
            404,
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
            400,
            &format!(
                "say which key: key=VALUE, or one parameter per key field ({})",
                names.join(", ")
            ),
        );
    };
    if parts.len() != names.len() {
        return error(
            400,
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
            return error(400, "the key is too ambiguous; give it as JSON");
        }
    }
    let (rows, watermark) = match board.ask(keys, QUERY_TIMEOUT) {
        Ok(x) => x,
        Err(super::query::QueryError::NoState) => {
            return error(404, "this pipeline keeps no keyed state, or is not running")
        }
        Err(super::query::QueryError::Timeout) => {
            return error(
                503,
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
        200,
        &serde_json::json!({
            "stream": stream,
            "key": key,
            "watermark": (watermark != i64::MAX && watermark > i64::MIN / 2).then_some(watermark),
            "windows": windows,
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An endpoint on a free loopback port, for the demo pipeline.
    fn endpoint(auth: Option<Auth>) -> SocketAddr {
        let p = crate::config::validate(include_str!("../../../configs/demo.yaml"))
            .map_err(|e| format!("{e:?}"))
            .expect("valid");
        let o = Observed::new(
            "demo",
            Arc::default(),
            Arc::default(),
            super::super::Graph::of(&p),
        );
        start("127.0.0.1:0", auth, Arc::new(o))
            .expect("listens")
            .addr
    }

    /// Sends `raw`, closes the sending side and reads until the server
    /// closes.
    fn exchange(addr: SocketAddr, raw: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.write_all(raw).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    fn statuses(answer: &str) -> Vec<u16> {
        answer
            .match_indices("HTTP/1.1 ")
            .filter_map(|(i, _)| answer[i + 9..i + 12].parse().ok())
            .collect()
    }

    #[test]
    fn keep_alive_and_pipelined_requests_are_answered_in_order() {
        let addr = endpoint(None);
        let answer = exchange(
            addr,
            b"GET /health HTTP/1.1\r\nHost: t\r\n\r\nGET /nope HTTP/1.1\r\nHost: t\r\n\r\n\
              HEAD /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        );
        assert_eq!(statuses(&answer), [200, 404, 200], "{answer}");
        let head = &answer[answer.rfind("HTTP/1.1 ").unwrap()..];
        assert!(head.contains("Connection: close"), "{head}");
        assert!(head.ends_with("\r\n\r\n"), "HEAD has no body: {head}");
        // HTTP/1.0 closes after one answer unless asked to keep it.
        let answer = exchange(
            addr,
            b"GET /health HTTP/1.0\r\n\r\nGET /health HTTP/1.0\r\n\r\n",
        );
        assert_eq!(statuses(&answer), [200], "{answer}");
    }

    #[test]
    fn bodies_are_bounded_and_need_a_length() {
        let addr = endpoint(None);
        let big = format!(
            "POST /api/savepoint HTTP/1.1\r\nHost: t\r\nContent-Length: 100000\r\n\r\n{}",
            "x".repeat(100_000)
        );
        assert_eq!(statuses(&exchange(addr, big.as_bytes())), [413]);
        let chunked = b"POST /api/savepoint HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        assert_eq!(statuses(&exchange(addr, chunked)), [411]);
        let bad_length = b"POST /api/savepoint HTTP/1.1\r\nContent-Length: ten\r\n\r\n";
        assert_eq!(statuses(&exchange(addr, bad_length)), [400]);
        // A body split over several reads, then a second request.
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.write_all(b"POST /api/savepoint HTTP/1.1\r\nContent-Length: 4\r\n\r\n{}")
            .unwrap();
        std::thread::sleep(Duration::from_millis(50));
        s.write_all(b"  GET /health HTTP/1.1\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        assert_eq!(
            statuses(&out),
            [409, 200],
            "no state to save, then health: {out}"
        );
    }

    #[test]
    fn oversized_or_garbled_heads_get_4xx() {
        let addr = endpoint(None);
        let huge = format!(
            "GET /health HTTP/1.1\r\nX-Big: {}\r\n\r\n",
            "y".repeat(40_000)
        );
        assert_eq!(statuses(&exchange(addr, huge.as_bytes())), [431]);
        let many: String = (0..60).map(|i| format!("X-{i}: v\r\n")).collect();
        let many = format!("GET /health HTTP/1.1\r\n{many}\r\n");
        assert_eq!(statuses(&exchange(addr, many.as_bytes())), [431]);
        assert_eq!(statuses(&exchange(addr, b"HELLO THERE\r\n\r\n")), [400]);
        assert_eq!(
            statuses(&exchange(addr, b"GET /health HTTP/1.1\r\nHost")),
            [400],
            "cut short"
        );
        assert_eq!(
            exchange(addr, b""),
            "",
            "a connection that sends nothing gets nothing"
        );
    }

    #[test]
    fn credentials_are_checked_for_post() {
        let addr = endpoint(Some(Auth("Bearer s3cret".into())));
        let post = |auth: &str| {
            let raw = format!(
                "POST /api/savepoint HTTP/1.1\r\nContent-Length: 0\r\n{auth}Connection: close\r\n\r\n"
            );
            exchange(addr, raw.as_bytes())
        };
        let refused = post("");
        assert_eq!(statuses(&refused), [401]);
        assert!(refused.contains("WWW-Authenticate: Bearer"), "{refused}");
        assert_eq!(statuses(&post("Authorization: Bearer nope\r\n")), [401]);
        assert_eq!(
            statuses(&post("Authorization: Bearer s3cret\r\n")),
            [409],
            "let in; no state to save"
        );
        // GET from loopback needs none.
        assert_eq!(
            statuses(&exchange(addr, b"GET /health HTTP/1.0\r\n\r\n")),
            [200]
        );
    }

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
