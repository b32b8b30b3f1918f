//! Small system helpers: processes, signals, addresses, keys, files.

use std::collections::hash_map::RandomState;
use std::fs;
use std::hash::{BuildHasher, Hasher};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};

use crate::*;

/// Creates a host's directory with the empty `nix`, `run` and `root` that
/// become its `/nix`, `/run` and `/root`.
pub(crate) fn create_host_dirs(dir: &Path) -> Result<()> {
    for sub in ["nix", "run", "root"] {
        fs::create_dir_all(dir.join(sub))
            .with_context(|| format!("creating {}/{sub}", dir.display()))?;
    }
    fs::set_permissions(dir.join("root"), fs::Permissions::from_mode(0o700))?;
    Ok(())
}

/// Sends `signal` to `pid` (a process group if negative); true if delivered.
#[allow(unsafe_code)]
pub(crate) fn send_signal(pid: i32, signal: i32) -> bool {
    // SAFETY: kill(2) only takes two integers and touches no memory of ours;
    // a stale or invalid pid just makes it fail with ESRCH.
    unsafe { libc::kill(pid, signal) == 0 }
}

/// Waits for `child` and returns its exit code (`None`: killed by a
/// signal) and its own peak resident memory, in KiB: the kernel's high-water
/// mark (`VmHWM`, which only grows), read until the process ends. Its
/// children (`nix eval`, `ssh`) are not counted, as `wait4`'s `ru_maxrss`
/// would: their size says nothing about the coordinator's.
pub fn wait_with_peak_rss(child: std::process::Child) -> std::io::Result<(Option<i32>, u64)> {
    let status = format!("/proc/{}/status", child.id());
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut peak = 0u64;
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                let hwm = std::fs::read_to_string(&status).ok().and_then(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("VmHWM:"))
                        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                });
                peak = peak.max(hwm.unwrap_or(0));
                // A sampling period, not a synchronisation: the mark only
                // grows, so each read sees every peak before it.
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            peak
        })
    };
    let (code, _) = wait_reaped(child)?;
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    Ok((code, watcher.join().expect("the sampling thread")))
}

/// Waits for `child`: its exit code and `wait4`'s `ru_maxrss`.
#[allow(unsafe_code)]
fn wait_reaped(child: std::process::Child) -> std::io::Result<(Option<i32>, u64)> {
    let pid = child.id() as libc::pid_t;
    let mut status: libc::c_int = 0;
    // SAFETY: an all-zero rusage is a valid value of this plain C struct.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: wait4 writes only into `status` and `usage`, which live
        // for the call; `pid` is our own unwaited child.
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        if r == pid {
            break;
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    // `Child` was reaped here: dropping it neither waits nor kills.
    drop(child);
    let code = libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status));
    Ok((code, usage.ru_maxrss as u64))
}

pub(crate) fn validate_name(name: &str) -> Result<()> {
    let ok = name.len() <= 32
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if !ok {
        bail!("invalid host name {name:?}: use [A-Za-z0-9][A-Za-z0-9_-]*, at most 32 characters");
    }
    Ok(())
}

/// Random bits without a rand crate: a randomly keyed hasher over time, pid
/// and a counter.
pub(crate) fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = RandomState::new().build_hasher();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    hasher.write_u128(now.as_nanos());
    hasher.write_u32(std::process::id());
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.finish()
}

/// Whether nothing listens on `addr:22` (checked by binding it briefly).
pub(crate) fn address_free(addr: Ipv4Addr) -> bool {
    TcpListener::bind((addr, SSH_PORT)).is_ok()
}

/// A random block `127.A.B.0/24` whose addresses `.1` to `.n` are free.
pub(crate) fn choose_block(n: usize) -> Result<(u8, u8)> {
    if n > 254 {
        bail!("a fleet has at most 254 hosts, not {n}");
    }
    for _ in 0..200 {
        let r = random_u64();
        let (a, b) = (100 + (r % 100) as u8, (r >> 8) as u8);
        if (1..=n).all(|x| address_free(Ipv4Addr::new(127, a, b, x as u8))) {
            return Ok((a, b));
        }
    }
    bail!("found no free loopback block 127.A.B.0/24 for {n} hosts")
}

/// Whether `addr:22` answers with an SSH banner containing `token`.
pub(crate) fn banner_is(addr: Ipv4Addr, token: &str) -> bool {
    let sock = SocketAddr::from((addr, SSH_PORT));
    let Ok(mut stream) = TcpStream::connect_timeout(&sock, Duration::from_millis(200)) else {
        return false;
    };
    if stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .is_err()
    {
        return false;
    }
    let mut banner = Vec::new();
    let mut buf = [0u8; 256];
    while !banner.contains(&b'\n') && banner.len() < 1024 {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => banner.extend_from_slice(&buf[..n]),
        }
    }
    let line = String::from_utf8_lossy(&banner);
    line.starts_with("SSH-") && line.lines().next().is_some_and(|l| l.contains(token))
}

/// Spawns `ssh-keygen` for an ed25519 key without passphrase at `path`.
pub(crate) fn keygen(path: &Path) -> Result<(String, Child)> {
    let what = format!("ssh-keygen for {}", path.display());
    let child = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "testkit", "-f"])
        .arg(path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {what}"))?;
    Ok((what, child))
}

pub(crate) fn wait_ok(child: Child, what: &str) -> Result<()> {
    let out = child
        .wait_with_output()
        .with_context(|| format!("waiting for {what}"))?;
    checked_stdout(out).with_context(|| what.to_string())?;
    Ok(())
}

/// Runs `cmd` (stdin null, output captured), killing it after `timeout`.
pub(crate) fn run_with_timeout(mut cmd: Command, timeout: Duration) -> Result<Output> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().context("spawning")?;
    let pid = child.id() as i32;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(out) => Ok(out?),
        Err(_) => {
            // The waiting thread has not reaped the child, so pid is still it.
            send_signal(pid, libc::SIGKILL);
            let out = rx.recv().context("waiting for the killed command")??;
            bail!(
                "timed out after {timeout:?}; stderr: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )
        }
    }
}

/// stdout of a successful command, or an error with its status and stderr.
pub(crate) fn checked_stdout(out: Output) -> Result<String> {
    if !out.status.success() {
        bail!(
            "{}; stderr: {}",
            describe(out.status),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub(crate) fn describe(status: ExitStatus) -> String {
    match status.code() {
        Some(code) => format!("exit code {code}"),
        None => format!("{status}"),
    }
}

/// The last `n` lines of `text`.
pub(crate) fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Writes a file via a temporary file and rename, mode 0644.
pub(crate) fn write_atomic(path: &Path, contents: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    file.write_all(contents.as_bytes())?;
    drop(file);
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o644))?;
    fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// Pids of live processes (other than this one) that have a mount whose
/// mountinfo line contains a mount needle, or whose command line contains a
/// cmdline needle, and all their descendants (sshd's pre-authentication child
/// chroots to `/run/sshd`, which hides its mounts, and renames itself).
pub(crate) fn find_processes(needles: &[(String, String)]) -> Vec<u32> {
    let me = std::process::id();
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    let mut parents: Vec<(u32, u32)> = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let cmdline = fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if cmdline.is_empty() {
            continue; // a zombie or a kernel thread
        }
        let cmdline = String::from_utf8_lossy(&cmdline);
        let mountinfo = fs::read_to_string(entry.path().join("mountinfo")).unwrap_or_default();
        if needles
            .iter()
            .any(|(m, c)| mountinfo.contains(m.as_str()) || cmdline.contains(c.as_str()))
        {
            found.push(pid);
        } else if let Some(ppid) = parent_pid(pid) {
            parents.push((pid, ppid));
        }
    }
    // Add descendants until nothing changes.
    loop {
        let before = found.len();
        parents.retain(|&(pid, ppid)| {
            let descendant = found.contains(&ppid);
            if descendant {
                found.push(pid);
            }
            !descendant
        });
        if found.len() == before {
            break;
        }
    }
    found
}

/// The parent pid of `pid`, from `/proc/PID/stat` (`pid (comm) state ppid ...`).
pub(crate) fn parent_pid(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_comm = &stat[stat.rfind(')')? + 1..];
    after_comm.split_whitespace().nth(1)?.parse().ok()
}

/// Makes every directory under `dir` writable by its owner, so that the
/// read-only store paths nix leaves in a host's store can be removed.
pub(crate) fn make_removable(dir: &Path) {
    let Ok(meta) = fs::symlink_metadata(dir) else {
        return;
    };
    if !meta.is_dir() {
        return;
    }
    let mode = meta.permissions().mode();
    if mode & 0o700 != 0o700 {
        let _ = fs::set_permissions(dir, fs::Permissions::from_mode(mode | 0o700));
    }
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            make_removable(&entry.path());
        }
    }
}
