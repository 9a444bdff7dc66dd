//! Which module version each instance of a kind renders with while a rollout runs.

use std::collections::{BTreeMap, BTreeSet};

use super::InstanceKey;
use crate::cue::Module;

/// Which instances may render with the target version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    All,
    Only(BTreeSet<InstanceKey>),
}

impl Admission {
    pub fn admits(&self, key: &InstanceKey) -> bool {
        match self {
            Self::All => true,
            Self::Only(keys) => keys.contains(key),
        }
    }
}

/// Which module version each instance of a kind renders with.
#[derive(Debug, Clone, PartialEq)]
pub struct Selection {
    /// The version the Transform loaded last.
    pub target: Module,
    /// The version every instance had when the rollout began; `None` once it is complete.
    pub current: Option<Module>,
    pub admission: Admission,
    /// What the target would change, for each instance it has not reached.
    pub pending: BTreeMap<InstanceKey, String>,
}

impl Selection {
    /// A kind served for the first time, or again after a restart, before its rollout is
    /// looked at: every instance keeps its version; new ones get `current`, else the target.
    pub fn hold(target: Module, current: Option<Module>) -> Self {
        Self {
            target,
            current,
            admission: Admission::Only(BTreeSet::new()),
            pending: BTreeMap::new(),
        }
    }
}

/// The version an instance renders with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wanted {
    Target,
    Current,
    /// Another version, by digest: the one it is pinned to, or the one it stays on.
    Version(String),
}

/// The version `key` renders with: the one it is pinned to, the target once admitted, else
/// the one its graph has (`recorded`); an instance without a graph gets the current version.
pub fn choose(selection: &Selection, key: &InstanceKey, recorded: Option<&str>, pin: Option<&str>) -> Wanted {
    let current = selection.current.as_ref().map(|m| m.digest.as_str());
    let by_digest = |digest: &str| {
        if digest == selection.target.digest {
            Wanted::Target
        } else if Some(digest) == current {
            Wanted::Current
        } else {
            Wanted::Version(digest.to_string())
        }
    };
    if let Some(pin) = pin {
        return by_digest(pin);
    }
    if selection.admission.admits(key) {
        return Wanted::Target;
    }
    match (recorded, current) {
        (Some(recorded), _) => by_digest(recorded),
        (None, Some(_)) => Wanted::Current,
        (None, None) => Wanted::Target,
    }
}

/// Instances whose version or pending line may differ between two selections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Affected {
    None,
    All,
    Some(BTreeSet<InstanceKey>),
}

pub fn affected(old: &Selection, new: &Selection) -> Affected {
    if old.target.digest != new.target.digest
        || old.current.as_ref().map(|m| &m.digest) != new.current.as_ref().map(|m| &m.digest)
        || old.pending != new.pending
    {
        return Affected::All;
    }
    match (&old.admission, &new.admission) {
        (Admission::All, Admission::All) => Affected::None,
        (Admission::Only(old), Admission::Only(new)) => {
            let changed: BTreeSet<InstanceKey> = old.symmetric_difference(new).cloned().collect();
            if changed.is_empty() {
                Affected::None
            } else {
                Affected::Some(changed)
            }
        }
        _ => Affected::All,
    }
}
