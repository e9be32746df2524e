use bytes::Bytes;
use serde::Serialize;

/// An encoded JSON text frame, shared (not copied) by every connection it goes to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame(Bytes);

impl Frame {
    pub fn encode<T: Serialize>(value: &T) -> Frame {
        // Serializing our own frame types cannot fail: no maps with non-string keys.
        Frame(Bytes::from(serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec())))
    }

    pub fn from_string(s: String) -> Frame {
        Frame(Bytes::from(s))
    }

    /// The bytes; always valid UTF-8 JSON.
    pub fn bytes(&self) -> &Bytes {
        &self.0
    }

    pub fn into_bytes(self) -> Bytes {
        self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}
