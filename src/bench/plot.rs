//! `idemkv plot`: the picture of a client sweep. Reads the JSON reports that
//! `idemkv bench --json` printed (one per line, as `cluster/bench.sh` keeps
//! them in `results.jsonl`) and draws, for one workload, throughput and p99
//! latency against the number of clients, one line per system, into an SVG.
//! Several reports of one system at one client count (rounds) become their
//! median.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use plotters::prelude::*;

/// `idemkv plot`: throughput and p99 against clients, from bench reports.
#[derive(Debug, Clone, Args)]
pub struct PlotArgs {
    /// JSON reports of `idemkv bench --json`, one per line.
    #[arg(long)]
    pub input: PathBuf,
    /// The SVG to write.
    #[arg(long)]
    pub out: PathBuf,
    /// The workload to draw (reports of others are skipped).
    #[arg(long, default_value = "claim")]
    pub workload: String,
    /// A line under the title (the command and machine, say).
    #[arg(long, default_value = "")]
    pub subtitle: String,
}

/// What the picture needs of one report.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Point {
    pub target: String,
    pub workload: String,
    pub clients: usize,
    pub ops_per_sec: f64,
    #[serde(default)]
    pub items_per_sec: Option<f64>,
    pub latency_us: P99,
}

#[derive(Debug, Clone, serde::Deserialize)]
pub struct P99 {
    pub p99: u64,
}

/// One system's line: (clients, median rate, median p99 in ms), by clients.
pub type Series = Vec<(usize, f64, f64)>;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Each system's series for `workload`, medians over repeated reports.
pub fn series(points: &[Point], workload: &str) -> BTreeMap<String, Series> {
    let mut by: BTreeMap<String, BTreeMap<usize, Vec<&Point>>> = BTreeMap::new();
    for p in points.iter().filter(|p| p.workload == workload) {
        by.entry(p.target.clone())
            .or_default()
            .entry(p.clients)
            .or_default()
            .push(p);
    }
    by.into_iter()
        .map(|(target, at)| {
            let line = at
                .into_iter()
                .map(|(clients, ps)| {
                    let rate = median(
                        ps.iter()
                            .map(|p| p.items_per_sec.unwrap_or(p.ops_per_sec))
                            .collect(),
                    );
                    let p99 = median(
                        ps.iter()
                            .map(|p| p.latency_us.p99 as f64 / 1000.0)
                            .collect(),
                    );
                    (clients, rate, p99)
                })
                .collect();
            (target, line)
        })
        .collect()
}

fn colour(target: &str) -> RGBColor {
    match target {
        "idemkv" => RGBColor(0x1f, 0x77, 0xb4),
        "etcd" => RGBColor(0x2c, 0xa0, 0x2c),
        "redis" => RGBColor(0xd6, 0x27, 0x28),
        "floor" => RGBColor(0x7f, 0x7f, 0x7f),
        "replicated-floor" => RGBColor(0x8c, 0x56, 0x4b),
        _ => RGBColor(0x94, 0x67, 0xbd),
    }
}

/// The SVG text: throughput (left) and p99 (right) against clients, both
/// on log scales, one line per system.
pub fn svg(
    lines: &BTreeMap<String, Series>,
    title: &str,
    subtitle: &str,
) -> anyhow::Result<String> {
    let all: Vec<&(usize, f64, f64)> = lines.values().flatten().collect();
    if all.is_empty() {
        bail!("no reports of that workload to draw");
    }
    let max_clients = all.iter().map(|p| p.0).max().unwrap_or(1).max(2) as f64;
    let (lo_rate, hi_rate) = bounds(all.iter().map(|p| p.1));
    let (lo_p99, hi_p99) = bounds(all.iter().map(|p| p.2));

    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (1200, 520)).into_drawing_area();
        root.fill(&WHITE)?;
        let root = root.titled(title, ("sans-serif", 22))?;
        let (top, body) = root.split_vertically(24);
        top.draw_text(subtitle, &("sans-serif", 13).into_text_style(&top), (10, 4))?;
        let (left, right) = body.split_horizontally(600);
        let charts = [
            (
                left,
                "throughput (ops/s; batch: keys/s)",
                lo_rate,
                hi_rate,
                1usize,
            ),
            (right, "p99 latency (ms)", lo_p99, hi_p99, 2usize),
        ];
        for (area, caption, lo, hi, field) in charts {
            let mut chart = ChartBuilder::on(&area)
                .caption(caption, ("sans-serif", 16))
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(70)
                .build_cartesian_2d((1f64..max_clients).log_scale(), (lo..hi).log_scale())?;
            chart
                .configure_mesh()
                .x_desc("clients")
                .x_label_formatter(&|x| format!("{x:.0}"))
                .y_label_formatter(&|y| short(*y))
                .draw()?;
            for (target, line) in lines {
                let c = colour(target);
                let pts: Vec<(f64, f64)> = line
                    .iter()
                    .map(|p| (p.0 as f64, if field == 1 { p.1 } else { p.2 }))
                    .collect();
                chart
                    .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))?
                    .label(target.as_str())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2))
                    });
                chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 3, c.filled())))?;
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .draw()?;
        }
        root.present()?;
    }
    Ok(out)
}

/// Log-axis bounds around the values, with a margin.
fn bounds(v: impl Iterator<Item = f64>) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::MAX, f64::MIN);
    for x in v.filter(|x| *x > 0.0) {
        lo = lo.min(x);
        hi = hi.max(x);
    }
    if lo > hi {
        return (0.1, 1.0);
    }
    (lo / 1.5, hi * 1.5)
}

fn short(y: f64) -> String {
    if y >= 1000.0 {
        format!("{:.0}k", y / 1000.0)
    } else if y >= 10.0 {
        format!("{y:.0}")
    } else {
        format!("{y:.1}")
    }
}

/// The `idemkv plot` subcommand.
pub fn run(a: PlotArgs) -> anyhow::Result<i32> {
    let text = std::fs::read_to_string(&a.input)
        .with_context(|| format!("reading {}", a.input.display()))?;
    let mut points = Vec::new();
    for (n, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let p: Point = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not a bench report", a.input.display(), n + 1))?;
        points.push(p);
    }
    let lines = series(&points, &a.workload);
    let title = format!(
        "{} workload: throughput and p99 against clients",
        a.workload
    );
    let svg = svg(&lines, &title, &a.subtitle)?;
    std::fs::write(&a.out, svg).with_context(|| format!("writing {}", a.out.display()))?;
    crate::out::print_line(format_args!("{}", a.out.display()));
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(target: &str, clients: usize, rate: f64, p99_us: u64) -> Point {
        Point {
            target: target.into(),
            workload: "claim".into(),
            clients,
            ops_per_sec: rate,
            items_per_sec: None,
            latency_us: P99 { p99: p99_us },
        }
    }

    #[test]
    fn rounds_become_medians_and_each_system_gets_a_line_in_both_charts() {
        let mut points = Vec::new();
        for (rate, p99) in [(900.0, 3_000), (1_000.0, 2_000), (5_000.0, 9_000)] {
            points.push(point("idemkv", 1, rate, p99));
        }
        points.push(point("idemkv", 64, 8_000.0, 20_000));
        points.push(point("etcd", 1, 700.0, 4_000));
        points.push(point("etcd", 64, 3_000.0, 50_000));
        let mut other = point("etcd", 64, 1.0, 1);
        other.workload = "get".into();
        points.push(other);

        let lines = series(&points, "claim");
        assert_eq!(lines.len(), 2);
        // Three rounds at 1 client: the median, not the mean or the last.
        assert_eq!(lines["idemkv"][0], (1, 1_000.0, 3.0));
        // The get report is not drawn in the claim picture.
        assert_eq!(lines["etcd"], vec![(1, 700.0, 4.0), (64, 3_000.0, 50.0)]);

        let text = svg(&lines, "claim workload", "a subtitle").unwrap();
        assert!(text.starts_with("<svg"), "{}", &text[..80.min(text.len())]);
        for label in [
            "idemkv",
            "etcd",
            "clients",
            "p99 latency (ms)",
            "a subtitle",
        ] {
            assert!(text.contains(label), "{label} missing from the SVG");
        }
        // Two systems, two charts: four lines (polylines), besides the
        // legend's sample strokes.
        assert!(text.matches("<polyline").count() >= 4, "{text}");
    }

    #[test]
    fn nothing_to_draw_is_an_error() {
        let lines = series(&[point("idemkv", 1, 1.0, 1)], "lifecycle");
        let e = svg(&lines, "t", "").unwrap_err();
        assert!(e.to_string().contains("no reports"), "{e}");
    }
}
