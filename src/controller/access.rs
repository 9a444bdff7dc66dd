//! Whether the manager holds permissions, asked of the apiserver with access reviews: the
//! check a restricted manager (`--generate-rbac=false`) makes instead of writing RBAC.

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::authorization::v1::{ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec};
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
