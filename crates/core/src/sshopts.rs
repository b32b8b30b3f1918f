//! A host's extra ssh options (colmena's `deployment.sshOptions`, deploy-rs's
//! `sshOpts`), as ssh configuration.
//!
//! They are written as ssh's command-line arguments (`[ "-o"
//! "ProxyJump=bastion" "-i" "/keys/deploy" ]`). Our sessions are made by a
//! library that takes a configuration file rather than raw arguments, and
//! that file is also what `ssh -G` and `nix copy` read, so each option is
//! turned into its configuration line (`ProxyJump bastion`), placed before
//! the user's own configuration: in ssh, the first value given wins, as an
//! option on the command line would. Only options that have a configuration
//! keyword are accepted; anything else (port forwardings, `-t`, ...) is an
//! error naming it, and so is anything that could start a second line.

/// Flags without a value, and the configuration line each means.
const FLAGS: [(&str, &str); 8] = [
    ("-4", "AddressFamily inet"),
    ("-6", "AddressFamily inet6"),
    ("-A", "ForwardAgent yes"),
    ("-a", "ForwardAgent no"),
    ("-C", "Compression yes"),
    ("-q", "LogLevel QUIET"),
    ("-v", "LogLevel VERBOSE"),
    ("-x", "ForwardX11 no"),
];

/// Flags with a value, and the keyword the value belongs to.
const WITH_VALUE: [(&str, &str); 9] = [
    ("-i", "IdentityFile"),
    ("-J", "ProxyJump"),
    ("-p", "Port"),
    ("-l", "User"),
    ("-c", "Ciphers"),
    ("-m", "MACs"),
    ("-b", "BindAddress"),
    ("-F", "Include"),
    ("-o", ""),
];

fn printable(word: &str) -> bool {
    !word.is_empty() && !word.chars().any(char::is_control)
}

/// The configuration lines `options` mean, in their order; an error names
/// the option that cannot be used (options are not secrets; values are
/// never repeated all the same).
pub fn config_lines(options: &[String]) -> Result<Vec<String>, String> {
    let mut lines = Vec::new();
    let mut words = options.iter().enumerate();
    while let Some((i, word)) = words.next() {
        if !printable(word) {
            return Err(format!("word {i} is empty or holds control characters"));
        }
        if let Some((_, line)) = FLAGS.iter().find(|(flag, _)| flag == word) {
            lines.push(line.to_string());
            continue;
        }
        let Some((flag, keyword)) = WITH_VALUE.iter().find(|(flag, _)| word.starts_with(flag))
        else {
            return Err(format!(
                "`{}` is not an ssh option nix-deploy can pass on (use `-o Keyword=value`)",
                word.split_once(['=', ' '])
                    .map_or(word.as_str(), |(w, _)| w)
            ));
        };
        // `-oKey=value` or `-o` `Key=value`.
        let value = match word.strip_prefix(flag).filter(|rest| !rest.is_empty()) {
            Some(rest) => rest.to_string(),
            None => match words.next() {
                Some((_, value)) if printable(value) => value.clone(),
                _ => return Err(format!("`{flag}` needs a value")),
            },
        };
        let value = value.trim();
        if keyword.is_empty() {
            let Some((key, setting)) = value
                .split_once('=')
                .or_else(|| value.split_once(char::is_whitespace))
            else {
                return Err(format!("`-o` takes `Keyword=value`, word {i} has no `=`"));
            };
            let (key, setting) = (key.trim(), setting.trim());
            if key.is_empty()
                || !key.bytes().all(|b| b.is_ascii_alphanumeric())
                || setting.is_empty()
            {
                return Err(format!("`-o` takes `Keyword=value` (word {i})"));
            }
            lines.push(format!("{key} {setting}"));
        } else {
            lines.push(format!("{keyword} {value}"));
        }
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn options_become_configuration_lines_in_order() {
        assert_eq!(
            config_lines(&words(&[
                "-o",
                "ProxyJump=bastion",
                "-oServerAliveInterval=5",
                "-i",
                "/keys/deploy",
                "-A",
                "-p2222",
                "-o",
                "User deploy"
            ]))
            .unwrap(),
            [
                "ProxyJump bastion",
                "ServerAliveInterval 5",
                "IdentityFile /keys/deploy",
                "ForwardAgent yes",
                "Port 2222",
                "User deploy"
            ]
        );
        assert!(config_lines(&[]).unwrap().is_empty());
    }

    #[test]
    fn what_has_no_configuration_keyword_or_could_add_a_line_is_refused() {
        for bad in [
            &["-L", "8080:localhost:80"][..],
            &["-t"][..],
            &["-o"][..],
            &["-o", "ProxyJump"][..],
            &["-o", "Proxy\nCommand=x"][..],
            &["-i", ""][..],
            &["-o", "Bad-Key=x"][..],
        ] {
            assert!(config_lines(&words(bad)).is_err(), "{bad:?}");
        }
        let e = config_lines(&words(&["-R", "secret-value"])).unwrap_err();
        assert!(e.contains("`-R`") && !e.contains("secret-value"), "{e}");
    }
}
