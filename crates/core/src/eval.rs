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
mod tests;
