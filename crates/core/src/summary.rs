//! What differs between two systems, from the store path names of their
//! closures: packages added, removed and changed in version, whether the
//! kernel changed, and systemd units added, removed or changed. Pure.
//!
//! NixOS builds each unit file as a derivation named `unit-<name>`, and the
//! kernel as `linux-<version>`; store path names follow Nix's
//! `<pname>-<version>` convention, where the version starts at the first `-`
//! followed by a digit.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionChange {
    pub name: String,
    pub from: String,
    pub to: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeSummary {
    /// `name-version` of packages only in the new closure.
    pub added: Vec<String>,
    /// `name-version` of packages only in the old closure.
    pub removed: Vec<String>,
    /// Packages in both, with another version.
    pub upgraded: Vec<VersionChange>,
    /// Same name and version, different store path (rebuilt with other inputs or config).
    pub rebuilt: usize,
    pub kernel_changed: bool,
    pub kernel: Option<VersionChange>,
    pub units_added: Vec<String>,
    pub units_removed: Vec<String>,
    pub units_changed: Vec<String>,
    /// Whether the old closure was known (false for a first deployment).
    pub compared: bool,
}

impl ChangeSummary {
    /// One line for tables: `+3 -1 ~2 packages, kernel 6.6 → 6.7, units: ~nginx.service`.
    pub fn one_line(&self) -> String {
        if !self.compared {
            return "first deployment".into();
        }
        let mut parts = vec![format!(
            "+{} -{} ~{} packages",
            self.added.len(),
            self.removed.len(),
            self.upgraded.len()
        )];
        match &self.kernel {
            Some(k) => parts.push(format!("kernel {} → {}", k.from, k.to)),
            None if self.kernel_changed => parts.push("kernel rebuilt".into()),
            None => {}
        }
        let units: Vec<String> = self
            .units_added
            .iter()
            .map(|u| format!("+{u}"))
            .chain(self.units_removed.iter().map(|u| format!("-{u}")))
            .chain(self.units_changed.iter().map(|u| format!("~{u}")))
            .collect();
        if !units.is_empty() {
            let shown: Vec<String> = units.iter().take(4).cloned().collect();
            let more = units.len().saturating_sub(4);
            parts.push(format!(
                "units: {}{}",
                shown.join(" "),
                if more > 0 {
                    format!(" (+{more} more)")
                } else {
                    String::new()
                }
            ));
        }
        parts.join(", ")
    }
}

/// The store paths of a closure as `nix-store --query --requisites` prints
/// them, one a line.
pub fn closure_paths(output: &str) -> Vec<String> {
    output
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

/// `/nix/store/<hash>-<name>` → `<name>`.
pub fn store_name(path: &str) -> Option<&str> {
    let base = path.trim().rsplit('/').next()?;
    let (hash, name) = base.split_once('-')?;
    (hash.len() == 32 && !name.is_empty()).then_some(name)
}

/// Split a name like Nix's `parseDrvName`: the version starts at the first `-`
/// followed by a digit. `nginx-1.24.0` → (`nginx`, `1.24.0`); `hello` → (`hello`, ``).
pub fn split_name(name: &str) -> (&str, &str) {
    let bytes = name.as_bytes();
    for i in 0..bytes.len() {
        if bytes[i] == b'-' && bytes.get(i + 1).is_some_and(u8::is_ascii_digit) {
            return (&name[..i], &name[i + 1..]);
        }
    }
    (name, "")
}

fn is_kernel(pname: &str) -> bool {
    pname == "linux"
}

/// Derivations that are not "packages" an operator cares about: generated
/// files, units, the toplevel itself.
fn is_noise(pname: &str) -> bool {
    pname.starts_with("unit-")
        || pname.starts_with("nixos-system-")
        || pname.ends_with(".drv")
        || pname.ends_with(".conf")
        || pname.ends_with(".sh")
        || pname.starts_with("etc")
        || pname == "system-path"
        || pname == "system-units"
        || pname == "user-units"
}

struct Closure {
    /// pname → set of versions.
    packages: BTreeMap<String, BTreeSet<String>>,
    /// Full store names, to count rebuilds.
    paths: BTreeSet<String>,
    /// unit name → store path.
    units: BTreeMap<String, String>,
    kernel: BTreeMap<String, String>,
}

fn closure(paths: &[String]) -> Closure {
    let mut c = Closure {
        packages: BTreeMap::new(),
        paths: BTreeSet::new(),
        units: BTreeMap::new(),
        kernel: BTreeMap::new(),
    };
    for path in paths {
        let Some(name) = store_name(path) else {
            continue;
        };
        if let Some(unit) = name.strip_prefix("unit-") {
            c.units.insert(unit.to_string(), path.trim().to_string());
            continue;
        }
        let (pname, version) = split_name(name);
        if is_kernel(pname) {
            // Reported on its own line, not as a package.
            c.kernel
                .insert(version.to_string(), path.trim().to_string());
            continue;
        }
        if is_noise(pname) {
            continue;
        }
        c.paths.insert(path.trim().to_string());
        c.packages
            .entry(pname.to_string())
            .or_default()
            .insert(version.to_string());
    }
    c
}

fn with_version(name: &str, version: &str) -> String {
    if version.is_empty() {
        name.to_string()
    } else {
        format!("{name}-{version}")
    }
}

/// Compare the closure of the running system (`old`, store paths; empty when
/// nothing runs yet) with the new one.
pub fn summarize(old: &[String], new: &[String]) -> ChangeSummary {
    let before = closure(old);
    let after = closure(new);
    let mut summary = ChangeSummary {
        compared: !old.is_empty(),
        ..ChangeSummary::default()
    };
    for (pname, versions) in &after.packages {
        match before.packages.get(pname) {
            None => summary
                .added
                .extend(versions.iter().map(|v| with_version(pname, v))),
            Some(old_versions) if old_versions != versions => {
                summary.upgraded.push(VersionChange {
                    name: pname.clone(),
                    from: old_versions.iter().cloned().collect::<Vec<_>>().join(", "),
                    to: versions.iter().cloned().collect::<Vec<_>>().join(", "),
                })
            }
            Some(_) => {}
        }
    }
    for (pname, versions) in &before.packages {
        if !after.packages.contains_key(pname) {
            summary
                .removed
                .extend(versions.iter().map(|v| with_version(pname, v)));
        }
    }
    let same_versions: BTreeSet<&String> = after
        .packages
        .iter()
        .filter(|(p, v)| before.packages.get(*p) == Some(v))
        .map(|(p, _)| p)
        .collect();
    summary.rebuilt = after
        .paths
        .difference(&before.paths)
        .filter(|p| {
            store_name(p)
                .map(|n| same_versions.contains(&split_name(n).0.to_string()))
                .unwrap_or(false)
        })
        .count();
    if summary.compared && before.kernel != after.kernel {
        summary.kernel_changed = true;
        let from: Vec<&String> = before.kernel.keys().collect();
        let to: Vec<&String> = after.kernel.keys().collect();
        if from != to {
            summary.kernel = Some(VersionChange {
                name: "linux".into(),
                from: from
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                to: to.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", "),
            });
        }
    }
    for (unit, path) in &after.units {
        match before.units.get(unit) {
            None => summary.units_added.push(unit.clone()),
            Some(old_path) if old_path != path => summary.units_changed.push(unit.clone()),
            Some(_) => {}
        }
    }
    summary.units_removed = before
        .units
        .keys()
        .filter(|u| !after.units.contains_key(*u))
        .cloned()
        .collect();
    if !summary.compared {
        // Against nothing, everything is "added"; keep the lists but no unit churn.
        summary.units_added.clear();
    }
    summary
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(hash_char: char, name: &str) -> String {
        format!("/nix/store/{}-{name}", hash_char.to_string().repeat(32))
    }

    #[test]
    fn splits_names_like_nix() {
        assert_eq!(split_name("nginx-1.24.0"), ("nginx", "1.24.0"));
        assert_eq!(
            split_name("perl5.36.0-Moose-2.2015"),
            ("perl5.36.0-Moose", "2.2015")
        );
        assert_eq!(
            split_name("linux-6.6.1-modules"),
            ("linux", "6.6.1-modules")
        );
        assert_eq!(split_name("hello"), ("hello", ""));
        assert_eq!(split_name("xorg-server-21.1.8"), ("xorg-server", "21.1.8"));
        assert_eq!(store_name(&p('a', "nginx-1.24.0")), Some("nginx-1.24.0"));
        assert_eq!(store_name("/nix/store/short-x"), None);
    }

    #[test]
    fn finds_added_removed_upgraded_and_units() {
        let old = vec![
            p('a', "nginx-1.24.0"),
            p('b', "openssl-3.0.12"),
            p('c', "htop-3.2.2"),
            p('d', "unit-nginx.service"),
            p('e', "unit-sshd.service"),
            p('f', "linux-6.6.1"),
            p('g', "bash-5.2-p15"),
        ];
        let new = vec![
            p('h', "nginx-1.25.3"),
            p('b', "openssl-3.0.12"),
            p('i', "prometheus-2.48.0"),
            p('j', "unit-nginx.service"),
            p('e', "unit-sshd.service"),
            p('k', "unit-prometheus.service"),
            p('f', "linux-6.6.1"),
            p('l', "bash-5.2-p15"),
        ];
        let s = summarize(&old, &new);
        assert_eq!(s.added, ["prometheus-2.48.0"]);
        assert_eq!(s.removed, ["htop-3.2.2"]);
        assert_eq!(
            s.upgraded,
            [VersionChange {
                name: "nginx".into(),
                from: "1.24.0".into(),
                to: "1.25.3".into()
            }]
        );
        assert_eq!(s.rebuilt, 1, "bash has the same version and another path");
        assert!(!s.kernel_changed);
        assert_eq!(s.units_added, ["prometheus.service"]);
        assert_eq!(s.units_changed, ["nginx.service"]);
        assert!(s.units_removed.is_empty());
        assert_eq!(
            s.one_line(),
            "+1 -1 ~1 packages, units: +prometheus.service ~nginx.service"
        );
    }

    #[test]
    fn detects_kernel_changes() {
        let old = vec![p('a', "linux-6.6.1"), p('b', "linux-6.6.1-modules")];
        let new = vec![p('c', "linux-6.7.2"), p('d', "linux-6.7.2-modules")];
        let s = summarize(&old, &new);
        assert!(s.kernel_changed);
        assert_eq!(s.kernel.as_ref().unwrap().to, "6.7.2, 6.7.2-modules");
        assert!(s.one_line().contains("kernel"));
        // Same version, other path: still a kernel change (patches, config).
        let s = summarize(&[p('a', "linux-6.6.1")], &[p('b', "linux-6.6.1")]);
        assert!(s.kernel_changed);
        assert_eq!(s.kernel, None);
    }

    #[test]
    fn first_deployment_is_not_a_diff() {
        let s = summarize(&[], &[p('a', "nginx-1.24.0"), p('b', "unit-nginx.service")]);
        assert!(!s.compared);
        assert!(!s.kernel_changed);
        assert_eq!(s.one_line(), "first deployment");
    }
}
