//! Sessions for people: a login with an API token makes a session, held in
//! memory and named by a random id in an `HttpOnly`, `SameSite=Strict`
//! cookie (`Secure` when the dashboard is served over TLS). The session
//! keeps the token's *name*, never its secret, and every request looks the
//! token up again for its scope.
//!
//! Bounded: at most `max-sessions` are held; a new login beyond that drops
//! the expired ones, then the least recently used. Logins are rate limited
//! per client address and in total ([`LoginLimiter`]). Sessions live in
//! memory only: a restarted daemon asks people to log in again.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::csrf;

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "nix_deploy_session";

/// One person's login.
#[derive(Clone, Debug)]
pub struct Session {
    /// The name of the token they logged in with.
    pub token: String,
    /// The CSRF token every state-changing request of this session carries.
    pub csrf: String,
    expires: Instant,
    last_used: Instant,
}

/// The sessions of everyone logged in, by the SHA-256 of their id (the id
/// itself is only ever in the cookie).
pub struct Sessions {
    by_id: Mutex<HashMap<[u8; 32], Session>>,
    ttl: Duration,
    max: usize,
}

fn key(id: &str) -> [u8; 32] {
    Sha256::digest(id.as_bytes()).into()
}

impl Sessions {
    pub fn new(ttl: Duration, max: usize) -> Self {
        Sessions {
            by_id: Mutex::new(HashMap::new()),
            ttl,
            max: max.max(1),
        }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// A new session for `token`: its id (for the cookie) and the session.
    pub fn create(&self, token: &str) -> (String, Session) {
        self.create_at(token, Instant::now())
    }

    fn create_at(&self, token: &str, now: Instant) -> (String, Session) {
        let id = csrf::random_token();
        let session = Session {
            token: token.to_string(),
            csrf: csrf::random_token(),
            expires: now + self.ttl,
            last_used: now,
        };
        let mut by_id = self.by_id.lock().unwrap_or_else(|p| p.into_inner());
        if by_id.len() >= self.max {
            by_id.retain(|_, s| s.expires > now);
        }
        while by_id.len() >= self.max {
            let Some(oldest) = by_id
                .iter()
                .min_by_key(|(_, s)| s.last_used)
                .map(|(k, _)| *k)
            else {
                break;
            };
            by_id.remove(&oldest);
        }
        by_id.insert(key(&id), session.clone());
        (id, session)
    }

    /// The live session with this id (an expired one is dropped).
    pub fn get(&self, id: &str) -> Option<Session> {
        self.get_at(id, Instant::now())
    }

    fn get_at(&self, id: &str, now: Instant) -> Option<Session> {
        let mut by_id = self.by_id.lock().unwrap_or_else(|p| p.into_inner());
        let k = key(id);
        let session = by_id.get_mut(&k)?;
        if session.expires <= now {
            by_id.remove(&k);
            return None;
        }
        session.last_used = now;
        Some(session.clone())
    }

    /// Log out.
    pub fn remove(&self, id: &str) {
        self.by_id
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key(id));
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.by_id.lock().unwrap().len()
    }
}

/// Client addresses counted at once; beyond this, new addresses share the
/// fleet-wide limit only (the map never grows without bound).
const MAX_PEERS: usize = 10_000;

/// Login attempts per minute: `per_peer` from one client address, ten times
/// that from everyone together (a guesser spread over many addresses).
/// Fixed one-minute windows.
pub struct LoginLimiter {
    per_peer: u32,
    window: Mutex<Window>,
}

struct Window {
    started: Instant,
    total: u32,
    by_peer: HashMap<IpAddr, u32>,
}

impl LoginLimiter {
    pub fn new(per_peer: u32) -> Self {
        LoginLimiter {
            per_peer: per_peer.max(1),
            window: Mutex::new(Window {
                started: Instant::now(),
                total: 0,
                by_peer: HashMap::new(),
            }),
        }
    }

    /// Count an attempt; `Err(wait)` when it is over the limit.
    pub fn attempt(&self, peer: Option<IpAddr>) -> Result<(), Duration> {
        self.attempt_at(peer, Instant::now())
    }

    fn attempt_at(&self, peer: Option<IpAddr>, now: Instant) -> Result<(), Duration> {
        const MINUTE: Duration = Duration::from_secs(60);
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        if now.duration_since(w.started) >= MINUTE {
            w.started = now;
            w.total = 0;
            w.by_peer.clear();
        }
        let wait = MINUTE.saturating_sub(now.duration_since(w.started));
        if w.total >= self.per_peer.saturating_mul(10) {
            return Err(wait);
        }
        if let Some(peer) = peer
            && (w.by_peer.len() < MAX_PEERS || w.by_peer.contains_key(&peer))
        {
            let count = w.by_peer.entry(peer).or_insert(0);
            if *count >= self.per_peer {
                return Err(wait);
            }
            *count += 1;
        }
        w.total += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_expire_and_stay_bounded() {
        let sessions = Sessions::new(Duration::from_secs(60), 3);
        let t0 = Instant::now();
        let (a, _) = sessions.create_at("ci", t0);
        assert_eq!(sessions.get_at(&a, t0).unwrap().token, "ci");
        assert!(sessions.get_at("not-a-session", t0).is_none());
        // Expired: gone, and dropped from the store.
        assert!(sessions.get_at(&a, t0 + Duration::from_secs(61)).is_none());
        assert_eq!(sessions.len(), 0);

        // Full: the least recently used goes first.
        let (b, _) = sessions.create_at("ci", t0);
        let (c, _) = sessions.create_at("ci", t0 + Duration::from_secs(1));
        let (d, _) = sessions.create_at("ci", t0 + Duration::from_secs(2));
        sessions.get_at(&b, t0 + Duration::from_secs(3));
        let (e, _) = sessions.create_at("ci", t0 + Duration::from_secs(4));
        assert_eq!(sessions.len(), 3);
        let now = t0 + Duration::from_secs(5);
        assert!(
            sessions.get_at(&c, now).is_none(),
            "c was least recently used"
        );
        for id in [&b, &d, &e] {
            assert!(sessions.get_at(id, now).is_some());
        }
        sessions.remove(&b);
        assert!(sessions.get_at(&b, now).is_none());
    }

    #[test]
    fn sessions_have_their_own_random_ids_and_csrf_tokens() {
        let sessions = Sessions::new(Duration::from_secs(60), 10);
        let (a, sa) = sessions.create("ci");
        let (b, sb) = sessions.create("ci");
        assert_ne!(a, b);
        assert_ne!(sa.csrf, sb.csrf);
        assert_eq!(a.len(), 64);
    }

    #[test]
    fn logins_are_limited_per_address_and_in_total() {
        let limiter = LoginLimiter::new(3);
        let t0 = Instant::now();
        let one: IpAddr = "127.0.0.1".parse().unwrap();
        let two: IpAddr = "127.0.0.2".parse().unwrap();
        for _ in 0..3 {
            assert!(limiter.attempt_at(Some(one), t0).is_ok());
        }
        let wait = limiter.attempt_at(Some(one), t0).unwrap_err();
        assert!(wait <= Duration::from_secs(60));
        // Another address has its own allowance…
        assert!(limiter.attempt_at(Some(two), t0).is_ok());
        // …and a minute later the first one has again.
        assert!(
            limiter
                .attempt_at(Some(one), t0 + Duration::from_secs(61))
                .is_ok()
        );
        // Everyone together: at most ten times one address's allowance.
        let limiter = LoginLimiter::new(1);
        for i in 0..10u8 {
            let peer: IpAddr = format!("127.0.1.{i}").parse().unwrap();
            assert!(limiter.attempt_at(Some(peer), t0).is_ok());
        }
        let fresh: IpAddr = "127.0.2.1".parse().unwrap();
        assert!(limiter.attempt_at(Some(fresh), t0).is_err());
    }
}
