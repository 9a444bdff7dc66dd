//! The error that ends a reconcile early.

use crate::error::ErrorCategory;

/// Errors that end a reconcile early; everything else becomes status.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("encoding status: {0}")]
    Serialization(#[from] serde_json::Error),
    #[error("object has no {0}")]
    MissingField(&'static str),
    #[error("{0}")]
    CueUnavailable(#[source] crate::cue::RenderError),
    /// The replica's shard Leases went unrenewed for a renew deadline (see
    /// [`crate::runtime::shards::Fence`]): it writes nothing more and exits.
    #[error("this replica no longer holds the graph's shard")]
    ShardLost,
}

impl Error {
    /// Every value [`ErrorCategory::reason`] returns.
    pub const REASONS: [&'static str; 6] = [
        "Conflict",
        "ApiError",
        "SerializationError",
        "InvalidObject",
        "CueUnavailable",
        "ShardLost",
    ];
}

impl ErrorCategory for Error {
    fn reason(&self) -> &'static str {
        match self {
            Self::Kube(kube::Error::Api(s)) if s.code == 409 => "Conflict",
            Self::Kube(_) => "ApiError",
            Self::Serialization(_) => "SerializationError",
            Self::MissingField(_) => "InvalidObject",
            Self::CueUnavailable(_) => "CueUnavailable",
            Self::ShardLost => "ShardLost",
        }
    }

    /// An object missing a field the apiserver always sets, or a status that cannot be
    /// encoded, does not mend by retrying; the API and cue may.
    fn is_transient(&self) -> bool {
        matches!(self, Self::Kube(_) | Self::CueUnavailable(_) | Self::ShardLost)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_reason_is_listed_for_metric_initialization() {
        let conflict = kube::Error::Api(Box::new(kube::core::Status {
            code: 409,
            ..Default::default()
        }));
        let errors = [
            Error::Kube(conflict),
            Error::Kube(kube::Error::LinesCodecMaxLineLengthExceeded),
            Error::Serialization(serde_json::from_str::<u8>("x").unwrap_err()),
            Error::MissingField("metadata.uid"),
            Error::CueUnavailable(crate::cue::RenderError::CueUnavailable {
                message: "no cue".into(),
            }),
            Error::ShardLost,
        ];
        let reasons: Vec<&str> = errors.iter().map(Error::reason).collect();
        assert_eq!(reasons, Error::REASONS);
    }
}
