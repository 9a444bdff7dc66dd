//! Clients that act as a service account, so that the apiserver itself authorizes what a graph
//! without a Transform's authority reads and writes (the model of Flux's `serviceAccountName`).
//!
//! The operator holds more rights than any one team; a graph that acts as one of the team's
//! service accounts can do exactly what that account may do, whatever kind it names.

use std::sync::Mutex;

use kube::{Client, Config};

use crate::lru::Lru;

/// Most impersonating clients kept; the least recently used is dropped beyond it.
const MAX_CLIENTS: usize = 256;

/// A service account a graph acts as.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceAccount {
    pub namespace: String,
    pub name: String,
}

impl ServiceAccount {
    /// The user name the apiserver gives the account's tokens, which impersonation names.
    pub fn username(&self) -> String {
        format!("system:serviceaccount:{}:{}", self.namespace, self.name)
    }
}

impl std::fmt::Display for ServiceAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Builds and keeps one client per service account from the operator's own configuration.
pub struct Impersonation {
    base: Config,
    clients: Mutex<Lru<Client>>,
}

impl Impersonation {
    pub fn new(base: Config) -> Self {
        Self {
            base,
            clients: Mutex::default(),
        }
    }

    /// A client whose every request the apiserver authorizes as `account`. The apiserver adds
    /// the account's groups (`system:serviceaccounts`, `system:serviceaccounts:<namespace>`,
    /// `system:authenticated`) itself when no group is named.
    pub fn client(&self, account: &ServiceAccount) -> Result<Client, kube::Error> {
        let key = account.username();
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(client) = clients.get(&key) {
            return Ok(client.clone());
        }
        let mut config = self.base.clone();
        config.auth_info.impersonate = Some(key.clone());
        config.auth_info.impersonate_groups = None;
        let client = crate::apply::nesting::client(config)?;
        clients.insert(key, client.clone(), 1);
        while clients.len() > MAX_CLIENTS {
            clients.pop_oldest();
        }
        Ok(client)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_account_is_named_as_its_tokens_are() {
        let account = ServiceAccount {
            namespace: "team-a".into(),
            name: "deployer".into(),
        };
        assert_eq!(account.username(), "system:serviceaccount:team-a:deployer");
        assert_eq!(account.to_string(), "team-a/deployer");
    }
}
