//! Parsing of remote module references: git repository URLs with `?ref=` and OCI references.

use std::fmt;

/// A module folder inside a repository or artifact: relative, normalized, without `..`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct ModulePath(String);

impl ModulePath {
    /// Normalizes `cueRef.path`: `""`, `.` and `/` are the root; `./a/b/` is `a/b`.
    pub fn parse(path: Option<&str>) -> Result<Self, ReferenceError> {
        let raw = path.unwrap_or("");
        let mut parts = Vec::new();
        for part in raw.split('/') {
            match part {
                "" | "." => {}
                ".." => return Err(ReferenceError::Path(raw.to_string())),
                p if p.chars().any(|c| c.is_control() || c == '\\') => {
                    return Err(ReferenceError::Path(raw.to_string()));
                }
                p => parts.push(p),
            }
        }
        Ok(Self(parts.join("/")))
    }

    /// The folder, `""` for the root.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ModulePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            f.write_str("/")
        } else {
            f.write_str(&self.0)
        }
    }
}

/// A reference that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    #[error(
        "invalid git reference {0:?}: expected a repository URL (https://, http://, ssh://, git://, file:// or user@host:path) with an optional ?ref=<branch, tag or commit>"
    )]
    Git(String),
    #[error("invalid OCI reference {reference:?}: {message}")]
    Oci { reference: String, message: String },
    #[error("invalid cueRef.path {0:?}: a relative folder without '..'")]
    Path(String),
}

/// What a git ref names.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum GitRevision {
    /// The remote's default branch.
    Head,
    /// A branch or tag, resolved at every fetch.
    Named(String),
    /// A full commit SHA: never resolved, never fetched twice.
    Commit(String),
}

/// `<repository URL>?ref=<revision>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GitReference {
    pub url: String,
    pub revision: GitRevision,
}

impl GitReference {
    pub fn parse(reference: &str) -> Result<Self, ReferenceError> {
        let invalid = || ReferenceError::Git(reference.to_string());
        let reference = reference.trim();
        let (url, query) = match reference.split_once('?') {
            Some((url, query)) => (url, Some(query)),
            None => (reference, None),
        };
        let mut revision = GitRevision::Head;
        if let Some(query) = query {
            for pair in query.split('&').filter(|p| !p.is_empty()) {
                match pair.split_once('=') {
                    Some(("ref", value)) if valid_revision(value) => {
                        revision = if is_commit_sha(value) {
                            GitRevision::Commit(value.to_ascii_lowercase())
                        } else {
                            GitRevision::Named(value.to_string())
                        };
                    }
                    _ => return Err(invalid()),
                }
            }
        }
        if host_of_git_url(url).is_none() {
            return Err(invalid());
        }
        Ok(Self {
            url: url.to_string(),
            revision,
        })
    }

    /// Host the circuit breaker keys on (`file` for local repositories).
    pub fn host(&self) -> String {
        host_of_git_url(&self.url).unwrap_or_default()
    }

    /// The URL without credentials, for messages.
    pub fn display_url(&self) -> String {
        strip_userinfo(&self.url)
    }
}

fn valid_revision(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= 255
        && !value.starts_with('-')
        && !value.contains("..")
        && value.chars().all(|c| c.is_ascii_alphanumeric() || "-_./+".contains(c))
}

/// A full 40-character (SHA-1) or 64-character (SHA-256) hex commit id.
pub fn is_commit_sha(value: &str) -> bool {
    (value.len() == 40 || value.len() == 64) && value.chars().all(|c| c.is_ascii_hexdigit())
}

fn host_of_git_url(url: &str) -> Option<String> {
    if url.is_empty() || url.starts_with('-') || url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return None;
    }
    if let Some(rest) = url.strip_prefix("file://") {
        return (!rest.is_empty()).then(|| "file".to_string());
    }
    for scheme in ["https://", "http://", "ssh://", "git://"] {
        if let Some(rest) = url.strip_prefix(scheme) {
            let authority = rest.split('/').next().unwrap_or("");
            let host = authority.rsplit('@').next().unwrap_or("");
            let has_path = rest.len() > authority.len() + 1;
            return (!host.is_empty() && has_path).then(|| host.to_ascii_lowercase());
        }
    }
    // scp-like: user@host:path
    let (user_host, path) = url.split_once(':')?;
    let host = user_host.rsplit('@').next()?;
    (user_host.contains('@') && !host.is_empty() && !path.is_empty() && !host.contains('/'))
        .then(|| host.to_ascii_lowercase())
}

fn strip_userinfo(url: &str) -> String {
    for scheme in ["https://", "http://"] {
        if let Some(rest) = url.strip_prefix(scheme) {
            let authority = rest.split('/').next().unwrap_or("");
            if let Some((_, host)) = authority.rsplit_once('@') {
                return format!("{scheme}{host}{}", &rest[authority.len()..]);
            }
        }
    }
    url.to_string()
}

/// `registry/repository:tag` or `registry/repository@sha256:<hex>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct OciReference {
    pub registry: String,
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<String>,
}

impl OciReference {
    pub fn parse(reference: &str) -> Result<Self, ReferenceError> {
        let fail = |message: &str| ReferenceError::Oci {
            reference: reference.to_string(),
            message: message.to_string(),
        };
        let parsed: oci_client::Reference = reference.trim().parse().map_err(|e| ReferenceError::Oci {
            reference: reference.to_string(),
            message: format!("{e}"),
        })?;
        // A reference without a registry host would silently mean Docker Hub.
        let first = reference.trim().split('/').next().unwrap_or("");
        let explicit_registry =
            reference.contains('/') && (first.contains('.') || first.contains(':') || first == "localhost");
        if !explicit_registry {
            return Err(fail(
                "name the registry host, as in registry.example.com/platforms/webservice:v1",
            ));
        }
        if let Some(digest) = parsed.digest()
            && !(digest.starts_with("sha256:")
                && digest.len() == 71
                && digest[7..].chars().all(|c| c.is_ascii_hexdigit()))
        {
            return Err(fail("the digest must be sha256:<64 hex digits>"));
        }
        Ok(Self {
            registry: parsed.registry().to_string(),
            repository: parsed.repository().to_string(),
            tag: parsed
                .digest()
                .is_none()
                .then(|| parsed.tag().unwrap_or("latest").to_string()),
            digest: parsed.digest().map(str::to_string),
        })
    }

    /// The reference for oci-client, pinned to `digest` when given.
    pub fn to_client_reference(&self, digest: Option<&str>) -> oci_client::Reference {
        match digest.or(self.digest.as_deref()) {
            Some(d) => {
                oci_client::Reference::with_digest(self.registry.clone(), self.repository.clone(), d.to_string())
            }
            None => oci_client::Reference::with_tag(
                self.registry.clone(),
                self.repository.clone(),
                self.tag.clone().unwrap_or_else(|| "latest".to_string()),
            ),
        }
    }

    /// Host (with port) the circuit breaker and credentials key on.
    pub fn host(&self) -> String {
        self.registry.to_ascii_lowercase()
    }
}

impl fmt::Display for OciReference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn git_references() {
        let r = GitReference::parse("https://git.example.com/org/platforms.git?ref=v1.2.0").unwrap();
        assert_eq!(r.url, "https://git.example.com/org/platforms.git");
        assert_eq!(r.revision, GitRevision::Named("v1.2.0".into()));
        assert_eq!(r.host(), "git.example.com");

        let sha = "0123456789abcdef0123456789ABCDEF01234567";
        let r = GitReference::parse(&format!("git@github.com:org/repo.git?ref={sha}")).unwrap();
        assert_eq!(r.revision, GitRevision::Commit(sha.to_ascii_lowercase()));
        assert_eq!(r.host(), "github.com");

        let r = GitReference::parse("file:///srv/git/platforms").unwrap();
        assert_eq!(r.revision, GitRevision::Head);
        assert_eq!(r.host(), "file");

        let r = GitReference::parse("https://user:secret@git.example.com:8443/org/repo?ref=main").unwrap();
        assert_eq!(r.host(), "git.example.com:8443");
        assert_eq!(r.display_url(), "https://git.example.com:8443/org/repo");

        for bad in [
            "",
            "git.example.com/org/repo",
            "https://git.example.com",
            "https://git.example.com/org/repo?ref=",
            "https://git.example.com/org/repo?ref=--upload-pack=x",
            "https://git.example.com/org/repo?ref=a..b",
            "https://git.example.com/org/repo?branch=main",
            "-oProxyCommand=x:repo",
            "https://git.example.com/org repo",
        ] {
            assert!(GitReference::parse(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn oci_references() {
        let r = OciReference::parse("registry.example.com/platforms/webservice:v1.2.0").unwrap();
        assert_eq!(r.registry, "registry.example.com");
        assert_eq!(r.repository, "platforms/webservice");
        assert_eq!(r.tag.as_deref(), Some("v1.2.0"));
        assert_eq!(r.digest, None);
        assert_eq!(r.to_string(), "registry.example.com/platforms/webservice:v1.2.0");

        let digest = format!("sha256:{}", "a".repeat(64));
        let r = OciReference::parse(&format!("localhost:5000/webservice@{digest}")).unwrap();
        assert_eq!(r.host(), "localhost:5000");
        assert_eq!(r.digest.as_deref(), Some(digest.as_str()));
        assert_eq!(r.tag, None);
        assert_eq!(r.to_client_reference(None).digest(), Some(digest.as_str()));

        let r = OciReference::parse("127.0.0.1:5000/webservice").unwrap();
        assert_eq!(r.tag.as_deref(), Some("latest"));
        let pinned = r.to_client_reference(Some(&digest));
        assert_eq!(pinned.digest(), Some(digest.as_str()));

        for bad in [
            "webservice:v1",
            "platforms/webservice:v1",
            "registry.example.com/Upper:v1",
            "registry.example.com/web@sha256:abc",
            "",
        ] {
            assert!(OciReference::parse(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn module_paths() {
        assert_eq!(ModulePath::parse(None).unwrap().as_str(), "");
        assert_eq!(ModulePath::parse(Some("/")).unwrap().as_str(), "");
        assert_eq!(
            ModulePath::parse(Some("./platforms//webservice/")).unwrap().as_str(),
            "platforms/webservice"
        );
        assert!(ModulePath::parse(Some("../etc")).is_err());
        assert!(ModulePath::parse(Some("a/../../b")).is_err());
    }
}
