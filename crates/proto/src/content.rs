use serde::{Deserialize, Serialize};

/// The typed body of a chat message.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Content {
    Text {
        text: String,
    },
    Image {
        url: String,
        width: u32,
        height: u32,
    },
    Voice {
        url: String,
        /// Seconds.
        duration: u32,
    },
    File {
        url: String,
        file_name: String,
        /// Bytes.
        size: u64,
    },
    Custom {
        data: serde_json::Value,
    },
}

impl Content {
    pub fn text(text: impl Into<String>) -> Self {
        Content::Text { text: text.into() }
    }
}
