//! The report: one markdown table per N, and the small statistics its cells are made of.
//!
//! Lives here: [`Report`] (rows and notes, echoed to stderr as they come), [`Stats`] and the
//! formatting of milliseconds, percentiles and verdicts. Must not live here: how a figure is
//! measured (the phases) or where the report is written (`main`).

use std::fmt::Write as _;

/// p50, p99 and max of a sample (nearest-rank percentiles).
#[derive(Clone, Copy, Debug)]
pub struct Stats {
    /// Sample size.
    pub n: usize,
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest value.
    pub max: f64,
}

/// The percentiles of `values`; `None` for an empty sample.
pub fn stats(mut values: Vec<f64>) -> Option<Stats> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let rank = |p: f64| {
        let index = ((p / 100.0) * values.len() as f64).ceil() as usize;
        values[index.clamp(1, values.len()) - 1]
    };
    Some(Stats {
        n: values.len(),
        p50: rank(50.0),
        p99: rank(99.0),
        max: values[values.len() - 1],
    })
}

/// Milliseconds with sensible precision (seconds from 10 s up).
pub fn ms(v: f64) -> String {
    if v.abs() >= 10_000.0 {
        format!("{:.1} s", v / 1000.0)
    } else if v.abs() >= 100.0 {
        format!("{v:.0} ms")
    } else {
        format!("{v:.1} ms")
    }
}

/// "p50 … · p99 … · max … (n=…)", or "no samples".
pub fn show(s: Option<Stats>) -> String {
    match s {
        Some(s) => format!(
            "p50 {} · p99 {} · max {} (n={})",
            ms(s.p50),
            ms(s.p99),
            ms(s.max),
            s.n
        ),
        None => "no samples".to_owned(),
    }
}

/// "met" or "**missed**".
pub fn verdict(met: bool) -> String {
    if met { "met" } else { "**missed**" }.to_owned()
}

/// measured p50 / theoretical p50 (NaN when either is missing).
pub fn ratio(measured: Option<Stats>, theory: Option<Stats>) -> f64 {
    match (measured, theory) {
        (Some(m), Some(t)) if t.p50 > 0.0 => m.p50 / t.p50,
        _ => f64::NAN,
    }
}

/// One table: a title, rows of (measurement, result, target, verdict) and notes under it.
pub struct Report {
    title: String,
    rows: Vec<[String; 4]>,
    notes: Vec<String>,
}

impl Report {
    /// An empty table with this title.
    pub fn new(title: String) -> Self {
        Self {
            title,
            rows: Vec::new(),
            notes: Vec::new(),
        }
    }
}

impl Report {
    /// Adds a row (and prints it as progress).
    pub fn row(
        &mut self,
        what: impl Into<String>,
        result: impl Into<String>,
        target: &str,
        v: &str,
    ) {
        let row = [what.into(), result.into(), target.to_owned(), v.to_owned()];
        progress!("{} | {} | {} | {}", row[0], row[1], row[2], row[3]);
        self.rows.push(row);
    }

    /// Adds a note under the table (and prints it as progress).
    pub fn note(&mut self, note: impl Into<String>) {
        let note = note.into();
        progress!("note: {note}");
        self.notes.push(note);
    }

    /// The table and its notes as markdown.
    pub fn markdown(&self) -> String {
        let mut out = format!("### {}\n\n", self.title);
        out.push_str("| measurement | result | target | |\n| --- | --- | --- | --- |\n");
        for [a, b, c, d] in &self.rows {
            let _ = writeln!(out, "| {a} | {b} | {c} | {d} |");
        }
        if !self.notes.is_empty() {
            out.push('\n');
            for note in &self.notes {
                let _ = writeln!(out, "- {note}");
            }
        }
        out
    }
}
