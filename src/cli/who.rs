//! Who runs a command, for the history and the audit trail.

use crate::paths;

/// Who runs this command, for the history: the user behind `sudo`, else the
/// login user, else the name of our uid, else the uid; `@` the machine.
pub(super) fn who() -> String {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    let user = var("SUDO_USER")
        .or_else(|| var("USER"))
        .or_else(|| var("LOGNAME"))
        .unwrap_or_else(|| {
            let uid = paths::current_uid();
            std::fs::read_to_string("/etc/passwd")
                .ok()
                .and_then(|passwd| user_of_uid(&passwd, uid))
                .unwrap_or_else(|| format!("uid {uid}"))
        });
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    if host.is_empty() {
        user
    } else {
        format!("{user}@{host}")
    }
}

/// The name of `uid` in an `/etc/passwd` text.
fn user_of_uid(passwd: &str, uid: u32) -> Option<String> {
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        let id: u32 = fields.nth(1)?.parse().ok()?;
        (id == uid && !name.is_empty()).then(|| name.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_user_by_uid() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\nalice:x:1000:1000::/home/alice:/bin/sh\n";
        assert_eq!(user_of_uid(passwd, 1000).as_deref(), Some("alice"));
        assert_eq!(user_of_uid(passwd, 0).as_deref(), Some("root"));
        assert_eq!(user_of_uid(passwd, 7), None);
    }
}
