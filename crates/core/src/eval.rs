//! Evaluating a fleet at scale, as pure decisions: which `nix eval` processes
//! to run (hosts split into bounded shards, evaluated by several workers at
//! once), what their output means, and what identifies a result in the
//! evaluation cache. The product's engine runs them (`engine::evaluate`).
//!
//! # The commands
//!
//! 1. `nix flake metadata --json FLAKE` and `nix --version`: the flake's
//!    locked identity ([`FlakeIdentity`]) and the Nix that evaluates it.
//! 2. [`fleet_command`]: which fleet sources the flake has, their host
//!    names and colmena's `meta` ([`crate::source::FLEET_EXPR`]), which
//!    forces no host.
//! 3. [`shard_command`] per shard: each of the shard's hosts read by its
//!    source's [`crate::source::host_expr`]: its metadata, and its system
//!    only if it is wanted (selected), so deploying k hosts evaluates k
//!    systems. Each host is wrapped in `builtins.tryEval`, so a host that
//!    `throw`s comes back as `null` instead of failing its shard; a shard
//!    that fails anyway (an error `tryEval` cannot catch) is split in halves
//!    and tried again, down to single hosts, whose own error is then Nix's
//!    message.
//!
//! # The cache key
//!
//! A host's result is determined by the flake's content and its locked
//! inputs, the expression, the Nix that evaluates it and the host's name. The
//! key ([`host_key`]) is the SHA-256 of exactly these: `locked` and `locks`
//! from `nix flake metadata` (the content hash — `narHash` — or the revision,
//! which covers every file of the flake including `flake.lock`; and the whole
//! input graph), the source and its host expression, whether the system
//! was read, `nix --version` and the host. Evaluation
//! then reads the flake through [`FlakeIdentity::pinned_ref`], a reference
//! Nix only resolves to that very content (or refuses), so a result stored
//! under a key was computed from what the key names.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::command::Cmd;

use crate::source::{self, FleetSource, nix_string};

/// Flags every `nix` invocation gets: flakes without touching the user's config.
const FEATURE_FLAGS: [&str; 2] = ["--extra-experimental-features", "nix-command flakes"];

/// Changes whenever what the cache stores or how shards compute it changes,
/// so results of an older nix-deploy are never read.
pub const CACHE_FORMAT: u32 = 3;

/// At most this many hosts in one `nix eval`, whatever the memory allows:
/// keeps the expression (it names every host) far below the kernel's limit
/// for one argument (128 KiB).
pub const MAX_SHARD_HOSTS: usize = 200;

/// Shards per worker when memory allows: a worker that finishes early takes
/// another shard instead of idling while the last one runs, results stream
/// to probing sooner, and smaller heaps collect faster.
pub const SHARDS_PER_WORKER: usize = 2;

/// Memory one host's evaluation may take when nothing was measured for this
/// flake yet. A real NixOS system costs 1–2.4 GB for the first host of a
/// process (nixpkgs included) and colmena budgets 512 MB a host; 1 GiB is
/// on the safe side of both. Once a run measured the fleet's own hosts, that
/// figure (with [`MEMORY_MARGIN_PERCENT`]) is used instead.
pub const DEFAULT_HOST_MEMORY_MIB: u64 = 1024;

/// Added to a measured per-host peak before it is used as a budget.
pub const MEMORY_MARGIN_PERCENT: u64 = 25;

/// Share of the available memory evaluation may plan to use.
pub const MEMORY_SHARE_PERCENT: u64 = 80;

/// `nix eval --json --expr '<fleet expression> (builtins.getFlake REF).outputs'`:
/// which sources the flake has, their host names and colmena's meta
/// ([`source::FLEET_EXPR`]). `pinned` says `REF` is locked (its content
/// identified): otherwise Nix reads it only with `--impure`.
pub fn fleet_command(flake: &str, pinned: bool) -> Cmd {
    let mut cmd = Cmd::new("nix").args(FEATURE_FLAGS).args(["eval", "--json"]);
    if !pinned {
        cmd = cmd.arg("--impure");
    }
    cmd.arg("--expr").arg(format!(
        "({}) (builtins.getFlake {}).outputs",
        source::FLEET_EXPR,
        nix_string(flake)
    ))
}

/// `nix --version`, part of every cache key.
pub fn version_command() -> Cmd {
    Cmd::new("nix").arg("--version")
}

/// `nix eval --json FLAKE#<output> --apply <shard expression>`: the hosts'
/// metadata, and the systems of those wanted ([`source::shard_expr`]).
pub fn shard_command(
    flake: &str,
    source: FleetSource,
    hosts: &[(String, bool)],
    catch: bool,
) -> Cmd {
    Cmd::new("nix")
        .args(FEATURE_FLAGS)
        .args(["eval", "--json"])
        .arg(format!("{flake}#{}", source.output()))
        .args(["--apply", &crate::source::shard_expr(source, hosts, catch)])
}

/// What one shard's `nix eval` printed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ShardOutput {
    /// Each evaluated host's entry (see [`HOST_EXPR`]), by name.
    pub hosts: BTreeMap<String, serde_json::Value>,
    /// Hosts whose evaluation threw (caught by `tryEval`): to be evaluated
    /// alone, for Nix's error message.
    pub caught: Vec<String>,
    /// Hosts asked for but absent from the output.
    pub missing: Vec<String>,
}

/// Read a shard's output; `requested` are the hosts it was asked for.
pub fn parse_shard_output(json: &str, requested: &[String]) -> Result<ShardOutput, String> {
    let raw: BTreeMap<String, serde_json::Value> =
        serde_json::from_str(json).map_err(|e| format!("not a JSON object of hosts: {e}"))?;
    let mut out = ShardOutput::default();
    for name in requested {
        match raw.get(name) {
            Some(serde_json::Value::Null) => out.caught.push(name.clone()),
            Some(value) => {
                out.hosts.insert(name.clone(), value.clone());
            }
            None => out.missing.push(name.clone()),
        }
    }
    Ok(out)
}

/// The first line of `nix --version`, e.g. `nix (Nix) 2.8.0`.
pub fn parse_version(text: &str) -> Result<String, String> {
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(str::to_string)
        .ok_or_else(|| "`nix --version` printed nothing".to_string())
}

/// What identifies a flake's content, from `nix flake metadata --json`.
#[derive(Clone, Debug, PartialEq)]
pub struct FlakeIdentity {
    /// `locked`: type, and `narHash` and/or `rev` (and `revCount`,
    /// `lastModified`, ...): the flake's own source.
    locked: serde_json::Value,
    /// `locks`: the whole locked input graph.
    locks: serde_json::Value,
    /// A reference that Nix resolves to exactly this content or refuses: the
    /// locked URL when it carries the revision or the content hash, otherwise
    /// (a dirty git tree) the store copy of the source with its hash.
    pub pinned_ref: String,
    /// The locked revision, when the source is a clean revision.
    pub revision: Option<String>,
}

#[derive(Deserialize)]
struct Metadata {
    locked: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    locks: serde_json::Value,
    url: Option<String>,
    path: Option<String>,
    revision: Option<String>,
}

/// The locked revision of a flake, if its metadata has one (a clean tree).
pub fn metadata_revision(metadata_json: &str) -> Option<String> {
    let meta: serde_json::Value = serde_json::from_str(metadata_json).ok()?;
    meta.get("revision")
        .or_else(|| meta.get("locked").and_then(|l| l.get("rev")))
        .and_then(|v| v.as_str())
        .map(str::to_string)
}

/// Where the flake's own `flake.lock` is: in the store copy of its source
/// (and its `dir`), so that it is exactly what Nix evaluates.
pub fn lock_file_path(metadata_json: &str) -> Option<String> {
    let meta: serde_json::Value = serde_json::from_str(metadata_json).ok()?;
    let path = meta.get("path")?.as_str()?;
    let dir = meta
        .get("locked")
        .and_then(|l| l.get("dir"))
        .and_then(|d| d.as_str())
        .filter(|d| !d.is_empty());
    Some(match dir {
        Some(dir) => format!("{path}/{dir}/flake.lock"),
        None => format!("{path}/flake.lock"),
    })
}

/// `%`-encoding of a query parameter value (what Nix itself does for `narHash`).
fn query_value(value: &str) -> String {
    let mut out = String::new();
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl FlakeIdentity {
    /// The identity of a flake from `nix flake metadata --json` and the
    /// `flake.lock` in its source (None: the source has none). An error says
    /// why results of this flake cannot be cached: no content identity, or a
    /// lock file that does not pin every input (each evaluation would lock
    /// the missing ones afresh, maybe differently).
    pub fn from_metadata(metadata_json: &str, lock_file: Option<&str>) -> Result<Self, String> {
        let meta: Metadata = serde_json::from_str(metadata_json)
            .map_err(|e| format!("unexpected `nix flake metadata` output: {e}"))?;
        let text = |key: &str| meta.locked.get(key).and_then(|v| v.as_str());
        let nar_hash = text("narHash");
        let rev = text("rev");
        let url = meta.url.as_deref().unwrap_or("");
        let pinned_ref = if rev.is_some() && !url.is_empty() {
            // Nix's locked URL always carries a locked revision.
            url.to_string()
        } else if url.contains("narHash=") {
            url.to_string()
        } else if let (Some(hash), Some(path)) = (nar_hash, meta.path.as_deref()) {
            // A dirty git tree: Nix 2.8 reads the working tree again for its
            // URL, whatever hash it carries, but not the store copy of it.
            if meta.locked.contains_key("dir") {
                return Err("a dirty flake in a subdirectory (`dir=`) cannot be pinned".into());
            }
            if !path.starts_with("/nix/store/") || path.contains(['?', '#']) {
                return Err(format!("unexpected source path `{path}`"));
            }
            let mut pinned = format!("path:{path}?");
            if let Some(modified) = meta.locked.get("lastModified").and_then(|v| v.as_u64()) {
                pinned.push_str(&format!("lastModified={modified}&"));
            }
            pinned.push_str(&format!("narHash={}", query_value(hash)));
            pinned
        } else {
            return Err(
                "the flake has no locked identity (neither a revision nor a content hash)".into(),
            );
        };
        let revision = meta.revision.clone().or_else(|| rev.map(str::to_string));
        if !locks_are_pinned(&meta.locks, lock_file)? {
            return Err(
                "flake.lock is missing or does not pin every input (run `nix flake lock`)".into(),
            );
        }
        Ok(FlakeIdentity {
            locked: serde_json::Value::Object(meta.locked),
            locks: meta.locks,
            pinned_ref,
            revision,
        })
    }

    fn key(&self, nix_version: &str, what: serde_json::Value) -> String {
        // serde_json's maps are sorted: the same document always serialises
        // to the same text.
        let document = serde_json::json!({
            "format": CACHE_FORMAT,
            "locked": self.locked,
            "locks": self.locks,
            "nix": nix_version,
            "what": what,
        });
        let digest = Sha256::digest(document.to_string().as_bytes());
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Whether the lock graph Nix computed is exactly the flake's own lock file
/// (or there is nothing to lock and no file).
fn locks_are_pinned(locks: &serde_json::Value, lock_file: Option<&str>) -> Result<bool, String> {
    match lock_file {
        Some(text) => {
            let file: serde_json::Value =
                serde_json::from_str(text).map_err(|e| format!("flake.lock is not JSON: {e}"))?;
            Ok(&file == locks)
        }
        None => {
            let root = locks
                .get("root")
                .and_then(|r| r.as_str())
                .and_then(|r| locks.get("nodes")?.get(r));
            Ok(root.is_some_and(|node| {
                node.get("inputs")
                    .and_then(|i| i.as_object())
                    .is_none_or(|i| i.is_empty())
            }))
        }
    }
}

/// The cache key of one host's result: its metadata alone, or its
/// metadata and its system (`system`).
pub fn host_key(
    identity: &FlakeIdentity,
    nix_version: &str,
    source: FleetSource,
    host: &str,
    system: bool,
) -> String {
    identity.key(
        nix_version,
        serde_json::json!({
            "expression": crate::source::host_expr(source),
            "source": source,
            "system": system,
            "host": host,
        }),
    )
}

/// The cache key of the fleet's index (sources, host names, meta).
pub fn fleet_key(identity: &FlakeIdentity, nix_version: &str) -> String {
    identity.key(
        nix_version,
        serde_json::json!({ "expression": source::FLEET_EXPR }),
    )
}

/// How many `nix eval` processes run at once by default: one per core, as
/// long as the available memory holds one host per worker.
pub fn default_workers(cores: usize, available_mib: u64, host_budget_mib: u64) -> usize {
    let usable = available_mib * MEMORY_SHARE_PERCENT / 100;
    let by_memory = usize::try_from(usable / host_budget_mib.max(1)).unwrap_or(usize::MAX);
    cores.min(by_memory).max(1)
}

/// Hosts per shard: enough shards for [`SHARDS_PER_WORKER`] each, never more
/// hosts than a worker's share of the available memory holds, never more
/// than [`MAX_SHARD_HOSTS`].
pub fn hosts_per_shard(
    hosts: usize,
    workers: usize,
    available_mib: u64,
    host_budget_mib: u64,
) -> usize {
    let workers = workers.max(1);
    let per_worker = worker_share_mib(available_mib, workers);
    let by_memory = usize::try_from(per_worker / host_budget_mib.max(1)).unwrap_or(usize::MAX);
    hosts
        .div_ceil(workers * SHARDS_PER_WORKER)
        .min(by_memory)
        .clamp(1, MAX_SHARD_HOSTS)
}

/// `hosts` in consecutive shards of at most `size`, as even as possible.
pub fn split_into_shards(hosts: &[String], size: usize) -> Vec<Vec<String>> {
    if hosts.is_empty() {
        return Vec::new();
    }
    let count = hosts.len().div_ceil(size.max(1));
    let (base, extra) = (hosts.len() / count, hosts.len() % count);
    let mut shards = Vec::with_capacity(count);
    let mut start = 0;
    for i in 0..count {
        let len = base + usize::from(i < extra);
        shards.push(hosts[start..start + len].to_vec());
        start += len;
    }
    shards
}

/// A host's memory budget from a measured shard: its peak divided by its
/// hosts, plus the margin.
pub fn host_budget_from_peak(peak_kib: u64, hosts: usize) -> u64 {
    let per_host_kib = peak_kib / hosts.max(1) as u64;
    (per_host_kib * (100 + MEMORY_MARGIN_PERCENT) / 100)
        .div_ceil(1024)
        .max(1)
}

/// Nix's own initial heap (Nix 2.8 sets a quarter of the RAM, at most 384 MiB).
pub const NIX_DEFAULT_HEAP_MIB: u64 = 384;

/// The initial heap (`GC_INITIAL_HEAP_SIZE`, bytes) for a shard of `hosts`
/// when one host was measured at `host_kib`: the heap the shard will need
/// anyway, so that the collector does not run again and again while the heap
/// grows to it (it spends a third of a large evaluation's time there), yet no
/// more than was measured and never more than a worker's share of memory.
/// None when Nix's default is as large, or nothing was measured.
pub fn gc_initial_heap_bytes(
    hosts: usize,
    host_kib: Option<u64>,
    worker_share_mib: u64,
) -> Option<u64> {
    let want_mib = (host_kib? * hosts as u64 / 1024).min(worker_share_mib);
    (want_mib > NIX_DEFAULT_HEAP_MIB).then_some(want_mib * 1024 * 1024)
}

/// A worker's share of the memory evaluation may use, in MiB.
pub fn worker_share_mib(available_mib: u64, workers: usize) -> u64 {
    available_mib * MEMORY_SHARE_PERCENT / 100 / workers.max(1) as u64
}

/// A host whose evaluation failed, with Nix's error.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvalFailure {
    pub host: String,
    pub error: String,
}

/// How the fleet was evaluated (in `plan --json` as `evaluation`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EvaluationReport {
    /// Hosts in the flake.
    pub hosts: usize,
    /// Hosts whose result came from the evaluation cache.
    pub cached: usize,
    /// Hosts evaluated by this run (successfully or not), for their
    /// metadata or with their system.
    pub evaluated: usize,
    /// Hosts whose system (toplevel) was wanted: the selected ones.
    #[serde(default)]
    pub systems: usize,
    /// Of those, the ones this run evaluated (the others came from the cache).
    #[serde(default)]
    pub systems_evaluated: usize,
    /// Where the fleet was read from.
    #[serde(default)]
    pub source: Option<crate::source::FleetSource>,
    /// `nix eval` processes run for hosts (retries of failed shards included).
    pub shards: usize,
    /// `nix eval` processes at most at once.
    pub workers: usize,
    /// Hosts per shard, at most.
    pub hosts_per_shard: usize,
    /// Memory budget of one host's evaluation, and where it comes from.
    pub host_budget_mib: u64,
    pub host_budget_source: String,
    /// Largest peak memory of one `nix eval` process, when measured.
    pub peak_shard_mib: Option<f64>,
    /// The initial heap given to shards (from the measured per-host memory).
    #[serde(default)]
    pub gc_initial_heap_mib: Option<u64>,
    /// Whether the cache was read: `used`, `bypassed` (`--no-eval-cache`), or
    /// why it could not be (`unavailable: ...`).
    pub cache: String,
    /// Wall time of the whole evaluation.
    pub seconds: f64,
    /// Hosts that could not be evaluated, with Nix's error.
    pub failed: Vec<EvalFailure>,
}

impl EvaluationReport {
    /// One line for people.
    pub fn describe(&self) -> String {
        let mut text = format!("{} host(s)", self.hosts);
        if self.cached > 0 {
            text.push_str(&format!(", {} from the cache", self.cached));
        }
        if self.evaluated > 0 {
            text.push_str(&format!(
                ", {} evaluated ({} with their system) in {} shard(s) by up to {} worker(s)",
                self.evaluated, self.systems_evaluated, self.shards, self.workers
            ));
        }
        text.push_str(&format!(" in {:.1}s", self.seconds));
        if !self.failed.is_empty() {
            text.push_str(&format!(", {} failed", self.failed.len()));
        }
        if self.cache != "used" {
            text.push_str(&format!(" (cache {})", self.cache));
        }
        text
    }

    pub fn failed_hosts(&self) -> BTreeSet<String> {
        self.failed.iter().map(|f| f.host.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(cmd: &Cmd) -> Vec<String> {
        std::iter::once(cmd.program().to_string())
            .chain(cmd.get_args().map(|a| a.to_string_lossy().into_owned()))
            .collect()
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn shard_commands_name_their_hosts_quoted_and_need_nothing_newer_than_2_8() {
        let cmd = shard_command(
            "path:/srv/f?narHash=x",
            FleetSource::Nixos,
            &[("web1".into(), true), ("we\"b${x}".into(), false)],
            true,
        );
        let args = argv(&cmd);
        assert_eq!(
            args[..6],
            [
                "nix",
                "--extra-experimental-features",
                "nix-command flakes",
                "eval",
                "--json",
                "path:/srv/f?narHash=x#nixosConfigurations"
            ]
        );
        assert_eq!(args[6], "--apply");
        let expr = &args[7];
        assert!(
            expr.contains(r#"wanted = { "web1" = true; "we\"b\${x}" = false; };"#),
            "{expr}"
        );
        assert!(!args.iter().any(|a| a == "--print-out-paths"));
        let colmena = shard_command(".", FleetSource::Colmena, &[], false);
        assert_eq!(argv(&colmena)[5], ".#colmenaHive");
        assert_eq!(
            argv(&shard_command(".", FleetSource::DeployRs, &[], false))[5],
            ".#deploy"
        );
        // The fleet's index reads the flake pinned, or impurely when it cannot be.
        let pinned = argv(&fleet_command("path:/nix/store/x-source?narHash=y", true));
        assert_eq!(pinned[3..6], ["eval", "--json", "--expr"]);
        assert!(
            pinned[6]
                .ends_with(r#"(builtins.getFlake "path:/nix/store/x-source?narHash=y").outputs"#),
            "{}",
            pinned[6]
        );
        assert!(argv(&fleet_command(".", false)).contains(&"--impure".to_string()));
    }

    #[test]
    fn shard_output_separates_results_thrown_and_missing_hosts() {
        let json = r#"{"a":{"toplevel":"/nix/store/x"},"b":null}"#;
        let out = parse_shard_output(json, &names(&["a", "b", "c"])).unwrap();
        assert_eq!(out.hosts.len(), 1);
        assert_eq!(out.hosts["a"]["toplevel"], "/nix/store/x");
        assert_eq!(out.caught, ["b"]);
        assert_eq!(out.missing, ["c"]);
        assert!(parse_shard_output("[]", &[]).is_err());
        assert_eq!(
            parse_version("nix (Nix) 2.8.0\n").unwrap(),
            "nix (Nix) 2.8.0"
        );
    }

    const NO_INPUTS: &str = r#"{"nodes":{"root":{}},"root":"root","version":7}"#;

    fn path_metadata(hash: &str, locks: &str) -> String {
        format!(
            r#"{{"lastModified":1700000000,
                "locked":{{"lastModified":1700000000,"narHash":"{hash}","path":"/srv/fleet","type":"path"}},
                "locks":{locks},
                "path":"/nix/store/1yb1v5ahxjfk3yzw72jwl23mw8kkms3c-source",
                "url":"path:/srv/fleet?lastModified=1700000000&narHash={hash}"}}"#
        )
    }

    #[test]
    fn a_path_flake_is_pinned_by_its_locked_url() {
        let id = FlakeIdentity::from_metadata(&path_metadata("sha256-A", NO_INPUTS), None).unwrap();
        assert_eq!(
            id.pinned_ref,
            "path:/srv/fleet?lastModified=1700000000&narHash=sha256-A"
        );
        assert_eq!(id.revision, None);
    }

    #[test]
    fn a_clean_git_flake_is_pinned_by_its_revision() {
        let meta = r#"{"locked":{"lastModified":1,"narHash":"sha256-B","ref":"main","rev":"2fecf06f","revCount":1,"type":"git","url":"file:///repo"},
            "locks":{"nodes":{"root":{}},"root":"root","version":7},
            "path":"/nix/store/wjsv7s3lwirfvaw35mrxkrzvsm2avqc0-source",
            "revision":"2fecf06f",
            "url":"git+file:///repo?ref=main&rev=2fecf06f"}"#;
        let id = FlakeIdentity::from_metadata(meta, None).unwrap();
        assert_eq!(id.pinned_ref, "git+file:///repo?ref=main&rev=2fecf06f");
        assert_eq!(id.revision.as_deref(), Some("2fecf06f"));
        assert_eq!(metadata_revision(meta).as_deref(), Some("2fecf06f"));
    }

    #[test]
    fn a_dirty_git_tree_is_pinned_by_its_store_copy_and_hash() {
        let meta = r#"{"locked":{"lastModified":1795658196,"narHash":"sha256-y5x+Y/L=","type":"git","url":"file:///repo"},
            "locks":{"nodes":{"root":{}},"root":"root","version":7},
            "path":"/nix/store/hdyzxyi9yprqj9fjwlnbiz5gsgqfqhvb-source",
            "url":"git+file:///repo"}"#;
        let id = FlakeIdentity::from_metadata(meta, None).unwrap();
        assert_eq!(
            id.pinned_ref,
            "path:/nix/store/hdyzxyi9yprqj9fjwlnbiz5gsgqfqhvb-source?lastModified=1795658196&narHash=sha256-y5x%2BY%2FL%3D"
        );
        assert_eq!(id.revision, None);
        assert_eq!(
            lock_file_path(meta).as_deref(),
            Some("/nix/store/hdyzxyi9yprqj9fjwlnbiz5gsgqfqhvb-source/flake.lock")
        );
        // In a subdirectory: Nix 2.8 cannot read a store path with `dir`.
        let sub = meta.replace(r#""type":"git""#, r#""dir":"sub","type":"git""#);
        assert!(FlakeIdentity::from_metadata(&sub, None).is_err());
        assert_eq!(
            lock_file_path(&sub).as_deref(),
            Some("/nix/store/hdyzxyi9yprqj9fjwlnbiz5gsgqfqhvb-source/sub/flake.lock")
        );
    }

    #[test]
    fn flakes_without_identity_or_with_unpinned_inputs_are_not_cached() {
        let meta =
            r#"{"locked":{"type":"git","url":"file:///repo"},"locks":{},"url":"git+file:///repo"}"#;
        assert!(
            FlakeIdentity::from_metadata(meta, None)
                .unwrap_err()
                .contains("no locked identity")
        );

        let locks = r#"{"nodes":{"nixpkgs":{"locked":{"narHash":"sha256-L","path":"/lib","type":"path"},"original":{"path":"/lib","type":"path"}},"root":{"inputs":{"nixpkgs":"nixpkgs"}}},"root":"root","version":7}"#;
        let meta = path_metadata("sha256-A", locks);
        // The lock file in the source is the lock graph: pinned.
        assert!(FlakeIdentity::from_metadata(&meta, Some(locks)).is_ok());
        // No lock file, or an outdated one: every evaluation would lock afresh.
        let err = FlakeIdentity::from_metadata(&meta, None).unwrap_err();
        assert!(err.contains("flake.lock"), "{err}");
        assert!(FlakeIdentity::from_metadata(&meta, Some(NO_INPUTS)).is_err());
        assert!(FlakeIdentity::from_metadata("nope", None).is_err());
    }

    #[test]
    fn keys_change_with_everything_that_determines_a_result_and_nothing_else() {
        let id = |hash: &str, locks: &str| {
            let lock_file = (locks != NO_INPUTS).then_some(locks);
            FlakeIdentity::from_metadata(&path_metadata(hash, locks), lock_file).unwrap()
        };
        let base = id("sha256-A", NO_INPUTS);
        let key = host_key(&base, "nix (Nix) 2.8.0", FleetSource::Nixos, "web1", true);
        assert_eq!(key.len(), 64);
        // Deterministic.
        assert_eq!(
            key,
            host_key(
                &id("sha256-A", NO_INPUTS),
                "nix (Nix) 2.8.0",
                FleetSource::Nixos,
                "web1",
                true
            )
        );
        // The flake's content, another host, another Nix, the lock graph.
        let locks = r#"{"nodes":{"i":{"locked":{"narHash":"sha256-I","type":"path","path":"/i"}},"root":{"inputs":{"i":"i"}}},"root":"root","version":7}"#;
        let others = [
            host_key(
                &id("sha256-B", NO_INPUTS),
                "nix (Nix) 2.8.0",
                FleetSource::Nixos,
                "web1",
                true,
            ),
            host_key(&base, "nix (Nix) 2.8.0", FleetSource::Nixos, "web2", true),
            host_key(&base, "nix (Nix) 2.18.1", FleetSource::Nixos, "web1", true),
            host_key(
                &id("sha256-A", locks),
                "nix (Nix) 2.8.0",
                FleetSource::Nixos,
                "web1",
                true,
            ),
            host_key(&base, "nix (Nix) 2.8.0", FleetSource::Nixos, "web1", false),
            host_key(&base, "nix (Nix) 2.8.0", FleetSource::Colmena, "web1", true),
            fleet_key(&base, "nix (Nix) 2.8.0"),
        ];
        let distinct: BTreeSet<&String> = others.iter().chain([&key]).collect();
        assert_eq!(distinct.len(), others.len() + 1);
    }

    #[test]
    fn workers_follow_cores_and_memory() {
        // Memory for plenty: one per core.
        assert_eq!(default_workers(2, 22_000, 1024), 2);
        assert_eq!(default_workers(16, 64_000, 512), 16);
        // 4 GiB and 1.5 GiB hosts: two fit.
        assert_eq!(default_workers(8, 4096, 1536), 2);
        // Never none.
        assert_eq!(default_workers(4, 100, 1024), 1);
        assert_eq!(default_workers(0, 100_000, 1), 1);
    }

    #[test]
    fn shards_are_bounded_by_memory_and_balanced_over_workers() {
        // 48 hosts, 2 workers, memory for plenty: 4 shards of 12.
        assert_eq!(hosts_per_shard(48, 2, 22_000, 50), 12);
        // 1 GiB hosts: a worker's share (8.8 GB) holds 8.
        assert_eq!(hosts_per_shard(48, 2, 22_000, 1024), 8);
        // Never zero, never more than the cap.
        assert_eq!(hosts_per_shard(48, 2, 100, 1024), 1);
        assert_eq!(hosts_per_shard(100_000, 1, 1_000_000, 1), MAX_SHARD_HOSTS);
        assert_eq!(hosts_per_shard(0, 0, 0, 0), 1);

        let hosts: Vec<String> = (0..10).map(|i| format!("h{i}")).collect();
        let shards = split_into_shards(&hosts, 4);
        assert_eq!(shards.iter().map(Vec::len).collect::<Vec<_>>(), [4, 3, 3]);
        assert_eq!(shards.concat(), hosts);
        assert_eq!(split_into_shards(&hosts, 100).len(), 1);
        assert_eq!(split_into_shards(&hosts, 1).len(), 10);
        assert!(split_into_shards(&[], 3).is_empty());
    }

    #[test]
    fn shards_start_with_the_heap_they_were_measured_to_need() {
        // 12 hosts of 40 MiB: 480 MiB, more than Nix's default.
        assert_eq!(
            gc_initial_heap_bytes(12, Some(40 * 1024), 8000),
            Some(480 * 1024 * 1024)
        );
        // Never more than a worker's share; nothing when Nix's default is as large.
        assert_eq!(
            gc_initial_heap_bytes(12, Some(40 * 1024), 400),
            Some(400 * 1024 * 1024)
        );
        assert_eq!(gc_initial_heap_bytes(4, Some(40 * 1024), 8000), None);
        assert_eq!(gc_initial_heap_bytes(12, None, 8000), None);
        assert_eq!(worker_share_mib(10_000, 2), 4000);
        assert_eq!(worker_share_mib(10_000, 0), 8000);
    }

    #[test]
    fn a_measured_peak_becomes_a_budget_with_margin() {
        // 12 hosts peaking at 480 MiB: 40 MiB a host, 50 with the margin.
        assert_eq!(host_budget_from_peak(480 * 1024, 12), 50);
        assert_eq!(host_budget_from_peak(0, 0), 1);
    }

    #[test]
    fn the_report_describes_itself() {
        let report = EvaluationReport {
            hosts: 48,
            cached: 40,
            evaluated: 8,
            shards: 2,
            workers: 2,
            seconds: 1.23,
            cache: "used".into(),
            ..EvaluationReport::default()
        };
        assert_eq!(
            report.describe(),
            "48 host(s), 40 from the cache, 8 evaluated (0 with their system) in 2 shard(s) by up to 2 worker(s) in 1.2s"
        );
    }
}
