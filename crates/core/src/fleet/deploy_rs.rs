//! A deploy-rs node (`deploy.nodes.NAME`) as a host: its settings merged as
//! deploy-rs merges them (the `system` profile's over the node's over the
//! top level's; `sshOpts` of all three, in that order), with deploy-rs's
//! meaning.
//!
//! | deploy-rs | nix-deploy |
//! |---|---|
//! | `hostname` | the SSH destination |
//! | `sshUser` | the SSH user (unset: the ssh config decides) |
//! | `user` | must be `root`: the system profile is root's |
//! | `sudo` | the privilege escalation command, with `user` appended |
//! | `sshOpts` | extra ssh arguments |
//! | `profiles.system.path` | the system (an `activate.nixos` wrapper deploys the toplevel it wraps) |
//! | `magicRollback` | the confirmation watchdog on activation |
//! | `autoRollback` | `rollbackOnFailure` |
//! | `confirmTimeout`, `activationTimeout` | this host's timeouts |
//! | `remoteBuild` | `buildOnTarget` |
//! | `fastConnection` | `true`: everything from the coordinator; `false`: substitute on the host |
//! | `tempPath`, `profilesOrder` | accepted, not needed |
//! | `interactiveSudo = true` | refused: nix-deploy never waits for a password |

use std::time::Duration;

use crate::attrs::Attrs;

use super::HostMeta;

/// deploy-rs's settings that may appear at each of the three levels.
#[derive(Default)]
struct Settings {
    ssh_user: Option<String>,
    user: Option<String>,
    ssh_opts: Vec<String>,
    fast_connection: Option<bool>,
    auto_rollback: Option<bool>,
    confirm_timeout: Option<u64>,
    activation_timeout: Option<u64>,
    magic_rollback: Option<bool>,
    sudo: Option<String>,
    remote_build: Option<bool>,
    interactive_sudo: Option<bool>,
}

impl Settings {
    fn read(attrs: &mut Attrs) -> Result<Settings, String> {
        let settings = Settings {
            ssh_user: attrs.string("sshUser")?,
            user: attrs.string("user")?,
            ssh_opts: attrs.strings("sshOpts")?,
            fast_connection: attrs.bool("fastConnection")?,
            auto_rollback: attrs.bool("autoRollback")?,
            confirm_timeout: attrs.integer("confirmTimeout", 1, u64::from(u16::MAX))?,
            activation_timeout: attrs.integer("activationTimeout", 1, u64::from(u16::MAX))?,
            magic_rollback: attrs.bool("magicRollback")?,
            sudo: attrs.string("sudo")?,
            remote_build: attrs.bool("remoteBuild")?,
            interactive_sudo: attrs.bool("interactiveSudo")?,
        };
        attrs.accept("tempPath");
        Ok(settings)
    }

    /// `self` over `lower`, as deploy-rs merges them.
    fn over(self, lower: Settings) -> Settings {
        let mut ssh_opts = self.ssh_opts;
        ssh_opts.extend(lower.ssh_opts);
        Settings {
            ssh_user: self.ssh_user.or(lower.ssh_user),
            user: self.user.or(lower.user),
            ssh_opts,
            fast_connection: self.fast_connection.or(lower.fast_connection),
            auto_rollback: self.auto_rollback.or(lower.auto_rollback),
            confirm_timeout: self.confirm_timeout.or(lower.confirm_timeout),
            activation_timeout: self.activation_timeout.or(lower.activation_timeout),
            magic_rollback: self.magic_rollback.or(lower.magic_rollback),
            sudo: self.sudo.or(lower.sudo),
            remote_build: self.remote_build.or(lower.remote_build),
            interactive_sudo: self.interactive_sudo.or(lower.interactive_sudo),
        }
    }
}

/// The node `name` from `{ top; node; profiles; }` (see `crate::source`).
pub(super) fn parse(name: &str, value: serde_json::Value) -> Result<HostMeta, String> {
    let node_path = format!("deploy.nodes.{name}");
    let mut entry = Attrs::new("the evaluation", value)?;
    let top = entry.value("top").unwrap_or_default();
    let node = entry.value("node").unwrap_or_default();
    let profiles = Attrs::new(
        &format!("{node_path}.profiles"),
        entry.value("profiles").unwrap_or_default(),
    )?;
    entry.finish()?;
    let top = {
        let mut top = Attrs::new("deploy", top)?;
        let settings = Settings::read(&mut top)?;
        top.finish()?;
        settings
    };
    let profiles = profiles.into_entries();
    let mut node = Attrs::new(&node_path, node)?;
    let hostname = node.string("hostname")?;
    node.accept("profilesOrder");
    let node_settings = Settings::read(&mut node)?;
    node.finish()?;
    let mut host = HostMeta::new(name);
    let mut system = None;
    for (profile, value) in profiles {
        let mut attrs = Attrs::new(&format!("{node_path}.profiles.{profile}"), value)?;
        let has_path = attrs.bool("hasPath")?.unwrap_or(false);
        let profile_path = attrs.string("profilePath")?;
        let settings = Settings::read(&mut attrs)?;
        attrs.finish()?;
        if profile != "system" {
            host.warnings.push(format!(
                "{node_path}.profiles.{profile} is not deployed: nix-deploy deploys the `system` profile"
            ));
            continue;
        }
        if !has_path {
            return Err(format!("{node_path}.profiles.system has no `path`"));
        }
        if let Some(path) = profile_path
            && path.trim_end_matches('/') != "/nix/var/nix/profiles/system"
        {
            return Err(format!(
                "{node_path}.profiles.system.profilePath must be /nix/var/nix/profiles/system (the system profile)"
            ));
        }
        system = Some(settings);
    }
    let Some(system) = system else {
        return Err(format!(
            "{node_path} has no `system` profile (profiles.system.path), which is what nix-deploy deploys"
        ));
    };
    let settings = system.over(node_settings).over(top);
    host.target.destination =
        Some(hostname.ok_or_else(|| format!("{node_path}.hostname is not set"))?);
    host.target.user = settings.ssh_user;
    host.target.ssh_options = settings.ssh_opts;
    let user = settings.user.unwrap_or_else(|| "root".to_string());
    if user != "root" {
        return Err(format!(
            "{node_path}: `user` of the system profile must be root (it owns the system profile)"
        ));
    }
    if let Some(sudo) = settings.sudo {
        let mut escalation: Vec<String> = sudo.split_whitespace().map(String::from).collect();
        escalation.push(user);
        host.target.escalation = escalation;
    }
    if settings.interactive_sudo == Some(true) {
        return Err(format!(
            "{node_path}: interactiveSudo is not supported: nix-deploy never waits for a password (allow the SSH user passwordless sudo)"
        ));
    }
    host.substitute_on_destination = settings.fast_connection.map(|fast| !fast);
    host.rollback_on_failure = settings.auto_rollback.unwrap_or(true);
    host.magic_rollback = settings.magic_rollback.unwrap_or(true);
    host.confirm_timeout = settings.confirm_timeout.map(Duration::from_secs);
    host.activation_timeout = settings.activation_timeout.map(Duration::from_secs);
    host.build_on_target = settings.remote_build.unwrap_or(false);
    Ok(host)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(
        top: serde_json::Value,
        node: serde_json::Value,
        system: serde_json::Value,
    ) -> serde_json::Value {
        let mut system = system;
        system["hasPath"] = json!(true);
        json!({ "top": top, "node": node, "profiles": { "system": system } })
    }

    #[test]
    fn settings_merge_profile_over_node_over_top_with_deploy_rs_meaning() {
        let host = parse(
            "web1",
            node(
                json!({ "sshUser": "deploy", "sshOpts": ["-o", "A=1"], "magicRollback": false,
                        "confirmTimeout": 15, "fastConnection": true, "tempPath": "/tmp" }),
                json!({ "hostname": "10.0.0.1", "sshOpts": ["-p", "2222"], "confirmTimeout": 20,
                        "remoteBuild": true, "profilesOrder": ["system"] }),
                json!({ "user": "root", "sshOpts": ["-A"], "activationTimeout": 90,
                        "autoRollback": false, "sudo": "doas -u" }),
            ),
        )
        .unwrap();
        assert_eq!(host.target.destination.as_deref(), Some("10.0.0.1"));
        assert_eq!(host.target.user.as_deref(), Some("deploy"));
        assert_eq!(host.target.ssh_options, ["-A", "-p", "2222", "-o", "A=1"]);
        assert_eq!(host.target.escalation, ["doas", "-u", "root"]);
        assert!(!host.magic_rollback && !host.rollback_on_failure && host.build_on_target);
        assert_eq!(host.confirm_timeout, Some(Duration::from_secs(20)));
        assert_eq!(host.activation_timeout, Some(Duration::from_secs(90)));
        assert_eq!(host.substitute_on_destination, Some(false));

        let plain = parse(
            "db",
            node(json!({}), json!({ "hostname": "db" }), json!({})),
        )
        .unwrap();
        assert_eq!(plain.target.user, None);
        assert!(plain.magic_rollback && plain.rollback_on_failure && !plain.build_on_target);
        assert_eq!(plain.target.escalation, ["sudo", "-n", "--"]);
        assert_eq!(plain.substitute_on_destination, None);
        let slow = parse(
            "db",
            node(
                json!({}),
                json!({ "hostname": "db", "fastConnection": false }),
                json!({}),
            ),
        )
        .unwrap();
        assert_eq!(slow.substitute_on_destination, Some(true));
    }

    #[test]
    fn what_cannot_be_deployed_the_same_way_is_refused_by_name() {
        let bad = |top, n, system| parse("web1", node(top, n, system)).unwrap_err();
        assert!(bad(json!({}), json!({}), json!({})).contains("deploy.nodes.web1.hostname"));
        assert!(
            bad(
                json!({}),
                json!({ "hostname": "h" }),
                json!({ "user": "alice" })
            )
            .contains("must be root")
        );
        assert!(
            bad(
                json!({ "interactiveSudo": true }),
                json!({ "hostname": "h" }),
                json!({})
            )
            .contains("interactiveSudo")
        );
        let e = bad(
            json!({ "confirmTimeout": "hunter2" }),
            json!({ "hostname": "h" }),
            json!({}),
        );
        assert!(
            e.contains("deploy.confirmTimeout") && !e.contains("hunter2"),
            "{e}"
        );
        assert!(
            bad(
                json!({}),
                json!({ "hostname": "h", "sshUsr": "x" }),
                json!({})
            )
            .contains("unknown field `sshUsr`")
        );
        let no_system = json!({ "top": {}, "node": { "hostname": "h" }, "profiles": {} });
        assert!(
            parse("web1", no_system)
                .unwrap_err()
                .contains("no `system` profile")
        );
        let other = json!({ "top": {}, "node": { "hostname": "h" },
            "profiles": { "system": { "hasPath": true }, "hm": { "hasPath": true, "user": "me" } } });
        let host = parse("web1", other).unwrap();
        assert!(host.warnings[0].contains("profiles.hm is not deployed"));
    }
}
