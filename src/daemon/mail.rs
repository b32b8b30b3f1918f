//! E-mail over SMTP (`lettre`, TLS by rustls): `[smtp]` in the daemon's
//! TOML says which server and how, `notifications.email-to` who is told.
//! One message per notice, to every recipient, with a timeout; the password
//! comes from a file and never prints.

use std::path::PathBuf;
use std::time::Duration;

use lettre::message::{Mailbox, header::ContentType};
use lettre::transport::smtp::authentication::Credentials;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use serde::Deserialize;

use super::config::{ConfigError, Secret};

/// How the connection to the SMTP server is protected.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Security {
    /// Plain connection upgraded with STARTTLS (required), port 587.
    #[default]
    Starttls,
    /// TLS from the first byte, port 465.
    Tls,
    /// No encryption (a relay on this machine), port 25; no credentials.
    None,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct SmtpConfig {
    /// The server's host name (what its certificate names).
    pub server: String,
    /// Default: 587 (starttls), 465 (tls), 25 (none).
    pub port: Option<u16>,
    #[serde(default)]
    pub security: Security,
    pub username: Option<String>,
    /// File holding the password (never in the config).
    pub password_file: Option<PathBuf>,
    /// `nix-deploy <nix-deploy@example.org>`.
    pub from: String,
    /// For one message, connection included.
    #[serde(default = "default_timeout", with = "nix_deploy_core::duration::human")]
    pub timeout: Duration,
}

fn default_timeout() -> Duration {
    Duration::from_secs(30)
}

impl SmtpConfig {
    pub fn validate(&self, recipients: &[String]) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if self.server.is_empty()
            || !self
                .server
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':'))
        {
            return invalid(format!("smtp.server `{}` is not a host name", self.server));
        }
        if self.port == Some(0) {
            return invalid("smtp.port must be from 1 to 65535".into());
        }
        if !(Duration::from_secs(1)..=Duration::from_secs(600)).contains(&self.timeout) {
            return invalid("smtp.timeout must be from 1s to 10m".into());
        }
        self.from
            .parse::<Mailbox>()
            .map_err(|e| ConfigError::Invalid(format!("smtp.from `{}`: {e}", self.from)))?;
        if self.username.is_some() != self.password_file.is_some() {
            return invalid("smtp.username and smtp.password-file go together".into());
        }
        if self.security == Security::None && self.username.is_some() {
            return invalid(
                "smtp.security = \"none\" would send the password in the clear: use starttls or tls"
                    .into(),
            );
        }
        if recipients.is_empty() {
            return invalid("[smtp] is set but notifications.email-to names no recipient".into());
        }
        for to in recipients {
            to.parse::<Mailbox>()
                .map_err(|e| ConfigError::Invalid(format!("notifications.email-to `{to}`: {e}")))?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("e-mail to {to} through {server}: {message}")]
pub struct MailError {
    to: String,
    server: String,
    message: String,
}

/// Sends notices by e-mail.
#[derive(Clone)]
pub struct Mailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    server: String,
    from: Mailbox,
    to: Vec<Mailbox>,
    timeout: Duration,
}

impl std::fmt::Debug for Mailer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mailer")
            .field("server", &self.server)
            .finish()
    }
}

impl Mailer {
    /// A mailer for a validated config; `password` read from its file.
    pub fn new(
        config: &SmtpConfig,
        password: Option<Secret>,
        recipients: &[String],
    ) -> Result<Self, ConfigError> {
        let tls_error =
            |e: lettre::transport::smtp::Error| ConfigError::Invalid(format!("smtp.server: {e}"));
        let mut builder = match config.security {
            Security::Starttls => {
                AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(&config.server)
                    .map_err(tls_error)?
            }
            Security::Tls => {
                AsyncSmtpTransport::<Tokio1Executor>::relay(&config.server).map_err(tls_error)?
            }
            Security::None => {
                AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(config.server.clone())
                    .port(25)
            }
        };
        if let Some(port) = config.port {
            builder = builder.port(port);
        }
        if let (Some(user), Some(password)) = (&config.username, password) {
            builder = builder.credentials(Credentials::new(
                user.clone(),
                String::from_utf8_lossy(password.expose()).into_owned(),
            ));
        }
        let parse = |text: &str| {
            text.parse::<Mailbox>()
                .map_err(|e| ConfigError::Invalid(format!("`{text}`: {e}")))
        };
        Ok(Mailer {
            transport: builder.timeout(Some(config.timeout)).build(),
            server: config.server.clone(),
            from: parse(&config.from)?,
            to: recipients
                .iter()
                .map(|r| parse(r))
                .collect::<Result<_, _>>()?,
            timeout: config.timeout,
        })
    }

    /// Send one message to every recipient. `message_id` (without angle
    /// brackets) is stable for one notice, so a message sent again after a
    /// restart is recognisably the same.
    pub async fn send(&self, subject: &str, body: &str, message_id: &str) -> Result<(), MailError> {
        let fail = |message: String| MailError {
            to: self
                .to
                .iter()
                .map(|m| m.email.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            server: self.server.clone(),
            message,
        };
        let mut message = Message::builder()
            .from(self.from.clone())
            .subject(subject)
            .message_id(Some(format!("<{message_id}@nix-deploy>")))
            .header(ContentType::TEXT_PLAIN);
        for to in &self.to {
            message = message.to(to.clone());
        }
        let message = message
            .body(body.to_string())
            .map_err(|e| fail(e.to_string()))?;
        // The transport's timeout covers each command; this, the whole.
        match tokio::time::timeout(self.timeout * 2, self.transport.send(message)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(fail(e.to_string())),
            Err(_) => Err(fail(format!(
                "no answer within {}s",
                (self.timeout * 2).as_secs()
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> SmtpConfig {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn validation_names_the_key() {
        let ok = config("server = \"smtp.example.org\"\nfrom = \"nix-deploy <nd@example.org>\"");
        assert_eq!(ok.security, Security::Starttls);
        assert!(ok.validate(&["ops@example.org".into()]).is_ok());
        let e = |c: &SmtpConfig, to: &[&str]| {
            let to: Vec<String> = to.iter().map(|s| s.to_string()).collect();
            c.validate(&to).unwrap_err().to_string()
        };
        assert!(e(&ok, &[]).contains("email-to"));
        assert!(e(&ok, &["not an address"]).contains("notifications.email-to"));
        let bad_from = config("server = \"smtp.example.org\"\nfrom = \"x\"");
        assert!(e(&bad_from, &["a@b.c"]).contains("smtp.from"));
        let clear = config(
            "server = \"smtp.example.org\"\nfrom = \"a@b.c\"\nsecurity = \"none\"\nusername = \"u\"\npassword-file = \"/p\"",
        );
        assert!(e(&clear, &["a@b.c"]).contains("in the clear"));
        let half = config("server = \"smtp.example.org\"\nfrom = \"a@b.c\"\nusername = \"u\"");
        assert!(e(&half, &["a@b.c"]).contains("password-file"));
        let slow = config("server = \"smtp.example.org\"\nfrom = \"a@b.c\"\ntimeout = \"1h\"");
        assert!(e(&slow, &["a@b.c"]).contains("smtp.timeout"));
        let evil = config("server = \"smtp.example.org;x\"\nfrom = \"a@b.c\"");
        assert!(e(&evil, &["a@b.c"]).contains("smtp.server"));
        assert!(
            format!("{:?}", Mailer::new(&ok, None, &["a@b.c".into()]).unwrap())
                .contains("smtp.example.org")
        );
    }
}
