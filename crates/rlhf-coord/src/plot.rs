//! Training-curve plots: reads a run's `metrics.jsonl` and draws stacked panels that share the
//! step axis (reward on top, KL below) into a PNG.
//!
//! `plotters` lays out and draws the chart into an RGB buffer and `png` encodes it. Text is
//! rasterised by plotters' `ab_glyph` backend from a font compiled into the binary (Hack
//! Regular, from `epaint_default_fonts`), so a plot needs no system fonts, fontconfig or
//! freetype, at build time or at run time: CI and a fresh Debian machine have none.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::FontStyle;

/// Image width in pixels.
pub const WIDTH: u32 = 900;
/// Image height in pixels.
pub const HEIGHT: u32 = 600;

/// One metrics row: the step and the numeric fields logged at that step.
pub type Row = (u64, BTreeMap<String, f64>);

/// The panels `write_plot` draws: (panel title, metrics field).
pub const DEFAULT_PANELS: [(&str, &str); 2] = [("reward", "reward_mean"), ("KL", "kl_mean")];

const BACKGROUND: RGBColor = RGBColor(255, 255, 255);
const GRID: RGBColor = RGBColor(232, 232, 232);
const AXIS: RGBColor = RGBColor(90, 90, 90);
const TEXT: RGBColor = RGBColor(25, 25, 25);
const MUTED: RGBColor = RGBColor(105, 105, 105);
/// Series colours, one per panel in order (matplotlib's tab10 start, which reads well on white
/// and stays distinct for the colour-blind in the first two). No text or axis uses these.
const PALETTE: [RGBColor; 4] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
];

/// The family name the embedded font is registered under. plotters' own defaults (mesh labels)
/// ask for "sans-serif", so registering under that name leaves no text without a font.
const FONT_FAMILY: &str = "sans-serif";
/// Font sizes in pixels: readable at 900x600 without a zoom.
const TITLE_SIZE: f64 = 24.0;
const LABEL_SIZE: f64 = 15.0;
/// Layout (pixels): each panel's header line above its plot, the gap under a panel, the x-tick
/// labels and "step" under the bottom panel, the y-tick labels left of every panel (the same
/// width in all of them, so the panels share the step axis pixel for pixel).
const PANEL_HEADER: u32 = 24;
const PANEL_GAP: u32 = 14;
const X_LABEL_AREA: u32 = 48;
const Y_LABEL_AREA: u32 = 84;
const RIGHT_MARGIN: u32 = 30;
/// Series with at most this many points also get a dot per point, so one or a few sparse
/// points (a run that just started) are visible and not a line too short to see.
const MAX_MARKED_POINTS: usize = 60;

/// Reads `metrics_jsonl` and writes the reward/KL plot to `out_png`, titled with the run
/// directory's name (the metrics file's parent). A file without a single row is an error: there
/// is nothing to plot until the run has logged a step.
pub fn write_plot(metrics_jsonl: &Path, out_png: &Path) -> Result<()> {
    let rows = read_metrics(metrics_jsonl)?;
    if rows.is_empty() {
        bail!(
            "{} has no metrics rows, so there is nothing to plot; plot a run after it has logged \
             at least one step",
            metrics_jsonl.display()
        );
    }
    write_plot_series(&rows, &DEFAULT_PANELS, &run_name(metrics_jsonl), out_png)
}

/// Reads a metrics file: one JSON object per line with an integer `step`; every other numeric
/// field is kept, non-numeric ones (strings, null, nested objects) are ignored. Blank lines are
/// skipped; any other line that does not parse is an error naming `file:line`.
pub fn read_metrics(path: &Path) -> Result<Vec<Row>> {
    let file =
        File::open(path).with_context(|| format!("cannot open metrics file {}", path.display()))?;
    let mut rows = Vec::new();
    for (index, line) in BufReader::new(file).lines().enumerate() {
        let lineno = index + 1;
        let line = line.with_context(|| format!("cannot read {}:{lineno}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        match parse_metrics_line(&line) {
            Ok(row) => rows.push(row),
            Err(why) => bail!(
                "{}:{lineno}: malformed metrics line: {why}; each line must be one JSON object \
                 with an integer `step`",
                path.display()
            ),
        }
    }
    Ok(rows)
}

fn parse_metrics_line(line: &str) -> std::result::Result<Row, String> {
    let value: serde_json::Value =
        serde_json::from_str(line).map_err(|e| format!("invalid JSON ({e})"))?;
    let serde_json::Value::Object(map) = value else {
        return Err("not a JSON object".into());
    };
    let step = match map.get("step") {
        Some(v) => v
            .as_u64()
            .ok_or_else(|| format!("`step` must be a non-negative integer, got {v}"))?,
        None => return Err("no `step` field".into()),
    };
    let fields = map
        .iter()
        .filter(|(key, _)| key.as_str() != "step")
        .filter_map(|(key, v)| v.as_f64().map(|x| (key.clone(), x)))
        .collect();
    Ok((step, fields))
}

/// The run directory's name for the title: the metrics file's parent, resolved against the
/// working directory when the path is bare (`metrics.jsonl`).
fn run_name(metrics_jsonl: &Path) -> String {
    let absolute = std::path::absolute(metrics_jsonl).unwrap_or_else(|_| metrics_jsonl.into());
    absolute
        .parent()
        .and_then(Path::file_name)
        .or_else(|| metrics_jsonl.file_name())
        .map_or_else(
            || "metrics".into(),
            |name| name.to_string_lossy().into_owned(),
        )
}

/// Draws one stacked panel per `(title, field)` in `panels`, sharing the step axis, and writes
/// the PNG atomically (temporary file, then rename) so a reader never sees half an image.
/// Missing and non-finite values are skipped; the line joins the points on either side. A panel
/// without a single value says "no data".
pub fn write_plot_series(
    rows: &[Row],
    panels: &[(&str, &str)],
    title: &str,
    out_png: &Path,
) -> Result<()> {
    if panels.is_empty() {
        bail!("no panels given for plot {}", out_png.display());
    }
    let pixels = render(rows, panels, title)
        .map_err(|e| anyhow!("cannot draw plot {}: {e}", out_png.display()))?;
    let bytes =
        encode_png(&pixels).with_context(|| format!("cannot encode plot {}", out_png.display()))?;
    rlhf_ckpt::write_atomic(out_png, &bytes).with_context(|| {
        format!(
            "cannot write plot {} (does its directory exist?)",
            out_png.display()
        )
    })
}

/// Registers the embedded font with plotters (once per process; later calls return the first
/// outcome).
fn register_font() -> std::result::Result<(), String> {
    static REGISTERED: std::sync::OnceLock<std::result::Result<(), String>> =
        std::sync::OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            plotters::style::register_font(
                FONT_FAMILY,
                FontStyle::Normal,
                epaint_default_fonts::HACK_REGULAR,
            )
            .map_err(|_| "the embedded font (Hack Regular) could not be parsed".to_string())
        })
        .clone()
}

fn font(size: f64, color: &RGBColor) -> TextStyle<'static> {
    (FONT_FAMILY, size).into_font().color(color)
}

/// The RGB image as a PNG.
fn encode_png(pixels: &[u8]) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    let mut encoder = png::Encoder::new(&mut bytes, WIDTH, HEIGHT);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header()?;
    writer.write_image_data(pixels)?;
    writer.finish()?;
    Ok(bytes)
}

/// The finite points of `field`, sorted by step. Stable, so a step logged twice (a resumed run)
/// keeps file order.
fn series(rows: &[Row], field: &str) -> Vec<(i64, f64)> {
    let mut points: Vec<(i64, f64)> = rows
        .iter()
        .filter_map(|(step, fields)| {
            let v = *fields.get(field)?;
            let step = i64::try_from(*step).unwrap_or(i64::MAX);
            v.is_finite().then_some((step, v))
        })
        .collect();
    points.sort_by_key(|p| p.0);
    points
}

type DrawError = Box<dyn std::error::Error + Send + Sync>;
type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

/// Draws the whole figure and returns its RGB pixels (three bytes a pixel, row-major).
fn render(
    rows: &[Row],
    panels: &[(&str, &str)],
    title: &str,
) -> std::result::Result<Vec<u8>, DrawError> {
    register_font()?;
    let series: Vec<Vec<(i64, f64)>> = panels
        .iter()
        .map(|(_, field)| series(rows, field))
        .collect();
    let steps = series.iter().flatten().map(|p| p.0);
    let steps = bounds(steps)
        .or_else(|| bounds(rows.iter().map(|r| i64::try_from(r.0).unwrap_or(i64::MAX))));
    let x_range = step_range(steps.unwrap_or((0, 1)));

    let mut pixels = vec![0; WIDTH as usize * HEIGHT as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&BACKGROUND)?;
        let title_style = font(TITLE_SIZE, &TEXT);
        let title = fit_text(&root, title, &title_style, WIDTH - 20)?;
        let body = root.titled(&title, title_style)?;

        // Every panel's plot gets the same height; the bottom one's block also holds the x labels.
        let n = panels.len() as u32;
        let block = body.dim_in_pixel().1.saturating_sub(X_LABEL_AREA) / n;
        let mut rest = body;
        for (i, ((panel_title, field), points)) in panels.iter().zip(&series).enumerate() {
            let last = i + 1 == panels.len();
            let area = if last {
                rest.clone()
            } else {
                let (area, below) = rest.split_vertically(block);
                rest = below;
                area
            };
            let panel = Panel {
                title: panel_title,
                field,
                points,
                color: PALETTE[i % PALETTE.len()],
                last,
            };
            draw_panel(&area, &panel, x_range.clone())?;
        }
        root.present()?;
    }
    Ok(pixels)
}

struct Panel<'a> {
    title: &'a str,
    field: &'a str,
    points: &'a [(i64, f64)],
    color: RGBColor,
    /// The bottom panel, which labels the shared step axis.
    last: bool,
}

fn draw_panel(
    area: &Area<'_>,
    panel: &Panel<'_>,
    x_range: std::ops::Range<i64>,
) -> std::result::Result<(), DrawError> {
    let (width, height) = area.dim_in_pixel();
    let label = font(LABEL_SIZE, &TEXT);
    let muted = font(LABEL_SIZE, &MUTED);

    // Header: the panel's title on the left, the last value on the right.
    area.draw_text(panel.title, &label, (Y_LABEL_AREA as i32, 3))?;
    let summary = match panel.points.last() {
        Some(&(step, v)) => format!("{} {} at step {}", panel.field, format_value(v), step),
        None => format!("{}: no data", panel.field),
    };
    let title_width = area.estimate_text_size(panel.title, &label)?.0;
    let room = width.saturating_sub(Y_LABEL_AREA + RIGHT_MARGIN + title_width + 24);
    let summary = fit_text(area, &summary, &muted, room)?;
    let right = muted.pos(Pos::new(HPos::Right, VPos::Top));
    area.draw_text(&summary, &right, ((width - RIGHT_MARGIN) as i32, 3))?;

    let y_range = value_range(bounds(panel.points.iter().map(|p| p.1)).unwrap_or((0.0, 1.0)));
    let plot_height =
        height.saturating_sub(PANEL_HEADER + if panel.last { X_LABEL_AREA } else { PANEL_GAP });
    // About one y tick per 40 pixels (three label heights), so stacked panels stay uncluttered.
    let y_ticks = (plot_height / 40).clamp(2, 5) as usize;

    let mut chart = ChartBuilder::on(area)
        .margin_top(PANEL_HEADER)
        .margin_right(RIGHT_MARGIN)
        .margin_bottom(if panel.last { 0 } else { PANEL_GAP })
        .x_label_area_size(if panel.last { X_LABEL_AREA } else { 0 })
        .y_label_area_size(Y_LABEL_AREA)
        .build_cartesian_2d(x_range.clone(), y_range.clone())?;
    let y_format = |v: &f64| tick_label(*v, &y_range);
    let x_format = |v: &i64| {
        if panel.last {
            v.to_string()
        } else {
            String::new()
        }
    };
    let mut mesh = chart.configure_mesh();
    mesh.bold_line_style(GRID)
        .light_line_style(TRANSPARENT)
        .axis_style(AXIS)
        .label_style(label.clone())
        .axis_desc_style(muted.clone())
        .x_labels(6)
        .y_labels(y_ticks)
        .x_label_formatter(&x_format)
        .y_label_formatter(&y_format);
    if panel.last {
        mesh.x_desc("step");
    }
    mesh.draw()?;
    chart.draw_series(std::iter::once(Rectangle::new(
        [(x_range.start, y_range.start), (x_range.end, y_range.end)],
        AXIS,
    )))?;

    if panel.points.is_empty() {
        let plot = chart.plotting_area().strip_coord_spec();
        let (w, h) = plot.dim_in_pixel();
        let centred = muted.pos(Pos::new(HPos::Center, VPos::Center));
        plot.draw_text("no data", &centred, (w as i32 / 2, h as i32 / 2))?;
        return Ok(());
    }
    chart.draw_series(LineSeries::new(
        panel.points.iter().copied(),
        panel.color.stroke_width(2),
    ))?;
    if panel.points.len() <= MAX_MARKED_POINTS {
        chart.draw_series(
            panel
                .points
                .iter()
                .map(|&p| Circle::new(p, 3, panel.color.filled())),
        )?;
    }
    Ok(())
}

/// Smallest and largest of the values, or `None` when there are none.
fn bounds<T: PartialOrd + Copy>(values: impl Iterator<Item = T>) -> Option<(T, T)> {
    values.fold(None, |acc, v| match acc {
        None => Some((v, v)),
        Some((lo, hi)) => Some((if v < lo { v } else { lo }, if v > hi { v } else { hi })),
    })
}

/// The step axis: the steps padded by 2% (at least one step) so the end markers are whole.
fn step_range((lo, hi): (i64, i64)) -> std::ops::Range<i64> {
    let pad = ((hi.saturating_sub(lo)) / 50).max(1);
    lo.saturating_sub(pad)..hi.saturating_add(pad)
}

/// A value axis: the data range padded by 8%, or widened when the data is one value (by a tenth
/// of its magnitude, or by 1 around zero), so a flat series is a visible line mid-panel.
fn value_range((lo, hi): (f64, f64)) -> std::ops::Range<f64> {
    let magnitude = lo.abs().max(hi.abs());
    // A span this small relative to the values is rounding noise: no tick step could label
    // it distinctly, so treat the series as constant.
    let (lo, hi) = if hi - lo <= magnitude * 1e-9 {
        let half = if magnitude == 0.0 {
            1.0
        } else {
            magnitude * 0.1
        };
        let mid = lo / 2.0 + hi / 2.0;
        (mid - half, mid + half)
    } else {
        // Halves first, so values near f64::MAX do not overflow the span.
        let pad = (hi / 2.0 - lo / 2.0) * 0.16;
        (lo - pad, hi + pad)
    };
    // Beyond f64's range the axis keeps the largest finite span.
    lo.max(f64::MIN / 4.0)..hi.min(f64::MAX / 4.0)
}

/// A y tick label with just enough digits for the axis `range`: fixed-point, or scientific
/// (`2e-5`) on axes of very large values or very fine steps, where fixed-point runs long.
/// Rounding noise around zero (and -0) reads "0".
fn tick_label(v: f64, range: &std::ops::Range<f64>) -> String {
    let span = range.end - range.start;
    if v.abs() <= span * 1e-9 {
        return "0".into();
    }
    let max_abs = range.start.abs().max(range.end.abs());
    // Spans under 5e-4 have ticks under 1e-4 apart at five ticks.
    let scientific = max_abs >= 1e6 || span < 5e-4;
    let decimals = ((-span.log10()).ceil() + 2.0).clamp(0.0, 15.0) as i32;
    plotters::data::float::FloatPrettyPrinter {
        allow_scientific: scientific,
        min_decimal: 0,
        max_decimal: decimals,
    }
    .print(v)
}

/// A value for the panel header, to four significant digits.
fn format_value(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let magnitude = v.abs().log10().floor();
    if (-3.0..5.0).contains(&magnitude) {
        let decimals = (3.0 - magnitude).max(0.0) as usize;
        trim_zeros(&format!("{v:.decimals$}")).to_string()
    } else {
        let text = format!("{v:.3e}");
        match text.split_once('e') {
            Some((mantissa, exponent)) => format!("{}e{exponent}", trim_zeros(mantissa)),
            None => text,
        }
    }
}

fn trim_zeros(number: &str) -> &str {
    if number.contains('.') {
        number.trim_end_matches('0').trim_end_matches('.')
    } else {
        number
    }
}

/// Shortens `text` with a trailing `...` so it fits `max_width` pixels in `style`.
fn fit_text(
    area: &Area<'_>,
    text: &str,
    style: &TextStyle<'_>,
    max_width: u32,
) -> std::result::Result<String, DrawError> {
    let fits = |t: &str| -> std::result::Result<bool, DrawError> {
        Ok(area.estimate_text_size(t, style)?.0 <= max_width)
    };
    if fits(text)? {
        return Ok(text.to_string());
    }
    let mut chars: Vec<char> = text.chars().collect();
    while !chars.is_empty() {
        chars.pop();
        let shortened: String = chars.iter().chain(['.', '.', '.'].iter()).collect();
        if fits(&shortened)? {
            return Ok(shortened);
        }
    }
    Ok("...".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes a PNG, asserting it is 8-bit RGB, and returns (width, height, pixels).
    fn decode(path: &Path) -> (u32, u32, Vec<[u8; 3]>) {
        let file = BufReader::new(File::open(path).unwrap());
        let mut reader = png::Decoder::new(file).read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!(info.color_type, png::ColorType::Rgb);
        assert_eq!(info.bit_depth, png::BitDepth::Eight);
        let pixels = buf[..info.buffer_size()]
            .chunks_exact(3)
            .map(|p| [p[0], p[1], p[2]])
            .collect();
        (info.width, info.height, pixels)
    }

    fn rgb(color: RGBColor) -> [u8; 3] {
        [color.0, color.1, color.2]
    }

    /// Pixels of exactly `color` in the top and the bottom half of the image.
    fn count_halves(pixels: &[[u8; 3]], color: RGBColor) -> (usize, usize) {
        let half = (WIDTH * HEIGHT / 2) as usize;
        let count = |range: &[[u8; 3]]| range.iter().filter(|p| **p == rgb(color)).count();
        (count(&pixels[..half]), count(&pixels[half..]))
    }

    /// Dark grey pixels (text, with the font's anti-aliasing) in rows `y0..y1`.
    fn dark_pixels(pixels: &[[u8; 3]], y0: u32, y1: u32) -> usize {
        pixels[(y0 * WIDTH) as usize..(y1 * WIDTH) as usize]
            .iter()
            .filter(|p| p.iter().all(|&c| c < 110))
            .count()
    }

    fn row(step: u64, fields: &[(&str, f64)]) -> Row {
        (
            step,
            fields.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        )
    }

    #[test]
    fn plot_is_a_png_with_each_series_in_its_own_panel() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("plot.png");
        // reward on every step, KL only on even ones (sparse logging), so both panels have data.
        let rows: Vec<Row> = (0..200)
            .map(|s| {
                let x = s as f64;
                let mut fields = vec![("reward_mean", (x / 20.0).sin() + x / 100.0)];
                if s % 2 == 0 {
                    fields.push(("kl_mean", 0.001 * x));
                }
                row(s, &fields)
            })
            .collect();
        write_plot_series(&rows, &DEFAULT_PANELS, "run-a", &out).unwrap();

        let (w, h, pixels) = decode(&out);
        assert_eq!((w, h), (WIDTH, HEIGHT));
        let (reward_top, reward_bottom) = count_halves(&pixels, PALETTE[0]);
        let (kl_top, kl_bottom) = count_halves(&pixels, PALETTE[1]);
        assert!(
            reward_top > 500 && reward_bottom == 0,
            "reward {reward_top}/{reward_bottom}"
        );
        assert!(kl_bottom > 500 && kl_top == 0, "kl {kl_top}/{kl_bottom}");
        // Text is drawn: the title band, and the labels along the left and the bottom.
        assert!(dark_pixels(&pixels, 0, 40) > 50, "no title");
        let left_labels = pixels
            .chunks_exact(WIDTH as usize)
            .flat_map(|line| &line[..Y_LABEL_AREA as usize - 10])
            .filter(|p| p.iter().all(|&c| c < 110))
            .count();
        assert!(left_labels > 200, "only {left_labels} y-label pixels");
        assert!(
            dark_pixels(&pixels, HEIGHT - X_LABEL_AREA + 5, HEIGHT) > 200,
            "no x labels"
        );
        // The grid and axes are drawn in their own colours.
        assert!(pixels.iter().filter(|p| **p == rgb(GRID)).count() > 1000);
        assert!(pixels.iter().filter(|p| **p == rgb(AXIS)).count() > 1000);
    }

    #[test]
    fn single_point_constant_and_missing_values_still_draw() {
        let dir = tempfile::tempdir().unwrap();
        // One step, and a KL that is NaN: the reward point shows as a dot, KL says "no data".
        let single = dir.path().join("single.png");
        let rows = [row(7, &[("reward_mean", 0.5), ("kl_mean", f64::NAN)])];
        write_plot_series(&rows, &DEFAULT_PANELS, "one", &single).unwrap();
        let (_, _, pixels) = decode(&single);
        let (top, bottom) = count_halves(&pixels, PALETTE[0]);
        assert!(top > 10 && bottom == 0, "single point {top}/{bottom}");
        assert_eq!(count_halves(&pixels, PALETTE[1]), (0, 0));

        // A constant series (and one at exactly zero) gets a real span and a visible line.
        let constant = dir.path().join("constant.png");
        let rows: Vec<Row> = (0..100)
            .map(|s| row(s, &[("reward_mean", 1.0), ("kl_mean", 0.0)]))
            .collect();
        write_plot_series(&rows, &DEFAULT_PANELS, "flat", &constant).unwrap();
        let (_, _, pixels) = decode(&constant);
        assert!(count_halves(&pixels, PALETTE[0]).0 > 500);
        assert!(count_halves(&pixels, PALETTE[1]).1 > 500);

        // Missing and infinite values in the middle: the line joins the points around them.
        let gaps = dir.path().join("gaps.png");
        let rows: Vec<Row> = (0..100)
            .map(|s| match s % 3 {
                0 => row(s, &[("reward_mean", s as f64)]),
                1 => row(s, &[("reward_mean", f64::INFINITY), ("kl_mean", 0.1)]),
                _ => row(s, &[]),
            })
            .collect();
        write_plot_series(&rows, &DEFAULT_PANELS, "gaps", &gaps).unwrap();
        let (_, _, pixels) = decode(&gaps);
        assert!(count_halves(&pixels, PALETTE[0]).0 > 500);
        assert!(count_halves(&pixels, PALETTE[1]).1 > 500);

        // Values at the ends of f64's range still give an axis and a line.
        let huge = dir.path().join("huge.png");
        let rows = [
            row(0, &[("reward_mean", f64::MAX), ("kl_mean", -f64::MAX)]),
            row(1, &[("reward_mean", -f64::MAX), ("kl_mean", f64::MAX)]),
        ];
        write_plot_series(&rows, &DEFAULT_PANELS, "huge", &huge).unwrap();
        assert_eq!(decode(&huge).0, WIDTH);

        // No rows at all still makes a plot (a run that has not logged yet), with two panels
        // that say "no data" in text.
        let empty = dir.path().join("empty.png");
        write_plot_series(&[], &DEFAULT_PANELS, "empty", &empty).unwrap();
        let (w, _, pixels) = decode(&empty);
        assert_eq!(w, WIDTH);
        assert_eq!(count_halves(&pixels, PALETTE[0]), (0, 0));
        assert!(dark_pixels(&pixels, 60, 280) > 0, "no \"no data\" text");
    }

    #[test]
    fn write_plot_reads_metrics_and_leaves_no_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run-7");
        std::fs::create_dir(&run).unwrap();
        let metrics = run.join("metrics.jsonl");
        let lines: Vec<String> = (0..30)
            .map(|s| {
                format!(
                    r#"{{"step": {s}, "reward_mean": {}, "kl_mean": 0.01, "phase": "rl"}}"#,
                    s as f64 * 0.1
                )
            })
            .collect();
        std::fs::write(&metrics, lines.join("\n") + "\n\n").unwrap();
        let out = run.join("plot.png");
        write_plot(&metrics, &out).unwrap();
        let (w, h, pixels) = decode(&out);
        assert_eq!((w, h), (WIDTH, HEIGHT));
        assert!(count_halves(&pixels, PALETTE[0]).0 > 100);
        let mut names: Vec<String> = std::fs::read_dir(&run)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["metrics.jsonl", "plot.png"]);

        assert_eq!(run_name(&metrics), "run-7");
        let rows = read_metrics(&metrics).unwrap();
        assert_eq!(rows.len(), 30);
        assert_eq!(rows[3].0, 3);
        assert_eq!(rows[3].1.get("reward_mean"), Some(&(3.0 * 0.1)));
        assert!(!rows[3].1.contains_key("phase"), "strings are not series");
    }

    #[test]
    fn malformed_lines_are_errors_naming_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = dir.path().join("metrics.jsonl");
        let out = dir.path().join("plot.png");
        let cases = [
            "{\"step\": 1, \"reward_mean\": 0.5",
            "[1, 2]",
            "{\"reward_mean\": 0.5}",
            "{\"step\": -3}",
            "{\"step\": 2.5}",
            "\u{89}PNG garbage",
        ];
        for bad in cases {
            std::fs::write(
                &metrics,
                format!("{{\"step\": 0}}\n\n{bad}\n{{\"step\": 3}}\n"),
            )
            .unwrap();
            let err = format!("{:#}", write_plot(&metrics, &out).unwrap_err());
            let location = format!("{}:3:", metrics.display());
            assert!(err.contains(&location), "{bad:?} gave {err:?}");
            assert!(!out.exists(), "no plot for a bad file");
        }
        let missing = dir.path().join("absent.jsonl");
        let err = format!("{:#}", write_plot(&missing, &out).unwrap_err());
        assert!(err.contains("absent.jsonl"), "{err}");

        // An empty (or blank) file has nothing to plot, and the error says so.
        std::fs::write(&metrics, "\n\n").unwrap();
        let err = format!("{:#}", write_plot(&metrics, &out).unwrap_err());
        assert!(
            err.contains(&metrics.display().to_string()) && err.contains("no metrics rows"),
            "{err}"
        );
        assert!(!out.exists(), "no plot for an empty file");
    }

    #[test]
    fn axes_have_a_span_and_clean_labels() {
        let constant = value_range((2.0, 2.0));
        assert!(constant.start < 2.0 && constant.end > 2.0, "{constant:?}");
        assert!(constant.end - constant.start > 0.3, "{constant:?}");
        let zero = value_range((0.0, 0.0));
        assert_eq!(zero, -1.0..1.0);
        let padded = value_range((0.0, 1.0));
        assert!((padded.start + 0.08).abs() < 1e-12 && (padded.end - 1.08).abs() < 1e-12);
        let extreme = value_range((-f64::MAX, f64::MAX));
        assert!(extreme.start.is_finite() && extreme.end.is_finite());
        assert!(extreme.end - extreme.start > 0.0);

        assert_eq!(step_range((7, 7)), 6..8);
        assert_eq!(step_range((0, 1000)), -20..1020);

        let labels = |range: std::ops::Range<f64>, ticks: &[f64]| -> Vec<String> {
            ticks.iter().map(|&t| tick_label(t, &range)).collect()
        };
        assert_eq!(
            labels(-0.3..0.9, &[-0.2, 1e-17, 0.2, 0.4000000000000001]),
            ["-0.2", "0", "0.2", "0.4"]
        );
        assert_eq!(
            labels(0.0..1e-4, &[0.0, 2e-5, 2e-5 * 2.0 + 1e-21, 1e-4]),
            ["0", "2e-5", "4e-5", "1e-4"]
        );
        assert_eq!(
            labels(0.0..0.002, &[5e-4, 0.001, 0.0015]),
            ["0.0005", "0.001", "0.0015"]
        );
        assert_eq!(labels(-25000.0..0.0, &[-20000.0, -0.0]), ["-20000", "0"]);
        assert_eq!(labels(0.0..3e7, &[2e7]), ["2e7"]);

        assert_eq!(format_value(0.731234), "0.7312");
        assert_eq!(format_value(-12.5), "-12.5");
        assert_eq!(format_value(3.2e-7), "3.2e-7");
        assert_eq!(format_value(0.0), "0");
    }

    #[test]
    fn titles_are_drawn_with_the_embedded_font_and_shortened_to_fit() {
        let dir = tempfile::tempdir().unwrap();
        let rows = [row(1, &[("reward_mean", 0.5), ("kl_mean", 0.1)])];
        // Different titles give different title bands: the text is really rasterised.
        let bands: Vec<Vec<[u8; 3]>> = ["a", "a-much-longer-run-name"]
            .iter()
            .map(|title| {
                let out = dir.path().join(format!("{title}.png"));
                write_plot_series(&rows, &DEFAULT_PANELS, title, &out).unwrap();
                decode(&out).2[..(40 * WIDTH) as usize].to_vec()
            })
            .collect();
        assert_ne!(bands[0], bands[1]);
        let dark = |band: &[[u8; 3]]| band.iter().filter(|p| p.iter().all(|&c| c < 110)).count();
        assert!(
            dark(&bands[1]) > 3 * dark(&bands[0]),
            "long title not wider"
        );

        // A title wider than the image is cut with "..." and drawn, not an error.
        let out = dir.path().join("long.png");
        write_plot_series(&rows, &DEFAULT_PANELS, &"x".repeat(500), &out).unwrap();
        let mut pixels = vec![0; WIDTH as usize * HEIGHT as usize * 3];
        register_font().unwrap();
        let root = BitMapBackend::with_buffer(&mut pixels, (WIDTH, HEIGHT)).into_drawing_area();
        let style = font(LABEL_SIZE, &TEXT);
        let short = fit_text(&root, &"x".repeat(500), &style, 200).unwrap();
        assert!(short.ends_with("...") && short.len() < 40, "{short}");
        assert!(root.estimate_text_size(&short, &style).unwrap().0 <= 200);
        assert_eq!(fit_text(&root, "abc", &style, 200).unwrap(), "abc");
    }
}
