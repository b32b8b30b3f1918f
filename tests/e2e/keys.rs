//! `deployment.keys` against real test hosts: each source (`text`,
//! `keyFile`, `keyCommand`) and upload time, owner and mode checked on the
//! host, `upload-keys`, malformed specs refused, and every secret searched
//! for where it must never be: the state directory (database and all), the
//! coordinator's and the host's Nix stores, the logs and `--json`.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use nix_deploy_testkit::HostSpec;
use serde_json::Value;

use crate::helpers::{Harness, files_containing, host, status};

/// A secret no other test and no earlier run has.
fn secret(what: &str) -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    );
    format!("{what}-secret-{:016x}", hasher.finish())
}

struct Secrets {
    text: String,
    file: String,
    command: String,
    dir: tempfile::TempDir,
}

impl Secrets {
    fn new() -> Secrets {
        let dir = tempfile::tempdir().unwrap();
        let secrets = Secrets {
            text: secret("text"),
            file: secret("file"),
            command: secret("command"),
            dir,
        };
        // No trailing newline: the key must arrive byte for byte.
        std::fs::write(secrets.dir.path().join("api.token"), &secrets.file).unwrap();
        std::fs::write(secrets.dir.path().join("cert.pem"), &secrets.command).unwrap();
        for f in ["api.token", "cert.pem"] {
            std::fs::set_permissions(
                secrets.dir.path().join(f),
                std::fs::Permissions::from_mode(0o600),
            )
            .unwrap();
        }
        secrets
    }

    fn keys_nix(&self) -> String {
        let dir = self.dir.path().display();
        format!(
            r#"keys = {{
                "db-pass" = {{ text = "{text}"; }};
                "api.token" = {{ keyFile = "{dir}/api.token"; user = "nobody"; group = "nogroup"; permissions = "0640"; }};
                cert = {{ name = "cert.pem"; keyCommand = [ "cat" "{dir}/cert.pem" ]; destDir = "/run/app/tls";
                          user = "nobody"; permissions = "0400"; uploadAt = "post-activation"; }};
              }};"#,
            text = self.text
        )
    }
}

fn mode_and_owner(path: &Path) -> (u32, u32, u32) {
    let meta = std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (meta.mode() & 0o7777, meta.uid(), meta.gid())
}

#[test]
fn keys_from_each_source_land_with_their_owner_and_mode_and_nowhere_else() {
    let secrets = Secrets::new();
    let h = Harness::start(vec![
        HostSpec::new("k1").deployment_extra(&secrets.keys_nix()),
        HostSpec::new("k2"),
    ]);
    let (code, report, stderr) = h.deploy(&[]);
    assert_eq!(code, 0, "{report:#}\n{stderr}");
    // The host's /run is H/run on this machine.
    let run_dir = h.fleet.host_dir("k1").join("run");
    let on_host = |path: &str| run_dir.join(path.trim_start_matches("/run/"));
    assert_eq!(
        std::fs::read_to_string(on_host("/run/keys/db-pass")).unwrap(),
        secrets.text
    );
    assert_eq!(mode_and_owner(&on_host("/run/keys/db-pass")), (0o600, 0, 0));
    assert_eq!(
        std::fs::read_to_string(on_host("/run/keys/api.token")).unwrap(),
        secrets.file
    );
    assert_eq!(
        mode_and_owner(&on_host("/run/keys/api.token")),
        (0o640, 65534, 65534)
    );
    assert_eq!(
        std::fs::read_to_string(on_host("/run/app/tls/cert.pem")).unwrap(),
        secrets.command
    );
    assert_eq!(
        mode_and_owner(&on_host("/run/app/tls/cert.pem")),
        (0o400, 65534, 0)
    );
    // Written atomically: no temporary file is left behind. What the
    // deployment replaced is kept beside them, root-only (see keys_undo).
    let left: Vec<_> = std::fs::read_dir(on_host("/run/keys"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name != ".nix-deploy-undo")
        .collect();
    assert_eq!(left.len(), 2, "{left:?}");
    assert_eq!(
        mode_and_owner(&on_host("/run/keys/.nix-deploy-undo")),
        (0o700, 0, 0)
    );

    // Pre-activation keys before the activation, post-activation ones after.
    let k1 = host(&report, "k1");
    let steps: Vec<&str> = k1["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["step"].as_str().unwrap())
        .collect();
    assert_eq!(
        steps,
        [
            "pre-flight",
            "build",
            "copy",
            "keys",
            "set-profile",
            "activate",
            "keys",
            "validate",
            "confirm"
        ]
    );
    // A host without keys has no keys step.
    assert!(
        !host(&report, "k2")["steps"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["step"] == "keys")
    );

    // Re-upload without deploying: a changed key file arrives, nothing else moves.
    let rotated = secret("rotated");
    std::fs::write(secrets.dir.path().join("api.token"), &rotated).unwrap();
    let (code, uploaded, stderr) = h.json(&["upload-keys", "k1", "k2"]);
    assert_eq!(code, 0, "{uploaded:#}\n{stderr}");
    assert_eq!(uploaded["kind"], "upload-keys");
    assert_eq!(status(&uploaded, "k1"), "succeeded");
    assert_eq!(status(&uploaded, "k2"), "skipped");
    assert!(
        host(&uploaded, "k1")["output"]["stdout"]
            .as_str()
            .unwrap()
            .contains("/run/keys/api.token (nobody:nogroup 0640)")
    );
    assert_eq!(
        std::fs::read_to_string(on_host("/run/keys/api.token")).unwrap(),
        rotated
    );
    assert_eq!(h.fleet.generations("k1"), vec![1]);
    assert_eq!(h.fleet.activations("k1").len(), 1);

    // Nowhere it must not be. Everything nix-deploy printed, too:
    let (_, shown, _) = h.json(&["show", &report["id"].as_i64().unwrap().to_string()]);
    let (_, history, _) = h.json(&["history"]);
    let logs = h.spawn("logs", &["deploy", "--force"]);
    let (code, _, _) = h.wait("logs", logs);
    assert_eq!(code, 0);
    let printed: Vec<String> = [&report, &uploaded, &shown, &history]
        .iter()
        .map(|v| v.to_string())
        .chain([stderr])
        .collect();
    for secret in [&secrets.text, &secrets.file, &secrets.command, &rotated] {
        for text in &printed {
            assert!(!text.contains(secret.as_str()), "{secret} printed");
        }
        assert_eq!(
            files_containing(h.state_dir(), secret),
            Vec::<String>::new(),
            "state directory (database, logs)"
        );
        assert_eq!(
            files_containing(&h.fleet.host_dir("k1").join("nix"), secret),
            Vec::<String>::new(),
            "the host's store"
        );
        assert!(!h.fleet.sshd_log("k1").contains(secret.as_str()));
    }
    // The coordinator's store: `text` is part of the flake's source (which
    // Nix copies into the store; see README), the other sources never are.
    for secret in [&secrets.file, &secrets.command, &rotated] {
        assert_eq!(
            files_containing(Path::new("/nix/store"), secret),
            Vec::<String>::new(),
            "the coordinator's store"
        );
    }
}

#[test]
fn keys_come_back_after_a_reboot() {
    let secrets = Secrets::new();
    let mut h = Harness::start(vec![
        HostSpec::new("kr").deployment_extra(&secrets.keys_nix()),
    ]);
    assert_eq!(h.deploy(&[]).0, 0);
    h.fleet.update("kr", |s| s.bump()).unwrap();
    let (code, report, stderr) = h.json_serving_reboots("reboot", &["deploy", "--reboot"]);
    assert_eq!(code, 0, "{report:#}\n{stderr}");
    let key = h.fleet.host_dir("kr").join("run/keys/db-pass");
    assert_eq!(std::fs::read_to_string(&key).unwrap(), secrets.text);
    assert_eq!(h.fleet.reboots("kr").len(), 1);
}

#[test]
fn malformed_key_specs_exit_2_and_touch_nothing() {
    let mut h = Harness::start(vec![HostSpec::new("km")]);
    for (keys, needle) in [
        (
            r#"keys.a = { text = "x"; permissions = "0999"; };"#,
            "deployment.keys.a.permissions: is not an octal mode",
        ),
        (
            r#"keys.a = { text = "x"; destdir = "/run/x"; };"#,
            "unknown field `destdir`",
        ),
        (r#"keys.a = { keyFile = "/x"; text = "y"; };"#, "only one"),
        (
            r#"keys.a = { text = "x"; user = "root;reboot"; };"#,
            "deployment.keys.a.user is not a valid user name",
        ),
        (
            r#"keys.a = { text = "x"; destDir = "/nix/store/keys"; };"#,
            "Nix store",
        ),
        (
            r#"keys.a = { text = "x"; uploadAt = "whenever"; };"#,
            "uploadAt",
        ),
    ] {
        h.fleet
            .update("km", |s| s.deployment_extra = Some(keys.to_string()))
            .unwrap();
        let out = h.run(&["deploy"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{keys}: {stderr}");
        assert!(stderr.contains("deployment.keys.a"), "{keys}: {stderr}");
        assert!(stderr.contains(needle), "{keys}: {stderr}");
        let out = h.run(&["upload-keys", "km"]);
        assert_eq!(out.status.code(), Some(2), "{keys}");
    }
    assert_eq!(h.fleet.generation("km"), None);
    assert!(!h.fleet.host_dir("km").join("run/keys").exists());
    let (_, history, _) = h.json(&["history"]);
    assert_eq!(history["deployments"], Value::Array(Vec::new()));
}

/// Waits up to `secs` for `child`, stopping it (by its pid) if its peak
/// memory passes `max_kib` or time runs out; its exit code and peak memory,
/// or why it was stopped.
fn wait_bounded(
    mut child: std::process::Child,
    secs: u64,
    max_kib: u64,
) -> Result<(i32, u64), String> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    let mut peak = 0;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Ok((status.code().unwrap_or(-1), peak));
        }
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap_or_default();
        if let Some(kib) = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        {
            peak = peak.max(kib);
        }
        let why = if peak > max_kib {
            format!("its memory grew past {peak} KiB")
        } else if std::time::Instant::now() > deadline {
            format!("it did not end within {secs}s")
        } else {
            std::thread::sleep(std::time::Duration::from_millis(10));
            continue;
        };
        let _ = child.kill();
        let _ = child.wait();
        return Err(why);
    }
}

/// Pids of processes running exactly `argv` on this machine.
fn processes(argv: &[&str]) -> Vec<u32> {
    let wanted: Vec<u8> = argv
        .iter()
        .flat_map(|a| [a.as_bytes(), b"\0"].concat())
        .collect();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == wanted))
        .collect()
}

#[test]
fn key_sources_are_bounded_and_a_bad_one_is_refused_naming_the_key() {
    let secrets = tempfile::tempdir().unwrap();
    let fifo = secrets.path().join("pipe");
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let mut h = Harness::start(vec![HostSpec::new("kb")]);
    let background = ["sleep", "27183"];
    for (key, needle) in [
        // A FIFO would wait for a writer forever, holding the lease.
        (
            format!(r#"keyFile = "{}";"#, fifo.display()),
            "is a FIFO (named pipe), not a regular file",
        ),
        // A device never ends.
        (
            r#"keyFile = "/dev/zero";"#.to_string(),
            "is a character device",
        ),
        // 512 MiB: read no further than the limit.
        (
            r#"keyCommand = [ "head" "-c" "536870912" "/dev/zero" ];"#.to_string(),
            "keyCommand printed larger than 1048576 bytes",
        ),
        // What a key command starts is stopped with it.
        (
            r#"keyCommand = [ "sh" "-c" "sleep 27183 & head -c 2000000 /dev/zero" ];"#.to_string(),
            "keyCommand printed larger than 1048576 bytes",
        ),
    ] {
        h.fleet
            .update("kb", |s| {
                s.deployment_extra = Some(format!("keys.bad = {{ {key} }};"))
            })
            .unwrap();
        let child = h.spawn("bad", &["upload-keys", "kb"]);
        let (code, peak_kib) = wait_bounded(child, 90, 256 * 1024)
            .unwrap_or_else(|why| panic!("{key}: the upload was stopped: {why}"));
        let (report, stderr) = h.outputs("bad");
        assert_eq!(code, 1, "{key}: {report:#}\n{stderr}");
        assert_eq!(status(&report, "kb"), "failed", "{key}: {report:#}");
        let error = host(&report, "kb")["error"].as_str().unwrap();
        assert!(error.contains("kb: keys: bad:"), "{key}: {error}");
        assert!(error.contains(needle), "{key}: {error}");
        assert!(peak_kib < 128 * 1024, "{key}: peak RSS {peak_kib} KiB");
        let mut survivors = processes(&background);
        for _ in 0..100 {
            if survivors.is_empty() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
            survivors = processes(&background);
        }
        for pid in &survivors {
            // Ours (started by this key command): stop them before failing.
            let _ = std::process::Command::new("kill")
                .arg(pid.to_string())
                .status();
        }
        assert!(
            survivors.is_empty(),
            "{key}: the key command's child survived"
        );
    }
    // Nothing was written; the lease was released.
    assert!(!h.fleet.host_dir("kb").join("run/keys/bad").exists());
    let (_, status, _) = h.json(&["status"]);
    assert!(
        status["running_deployments"].as_array().unwrap().is_empty(),
        "{status:#}"
    );
}

/// A TCP proxy on loopback to `target` that cuts the connection (both ways)
/// once the client has sent `cut_after` bytes; returns its port and whether
/// it cut.
fn cutting_proxy(
    target: std::net::SocketAddr,
    cut_after: usize,
) -> (u16, std::sync::Arc<std::sync::atomic::AtomicBool>) {
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicBool, Ordering};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let cut = std::sync::Arc::new(AtomicBool::new(false));
    let flag = cut.clone();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let (Ok(mut client), Ok(mut server)) = (client, std::net::TcpStream::connect(target))
            else {
                continue;
            };
            let (mut client_back, mut server_back) =
                (client.try_clone().unwrap(), server.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut server_back, &mut client_back);
            });
            let flag = flag.clone();
            std::thread::spawn(move || {
                let mut sent = 0;
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    let n = match client.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n.min(cut_after - sent),
                    };
                    if server.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    sent += n;
                    if sent == cut_after {
                        flag.store(true, Ordering::SeqCst);
                        break;
                    }
                }
                let _ = client.shutdown(std::net::Shutdown::Both);
                let _ = server.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    (port, cut)
}

/// Bytes no other run has, `len` of them.
fn random_bytes(len: usize) -> Vec<u8> {
    use std::hash::{BuildHasher, Hasher};
    let state = std::collections::hash_map::RandomState::new();
    (0..len / 8 + 1)
        .flat_map(|i| {
            let mut hasher = state.build_hasher();
            hasher.write_usize(i);
            hasher.finish().to_le_bytes()
        })
        .take(len)
        .collect()
}

#[test]
fn an_upload_cut_off_mid_transfer_leaves_the_old_key_whole() {
    let secrets = tempfile::tempdir().unwrap();
    let file = secrets.path().join("big.key");
    let old = random_bytes(1024 * 1024);
    std::fs::write(&file, &old).unwrap();
    let h = Harness::start(vec![HostSpec::new("kc").deployment_extra(&format!(
        r#"keys.big = {{ keyFile = "{}"; }};"#,
        file.display()
    ))]);
    let (code, report, stderr) = h.json(&["upload-keys", "kc"]);
    assert_eq!(code, 0, "{report:#}\n{stderr}");
    let key = h.fleet.host_dir("kc").join("run/keys/big");
    assert_eq!(std::fs::read(&key).unwrap(), old);

    // A new key, through a connection that breaks a quarter of the way in.
    std::fs::write(&file, random_bytes(1024 * 1024)).unwrap();
    let address = h.fleet.address("kc");
    let (port, cut) = cutting_proxy(format!("{address}:22").parse().unwrap(), 256 * 1024);
    let config = h.state_dir().join("ssh_config_through_proxy");
    let text = std::fs::read_to_string(h.fleet.ssh_config()).unwrap();
    let through_proxy = text
        .replace(
            &format!("HostName {address}\n"),
            &format!("HostName 127.0.0.1\n  HostKeyAlias {address}\n"),
        )
        .replace("Port 22\n", &format!("Port {port}\n"));
    assert_ne!(text, through_proxy);
    std::fs::write(&config, through_proxy).unwrap();
    let (code, report, stderr) = h.json_with_ssh_config(&config, &["upload-keys", "kc"]);
    assert!(
        cut.load(std::sync::atomic::Ordering::SeqCst),
        "the proxy never cut: {report:#}\n{stderr}"
    );
    assert_eq!(code, 1, "{report:#}\n{stderr}");
    let kc = host(&report, "kc");
    assert_ne!(kc["status"], "succeeded", "{kc:#}");
    let error = kc["error"].as_str().unwrap();
    assert!(error.contains("kc") && error.contains("big"), "{error}");
    // Once the upload script on the host has seen the end of its input and
    // ended: the old key, whole, and nothing half-written beside it.
    h.until(30, "the upload script on the host to end", || {
        !h.fleet.host_processes("kc").iter().any(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.windows(14).any(|w| w == b"nix-deploy-key"))
        })
    });
    let now = std::fs::read(&key).unwrap();
    assert!(
        now == old,
        "the key was replaced: {} bytes now, {} before",
        now.len(),
        old.len()
    );
    let left: Vec<String> = std::fs::read_dir(key.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, ["big"]);
}

#[test]
fn keys_are_never_written_through_a_symlink_or_into_a_directory() {
    // Through sudo, as a non-root deploy user.
    let mut h = Harness::start(vec![HostSpec::new("ks").user("deploy")]);
    let run = h.fleet.host_dir("ks").join("run");
    // A service's directory whose `keys` is a link elsewhere, a link to a
    // directory, and a directory where a key should go.
    for dir in ["elsewhere", "svc", "keys/dirkey"] {
        std::fs::create_dir_all(run.join(dir)).unwrap();
    }
    std::os::unix::fs::symlink("/run/elsewhere", run.join("svc/keys")).unwrap();
    std::os::unix::fs::symlink("/run/elsewhere", run.join("svclink")).unwrap();
    for (key, needle) in [
        (
            r#"destDir = "/run/svc/keys";"#,
            "/run/svc/keys is a symlink",
        ),
        (
            r#"destDir = "/run/svclink/keys";"#,
            "/run/svclink is a symlink",
        ),
        (r#"name = "dirkey";"#, "/run/keys/dirkey: is a directory"),
    ] {
        h.fleet
            .update("ks", |s| {
                s.deployment_extra = Some(format!(r#"keys.k = {{ text = "s3cret"; {key} }};"#))
            })
            .unwrap();
        let (code, report, stderr) = h.json(&["upload-keys", "ks"]);
        assert_eq!(code, 1, "{key}: {report:#}\n{stderr}");
        let error = host(&report, "ks")["error"].as_str().unwrap();
        assert!(error.contains("ks: keys: k:"), "{key}: {error}");
        assert!(error.contains(needle), "{key}: {error}");
        assert_eq!(
            std::fs::read_dir(run.join("elsewhere")).unwrap().count(),
            0,
            "{key}: written through the link"
        );
        assert_eq!(
            std::fs::read_dir(run.join("keys/dirkey")).unwrap().count(),
            0
        );
        assert!(!run.join("keys/k").exists());
    }
    // A real directory, even a new one, is fine.
    h.fleet
        .update("ks", |s| {
            s.deployment_extra =
                Some(r#"keys.k = { text = "s3cret"; destDir = "/run/svc/real"; };"#.into())
        })
        .unwrap();
    let (code, report, stderr) = h.json(&["upload-keys", "ks"]);
    assert_eq!(code, 0, "{report:#}\n{stderr}");
    assert_eq!(
        std::fs::read_to_string(run.join("svc/real/k")).unwrap(),
        "s3cret"
    );
}
