//! The one shell-quoting helper, and validation of names that end up on remote
//! command lines.
//!
//! Remote commands are argument vectors; the SSH layer quotes each argument with
//! [`quote`] before the remote shell sees it. Nothing else in the crate pastes
//! text into a shell string.

/// Quote `s` for a POSIX shell: safe words stay as they are, everything else is
/// wrapped in single quotes with embedded single quotes escaped.
pub fn quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:@,+%".contains(&b))
    {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for ch in s.chars() {
        if ch == '\'' {
            out.push_str("'\\''");
        } else {
            out.push(ch);
        }
    }
    out.push('\'');
    out
}

/// Quote every word and join them with spaces.
pub fn join<S: AsRef<str>>(words: &[S]) -> String {
    words
        .iter()
        .map(|w| quote(w.as_ref()))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A host name as used in `nixosConfigurations.<name>`: letters, digits, `-`, `_`, `.`,
/// starting with a letter or digit.
pub fn is_valid_host_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// An SSH destination (host name, alias or address). Must not start with `-`, so it
/// can never be taken for an ssh option.
pub fn is_valid_ssh_destination(target: &str) -> bool {
    !target.is_empty()
        && target.len() <= 253
        && !target.starts_with('-')
        && target
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:[]%".contains(&b))
}

/// A Unix user name.
pub fn is_valid_user(user: &str) -> bool {
    !user.is_empty()
        && user.len() <= 32
        && !user.starts_with('-')
        && user
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

/// A systemd unit name (`nginx`, `nginx.service`, `getty@tty1.service`).
pub fn is_valid_unit_name(unit: &str) -> bool {
    !unit.is_empty()
        && unit.len() <= 255
        && !unit.starts_with('-')
        && unit
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b":-_.@\\".contains(&b))
}

/// A Nix store path: `/nix/store/<32 base-32 chars>-<name>`.
pub fn is_valid_store_path(path: &str) -> bool {
    let Some(rest) = path.strip_prefix("/nix/store/") else {
        return false;
    };
    let Some((hash, name)) = rest.split_at_checked(32) else {
        return false;
    };
    let nix_base32 = |b: u8| b"0123456789abcdfghijklmnpqrsvwxyz".contains(&b);
    hash.bytes().all(nix_base32)
        && name.starts_with('-')
        && name.len() > 1
        && name[1..]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+-._?=".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_only_when_needed() {
        assert_eq!(quote("readlink"), "readlink");
        assert_eq!(
            quote("/nix/var/nix/profiles/system"),
            "/nix/var/nix/profiles/system"
        );
        assert_eq!(quote(""), "''");
        assert_eq!(quote("a b"), "'a b'");
        assert_eq!(quote("it's"), "'it'\\''s'");
        assert_eq!(quote("$(reboot)"), "'$(reboot)'");
        assert_eq!(join(&["echo", "a;b"]), "echo 'a;b'");
    }

    #[test]
    fn validates_names() {
        assert!(is_valid_host_name("p620"));
        assert!(is_valid_host_name("web-1.example"));
        assert!(!is_valid_host_name("-oProxyCommand=x"));
        assert!(!is_valid_host_name("a b"));
        assert!(!is_valid_host_name("a;b"));
        assert!(is_valid_ssh_destination("10.0.0.1"));
        assert!(is_valid_ssh_destination("[::1]"));
        assert!(!is_valid_ssh_destination("-oProxyCommand=touch"));
        assert!(!is_valid_ssh_destination("host$(x)"));
        assert!(is_valid_user("deploy"));
        assert!(!is_valid_user("root;x"));
        assert!(is_valid_unit_name("nginx.service"));
        assert!(is_valid_unit_name("getty@tty1.service"));
        assert!(!is_valid_unit_name("nginx; reboot"));
    }

    #[test]
    fn validates_store_paths() {
        assert!(is_valid_store_path(
            "/nix/store/q4zfsrsm5n0vhqjrgz2c1lc78slrrsmw-nixos-system-p620-24.05"
        ));
        assert!(!is_valid_store_path("/nix/store/short-name"));
        assert!(!is_valid_store_path(
            "/nix/store/q4zfsrsm5n0vhqjrgz2c1lc78slrrsmw-x;reboot"
        ));
        assert!(!is_valid_store_path(
            "/tmp/q4zfsrsm5n0vhqjrgz2c1lc78slrrsmw-x"
        ));
        // 'e', 'o', 'u', 't' are not in Nix's base-32 alphabet.
        assert!(!is_valid_store_path(
            "/nix/store/eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee-x"
        ));
    }
}
