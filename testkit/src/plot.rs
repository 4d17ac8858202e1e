//! PNG charts drawn by the benchmarks themselves, with a font embedded in
//! the build (DejaVu Sans, from the `dejavu` crate): no system package is
//! needed to draw them. The benchmarks write them beside the report,
//! `docs/benchmarks.md`, which shows them.

use std::path::Path;

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// One set of bars: a name for the legend and a value per category.
pub struct Series {
    pub name: String,
    pub values: Vec<f64>,
}

impl Series {
    pub fn new(name: &str, values: Vec<f64>) -> Series {
        Series {
            name: name.to_string(),
            values,
        }
    }
}

const FONT: &str = "sans-serif";
const COLORS: [RGBColor; 4] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
];

/// A grouped bar chart in `path` (960x540 PNG; its directory is made): a group of bars per
/// category, one bar per series, each bar with its value written above it,
/// the y axis labelled `y_label` (say its unit) and starting at 0.
pub fn bars<S: AsRef<str>>(
    path: &Path,
    title: &str,
    y_label: &str,
    categories: &[S],
    series: &[Series],
) -> Result<(), String> {
    if series.is_empty() || series.iter().any(|s| s.values.len() != categories.len()) {
        return Err(format!(
            "chart {}: every series needs a value per category ({})",
            path.display(),
            categories.len()
        ));
    }
    let e = |x: &dyn std::fmt::Display| format!("chart {}: {x}", path.display());
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|x| e(&x))?;
    }
    // Registering twice keeps the first; the result says nothing else.
    let _ = plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular());
    let root = BitMapBackend::new(path, (960, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let top = series
        .iter()
        .flat_map(|s| s.values.iter().copied())
        .fold(0.0, f64::max)
        .max(1e-9)
        * 1.15;
    let decimals = if top < 20.0 { 1 } else { 0 };
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FONT, 24))
        .margin(20)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(0f64..categories.len() as f64, 0f64..top)
        .map_err(|x| e(&x))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(1)
        .x_label_formatter(&|_| String::new())
        .y_label_formatter(&|v| format!("{v:.decimals$}"))
        .y_desc(y_label)
        .label_style((FONT, 16))
        .draw()
        .map_err(|x| e(&x))?;
    let width = 0.8 / series.len() as f64;
    let above = TextStyle::from((FONT, 13).into_font()).pos(Pos::new(HPos::Center, VPos::Bottom));
    for (j, s) in series.iter().enumerate() {
        let color = COLORS[j % COLORS.len()];
        let left = move |i: usize| i as f64 + 0.1 + j as f64 * width;
        chart
            .draw_series(s.values.iter().enumerate().map(|(i, &v)| {
                Rectangle::new([(left(i), 0.0), (left(i) + width, v)], color.filled())
            }))
            .map_err(|x| e(&x))?
            .label(s.name.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 12, y + 6)], color.filled()));
        chart
            .draw_series(s.values.iter().enumerate().map(|(i, &v)| {
                Text::new(
                    format!("{v:.decimals$}"),
                    (left(i) + width / 2.0, v),
                    above.clone(),
                )
            }))
            .map_err(|x| e(&x))?;
    }
    let below = TextStyle::from((FONT, 16).into_font()).pos(Pos::new(HPos::Center, VPos::Top));
    for (i, c) in categories.iter().enumerate() {
        let (x, y) = chart.backend_coord(&(i as f64 + 0.5, 0.0));
        root.draw(&Text::new(
            c.as_ref().to_string(),
            (x, y + 8),
            below.clone(),
        ))
        .map_err(|x| e(&x))?;
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.9))
        .label_font((FONT, 16))
        .draw()
        .map_err(|x| e(&x))?;
    root.present().map_err(|x| e(&x))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chart_is_a_png_and_bad_series_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chart.png");
        bars(
            &path,
            "title",
            "ms",
            &["a", "b"],
            &[
                Series::new("x", vec![1.0, 2.0]),
                Series::new("y", vec![3.0, 0.5]),
            ],
        )
        .unwrap();
        let png = std::fs::read(&path).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        let e = bars(
            &path,
            "t",
            "ms",
            &["a", "b"],
            &[Series::new("x", vec![1.0])],
        )
        .unwrap_err();
        assert!(e.contains("a value per category"), "{e}");
    }
}
