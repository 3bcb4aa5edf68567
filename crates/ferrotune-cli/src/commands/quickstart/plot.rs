//! Minimal, self-explanatory PNG line charts for the quickstart report, drawn into an RGB
//! buffer and encoded with the `png` crate: a title, axis titles (the y title rotated along the
//! y axis), grid lines and labels at round tick values (large numbers written compactly, e.g.
//! 1.5M), one polyline (with optional point markers) per series and a legend box (colour
//! swatch + series name) in the plot corner (or side) that hides the least data. Text uses a
//! small built-in 5x7 bitmap font (with descenders), drawn at 2x or 3x; report.md repeats the
//! axis ranges and colour names in the caption under each image.

use std::path::Path;

use anyhow::Context;

pub const COLOURS: [(&str, [u8; 3]); 6] = [
    ("blue", [31, 119, 180]),
    ("orange", [255, 127, 14]),
    ("green", [44, 160, 44]),
    ("red", [214, 39, 40]),
    ("purple", [148, 103, 189]),
    ("brown", [140, 86, 75]),
];

/// Image size of every chart, in pixels.
pub const WIDTH: usize = 960;
pub const HEIGHT: usize = 600;

const TEXT: [u8; 3] = [25, 25, 25];
const GRID: [u8; 3] = [228, 228, 228];
const FRAME: [u8; 3] = [150, 150, 150];

pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    pub markers: bool,
}

/// The words on a chart: a title above the plot and one title per axis.
pub struct ChartText<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
}

/// Glyphs of a 5-pixel-wide font: rows separated by spaces, `#` = ink. Rows 0-6 sit on the
/// baseline (caps are 7 rows tall, lower case 5); rows 7-8, when present, are descenders.
/// Characters missing here are drawn as a hollow box.
const FONT: &[(char, &str)] = &[
    (' ', "..... ..... ..... ..... ..... ..... ....."),
    ('0', ".###. #...# #..## #.#.# ##..# #...# .###."),
    ('1', "..#.. .##.. ..#.. ..#.. ..#.. ..#.. .###."),
    ('2', ".###. #...# ....# ...#. ..#.. .#... #####"),
    ('3', ".###. #...# ....# ..##. ....# #...# .###."),
    ('4', "...#. ..##. .#.#. #..#. ##### ...#. ...#."),
    ('5', "##### #.... ####. ....# ....# #...# .###."),
    ('6', "..##. .#... #.... ####. #...# #...# .###."),
    ('7', "##### ....# ...#. ..#.. .#... .#... .#..."),
    ('8', ".###. #...# #...# .###. #...# #...# .###."),
    ('9', ".###. #...# #...# .#### ....# ...#. .##.."),
    ('A', ".###. #...# #...# ##### #...# #...# #...#"),
    ('B', "####. #...# #...# ####. #...# #...# ####."),
    ('C', ".###. #...# #.... #.... #.... #...# .###."),
    ('D', "####. #...# #...# #...# #...# #...# ####."),
    ('E', "##### #.... #.... ####. #.... #.... #####"),
    ('F', "##### #.... #.... ####. #.... #.... #...."),
    ('G', ".###. #...# #.... #.### #...# #...# .####"),
    ('H', "#...# #...# #...# ##### #...# #...# #...#"),
    ('I', ".###. ..#.. ..#.. ..#.. ..#.. ..#.. .###."),
    ('J', "..### ...#. ...#. ...#. ...#. #..#. .##.."),
    ('K', "#...# #..#. #.#.. ##... #.#.. #..#. #...#"),
    ('L', "#.... #.... #.... #.... #.... #.... #####"),
    ('M', "#...# ##.## #.#.# #.#.# #...# #...# #...#"),
    ('N', "#...# #...# ##..# #.#.# #..## #...# #...#"),
    ('O', ".###. #...# #...# #...# #...# #...# .###."),
    ('P', "####. #...# #...# ####. #.... #.... #...."),
    ('Q', ".###. #...# #...# #...# #.#.# #..#. .##.#"),
    ('R', "####. #...# #...# ####. #.#.. #..#. #...#"),
    ('S', ".###. #...# #.... .###. ....# #...# .###."),
    ('T', "##### ..#.. ..#.. ..#.. ..#.. ..#.. ..#.."),
    ('U', "#...# #...# #...# #...# #...# #...# .###."),
    ('V', "#...# #...# #...# #...# #...# .#.#. ..#.."),
    ('W', "#...# #...# #...# #.#.# #.#.# #.#.# .#.#."),
    ('X', "#...# #...# .#.#. ..#.. .#.#. #...# #...#"),
    ('Y', "#...# #...# .#.#. ..#.. ..#.. ..#.. ..#.."),
    ('Z', "##### ....# ...#. ..#.. .#... #.... #####"),
    ('a', "..... ..... .###. ....# .#### #...# .####"),
    ('b', "#.... #.... #.##. ##..# #...# #...# ####."),
    ('c', "..... ..... .###. #.... #.... #...# .###."),
    ('d', "....# ....# .##.# #..## #...# #...# .####"),
    ('e', "..... ..... .###. #...# ##### #.... .###."),
    ('f', "..##. .#..# .#... ###.. .#... .#... .#..."),
    ('g', "..... ..... .#### #...# #...# #...# .#### ....# .###."),
    ('h', "#.... #.... #.##. ##..# #...# #...# #...#"),
    ('i', "..#.. ..... .##.. ..#.. ..#.. ..#.. .###."),
    ('j', "...#. ..... ..##. ...#. ...#. ...#. ...#. #..#. .##.."),
    ('k', "#.... #.... #..#. #.#.. ##... #.#.. #..#."),
    ('l', ".##.. ..#.. ..#.. ..#.. ..#.. ..#.. .###."),
    ('m', "..... ..... ##.#. #.#.# #.#.# #.#.# #.#.#"),
    ('n', "..... ..... #.##. ##..# #...# #...# #...#"),
    ('o', "..... ..... .###. #...# #...# #...# .###."),
    ('p', "..... ..... ####. #...# #...# #...# ####. #.... #...."),
    ('q', "..... ..... .#### #...# #...# #...# .#### ....# ....#"),
    ('r', "..... ..... #.##. ##..# #.... #.... #...."),
    ('s', "..... ..... .#### #.... .###. ....# ####."),
    ('t', ".#... .#... ###.. .#... .#... .#..# ..##."),
    ('u', "..... ..... #...# #...# #...# #..## .##.#"),
    ('v', "..... ..... #...# #...# #...# .#.#. ..#.."),
    ('w', "..... ..... #...# #...# #.#.# #.#.# .#.#."),
    ('x', "..... ..... #...# .#.#. ..#.. .#.#. #...#"),
    ('y', "..... ..... #...# #...# #...# #...# .#### ....# .###."),
    ('z', "..... ..... ##### ...#. ..#.. .#... #####"),
    ('.', "..... ..... ..... ..... ..... .##.. .##.."),
    (',', "..... ..... ..... ..... ..... .##.. .##.. ..#.. .#..."),
    ('-', "..... ..... ..... .###. ..... ..... ....."),
    ('+', "..... ..#.. ..#.. ##### ..#.. ..#.. ....."),
    ('(', "...#. ..#.. .#... .#... .#... ..#.. ...#."),
    (')', ".#... ..#.. ...#. ...#. ...#. ..#.. .#..."),
    ('[', ".###. .#... .#... .#... .#... .#... .###."),
    (']', ".###. ...#. ...#. ...#. ...#. ...#. .###."),
    ('=', "..... ..... ##### ..... ##### ..... ....."),
    (':', "..... .##.. .##.. ..... .##.. .##.. ....."),
    (';', "..... .##.. .##.. ..... ..... .##.. .##.. ..#.. .#..."),
    ('/', "....# ....# ...#. ..#.. .#... #.... #...."),
    ('%', "##... ##..# ...#. ..#.. .#... #..## ...##"),
    ('_', "..... ..... ..... ..... ..... ..... ..... #####"),
    ('<', "...#. ..#.. .#... #.... .#... ..#.. ...#."),
    ('>', ".#... ..#.. ...#. ....# ...#. ..#.. .#..."),
    ('!', "..#.. ..#.. ..#.. ..#.. ..#.. ..... ..#.."),
    ('?', ".###. #...# ....# ...#. ..#.. ..... ..#.."),
    ('\'', "..#.. ..#.. .#... ..... ..... ..... ....."),
    ('"', ".#.#. .#.#. ..... ..... ..... ..... ....."),
    ('*', "..... ..#.. #.#.# .###. #.#.# ..#.. ....."),
    ('#', ".#.#. .#.#. ##### .#.#. ##### .#.#. .#.#."),
    ('|', "..#.. ..#.. ..#.. ..#.. ..#.. ..#.. ..#.."),
];
const MISSING: &str = "##### #...# #...# #...# #...# #...# #####";
const GLYPH_W: i64 = 5;
const GLYPH_ADVANCE: i64 = 6;
/// Rows above the baseline plus descender rows.
const GLYPH_H: i64 = 9;

fn glyph(c: char) -> &'static str {
    FONT.iter()
        .find(|(g, _)| *g == c)
        .map_or(MISSING, |(_, rows)| rows)
}

/// Width in pixels of `s` drawn at `scale`.
fn text_width(s: &str, scale: i64) -> i64 {
    let n = s.chars().count() as i64;
    if n == 0 {
        0
    } else {
        (n * GLYPH_ADVANCE - (GLYPH_ADVANCE - GLYPH_W)) * scale
    }
}

struct Canvas {
    width: usize,
    height: usize,
    pixels: Vec<u8>,
}

impl Canvas {
    fn new(width: usize, height: usize) -> Self {
        Canvas {
            width,
            height,
            pixels: vec![255; width * height * 3],
        }
    }

    fn set(&mut self, x: i64, y: i64, colour: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < self.width && (y as usize) < self.height {
            let i = (y as usize * self.width + x as usize) * 3;
            self.pixels[i..i + 3].copy_from_slice(&colour);
        }
    }

    fn get(&self, x: i64, y: i64) -> Option<[u8; 3]> {
        if x >= 0 && y >= 0 && (x as usize) < self.width && (y as usize) < self.height {
            let i = (y as usize * self.width + x as usize) * 3;
            Some([self.pixels[i], self.pixels[i + 1], self.pixels[i + 2]])
        } else {
            None
        }
    }

    /// Bresenham line, 2 px thick.
    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), colour: [u8; 3]) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        loop {
            self.set(x, y, colour);
            self.set(x + 1, y, colour);
            self.set(x, y + 1, colour);
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    fn square(&mut self, (x, y): (i64, i64), r: i64, colour: [u8; 3]) {
        self.fill(x - r, y - r, 2 * r + 1, 2 * r + 1, colour);
    }

    fn fill(&mut self, x: i64, y: i64, w: i64, h: i64, colour: [u8; 3]) {
        for yy in y..y + h {
            for xx in x..x + w {
                self.set(xx, yy, colour);
            }
        }
    }

    /// 1 px rectangle outline.
    fn outline(&mut self, x: i64, y: i64, w: i64, h: i64, colour: [u8; 3]) {
        self.fill(x, y, w, 1, colour);
        self.fill(x, y + h - 1, w, 1, colour);
        self.fill(x, y, 1, h, colour);
        self.fill(x + w - 1, y, 1, h, colour);
    }

    /// Horizontal text with its top-left corner (cap height) at `(x, y)`.
    fn text(&mut self, x: i64, y: i64, s: &str, scale: i64, colour: [u8; 3]) {
        self.glyphs(s, scale, |gx, gy| (x + gx, y + gy), colour);
    }

    /// Text rotated 90° counter-clockwise (read bottom to top): the string starts at the
    /// bottom, `(x, y)` being the bottom-left corner of the first glyph's top row.
    fn text_up(&mut self, x: i64, y: i64, s: &str, scale: i64, colour: [u8; 3]) {
        self.glyphs(s, scale, |gx, gy| (x + gy, y - gx), colour);
    }

    /// Plots every ink pixel of `s` at `scale`, mapped from text coordinates (x right, y down,
    /// origin at the top-left of the first glyph) through `to_canvas`.
    fn glyphs(
        &mut self,
        s: &str,
        scale: i64,
        to_canvas: impl Fn(i64, i64) -> (i64, i64),
        colour: [u8; 3],
    ) {
        for (i, c) in s.chars().enumerate() {
            let origin = i as i64 * GLYPH_ADVANCE;
            for (row, bits) in glyph(c).split(' ').enumerate() {
                for (col, b) in bits.chars().enumerate() {
                    if b != '#' {
                        continue;
                    }
                    for sy in 0..scale {
                        for sx in 0..scale {
                            let (px, py) = to_canvas(
                                (origin + col as i64) * scale + sx,
                                row as i64 * scale + sy,
                            );
                            self.set(px, py, colour);
                        }
                    }
                }
            }
        }
    }
}

/// An axis: the value range it spans and the round values that get a grid line and label.
struct Axis {
    lo: f64,
    hi: f64,
    ticks: Vec<f64>,
    labels: Vec<String>,
}

/// Picks a round tick step (1, 2, 2.5 or 5 × 10^k) giving at most 6 ticks. When `fixed`, the
/// range stays `[min, max]`; otherwise each end snaps out to a tick when that adds at most 12%
/// of the data span, and gets a 4% margin when not.
fn axis(min: f64, max: f64, fixed: bool) -> Axis {
    let span = max - min;
    let magnitude = 10f64.powf(span.log10().floor());
    let mut chosen = None;
    'search: for exp in -2..=1 {
        for m in [1.0, 2.0, 2.5, 5.0] {
            let step = m * magnitude * 10f64.powi(exp);
            let (lo, hi) = if fixed {
                (min, max)
            } else {
                let (snap_lo, snap_hi) = ((min / step).floor() * step, (max / step).ceil() * step);
                (
                    if min - snap_lo <= 0.12 * span {
                        snap_lo
                    } else {
                        min - 0.04 * span
                    },
                    if snap_hi - max <= 0.12 * span {
                        snap_hi
                    } else {
                        max + 0.04 * span
                    },
                )
            };
            let first = (lo / step - 1e-9).ceil() as i64;
            let last = (hi / step + 1e-9).floor() as i64;
            chosen = Some((lo, hi, step, first, last));
            if last - first < 6 {
                break 'search;
            }
        }
    }
    let (lo, hi, step, first, last) = chosen.expect("at least one candidate step");
    let ticks: Vec<f64> = (first..=last).map(|k| k as f64 * step).collect();
    let labels = tick_labels(&ticks, step);
    Axis {
        lo,
        hi,
        ticks,
        labels,
    }
}

/// Tick labels with as many decimals as the step needs; values from 10^4 up are written with
/// a K/M/G suffix (1541923 → 1.5M when the step allows one decimal).
fn tick_labels(ticks: &[f64], step: f64) -> Vec<String> {
    let biggest = ticks.iter().fold(0f64, |a, t| a.max(t.abs()));
    let (div, suffix) = if biggest >= 1e9 {
        (1e9, "G")
    } else if biggest >= 1e6 {
        (1e6, "M")
    } else if biggest >= 1e4 {
        (1e3, "K")
    } else {
        (1.0, "")
    };
    let scaled = step / div;
    let decimals = (0..=6)
        .find(|&d| {
            let v = scaled * 10f64.powi(d);
            (v - v.round()).abs() < 1e-6 * v.abs().max(1.0)
        })
        .unwrap_or(6) as usize;
    ticks
        .iter()
        .map(|&t| {
            if t.abs() < step * 1e-9 {
                "0".to_string()
            } else {
                format!("{:.*}{suffix}", decimals, t / div)
            }
        })
        .collect()
}

fn finite_points(series: &[Series]) -> Vec<(f64, f64)> {
    series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .filter(|p| p.0.is_finite() && p.1.is_finite())
        .collect()
}

/// Draws `series` on shared axes (x over the data range, y over the data range or `y_range`
/// when given, ends rounded to a tick where that costs little space) with the words in `text`
/// and a legend, and writes a PNG of `WIDTH` x `HEIGHT` pixels.
pub fn line_chart(
    path: &Path,
    text: &ChartText,
    series: &[Series],
    y_range: Option<(f64, f64)>,
) -> anyhow::Result<()> {
    let canvas = render(text, series, y_range);
    let file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut encoder = png::Encoder::new(
        std::io::BufWriter::new(file),
        canvas.width as u32,
        canvas.height as u32,
    );
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header()?;
    writer.write_image_data(&canvas.pixels)?;
    Ok(())
}

fn render(text: &ChartText, series: &[Series], y_range: Option<(f64, f64)>) -> Canvas {
    let (width, height) = (WIDTH, HEIGHT);
    let mut canvas = Canvas::new(width, height);
    let all = finite_points(series);
    let (mut x_min, mut x_max) = all
        .iter()
        .fold((f64::MAX, f64::MIN), |a, p| (a.0.min(p.0), a.1.max(p.0)));
    let (mut y_min, mut y_max) = y_range.unwrap_or_else(|| {
        all.iter()
            .fold((f64::MAX, f64::MIN), |a, p| (a.0.min(p.1), a.1.max(p.1)))
    });
    if all.is_empty() {
        (x_min, x_max) = (0.0, 1.0);
        if y_range.is_none() {
            (y_min, y_max) = (0.0, 1.0);
        }
    }
    if x_max <= x_min {
        (x_min, x_max) = (x_min - 0.5, x_max + 0.5);
    }
    if y_max <= y_min {
        (y_min, y_max) = (y_min - 0.5, y_max + 0.5);
    }
    let xa = axis(x_min, x_max, false);
    let ya = axis(y_min, y_max, y_range.is_some());

    // Layout: title band on top, rotated y title and y tick labels on the left, x tick labels
    // and the x title below.
    let s = 2i64; // scale of axis titles, tick labels and legend
    let title_scale = if text_width(text.title, 3) <= width as i64 - 40 {
        3
    } else {
        2
    };
    let pad = 12i64;
    let tick_len = 6i64;
    let y_label_w = ya
        .labels
        .iter()
        .map(|l| text_width(l, s))
        .max()
        .unwrap_or(0);
    let left = pad + GLYPH_H * s + pad + y_label_w + tick_len + 6;
    let last_x_label = xa.labels.last().map_or(0, |l| text_width(l, s));
    let right = (last_x_label / 2 + pad).max(28);
    let top = pad + GLYPH_H * title_scale + pad;
    let bottom = tick_len + 6 + 7 * s + pad + GLYPH_H * s + pad;
    let plot_w = width as i64 - left - right;
    let plot_h = height as i64 - top - bottom;
    let to_px = |(x, y): (f64, f64)| -> (i64, i64) {
        let px = left + ((x - xa.lo) / (xa.hi - xa.lo) * plot_w as f64).round() as i64;
        let py = top + plot_h - ((y - ya.lo) / (ya.hi - ya.lo) * plot_h as f64).round() as i64;
        (px, py)
    };

    // Title, centred over the plot.
    let tw = text_width(text.title, title_scale);
    canvas.text(
        (left + (plot_w - tw) / 2).max(4),
        pad,
        text.title,
        title_scale,
        TEXT,
    );
    // Grid lines, tick marks and tick labels.
    for (t, label) in xa.ticks.iter().zip(&xa.labels) {
        let (gx, _) = to_px((*t, ya.lo));
        canvas.fill(gx, top, 1, plot_h, GRID);
        canvas.fill(gx, top + plot_h, 2, tick_len, TEXT);
        let lw = text_width(label, s);
        canvas.text(gx - lw / 2, top + plot_h + tick_len + 6, label, s, TEXT);
    }
    for (t, label) in ya.ticks.iter().zip(&ya.labels) {
        let (_, gy) = to_px((xa.lo, *t));
        canvas.fill(left, gy, plot_w, 1, GRID);
        canvas.fill(left - tick_len, gy, tick_len, 2, TEXT);
        let lw = text_width(label, s);
        canvas.text(left - tick_len - 6 - lw, gy - 7 * s / 2, label, s, TEXT);
    }
    // Axis titles: x centred below the tick labels, y rotated and centred along the y axis.
    let xw = text_width(text.x_label, s);
    canvas.text(
        left + (plot_w - xw) / 2,
        height as i64 - pad - GLYPH_H * s,
        text.x_label,
        s,
        TEXT,
    );
    let yw = text_width(text.y_label, s);
    canvas.text_up(pad, top + (plot_h + yw) / 2, text.y_label, s, TEXT);
    // Frame: axes in black, the other two sides in grey.
    canvas.fill(left, top, plot_w + 1, 1, FRAME);
    canvas.fill(left + plot_w, top, 1, plot_h + 1, FRAME);
    canvas.line(
        (left, top + plot_h),
        (left + plot_w, top + plot_h),
        [0, 0, 0],
    );
    canvas.line((left, top), (left, top + plot_h), [0, 0, 0]);

    for (i, s) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()].1;
        let pts: Vec<(i64, i64)> = s
            .points
            .iter()
            .copied()
            .filter(|p| p.0.is_finite() && p.1.is_finite())
            .map(to_px)
            .collect();
        for w in pts.windows(2) {
            canvas.line(w[0], w[1], colour);
        }
        if s.markers || pts.len() == 1 {
            for &p in &pts {
                canvas.square(p, 3, colour);
            }
        }
    }
    legend(&mut canvas, series, (left, top, plot_w, plot_h), s);
    canvas
}

/// A white legend box listing each series (swatch + name), placed where it covers the fewest
/// series pixels: a plot corner (top-right, top-left, bottom-right, bottom-left, preferred in
/// that order on ties) or, failing an empty corner, halfway up the right or left side.
fn legend(canvas: &mut Canvas, series: &[Series], plot: (i64, i64, i64, i64), scale: i64) {
    if series.is_empty() {
        return;
    }
    let (left, top, plot_w, plot_h) = plot;
    let (inner, swatch, gap, row_h) = (8 * scale / 2, 16 * scale, 5 * scale, 11 * scale);
    let name_w = series
        .iter()
        .map(|s| text_width(&s.name, scale))
        .max()
        .unwrap_or(0);
    let w = inner + swatch + gap + name_w + inner;
    let h = inner + row_h * series.len() as i64 - 2 * scale + inner;
    let inset = 10;
    let (x_right, x_left) = (left + plot_w - inset - w, left + inset);
    let (y_top, y_mid, y_bottom) = (
        top + inset,
        top + (plot_h - h) / 2,
        top + plot_h - inset - h,
    );
    let corners = [
        (x_right, y_top),
        (x_left, y_top),
        (x_right, y_bottom),
        (x_left, y_bottom),
        (x_right, y_mid),
        (x_left, y_mid),
    ];
    let colours: Vec<[u8; 3]> = (0..series.len())
        .map(|i| COLOURS[i % COLOURS.len()].1)
        .collect();
    let covered = |canvas: &Canvas, (x, y): (i64, i64)| -> usize {
        (y..y + h)
            .flat_map(|yy| (x..x + w).map(move |xx| (xx, yy)))
            .filter(|&(xx, yy)| canvas.get(xx, yy).is_some_and(|c| colours.contains(&c)))
            .count()
    };
    let (x, y) = corners
        .iter()
        .copied()
        .min_by_key(|&c| covered(canvas, c))
        .expect("candidate places");
    canvas.fill(x, y, w, h, [255, 255, 255]);
    canvas.outline(x, y, w, h, FRAME);
    for (i, s) in series.iter().enumerate() {
        let colour = colours[i];
        let row_top = y + inner + row_h * i as i64;
        let mid = row_top + 7 * scale / 2;
        canvas.fill(x + inner, mid - 1, swatch, 3, colour);
        if s.markers {
            canvas.square((x + inner + swatch / 2, mid), 3, colour);
        }
        canvas.text(x + inner + swatch + gap, row_top, &s.name, scale, TEXT);
    }
}

/// The axis ranges a chart of `series` uses, for the caption in report.md.
pub fn ranges(series: &[Series]) -> ((f64, f64), (f64, f64)) {
    let all = finite_points(series);
    let x = all
        .iter()
        .fold((f64::MAX, f64::MIN), |a, p| (a.0.min(p.0), a.1.max(p.0)));
    let y = all
        .iter()
        .fold((f64::MAX, f64::MIN), |a, p| (a.0.min(p.1), a.1.max(p.1)));
    (x, y)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(path: &Path) -> (usize, usize, Vec<u8>) {
        let decoder =
            png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!(info.color_type, png::ColorType::Rgb);
        buf.truncate(info.buffer_size());
        (info.width as usize, info.height as usize, buf)
    }

    /// Pixels in the rectangle `[x0, x1) x [y0, y1)` for which `pred` holds.
    fn count(
        img: &(usize, usize, Vec<u8>),
        (x0, x1, y0, y1): (usize, usize, usize, usize),
        pred: impl Fn([u8; 3]) -> bool,
    ) -> usize {
        let (w, _, px) = img;
        (y0..y1)
            .flat_map(|y| (x0..x1).map(move |x| (y * w + x) * 3))
            .filter(|&i| pred([px[i], px[i + 1], px[i + 2]]))
            .count()
    }

    #[test]
    fn chart_has_title_axis_labels_ticks_and_legend() {
        // Three series confined to the lower-left of the data range, so the legend goes to
        // the (otherwise empty) top-right corner.
        let series: Vec<Series> = (0..3)
            .map(|i| Series {
                name: format!("series {i}"),
                points: (0..20)
                    .map(|k| (k as f64 * 1000.0, 0.1 + 0.01 * i as f64))
                    .chain([(1_541_923.0, 0.12)])
                    .collect(),
                markers: i == 2,
            })
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chart.png");
        let text = ChartText {
            title: "Best-of-N accuracy vs verifier compute",
            x_label: "verifier tokens sampled",
            y_label: "accuracy",
        };
        line_chart(&path, &text, &series, Some((0.0, 1.0))).unwrap();
        let img = decode(&path);
        let (w, h) = (img.0, img.1);
        assert_eq!((w, h), (WIDTH, HEIGHT));
        let dark = |c: [u8; 3]| c.iter().all(|&v| v < 80);
        // Title band (above the plot frame).
        assert!(count(&img, (0, w, 0, 40), dark) > 200, "no title text");
        // x-axis title at the very bottom, below the tick labels.
        assert!(
            count(&img, (0, w, h - 30, h), dark) > 100,
            "no x-axis title"
        );
        // Rotated y-axis title in the leftmost strip.
        assert!(count(&img, (0, 32, 0, h), dark) > 60, "no y-axis title");
        // Tick labels: the strip between the axis title and the y axis, and below the x axis.
        assert!(
            count(&img, (40, 90, 60, h - 80), dark) > 60,
            "no y tick labels"
        );
        assert!(
            count(&img, (120, w, h - 60, h - 32), dark) > 60,
            "no x tick labels"
        );
        // Legend in the top-right quarter of the plot: a swatch of every series colour and
        // dark name text, where the data itself never goes.
        let legend_area = (w / 2, w, 40, h / 2);
        for (_, colour) in COLOURS.iter().take(3) {
            assert!(
                count(&img, legend_area, |c| c == *colour) >= 30,
                "legend swatch of colour {colour:?} missing"
            );
        }
        assert!(count(&img, legend_area, dark) > 150, "no legend names");
    }

    #[test]
    fn legend_moves_away_from_the_data() {
        // Curves along the top of a 0-1 axis: the legend must go to the lower half of the plot.
        let series: Vec<Series> = (0..2)
            .map(|i| Series {
                name: format!("high {i}"),
                points: (0..=10)
                    .map(|k| (k as f64, 0.9 + 0.02 * i as f64))
                    .collect(),
                markers: true,
            })
            .collect();
        let text = ChartText {
            title: "t",
            x_label: "x",
            y_label: "y",
        };
        let canvas = render(&text, &series, Some((0.0, 1.0)));
        let rows = |y0: i64, y1: i64, colour: [u8; 3]| {
            (y0..y1)
                .flat_map(|y| (0..WIDTH as i64).map(move |x| (x, y)))
                .filter(|&(x, y)| canvas.get(x, y) == Some(colour))
                .count()
        };
        let (mid, bottom) = (HEIGHT as i64 / 2, HEIGHT as i64 - 70);
        for (_, colour) in COLOURS.iter().take(2) {
            assert!(
                rows(mid, bottom, *colour) >= 30,
                "no swatch of {colour:?} low down"
            );
        }
    }

    #[test]
    fn font_covers_the_characters_used_and_glyphs_are_well_formed() {
        let needed = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ .,-+()=:/%_";
        for c in needed.chars() {
            assert!(FONT.iter().any(|(g, _)| *g == c), "no glyph for {c:?}");
        }
        for (c, rows) in FONT {
            let rows: Vec<&str> = rows.split(' ').collect();
            assert!(
                (7..=GLYPH_H as usize).contains(&rows.len()),
                "{c:?}: {} rows",
                rows.len()
            );
            for r in &rows {
                assert_eq!(r.len(), GLYPH_W as usize, "{c:?}: row {r:?}");
                assert!(r.chars().all(|b| b == '#' || b == '.'), "{c:?}: row {r:?}");
            }
            assert_eq!(*c == ' ', !rows.concat().contains('#'), "{c:?}: ink");
        }
        for (i, (a, ga)) in FONT.iter().enumerate() {
            for (b, gb) in &FONT[i + 1..] {
                assert!(a != b && ga != gb, "{a:?} and {b:?} collide");
            }
        }
    }

    #[test]
    fn ticks_are_round_and_compact() {
        let a = axis(0.0, 1.0, true);
        assert_eq!(a.labels, ["0", "0.2", "0.4", "0.6", "0.8", "1.0"]);
        assert_eq!((a.lo, a.hi), (0.0, 1.0));
        let a = axis(35_000.0, 1_541_923.0, false);
        assert_eq!(a.labels, ["0", "0.5M", "1.0M", "1.5M"]);
        assert!(a.hi > 1_541_923.0 && a.lo == 0.0);
        let a = axis(0.0, 1200.0, false);
        assert_eq!(a.labels, ["0", "250", "500", "750", "1000", "1250"]);
        let a = axis(0.42, 4.37, false);
        assert!((4..=6).contains(&a.ticks.len()), "{:?}", a.labels);
        assert!(a.lo <= 0.42 && a.hi >= 4.37);
        for n in [3.0, 17.0, 123.0, 9_999.0, 250_000.0, 3e7] {
            let a = axis(0.0, n, false);
            assert!((4..=6).contains(&a.ticks.len()), "{n}: {:?}", a.labels);
        }
        assert_eq!(
            tick_labels(&[0.0, 20_000.0, 40_000.0], 20_000.0),
            ["0", "20K", "40K"]
        );
    }
}
