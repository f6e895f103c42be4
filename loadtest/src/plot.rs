//! Line charts as PNG, with nothing but the `png` encoder: a small RGB canvas, lines, markers and
//! a built-in 5×7 pixel font (digits, capitals, a little punctuation; lower case is drawn as
//! capitals). Enough for a delivery curve and a scaling curve, without a font file or a plotting
//! library's dependency tree.

use std::io::BufWriter;
use std::path::Path;

/// Size of one chart panel; several panels are stacked vertically.
const PANEL_WIDTH: usize = 960;
const PANEL_HEIGHT: usize = 460;
/// Room for the title (top), tick labels and axis title (left, bottom).
const MARGIN_LEFT: usize = 110;
const MARGIN_RIGHT: usize = 30;
const MARGIN_TOP: usize = 50;
const MARGIN_BOTTOM: usize = 70;
/// Font glyphs are 5×7 cells drawn at this scale, one blank column between glyphs.
const FONT_SCALE: usize = 2;
const GLYPH_ADVANCE: usize = 6 * FONT_SCALE;

const WHITE: [u8; 3] = [255, 255, 255];
const BLACK: [u8; 3] = [20, 20, 20];
const GRID: [u8; 3] = [225, 225, 225];
/// Series colours, in order.
pub const PALETTE: [[u8; 3]; 8] = [
    [31, 119, 180],
    [214, 39, 40],
    [44, 160, 44],
    [148, 103, 189],
    [255, 127, 14],
    [140, 86, 75],
    [23, 190, 207],
    [127, 127, 127],
];

/// One line of a chart.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// One panel: axes from zero to the largest value, one line per series.
#[derive(Debug, Clone)]
pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
    /// Draw a square at every point (for sweeps with few points).
    pub markers: bool,
}

struct Canvas {
    width: usize,
    height: usize,
    pixels: Vec<u8>,
}

impl Canvas {
    fn new(width: usize, height: usize) -> Self {
        Self { width, height, pixels: WHITE.iter().copied().cycle().take(width * height * 3).collect() }
    }

    fn put(&mut self, x: i64, y: i64, color: [u8; 3]) {
        if x < 0 || y < 0 || x as usize >= self.width || y as usize >= self.height {
            return;
        }
        let i = (y as usize * self.width + x as usize) * 3;
        self.pixels[i..i + 3].copy_from_slice(&color);
    }

    fn rect(&mut self, x: i64, y: i64, w: i64, h: i64, color: [u8; 3]) {
        for dy in 0..h {
            for dx in 0..w {
                self.put(x + dx, y + dy, color);
            }
        }
    }

    /// Bresenham, `thickness` pixels wide.
    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), thickness: i64, color: [u8; 3]) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        loop {
            self.rect(x - thickness / 2, y - thickness / 2, thickness, thickness, color);
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

    fn text(&mut self, x: i64, y: i64, text: &str, color: [u8; 3]) {
        for (i, c) in text.chars().enumerate() {
            let rows = glyph(c);
            for (row, bits) in rows.iter().enumerate() {
                for col in 0..5 {
                    if bits & (0x10 >> col) != 0 {
                        let s = FONT_SCALE as i64;
                        self.rect(x + (i * GLYPH_ADVANCE) as i64 + col * s, y + row as i64 * s, s, s, color);
                    }
                }
            }
        }
    }

    /// Text rotated a quarter turn anticlockwise (reads bottom to top), for the y axis title.
    fn text_vertical(&mut self, x: i64, y_bottom: i64, text: &str, color: [u8; 3]) {
        for (i, c) in text.chars().enumerate() {
            for (row, bits) in glyph(c).iter().enumerate() {
                for col in 0..5 {
                    if bits & (0x10 >> col) != 0 {
                        let s = FONT_SCALE as i64;
                        let px = x + row as i64 * s;
                        let py = y_bottom - (i * GLYPH_ADVANCE) as i64 - col * s;
                        self.rect(px, py, s, s, color);
                    }
                }
            }
        }
    }
}

fn text_width(text: &str) -> i64 {
    (text.chars().count() * GLYPH_ADVANCE) as i64
}

/// A round tick step giving about five ticks up to `max`.
fn tick_step(max: f64) -> f64 {
    if max <= 0.0 || !max.is_finite() {
        return 1.0;
    }
    let raw = max / 5.0;
    let magnitude = 10f64.powf(raw.log10().floor());
    let unit = raw / magnitude;
    let nice = if unit <= 1.0 {
        1.0
    } else if unit <= 2.0 {
        2.0
    } else if unit <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * magnitude
}

fn tick_label(value: f64, step: f64) -> String {
    if step >= 1.0 {
        format!("{value:.0}")
    } else {
        let decimals = (-step.log10().floor()) as usize;
        format!("{value:.decimals$}")
    }
}

fn draw_chart(canvas: &mut Canvas, top: usize, chart: &Chart) {
    let (left, right) = (MARGIN_LEFT as i64, (PANEL_WIDTH - MARGIN_RIGHT) as i64);
    let (plot_top, bottom) = ((top + MARGIN_TOP) as i64, (top + PANEL_HEIGHT - MARGIN_BOTTOM) as i64);
    let points = chart.series.iter().flat_map(|s| s.points.iter());
    let x_max = points.clone().map(|p| p.0).fold(0.0, f64::max);
    let y_max = points.map(|p| p.1).fold(0.0, f64::max);
    let (x_step, y_step) = (tick_step(x_max), tick_step(y_max));
    let x_top = (x_max / x_step).ceil().max(1.0) * x_step;
    let y_top = (y_max / y_step).ceil().max(1.0) * y_step;
    let to_px = |(x, y): (f64, f64)| -> (i64, i64) {
        let px = left as f64 + x / x_top * (right - left) as f64;
        let py = bottom as f64 - y / y_top * (bottom - plot_top) as f64;
        (px.round() as i64, py.round() as i64)
    };
    canvas.text(left, top as i64 + 14, &chart.title, BLACK);
    let mut tick = 0.0;
    while tick <= y_top + y_step / 2.0 {
        let (_, py) = to_px((0.0, tick));
        canvas.line((left, py), (right, py), 1, GRID);
        let label = tick_label(tick, y_step);
        canvas.text(left - 10 - text_width(&label), py - 7, &label, BLACK);
        tick += y_step;
    }
    let mut tick = 0.0;
    while tick <= x_top + x_step / 2.0 {
        let (px, _) = to_px((tick, 0.0));
        canvas.line((px, plot_top), (px, bottom), 1, GRID);
        let label = tick_label(tick, x_step);
        canvas.text(px - text_width(&label) / 2, bottom + 10, &label, BLACK);
        tick += x_step;
    }
    canvas.line((left, plot_top), (left, bottom), 2, BLACK);
    canvas.line((left, bottom), (right, bottom), 2, BLACK);
    canvas.text((left + right) / 2 - text_width(&chart.x_label) / 2, bottom + 38, &chart.x_label, BLACK);
    canvas.text_vertical(14, (plot_top + bottom) / 2 + text_width(&chart.y_label) / 2, &chart.y_label, BLACK);
    for (i, series) in chart.series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let mut sorted = series.points.clone();
        sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
        for pair in sorted.windows(2) {
            canvas.line(to_px(pair[0]), to_px(pair[1]), 3, color);
        }
        if chart.markers || sorted.len() == 1 {
            for p in &sorted {
                let (px, py) = to_px(*p);
                canvas.rect(px - 4, py - 4, 9, 9, color);
            }
        }
        let legend_y = plot_top + 8 + i as i64 * 22;
        canvas.rect(left + 16, legend_y + 3, 24, 8, color);
        canvas.text(left + 48, legend_y, &series.name, BLACK);
    }
}

/// Draws `charts` one under the other into a PNG file.
pub fn write_png(path: &Path, charts: &[Chart]) -> std::io::Result<()> {
    let mut canvas = Canvas::new(PANEL_WIDTH, PANEL_HEIGHT * charts.len().max(1));
    for (i, chart) in charts.iter().enumerate() {
        draw_chart(&mut canvas, i * PANEL_HEIGHT, chart);
    }
    let file = std::fs::File::create(path)?;
    let mut encoder = png::Encoder::new(BufWriter::new(file), canvas.width as u32, canvas.height as u32);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().map_err(std::io::Error::other)?;
    writer.write_image_data(&canvas.pixels).map_err(std::io::Error::other)?;
    writer.finish().map_err(std::io::Error::other)
}

/// The 5×7 glyph of `c`: seven rows, bit 4 the leftmost column. Unknown characters are blank.
fn glyph(c: char) -> [u8; 7] {
    match c.to_ascii_uppercase() {
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        'A' => [0x0E, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'B' => [0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E],
        'C' => [0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E],
        'D' => [0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C],
        'E' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F],
        'F' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10],
        'G' => [0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F],
        'H' => [0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'I' => [0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'J' => [0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C],
        'K' => [0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11],
        'L' => [0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F],
        'M' => [0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11],
        'N' => [0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11],
        'O' => [0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'P' => [0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10],
        'Q' => [0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D],
        'R' => [0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11],
        'S' => [0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E],
        'T' => [0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04],
        'U' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'V' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04],
        'W' => [0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A],
        'X' => [0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11],
        'Y' => [0x11, 0x11, 0x11, 0x0A, 0x04, 0x04, 0x04],
        'Z' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F],
        '.' => [0x00, 0x00, 0x00, 0x00, 0x00, 0x0C, 0x0C],
        ',' => [0x00, 0x00, 0x00, 0x00, 0x0C, 0x04, 0x08],
        '-' => [0x00, 0x00, 0x00, 0x1F, 0x00, 0x00, 0x00],
        '+' => [0x00, 0x04, 0x04, 0x1F, 0x04, 0x04, 0x00],
        '=' => [0x00, 0x00, 0x1F, 0x00, 0x1F, 0x00, 0x00],
        '(' => [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02],
        ')' => [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08],
        '/' => [0x01, 0x01, 0x02, 0x04, 0x08, 0x10, 0x10],
        ':' => [0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x0C, 0x00],
        '%' => [0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03],
        '_' => [0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x1F],
        '|' => [0x04, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04],
        _ => [0; 7],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_steps_are_round() {
        assert_eq!(tick_step(19_000.0), 5_000.0);
        assert_eq!(tick_step(4.2), 1.0);
        assert_eq!(tick_step(0.3), 0.1);
        assert_eq!(tick_step(0.0), 1.0);
    }

    #[test]
    fn a_chart_is_written_as_a_png_of_the_panel_size() {
        let path = std::env::temp_dir().join(format!("rki-plot-test-{}.png", std::process::id()));
        let chart = Chart {
            title: "Acked devices".into(),
            x_label: "seconds".into(),
            y_label: "devices".into(),
            series: vec![Series { name: "rki-gateway".into(), points: vec![(0.0, 0.0), (1.5, 900.0), (2.0, 1000.0)] }],
            markers: false,
        };
        write_png(&path, &[chart.clone(), chart]).expect("png");
        let bytes = std::fs::read(&path).expect("read");
        let _ = std::fs::remove_file(&path);
        assert_eq!(&bytes[1..4], b"PNG");
        let height = u32::from_be_bytes([bytes[20], bytes[21], bytes[22], bytes[23]]);
        assert_eq!(height as usize, 2 * PANEL_HEIGHT);
    }
}
