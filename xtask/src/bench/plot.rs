//! PNG plots of the bench's time series, one per link case and image.
//!
//! Each figure has two panels sharing the time axis (seconds since the
//! destination was launched): on top the latency of the 4 KiB probe reads
//! that missed (crossed the link), as markers on a log scale; below, the
//! MiB the forwarder delivered source → destination since the run
//! started (sampled every 200 ms by [`super::sampler`]). Each system is
//! drawn in its own colour, the same in both panels, with one legend
//! above them. Only one run per system is drawn: the one whose whole-disk
//! time is the median of its runs ([`representative`]).
//!
//! Drawn with `plotters` (bitmap backend, PNG encoder) and its `ab_glyph`
//! text: no fontconfig or freetype, but then no system font lookup
//! either, so DejaVu Sans is read from [`FONT_PATH`] (Debian's
//! `fonts-dejavu-core`) and registered at run time ([`ensure_font`]).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::OnceLock;

use anyhow::{Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::{register_font, FontStyle};

use super::RunResult;

/// The font every text of the plots is drawn with.
pub(super) const FONT_PATH: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
/// The Debian package that has [`FONT_PATH`].
pub(super) const FONT_PACKAGE: &str = "fonts-dejavu-core";
/// The family name the font is registered under (plotters' default).
const FAMILY: &str = "sans-serif";
const MIB: f64 = 1048576.0;
const SIZE: (u32, u32) = (1200, 960);

/// Reads and registers the plots' font, once per process. Fails, naming
/// the package to install, when the font file is missing.
pub(super) fn ensure_font() -> Result<()> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        let bytes = std::fs::read(FONT_PATH).map_err(|e| {
            format!(
                "cannot read the plots' font {FONT_PATH} ({e}); install the Debian package {FONT_PACKAGE} (apt-get install {FONT_PACKAGE})"
            )
        })?;
        // plotters keeps the font for the rest of the process.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        register_font(FAMILY, FontStyle::Normal, bytes)
            .map_err(|_| format!("{FONT_PATH} is not a font plotters can read"))
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

/// One system's series in a figure.
#[derive(Debug, Clone)]
pub(super) struct SystemSeries {
    /// System id (ferry, nbdcopy, nbdkit-lazy): picks the colour.
    pub(super) system: String,
    /// Legend text.
    pub(super) label: String,
    /// Probe reads that missed: (s since t0, latency in ms).
    pub(super) misses: Vec<(f64, f64)>,
    /// MiB delivered source → destination: (s since t0, MiB).
    pub(super) progress: Vec<(f64, f64)>,
    /// When the run ended (whole disk, or the cap), in s since t0.
    pub(super) end_s: f64,
    /// Nothing was served before this time (stop-and-copy): drawn as a
    /// dashed vertical line in the latency panel.
    pub(super) served_from_s: Option<f64>,
}

/// One PNG: a title and the systems' series.
#[derive(Debug, Clone)]
pub(super) struct Figure {
    /// Title line (case and image).
    pub(super) title: String,
    /// One entry per system, in legend order.
    pub(super) systems: Vec<SystemSeries>,
}

/// A plot written for one case and image, for the report to link.
#[derive(Debug, Clone)]
pub(super) struct Written {
    /// Path relative to the report's directory (`docs/plots/...png`).
    pub(super) link: String,
    /// The run drawn per system: (system, run index from 0, runs).
    pub(super) runs: Vec<(String, usize, usize)>,
}

/// Index of the run whose whole-disk time is the median of `rs` (the
/// same rank as the report's medians, so its time is the figure shown).
pub(super) fn representative(rs: &[RunResult]) -> Option<usize> {
    let times: Vec<f64> = rs.iter().map(|r| r.t_complete).collect();
    crate::stats::median_index(&times)
}

/// The series of one run of `system`, with its legend text.
pub(super) fn series_of(system: &str, run: usize, runs: usize, r: &RunResult) -> SystemSeries {
    let mut end = if r.capped {
        format!(
            "stopped at the {:.0} s cap, disk not yet whole",
            r.t_complete
        )
    } else {
        format!("whole disk {:.1} s", r.t_complete)
    };
    if system == "nbdcopy" {
        end += "; serves no read before then (dashed line, top)";
    }
    SystemSeries {
        system: system.to_string(),
        label: format!("{system} (run {} of {runs}): {end}", run + 1),
        misses: r
            .probe_series
            .iter()
            .filter(|p| p.2)
            .map(|&(t, ms, _, _)| (t, ms))
            .collect(),
        progress: r
            .progress
            .iter()
            .map(|&(t, b)| (t, b as f64 / MIB))
            .collect(),
        end_s: r.t_complete,
        served_from_s: (system == "nbdcopy").then_some(r.t_complete),
    }
}

/// `bench-<case>-<image>[-<section slug>][-quick].png`.
pub(super) fn file_name(case: &str, image: &str, section: &str, quick: bool) -> String {
    let mut name = format!("bench-{case}-{image}");
    let slug = slug(section);
    if !slug.is_empty() {
        name += "-";
        name += &slug;
    }
    if quick {
        name += "-quick";
    }
    name + ".png"
}

/// Lower-case letters and digits, runs of anything else as one `-`.
fn slug(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.is_empty() && !out.ends_with('-') {
            out.push('-');
        }
    }
    out.trim_end_matches('-').to_string()
}

/// Writes one figure per case and image of `results` into
/// [`PLOTS_DIR`](super::PLOTS_DIR) under `report_dir`, each
/// system drawn from its [`representative`] run. `title` names a case and
/// image. Returns what was written, keyed by (case, image).
pub(super) fn write_all(
    report_dir: &Path,
    results: &super::Results,
    section: &str,
    quick: bool,
    title: impl Fn(&str, &str) -> String,
) -> Result<BTreeMap<(String, String), Written>> {
    let dir = report_dir.join(super::PLOTS_DIR);
    let dir = dir.as_path();
    let mut out = BTreeMap::new();
    for (case, per_img) in results {
        for (image, per_sys) in per_img {
            let mut fig = Figure {
                title: title(case, image),
                systems: Vec::new(),
            };
            let mut runs = Vec::new();
            for (sys, rs) in per_sys {
                let Some(i) = representative(rs) else {
                    continue;
                };
                fig.systems.push(series_of(sys, i, rs.len(), &rs[i]));
                runs.push((sys.clone(), i, rs.len()));
            }
            let name = file_name(case, image, section, quick);
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            render(&dir.join(&name), &fig)?;
            let link = format!("{}/{name}", super::PLOTS_DIR);
            out.insert((case.clone(), image.clone()), Written { link, runs });
        }
    }
    Ok(out)
}

/// The colour of a system, the same in every panel and figure.
fn colour(system: &str) -> RGBColor {
    match system {
        "ferry" => RGBColor(31, 119, 180),
        "nbdcopy" => RGBColor(255, 127, 14),
        "nbdkit-lazy" => RGBColor(44, 160, 44),
        _ => RGBColor(127, 127, 127),
    }
}

/// An axis label: no decimals from 10 up.
fn number(v: f64) -> String {
    if v >= 10.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn font(size: u32) -> FontDesc<'static> {
    (FAMILY, size).into_font()
}

/// Renders `fig` into the PNG file `path`.
pub(super) fn render(path: &Path, fig: &Figure) -> Result<()> {
    ensure_font()?;
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let body = root.margin(8, 4, 4, 8).titled(&fig.title, font(24))?;
    let legend_h = 16 + 26 * fig.systems.len().max(1) as u32;
    let (legend, panels) = body.split_vertically(legend_h);
    let (_, panels_h) = panels.dim_in_pixel();
    let (top, bottom) = panels.split_vertically(panels_h / 2);
    draw_legend(&legend, fig)?;
    let t_max = t_max(fig);
    draw_latency(&top, fig, t_max)?;
    draw_progress(&bottom, fig, t_max)?;
    root.present()
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// The end of the time axis: the last run's end or sample, plus a margin.
fn t_max(fig: &Figure) -> f64 {
    let last = fig
        .systems
        .iter()
        .flat_map(|s| {
            let ends = [s.end_s, s.served_from_s.unwrap_or(0.0)];
            let pts = s.misses.iter().chain(&s.progress).map(|p| p.0);
            ends.into_iter().chain(pts)
        })
        .fold(0.0, f64::max);
    (last * 1.03).max(1.0)
}

/// One row per system: a line with a marker in its colour, and its label.
fn draw_legend(area: &DrawingArea<BitMapBackend<'_>, Shift>, fig: &Figure) -> Result<()> {
    let style = TextStyle::from(font(17)).pos(Pos::new(HPos::Left, VPos::Center));
    for (i, s) in fig.systems.iter().enumerate() {
        let (x, y) = (90, 14 + 26 * i as i32);
        let c = colour(&s.system);
        area.draw(&PathElement::new(
            vec![(x, y), (x + 36, y)],
            c.stroke_width(3),
        ))?;
        area.draw(&Circle::new((x + 18, y), 5, c.filled()))?;
        area.draw(&Text::new(s.label.clone(), (x + 48, y), style.clone()))?;
    }
    Ok(())
}

/// Top panel: latency of the misses, log scale.
fn draw_latency(
    area: &DrawingArea<BitMapBackend<'_>, Shift>,
    fig: &Figure,
    t_max: f64,
) -> Result<()> {
    let all = fig
        .systems
        .iter()
        .flat_map(|s| s.misses.iter().map(|p| p.1));
    let (lo, hi) = all.fold((f64::INFINITY, 0.0f64), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    let (lo, hi) = if hi > 0.0 {
        ((lo / 1.5).max(0.1), hi * 1.5)
    } else {
        (10.0, 1000.0)
    };
    let mut chart = ChartBuilder::on(area)
        .margin(12)
        .caption(
            "Latency of 4 KiB reads of absent blocks that missed (crossed the link)",
            font(19),
        )
        .x_label_area_size(48)
        .y_label_area_size(78)
        .build_cartesian_2d(0.0..t_max, (lo..hi).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("time since the destination was launched (s)")
        .y_desc("read latency (ms, log scale)")
        .y_labels(12)
        .x_label_formatter(&|t| format!("{t:.0}"))
        .y_label_formatter(&|ms| number(*ms))
        .label_style(font(15))
        .axis_desc_style(font(16))
        .draw()?;
    for s in &fig.systems {
        let c = colour(&s.system);
        chart.draw_series(
            s.misses
                .iter()
                .map(|&(t, ms)| Circle::new((t, ms), 5, c.filled())),
        )?;
        if let Some(t) = s.served_from_s {
            chart.draw_series(DashedLineSeries::new(
                [(t, lo), (t, hi)],
                10,
                6,
                c.stroke_width(2),
            ))?;
        }
    }
    Ok(())
}

/// Bottom panel: cumulative MiB delivered source → destination.
fn draw_progress(
    area: &DrawingArea<BitMapBackend<'_>, Shift>,
    fig: &Figure,
    t_max: f64,
) -> Result<()> {
    let top = fig
        .systems
        .iter()
        .flat_map(|s| s.progress.iter().map(|p| p.1))
        .fold(0.0, f64::max);
    let mut chart = ChartBuilder::on(area)
        .margin(12)
        .caption(
            "Delivered over the link, source → destination (forwarder's counter)",
            font(19),
        )
        .x_label_area_size(48)
        .y_label_area_size(78)
        .build_cartesian_2d(0.0..t_max, 0.0..(top * 1.05).max(1.0))?;
    chart
        .configure_mesh()
        .x_desc("time since the destination was launched (s)")
        .y_desc("delivered (MiB)")
        .x_label_formatter(&|t| format!("{t:.0}"))
        .y_label_formatter(&|mib| format!("{mib:.0}"))
        .label_style(font(15))
        .axis_desc_style(font(16))
        .draw()?;
    for s in &fig.systems {
        let c = colour(&s.system);
        chart.draw_series(LineSeries::new(
            s.progress.iter().copied(),
            c.stroke_width(3),
        ))?;
        // A marker where the run ended (whole disk, or the cap).
        if let Some(&(_, mib)) = s.progress.last() {
            chart.draw_series(std::iter::once(Circle::new((s.end_s, mib), 6, c.filled())))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A made-up bench: ferry fast with short misses, nbdcopy serving at
    /// its end, the lazy proxy slow with long misses and capped.
    fn synthetic() -> Figure {
        let ramp = |rate_mib_s: f64, end: f64, total: f64| -> Vec<(f64, f64)> {
            (0..=(end / 0.2) as usize)
                .map(|k| k as f64 * 0.2)
                .map(|t| (t, (t * rate_mib_s).min(total)))
                .collect()
        };
        let misses = |base: f64, spread: f64, until: f64| -> Vec<(f64, f64)> {
            (0..20)
                .map(|k| {
                    (
                        1.0 + k as f64 * until / 20.0,
                        base + spread * ((k * 7) % 5) as f64,
                    )
                })
                .collect()
        };
        Figure {
            title: "bench: 200 Mbit/s, 50 ms RTT, queue 50 ms; image fs (2048 MiB)".into(),
            systems: vec![
                SystemSeries {
                    system: "ferry".into(),
                    label: "ferry (run 2 of 3): whole disk 41.3 s".into(),
                    misses: misses(55.0, 8.0, 30.0),
                    progress: ramp(23.0, 41.3, 940.0),
                    end_s: 41.3,
                    served_from_s: None,
                },
                SystemSeries {
                    system: "nbdcopy".into(),
                    label: "nbdcopy (run 1 of 3): whole disk 48.0 s; serves no read before then (dashed line, top)".into(),
                    misses: vec![],
                    progress: ramp(22.0, 48.0, 1056.0),
                    end_s: 48.0,
                    served_from_s: Some(48.0),
                },
                SystemSeries {
                    system: "nbdkit-lazy".into(),
                    label: "nbdkit-lazy (run 3 of 3): stopped at the 120 s cap, disk not yet whole".into(),
                    misses: misses(400.0, 900.0, 110.0),
                    progress: ramp(3.5, 120.0, 2048.0),
                    end_s: 120.0,
                    served_from_s: None,
                },
            ],
        }
    }

    /// Whether the font is there; says SKIPPED when not (and fails under
    /// FERRY_REQUIRE_ALL=1, as in CI).
    fn have_font() -> bool {
        if Path::new(FONT_PATH).exists() {
            return true;
        }
        let msg = format!("SKIPPED: font missing ({FONT_PATH}; Debian package {FONT_PACKAGE})");
        if std::env::var("FERRY_REQUIRE_ALL").as_deref() == Ok("1") {
            panic!("{msg}, and FERRY_REQUIRE_ALL=1 forbids skipping");
        }
        eprintln!("{msg}");
        false
    }

    #[test]
    fn renders_a_png() {
        if !have_font() {
            return;
        }
        // BENCH_PLOT_DIR keeps the picture, to look at it.
        let keep = std::env::var_os("BENCH_PLOT_DIR");
        let dir = keep.clone().map(Into::into).unwrap_or_else(|| {
            std::env::temp_dir().join(format!("bench-plot-{}", std::process::id()))
        });
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(file_name("base", "fs", "", false));
        render(&path, &synthetic()).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        if keep.is_none() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        assert!(bytes.len() > 8 << 10, "only {} bytes", bytes.len());
    }

    #[test]
    fn one_plot_per_case_and_image_from_the_median_runs() {
        if !have_font() {
            return;
        }
        let run = |t: f64| RunResult {
            t_complete: t,
            probe_series: vec![(1.0, 60.0, true, 0.0), (1.2, 3.0, false, 0.0)],
            progress: vec![(0.0, 0), (t, 100 << 20)],
            ..RunResult::default()
        };
        let mut results = super::super::Results::new();
        let per_sys = results
            .entry("base".into())
            .or_default()
            .entry("fs".into())
            .or_default();
        per_sys.insert("ferry".into(), vec![run(30.0), run(10.0), run(20.0)]);
        per_sys.insert("nbdcopy".into(), vec![run(40.0)]);
        let dir = std::env::temp_dir().join(format!("bench-plots-{}", std::process::id()));
        let w = write_all(&dir, &results, "", true, |c, i| format!("{c} {i}")).unwrap();
        let png = dir.join("docs/plots/bench-base-fs-quick.png").exists();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(png);
        let p = &w[&("base".to_string(), "fs".to_string())];
        assert_eq!(p.link, "docs/plots/bench-base-fs-quick.png");
        assert_eq!(
            p.runs,
            vec![("ferry".to_string(), 2, 3), ("nbdcopy".to_string(), 0, 1)]
        );
        let s = series_of("ferry", 2, 3, &results["base"]["fs"]["ferry"][2]);
        assert_eq!(s.misses, vec![(1.0, 60.0)], "misses only");
        assert_eq!(s.progress.last(), Some(&(20.0, 100.0)));
    }

    #[test]
    fn file_names() {
        assert_eq!(file_name("base", "fs", "", false), "bench-base-fs.png");
        assert_eq!(
            file_name("loss", "random", "UDP 8 MiB buffers!", true),
            "bench-loss-random-udp-8-mib-buffers-quick.png"
        );
    }
}
