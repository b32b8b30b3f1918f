//! `config.deployment` of a NixOS configuration, as our module
//! (`nix/module.nix`) or colmena's `deploymentOptions` define it: the union
//! of both, with colmena's meaning for colmena's options.
//!
//! | attribute | meaning |
//! |---|---|
//! | `targetHost` | SSH destination (default: the host's name); `null`: only `apply-local` deploys it |
//! | `targetPort` | SSH port (`null`: the ssh config decides) |
//! | `targetUser` | SSH user (default `root`; `null`: the ssh config decides) |
//! | `sshOptions` | extra ssh arguments (see [`crate::sshopts`]) |
//! | `privilegeEscalationCommand` | runs privileged steps when not root (default `sudo -n --`) |
//! | `allowLocalDeployment` | `apply-local` may deploy this host on itself |
//! | `buildOnTarget` | the host builds its system from the derivation |
//! | `substituteOnDestination` | the host fetches what its substituters have |
//! | `replaceUnknownProfiles` | deploy over a system nix-deploy never deployed there |
//! | `tags`, `keys` | selection; secrets ([`crate::keys`]) |
//! | `role`, `dependencies`, `healthChecks`, `rollbackOnFailure` | ours |
//! | `promotionKey` | ours: pairs hosts across environments (`nix-deploy promote`) |
//!
//! An attribute neither knows is an error naming it.

use crate::attrs::Attrs;
use crate::shell;

use super::{CheckKind, DEFAULT_CHECK_PERIOD, DEFAULT_CHECK_TIMEOUT, HealthCheck, HostMeta};

fn seconds(
    value: Option<f64>,
    default: std::time::Duration,
    what: &str,
) -> Result<std::time::Duration, String> {
    match value {
        None => Ok(default),
        // At least 0.1 s: a period that rounds to nothing would be a tight loop.
        Some(v) if v.is_finite() && (0.1..=86_400.0).contains(&v) => {
            Ok(std::time::Duration::from_secs_f64(v))
        }
        Some(_) => Err(format!(
            "{what} must be a number of seconds from 0.1 to 86400"
        )),
    }
}

fn parse_check(index: usize, value: serde_json::Value) -> Result<HealthCheck, String> {
    let mut raw = Attrs::new(&format!("deployment.healthChecks[{index}]"), value)?;
    let service = raw.string("service")?;
    let http = raw.string("http")?;
    let status = raw.integer("status", 100, 599)?;
    let body = raw.string("body")?;
    // Other names people use for `body`.
    let body = match (body, raw.string("bodyContains")?, raw.string("contains")?) {
        (Some(b), _, _) | (None, Some(b), _) | (None, None, Some(b)) => Some(b),
        (None, None, None) => None,
    };
    let command = raw.string("command")?;
    let timeout = raw.number("timeout")?;
    let period = raw.number("period")?;
    let path = raw.path().to_string();
    raw.finish()?;
    let at = |what: &str| format!("{path}.{what}");
    let kind = match (service, http, command) {
        (Some(unit), None, None) => {
            if !shell::is_valid_unit_name(&unit) {
                return Err(format!(
                    "`{unit}` is not a valid systemd unit name ({})",
                    at("service")
                ));
            }
            CheckKind::Service { unit }
        }
        (None, Some(url), None) => {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(format!(
                    "health check URL `{url}` must start with http:// or https:// ({})",
                    at("http")
                ));
            }
            CheckKind::Http {
                url,
                status: status.unwrap_or(200) as u16,
                body_contains: body,
            }
        }
        (None, None, Some(command)) => {
            if command.trim().is_empty() {
                return Err(format!("{} is empty", at("command")));
            }
            CheckKind::Command { command }
        }
        _ => {
            return Err(format!(
                "{path}: each health check needs exactly one of `service`, `http` or `command`"
            ));
        }
    };
    let check = HealthCheck {
        kind,
        timeout: seconds(timeout, DEFAULT_CHECK_TIMEOUT, &at("timeout"))?,
        period: seconds(period, DEFAULT_CHECK_PERIOD, &at("period"))?,
    };
    Ok(check)
}

/// `config.deployment` of host `name`.
pub(super) fn parse(name: &str, value: serde_json::Value) -> Result<HostMeta, String> {
    let mut d = Attrs::new("deployment", value)?;
    let mut host = HostMeta::new(name);
    // colmena: `null` means "not deployed over SSH"; absent, the name.
    host.target.destination = if d.is_null("targetHost") {
        d.accept("targetHost");
        None
    } else {
        Some(d.string("targetHost")?.unwrap_or_else(|| name.to_string()))
    };
    // `null`: the ssh config decides; absent: root.
    host.target.user = if d.is_null("targetUser") {
        d.accept("targetUser");
        None
    } else {
        Some(
            d.string("targetUser")?
                .unwrap_or_else(|| "root".to_string()),
        )
    };
    host.target.port = d.integer("targetPort", 0, 65535)?.map(|p| p as u16);
    host.target.ssh_options = d.strings("sshOptions")?;
    if let Some(command) = d.string_list("privilegeEscalationCommand")? {
        host.target.escalation = command;
    }
    host.role = d.string("role")?.unwrap_or(host.role);
    host.dependencies = d.strings("dependencies")?;
    host.tags = d.strings("tags")?;
    host.health_checks = d
        .list("healthChecks")?
        .into_iter()
        .enumerate()
        .map(|(i, check)| parse_check(i, check))
        .collect::<Result<_, _>>()?;
    host.rollback_on_failure = d.bool("rollbackOnFailure")?.unwrap_or(true);
    host.allow_local_deployment = d.bool("allowLocalDeployment")?.unwrap_or(false);
    host.build_on_target = d.bool("buildOnTarget")?.unwrap_or(false);
    host.substitute_on_destination = d.bool("substituteOnDestination")?;
    host.replace_unknown_profiles = d.bool("replaceUnknownProfiles")?.unwrap_or(true);
    host.promotion_key = d.string("promotionKey")?;
    for (attr, value) in d.attrs_by_name("keys")? {
        let key = crate::keys::parse_key(&format!("deployment.keys.{attr}"), &attr, value)?;
        if key.in_store() {
            host.warnings.push(format!(
                "deployment.keys.{attr}.keyFile is in the Nix store (a Nix path is the store copy of the flake's source), readable by every user of this machine: keep secrets outside the flake and give keyFile as a string"
            ));
        }
        host.keys.push(key);
    }
    d.finish()?;
    Ok(host)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn colmenas_options_take_colmenas_meaning() {
        let host = parse(
            "web1",
            json!({
                "targetHost": null, "targetUser": null, "targetPort": 2222,
                "allowLocalDeployment": true, "buildOnTarget": true,
                "tags": ["edge"], "keys": {}, "replaceUnknownProfiles": false,
                "privilegeEscalationCommand": ["doas", "--"],
                "sshOptions": ["-o", "ProxyJump=bastion"],
            }),
        )
        .unwrap();
        assert_eq!(host.target.destination, None);
        assert_eq!(host.target.user, None);
        assert!(host.target.needs_sudo());
        assert_eq!(host.target.store_uri(), None);
        assert_eq!(host.target.port, Some(2222));
        assert!(host.allow_local_deployment && host.build_on_target);
        assert!(!host.replace_unknown_profiles);
        assert_eq!(host.target.escalation, ["doas", "--"]);
        assert_eq!(host.target.ssh_options, ["-o", "ProxyJump=bastion"]);
        let bare = parse("web2", json!({})).unwrap();
        assert_eq!(bare.target.destination.as_deref(), Some("web2"));
        assert_eq!(bare.target.user.as_deref(), Some("root"));
        assert_eq!(bare.target.store_uri().as_deref(), Some("ssh://root@web2"));
        assert!(!bare.target.needs_sudo());
        assert_eq!(bare.target.escalation, ["sudo", "-n", "--"]);
        assert!(bare.replace_unknown_profiles && !bare.build_on_target);
        assert_eq!(bare.substitute_on_destination, None);
    }

    #[test]
    fn a_path_typed_key_file_is_read_with_a_warning() {
        let host = parse(
            "h",
            json!({ "keys": { "db": { "keyFile": "/nix/store/abc-source/secret" } } }),
        )
        .unwrap();
        assert_eq!(host.keys.len(), 1);
        assert!(
            host.warnings[0].contains("deployment.keys.db.keyFile"),
            "{:?}",
            host.warnings
        );
    }
}
