//! The error of a name that is not there: an unknown host or tag, with
//! what the word may have meant (a close name, a tag of that name, a goal),
//! and the fleet, listed when it is small.

use std::collections::BTreeSet;

use crate::fleet::{Inventory, InventoryError};

/// Whether the hosts' tags are known (after evaluation) or not (before).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum TagsKnown {
    Yes,
    No,
}

/// A fleet this small is listed in full when a name is not found.
const LISTED_FLEET: usize = 12;

/// "unknown host `NAME`", with what it may have meant: a close host name, a
/// tag of that name (`@NAME`), and the fleet (listed when small).
pub(super) fn unknown_host_among(
    name: &str,
    known: &[String],
    tags: &BTreeSet<String>,
    tags_known: TagsKnown,
) -> InventoryError {
    let mut hint = crate::suggest::did_you_mean(name, known, "");
    if crate::goal::GOAL_NAMES.contains(&name) {
        hint.push_str(&format!(
            "; `{name}` is a goal, not a host: use `--goal {name}` (or `nix-deploy apply {name}`)"
        ));
    } else if crate::goal::APPLY_GOALS.contains(&name) {
        hint.push_str(&format!(
            "; `{name}` is a goal of `nix-deploy apply {name}`, not a host"
        ));
    } else if tags.contains(name) {
        hint.push_str(&format!("; `@{name}` selects the hosts with that tag"));
    } else if tags_known == TagsKnown::No {
        hint.push_str(&format!(
            "; `@{name}` selects the hosts with that tag, if it is one"
        ));
    }
    if known.len() <= LISTED_FLEET {
        hint.push_str(&format!(" (the fleet has: {})", known.join(", ")));
    } else {
        hint.push_str(&format!(
            " (the fleet has {} hosts; `nix-deploy plan` lists them)",
            known.len()
        ));
    }
    InventoryError::UnknownHost {
        name: name.to_string(),
        hint,
    }
}

/// "unknown host `NAME`" for a fleet whose hosts are evaluated.
pub fn unknown_host(inventory: &Inventory, name: &str) -> InventoryError {
    unknown_host_among(name, &inventory.names(), &inventory.tags(), TagsKnown::Yes)
}

/// "no host has tag `TAG`", with the closest tags of the fleet.
pub fn unknown_tag(inventory: &Inventory, tag: &str) -> InventoryError {
    InventoryError::UnknownTag {
        tag: tag.to_string(),
        hint: crate::suggest::did_you_mean(tag, &inventory.tags(), "@"),
    }
}
