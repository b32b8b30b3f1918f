//! A key's metadata as the evaluation gives it, read attribute by attribute
//! ([`crate::attrs`]) into a [`Key`], and the checks across one host's keys.

use std::collections::BTreeSet;

use super::{Key, KeySource, UploadAt, check_dest_dir, check_permissions, is_valid_key_name};
use crate::attrs::Attrs;
use crate::shell;

/// `config.deployment.keys.<attr>` as evaluated, at `path`
/// (`deployment.keys.<attr>`). The modules (ours, colmena's) give every
/// option, unset ones as `null`; the evaluation replaces `text` by `hasText`.
/// Errors name the attribute and never repeat its value
/// ([`crate::attrs`]): a secret may have been typed into the wrong one.
pub(crate) fn parse_key(path: &str, attr: &str, value: serde_json::Value) -> Result<Key, String> {
    let mut raw = Attrs::new(path, value)?;
    // Everything is read first: an unknown attribute (a typo) is said
    // before what the known ones lack.
    let name = raw.string("name")?;
    let text = raw.value("text");
    let has_text = raw.bool("hasText")?.unwrap_or(false);
    let key_file = raw.string("keyFile")?;
    let key_command = raw.string_list("keyCommand")?;
    let dest_dir = raw.string("destDir")?;
    // Read-only in the modules: `destDir + "/" + name`.
    let written_path = raw.string("path")?;
    let user = raw.string("user")?;
    let group = raw.string("group")?;
    let permissions = raw.value("permissions");
    let upload_at = raw.string("uploadAt")?;
    let path = raw.path().to_string();
    raw.finish()?;
    let at = |what: &str| format!("{path}.{what}");
    let name = name.unwrap_or_else(|| attr.to_string());
    if !is_valid_key_name(&name) {
        return Err(format!(
            "{} is not a valid file name (letters, digits, `.`, `_`, `-`, `+`, `@`; not `.`, `..` or starting with `-`)",
            at("name")
        ));
    }
    if name == super::undo::UNDO_DIR {
        return Err(format!(
            "{} is where nix-deploy keeps replaced keys for the way back; choose another name",
            at("name")
        ));
    }
    // Only a flake evaluated without the fleet's expression has it: refused,
    // so that contents never get this far (and never repeated).
    if text.is_some() {
        return Err(format!(
            "{path}: `text` reached nix-deploy in the fleet's evaluation; it must be read only when the key is uploaded"
        ));
    }
    let source = match (has_text, key_file, key_command) {
        (true, None, None) => KeySource::Text,
        (false, Some(file), None) => {
            // A Nix path (`./secret`, as colmena accepts) arrives as the
            // store copy of the flake's source: read from there (the
            // secret is in the store already; the plan and the
            // deployment warn about it, see `Key::in_store`).
            if !file.starts_with('/') {
                return Err(format!("{} must be an absolute path", at("keyFile")));
            }
            if file.chars().any(char::is_control) {
                return Err(format!("{} contains control characters", at("keyFile")));
            }
            KeySource::File(file)
        }
        (false, None, Some(command)) => {
            match command.first() {
                None => return Err(format!("{} is an empty list", at("keyCommand"))),
                Some(program) if program.is_empty() => {
                    return Err(format!(
                        "{}: the program is an empty string",
                        at("keyCommand")
                    ));
                }
                Some(_) => {}
            }
            KeySource::Command(command)
        }
        (false, None, None) => {
            return Err(format!(
                "{path} needs one of `text`, `keyFile` or `keyCommand`"
            ));
        }
        _ => {
            return Err(format!(
                "{path}: give only one of `text`, `keyFile` and `keyCommand`"
            ));
        }
    };
    let dest_dir = check_dest_dir(dest_dir.as_deref().unwrap_or("/run/keys"))
        .map_err(|e| format!("{}: {e}", at("destDir")))?;
    let user = user.unwrap_or_else(|| "root".into());
    let group = group.unwrap_or_else(|| "root".into());
    for (what, value) in [("user", &user), ("group", &group)] {
        if !shell::is_valid_user(value) {
            return Err(format!(
                "{path}.{what} is not a valid {what} name (letters, digits, `_`, `-`, `.`)"
            ));
        }
    }
    let permissions = match permissions {
        None => "0600".to_string(),
        Some(serde_json::Value::String(mode)) => {
            check_permissions(&mode).map_err(|e| format!("{}: {e}", at("permissions")))?
        }
        Some(other) => {
            return Err(format!(
                "{} must be a string like \"0600\", not {} (a Nix number is decimal)",
                at("permissions"),
                crate::attrs::kind(&other)
            ));
        }
    };
    let upload_at = match upload_at.as_deref() {
        None | Some("pre-activation") => UploadAt::PreActivation,
        Some("post-activation") => UploadAt::PostActivation,
        Some(_) => {
            return Err(format!(
                "{} is neither \"pre-activation\" nor \"post-activation\"",
                at("uploadAt")
            ));
        }
    };
    let key = Key {
        attr: attr.to_string(),
        name,
        source,
        dest_dir,
        user,
        group,
        permissions,
        upload_at,
    };
    if let Some(written) = written_path
        && normalize(&written) != key.path()
    {
        return Err(format!(
            "{} is not destDir/name (`{}`); set destDir and name instead",
            at("path"),
            key.path()
        ));
    }
    Ok(key)
}

/// `/a//b/` → `/a/b`, as the modules compute `path` from `destDir`.
fn normalize(path: &str) -> String {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    format!("/{}", parts.join("/"))
}

/// Two keys of one host must not land on the same file.
pub(crate) fn check_unique_paths(keys: &[Key]) -> Result<(), String> {
    let mut seen = BTreeSet::new();
    for key in keys {
        if !seen.insert(key.path()) {
            return Err(format!(
                "deployment.keys: two keys are written to {}",
                key.path()
            ));
        }
    }
    Ok(())
}
