//! Builds and copies where they belong: hosts fetch from their binary
//! cache what it has (by default) and the coordinator sends only the rest
//! (a cache on loopback, served over HTTP by the test); `--no-substitute`
//! sends everything; `--builders` builds on remote builders.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use nix_deploy_testkit::{HostSpec, nix_config};

use crate::helpers::{Harness, status, unique_version};

/// A binary cache (a `file://` store's directory) served over HTTP on
/// loopback, remembering every path asked for. Stopped when dropped.
struct CacheServer {
    port: u16,
    requests: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl CacheServer {
    fn start(dir: PathBuf) -> CacheServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (requests, stop) = (requests.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => serve(stream, &dir, &requests),
                        Err(_) => std::thread::sleep(std::time::Duration::from_millis(5)),
                    }
                }
            })
        };
        CacheServer {
            port,
            requests,
            stop,
            thread: Some(thread),
        }
    }

    /// NAR files fetched so far.
    fn nars(&self) -> usize {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .filter(|p| p.starts_with("/nar/"))
            .count()
    }
}

impl Drop for CacheServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One request: `GET PATH`, answered with the file or 404, then closed.
fn serve(stream: std::net::TcpStream, dir: &Path, requests: &Mutex<Vec<String>>) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(5)));
    let mut reader = BufReader::new(&stream);
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    // The headers, up to the empty line.
    let mut header = String::new();
    while reader.read_line(&mut header).is_ok_and(|n| n > 2) {
        header.clear();
    }
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or("/"));
    let path = path.split('?').next().unwrap_or("/").to_string();
    requests.lock().unwrap().push(path.clone());
    let file = dir.join(path.trim_start_matches('/'));
    let mut out = &stream;
    match std::fs::read(&file).ok().filter(|_| !path.contains("..")) {
        Some(body) => {
            let _ = write!(
                out,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            if method != "HEAD" {
                let _ = out.write_all(&body);
            }
        }
        None => {
            let _ = write!(
                out,
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
        }
    }
    let _ = out.flush();
}

fn nix(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .env("NIX_CONFIG", nix_config())
        .args(&args[1..])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn hosts_substitute_what_their_binary_cache_has_and_the_coordinator_sends_the_rest() {
    let cache = tempfile::tempdir().unwrap();
    let server = CacheServer::start(cache.path().to_path_buf());
    let substituter = format!("http://127.0.0.1:{}?trusted=1", server.port);
    let h = Harness::start(vec![
        HostSpec::new("sub")
            .substituters(&substituter)
            .package("libcached-1.0"),
        HostSpec::new("pushed")
            .substituters(&substituter)
            .package("libcached-1.0"),
    ]);
    // The cache has everything of `sub`'s system but the system itself.
    let toplevel = h.fleet.build("sub").unwrap();
    let closure = nix(&["nix-store", "--query", "--requisites", &toplevel]);
    let cached: Vec<&str> = closure
        .lines()
        .map(str::trim)
        .filter(|p| !p.is_empty() && *p != toplevel)
        .collect();
    assert!(cached.len() > 3, "{closure}");
    let to = format!("file://{}", cache.path().display());
    nix(&[&["nix", "copy", "--to", &to][..], &cached].concat());

    let (code, report, stderr) = h.deploy(&["sub"]);
    assert_eq!(code, 0, "{report:#}\n{stderr}");
    assert_eq!(status(&report, "sub"), "deployed");
    assert_eq!(
        h.fleet.current_system("sub").as_deref(),
        Some(toplevel.as_str())
    );
    // Every cached path came from the cache: the coordinator sent the rest.
    assert_eq!(
        server.nars(),
        cached.len(),
        "{:?}",
        server.requests.lock().unwrap()
    );

    // --no-substitute: the coordinator sends everything, the cache is not asked.
    let before = server.requests.lock().unwrap().len();
    let (code, report, stderr) = h.deploy(&["pushed", "--no-substitute"]);
    assert_eq!(code, 0, "{report:#}\n{stderr}");
    assert_eq!(status(&report, "pushed"), "deployed");
    assert_eq!(server.requests.lock().unwrap().len(), before);
}

#[test]
fn builds_run_on_the_remote_builders_given() {
    // A system no earlier run built on this machine.
    let h = Harness::start(vec![
        HostSpec::new("builder"),
        HostSpec::new("target").version(unique_version()),
    ]);
    let toplevel = h.fleet.toplevel("target").unwrap();
    let (code, report, stderr) = h.deploy(&[
        "target",
        "--builders",
        "ssh://builder x86_64-linux - 1 1",
        "--no-substitute",
    ]);
    assert_eq!(code, 0, "{report:#}\n{stderr}");
    assert_eq!(
        h.fleet.current_system("target").as_deref(),
        Some(toplevel.as_str())
    );
    // Built on the builder (its store has the system; it was never deployed there).
    let in_builder = h
        .fleet
        .host_dir("builder")
        .join(toplevel.trim_start_matches('/'));
    assert!(
        in_builder.exists(),
        "{} was not built on the builder",
        toplevel
    );
    assert_eq!(h.fleet.current_system("builder"), None);
}
