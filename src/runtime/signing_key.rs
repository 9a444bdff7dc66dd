//! The graph-signing key: a Secret in the operator's own namespace, made at start-up when it is
//! absent. Only the operator (and whoever administers its namespace) can read it.

use crate::api::names::{MANAGED_BY_LABEL, MANAGED_BY_VALUE, SIGNING_KEY_SECRET};
use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use ring::rand::{SecureRandom, SystemRandom};

use crate::executor::proof::GraphKey;

/// Data key of the Secret.
const DATA_KEY: &str = "key";
const ATTEMPTS: u32 = 6;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("reading or creating Secret {namespace}/{SIGNING_KEY_SECRET}: {source}")]
    Api {
        namespace: String,
        #[source]
        source: kube::Error,
    },
    #[error(
        "Secret {namespace}/{SIGNING_KEY_SECRET} has no '{DATA_KEY}' of at least {} bytes; delete it to have a new key made",
        GraphKey::MIN_BYTES
    )]
    Malformed { namespace: String },
    #[error("the system's random number generator failed")]
    Random,
}

/// Reads the key, or makes one when the Secret does not exist (another replica making it at
/// the same moment is fine: the first one wins and both read it). Transient API errors are
/// retried for about half a minute.
pub async fn load_or_create(client: &Client, namespace: &str) -> Result<GraphKey, KeyError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let mut delay = Duration::from_secs(1);
    let mut attempt = 1;
    loop {
        match try_load_or_create(&api, namespace).await {
            Err(KeyError::Api { source, .. }) if attempt < ATTEMPTS && transient(&source) => {
                tracing::warn!(error = %source, attempt, "graph-signing key not available yet; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(8));
                attempt += 1;
            }
            other => return other,
        }
    }
}

fn transient(e: &kube::Error) -> bool {
    !matches!(e, kube::Error::Api(s) if s.code == 403 || s.code == 404 || s.code == 422)
}

async fn try_load_or_create(api: &Api<Secret>, namespace: &str) -> Result<GraphKey, KeyError> {
    let api_error = |source| KeyError::Api {
        namespace: namespace.to_string(),
        source,
    };
    if let Some(secret) = api.get_opt(SIGNING_KEY_SECRET).await.map_err(api_error)? {
        return key_of(&secret, namespace);
    }
    let mut bytes = [0u8; 32];
    SystemRandom::new().fill(&mut bytes).map_err(|_| KeyError::Random)?;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(SIGNING_KEY_SECRET.into()),
            namespace: Some(namespace.into()),
            labels: Some(BTreeMap::from([(MANAGED_BY_LABEL.into(), MANAGED_BY_VALUE.into())])),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(DATA_KEY.into(), ByteString(bytes.to_vec()))])),
        ..Default::default()
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(created) => {
            tracing::info!(%namespace, secret = SIGNING_KEY_SECRET, "made a new graph-signing key");
            key_of(&created, namespace)
        }
        Err(kube::Error::Api(s)) if s.code == 409 => {
            let secret = api.get(SIGNING_KEY_SECRET).await.map_err(api_error)?;
            key_of(&secret, namespace)
        }
        Err(e) => Err(api_error(e)),
    }
}

fn key_of(secret: &Secret, namespace: &str) -> Result<GraphKey, KeyError> {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(DATA_KEY))
        .and_then(|b| GraphKey::new(&b.0))
        .ok_or_else(|| KeyError::Malformed {
            namespace: namespace.to_string(),
        })
}
