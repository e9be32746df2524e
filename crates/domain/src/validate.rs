//! Input rules shared by the services. Each returns `Error::BadRequest` with a
//! message that says what to fix.

use stacker_proto::Content;

use crate::{Error, Result};

pub const USERNAME_MIN: usize = 3;
pub const USERNAME_MAX: usize = 32;
pub const PASSWORD_MIN: usize = 8;
pub const PASSWORD_MAX: usize = 128;
pub const NICKNAME_MAX: usize = 64;
pub const ROOM_NAME_MAX: usize = 64;
pub const CLIENT_MSG_ID_MAX: usize = 64;
pub const JOIN_MESSAGE_MAX: usize = 256;
pub const URL_MAX: usize = 2048;

/// Returns the normalized (lower-case) username.
pub fn username(raw: &str) -> Result<String> {
    let name = raw.trim().to_ascii_lowercase();
    let len = name.chars().count();
    if !(USERNAME_MIN..=USERNAME_MAX).contains(&len) {
        return Err(Error::bad_request(format!("username must be {USERNAME_MIN} to {USERNAME_MAX} characters")));
    }
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-');
    if !name.chars().all(ok_char) || !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(Error::bad_request(
            "username may contain only letters, digits, '_', '.' and '-', and must start with a letter or digit",
        ));
    }
    Ok(name)
}

pub fn password(raw: &str) -> Result<()> {
    let len = raw.chars().count();
    if !(PASSWORD_MIN..=PASSWORD_MAX).contains(&len) {
        return Err(Error::bad_request(format!("password must be {PASSWORD_MIN} to {PASSWORD_MAX} characters")));
    }
    Ok(())
}

/// A short single-line display string (nickname, room name). Returns it trimmed.
pub fn short_text(field: &str, raw: &str, max: usize, required: bool) -> Result<String> {
    let text = raw.trim();
    if required && text.is_empty() {
        return Err(Error::bad_request(format!("{field} must not be empty")));
    }
    if text.chars().count() > max {
        return Err(Error::bad_request(format!("{field} must be at most {max} characters")));
    }
    if text.chars().any(char::is_control) {
        return Err(Error::bad_request(format!("{field} must not contain control characters")));
    }
    Ok(text.to_string())
}

pub fn client_msg_id(raw: &str) -> Result<()> {
    if raw.is_empty() || raw.len() > CLIENT_MSG_ID_MAX || !raw.chars().all(|c| c.is_ascii_graphic()) {
        return Err(Error::bad_request(format!(
            "client_msg_id must be 1 to {CLIENT_MSG_ID_MAX} printable ASCII characters"
        )));
    }
    Ok(())
}

fn url(field: &str, raw: &str) -> Result<()> {
    if raw.is_empty() || raw.len() > URL_MAX || raw.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(Error::bad_request(format!("{field} must be a URL of at most {URL_MAX} bytes")));
    }
    Ok(())
}

/// Checks the typed content and its encoded size against `max_bytes`
/// (`Error::TooLarge` past it).
pub fn content(content: &Content, max_bytes: usize) -> Result<()> {
    match content {
        Content::Text { text } => {
            if text.trim().is_empty() {
                return Err(Error::bad_request("content.text must not be empty"));
            }
        }
        Content::Image { url: u, width, height } => {
            url("content.url", u)?;
            if *width == 0 || *height == 0 {
                return Err(Error::bad_request("content.width and content.height must be positive"));
            }
        }
        Content::Voice { url: u, duration } => {
            url("content.url", u)?;
            if *duration == 0 {
                return Err(Error::bad_request("content.duration must be positive"));
            }
        }
        Content::File { url: u, file_name, .. } => {
            url("content.url", u)?;
            short_text("content.file_name", file_name, 255, true)?;
        }
        Content::Custom { data } => {
            if data.is_null() {
                return Err(Error::bad_request("content.data must not be null"));
            }
        }
    }
    let size = encoded_len(content).unwrap_or(usize::MAX);
    if size > max_bytes {
        return Err(Error::TooLarge(format!("message content is {size} bytes; the limit is {max_bytes}")));
    }
    Ok(())
}

/// The size of `value` as JSON, counted as it is encoded (nothing allocated);
/// None if it cannot be encoded.
pub(crate) fn encoded_len(value: &impl serde::Serialize) -> Option<usize> {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    serde_json::to_writer(&mut count, value).ok().map(|()| count.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames() {
        assert_eq!(username(" Alice_1 ").unwrap(), "alice_1");
        assert!(username("ab").is_err());
        assert!(username(&"a".repeat(33)).is_err());
        assert!(username("_lead").is_err());
        assert!(username("sp ace").is_err());
        assert!(username("ünï").is_err());
    }

    #[test]
    fn passwords() {
        assert!(password("1234567").is_err());
        assert!(password("12345678").is_ok());
        assert!(password(&"x".repeat(129)).is_err());
    }

    #[test]
    fn contents() {
        assert!(content(&Content::text("hi"), 100).is_ok());
        assert!(matches!(content(&Content::text("  "), 100), Err(Error::BadRequest(_))));
        assert!(matches!(content(&Content::text("x".repeat(200)), 100), Err(Error::TooLarge(_))));
        let img = Content::Image { url: "https://x/y.png".into(), width: 0, height: 1 };
        assert!(content(&img, 1000).is_err());
        let file = Content::File { url: "https://x/f".into(), file_name: "a.txt".into(), size: 3 };
        assert!(content(&file, 1000).is_ok());
        let custom = Content::Custom { data: serde_json::Value::Null };
        assert!(content(&custom, 1000).is_err());
    }

    #[test]
    fn the_size_limit_is_the_encoded_size() {
        let text = Content::text("quote \" and \u{e9}");
        let exact = serde_json::to_vec(&text).unwrap().len();
        assert_eq!(encoded_len(&text), Some(exact));
        assert!(content(&text, exact).is_ok());
        assert!(matches!(content(&text, exact - 1), Err(Error::TooLarge(_))));
    }

    #[test]
    fn client_msg_ids() {
        assert!(client_msg_id("abc-123").is_ok());
        assert!(client_msg_id("").is_err());
        assert!(client_msg_id("has space").is_err());
        assert!(client_msg_id(&"x".repeat(65)).is_err());
    }
}
