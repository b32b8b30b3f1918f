//! The one shell-quoting helper, and validation of names that end up on remote
//! command lines.
//!
//! Remote commands are argument vectors; the SSH layer quotes each argument with
//! [`quote`] before the remote shell sees it. Nothing else in the crate pastes
//! text into a shell string.
//!
//! The quoting itself is the `shlex` crate's (maintained, fuzzed against real
//! shells): it quotes every character that any POSIX shell, bash, zsh or fish
//! may treat specially in some position, including `=` (`FOO=bar` as the
//! first word would be an assignment), `{`/`}` and `,` (brace expansion), `%`
//! (job specifications), `~`, `#`, and every non-ASCII byte (a legacy locale
//! may count some as blanks).

use std::borrow::Cow;

/// A word that no shell argument can carry: it holds a NUL byte (the kernel
/// ends every argument at the first one).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("an argument contains a NUL byte, which no command line can carry")]
pub struct NulByte;

/// Quote `word` for the remote shell (POSIX `sh`, bash, zsh, fish): the
/// program receives exactly `word` as one argument. Words made only of
/// letters, digits and `+-./:@]_` stay as they are.
pub fn quote(word: &str) -> Result<Cow<'_, str>, NulByte> {
    shlex::try_quote(word).map_err(|_| NulByte)
}

/// Quote every word and join them with spaces, for people to read (messages,
/// tables; never executed). A NUL byte, which [`quote`] refuses, shows as
/// `\0`.
pub fn join<S: AsRef<str>>(words: &[S]) -> String {
    words
        .iter()
        .map(|w| {
            let word = w.as_ref();
            match quote(word) {
                Ok(quoted) => quoted.into_owned(),
                Err(NulByte) => quote(&word.replace('\0', "\\0"))
                    .map(Cow::into_owned)
                    .unwrap_or_default(),
            }
        })
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
    fn quotes_exactly_what_a_shell_could_misread() {
        let q = |word: &str| quote(word).unwrap().into_owned();
        // Plain words stay as they are.
        assert_eq!(q("readlink"), "readlink");
        assert_eq!(
            q("/nix/var/nix/profiles/system"),
            "/nix/var/nix/profiles/system"
        );
        assert_eq!(q("root@host:22"), "root@host:22");
        assert_eq!(q("-p+x.y_z"), "-p+x.y_z");
        // Everything else is quoted.
        assert_eq!(q(""), "''");
        assert_eq!(q("a b"), "'a b'");
        assert_eq!(q("$(reboot)"), "'$(reboot)'");
        assert_eq!(q("it's"), r#""it's""#);
        assert_eq!(q(r#"$x`y`"z\"#), r#"'$x`y`"z'"\\""#);
        // An assignment as the first word would set a variable, not run it.
        assert_eq!(q("FOO=bar"), "'FOO=bar'");
        assert_eq!(q("--opt=value"), "'--opt=value'");
        // Brace expansion, job specifications, home directories, comments.
        assert_eq!(q("{a,b}"), "'{a,b}'");
        assert_eq!(q("{"), "'{'");
        assert_eq!(q("a,b"), "'a,b'");
        assert_eq!(q("%1"), "'%1'");
        assert_eq!(q("~root"), "'~root'");
        assert_eq!(q("#x"), "'#x'");
        assert_eq!(q("*.nix"), "'*.nix'");
        // Non-ASCII is quoted, byte for byte.
        assert_eq!(q("héllo"), "'héllo'");
        assert_eq!(q("a\u{a0}b"), "'a\u{a0}b'");
        // Control characters travel inside quotes.
        assert_eq!(q("a\nb"), "'a\nb'");
        assert_eq!(quote("a\0b"), Err(NulByte));
        assert_eq!(join(&["echo", "a;b", "FOO=bar"]), "echo 'a;b' 'FOO=bar'");
        assert_eq!(join(&["printf", "a\0b"]), r#"printf "a\\0b""#);
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
