//! Minimal PNG line charts for the quickstart report: axes, grid, one polyline (with point
//! markers) per series, drawn into an RGB buffer and encoded with the `png` crate. Labels and
//! legends live in report.md next to the image (colours are named there).

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

pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    pub markers: bool,
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
        for dx in -r..=r {
            for dy in -r..=r {
                self.set(x + dx, y + dy, colour);
            }
        }
    }
}

/// Draws `series` on shared axes (x from 0 or the data minimum, y over the data range with a
/// margin, or `y_range` when given) and writes a PNG.
pub fn line_chart(
    path: &Path,
    series: &[Series],
    y_range: Option<(f64, f64)>,
) -> anyhow::Result<()> {
    let (width, height) = (640usize, 400usize);
    let (left, right, top, bottom) = (50i64, 20i64, 20i64, 40i64);
    let mut canvas = Canvas::new(width, height);
    let all: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .filter(|p| p.0.is_finite() && p.1.is_finite())
        .collect();
    let (mut x_min, mut x_max) = all
        .iter()
        .fold((f64::MAX, f64::MIN), |a, p| (a.0.min(p.0), a.1.max(p.0)));
    let (mut y_min, mut y_max) = y_range.unwrap_or_else(|| {
        all.iter()
            .fold((f64::MAX, f64::MIN), |a, p| (a.0.min(p.1), a.1.max(p.1)))
    });
    if all.is_empty() {
        (x_min, x_max, y_min, y_max) = (0.0, 1.0, 0.0, 1.0);
    }
    if x_max <= x_min {
        x_max = x_min + 1.0;
    }
    if y_max <= y_min {
        y_max = y_min + 1.0;
    }
    let pad = (y_max - y_min) * 0.05;
    let (y_min, y_max) = if y_range.is_some() {
        (y_min, y_max)
    } else {
        (y_min - pad, y_max + pad)
    };
    let plot_w = width as i64 - left - right;
    let plot_h = height as i64 - top - bottom;
    let to_px = |(x, y): (f64, f64)| -> (i64, i64) {
        let px = left + ((x - x_min) / (x_max - x_min) * plot_w as f64).round() as i64;
        let py = top + plot_h - ((y - y_min) / (y_max - y_min) * plot_h as f64).round() as i64;
        (px, py)
    };
    // Grid: 5 horizontal and 5 vertical lines, then the axes.
    for i in 0..=5 {
        let gy = top + plot_h * i / 5;
        let gx = left + plot_w * i / 5;
        canvas.line((left, gy), (left + plot_w, gy), [225, 225, 225]);
        canvas.line((gx, top), (gx, top + plot_h), [225, 225, 225]);
    }
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
    let file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), width as u32, height as u32);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header()?;
    writer.write_image_data(&canvas.pixels)?;
    Ok(())
}

/// The axis ranges a chart of `series` uses, for the caption in report.md.
pub fn ranges(series: &[Series]) -> ((f64, f64), (f64, f64)) {
    let all: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .filter(|p| p.0.is_finite() && p.1.is_finite())
        .collect();
    let x = all
        .iter()
        .fold((f64::MAX, f64::MIN), |a, p| (a.0.min(p.0), a.1.max(p.0)));
    let y = all
        .iter()
        .fold((f64::MAX, f64::MIN), |a, p| (a.0.min(p.1), a.1.max(p.1)));
    (x, y)
}
