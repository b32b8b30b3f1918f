//! The operation generator: pure and seeded. It knows nothing of how an
//! operation turned out, only what it generated before (which host is
//! frozen or stopped, whether the ssh config is swapped, whether a
//! deployment was interrupted), so one seed always gives the same sequence
//! of operations and parameters, whatever the hosts did.

use std::collections::BTreeSet;
use std::fmt;

use rand::{RngExt, SeedableRng};
use rand_pcg::Pcg64;

/// The campaign's hosts; the last one is deployed as a non-root user
/// through sudo.
pub const HOSTS: [&str; 4] = ["alpha", "bravo", "charlie", "delta"];
/// `deployment.targetUser` of the last host.
pub const NON_ROOT_USER: &str = "deployer";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Goal {
    Switch,
    Boot,
    Test,
    DryActivate,
}

impl Goal {
    pub fn as_str(self) -> &'static str {
        match self {
            Goal::Switch => "switch",
            Goal::Boot => "boot",
            Goal::Test => "test",
            Goal::DryActivate => "dry-activate",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    Smart,
    Parallel,
    Rolling,
    Canary,
    BlueGreen,
}

impl Strategy {
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Smart => "smart",
            Strategy::Parallel => "parallel",
            Strategy::Rolling => "rolling",
            Strategy::Canary => "canary",
            Strategy::BlueGreen => "blue-green",
        }
    }
}

/// When a deployment is interrupted: the `nth` (from 1) progress line of
/// the coordinator's that contains `word` (`activating`, `deployed`, ...).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Moment {
    pub word: &'static str,
    pub nth: usize,
}

/// Progress words the coordinator prints (`HOST: WORD`), one per step.
pub const MOMENTS: [&str; 8] = [
    "building",
    "copying",
    "setting profile",
    "activating",
    "validating",
    "confirming",
    "rolling back",
    "deployed",
];

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Interrupt {
    /// `nix-deploy cancel` at that moment.
    Cancel(Moment),
    /// SIGKILL of the coordinator at that moment.
    Kill(Moment),
}

/// What a service of a host's next system does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServiceFault {
    Healthy,
    /// Comes up this many milliseconds after the switch.
    Slow(u64),
    /// Failed after the switch (health checks fail).
    Failing,
    /// `switch-to-configuration` itself exits 4.
    FailSwitch,
}

/// What an operator does on a host by hand, over ssh.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Manual {
    /// `nix-env --rollback` and `switch-to-configuration switch`.
    Rollback,
    /// `nix-env --switch-generation` to the generation this many before
    /// the current one (the first if there are fewer), and switch.
    Generation(u32),
    /// Build, copy, set the profile and switch the flake's system by hand.
    Provision,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Deploy {
        /// Host indices; empty: every host.
        hosts: Vec<usize>,
        goal: Goal,
        strategy: Strategy,
        /// `--reboot` (switch and boot only).
        reboot: bool,
        /// `--max-failures`.
        max_failures: u32,
        interrupt: Option<Interrupt>,
    },
    /// `resume` of the last deployment a `Deploy` started.
    Resume,
    Rollback {
        host: usize,
        /// `--to-generation` this many before the current; `None`: the default.
        back: Option<u32>,
    },
    Exec {
        hosts: Vec<usize>,
    },
    UploadKeys {
        hosts: Vec<usize>,
    },
    Manual {
        host: usize,
        what: Manual,
    },
    /// A new generation of these hosts in the flake.
    EditFlake {
        hosts: Vec<usize>,
    },
    /// A host's service behaves like this from its next system on.
    Service {
        host: usize,
        fault: ServiceFault,
    },
    SwapSsh {
        a: usize,
        b: usize,
    },
    CorrectSsh,
    Freeze {
        host: usize,
    },
    Thaw {
        host: usize,
    },
    /// Every process of the host killed (its sshd too), like a power cut
    /// that keeps `/run`.
    StopHost {
        host: usize,
    },
    StartHost {
        host: usize,
    },
    Reboot {
        host: usize,
    },
}

fn names(hosts: &[usize]) -> String {
    if hosts.is_empty() {
        "all".to_string()
    } else {
        hosts
            .iter()
            .map(|&h| HOSTS[h])
            .collect::<Vec<_>>()
            .join(",")
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Deploy {
                hosts,
                goal,
                strategy,
                reboot,
                max_failures,
                interrupt,
            } => {
                write!(
                    f,
                    "deploy {} --goal {} --strategy {} --max-failures {max_failures}{}",
                    names(hosts),
                    goal.as_str(),
                    strategy.as_str(),
                    if *reboot { " --reboot" } else { "" }
                )?;
                match interrupt {
                    Some(Interrupt::Cancel(m)) => write!(f, ", cancel at {:?} #{}", m.word, m.nth),
                    Some(Interrupt::Kill(m)) => write!(f, ", kill -9 at {:?} #{}", m.word, m.nth),
                    None => Ok(()),
                }
            }
            Op::Resume => write!(f, "resume"),
            Op::Rollback { host, back } => match back {
                Some(n) => write!(f, "rollback {} --to-generation current-{n}", HOSTS[*host]),
                None => write!(f, "rollback {}", HOSTS[*host]),
            },
            Op::Exec { hosts } => write!(f, "exec {} -- cat /run/testkit-host", names(hosts)),
            Op::UploadKeys { hosts } => write!(f, "upload-keys {}", names(hosts)),
            Op::Manual { host, what } => write!(f, "manual {what:?} on {}", HOSTS[*host]),
            Op::EditFlake { hosts } => write!(f, "flake edit: new generation of {}", names(hosts)),
            Op::Service { host, fault } => {
                write!(f, "flake edit: {}'s service {fault:?}", HOSTS[*host])
            }
            Op::SwapSsh { a, b } => write!(f, "ssh config: swap {} and {}", HOSTS[*a], HOSTS[*b]),
            Op::CorrectSsh => write!(f, "ssh config: corrected"),
            Op::Freeze { host } => write!(f, "freeze {} (SIGSTOP)", HOSTS[*host]),
            Op::Thaw { host } => write!(f, "thaw {}", HOSTS[*host]),
            Op::StopHost { host } => write!(f, "kill every process of {} (sshd too)", HOSTS[*host]),
            Op::StartHost { host } => write!(f, "start {} again", HOSTS[*host]),
            Op::Reboot { host } => write!(f, "reboot {}", HOSTS[*host]),
        }
    }
}

/// The seeded generator and what it generated so far.
pub struct Generator {
    rng: Pcg64,
    swapped: Option<(usize, usize)>,
    frozen: BTreeSet<usize>,
    stopped: BTreeSet<usize>,
    /// A deployment was interrupted since the last resume.
    interrupted: bool,
    /// Operations since the ssh config was swapped.
    since_swap: u32,
    /// The ssh config was just corrected: a deployment of a swapped host
    /// is what shows whether a connection still goes to the wrong machine.
    corrected: Option<(usize, usize)>,
}

impl Generator {
    pub fn new(seed: u64) -> Self {
        Generator {
            rng: Pcg64::seed_from_u64(seed),
            swapped: None,
            frozen: BTreeSet::new(),
            stopped: BTreeSet::new(),
            interrupted: false,
            since_swap: 0,
            corrected: None,
        }
    }

    fn host(&mut self) -> usize {
        self.rng.random_range(0..HOSTS.len())
    }

    fn up_host(&mut self) -> Option<usize> {
        let up: Vec<usize> = (0..HOSTS.len())
            .filter(|h| !self.frozen.contains(h) && !self.stopped.contains(h))
            .collect();
        if up.is_empty() {
            None
        } else {
            Some(up[self.rng.random_range(0..up.len())])
        }
    }

    /// Some hosts (empty: all of them, half of the time).
    fn selection(&mut self) -> Vec<usize> {
        if self.rng.random_bool(0.5) {
            return Vec::new();
        }
        let mut hosts: Vec<usize> = (0..HOSTS.len())
            .filter(|_| self.rng.random_bool(0.5))
            .collect();
        if hosts.is_empty() {
            hosts.push(self.host());
        }
        hosts
    }

    fn deploy(&mut self, hosts: Vec<usize>) -> Op {
        let strategy = match self.rng.random_range(0..10) {
            0..=3 => Strategy::Smart,
            4..=5 => Strategy::Parallel,
            6..=7 => Strategy::Rolling,
            8 => Strategy::Canary,
            _ => Strategy::BlueGreen,
        };
        let goal = if strategy == Strategy::BlueGreen {
            Goal::Switch
        } else {
            match self.rng.random_range(0..10) {
                0..=4 => Goal::Switch,
                5..=6 => Goal::Boot,
                7..=8 => Goal::Test,
                _ => Goal::DryActivate,
            }
        };
        let reboot = matches!(goal, Goal::Switch | Goal::Boot)
            && strategy != Strategy::BlueGreen
            && self.rng.random_bool(0.1);
        let max_failures = self.rng.random_range(0..2);
        let interrupt = match self.rng.random_range(0..10) {
            // Killed once its first host is done: the rest is left to `resume`.
            0 if strategy == Strategy::Rolling => Some(Interrupt::Kill(Moment {
                word: "deployed",
                nth: 1,
            })),
            0..=1 => Some(Interrupt::Kill(self.moment())),
            2 => Some(Interrupt::Cancel(self.moment())),
            _ => None,
        };
        if interrupt.is_some() {
            self.interrupted = true;
        }
        Op::Deploy {
            hosts,
            goal,
            strategy,
            reboot,
            max_failures,
            interrupt,
        }
    }

    fn moment(&mut self) -> Moment {
        Moment {
            word: MOMENTS[self.rng.random_range(0..MOMENTS.len())],
            nth: self.rng.random_range(1..3),
        }
    }

    /// The next operation.
    pub fn next_op(&mut self) -> Op {
        let op = self.choose();
        self.note(&op);
        op
    }

    fn choose(&mut self) -> Op {
        // A corrected ssh config is followed by a deployment of a host that
        // was swapped, half of the time.
        if let Some((a, b)) = self.corrected.take()
            && self.rng.random_bool(0.5)
        {
            let host = if self.rng.random_bool(0.5) { a } else { b };
            return self.deploy(vec![host]);
        }
        if self.swapped.is_some() && self.since_swap >= 1 && self.rng.random_bool(0.6) {
            return Op::CorrectSsh;
        }
        // A host that is down comes back within a few operations.
        if self.rng.random_bool(0.25) {
            if let Some(&host) = self.frozen.iter().next() {
                return Op::Thaw { host };
            }
            if let Some(&host) = self.stopped.iter().next() {
                return Op::StartHost { host };
            }
        }
        // An interrupted deployment is resumed, often after a flake edit.
        if self.interrupted && self.rng.random_bool(0.4) {
            return if self.rng.random_bool(0.5) {
                Op::EditFlake {
                    hosts: self.selection(),
                }
            } else {
                Op::Resume
            };
        }
        loop {
            let op = match self.rng.random_range(0..100) {
                0..=29 => {
                    let hosts = self.selection();
                    self.deploy(hosts)
                }
                30..=34 if self.interrupted || self.rng.random_bool(0.2) => Op::Resume,
                35..=39 => Op::Rollback {
                    host: self.host(),
                    back: if self.rng.random_bool(0.3) {
                        Some(self.rng.random_range(1..3))
                    } else {
                        None
                    },
                },
                40..=43 => Op::Exec {
                    hosts: self.selection(),
                },
                44..=47 => Op::UploadKeys {
                    hosts: self.selection(),
                },
                48..=53 if self.swapped.is_none() => {
                    let Some(host) = self.up_host() else { continue };
                    let what = match self.rng.random_range(0..3) {
                        0 => Manual::Rollback,
                        1 => Manual::Generation(self.rng.random_range(1..3)),
                        _ => Manual::Provision,
                    };
                    Op::Manual { host, what }
                }
                54..=65 => Op::EditFlake {
                    hosts: self.selection(),
                },
                66..=75 => Op::Service {
                    host: self.host(),
                    fault: match self.rng.random_range(0..4) {
                        0 => ServiceFault::Healthy,
                        1 => ServiceFault::Slow(self.rng.random_range(500..3000)),
                        2 => ServiceFault::Failing,
                        _ => ServiceFault::FailSwitch,
                    },
                },
                76..=80 if self.swapped.is_none() => {
                    let a = self.host();
                    let b = (a + self.rng.random_range(1..HOSTS.len())) % HOSTS.len();
                    Op::SwapSsh { a, b }
                }
                81..=85 => match self.frozen.iter().next() {
                    Some(&host) => Op::Thaw { host },
                    None if self.stopped.is_empty() => match self.up_host() {
                        Some(host) => Op::Freeze { host },
                        None => continue,
                    },
                    None => continue,
                },
                86..=90 => match self.stopped.iter().next() {
                    Some(&host) => Op::StartHost { host },
                    None if self.frozen.is_empty() => match self.up_host() {
                        Some(host) => Op::StopHost { host },
                        None => continue,
                    },
                    None => continue,
                },
                91..=94 => match self.up_host() {
                    Some(host) => Op::Reboot { host },
                    None => continue,
                },
                _ => continue,
            };
            return op;
        }
    }

    fn note(&mut self, op: &Op) {
        self.since_swap += 1;
        match op {
            Op::SwapSsh { a, b } => {
                self.swapped = Some((*a, *b));
                self.since_swap = 0;
            }
            Op::CorrectSsh => self.corrected = self.swapped.take(),
            Op::Freeze { host } => {
                self.frozen.insert(*host);
            }
            Op::Thaw { host } => {
                self.frozen.remove(host);
            }
            Op::StopHost { host } => {
                self.stopped.insert(*host);
            }
            Op::StartHost { host } | Op::Reboot { host } => {
                self.stopped.remove(host);
            }
            Op::Resume => self.interrupted = false,
            _ => {}
        }
    }

    /// What brings the fleet back at the end of a campaign: every host
    /// thawed and started, the ssh config corrected.
    pub fn recovery(&mut self) -> Vec<Op> {
        let mut ops: Vec<Op> = Vec::new();
        ops.extend(self.frozen.iter().map(|&host| Op::Thaw { host }));
        ops.extend(self.stopped.iter().map(|&host| Op::StartHost { host }));
        if self.swapped.is_some() {
            ops.push(Op::CorrectSsh);
        }
        for op in &ops {
            self.note(op);
        }
        ops
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ops(seed: u64, n: usize) -> Vec<Op> {
        let mut generator = Generator::new(seed);
        (0..n).map(|_| generator.next_op()).collect()
    }

    #[test]
    fn one_seed_gives_one_sequence() {
        assert_eq!(ops(7, 200), ops(7, 200));
        assert_ne!(ops(7, 50), ops(8, 50));
    }

    #[test]
    fn hosts_come_back_only_after_they_went_and_one_at_a_time() {
        for seed in 0..50 {
            let mut generator = Generator::new(seed);
            let mut down: BTreeSet<usize> = BTreeSet::new();
            let mut swapped = false;
            for _ in 0..200 {
                match generator.next_op() {
                    Op::Freeze { host } | Op::StopHost { host } => {
                        assert!(down.is_empty(), "seed {seed}: two hosts down");
                        down.insert(host);
                    }
                    Op::Thaw { host } | Op::StartHost { host } => {
                        assert!(down.remove(&host), "seed {seed}: {host} was not down")
                    }
                    Op::Reboot { host } | Op::Manual { host, .. } => {
                        assert!(!down.contains(&host), "seed {seed}: {host} is down")
                    }
                    Op::SwapSsh { a, b } => {
                        assert!(!swapped && a != b, "seed {seed}");
                        swapped = true;
                    }
                    Op::CorrectSsh => {
                        assert!(swapped, "seed {seed}");
                        swapped = false;
                    }
                    _ => {}
                }
            }
            for op in generator.recovery() {
                if let Op::Thaw { host } | Op::StartHost { host } = op {
                    down.remove(&host);
                }
                if op == Op::CorrectSsh {
                    swapped = false;
                }
            }
            assert!(
                down.is_empty() && !swapped,
                "seed {seed}: recovery is incomplete"
            );
        }
    }

    #[test]
    fn every_kind_of_operation_comes_up() {
        let all = ops(1, 2000);
        let has = |f: &dyn Fn(&Op) -> bool| all.iter().any(f);
        assert!(has(&|o| matches!(
            o,
            Op::Deploy {
                interrupt: Some(Interrupt::Kill(_)),
                ..
            }
        )));
        assert!(has(&|o| matches!(
            o,
            Op::Deploy {
                interrupt: Some(Interrupt::Cancel(_)),
                ..
            }
        )));
        assert!(has(&|o| matches!(
            o,
            Op::Deploy {
                goal: Goal::Boot,
                ..
            }
        )));
        assert!(has(&|o| matches!(
            o,
            Op::Deploy {
                goal: Goal::Test,
                ..
            }
        )));
        assert!(has(&|o| matches!(
            o,
            Op::Deploy {
                goal: Goal::DryActivate,
                ..
            }
        )));
        assert!(has(&|o| matches!(
            o,
            Op::Deploy {
                strategy: Strategy::BlueGreen,
                ..
            }
        )));
        assert!(has(&|o| matches!(o, Op::Deploy { reboot: true, .. })));
        for kind in [
            |o: &Op| matches!(o, Op::Resume),
            |o: &Op| matches!(o, Op::Rollback { .. }),
            |o: &Op| matches!(o, Op::Exec { .. }),
            |o: &Op| matches!(o, Op::UploadKeys { .. }),
            |o: &Op| matches!(o, Op::Manual { .. }),
            |o: &Op| matches!(o, Op::EditFlake { .. }),
            |o: &Op| {
                matches!(
                    o,
                    Op::Service {
                        fault: ServiceFault::FailSwitch,
                        ..
                    }
                )
            },
            |o: &Op| matches!(o, Op::SwapSsh { .. }),
            |o: &Op| matches!(o, Op::Freeze { .. }),
            |o: &Op| matches!(o, Op::StopHost { .. }),
            |o: &Op| matches!(o, Op::Reboot { .. }),
        ] {
            assert!(has(&kind));
        }
    }
}
