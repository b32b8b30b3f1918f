//! A headless Chromium for the web dashboard's tests and benchmarks:
//! Debian's `chromedriver` started on a free loopback port, stopped by its
//! process id, with a fresh profile directory. Tests connect a WebDriver
//! client to [`Chromedriver::url`] with [`Chromedriver::capabilities`].
//!
//! The machine has no network: Chromium runs with everything that would
//! reach out (background networking, component updates, sync, QUIC) turned
//! off, or it stalls waiting for it.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::sys::send_signal;

/// Where Debian's `chromium` and `chromium-driver` packages put them.
pub const CHROMIUM: &str = "/usr/bin/chromium";
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// A running `chromedriver`; stopped (by pid) when dropped.
pub struct Chromedriver {
    child: Child,
    port: u16,
    /// Chromium's profile, fresh for every driver.
    profile: tempfile::TempDir,
}

impl Chromedriver {
    /// Start `chromedriver` on a free loopback port and wait until it
    /// accepts connections.
    pub fn start() -> Result<Self> {
        for path in [CHROMIUM, CHROMEDRIVER] {
            if !std::path::Path::new(path).exists() {
                bail!(
                    "{path} is missing: run scripts/setup.sh (Debian's chromium and chromium-driver)"
                );
            }
        }
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let profile = tempfile::Builder::new()
            .prefix("ndchromium-")
            .tempdir()
            .context("creating Chromium's profile directory")?;
        let log = profile.path().join("chromedriver.log");
        // Its own process group: stopping it stops the browsers it started.
        let child = Command::new(CHROMEDRIVER)
            .process_group(0)
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .arg(format!("--log-path={}", log.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting chromedriver")?;
        let mut driver = Chromedriver {
            child,
            port,
            profile,
        };
        let address = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_err() {
            if let Some(status) = driver.child.try_wait()? {
                bail!("chromedriver exited ({status}) before it listened on {address}");
            }
            if Instant::now() > deadline {
                bail!("chromedriver did not listen on {address} within 20s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(driver)
    }

    /// The WebDriver endpoint.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// chromedriver's own log.
    pub fn log(&self) -> PathBuf {
        self.profile.path().join("chromedriver.log")
    }

    /// The W3C capabilities of a headless Chromium with its own profile, a
    /// 1400×1000 window and nothing that reaches the network on its own.
    pub fn capabilities(&self) -> serde_json::Map<String, serde_json::Value> {
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--window-size=1400,1000",
            &format!(
                "--user-data-dir={}",
                self.profile.path().join("profile").display()
            ),
        ];
        let value = serde_json::json!({
            "browserName": "chrome",
            "goog:chromeOptions": { "binary": CHROMIUM, "args": args },
        });
        match value {
            serde_json::Value::Object(map) => map,
            _ => unreachable!("a JSON object"),
        }
    }
}

impl Drop for Chromedriver {
    fn drop(&mut self) {
        // The driver and the browsers it started, by their process group
        // (the driver's pid): TERM, then KILL after a grace period.
        let group = -(self.child.id() as i32);
        send_signal(group, libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        send_signal(group, libc::SIGKILL);
        let _ = self.child.wait();
    }
}
