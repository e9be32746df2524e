use std::sync::Arc;

use bytes::Bytes;
use serde::Serialize;

/// An encoded JSON text frame, shared (not copied) by every connection it goes to.
/// One pointer wide (a `Bytes` is four): frames sit in every connection's
/// queue, whose blocks are allocated 32 entries at a time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame(Arc<Bytes>);

impl Frame {
    pub fn encode<T: Serialize>(value: &T) -> Frame {
        // Serializing our own frame types cannot fail: no maps with non-string keys.
        Frame(Arc::new(Bytes::from(serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec()))))
    }

    pub fn from_string(s: String) -> Frame {
        Frame(Arc::new(Bytes::from(s)))
    }

    /// The bytes; always valid UTF-8 JSON.
    pub fn bytes(&self) -> &Bytes {
        &self.0
    }

    pub fn into_bytes(self) -> Bytes {
        Arc::unwrap_or_clone(self.0)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}
