//! A hand-written SVG line chart (no plotting dependency): time on x, milliseconds on y.
//!
//! Lives here: [`Chart`] (series of points, dots, axis labels) and its rendering to an SVG
//! string. Must not live here: what is measured (`main.rs`).

use std::fmt::Write as _;

const WIDTH: f64 = 900.0;
const HEIGHT: f64 = 420.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 80.0;

/// One line: a name for the legend, a colour, its points (seconds, milliseconds).
pub struct Line {
    pub name: String,
    pub colour: &'static str,
    pub points: Vec<(f64, f64)>,
}

/// Dots: a name for the legend, a colour, their points (seconds, milliseconds).
pub struct Dots {
    pub name: String,
    pub colour: &'static str,
    pub points: Vec<(f64, f64)>,
}

/// A chart of lines and dots.
pub struct Chart {
    pub title: String,
    pub lines: Vec<Line>,
    pub dots: Vec<Dots>,
}

impl Chart {
    /// The chart as an SVG document.
    pub fn render(&self) -> String {
        let all = self
            .lines
            .iter()
            .flat_map(|l| &l.points)
            .chain(self.dots.iter().flat_map(|d| &d.points));
        let (mut x_max, mut y_max) = (1.0_f64, 1.0_f64);
        for (x, y) in all {
            x_max = x_max.max(*x);
            y_max = y_max.max(*y);
        }
        let y_max = nice(y_max * 1.05);
        let x_max = nice(x_max);
        let sx = |x: f64| LEFT + x / x_max * (WIDTH - LEFT - RIGHT);
        let sy = |y: f64| HEIGHT - BOTTOM - y / y_max * (HEIGHT - TOP - BOTTOM);
        let mut svg = String::new();
        let _ = writeln!(
            svg,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="22" text-anchor="middle" font-size="14">{}</text>"#,
            WIDTH / 2.0,
            escape(&self.title)
        );
        for i in 0..=5 {
            let (x, y) = (x_max * f64::from(i) / 5.0, y_max * f64::from(i) / 5.0);
            let _ = writeln!(
                svg,
                r##"<line x1="{LEFT}" y1="{0:.1}" x2="{1}" y2="{0:.1}" stroke="#ddd"/><text x="{2}" y="{3:.1}" text-anchor="end">{4:.0}</text>"##,
                sy(y),
                WIDTH - RIGHT,
                LEFT - 6.0,
                sy(y) + 4.0,
                y
            );
            let _ = writeln!(
                svg,
                r#"<text x="{:.1}" y="{}" text-anchor="middle">{x:.0}</text>"#,
                sx(x),
                HEIGHT - BOTTOM + 16.0
            );
        }
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="middle">seconds since the ramp started</text><text x="16" y="{}" transform="rotate(-90 16 {})" text-anchor="middle">milliseconds</text>"#,
            (LEFT + WIDTH - RIGHT) / 2.0,
            HEIGHT - BOTTOM + 34.0,
            (TOP + HEIGHT - BOTTOM) / 2.0,
            (TOP + HEIGHT - BOTTOM) / 2.0
        );
        for line in &self.lines {
            let points: Vec<String> = line
                .points
                .iter()
                .map(|(x, y)| format!("{:.1},{:.1}", sx(*x), sy(*y)))
                .collect();
            let _ = writeln!(
                svg,
                r#"<polyline fill="none" stroke="{}" stroke-width="2" points="{}"/>"#,
                line.colour,
                points.join(" ")
            );
        }
        for dots in &self.dots {
            for (x, y) in &dots.points {
                let _ = writeln!(
                    svg,
                    r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{}"/>"#,
                    sx(*x),
                    sy(*y),
                    dots.colour
                );
            }
        }
        let legend = self
            .lines
            .iter()
            .map(|l| (&l.name, l.colour, false))
            .chain(self.dots.iter().map(|d| (&d.name, d.colour, true)));
        for (i, (name, colour, dot)) in legend.enumerate() {
            let x = LEFT + (i as f64 % 3.0) * 270.0;
            let y = HEIGHT - 22.0 + (i / 3) as f64 * 16.0 - 8.0;
            let mark = if dot {
                format!(
                    r#"<circle cx="{}" cy="{}" r="4" fill="{colour}"/>"#,
                    x + 9.0,
                    y - 4.0
                )
            } else {
                format!(
                    r#"<line x1="{x}" y1="{0}" x2="{1}" y2="{0}" stroke="{colour}" stroke-width="3"/>"#,
                    y - 4.0,
                    x + 18.0
                )
            };
            let _ = writeln!(
                svg,
                r#"{mark}<text x="{}" y="{y}">{}</text>"#,
                x + 24.0,
                escape(name)
            );
        }
        svg.push_str("</svg>\n");
        svg
    }
}

/// The next "round" number at or above `v` (1, 2 or 5 times a power of ten).
fn nice(v: f64) -> f64 {
    let magnitude = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|n| *n >= v)
        .unwrap_or(v)
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
