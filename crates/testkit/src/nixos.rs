//! NixOS-shaped test flakes: hosts that evaluate the way NixOS systems do,
//! on nixpkgs' own `lib`.
//!
//! Each host is `lib.evalModules` of nixpkgs' module system over
//! [`NixosShape::option_modules`] option modules (each a service with
//! `enable`, `package`, `port`, `settings`, ... that, when enabled, defines a
//! systemd unit, an `/etc` file, a package and a firewall port, as NixOS
//! service modules do), the project's own `nix/module.nix` (the
//! `deployment.*` options, for real) and a core module declaring the few
//! NixOS options those touch. Each host instantiates its own package set
//! ([`NixosShape::packages`] derivations over a bootstrap chain, as
//! `nixosSystem` instantiates nixpkgs per host) and enables
//! [`NixosShape::services_per_host`] services. The toplevel is the testkit's
//! deployable system (`bin/switch-to-configuration` and friends, as in the
//! plain test flake) whose derivation depends on the units, `/etc`, the
//! packages and nixpkgs' release: evaluating it forces the whole
//! configuration.
//!
//! Layout, below a root directory `R`:
//!
//! - `R/nixpkgs-lib/`: nixpkgs' lib (MIT), unpacked from
//!   `fixtures/nixpkgs-lib.tar.xz` in this crate (or `$NIX_DEPLOY_NIXPKGS_LIB`);
//!   the flake's only input, `nixpkgs`, locked in `flake.lock`.
//! - `R/flake/flake.nix`: `nixosConfigurations.NAME = nixosSystem { ... }`.
//! - `R/flake/shared.nix`: a module every host imports ([`NixosShape::shared_module`]).
//! - `R/flake/machines/NAME.nix`: one host's module: its services, version,
//!   `deployment` (only what differs from the module's defaults) and
//!   [`NixosShape::host_modules`].
//! - `R/flake/nixos/`: `eval-config.nix`, `pkgs.nix`, `core.nix`,
//!   `nix-deploy.nix` (the project's module), `modules/mNNNN.nix`.
//! - `R/flake/builder.sh`, `systemctl.sh`, `hosts/NAME/switch-to-configuration.sh`:
//!   as in the plain test flake.
//!
//! A [`crate::Fleet`] uses this flake after [`crate::Fleet::use_nixos`]; [`NixosFlake`]
//! writes one without hosts running (for benchmarks of evaluation alone).

mod modules;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::flake::{BUILDER, nix_list, nix_string, switch_script, systemctl_script};
use crate::sources::{self, Layout};
use crate::spec::HostSpec;
use crate::sys::{checked_stdout, run_with_timeout, write_atomic};
use crate::{NIX_TIMEOUT, nix_config};
use modules::{EVAL_CONFIG, core_nix, pkgs_nix, service_module};

/// The project's NixOS module, evaluated for real by every host.
const NIX_DEPLOY_MODULE: &str = include_str!("../../../nix/module.nix");
const GRAFANA_DASHBOARD: &str = include_str!("../../../nix/grafana/nix-deploy.json");

/// What each host of a NixOS-shaped flake costs to evaluate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NixosShape {
    /// Option modules every host imports (NixOS has about 1,800).
    pub option_modules: usize,
    /// Derivations in each host's own package set.
    pub packages: usize,
    /// Services each host enables (at most `option_modules`).
    pub services_per_host: usize,
    /// The module every host imports (`shared.nix`), a Nix module expression.
    pub shared_module: String,
    /// Extra module expressions by host name, imported by that host only
    /// (e.g. to make its evaluation fail, or slow).
    pub host_modules: BTreeMap<String, String>,
    /// How the fleet is written: `nixosConfigurations`, a colmena hive or
    /// deploy-rs nodes ([`crate::sources`]).
    pub layout: Layout,
    /// The fleet-wide settings of a colmena hive (`meta`) or of deploy-rs
    /// (the top level of `deploy`): a Nix attribute set.
    pub fleet_settings: String,
}

impl Default for NixosShape {
    /// 1,000 option modules, 5,000 packages, 60 services a host: about
    /// 0.2–0.4 s and 40 MB per host in one `nix eval` on these machines.
    fn default() -> Self {
        NixosShape {
            option_modules: 1000,
            packages: 5000,
            services_per_host: 60,
            shared_module: DEFAULT_SHARED_MODULE.to_string(),
            host_modules: BTreeMap::new(),
            layout: Layout::Nixos,
            fleet_settings: "{ }".to_string(),
        }
    }
}

/// `shared.nix` unless a test says otherwise.
pub const DEFAULT_SHARED_MODULE: &str = r#"{ lib, ... }: {
  time.timeZone = lib.mkDefault "UTC";
}
"#;

impl NixosShape {
    /// A cheap shape for tests that need the module system, not its cost.
    pub fn small() -> Self {
        NixosShape {
            option_modules: 40,
            packages: 100,
            services_per_host: 4,
            ..NixosShape::default()
        }
    }

    /// Written as a colmena hive ([`crate::sources`]).
    pub fn colmena(mut self) -> Self {
        self.layout = Layout::Colmena;
        self
    }

    /// Written as deploy-rs nodes ([`crate::sources`]).
    pub fn deploy_rs(mut self) -> Self {
        self.layout = Layout::DeployRs;
        self
    }

    /// Sets [`NixosShape::fleet_settings`].
    pub fn fleet_settings(mut self, nix_attrs: &str) -> Self {
        self.fleet_settings = nix_attrs.to_string();
        self
    }

    /// Sets an extra module for one host.
    pub fn host_module(mut self, host: &str, module: &str) -> Self {
        self.host_modules
            .insert(host.to_string(), module.to_string());
        self
    }
}

/// Where the nixpkgs lib tarball is: `$NIX_DEPLOY_NIXPKGS_LIB`, else the
/// copy vendored in this crate (`fixtures/nixpkgs-lib.tar.xz`, MIT, with its
/// licence beside it).
pub fn nixpkgs_lib_tarball() -> PathBuf {
    match std::env::var_os("NIX_DEPLOY_NIXPKGS_LIB") {
        Some(path) => PathBuf::from(path),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/nixpkgs-lib.tar.xz"),
    }
}

/// A small stable hash of a host name, to spread hosts over services.
fn spread(name: &str) -> usize {
    let mut hash: u64 = 0xcbf29ce484222325;
    for b in name.bytes() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x100000001b3);
    }
    (hash % 1_000_003) as usize
}

fn flake_nix(lib_dir: &Path, specs: &[HostSpec]) -> String {
    let names: Vec<String> = specs.iter().map(|s| s.name.clone()).collect();
    format!(
        r#"# Generated by the nix-deploy testkit (nixos.rs); do not edit.
{{
  inputs.nixpkgs.url = {lib};
  outputs = {{ self, nixpkgs }}:
    let
      lib = nixpkgs.lib;
      nixosSystem = import ./nixos/eval-config.nix {{ inherit lib; }};
      host = name: nixosSystem {{
        modules = [ ./shared.nix (./machines + "/${{name}}.nix") ];
      }};
    in {{
      nixosConfigurations = lib.genAttrs {names} host;
    }};
}}
"#,
        lib = nix_string(&format!("path:{}", lib_dir.display())),
        names = nix_list(&names),
    )
}

fn machine_nix(shape: &NixosShape, spec: &HostSpec) -> String {
    let mut services = String::new();
    let modules = shape.option_modules.max(1);
    let start = spread(&spec.name);
    let mut enabled: Vec<usize> = (0..shape.services_per_host.min(modules))
        .map(|k| (start + k * 17) % modules)
        .collect();
    enabled.sort_unstable();
    enabled.dedup();
    for (k, i) in enabled.iter().enumerate() {
        let _ = writeln!(
            services,
            "  services.s{i} = {{ enable = true; settings.host = {}; settings.workers = {k}; }};",
            nix_string(&spec.name)
        );
    }
    let mut deployment = String::new();
    if spec.role != "client" {
        let _ = writeln!(deployment, "    role = {};", nix_string(&spec.role));
    }
    if !spec.tags.is_empty() {
        let _ = writeln!(deployment, "    tags = {};", nix_list(&spec.tags));
    }
    if !spec.dependencies.is_empty() {
        let _ = writeln!(
            deployment,
            "    dependencies = {};",
            nix_list(&spec.dependencies)
        );
    }
    if !spec.health_checks.is_empty() {
        let _ = writeln!(
            deployment,
            "    healthChecks = [ {} ];",
            spec.health_checks.join(" ")
        );
    }
    if !spec.rollback_on_failure {
        deployment.push_str("    rollbackOnFailure = false;\n");
    }
    if let Some(user) = &spec.user {
        let _ = writeln!(deployment, "    targetUser = {};", nix_string(user));
    }
    if let Some(extra) = &spec.deployment_extra {
        let _ = writeln!(deployment, "    {extra}");
    }
    let deployment = match shape.layout {
        Layout::Nixos => format!("  deployment = {{\n{deployment}  }};\n"),
        Layout::Colmena => format!(
            "  deployment = {{\n{}  }};\n",
            sources::colmena_deployment(spec)
        ),
        // deploy-rs reads its own `deploy.nodes`.
        Layout::DeployRs => String::new(),
    };
    let imports = shape
        .host_modules
        .get(&spec.name)
        .map(|m| format!("  imports = [ ({m}) ];\n"))
        .unwrap_or_default();
    let package = spread(&spec.name) % shape.packages.max(1);
    format!(
        r#"# Host {name} (generated by the nix-deploy testkit; do not edit).
{{ lib, pkgs, ... }}: {{
{imports}  networking.hostName = {quoted};
  testkit.version = {version};
  testkit.switchScript = builtins.unsafeDiscardStringContext
    (builtins.readFile ../hosts/{name}/switch-to-configuration.sh);
  environment.systemPackages = [ pkgs.p{package} ];
{services}{deployment}}}
"#,
        name = spec.name,
        quoted = nix_string(&spec.name),
        version = nix_string(&spec.version_string()),
    )
}

/// Every file of the flake (relative to `R/flake`), in the order to write
/// them (`flake.nix` last).
fn flake_files(root: &Path, shape: &NixosShape, specs: &[HostSpec]) -> Vec<(String, String)> {
    let mut files = vec![
        ("builder.sh".to_string(), BUILDER.to_string()),
        ("systemctl.sh".to_string(), systemctl_script()),
        ("nixos/eval-config.nix".to_string(), EVAL_CONFIG.to_string()),
        ("nixos/pkgs.nix".to_string(), pkgs_nix(shape.packages)),
        ("nixos/core.nix".to_string(), core_nix()),
        (
            "nixos/nix-deploy.nix".to_string(),
            NIX_DEPLOY_MODULE.to_string(),
        ),
        // What the module provisions into Grafana, beside it as in `nix/`.
        (
            "nixos/grafana/nix-deploy.json".to_string(),
            GRAFANA_DASHBOARD.to_string(),
        ),
    ];
    files.extend(sources::files(shape.layout));
    match shape.layout {
        Layout::Colmena => files.push(("colmena/meta.nix".into(), shape.fleet_settings.clone())),
        Layout::DeployRs => files.push((
            "deploy-rs/settings.nix".into(),
            shape.fleet_settings.clone(),
        )),
        Layout::Nixos => {}
    }
    // colmena's and deploy-rs's users do not import nix-deploy's module.
    let ours = if shape.layout == Layout::Nixos {
        "  ../nix-deploy.nix\n"
    } else {
        ""
    };
    let mut list = format!("[\n  ../core.nix\n{ours}");
    for i in 0..shape.option_modules {
        let _ = writeln!(list, "  ./m{i:04}.nix");
        files.push((
            format!("nixos/modules/m{i:04}.nix"),
            service_module(i, shape.packages),
        ));
    }
    list.push_str("]\n");
    files.push(("nixos/modules/module-list.nix".to_string(), list));
    files.push(("shared.nix".to_string(), shape.shared_module.clone()));
    for spec in specs {
        files.push((
            format!("hosts/{}/switch-to-configuration.sh", spec.name),
            switch_script(spec),
        ));
        files.push((
            format!("machines/{}.nix", spec.name),
            machine_nix(shape, spec),
        ));
    }
    let flake = match shape.layout {
        Layout::Nixos => flake_nix(&root.join("nixpkgs-lib"), specs),
        layout => sources::flake_nix(layout, &root.join("nixpkgs-lib"), specs),
    };
    files.push(("flake.nix".to_string(), flake));
    files
}

/// Writes the NixOS-shaped flake below `root` (see the module docs):
/// unpacks nixpkgs' lib if it is not there yet, writes every file that
/// changed, and locks the flake if it has no lock file.
pub(crate) fn write(root: &Path, shape: &NixosShape, specs: &[HostSpec]) -> Result<()> {
    if shape.services_per_host > shape.option_modules {
        bail!(
            "services_per_host ({}) exceeds option_modules ({})",
            shape.services_per_host,
            shape.option_modules
        );
    }
    nixpkgs_lib(root)?;
    let flake = root.join("flake");
    for (file, contents) in flake_files(root, shape, specs) {
        let path = flake.join(&file);
        if fs::read_to_string(&path).is_ok_and(|old| old == contents) {
            continue;
        }
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)?;
        }
        write_atomic(&path, &contents)
            .with_context(|| format!("writing the NixOS-shaped flake: {}", path.display()))?;
    }
    if !flake.join("flake.lock").is_file() {
        lock(root, &[])?;
    }
    Ok(())
}

/// nixpkgs' lib unpacked below `root` (`root/nixpkgs-lib`, whose `lib` is
/// `import`able), for tests that evaluate modules with the real `lib`.
pub fn nixpkgs_lib(root: &Path) -> Result<PathBuf> {
    let dir = root.join("nixpkgs-lib");
    if !dir.join("lib/default.nix").is_file() {
        unpack_nixpkgs_lib(root)?;
    }
    Ok(dir)
}

fn unpack_nixpkgs_lib(root: &Path) -> Result<()> {
    let tarball = nixpkgs_lib_tarball();
    if !tarball.is_file() {
        bail!(
            "nixpkgs' lib is missing: {} (set NIX_DEPLOY_NIXPKGS_LIB to the tarball)",
            tarball.display()
        );
    }
    fs::create_dir_all(root)?;
    let mut cmd = Command::new("tar");
    cmd.arg("-xJf").arg(&tarball).arg("-C").arg(root);
    run_with_timeout(cmd, NIX_TIMEOUT)
        .and_then(checked_stdout)
        .with_context(|| format!("unpacking {} (needs xz)", tarball.display()))?;
    if !root.join("nixpkgs-lib/lib/default.nix").is_file() {
        bail!("{} holds no nixpkgs-lib/lib", tarball.display());
    }
    Ok(())
}

/// `nix flake lock` of `R/flake`, with extra arguments.
fn lock(root: &Path, extra: &[&str]) -> Result<()> {
    let mut cmd = Command::new("nix");
    cmd.env("NIX_CONFIG", nix_config())
        .args(["flake", "lock"])
        .args(extra)
        .arg(format!("path:{}", root.join("flake").display()));
    run_with_timeout(cmd, NIX_TIMEOUT)
        .and_then(checked_stdout)
        .context("locking the NixOS-shaped flake")?;
    Ok(())
}

/// Change nixpkgs' lib below `root` with `change` (given its directory),
/// then lock the flake again: a new `flake.lock`.
pub(crate) fn relock(root: &Path, change: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    change(&root.join("nixpkgs-lib"))?;
    lock(root, &["--update-input", "nixpkgs"])
}

/// A NixOS-shaped flake with no hosts running: for measuring evaluation.
#[derive(Debug)]
pub struct NixosFlake {
    dir: tempfile::TempDir,
    shape: NixosShape,
    specs: Vec<HostSpec>,
}

impl NixosFlake {
    /// Writes (and locks) the flake in a fresh temporary directory.
    pub fn create(shape: NixosShape, specs: Vec<HostSpec>) -> Result<NixosFlake> {
        for spec in &specs {
            spec.validate()?;
        }
        let dir = tempfile::Builder::new()
            .prefix("ndnixos-")
            .tempdir_in("/tmp")
            .context("creating the flake directory")?;
        write(dir.path(), &shape, &specs)?;
        Ok(NixosFlake { dir, shape, specs })
    }

    /// `path:R/flake`.
    pub fn flake_ref(&self) -> String {
        format!("path:{}", self.dir.path().join("flake").display())
    }

    /// The root directory `R`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn specs(&self) -> &[HostSpec] {
        &self.specs
    }

    /// Edits a host's spec and rewrites the flake.
    pub fn update(&mut self, name: &str, f: impl FnOnce(&mut HostSpec)) -> Result<()> {
        let spec = self
            .specs
            .iter_mut()
            .find(|s| s.name == name)
            .with_context(|| format!("no host {name}"))?;
        f(spec);
        spec.validate()?;
        write(self.dir.path(), &self.shape, &self.specs)
    }

    /// Edits the shape (shared module, host modules, ...) and rewrites the flake.
    pub fn update_shape(&mut self, f: impl FnOnce(&mut NixosShape)) -> Result<()> {
        f(&mut self.shape);
        write(self.dir.path(), &self.shape, &self.specs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machines_set_only_what_differs_from_the_modules_defaults() {
        let shape = NixosShape::small();
        let plain = machine_nix(&shape, &HostSpec::new("web1"));
        assert!(plain.contains("deployment = {\n  };"), "{plain}");
        assert!(plain.contains(r#"networking.hostName = "web1";"#));
        assert_eq!(plain.matches("enable = true").count(), 4);
        let full = machine_nix(
            &shape.clone().host_module("db", "{ }"),
            &HostSpec::new("db")
                .role("infrastructure")
                .tags(&["x"])
                .depends_on(&["web1"])
                .rollback_on_failure(false),
        );
        for needle in [
            r#"role = "infrastructure";"#,
            r#"tags = [ "x" ];"#,
            r#"dependencies = [ "web1" ];"#,
            "rollbackOnFailure = false;",
            "imports = [ ({ }) ];",
        ] {
            assert!(full.contains(needle), "{needle}: {full}");
        }
    }

    #[test]
    fn the_module_list_holds_every_option_module() {
        let shape = NixosShape::small();
        let files = flake_files(Path::new("/r"), &shape, &[HostSpec::new("a")]);
        let list = &files
            .iter()
            .find(|(f, _)| f == "nixos/modules/module-list.nix")
            .unwrap()
            .1;
        assert_eq!(list.matches("./m").count(), shape.option_modules);
        assert!(list.contains("../nix-deploy.nix"));
        assert_eq!(files.last().unwrap().0, "flake.nix");
        assert!(
            files
                .last()
                .unwrap()
                .1
                .contains(r#"inputs.nixpkgs.url = "path:/r/nixpkgs-lib";"#)
        );
    }
}
