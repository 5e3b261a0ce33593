//! The latency-under-load plot (SVG, via `plotters`).

use std::path::Path;

use anyhow::Context as _;
use plotters::prelude::*;

use crate::relay::RelayResult;

/// Plots p50, p99 and p99.9 latency (log scale, ms) against delivered messages/s.
pub fn latency_under_load(path: &Path, runs: &[&RelayResult]) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut points: Vec<&RelayResult> = runs.to_vec();
    points.sort_by(|a, b| a.delivered_per_second.total_cmp(&b.delivered_per_second));
    let max_x = points
        .iter()
        .map(|r| r.delivered_per_second)
        .fold(1.0, f64::max)
        * 1.1;
    let max_y = points.iter().map(|r| r.latency.p999_ms).fold(1.0, f64::max) * 2.0;
    let root = SVGBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE).context("plot")?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Sealpost relay: latency under load (P = 100 pairs, server on one core)",
            ("sans-serif", 18),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..max_x, (0.05..max_y).log_scale())
        .context("plot")?;
    chart
        .configure_mesh()
        .x_desc("delivered messages/s")
        .y_desc("latency, ms (log scale)")
        .draw()
        .context("plot")?;
    type Series = (&'static str, RGBColor, fn(&RelayResult) -> f64);
    let series: [Series; 3] = [
        ("p50", BLUE, |r| r.latency.p50_ms),
        ("p99", RED, |r| r.latency.p99_ms),
        ("p99.9", BLACK, |r| r.latency.p999_ms),
    ];
    for (name, color, value) in series {
        let data: Vec<(f64, f64)> = points
            .iter()
            .map(|r| (r.delivered_per_second, value(r).max(0.05)))
            .collect();
        chart
            .draw_series(LineSeries::new(data.clone(), color.stroke_width(2)))
            .context("plot")?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        chart
            .draw_series(data.into_iter().map(|p| Circle::new(p, 4, color.filled())))
            .context("plot")?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .context("plot")?;
    root.present().context("writing the plot")?;
    println!("wrote {}", path.display());
    Ok(())
}
