//! Secrets uploaded outside the Nix store: `deployment.keys.<name>`, in the
//! shape colmena's users already write:
//!
//! ```nix
//! deployment.keys."db-password" = {
//!   keyCommand = [ "pass" "show" "db" ];   # or: keyFile = "/home/me/secrets/db"; or: text = "...";
//!   destDir = "/run/keys";                  # default
//!   user = "postgres"; group = "postgres";  # default root, root
//!   permissions = "0640";                   # default 0600
//!   uploadAt = "post-activation";           # default pre-activation
//! };
//! ```
//!
//! Everything about a key except its contents is validated here, before
//! anything reaches a host: file name, directory, owner, group and mode end
//! up as positional arguments of a fixed upload script
//! ([`upload_argv`], in [`upload`]); the contents only ever travel on its
//! stdin. What an upload replaces is kept beside it for the way back, and
//! put back or kept for `rollback` by the scripts of [`undo`].
//!
//! Contents are never part of a [`Key`]: the fleet's evaluation drops `text`
//! (see [`crate::source::host_expr`]) and the engine reads it, or runs the
//! key's command, or reads its file, only when it uploads the key, into a
//! [`Secret`], which prints and serialises as `<redacted>`.

mod parse;
pub mod undo;
pub mod upload;

use std::fmt;

use serde::{Deserialize, Serialize, Serializer};

pub(crate) use parse::{check_unique_paths, parse_key};
pub use undo::{Keep, KeyChanges, UndoAction, UndoReport, parse_undo, undo_argv};
pub use upload::{upload_argv, upload_input};

/// The contents of a key. Never printed, never serialised, never stored.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    pub fn new(bytes: Vec<u8>) -> Self {
        Secret(bytes)
    }

    /// The bytes, for the one place that writes them to a host's stdin.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("<redacted>")
    }
}

/// Where a key's contents come from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "source", content = "from")]
pub enum KeySource {
    /// `text`: read from the flake when the key is uploaded (never kept).
    Text,
    /// `keyFile`: a file on the coordinator, outside the store.
    File(String),
    /// `keyCommand`: an argument vector run on the coordinator; its stdout
    /// is the key.
    Command(Vec<String>),
}

/// When a key is uploaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UploadAt {
    /// Before the new system is activated (services find their key there).
    PreActivation,
    /// After activation (the key's user may be created by the new system).
    PostActivation,
}

impl UploadAt {
    pub fn as_str(self) -> &'static str {
        match self {
            UploadAt::PreActivation => "pre-activation",
            UploadAt::PostActivation => "post-activation",
        }
    }
}

/// One key of a host, validated.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Key {
    /// The attribute name in `deployment.keys`.
    pub attr: String,
    /// The file name (`name`, default: the attribute name).
    pub name: String,
    #[serde(flatten)]
    pub source: KeySource,
    pub dest_dir: String,
    pub user: String,
    pub group: String,
    /// Octal, e.g. `0600`.
    pub permissions: String,
    pub upload_at: UploadAt,
}

impl Key {
    /// Where the key lands on the host.
    pub fn path(&self) -> String {
        format!("{}/{}", self.dest_dir, self.name)
    }

    /// A `keyFile` in the Nix store: a Nix path (`keyFile = ./secret`, as
    /// colmena accepts it) is the store copy of the flake's source, readable
    /// by every local user. Accepted, and warned about.
    pub fn in_store(&self) -> bool {
        matches!(&self.source, KeySource::File(path) if path.starts_with("/nix/store/"))
    }
}

/// A key's file name: letters, digits, `.`, `_`, `-`, `+`, `@`; not `.`,
/// `..` or starting with `-`.
pub fn is_valid_key_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name != "."
        && name != ".."
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-+@".contains(&b))
}

/// A key's directory: absolute, made of valid names, outside `/nix`.
pub fn check_dest_dir(dir: &str) -> Result<String, String> {
    let trimmed = if dir.len() > 1 {
        dir.trim_end_matches('/')
    } else {
        dir
    };
    if !trimmed.starts_with('/') {
        return Err("must be an absolute path".into());
    }
    if trimmed == "/" {
        return Err("must not be `/`".into());
    }
    if trimmed.len() > 1024 {
        return Err("is longer than 1024 characters".into());
    }
    for part in trimmed[1..].split('/') {
        if !is_valid_key_name(part) {
            return Err(
                "has a part that is not a valid directory name (letters, digits, `.`, `_`, `-`, `+`, `@`; no `.` or `..`)"
                    .into(),
            );
        }
        if part == undo::UNDO_DIR {
            return Err(format!(
                "is inside `{}`, where nix-deploy keeps replaced keys",
                undo::UNDO_DIR
            ));
        }
    }
    if trimmed == "/nix" || trimmed.starts_with("/nix/") {
        return Err("is under /nix: keys must never be in the Nix store".into());
    }
    Ok(trimmed.to_string())
}

/// `0600`, `640`: three or four octal digits.
pub fn check_permissions(mode: &str) -> Result<String, String> {
    let ok = (3..=4).contains(&mode.len()) && mode.bytes().all(|b| (b'0'..=b'7').contains(&b));
    if !ok {
        return Err("is not an octal mode like \"0600\" or \"0640\"".into());
    }
    Ok(if mode.len() == 3 {
        format!("0{mode}")
    } else {
        mode.to_string()
    })
}

/// `upload-keys` as callers spell it (`POST /api/v1/upload-keys`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KeysRequest {
    /// Selectors, as for deployments ([`crate::select`]).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub on: Vec<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub all: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub exclude: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parallel_limit: Option<usize>,
}

impl KeysRequest {
    pub fn selection(&self) -> crate::fleet::Selection {
        crate::fleet::Selection {
            names: self.hosts.clone(),
            tags: self.on.clone(),
            all: self.all,
            exclude: self.exclude.clone(),
        }
    }

    /// The parallel limit, checked, and the selectors' syntax.
    pub fn resolve(&self) -> Result<usize, crate::options::OptionsError> {
        let limit = self.parallel_limit.unwrap_or(crate::exec::DEFAULT_PARALLEL);
        if !(1..=crate::options::MAX_PARALLEL).contains(&limit) {
            return Err(crate::options::OptionsError(format!(
                "parallel-limit must be from 1 to {}, not {limit}",
                crate::options::MAX_PARALLEL
            )));
        }
        crate::select::check(&[self.hosts.clone(), self.on.clone(), self.exclude.clone()].concat())
            .map_err(|e| crate::options::OptionsError(e.to_string()))?;
        Ok(limit)
    }
}

/// The keys uploaded at `when`.
pub fn uploaded_at(keys: &[Key], when: UploadAt) -> Vec<&Key> {
    keys.iter().filter(|k| k.upload_at == when).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn parse(json: serde_json::Value) -> Result<Key, String> {
        parse_key("deployment.keys.db-password", "db-password", json)
    }

    #[test]
    fn keys_take_colmenas_defaults() {
        let key = parse(serde_json::json!({ "hasText": true })).unwrap();
        assert_eq!(key.name, "db-password");
        assert_eq!(key.source, KeySource::Text);
        assert_eq!(key.dest_dir, "/run/keys");
        assert_eq!(key.path(), "/run/keys/db-password");
        assert_eq!((key.user.as_str(), key.group.as_str()), ("root", "root"));
        assert_eq!(key.permissions, "0600");
        assert_eq!(key.upload_at, UploadAt::PreActivation);

        // As our module and colmena's give it: every option, unset ones null.
        let key = parse(serde_json::json!({
            "name": "db.pw", "hasText": false, "keyFile": null,
            "keyCommand": ["pass", "show", "db"], "destDir": "/var/lib/app/",
            "path": "/var/lib/app//db.pw", "user": "postgres", "group": "postgres",
            "permissions": "640", "uploadAt": "post-activation"
        }))
        .unwrap();
        assert_eq!(key.path(), "/var/lib/app/db.pw");
        assert_eq!(
            key.source,
            KeySource::Command(vec!["pass".into(), "show".into(), "db".into()])
        );
        assert_eq!(key.permissions, "0640");
        assert_eq!(key.upload_at, UploadAt::PostActivation);
    }

    #[test]
    fn malformed_keys_are_refused_naming_the_attribute_never_the_value() {
        let bad = |json: serde_json::Value| {
            let e = parse(json.clone()).unwrap_err();
            // No error repeats what was written.
            for value in json.as_object().unwrap().values() {
                if let Some(text) = value.as_str().filter(|t| t.len() > 2) {
                    let said = e.replace("deployment.keys.db-password", "");
                    assert!(!said.contains(text), "{e} repeats {text}");
                }
            }
            e
        };
        let at = |attr: &str| format!("deployment.keys.db-password.{attr}");
        assert!(bad(serde_json::json!({})).contains("needs one of"));
        assert!(
            bad(serde_json::json!({ "hasText": true, "keyFile": "/etc/x" })).contains("only one")
        );
        // A Nix path: the store copy of the flake's source, accepted.
        let key = parse(serde_json::json!({ "keyFile": "/nix/store/abc-source/secret" })).unwrap();
        assert!(key.in_store());
        assert!(bad(serde_json::json!({ "keyFile": "secret" })).contains("absolute"));
        assert!(bad(serde_json::json!({ "keyCommand": [] })).contains("empty list"));
        assert!(
            bad(serde_json::json!({ "keyCommand": "pass show x" })).contains(&format!(
                "{} must be a list of strings, not a string",
                at("keyCommand")
            ))
        );
        let e = bad(serde_json::json!({ "hasText": true, "user": 73194821 }));
        assert_eq!(e, format!("{} must be a string, not a number", at("user")));
        assert!(!e.contains("73194821"));
        assert!(
            bad(serde_json::json!({ "hasText": true, "permissions": "0800" }))
                .contains("octal mode")
        );
        assert!(
            bad(serde_json::json!({ "hasText": true, "permissions": 384 })).contains("decimal")
        );
        assert!(bad(serde_json::json!({ "hasText": true, "permissions": "rw" })).contains("octal"));
        assert!(
            bad(serde_json::json!({ "hasText": true, "user": "root;reboot" }))
                .contains(&format!("{} is not a valid user name", at("user")))
        );
        assert!(bad(serde_json::json!({ "hasText": true, "group": "-g" })).contains("group"));
        assert!(
            bad(serde_json::json!({ "hasText": true, "destDir": "keys" })).contains("absolute")
        );
        assert!(
            bad(serde_json::json!({ "hasText": true, "destDir": "/run/../etc" })).contains("`..`")
        );
        assert!(
            bad(serde_json::json!({ "hasText": true, "destDir": "/nix/store" }))
                .contains("Nix store")
        );
        assert!(
            bad(serde_json::json!({ "hasText": true, "destDir": "/run/a b" }))
                .contains(&at("destDir"))
        );
        assert!(bad(serde_json::json!({ "hasText": true, "name": "../x" })).contains("file name"));
        assert!(bad(serde_json::json!({ "hasText": true, "name": "-rf" })).contains("file name"));
        assert!(
            bad(serde_json::json!({ "hasText": true, "name": ".nix-deploy-undo" }))
                .contains("replaced keys")
        );
        assert!(
            bad(serde_json::json!({ "hasText": true, "destDir": "/run/keys/.nix-deploy-undo/d1" }))
                .contains("replaced keys")
        );
        assert!(
            bad(serde_json::json!({ "hasText": true, "uploadAt": "later" })).contains("uploadAt")
        );
        assert!(
            bad(serde_json::json!({ "hasText": true, "destdir": "/x" }))
                .contains("unknown field `destdir`")
        );
        assert!(
            bad(serde_json::json!({ "hasText": true, "path": "/etc/shadow" }))
                .contains("destDir/name")
        );
        // Contents in the evaluation are a mistake, said without repeating them.
        let e = bad(serde_json::json!({ "text": "hunter2" }));
        assert!(e.contains("`text` reached nix-deploy"), "{e}");
    }

    #[test]
    fn two_keys_may_not_share_a_file() {
        let a = parse(serde_json::json!({ "hasText": true })).unwrap();
        let mut b = a.clone();
        b.attr = "other".into();
        assert!(check_unique_paths(std::slice::from_ref(&a)).is_ok());
        assert!(
            check_unique_paths(&[a, b])
                .unwrap_err()
                .contains("/run/keys/db-password")
        );
    }

    #[test]
    fn secrets_never_print() {
        let secret = Secret::new(b"hunter2".to_vec());
        assert_eq!(format!("{secret:?}"), "Secret(<redacted>)");
        assert_eq!(serde_json::to_string(&secret).unwrap(), "\"<redacted>\"");
        assert_eq!(secret.expose(), b"hunter2");
        // A key never holds its contents at all.
        let key = parse(serde_json::json!({ "hasText": true })).unwrap();
        let json = serde_json::to_string(&key).unwrap();
        assert!(json.contains("\"source\":\"text\""), "{json}");
    }
}
