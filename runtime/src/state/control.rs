//! The control socket: `rivulet savepoint` asks a running pipeline for a
//! savepoint through `<state.dir>/control.sock`.
//!
//! Protocol, one line each way: `savepoint <path>` → `ok <path>` or
//! `error <reason>`.

use super::{store_err, StateError};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// How long a savepoint may take before the requester gives up.
const SAVEPOINT_TIMEOUT: Duration = Duration::from_secs(60);

/// A request for a savepoint, from the control socket to the run.
pub(crate) struct SavepointRequest {
    /// Where the savepoint file goes.
    pub(crate) path: PathBuf,
    /// Answered once the savepoint is written (or failed).
    pub(crate) reply: std::sync::mpsc::Sender<Result<PathBuf, String>>,
}

pub fn socket_path(dir: &Path) -> PathBuf {
    dir.join("control.sock")
}

/// The listening side, alive for one run.
pub struct Control {
    requests: Option<Receiver<SavepointRequest>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    path: PathBuf,
}

impl Control {
    pub(crate) fn take_requests(&mut self) -> Option<Receiver<SavepointRequest>> {
        self.requests.take()
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // The thread waits in `accept`: a connection wakes it to see `stop`.
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Listens on `<dir>/control.sock` (replacing a stale socket).
pub fn listen(dir: &Path) -> Result<Control, StateError> {
    let path = socket_path(dir);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).map_err(|e| store_err(&path, e))?;
    let (tx, rx) = channel::<SavepointRequest>();
    let stop = Arc::new(AtomicBool::new(false));
    let thread = {
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("rivulet-control".into())
            .spawn(move || {
                // Blocking: an idle pipeline does not wake for this.
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok(_) if stop.load(Ordering::SeqCst) => return,
                        Ok((stream, _)) => serve(stream, &tx),
                        Err(e) => {
                            tracing::warn!(error = %e, "control socket");
                            std::thread::sleep(Duration::from_millis(50));
                        }
                    }
                }
            })
            .map_err(|e| store_err(&path, e))?
    };
    Ok(Control {
        requests: Some(rx),
        stop,
        thread: Some(thread),
        path,
    })
}

fn serve(stream: UnixStream, tx: &std::sync::mpsc::Sender<SavepointRequest>) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut line = String::new();
    let mut reader = BufReader::new(&stream);
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let answer = match line.trim().strip_prefix("savepoint ") {
        Some(p) if !p.is_empty() => {
            let (reply, wait) = channel();
            let sent = tx.send(SavepointRequest {
                path: PathBuf::from(p),
                reply,
            });
            match sent
                .ok()
                .and_then(|_| wait.recv_timeout(SAVEPOINT_TIMEOUT).ok())
            {
                Some(Ok(path)) => format!("ok {}\n", path.display()),
                Some(Err(e)) => format!("error {e}\n"),
                None => {
                    "error the pipeline did not take a savepoint in time (is it stopping?)\n".into()
                }
            }
        }
        _ => "error expected `savepoint <path>`\n".into(),
    };
    let mut w = &stream;
    let _ = w.write_all(answer.as_bytes());
}

/// Asks the pipeline running with state in `dir` for a savepoint at `out`.
pub fn request_savepoint(dir: &Path, out: &Path) -> Result<PathBuf, String> {
    let sock = socket_path(dir);
    let stream = UnixStream::connect(&sock).map_err(|e| {
        format!(
            "cannot reach a running pipeline at {} ({e}); is it running with this state.dir?",
            sock.display()
        )
    })?;
    let _ = stream.set_read_timeout(Some(SAVEPOINT_TIMEOUT + Duration::from_secs(5)));
    let out = std::path::absolute(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let mut w = &stream;
    w.write_all(format!("savepoint {}\n", out.display()).as_bytes())
        .map_err(|e| format!("control socket: {e}"))?;
    let mut line = String::new();
    BufReader::new(&stream)
        .read_line(&mut line)
        .map_err(|e| format!("control socket: {e}"))?;
    match line.trim().split_once(' ') {
        Some(("ok", p)) => Ok(PathBuf::from(p)),
        Some(("error", e)) => Err(e.to_string()),
        _ => Err(format!("unexpected answer from the pipeline: {line:?}")),
    }
}
