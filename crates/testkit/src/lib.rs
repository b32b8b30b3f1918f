//! Real, disposable "NixOS" test hosts on this machine, for integration tests,
//! the demo and benchmarks.
//!
//! ```ignore
//! use nix_deploy_testkit::{Fleet, HostSpec};
//!
//! let mut fleet = Fleet::start(vec![
//!     HostSpec::new("db").role("database").service("postgresql"),
//!     HostSpec::new("web").depends_on(&["db"]).service("nginx"),
//! ])?;
//! // Point the coordinator at fleet.flake_ref(), with fleet.env() and
//! // `ssh -F fleet.ssh_config()`; then look at what it did:
//! assert_eq!(fleet.generation("web"), Some(1));
//! fleet.update("web", |s| s.bump())?; // a new toplevel for web
//! ```
//!
//! # How a host works
//!
//! A [`Fleet`] starts one OpenSSH server per host. Each runs in its own
//! **mount namespace** in which the host's private directories `H/nix`,
//! `H/run` and `H/root` are bind-mounted over `/nix`, `/run` and `/root`:
//!
//! ```text
//! setsid unshare --mount --propagation private sh -c \
//!   'mount --bind H/nix /nix && mount --bind H/run /run && mount --bind H/root /root &&
//!    mkdir -p /run/sshd && echo $$ > /run/testkit-sshd.pid &&
//!    exec /usr/sbin/sshd -D -e -f H/sshd_config'
//! ```
//!
//! Every process reached over ssh thus sees the host's own, initially empty,
//! Nix store: `nix copy --to ssh://HOST` really copies closures into it,
//! `nix-env -p /nix/var/nix/profiles/system --set` creates real generations
//! (`H/nix/var/nix/profiles/system-N-link`) and activation sets
//! `H/run/current-system`, as on a NixOS machine. The private `/root` keeps
//! the build machine's `/root/.bashrc` from slowing down or changing commands
//! run over ssh. Sessions get `PATH=/run/current-system/sw/bin:...:/usr/bin:/bin`,
//! so the activated system's `systemctl` comes first and `nix-store` / `nix-env`
//! are the machine's, and `NIX_USER_CONF_FILES=H/nix.conf`: no substituters
//! (so that nothing on a host waits for a binary cache it cannot reach)
//! unless [`HostSpec::substituters`] names some, no build users and no
//! sandbox, so a host can build its own system (`buildOnTarget`) (the
//! experimental `nix` command is off there, as on a default NixOS). The coordinator itself keeps the machine's real `/nix`,
//! with [`nix_config`] (flakes on, no sandbox, no substituters: no network;
//! and no build users, which Debian's single-user `nix-bin` does not have).
//! `unshare` and `sh` exec, so the spawned pid *is* the listening sshd, and
//! `setsid` makes it the leader of a session and process group of its own.
//!
//! # Addresses
//!
//! Hosts listen on port 22 of their own **loopback** address `127.A.B.x`, one
//! random block `127.A.B.0/24` (A in 100..=199) per fleet, so that fleets of
//! tests running in parallel processes do not collide: an address is only
//! taken if it can be bound first, a host only counts as up once the SSH
//! banner on its address carries the host's own `VersionAddendum`, and a host
//! whose sshd finds its address taken moves to another one of the block.
//! No other addresses are ever used.
//!
//! # Files
//!
//! `FLEET` is a fresh `/tmp/ndfleet-XXXXXX` (short, for ssh control socket
//! paths), removed when the fleet stops:
//!
//! - `FLEET/ssh_config`: `Host NAME` entries with the address, user root, the
//!   client key `FLEET/id`, `FLEET/known_hosts` (pre-filled with the host
//!   keys), `BatchMode yes` and `ConnectTimeout 5`. Use it with `ssh -F`, and
//!   with `NIX_SSHOPTS="-F FLEET/ssh_config"` for nix ([`Fleet::env`]).
//! - `FLEET/flake/flake.nix`: a flake without inputs (no nixpkgs) with one
//!   `nixosConfigurations.NAME` per host, with `config.deployment` (the
//!   [`HostSpec`]'s metadata) and `config.system.build.toplevel`, a `/bin/sh`
//!   derivation that builds in milliseconds. The toplevel changes when the
//!   spec's version or behaviour fields change, not when its metadata does.
//!   Its scripts are files beside `flake.nix`, for easy reading.
//!   [`Fleet::use_nixos`] replaces it with a NixOS-shaped flake whose hosts
//!   evaluate nixpkgs' module system ([`nixos`]).
//! - `FLEET/hosts/NAME/`: `nix/`, `run/`, `root/`, `sshd_config`, `hostkey`,
//!   `sshd.log` (the sshd's output, appended across restarts).
//!
//! A toplevel contains `nixos-version`, `testkit-packages` (fake package
//! names), `sw/bin/systemctl` (`is-active`, `is-failed`, `--version`) and
//! `bin/switch-to-configuration switch|boot|test|dry-activate`, which writes to
//! the host's `/run`:
//!
//! - `activations.log`: `TIME start ACTION PATH` and `TIME end ACTION PATH CODE`
//!   lines (TIME is Unix time with fractions), see [`Fleet::activations`];
//! - `current-system` (switch and test), pointing at the toplevel;
//! - `units/UNIT`: `active` or `failed` per [`HostSpec::units`] (switch, test);
//! - `boot.log`: `boot PATH` lines (boot).
//!
//! and appends to the host's activation history on its disk,
//! `/nix/var/log/testkit/activations.log` (kept across reboots, with the
//! activation's pid and who ran it: `deployer`, or `boot` for the
//! activation of a reboot), see [`Fleet::activation_history`].
//!
//! The toplevel also has `kernel` and `initrd` links into its `linux-<kernel>`
//! package, as a NixOS toplevel does (a new [`HostSpec::kernel`] changes
//! them: a reboot is required), and its `systemctl reboot` asks the fleet to
//! reboot the host (below).
//!
//! It sleeps [`HostSpec::activation_delay_ms`], kills the listening sshd for
//! [`HostSpec::kill_sshd`] and, for [`HostSpec::fail_switch`], prints
//! `error: the following units failed: ...` and exits 4 (after having switched
//! `current-system`, as NixOS does). `/run/testkit-host` holds the host name.
//!
//! # Reboots
//!
//! Each host has its own machine id (`H/machine-id`, bind-mounted over
//! `/etc/machine-id`) and boot id (`H/boot_id`, bind-mounted over
//! `/proc/sys/kernel/random/boot_id`). [`Fleet::reboot_host`] reboots a host
//! for real: all its processes stopped, its `/run` emptied (but for the
//! testkit's logs), a new boot id, its boot generation activated
//! (`/run/booted-system`, `/run/current-system`, its units; recorded in
//! `reboots.log`, see [`Fleet::reboots`]) and its sshd started again. A
//! host's `systemctl reboot` only asks for it; a test that lets the
//! coordinator reboot hosts calls [`Fleet::serve_reboots`] while it runs.
//!
//! # Processes and cleaning up
//!
//! A host is every process in its mount namespace: the listening sshd, the
//! per-connection sshd processes (which put themselves in sessions of their
//! own, rename themselves, and chroot before authentication) and whatever
//! runs over ssh. They are found by scanning `/proc/*/mountinfo` for the
//! host's bind mounts and `/proc/*/cmdline` for its `sshd_config`, plus their
//! descendants; that is how [`Fleet::stop_host`], [`Fleet::freeze_host`] and
//! [`Fleet::stop`] reach all of them. Dropping a fleet stops it, also when a
//! test panics. For a test process that dies without unwinding (SIGKILL,
//! Ctrl-C, abort, `process::exit`), each fleet has a reaper: a shell in a
//! session of its own that reads a pipe held open by the test process, and on
//! end of file without a `stop` line kills the fleet's processes and removes
//! its directory.
//!
//! Requires root, `nix`, `/usr/sbin/sshd`, `ssh`, `ssh-keygen`, `setsid`,
//! `unshare` and `mount`.
//!
//! # A browser
//!
//! [`Chromedriver`] runs Debian's `chromedriver` on a free loopback port with
//! a fresh profile, for the web dashboard's tests and benchmark; it is
//! stopped, with the headless Chromium it started, by its process group.

// The test fleet and the programs that drive the real binary spawn processes
// themselves; the product does it only in `nix_deploy::process`.
#![allow(clippy::disallowed_methods)]

use std::time::Duration;

pub mod browser;
mod flake;
mod fleet;
pub mod nixos;
pub mod postgres;
mod reboot;
mod sources;
mod spec;
mod sshd;
mod sys;

pub use browser::Chromedriver;
pub use flake::nix_string;
pub use fleet::Fleet;
pub use nixos::{NixosFlake, NixosShape};
pub use postgres::{PgDatabase, Postgres};
pub use sources::Layout;
pub use spec::{Activation, HistoryEntry, HostSpec, UnitState};
pub use sys::wait_with_peak_rss;
use sys::*;

/// The sshd binary every host runs.
pub(crate) const SSHD: &str = "/usr/sbin/sshd";
/// Port every host listens on (each host has an address of its own).
pub(crate) const SSH_PORT: u16 = 22;
/// How long a host may take to accept connections after being started.
pub(crate) const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Interval of all polling loops.
pub(crate) const POLL: Duration = Duration::from_millis(20);
/// Timeout of [`Fleet::ssh`].
pub(crate) const SSH_TIMEOUT: Duration = Duration::from_secs(30);
/// Timeout of evaluations and builds run by the testkit itself.
pub(crate) const NIX_TIMEOUT: Duration = Duration::from_secs(300);
/// How long stopping waits after SIGTERM before sending SIGKILL.
pub(crate) const TERM_GRACE: Duration = Duration::from_secs(2);
/// Attempts to start a host on a fresh address when its address was taken.
pub(crate) const BIND_ATTEMPTS: u32 = 8;
/// Version of the fake systemd, as printed by `systemctl --version`.
pub(crate) const SYSTEMD_VERSION: &str = "systemd 252 (testkit)";

/// The `NIX_CONFIG` the coordinator's own nix needs to evaluate, build and copy
/// the test flake on this machine: flakes on, no sandbox, no substituters, and
/// builds as the calling user (`build-users-group =`: Debian's single-user
/// `nix-bin` defaults to a `nixbld` group that does not exist). Set only for
/// our own invocations, so the machine's Nix configuration stays as it is.
pub fn nix_config() -> &'static str {
    "experimental-features = nix-command flakes\nsandbox = false\nsubstituters =\nbuild-users-group ="
}

/// The Nix system double of this machine, e.g. `x86_64-linux`.
pub fn nix_system() -> String {
    format!("{}-linux", std::env::consts::ARCH)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::parse_activations;

    #[test]
    fn nix_string_escapes() {
        assert_eq!(nix_string("a\"b\\c${d}\n"), r#""a\"b\\c\${d}\n""#);
    }

    #[test]
    fn activations_parse() {
        let log = "1.5 start switch /nix/store/a\n2.5 end switch /nix/store/a 0\n\
                   3 start test /nix/store/b\n";
        let acts = parse_activations(log);
        assert_eq!(acts.len(), 2);
        assert_eq!(acts[0].end, Some(2.5));
        assert_eq!(acts[0].exit_code, Some(0));
        assert_eq!(acts[1].action, "test");
        assert_eq!(acts[1].end, None);
    }

    #[test]
    fn history_parses_by_pid() {
        let log = "1 start switch /nix/store/a 10 deployer\n\
                   2 start test /nix/store/a 11 boot\n\
                   3 end switch /nix/store/a 0 10 deployer\n";
        let entries = crate::spec::parse_history(log);
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].activation.end, Some(3.0));
        assert_eq!(entries[0].activation.exit_code, Some(0));
        assert_eq!(entries[1].activation.end, None);
        assert_eq!((entries[1].pid, entries[1].by.as_str()), (11, "boot"));
    }

    #[test]
    fn fleet_can_be_shared_between_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Fleet>();
        assert_send_sync::<HostSpec>();
    }

    #[test]
    fn names_are_validated() {
        assert!(validate_name("web-1_a").is_ok());
        assert!(validate_name("-x").is_err());
        assert!(validate_name("a b").is_err());
        assert!(validate_name("").is_err());
    }
}
