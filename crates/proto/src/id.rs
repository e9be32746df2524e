use std::fmt;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A 64-bit id. Serialized as a JSON string (JavaScript cannot hold 64-bit
/// integers exactly); deserialized from a string or a number.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Id(pub i64);

impl From<i64> for Id {
    fn from(v: i64) -> Self {
        Id(v)
    }
}

impl From<Id> for i64 {
    fn from(v: Id) -> Self {
        v.0
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl Serialize for Id {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

struct IdVisitor;

impl Visitor<'_> for IdVisitor {
    type Value = Id;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a 64-bit id as a string or a number")
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Id, E> {
        Ok(Id(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Id, E> {
        i64::try_from(v).map(Id).map_err(|_| E::custom("id out of range"))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Id, E> {
        v.trim().parse::<i64>().map(Id).map_err(|_| E::custom(format!("invalid id {v:?}")))
    }
}

impl<'de> Deserialize<'de> for Id {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Id, D::Error> {
        d.deserialize_any(IdVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serializes_as_string_and_reads_both_forms() {
        assert_eq!(serde_json::to_string(&Id(i64::MAX)).unwrap(), "\"9223372036854775807\"");
        assert_eq!(serde_json::from_str::<Id>("\"42\"").unwrap(), Id(42));
        assert_eq!(serde_json::from_str::<Id>("42").unwrap(), Id(42));
        assert!(serde_json::from_str::<Id>("\"x1\"").is_err());
        assert!(serde_json::from_str::<Id>("18446744073709551615").is_err());
        assert!(serde_json::from_str::<Id>("1.5").is_err());
    }
}
