//! Responses nested past what the client decodes.
//!
//! The apiserver stores objects nested up to 10,000 levels deep (a ResourceGraph's node or any
//! custom resource's free-form field); serde_json, which decodes every response, refuses more
//! than 128. One such object would fail every list of its kind, and with it every watch: whoever
//! may write one ResourceGraph could stop the graphs of the whole cluster at the operator's next
//! start. A layer under the client leaves such objects out of lists, and their events out of
//! watches, with a warning, so that everything else is served.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::StreamExt;
use futures::future::BoxFuture;
use http::{Method, Request, Response};
use http_body_util::BodyExt;
use kube::client::{Body, DynBody};

/// Deepest nesting of an object Pequod reads; deeper ones are left out.
pub const MAX_DEPTH: usize = 100;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Deepest nesting of the JSON `text`: 1 for `{}` or `[]`, 0 for a scalar.
pub fn depth(text: &[u8]) -> usize {
    let (mut level, mut deepest, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for &b in text {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                level += 1;
                deepest = deepest.max(level);
            }
            b'}' | b']' => level = level.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// A list `body` without the elements of its top-level `items` that nest deeper than
/// [`MAX_DEPTH`], and how many were left out; None when nothing is too deep.
pub fn without_deep_items(body: &[u8]) -> Option<(Vec<u8>, usize)> {
    if depth(body) <= MAX_DEPTH + 2 {
        return None;
    }
    let (mut level, mut in_string, mut escaped) = (0usize, false, false);
    let (mut string_start, mut last_key): (usize, &[u8]) = (0, b"");
    let mut items: Option<usize> = None;
    let mut element: Option<(usize, usize)> = None; // (start, deepest level inside)
    let mut kept: Vec<(usize, usize)> = Vec::new();
    let mut left_out = 0;
    let mut end = None;
    for (i, &b) in body.iter().enumerate() {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => {
                    in_string = false;
                    if level == 1 {
                        last_key = &body[string_start..i];
                    }
                }
                _ => {}
            }
            continue;
        }
        let in_items = items.is_some() && end.is_none();
        if in_items && level == 2 && element.is_none() && !b.is_ascii_whitespace() && b != b',' && b != b']' {
            element = Some((i, 2));
        }
        match b {
            b'"' => {
                in_string = true;
                string_start = i + 1;
            }
            b'{' | b'[' => {
                level += 1;
                if level == 2 && b == b'[' && items.is_none() && last_key == b"items" {
                    items = Some(i);
                    continue;
                }
                if let Some((_, deepest)) = element.as_mut() {
                    *deepest = (*deepest).max(level);
                }
            }
            b'}' | b']' => {
                if in_items && level == 2 && b == b']' {
                    finish(&mut element, i, &mut kept, &mut left_out);
                    end = Some(i);
                }
                level = level.saturating_sub(1);
            }
            b',' if in_items && level == 2 => finish(&mut element, i, &mut kept, &mut left_out),
            _ => {}
        }
    }
    let (start, end) = (items?, end?);
    let mut out = Vec::with_capacity(body.len());
    out.extend_from_slice(&body[..=start]);
    for (n, (from, to)) in kept.iter().enumerate() {
        if n > 0 {
            out.push(b',');
        }
        out.extend_from_slice(&body[*from..*to]);
    }
    out.extend_from_slice(&body[end..]);
    Some((out, left_out))
}

/// Ends the element being read at `at`: kept when within [`MAX_DEPTH`] (counted from the
/// element itself), else counted as left out.
fn finish(element: &mut Option<(usize, usize)>, at: usize, kept: &mut Vec<(usize, usize)>, left_out: &mut usize) {
    if let Some((start, deepest)) = element.take() {
        if deepest.saturating_sub(2) <= MAX_DEPTH {
            kept.push((start, at));
        } else {
            *left_out += 1;
        }
    }
}

/// A client for `config` whose responses pass through [`NestingGuard`].
pub fn client(config: kube::Config) -> Result<kube::Client, kube::Error> {
    Ok(kube::client::ClientBuilder::try_from(config)?
        .with_layer(&NestingGuard)
        .build())
}

/// The layer under the operator's clients that keeps too-deep objects out of what they decode.
#[derive(Clone, Copy, Debug, Default)]
pub struct NestingGuard;

impl<S> tower::Layer<S> for NestingGuard {
    type Service = Guarded<S>;

    fn layer(&self, inner: S) -> Guarded<S> {
        Guarded(inner)
    }
}

#[derive(Clone)]
pub struct Guarded<S>(S);

impl<S> tower::Service<Request<Body>> for Guarded<S>
where
    S: tower::Service<Request<Body>, Response = Response<Box<DynBody>>, Error = BoxError>,
    S::Future: Send + 'static,
{
    type Response = Response<Box<DynBody>>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Self::Response, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let reading = request.method() == Method::GET;
        let watching = request
            .uri()
            .query()
            .is_some_and(|q| q.split('&').any(|p| p == "watch=true" || p == "watch=1"));
        let path = request.uri().path().to_string();
        let response = self.0.call(request);
        Box::pin(async move {
            let response = response.await?;
            if !reading || !response.status().is_success() {
                return Ok(response);
            }
            let (parts, body) = response.into_parts();
            let body: Box<DynBody> = if watching {
                Box::new(http_body_util::StreamBody::new(shallow_events(body, path)))
            } else {
                let bytes = body.collect().await?.to_bytes();
                let bytes = match without_deep_items(&bytes) {
                    Some((kept, left_out)) => {
                        tracing::warn!(%path, left_out, max_depth = MAX_DEPTH, "objects nested too deep to decode were left out of a list");
                        Bytes::from(kept)
                    }
                    None => bytes,
                };
                Box::new(http_body_util::Full::new(bytes).map_err(|never| match never {}))
            };
            Ok(Response::from_parts(parts, body))
        })
    }
}

type Frames = Pin<Box<dyn futures::Stream<Item = Result<http_body::Frame<Bytes>, BoxError>> + Send>>;

/// A watch's events, one JSON document per line, without those nested too deep to decode.
fn shallow_events(body: Box<DynBody>, path: String) -> Frames {
    let chunks = body.into_data_stream();
    let state = (chunks, Vec::<u8>::new(), false);
    let lines = futures::stream::unfold(state, move |(mut chunks, mut buffer, mut done)| {
        let path = path.clone();
        async move {
            loop {
                if let Some(newline) = buffer.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buffer.drain(..=newline).collect();
                    if depth(&line) > MAX_DEPTH + 1 {
                        tracing::warn!(%path, max_depth = MAX_DEPTH, "a watch event of an object nested too deep to decode was left out");
                        continue;
                    }
                    return Some((Ok(http_body::Frame::data(Bytes::from(line))), (chunks, buffer, done)));
                }
                if done {
                    if buffer.is_empty() || depth(&buffer) > MAX_DEPTH + 1 {
                        return None;
                    }
                    let rest = std::mem::take(&mut buffer);
                    return Some((Ok(http_body::Frame::data(Bytes::from(rest))), (chunks, buffer, done)));
                }
                match chunks.next().await {
                    Some(Ok(chunk)) => buffer.extend_from_slice(&chunk),
                    Some(Err(e)) => return Some((Err(e), (chunks, buffer, true))),
                    None => done = true,
                }
            }
        }
    });
    Box::pin(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nested(levels: usize) -> String {
        let mut value = "1".to_string();
        for _ in 0..levels {
            value = format!("{{\"a\":{value}}}");
        }
        value
    }

    #[test]
    fn depth_counts_brackets_outside_strings() {
        assert_eq!(depth(b"1"), 0);
        assert_eq!(depth(br#"{"a":[1,{"b":2}]}"#), 3);
        assert_eq!(depth(br#"{"a":"[[[{{{\"]]]"}"#), 1);
        assert_eq!(depth(nested(150).as_bytes()), 150);
    }

    #[test]
    fn lists_leave_out_only_items_too_deep_to_decode() {
        let shallow = r#"{"metadata":{"name":"ok"},"spec":{"x":[1,2]}}"#;
        let body = format!(
            r#"{{"kind":"List","metadata":{{"resourceVersion":"7"}},"items":[{shallow},{{"spec":{}}},{shallow}]}}"#,
            nested(200)
        );
        let (kept, left_out) = without_deep_items(body.as_bytes()).unwrap();
        assert_eq!(left_out, 1);
        let list: serde_json::Value = serde_json::from_slice(&kept).unwrap();
        assert_eq!(list["items"].as_array().unwrap().len(), 2);
        assert_eq!(list["items"][1]["metadata"]["name"], "ok");
        assert_eq!(list["metadata"]["resourceVersion"], "7");

        let fine = format!(r#"{{"items":[{shallow}]}}"#);
        assert!(
            without_deep_items(fine.as_bytes()).is_none(),
            "a list within bounds is passed as it is"
        );
        let at_limit = format!(r#"{{"items":[{}]}}"#, nested(MAX_DEPTH));
        assert!(without_deep_items(at_limit.as_bytes()).is_none());
        // Strings that look like structure do not confuse it.
        let tricky = format!(r#"{{"note":"\"items\":[","items":[{{"s":"],{{"}},{}]}}"#, nested(300));
        let (kept, left_out) = without_deep_items(tricky.as_bytes()).unwrap();
        assert_eq!(left_out, 1);
        let list: serde_json::Value = serde_json::from_slice(&kept).unwrap();
        assert_eq!(list["items"][0]["s"], "],{");
    }

    #[tokio::test]
    async fn watches_leave_out_events_too_deep_to_decode() {
        let good = r#"{"type":"ADDED","object":{"metadata":{"name":"a"}}}"#;
        let bad = format!(r#"{{"type":"ADDED","object":{}}}"#, nested(200));
        // Split across chunks in the middle of lines, as the network does.
        let text = format!("{good}\n{bad}\n{good}\n");
        let chunks: Vec<Result<Bytes, std::convert::Infallible>> = text
            .as_bytes()
            .chunks(37)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        let body =
            http_body_util::StreamBody::new(futures::stream::iter(chunks).map(|c| c.map(http_body::Frame::data)));
        let body: Box<DynBody> = Box::new(body.map_err(|never| match never {}));
        let frames: Vec<Bytes> = shallow_events(body, "/apis/x".into())
            .map(|f| f.unwrap().into_data().unwrap())
            .collect()
            .await;
        let out: Vec<u8> = frames.concat();
        assert_eq!(String::from_utf8(out).unwrap(), format!("{good}\n{good}\n"));
    }
}
