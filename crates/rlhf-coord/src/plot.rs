//! Training-curve plots: reads a run's `metrics.jsonl` and draws stacked panels that share the
//! step axis (reward on top, KL below) into a PNG.
//!
//! The rasteriser and its 5x7 bitmap font live in this file and the only dependency is the `png`
//! encoder, so a plot needs no system fonts, fontconfig or freetype: CI and a fresh Debian
//! machine have none. The font covers printable ASCII; anything else is drawn as `?`.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;

use anyhow::{bail, Context, Result};

/// Image width in pixels.
pub const WIDTH: usize = 900;
/// Image height in pixels.
pub const HEIGHT: usize = 600;

/// One metrics row: the step and the numeric fields logged at that step.
pub type Row = (u64, BTreeMap<String, f64>);

/// The panels `write_plot` draws: (panel title, metrics field).
pub const DEFAULT_PANELS: [(&str, &str); 2] = [("reward", "reward_mean"), ("KL", "kl_mean")];

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Rgb([u8; 3]);

const BACKGROUND: Rgb = Rgb([255, 255, 255]);
const GRID: Rgb = Rgb([232, 232, 232]);
const AXIS: Rgb = Rgb([90, 90, 90]);
const TEXT: Rgb = Rgb([25, 25, 25]);
const MUTED: Rgb = Rgb([105, 105, 105]);
/// Series colours, one per panel in order (matplotlib's tab10 start, which reads well on white
/// and stays distinct for the colour-blind in the first two). No text or axis uses these.
const PALETTE: [Rgb; 4] = [
    Rgb([31, 119, 180]),
    Rgb([255, 127, 14]),
    Rgb([44, 160, 44]),
    Rgb([214, 39, 40]),
];

/// Glyph scales: the 5x7 font at 2x is 10x14 pixels, readable at 900x600 without a zoom.
const LABEL_SCALE: i64 = 2;
const TITLE_SCALE: i64 = 3;
/// Vertical layout (pixels): the title band on top, x-tick labels and "step" below the panels.
const TOP: i64 = 50;
const BOTTOM: i64 = 62;
const PANEL_HEADER: i64 = 22;
const PANEL_GAP: i64 = 14;
const RIGHT_MARGIN: i64 = 40;
/// Series with at most this many points also get a dot per point, so one or a few sparse
/// points (a run that just started) are visible and not a line too short to see.
const MAX_MARKED_POINTS: usize = 60;

/// Reads `metrics_jsonl` and writes the reward/KL plot to `out_png`, titled with the run
/// directory's name (the metrics file's parent).
pub fn write_plot(metrics_jsonl: &Path, out_png: &Path) -> Result<()> {
    let rows = read_metrics(metrics_jsonl)?;
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
/// Missing and non-finite values are skipped; the line joins the points on either side.
pub fn write_plot_series(
    rows: &[Row],
    panels: &[(&str, &str)],
    title: &str,
    out_png: &Path,
) -> Result<()> {
    if panels.is_empty() {
        bail!("no panels given for plot {}", out_png.display());
    }
    let canvas = render(rows, panels, title);
    let bytes = canvas
        .encode_png()
        .with_context(|| format!("cannot encode plot {}", out_png.display()))?;
    rlhf_ckpt::write_atomic(out_png, &bytes).with_context(|| {
        format!(
            "cannot write plot {} (does its directory exist?)",
            out_png.display()
        )
    })
}

// ---------------------------------------------------------------------------------------------
// Layout

fn render(rows: &[Row], panels: &[(&str, &str)], title: &str) -> Canvas {
    let mut canvas = Canvas::new(WIDTH, HEIGHT, BACKGROUND);
    let series: Vec<Vec<(f64, f64)>> = panels
        .iter()
        .map(|(_, field)| {
            let mut points: Vec<(f64, f64)> = rows
                .iter()
                .filter_map(|(step, fields)| {
                    let v = *fields.get(*field)?;
                    v.is_finite().then_some((*step as f64, v))
                })
                .collect();
            // Stable, so a step logged twice (a resumed run) keeps file order.
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            points
        })
        .collect();

    let (x_min, x_max) = bounds(series.iter().flatten().map(|p| p.0))
        .or_else(|| bounds(rows.iter().map(|r| r.0 as f64)))
        .unwrap_or((0.0, 1.0));
    let x_axis = Axis::new(x_min, x_max, 0.02, 6, true);

    let n = panels.len() as i64;
    let block = (HEIGHT as i64 - TOP - BOTTOM) / n;
    // About one y tick per 40 pixels (three label heights), so stacked panels stay uncluttered.
    let y_ticks = ((block - PANEL_HEADER - PANEL_GAP) / 40).clamp(2, 5) as usize;
    let y_axes: Vec<Axis> = series
        .iter()
        .map(|points| {
            let (lo, hi) = bounds(points.iter().map(|p| p.1)).unwrap_or((0.0, 1.0));
            Axis::new(lo, hi, 0.08, y_ticks, false)
        })
        .collect();

    let label_width = y_axes
        .iter()
        .flat_map(|axis| &axis.labels)
        .map(|label| text_width(label, LABEL_SCALE))
        .max()
        .unwrap_or(0);
    let left = (label_width + 18).max(56);
    let right = WIDTH as i64 - RIGHT_MARGIN;

    let title = fit_text(title, WIDTH as i64 - 20, TITLE_SCALE);
    let title_x = (WIDTH as i64 - text_width(&title, TITLE_SCALE)) / 2;
    canvas.text(title_x, 14, &title, TITLE_SCALE, TEXT);

    let mut last_plot = Rect {
        x0: left,
        y0: TOP,
        x1: right,
        y1: HEIGHT as i64 - BOTTOM,
    };
    for (i, ((panel_title, field), (points, y_axis))) in
        panels.iter().zip(series.iter().zip(&y_axes)).enumerate()
    {
        let top = TOP + i as i64 * block;
        let plot = Rect {
            x0: left,
            y0: top + PANEL_HEADER,
            x1: right,
            y1: (top + block - PANEL_GAP).max(top + PANEL_HEADER + 2),
        };
        let panel = Panel {
            title: panel_title,
            field,
            points,
            color: PALETTE[i % PALETTE.len()],
        };
        draw_panel(&mut canvas, plot, &panel, &x_axis, y_axis);
        last_plot = plot;
    }

    // The step axis is labelled once, under the bottom panel.
    for (tick, label) in x_axis.ticks.iter().zip(&x_axis.labels) {
        let x = x_axis.to_px(*tick, last_plot.x0, last_plot.x1 - 1).round() as i64;
        let w = text_width(label, LABEL_SCALE);
        let x = (x - w / 2).clamp(0, WIDTH as i64 - w);
        canvas.text(x, last_plot.y1 + 10, label, LABEL_SCALE, TEXT);
    }
    let step_label = "step";
    let mid = (last_plot.x0 + last_plot.x1 - text_width(step_label, LABEL_SCALE)) / 2;
    canvas.text(mid, last_plot.y1 + 34, step_label, LABEL_SCALE, MUTED);
    canvas
}

struct Panel<'a> {
    title: &'a str,
    field: &'a str,
    points: &'a [(f64, f64)],
    color: Rgb,
}

fn draw_panel(canvas: &mut Canvas, plot: Rect, panel: &Panel<'_>, x_axis: &Axis, y_axis: &Axis) {
    let header_y = plot.y0 - PANEL_HEADER + 2;
    canvas.text(plot.x0, header_y, panel.title, LABEL_SCALE, TEXT);
    let summary = match panel.points.last() {
        Some(&(step, v)) => format!("{} {} at step {}", panel.field, format_value(v), step),
        None => format!("{}: no data", panel.field),
    };
    let summary = fit_text(
        &summary,
        plot.width() - text_width(panel.title, LABEL_SCALE) - 24,
        LABEL_SCALE,
    );
    let summary_x = plot.x1 - text_width(&summary, LABEL_SCALE);
    canvas.text(summary_x, header_y, &summary, LABEL_SCALE, MUTED);

    let (px0, px1) = (plot.x0, plot.x1 - 1);
    let (py_bottom, py_top) = (plot.y1 - 1, plot.y0);
    for tick in &x_axis.ticks {
        let x = x_axis.to_px(*tick, px0, px1).round() as i64;
        canvas.fill_rect(
            Rect {
                x0: x,
                y0: plot.y0,
                x1: x + 1,
                y1: plot.y1,
            },
            GRID,
        );
        canvas.fill_rect(
            Rect {
                x0: x,
                y0: plot.y1,
                x1: x + 1,
                y1: plot.y1 + 5,
            },
            AXIS,
        );
    }
    for (tick, label) in y_axis.ticks.iter().zip(&y_axis.labels) {
        let y = y_axis.to_px(*tick, py_bottom, py_top).round() as i64;
        canvas.fill_rect(
            Rect {
                x0: plot.x0,
                y0: y,
                x1: plot.x1,
                y1: y + 1,
            },
            GRID,
        );
        canvas.fill_rect(
            Rect {
                x0: plot.x0 - 5,
                y0: y,
                x1: plot.x0,
                y1: y + 1,
            },
            AXIS,
        );
        let x = plot.x0 - 9 - text_width(label, LABEL_SCALE);
        canvas.text(x, y - 7 * LABEL_SCALE / 2, label, LABEL_SCALE, TEXT);
    }
    canvas.stroke_rect(plot, AXIS);

    if panel.points.is_empty() {
        let msg = "no data";
        let x = (plot.x0 + plot.x1 - text_width(msg, LABEL_SCALE)) / 2;
        let y = (plot.y0 + plot.y1) / 2 - 7;
        canvas.text(x, y, msg, LABEL_SCALE, MUTED);
        return;
    }
    // The data stays inside the padded axes; the clip only keeps the stroke's edge off the
    // border and the labels.
    let clip = Rect {
        x0: plot.x0 + 1,
        y0: plot.y0 + 1,
        x1: plot.x1 - 1,
        y1: plot.y1 - 1,
    };
    let to_px = |&(x, y): &(f64, f64)| {
        (
            x_axis.to_px(x, px0, px1),
            y_axis.to_px(y, py_bottom, py_top),
        )
    };
    let pixels: Vec<(f64, f64)> = panel.points.iter().map(to_px).collect();
    for pair in pixels.windows(2) {
        canvas.segment(pair[0], pair[1], 1.25, panel.color, clip);
    }
    if pixels.len() <= MAX_MARKED_POINTS {
        for &p in &pixels {
            canvas.segment(p, p, 3.0, panel.color, clip);
        }
    }
}

/// Smallest and largest of the values, or `None` when there are none.
fn bounds(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    values.fold(None, |acc, v| match acc {
        None => Some((v, v)),
        Some((lo, hi)) => Some((lo.min(v), hi.max(v))),
    })
}

/// Shortens `text` with a trailing `...` so it fits `max_width` pixels.
fn fit_text(text: &str, max_width: i64, scale: i64) -> String {
    if text_width(text, scale) <= max_width {
        return text.to_string();
    }
    let mut chars: Vec<char> = text.chars().collect();
    while !chars.is_empty() && text_width_chars(chars.len() + 3, scale) > max_width {
        chars.pop();
    }
    chars.into_iter().chain("...".chars()).collect()
}

// ---------------------------------------------------------------------------------------------
// Axes and number formatting

/// A linear axis: the data range padded (or widened, when the data is one value), with ticks
/// at 1, 2 or 5 times a power of ten.
struct Axis {
    lo: f64,
    hi: f64,
    ticks: Vec<f64>,
    labels: Vec<String>,
}

impl Axis {
    fn new(min: f64, max: f64, pad_fraction: f64, target_ticks: usize, integer: bool) -> Axis {
        let (mut lo, mut hi) = (min, max);
        let magnitude = lo.abs().max(hi.abs());
        // A span this small relative to the values is rounding noise: no tick step could label
        // it distinctly, so treat the series as constant.
        if hi - lo <= magnitude * 1e-9 {
            let half = if integer || magnitude == 0.0 {
                1.0
            } else {
                magnitude * 0.1
            };
            let mid = (lo + hi) / 2.0;
            (lo, hi) = (mid - half, mid + half);
        } else {
            let pad = (hi - lo) * pad_fraction;
            (lo, hi) = (lo - pad, hi + pad);
        }
        let mut step = nice_step((hi - lo) / target_ticks as f64);
        if integer {
            step = step.max(1.0);
        }
        // The slack keeps a tick that lands on an end (1e-4 / 2e-5 = 4.999..) from being lost.
        let first = (lo / step - 1e-9).ceil();
        let last = (hi / step + 1e-9).floor();
        // Finite inputs give about `target_ticks` ticks; the cap only guards overflowed spans.
        let ticks: Vec<f64> = if step.is_finite() && (0.0..=100.0).contains(&(last - first)) {
            (0..=(last - first) as i64)
                .map(|k| (first + k as f64) * step)
                .collect()
        } else {
            Vec::new()
        };
        let labels = format_ticks(&ticks, step);
        Axis {
            lo,
            hi,
            ticks,
            labels,
        }
    }

    /// Maps a value to a pixel coordinate, `lo` to `px_lo` and `hi` to `px_hi`.
    fn to_px(&self, v: f64, px_lo: i64, px_hi: i64) -> f64 {
        let t = (v - self.lo) / (self.hi - self.lo);
        px_lo as f64 + t * (px_hi - px_lo) as f64
    }
}

fn nice_step(raw: f64) -> f64 {
    if !(raw.is_finite() && raw > 0.0) {
        return 1.0;
    }
    let power = 10f64.powf(raw.log10().floor());
    let fraction = raw / power;
    let nice = if fraction < 1.5 {
        1.0
    } else if fraction < 3.0 {
        2.0
    } else if fraction < 7.0 {
        5.0
    } else {
        10.0
    };
    nice * power
}

/// Tick labels with just enough digits to tell neighbours apart: fixed-point normally,
/// scientific for very large values or very fine steps.
fn format_ticks(ticks: &[f64], step: f64) -> Vec<String> {
    let max_abs = ticks.iter().fold(0.0f64, |m, t| m.max(t.abs()));
    let scientific = max_abs >= 1e6 || step < 1e-4;
    // The epsilon stops log10(0.1) = -0.99999.. from asking for a second decimal.
    let decimals = (-step.log10() - 1e-9).ceil().max(0.0) as usize;
    let precision = (max_abs.log10().floor() - step.log10().floor()).clamp(0.0, 6.0) as usize;
    ticks
        .iter()
        .map(|&t| {
            // Snap rounding noise (and -0.0) to zero so the axis never reads "-0.0".
            let t = if t.abs() < step * 1e-6 { 0.0 } else { t };
            if t == 0.0 {
                "0".to_string()
            } else if scientific {
                format_scientific(t, precision)
            } else {
                format!("{t:.decimals$}")
            }
        })
        .collect()
}

/// `v` in scientific notation with `precision` mantissa decimals, trailing zeros dropped
/// (`1.50e-5` reads `1.5e-5`).
fn format_scientific(v: f64, precision: usize) -> String {
    let text = format!("{v:.precision$e}");
    match text.split_once('e') {
        Some((mantissa, exponent)) => format!("{}e{exponent}", trim_zeros(mantissa)),
        None => text,
    }
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
        format_scientific(v, 3)
    }
}

fn trim_zeros(number: &str) -> &str {
    if number.contains('.') {
        number.trim_end_matches('0').trim_end_matches('.')
    } else {
        number
    }
}

// ---------------------------------------------------------------------------------------------
// Rasteriser

/// A half-open pixel rectangle `[x0, x1) x [y0, y1)`.
#[derive(Clone, Copy, Debug)]
struct Rect {
    x0: i64,
    y0: i64,
    x1: i64,
    y1: i64,
}

impl Rect {
    fn width(&self) -> i64 {
        self.x1 - self.x0
    }
}

/// An RGB image, row-major, three bytes a pixel.
struct Canvas {
    width: usize,
    height: usize,
    pixels: Vec<u8>,
}

impl Canvas {
    fn new(width: usize, height: usize, background: Rgb) -> Canvas {
        Canvas {
            width,
            height,
            pixels: background.0.repeat(width * height),
        }
    }

    /// Mixes `color` into one pixel with opacity `alpha` (0..=1); off-canvas pixels are ignored.
    fn blend(&mut self, x: i64, y: i64, color: Rgb, alpha: f64) {
        if x < 0 || y < 0 || x >= self.width as i64 || y >= self.height as i64 || alpha <= 0.0 {
            return;
        }
        let i = (y as usize * self.width + x as usize) * 3;
        let pixel = &mut self.pixels[i..i + 3];
        if alpha >= 1.0 {
            pixel.copy_from_slice(&color.0);
            return;
        }
        for (old, new) in pixel.iter_mut().zip(color.0) {
            let mixed = f64::from(*old) + (f64::from(new) - f64::from(*old)) * alpha;
            *old = mixed.round() as u8;
        }
    }

    fn fill_rect(&mut self, r: Rect, color: Rgb) {
        let (x0, x1) = (r.x0.max(0), r.x1.min(self.width as i64));
        let (y0, y1) = (r.y0.max(0), r.y1.min(self.height as i64));
        for y in y0..y1 {
            for x in x0..x1 {
                self.blend(x, y, color, 1.0);
            }
        }
    }

    /// A one-pixel outline just inside `r`.
    fn stroke_rect(&mut self, r: Rect, color: Rgb) {
        self.fill_rect(Rect { y1: r.y0 + 1, ..r }, color);
        self.fill_rect(Rect { y0: r.y1 - 1, ..r }, color);
        self.fill_rect(Rect { x1: r.x0 + 1, ..r }, color);
        self.fill_rect(Rect { x0: r.x1 - 1, ..r }, color);
    }

    /// An anti-aliased segment from `a` to `b` with round caps (pixel centres at integer
    /// coordinates); a zero-length segment is a filled disc. Coverage is the distance to the
    /// segment against `half_width`, which is exact enough at this size and has no special cases.
    fn segment(&mut self, a: (f64, f64), b: (f64, f64), half_width: f64, color: Rgb, clip: Rect) {
        if ![a.0, a.1, b.0, b.1].iter().all(|c| c.is_finite()) {
            return;
        }
        let reach = half_width + 1.0;
        let x0 = ((a.0.min(b.0) - reach).floor() as i64).max(clip.x0);
        let x1 = ((a.0.max(b.0) + reach).ceil() as i64).min(clip.x1 - 1);
        let y0 = ((a.1.min(b.1) - reach).floor() as i64).max(clip.y0);
        let y1 = ((a.1.max(b.1) + reach).ceil() as i64).min(clip.y1 - 1);
        let (dx, dy) = (b.0 - a.0, b.1 - a.1);
        let length2 = dx * dx + dy * dy;
        for y in y0..=y1 {
            for x in x0..=x1 {
                let (px, py) = (x as f64, y as f64);
                let t = if length2 > 0.0 {
                    (((px - a.0) * dx + (py - a.1) * dy) / length2).clamp(0.0, 1.0)
                } else {
                    0.0
                };
                let (ex, ey) = (a.0 + t * dx - px, a.1 + t * dy - py);
                let distance = (ex * ex + ey * ey).sqrt();
                self.blend(x, y, color, (half_width + 0.5 - distance).clamp(0.0, 1.0));
            }
        }
    }

    /// Draws `text` with its cap line at `y` and its first glyph's left edge at `x`.
    fn text(&mut self, x: i64, y: i64, text: &str, scale: i64, color: Rgb) {
        for (i, ch) in text.chars().enumerate() {
            let (top, rows) = glyph(ch);
            let gx = x + i as i64 * GLYPH_ADVANCE * scale;
            for (r, row) in rows.iter().enumerate() {
                let gy = y + (i64::from(top) + r as i64) * scale;
                for (c, bit) in row.bytes().enumerate() {
                    if bit == b'#' {
                        let px = gx + c as i64 * scale;
                        self.fill_rect(
                            Rect {
                                x0: px,
                                y0: gy,
                                x1: px + scale,
                                y1: gy + scale,
                            },
                            color,
                        );
                    }
                }
            }
        }
    }

    fn encode_png(&self) -> std::result::Result<Vec<u8>, png::EncodingError> {
        let mut out = Vec::new();
        let mut encoder = png::Encoder::new(&mut out, self.width as u32, self.height as u32);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header()?;
        writer.write_image_data(&self.pixels)?;
        writer.finish()?;
        Ok(out)
    }
}

// ---------------------------------------------------------------------------------------------
// Font

/// Glyphs are 5 columns by up to 9 rows: rows 0-6 sit on the baseline, 7-8 hold descenders.
/// The advance leaves one blank column between letters.
const GLYPH_ADVANCE: i64 = 6;

fn text_width(text: &str, scale: i64) -> i64 {
    text_width_chars(text.chars().count(), scale)
}

fn text_width_chars(chars: usize, scale: i64) -> i64 {
    if chars == 0 {
        0
    } else {
        (chars as i64 * GLYPH_ADVANCE - 1) * scale
    }
}

/// The glyph for `ch` as (first row, rows of `#`/`.`); `?` for characters outside the font.
fn glyph(ch: char) -> (u8, &'static [&'static str]) {
    let index = (ch as usize).wrapping_sub(' ' as usize);
    let (_, top, rows) = FONT
        .get(index)
        .copied()
        .unwrap_or(FONT['?' as usize - ' ' as usize]);
    (top, rows)
}

/// Printable ASCII (0x20..=0x7e) in order, drawn for this file: (char, first row, rows).
/// Lower-case letters start at row 2 (the x-height); g, j, p, q, y and `,` reach rows 7-8.
#[rustfmt::skip]
const FONT: [(char, u8, &[&str]); 95] = [
    (' ', 0, &[]),
    ('!', 0, &["..#..", "..#..", "..#..", "..#..", "..#..", ".....", "..#.."]),
    ('"', 0, &[".#.#.", ".#.#.", ".#.#."]),
    ('#', 0, &[".#.#.", ".#.#.", "#####", ".#.#.", "#####", ".#.#.", ".#.#."]),
    ('$', 0, &["..#..", ".####", "#.#..", ".###.", "..#.#", "####.", "..#.."]),
    ('%', 0, &["##...", "##..#", "...#.", "..#..", ".#...", "#..##", "...##"]),
    ('&', 0, &[".##..", "#..#.", "#.#..", ".#...", "#.#.#", "#..#.", ".##.#"]),
    ('\'', 0, &["..#..", "..#..", "..#.."]),
    ('(', 0, &["...#.", "..#..", ".#...", ".#...", ".#...", "..#..", "...#."]),
    (')', 0, &[".#...", "..#..", "...#.", "...#.", "...#.", "..#..", ".#..."]),
    ('*', 1, &["..#..", "#.#.#", ".###.", "#.#.#", "..#.."]),
    ('+', 1, &["..#..", "..#..", "#####", "..#..", "..#.."]),
    (',', 5, &[".##..", ".##..", "..#..", ".#..."]),
    ('-', 3, &["#####"]),
    ('.', 5, &[".##..", ".##.."]),
    ('/', 0, &[".....", "....#", "...#.", "..#..", ".#...", "#....", "....."]),
    ('0', 0, &[".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."]),
    ('1', 0, &["..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."]),
    ('2', 0, &[".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"]),
    ('3', 0, &["#####", "...#.", "..#..", "...#.", "....#", "#...#", ".###."]),
    ('4', 0, &["...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."]),
    ('5', 0, &["#####", "#....", "####.", "....#", "....#", "#...#", ".###."]),
    ('6', 0, &["..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."]),
    ('7', 0, &["#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."]),
    ('8', 0, &[".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."]),
    ('9', 0, &[".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."]),
    (':', 1, &[".##..", ".##..", ".....", ".##..", ".##.."]),
    (';', 1, &[".##..", ".##..", ".....", ".##..", ".##..", "..#..", ".#..."]),
    ('<', 0, &["...#.", "..#..", ".#...", "#....", ".#...", "..#..", "...#."]),
    ('=', 2, &["#####", ".....", "#####"]),
    ('>', 0, &[".#...", "..#..", "...#.", "....#", "...#.", "..#..", ".#..."]),
    ('?', 0, &[".###.", "#...#", "....#", "...#.", "..#..", ".....", "..#.."]),
    ('@', 0, &[".###.", "#...#", "....#", ".##.#", "#.#.#", "#.#.#", ".###."]),
    ('A', 0, &[".###.", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"]),
    ('B', 0, &["####.", "#...#", "#...#", "####.", "#...#", "#...#", "####."]),
    ('C', 0, &[".###.", "#...#", "#....", "#....", "#....", "#...#", ".###."]),
    ('D', 0, &["###..", "#..#.", "#...#", "#...#", "#...#", "#..#.", "###.."]),
    ('E', 0, &["#####", "#....", "#....", "####.", "#....", "#....", "#####"]),
    ('F', 0, &["#####", "#....", "#....", "####.", "#....", "#....", "#...."]),
    ('G', 0, &[".###.", "#...#", "#....", "#.###", "#...#", "#...#", ".####"]),
    ('H', 0, &["#...#", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"]),
    ('I', 0, &[".###.", "..#..", "..#..", "..#..", "..#..", "..#..", ".###."]),
    ('J', 0, &["..###", "...#.", "...#.", "...#.", "...#.", "#..#.", ".##.."]),
    ('K', 0, &["#...#", "#..#.", "#.#..", "##...", "#.#..", "#..#.", "#...#"]),
    ('L', 0, &["#....", "#....", "#....", "#....", "#....", "#....", "#####"]),
    ('M', 0, &["#...#", "##.##", "#.#.#", "#.#.#", "#...#", "#...#", "#...#"]),
    ('N', 0, &["#...#", "#...#", "##..#", "#.#.#", "#..##", "#...#", "#...#"]),
    ('O', 0, &[".###.", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."]),
    ('P', 0, &["####.", "#...#", "#...#", "####.", "#....", "#....", "#...."]),
    ('Q', 0, &[".###.", "#...#", "#...#", "#...#", "#.#.#", "#..#.", ".##.#"]),
    ('R', 0, &["####.", "#...#", "#...#", "####.", "#.#..", "#..#.", "#...#"]),
    ('S', 0, &[".####", "#....", "#....", ".###.", "....#", "....#", "####."]),
    ('T', 0, &["#####", "..#..", "..#..", "..#..", "..#..", "..#..", "..#.."]),
    ('U', 0, &["#...#", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."]),
    ('V', 0, &["#...#", "#...#", "#...#", "#...#", "#...#", ".#.#.", "..#.."]),
    ('W', 0, &["#...#", "#...#", "#...#", "#.#.#", "#.#.#", "#.#.#", ".#.#."]),
    ('X', 0, &["#...#", "#...#", ".#.#.", "..#..", ".#.#.", "#...#", "#...#"]),
    ('Y', 0, &["#...#", "#...#", ".#.#.", "..#..", "..#..", "..#..", "..#.."]),
    ('Z', 0, &["#####", "....#", "...#.", "..#..", ".#...", "#....", "#####"]),
    ('[', 0, &[".###.", ".#...", ".#...", ".#...", ".#...", ".#...", ".###."]),
    ('\\', 0, &[".....", "#....", ".#...", "..#..", "...#.", "....#", "....."]),
    (']', 0, &[".###.", "...#.", "...#.", "...#.", "...#.", "...#.", ".###."]),
    ('^', 0, &["..#..", ".#.#.", "#...#"]),
    ('_', 8, &["#####"]),
    ('`', 0, &[".#...", "..#.."]),
    ('a', 2, &[".###.", "....#", ".####", "#...#", ".####"]),
    ('b', 0, &["#....", "#....", "#.##.", "##..#", "#...#", "#...#", "####."]),
    ('c', 2, &[".###.", "#....", "#....", "#...#", ".###."]),
    ('d', 0, &["....#", "....#", ".##.#", "#..##", "#...#", "#...#", ".####"]),
    ('e', 2, &[".###.", "#...#", "#####", "#....", ".###."]),
    ('f', 0, &["..##.", ".#..#", ".#...", "###..", ".#...", ".#...", ".#..."]),
    ('g', 2, &[".####", "#...#", "#...#", "#...#", ".####", "....#", ".###."]),
    ('h', 0, &["#....", "#....", "#.##.", "##..#", "#...#", "#...#", "#...#"]),
    ('i', 0, &["..#..", ".....", ".##..", "..#..", "..#..", "..#..", ".###."]),
    ('j', 0, &["...#.", ".....", "..##.", "...#.", "...#.", "...#.", "...#.", "#..#.", ".##.."]),
    ('k', 0, &["#....", "#....", "#..#.", "#.#..", "##...", "#.#..", "#..#."]),
    ('l', 0, &[".##..", "..#..", "..#..", "..#..", "..#..", "..#..", ".###."]),
    ('m', 2, &["##.#.", "#.#.#", "#.#.#", "#.#.#", "#.#.#"]),
    ('n', 2, &["#.##.", "##..#", "#...#", "#...#", "#...#"]),
    ('o', 2, &[".###.", "#...#", "#...#", "#...#", ".###."]),
    ('p', 2, &["#.##.", "##..#", "#...#", "#...#", "####.", "#....", "#...."]),
    ('q', 2, &[".##.#", "#..##", "#...#", "#...#", ".####", "....#", "....#"]),
    ('r', 2, &["#.##.", "##..#", "#....", "#....", "#...."]),
    ('s', 2, &[".####", "#....", ".###.", "....#", "####."]),
    ('t', 0, &[".#...", ".#...", "###..", ".#...", ".#...", ".#..#", "..##."]),
    ('u', 2, &["#...#", "#...#", "#...#", "#..##", ".##.#"]),
    ('v', 2, &["#...#", "#...#", "#...#", ".#.#.", "..#.."]),
    ('w', 2, &["#...#", "#...#", "#.#.#", "#.#.#", ".#.#."]),
    ('x', 2, &["#...#", ".#.#.", "..#..", ".#.#.", "#...#"]),
    ('y', 2, &["#...#", "#...#", "#...#", "#...#", ".####", "....#", ".###."]),
    ('z', 2, &["#####", "...#.", "..#..", ".#...", "#####"]),
    ('{', 0, &["...##", "..#..", "..#..", ".#...", "..#..", "..#..", "...##"]),
    ('|', 0, &["..#..", "..#..", "..#..", "..#..", "..#..", "..#..", "..#.."]),
    ('}', 0, &["##...", "..#..", "..#..", "...#.", "..#..", "..#..", "##..."]),
    ('~', 2, &[".#...", "#.#.#", "...#."]),
];

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

    /// Pixels of exactly `color` in the top and the bottom half of the image.
    fn count_halves(pixels: &[[u8; 3]], color: Rgb) -> (usize, usize) {
        let half = WIDTH * HEIGHT / 2;
        let count = |range: &[[u8; 3]]| range.iter().filter(|p| **p == color.0).count();
        (count(&pixels[..half]), count(&pixels[half..]))
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
        assert_eq!((w as usize, h as usize), (WIDTH, HEIGHT));
        assert!(
            pixels.iter().any(|p| *p != pixels[0]),
            "image is one colour"
        );
        let (reward_top, reward_bottom) = count_halves(&pixels, PALETTE[0]);
        let (kl_top, kl_bottom) = count_halves(&pixels, PALETTE[1]);
        assert!(
            reward_top > 500 && reward_bottom == 0,
            "reward {reward_top}/{reward_bottom}"
        );
        assert!(kl_bottom > 500 && kl_top == 0, "kl {kl_top}/{kl_bottom}");
        // Text and axes are drawn too (the title band and y labels are dark).
        let dark = pixels.iter().filter(|p| **p == TEXT.0).count();
        assert!(dark > 1000, "only {dark} text pixels");
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

        // No rows at all still makes a plot (a run that has not logged yet).
        let empty = dir.path().join("empty.png");
        write_plot_series(&[], &DEFAULT_PANELS, "empty", &empty).unwrap();
        assert_eq!(decode(&empty).0, WIDTH as u32);
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
        let (w, h, _) = decode(&out);
        assert_eq!((w as usize, h as usize), (WIDTH, HEIGHT));
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
    }

    #[test]
    fn axes_have_a_span_and_clean_labels() {
        let constant = Axis::new(2.0, 2.0, 0.08, 5, false);
        assert!(
            constant.hi - constant.lo > 0.3,
            "{} {}",
            constant.lo,
            constant.hi
        );
        let zero = Axis::new(0.0, 0.0, 0.08, 5, false);
        assert!(zero.lo < 0.0 && zero.hi > 0.0 && zero.labels.contains(&"0".to_string()));
        let single_step = Axis::new(7.0, 7.0, 0.02, 6, true);
        assert_eq!(single_step.labels, ["6", "7", "8"]);

        let unit = Axis::new(-0.3, 0.9, 0.0, 5, false);
        assert_eq!(unit.labels, ["-0.2", "0", "0.2", "0.4", "0.6", "0.8"]);
        let tiny = Axis::new(0.0, 1e-4, 0.0, 5, false);
        assert_eq!(tiny.labels, ["0", "2e-5", "4e-5", "6e-5", "8e-5", "1e-4"]);
        let steps = Axis::new(0.0, 1000.0, 0.0, 6, true);
        assert_eq!(steps.labels, ["0", "200", "400", "600", "800", "1000"]);

        assert_eq!(format_value(0.731234), "0.7312");
        assert_eq!(format_value(-12.5), "-12.5");
        assert_eq!(format_value(3.2e-7), "3.2e-7");
    }

    #[test]
    fn font_covers_printable_ascii_in_order() {
        for (i, (ch, top, rows)) in FONT.iter().enumerate() {
            assert_eq!(*ch as usize, 0x20 + i, "glyph {i} is {ch:?}");
            assert!(usize::from(*top) + rows.len() <= 9, "{ch:?} is too tall");
            for row in *rows {
                assert!(
                    row.len() == 5 && row.bytes().all(|b| b == b'#' || b == b'.'),
                    "{ch:?}"
                );
            }
        }
        assert_eq!(glyph('é'), glyph('?'));
        assert_eq!(fit_text("abcdefgh", text_width("abcd...", 1), 1), "abcd...");
    }
}
