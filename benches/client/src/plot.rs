//! Timeline plots: one SVG per scenario, every pool configuration of the run on one time axis.
//!
//! Lives here: [`write_svg`] (plotters, SVG backend only). Time is on x, in seconds since
//! `pg_ctl stop` was invoked (each run aligned on its own stop). Rows, top to bottom: the
//! server's state (from the dbpool-client defaults run, or the first run), then for each
//! dbpool-client configuration its breaker, its readiness pings and its credentialed connects
//! (one tick each), then for every configuration its calls: successes in the upper half (green),
//! failures in the lower half (red), darker for more calls in the bin (log scale). Must not live
//! here: measuring (`scenario`, `load`, `timeline`).

use std::path::Path;

use dbpool_client::BreakerState;
use plotters::{coord::types::RangedCoordf64, prelude::*};

use crate::{
    load::BUCKET_NS,
    scenario::{RunResult, Scenario},
};

const WIDTH: u32 = 1500;
const ROW_PX: u32 = 26;
const LABEL_PX: u32 = 300;

enum Row<'a> {
    Server(&'a RunResult),
    Breaker(&'a RunResult),
    Ticks(&'a RunResult, Counter),
    Calls(&'a RunResult),
}

#[derive(Clone, Copy)]
enum Counter {
    Pings,
    Connects,
}

fn secs(r: &RunResult, t_ns: u64) -> f64 {
    (t_ns as f64 - r.stop_at as f64) / 1e9
}

fn label(row: &Row<'_>) -> String {
    match row {
        Row::Server(_) => "PostgreSQL".into(),
        Row::Breaker(r) => format!("breaker: {}", r.kind.label()),
        Row::Ticks(r, Counter::Pings) => format!("pings: {}", r.kind.label()),
        Row::Ticks(r, Counter::Connects) => format!("credentialed connects: {}", r.kind.label()),
        Row::Calls(r) => format!("calls: {}", r.kind.label()),
    }
}

/// Bins of `width_ns` from `from_ns`: summed (ok, fail) per bin.
fn bins(r: &RunResult, from_ns: i128, width_ns: u64, n: usize) -> Vec<(u64, u64)> {
    let mut out = vec![(0u64, 0u64); n];
    for (i, (ok, fail)) in r.merged.timeline.iter().enumerate() {
        if *ok == 0 && *fail == 0 {
            continue;
        }
        let t = i128::from(i as u64 * BUCKET_NS) - from_ns;
        if t < 0 {
            continue;
        }
        let b = (t / i128::from(width_ns)) as usize;
        if let Some(slot) = out.get_mut(b) {
            slot.0 += u64::from(*ok);
            slot.1 += u64::from(*fail);
        }
    }
    out
}

/// When `which` grew, in seconds since the stop. Pings are the kernel's connects minus the
/// credentialed ones, cumulated from the first sample (a tick when that count reaches a new
/// high, so a connect counted by the kernel a sample before the pool counts it is no ping).
fn ticks(r: &RunResult, which: Counter) -> Vec<f64> {
    let mut out = Vec::new();
    let Some(first) = r.samples.iter().find(|s| s.connects.is_some()) else {
        return out;
    };
    let (ao0, c0) = (first.active_opens, first.connects.unwrap_or(0));
    let mut high: i128 = 0;
    for s in &r.samples {
        let Some(c) = s.connects else { continue };
        let conns = i128::from(c) - i128::from(c0);
        let v = match which {
            Counter::Connects => conns,
            Counter::Pings => i128::from(s.active_opens) - i128::from(ao0) - conns,
        };
        if v > high {
            high = v;
            out.push(secs(r, s.t));
        }
    }
    out
}

fn shade(base: RGBColor, n: u64, max: u64) -> RGBColor {
    let f = ((n as f64 + 1.0).ln() / (max as f64 + 1.0).ln()).clamp(0.15, 1.0);
    let mix = |c: u8| (255.0 - (255.0 - f64::from(c)) * f) as u8;
    RGBColor(mix(base.0), mix(base.1), mix(base.2))
}

type Chart<'a, 'b> = ChartContext<'a, SVGBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;
type DrawResult = Result<(), DrawingAreaErrorKind<std::io::Error>>;

/// The x range and the bin width of the calls' rows.
#[derive(Clone, Copy)]
struct Axis {
    x0: f64,
    x1: f64,
    bin_ns: u64,
    nbins: usize,
}

impl Axis {
    fn clamp(&self, x: f64, y: f64) -> (f64, f64) {
        (x.clamp(self.x0, self.x1), y)
    }
}

fn band(chart: &mut Chart<'_, '_>, ax: Axis, a: f64, b: f64, y0: f64, c: RGBColor) -> DrawResult {
    chart.draw_series(std::iter::once(Rectangle::new(
        [ax.clamp(a, y0 + 0.15), ax.clamp(b, y0 + 0.85)],
        c.filled(),
    )))?;
    Ok(())
}

const GREEN: RGBColor = RGBColor(120, 190, 120);
const ORANGE: RGBColor = RGBColor(240, 170, 60);
const RED: RGBColor = RGBColor(220, 80, 80);
const YELLOW: RGBColor = RGBColor(240, 210, 80);

fn server_row(chart: &mut Chart<'_, '_>, ax: Axis, r: &RunResult, y0: f64) -> DrawResult {
    let stop_ret = r.stop_at + u64::try_from(r.stop_took.as_nanos()).unwrap_or(0);
    let start_at = r
        .ready_at
        .saturating_sub(u64::try_from(r.restart.as_nanos()).unwrap_or(0));
    let spans = [
        (ax.x0, secs(r, r.stop_at), GREEN),
        (secs(r, r.stop_at), secs(r, stop_ret), ORANGE),
        (secs(r, stop_ret), secs(r, start_at), RED),
        (secs(r, start_at), secs(r, r.ready_at), YELLOW),
        (secs(r, r.ready_at), ax.x1, GREEN),
    ];
    for (a, b, c) in spans {
        band(chart, ax, a, b, y0, c)?;
    }
    Ok(())
}

fn breaker_row(chart: &mut Chart<'_, '_>, ax: Axis, r: &RunResult, y0: f64) -> DrawResult {
    let mut segs: Vec<(f64, f64, BreakerState)> = Vec::new();
    for s in &r.samples {
        let Some(b) = s.breaker else { continue };
        let t = secs(r, s.t);
        match segs.last_mut() {
            Some(last) if last.2 == b => last.1 = t,
            Some(last) => {
                last.1 = t;
                segs.push((t, t, b));
            }
            None => segs.push((t, t, b)),
        }
    }
    for (a, b, st) in segs {
        let c = match st {
            BreakerState::Closed => GREEN,
            BreakerState::Open => RED,
            BreakerState::HalfOpen => YELLOW,
        };
        band(chart, ax, a, b, y0, c)?;
    }
    Ok(())
}

fn ticks_row(
    chart: &mut Chart<'_, '_>,
    ax: Axis,
    r: &RunResult,
    which: Counter,
    y0: f64,
) -> DrawResult {
    let c = match which {
        Counter::Pings => RGBColor(60, 110, 200),
        Counter::Connects => RGBColor(130, 60, 160),
    };
    let ticks = ticks(r, which);
    chart.draw_series(
        ticks
            .into_iter()
            .filter(|t| *t >= ax.x0 && *t <= ax.x1)
            .map(|t| PathElement::new(vec![(t, y0 + 0.1), (t, y0 + 0.9)], c.stroke_width(2))),
    )?;
    Ok(())
}

fn calls_row(chart: &mut Chart<'_, '_>, ax: Axis, r: &RunResult, y0: f64) -> DrawResult {
    let from = i128::from(r.stop_at) + (ax.x0 * 1e9) as i128;
    let b = bins(r, from, ax.bin_ns, ax.nbins);
    let max_ok = b.iter().map(|x| x.0).max().unwrap_or(0).max(1);
    let max_fail = b.iter().map(|x| x.1).max().unwrap_or(0).max(1);
    let w = ax.bin_ns as f64 / 1e9;
    let mut rects = Vec::new();
    for (k, (ok, fail)) in b.iter().enumerate() {
        let a = ax.x0 + k as f64 * w;
        if *ok > 0 {
            rects.push(Rectangle::new(
                [ax.clamp(a, y0 + 0.5), ax.clamp(a + w, y0 + 0.92)],
                shade(RGBColor(30, 140, 60), *ok, max_ok).filled(),
            ));
        }
        if *fail > 0 {
            rects.push(Rectangle::new(
                [ax.clamp(a, y0 + 0.08), ax.clamp(a + w, y0 + 0.5)],
                shade(RGBColor(200, 30, 30), *fail, max_fail).filled(),
            ));
        }
    }
    chart.draw_series(rects)?;
    let t = secs(r, r.ready_at);
    chart.draw_series(std::iter::once(PathElement::new(
        vec![(t, y0), (t, y0 + 1.0)],
        BLACK.stroke_width(1),
    )))?;
    Ok(())
}

fn rows(runs: &[RunResult]) -> Vec<Row<'_>> {
    let server = runs.iter().find(|r| r.kind.is_ours()).or(runs.first());
    let mut rows: Vec<Row<'_>> = server.into_iter().map(Row::Server).collect();
    for r in runs.iter().filter(|r| r.kind.is_ours()) {
        rows.push(Row::Breaker(r));
        rows.push(Row::Ticks(r, Counter::Pings));
        rows.push(Row::Ticks(r, Counter::Connects));
    }
    rows.extend(runs.iter().map(Row::Calls));
    rows
}

/// Writes the timeline of `runs` through `scenario` to `path`.
pub fn write_svg(path: &Path, scenario: Scenario, runs: &[RunResult]) -> Result<(), String> {
    draw(path, scenario, runs).map_err(|e| format!("plot {}: {e}", path.display()))
}

fn draw(path: &Path, scenario: Scenario, runs: &[RunResult]) -> DrawResult {
    let rows = rows(runs);
    // x: from 1 s before the stop to the latest end of a run (≥ 2 s after ready).
    let x0 = -1.0f64;
    let x1 = runs
        .iter()
        .map(|r| secs(r, r.end_at).max(secs(r, r.ready_at) + 2.0))
        .fold(2.0f64, f64::max);
    let n = rows.len();
    let height = 90 + ROW_PX * n as u32 + 60;
    let root = SVGBackend::new(path, (WIDTH, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{}: timeline", scenario.title()),
            ("sans-serif", 24),
        )
        .margin(10)
        .margin_bottom(50)
        .x_label_area_size(30)
        .y_label_area_size(LABEL_PX)
        .build_cartesian_2d(x0..x1, 0f64..n as f64)?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .disable_y_axis()
        .x_labels(20)
        .light_line_style(WHITE)
        .x_desc("seconds since pg_ctl stop")
        .draw()?;
    let px_per_s = f64::from(WIDTH - LABEL_PX - 20) / (x1 - x0);
    let bin_ns = ((1e9 / px_per_s) as u64).max(BUCKET_NS);
    let nbins = ((x1 - x0) * 1e9 / bin_ns as f64).ceil() as usize + 1;
    let ax = Axis {
        x0,
        x1,
        bin_ns,
        nbins,
    };
    // Row i (top to bottom) spans y in [n-i-1, n-i].
    for (i, row) in rows.iter().enumerate() {
        let y0 = (n - i - 1) as f64;
        let at = chart.backend_coord(&(x0, y0 + 0.5));
        root.draw(&Text::new(
            label(row),
            (10, at.1 - 8),
            ("sans-serif", 16).into_font().color(&BLACK),
        ))?;
        match row {
            Row::Server(r) => server_row(&mut chart, ax, r, y0)?,
            Row::Breaker(r) => breaker_row(&mut chart, ax, r, y0)?,
            Row::Ticks(r, which) => ticks_row(&mut chart, ax, r, *which, y0)?,
            Row::Calls(r) => calls_row(&mut chart, ax, r, y0)?,
        }
    }
    root.draw(&Text::new(
        "PostgreSQL and breaker: green up / Closed, orange stopping, red down / Open, yellow starting / HalfOpen. \
         Calls: green (upper half) succeeded, red (lower half) failed, darker = more per bin (log); black line: that run's ready.",
        (10, height as i32 - 30),
        ("sans-serif", 15).into_font().color(&BLACK),
    ))?;
    root.present()?;
    Ok(())
}
