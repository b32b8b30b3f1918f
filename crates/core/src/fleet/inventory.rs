//! The whole fleet's metadata by name ([`Inventory`]), and which hosts a
//! command is about ([`Selection`]).

use std::collections::BTreeMap;

use super::{HostMeta, InventoryError, parse_host};
use crate::source::FleetSource;

/// The whole fleet's metadata, by name.
#[derive(Clone, Debug, Default)]
pub struct Inventory {
    hosts: BTreeMap<String, HostMeta>,
}

/// Which hosts a command is about (the syntax is in [`crate::select`]).
#[derive(Clone, Debug, Default)]
pub struct Selection {
    /// Positional selectors: host names or globs, `@tag` or `@tag-glob`.
    pub names: Vec<String>,
    /// Selectors from `--on` (the same syntax; repeatable, comma lists).
    pub tags: Vec<String>,
    pub all: bool,
    /// Selectors from `--exclude`: removed from what the others select.
    pub exclude: Vec<String>,
}

impl Selection {
    /// Whether nothing narrows the selection down (exclusions aside).
    pub fn is_everything(&self) -> bool {
        self.all || (self.names.is_empty() && self.tags.is_empty())
    }

    /// Whether the caller named hosts (by name, glob or tag), as colmena's
    /// `meta.allowApplyAll = false` requires.
    pub fn names_hosts(&self) -> bool {
        !self.all && (!self.names.is_empty() || !self.tags.is_empty())
    }
}

impl Inventory {
    /// Parse a whole evaluation of `source` (`{ NAME = { deployment; ... }; }`):
    /// every host's metadata, or the first host's error (tests and tools;
    /// the engine reads hosts one by one, each error its host's own).
    pub fn from_eval_json(source: FleetSource, json: &str) -> Result<Self, InventoryError> {
        let raw: BTreeMap<String, serde_json::Value> = serde_json::from_str(json)
            .map_err(|e| InventoryError::Malformed(format!("not a JSON object of hosts: {e}")))?;
        if raw.is_empty() {
            return Err(InventoryError::Empty);
        }
        let mut hosts = BTreeMap::new();
        for (name, value) in raw {
            let evaluated = parse_host(source, &name, value)?;
            hosts.insert(name, evaluated.meta);
        }
        Ok(Inventory { hosts })
    }

    pub fn from_hosts(hosts: impl IntoIterator<Item = HostMeta>) -> Self {
        Inventory {
            hosts: hosts.into_iter().map(|h| (h.name.clone(), h)).collect(),
        }
    }

    pub fn get(&self, name: &str) -> Option<&HostMeta> {
        self.hosts.get(name)
    }

    pub fn hosts(&self) -> impl Iterator<Item = &HostMeta> {
        self.hosts.values()
    }

    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    /// Every host name, sorted.
    pub fn names(&self) -> Vec<String> {
        self.hosts.keys().cloned().collect()
    }

    /// Every tag some host has, sorted.
    pub fn tags(&self) -> std::collections::BTreeSet<String> {
        self.hosts
            .values()
            .flat_map(|h| h.tags.iter().cloned())
            .collect()
    }

    /// Hosts with `tag`; an error when none has it.
    pub fn with_tag(&self, tag: &str) -> Result<Vec<&HostMeta>, InventoryError> {
        let found: Vec<&HostMeta> = self.hosts.values().filter(|h| h.has_tag(tag)).collect();
        if found.is_empty() {
            return Err(crate::select::unknown_tag(self, tag));
        }
        Ok(found)
    }

    /// Resolve a selection to host names, sorted and without duplicates.
    /// Every selector and exclusion must match: a typo is an error, never an
    /// empty or a larger deployment ([`crate::select`]).
    pub fn select(&self, selection: &Selection) -> Result<Vec<String>, InventoryError> {
        crate::select::resolve(self, selection)
    }
}
