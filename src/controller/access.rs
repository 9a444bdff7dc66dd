//! Whether the manager holds permissions, asked of the apiserver with access reviews: the
//! check a restricted manager (`--generate-rbac=false`) makes instead of writing RBAC.

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec, SubjectAccessReview,
    SubjectAccessReviewSpec,
};
use kube::api::PostParams;
use kube::{Api, Client};

use crate::rbac::Access;

/// Reviews in flight at once.
const CONCURRENT_REVIEWS: usize = 8;

/// The permissions of `needed` the manager does not hold, in order.
pub async fn missing(client: &Client, needed: Vec<Access>) -> Result<Vec<Access>, kube::Error> {
    let reviews: Api<SelfSubjectAccessReview> = Api::all(client.clone());
    let answered: Vec<(Access, bool)> = futures::stream::iter(needed)
        .map(|access| {
            let reviews = reviews.clone();
            async move {
                let allowed = allowed(&reviews, &access).await?;
                Ok::<_, kube::Error>((access, allowed))
            }
        })
        .buffered(CONCURRENT_REVIEWS)
        .try_collect()
        .await?;
    Ok(answered
        .into_iter()
        .filter(|(_, allowed)| !allowed)
        .map(|(access, _)| access)
        .collect())
}

async fn allowed(reviews: &Api<SelfSubjectAccessReview>, access: &Access) -> Result<bool, kube::Error> {
    let review = SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                group: Some(access.group.clone()),
                resource: Some(access.resource.clone()),
                subresource: access.subresource.clone(),
                verb: Some(access.verb.clone()),
                namespace: access.namespace.clone(),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let answer = reviews.create(&PostParams::default(), &review).await?;
    Ok(answer.status.is_some_and(|s| s.allowed))
}

/// How long an access review's answer is reused: a revoked right stops cached reads within it.
const REVIEW_TTL: std::time::Duration = std::time::Duration::from_secs(30);
/// Most answers kept; beyond it every answer is dropped (they are cheap to ask again).
const MAX_REVIEWS: usize = 4096;

/// Whether a service account may `get` a kind of object in a namespace, asked of the apiserver
/// with a SubjectAccessReview and remembered for [`REVIEW_TTL`]: objects a graph acting as the
/// account reads from the operator's caches are only those it could read itself.
#[derive(Default)]
pub struct ReadReviews {
    answers: std::sync::Mutex<std::collections::HashMap<ReviewKey, (bool, std::time::Instant)>>,
}

/// What a review asked: (service account, group, resource, namespace).
type ReviewKey = (String, String, String, String);

impl ReadReviews {
    pub async fn may_get(
        &self,
        client: &Client,
        account: &crate::apply::ServiceAccount,
        resource: &kube::discovery::ApiResource,
        namespace: Option<&str>,
    ) -> Result<bool, kube::Error> {
        let key = (
            account.username(),
            resource.group.clone(),
            resource.plural.clone(),
            namespace.unwrap_or_default().to_string(),
        );
        if let Some((allowed, at)) = self.answers.lock().unwrap_or_else(|p| p.into_inner()).get(&key)
            && at.elapsed() < REVIEW_TTL
        {
            return Ok(*allowed);
        }
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(key.0.clone()),
                groups: Some(vec![
                    "system:serviceaccounts".into(),
                    format!("system:serviceaccounts:{}", account.namespace),
                    "system:authenticated".into(),
                ]),
                resource_attributes: Some(ResourceAttributes {
                    group: Some(key.1.clone()),
                    resource: Some(key.2.clone()),
                    verb: Some("get".into()),
                    namespace: namespace.map(str::to_string),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let answer = Api::<SubjectAccessReview>::all(client.clone())
            .create(&PostParams::default(), &review)
            .await?;
        let allowed = answer.status.is_some_and(|s| s.allowed);
        let mut answers = self.answers.lock().unwrap_or_else(|p| p.into_inner());
        if answers.len() >= MAX_REVIEWS {
            answers.clear();
        }
        answers.insert(key, (allowed, std::time::Instant::now()));
        Ok(allowed)
    }
}
