//! Reading the operators' own logs into the history: the instants their terms started.
//!
//! Lives here: [`parse_term`], which reads one JSON log line of `dbpool-operator` and returns the
//! [`Term`] it records (the `leadership: term started` line, with its identity and epoch). A
//! term's start is when a process's prober starts from no connection: the cost replay's
//! "leader changes" (a process that stood by a moment and leads again starts a new term too,
//! under the same epoch). Must not live here: judging, reading files.

use crate::history::Term;

/// The term one operator log line records as started, if it records one.
pub fn parse_term(line: &str) -> Option<Term> {
    if !line.contains("leadership: term started") {
        return None;
    }
    let value: serde_json::Value = serde_json::from_str(line).ok()?;
    let fields = value.get("fields")?;
    if fields.get("message")?.as_str()? != "leadership: term started" {
        return None;
    }
    let time: jiff::Timestamp = value.get("timestamp")?.as_str()?.parse().ok()?;
    Some(Term {
        time: time.as_millisecond(),
        identity: fields.get("identity")?.as_str()?.to_owned(),
        epoch: fields.get("epoch")?.as_i64()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_term_start_is_read_and_nothing_else() {
        let line = r#"{"timestamp":"2026-12-02T14:16:13.531928Z","level":"INFO","fields":{"message":"leadership: term started","identity":"op-1_efce4d4a","epoch":2,"mono_ns":1},"target":"dbpool_operator::controller::leadership"}"#;
        let term = parse_term(line).expect("a term");
        assert_eq!(term.identity, "op-1_efce4d4a");
        assert_eq!(term.epoch, 2);
        assert_eq!(term.time, 1_796_220_973_531);
        let ended = line.replace("term started", "term ended");
        assert_eq!(parse_term(&ended), None);
        assert_eq!(parse_term("leadership: term started, not JSON"), None);
    }
}
