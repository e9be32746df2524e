//! The few things that differ between the three SQL databases.

use std::borrow::Cow;
use std::fmt;

/// Which SQL database a [`crate::SqlStore`] talks to, chosen from the URL scheme.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dialect {
    /// `sqlite:` URLs (the embedded default).
    Sqlite,
    /// `mysql:` or `mariadb:` URLs.
    Mysql,
    /// `postgres:` or `postgresql:` URLs.
    Postgres,
}

impl Dialect {
    /// The dialect of a database URL, by its scheme; `None` for anything else.
    pub fn from_url(url: &str) -> Option<Dialect> {
        let scheme = url.split(':').next()?.trim().to_ascii_lowercase();
        match scheme.as_str() {
            "sqlite" => Some(Dialect::Sqlite),
            "mysql" | "mariadb" => Some(Dialect::Mysql),
            "postgres" | "postgresql" => Some(Dialect::Postgres),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Dialect::Sqlite => "sqlite",
            Dialect::Mysql => "mysql",
            Dialect::Postgres => "postgres",
        }
    }

    /// The statement text for this database: SQL is written with `?`
    /// placeholders, which PostgreSQL needs as `$1, $2, …`.
    pub fn sql<'a>(self, sql: &'a str) -> Cow<'a, str> {
        match self {
            Dialect::Postgres => Cow::Owned(numbered_placeholders(sql)),
            _ => Cow::Borrowed(sql),
        }
    }

    /// Most rows one statement of a batch should carry, given the most that
    /// fit. On SQLite, one: there is no round trip to save, and a one-row
    /// statement is prepared once and cached, while every other row count is
    /// a statement of its own shape, parsed and planned again.
    pub(crate) fn rows_per_statement(self, most: usize) -> usize {
        match self {
            Dialect::Sqlite => 1,
            Dialect::Mysql | Dialect::Postgres => most,
        }
    }

    /// `INSERT` that skips rows whose key exists: the statement head (up to
    /// `VALUES`) and its tail.
    pub(crate) fn insert_ignore(self) -> (&'static str, &'static str) {
        match self {
            Dialect::Mysql => ("INSERT IGNORE INTO", ""),
            _ => ("INSERT INTO", " ON CONFLICT DO NOTHING"),
        }
    }
}

impl fmt::Display for Dialect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Rewrites `?` placeholders as `$1, $2, …`, leaving quoted text alone.
pub(crate) fn numbered_placeholders(sql: &str) -> String {
    replace_placeholders(sql, 16, |n, out| {
        out.push('$');
        out.push_str(&(n + 1).to_string());
    })
}

/// `sql` with its `?` placeholders outside quoted text replaced: `write(n, out)`
/// writes the `n`th (from 0) into `out`. For SQL written in this crate: it
/// knows `'…'` and `"…"` quoting, not comments, backticks or backslash escapes.
pub(crate) fn replace_placeholders(sql: &str, extra: usize, mut write: impl FnMut(usize, &mut String)) -> String {
    let mut out = String::with_capacity(sql.len() + extra);
    let mut n = 0usize;
    let mut quote: Option<char> = None;
    for c in sql.chars() {
        match quote {
            Some(q) => {
                out.push(c);
                if c == q {
                    quote = None;
                }
            }
            None => match c {
                '?' => {
                    write(n, &mut out);
                    n += 1;
                }
                '\'' | '"' => {
                    quote = Some(c);
                    out.push(c);
                }
                _ => out.push(c),
            },
        }
    }
    out
}

/// `(?, ?, ?), (?, ?, ?)`: `rows` groups of `cols` placeholders.
pub(crate) fn value_groups(rows: usize, cols: usize) -> String {
    let group = format!("({})", vec!["?"; cols].join(", "));
    vec![group; rows].join(", ")
}

/// `?, ?, ?`: `n` placeholders.
pub(crate) fn placeholders(n: usize) -> String {
    vec!["?"; n].join(", ")
}

/// The escape character of every `LIKE` pattern this crate builds (`ESCAPE '!'`);
/// `!` needs no escaping in string literals on any of the three databases,
/// unlike backslash, which MySQL treats as an escape in literals.
pub(crate) const LIKE_ESCAPE: char = '!';

/// A `LIKE` pattern matching any text containing `needle` literally.
pub(crate) fn contains_pattern(needle: &str) -> String {
    let mut out = String::with_capacity(needle.len() + 2);
    out.push('%');
    for c in needle.chars() {
        if c == '%' || c == '_' || c == LIKE_ESCAPE {
            out.push(LIKE_ESCAPE);
        }
        out.push(c);
    }
    out.push('%');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dialect_from_url() {
        assert_eq!(Dialect::from_url("sqlite://data/x.db?mode=rwc"), Some(Dialect::Sqlite));
        assert_eq!(Dialect::from_url("sqlite::memory:"), Some(Dialect::Sqlite));
        assert_eq!(Dialect::from_url("mysql://root@h/db"), Some(Dialect::Mysql));
        assert_eq!(Dialect::from_url("mariadb://root@h/db"), Some(Dialect::Mysql));
        assert_eq!(Dialect::from_url("postgres://h/db"), Some(Dialect::Postgres));
        assert_eq!(Dialect::from_url("postgresql://h/db"), Some(Dialect::Postgres));
        assert_eq!(Dialect::from_url("redis://h"), None);
        assert_eq!(Dialect::from_url(""), None);
    }

    #[test]
    fn numbers_placeholders_outside_quotes() {
        assert_eq!(
            numbered_placeholders("SELECT a FROM t WHERE x = ? AND y LIKE ? ESCAPE '!' AND z = '?' AND w IN (?, ?)"),
            "SELECT a FROM t WHERE x = $1 AND y LIKE $2 ESCAPE '!' AND z = '?' AND w IN ($3, $4)"
        );
        assert_eq!(Dialect::Mysql.sql("a = ?"), "a = ?");
        assert_eq!(Dialect::Postgres.sql("a = ?"), "a = $1");
    }

    #[test]
    fn builds_groups() {
        assert_eq!(value_groups(2, 3), "(?, ?, ?), (?, ?, ?)");
        assert_eq!(placeholders(3), "?, ?, ?");
    }

    #[test]
    fn escapes_like_patterns() {
        assert_eq!(contains_pattern("ab"), "%ab%");
        assert_eq!(contains_pattern("100%_!x"), "%100!%!_!!x%");
        assert_eq!(contains_pattern(""), "%%");
    }
}
