//! SVG plots, drawn directly: grouped bars for IOPS and throughput, and
//! latency distributions as lines.
use super::report::merged_histogram;
use super::results::{median, Results, Row};
use std::fmt::Write;

const WIDTH: f64 = 860.0;
const HEIGHT: f64 = 420.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 160.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 60.0;
const COLOURS: [&str; 6] = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"];

/// A round axis maximum at or above `max`.
fn axis_max(max: f64) -> f64 {
    if max <= 0.0 {
        return 1.0;
    }
    let step = 10f64.powf(max.log10().floor());
    (max / step).ceil() * step
}

fn frame(title: &str, y_label: &str, y_max: f64) -> String {
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{HEIGHT}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"24\" font-size=\"16\" text-anchor=\"middle\">{title}</text>\n",
        WIDTH / 2.0
    );
    let plot_h = HEIGHT - TOP - BOTTOM;
    for i in 0..=5 {
        let v = y_max * i as f64 / 5.0;
        let y = TOP + plot_h * (1.0 - i as f64 / 5.0);
        let _ = writeln!(
            svg,
            "<line x1=\"{LEFT}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\" stroke=\"#ddd\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            WIDTH - RIGHT,
            LEFT - 6.0,
            y + 4.0,
            if y_max >= 10.0 { format!("{v:.0}") } else { format!("{v:.2}") }
        );
    }
    let _ = writeln!(
        svg,
        "<text transform=\"translate(18,{:.1}) rotate(-90)\" text-anchor=\"middle\">{y_label}</text>",
        TOP + plot_h / 2.0
    );
    svg
}

fn legend(svg: &mut String, names: &[String]) {
    for (i, name) in names.iter().enumerate() {
        let y = TOP + 20.0 * i as f64;
        let _ = writeln!(
            svg,
            "<rect x=\"{:.1}\" y=\"{y:.1}\" width=\"14\" height=\"14\" fill=\"{}\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\">{name}</text>",
            WIDTH - RIGHT + 20.0,
            COLOURS[i % COLOURS.len()],
            WIDTH - RIGHT + 40.0,
            y + 12.0
        );
    }
}

/// Grouped bars: one group per label, one bar per series.
pub fn bar_chart(title: &str, y_label: &str, groups: &[String], series: &[(String, Vec<Option<f64>>)]) -> String {
    let max = series.iter().flat_map(|(_, v)| v.iter().flatten()).fold(0.0f64, |a, &b| a.max(b));
    let y_max = axis_max(max);
    let mut svg = frame(title, y_label, y_max);
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let group_w = plot_w / groups.len().max(1) as f64;
    let bar_w = group_w * 0.8 / series.len().max(1) as f64;
    for (g, label) in groups.iter().enumerate() {
        let x0 = LEFT + group_w * g as f64 + group_w * 0.1;
        for (s, (_, values)) in series.iter().enumerate() {
            if let Some(v) = values.get(g).copied().flatten() {
                let h = plot_h * v / y_max;
                let _ = writeln!(
                    svg,
                    "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{h:.1}\" fill=\"{}\"><title>{v:.0}</title></rect>",
                    x0 + bar_w * s as f64,
                    TOP + plot_h - h,
                    bar_w * 0.95,
                    COLOURS[s % COLOURS.len()]
                );
            }
        }
        let _ = writeln!(
            svg,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{label}</text>",
            x0 + group_w * 0.4,
            HEIGHT - BOTTOM + 20.0
        );
    }
    legend(&mut svg, &series.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>());
    svg.push_str("</svg>\n");
    svg
}

/// Lines over shared x labels (fractions per bucket).
pub fn line_chart(title: &str, y_label: &str, x_labels: &[String], series: &[(String, Vec<f64>)]) -> String {
    let max = series.iter().flat_map(|(_, v)| v.iter()).fold(0.0f64, |a, &b| a.max(b));
    let y_max = axis_max(max);
    let mut svg = frame(title, y_label, y_max);
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let step = plot_w / (x_labels.len().max(2) - 1) as f64;
    for (i, label) in x_labels.iter().enumerate() {
        let _ = writeln!(
            svg,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{label}</text>",
            LEFT + step * i as f64,
            HEIGHT - BOTTOM + 20.0
        );
    }
    for (s, (_, values)) in series.iter().enumerate() {
        let points: Vec<String> = values
            .iter()
            .enumerate()
            .map(|(i, v)| format!("{:.1},{:.1}", LEFT + step * i as f64, TOP + plot_h * (1.0 - v / y_max)))
            .collect();
        let _ = writeln!(
            svg,
            "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"2\" points=\"{}\"/>",
            COLOURS[s % COLOURS.len()],
            points.join(" ")
        );
    }
    legend(&mut svg, &series.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>());
    let _ = writeln!(
        svg,
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">request latency (upper bound of each log2 bucket)</text>",
        LEFT + plot_w / 2.0,
        HEIGHT - 12.0
    );
    svg.push_str("</svg>\n");
    svg
}

fn cell_median(results: &Results, column: &str, workload: &str, f: fn(&Row) -> f64) -> Option<f64> {
    median(results.cell(column, workload, 1), f)
}

pub fn all(results: &Results) -> Vec<(&'static str, String)> {
    let columns = results.columns();
    let small = [
        "4K randread QD1",
        "4K randread QD8",
        "4K randread QD32",
        "4K randwrite QD1",
        "4K randwrite QD8",
        "4K randwrite QD32",
    ];
    let groups: Vec<String> = small.iter().map(|w| w.trim_start_matches("4K ").to_string()).collect();
    let series = |workloads: &[&str], f: fn(&Row) -> f64| -> Vec<(String, Vec<Option<f64>>)> {
        columns.iter().map(|c| (c.clone(), workloads.iter().map(|w| cell_median(results, c, w, f)).collect())).collect()
    };
    let iops = bar_chart("4 KiB IOPS by mode and queue depth (1 vCPU)", "IOPS", &groups, &series(&small, Row::iops));
    let large = ["128K seq read QD4", "128K seq write QD4"];
    let large_groups: Vec<String> = large.iter().map(|w| w.to_string()).collect();
    let throughput =
        bar_chart("128 KiB throughput by mode (1 vCPU)", "MiB/s", &large_groups, &series(&large, Row::mib_per_s));
    // Latency: the share of requests in each log2 bucket, over the buckets any system used.
    let hz = results.machine.tsc_hz;
    let hists: Vec<(String, Vec<u64>)> =
        columns.iter().map(|c| (c.clone(), merged_histogram(results, c, "4K randread QD1", 1))).collect();
    let used: Vec<usize> = (0..48).filter(|&b| hists.iter().any(|(_, h)| h[b] > 0)).collect();
    let (first, last) = (used.first().copied().unwrap_or(0), used.last().copied().unwrap_or(0));
    let labels: Vec<String> = (first..=last)
        .map(|b| {
            let us = (1u64 << (b + 1)) as f64 / hz * 1e6;
            if us >= 1000.0 {
                format!("{:.1}ms", us / 1e3)
            } else {
                format!("{us:.0}µs")
            }
        })
        .collect();
    let lines: Vec<(String, Vec<f64>)> = hists
        .iter()
        .map(|(name, h)| {
            let total = h.iter().sum::<u64>().max(1) as f64;
            (name.clone(), (first..=last).map(|b| h[b] as f64 / total).collect())
        })
        .collect();
    let latency =
        line_chart("Latency distribution, 4 KiB random read at QD1 (1 vCPU)", "share of requests", &labels, &lines);
    vec![("iops.svg", iops), ("throughput.svg", throughput), ("latency.svg", latency)]
}
