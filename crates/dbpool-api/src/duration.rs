//! `GoDuration`: a non-negative Kubernetes-style duration string ("500ms", "30s", "5m", "1h30m").
//!
//! Lives here: parsing (via `kube::core::Duration`, which follows Go's `time.ParseDuration`),
//! formatting in Go's canonical style (`5m0s`), and the JSON schema with the CEL rule that makes
//! the apiserver reject malformed or zero durations at admission. Nothing else.

use std::{borrow::Cow, fmt, str::FromStr, time::Duration};

use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

/// CEL rule attached to every duration field: Go duration syntax, strictly positive.
pub const DURATION_RULE: &str = concat!(
    "self.matches(",
    go_duration_pattern!(),
    ") && duration(self) > duration('0s')"
);

/// Message the apiserver returns when [`DURATION_RULE`] fails.
pub const DURATION_MESSAGE: &str = "must be a positive duration such as 500ms, 30s, 5m or 1h30m";

/// A positive duration written the Kubernetes way ("500ms", "30s", "5m", "1h30m").
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct GoDuration(pub Duration);

/// Why a duration string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// The text is not Go duration syntax.
    #[error("invalid duration {input:?}: {reason}")]
    Syntax {
        /// The text as given.
        input: String,
        /// What the parser objected to.
        reason: String,
    },
    /// The text parsed to a negative duration.
    #[error("invalid duration {0:?}: must not be negative")]
    Negative(String),
}

impl GoDuration {
    /// A duration of `secs` whole seconds.
    pub const fn from_secs(secs: u64) -> Self {
        Self(Duration::from_secs(secs))
    }

    /// A duration of `millis` milliseconds.
    pub const fn from_millis(millis: u64) -> Self {
        Self(Duration::from_millis(millis))
    }

    /// The wrapped standard duration.
    pub const fn as_std(&self) -> Duration {
        self.0
    }
}

impl From<Duration> for GoDuration {
    fn from(d: Duration) -> Self {
        Self(d)
    }
}

impl FromStr for GoDuration {
    type Err = DurationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.trim().is_empty() {
            return Err(DurationError::Syntax {
                input: s.to_owned(),
                reason: "empty string".to_owned(),
            });
        }
        let parsed: kube::core::Duration = s.parse().map_err(
            |e: kube::core::duration::ParseError| DurationError::Syntax {
                input: s.to_owned(),
                reason: e.to_string(),
            },
        )?;
        if parsed.is_negative() {
            return Err(DurationError::Negative(s.to_owned()));
        }
        Ok(Self(parsed.into()))
    }
}

/// Formats like Go's `time.Duration.String()`: `1h30m0s`, `5m0s`, `30s`, `1.5s`, `500ms`, `0s`.
impl fmt::Display for GoDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.0;
        if d.is_zero() {
            return f.write_str("0s");
        }
        if d < Duration::from_secs(1) {
            let nanos = d.subsec_nanos();
            return if nanos.is_multiple_of(1_000_000) {
                write!(f, "{}ms", nanos / 1_000_000)
            } else if nanos.is_multiple_of(1_000) {
                write!(f, "{}us", nanos / 1_000)
            } else {
                write!(f, "{nanos}ns")
            };
        }
        let total = d.as_secs();
        let (hours, minutes, seconds) = (total / 3600, (total % 3600) / 60, total % 60);
        if hours > 0 {
            write!(f, "{hours}h")?;
        }
        if hours > 0 || minutes > 0 {
            write!(f, "{minutes}m")?;
        }
        let frac = d.subsec_nanos();
        if frac == 0 {
            write!(f, "{seconds}s")
        } else {
            let digits = format!("{frac:09}");
            write!(f, "{seconds}.{}s", digits.trim_end_matches('0'))
        }
    }
}

impl fmt::Debug for GoDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for GoDuration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for GoDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = Cow::<str>::deserialize(deserializer)?;
        text.parse().map_err(de::Error::custom)
    }
}

impl schemars::JsonSchema for GoDuration {
    fn schema_name() -> Cow<'static, str> {
        "GoDuration".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut schemars::generate::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "maxLength": 64,
            "x-kubernetes-validations": [
                { "rule": DURATION_RULE, "message": DURATION_MESSAGE }
            ]
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kubernetes_style_strings() {
        let cases = [
            ("500ms", Duration::from_millis(500)),
            ("30s", Duration::from_secs(30)),
            ("5m", Duration::from_secs(300)),
            ("1h30m", Duration::from_secs(5400)),
            ("1.5s", Duration::from_millis(1500)),
            ("250us", Duration::from_micros(250)),
        ];
        for (text, expected) in cases {
            let parsed: GoDuration = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(parsed.as_std(), expected, "{text}");
        }
    }

    #[test]
    fn rejects_malformed_and_negative_strings() {
        for text in ["", "30", "abc", "5 minutes", "1d", "s", "1.2.3s"] {
            let err = text.parse::<GoDuration>().expect_err(text);
            assert!(
                matches!(err, DurationError::Syntax { .. }),
                "{text}: {err:?}"
            );
            assert!(err.to_string().contains("invalid duration"), "{err}");
        }
        let err = "-5s".parse::<GoDuration>().expect_err("negative");
        assert_eq!(err, DurationError::Negative("-5s".into()));
    }

    #[test]
    fn formats_like_go() {
        let cases = [
            (Duration::ZERO, "0s"),
            (Duration::from_millis(100), "100ms"),
            (Duration::from_secs(30), "30s"),
            (Duration::from_millis(1500), "1.5s"),
            (Duration::from_secs(300), "5m0s"),
            (Duration::from_secs(5400), "1h30m0s"),
            (Duration::from_secs(3600), "1h0m0s"),
        ];
        for (d, expected) in cases {
            assert_eq!(GoDuration(d).to_string(), expected);
            let back: GoDuration = expected.parse().expect("round trip");
            assert_eq!(back.as_std(), d);
        }
    }

    #[test]
    fn serde_uses_strings() {
        let json = serde_json::to_string(&GoDuration::from_secs(90)).expect("serialize");
        assert_eq!(json, "\"1m30s\"");
        let back: GoDuration = serde_json::from_str("\"1m30s\"").expect("deserialize");
        assert_eq!(back, GoDuration::from_secs(90));
        assert!(serde_json::from_str::<GoDuration>("\"soon\"").is_err());
    }
}
