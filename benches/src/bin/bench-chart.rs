//! `bench-chart`: draws the PNG charts of a `tools/bench.sh` run from its
//! `results.json`.
//!
//! ```text
//! cargo run --release -p benches --bin bench-chart -- target/bench/20260101-120000
//! ```
//!
//! Writes into the same folder, for what the run measured:
//!
//! - `echo-msgs.png`: echoes per second, one panel per (connections, in flight), bars
//!   grouped by payload size, one bar per server;
//! - `echo-cpu.png`: the server's CPU time per message (µs), laid out the same way;
//! - `echo-floors.png` (with a floor in the run): kythera's CPU per message over the
//!   floors', laid out the same way, with issue 18's goal (1.15) drawn across;
//! - `memory.png`: the server's resident memory per idle connection (bytes), grouped by
//!   connection count;
//! - `handshakes.png`: handshakes per second per server.
//!
//! Text is drawn with DejaVu Sans from the `dejavu` crate through plotters' `ab_glyph`
//! backend, so no system fonts (fontconfig, freetype) are needed.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::FontStyle;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde_json::Value;

type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;
type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// Series colours, in the order of the servers (kythera first in a default run).
const COLORS: [RGBColor; 8] = [
    RGBColor(214, 96, 39),
    RGBColor(49, 110, 181),
    RGBColor(90, 160, 80),
    RGBColor(150, 100, 180),
    RGBColor(200, 170, 40),
    RGBColor(100, 100, 100),
    RGBColor(40, 170, 170),
    RGBColor(180, 60, 120),
];

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let (Some(dir), None) = (args.next(), args.next()) else {
        eprintln!("usage: bench-chart OUT_DIR   (the folder with tools/bench.sh's results.json)");
        return ExitCode::from(2);
    };
    match run(Path::new(&dir)) {
        Ok(written) => {
            for p in written {
                eprintln!("bench-chart: wrote {}", p.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("bench-chart: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(dir: &Path) -> Res<Vec<PathBuf>> {
    plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular())
        .map_err(|_| "the embedded DejaVu Sans font does not load")?;
    let path = dir.join("results.json");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let results: Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let servers: Vec<String> = results["meta"]["servers"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    let subtitle = subtitle(&results);
    let mut written = Vec::new();

    let echo = rows(&results, "echo");
    if !echo.is_empty() {
        for (file, key, title, y) in [
            (
                "echo-msgs.png",
                "messages_per_sec",
                "Echo: messages per second (higher is better)",
                "messages/s",
            ),
            (
                "echo-cpu.png",
                "server_cpu_us_per_msg",
                "Echo: server CPU time per message (lower is better)",
                "server CPU µs per message",
            ),
        ] {
            let out = dir.join(file);
            echo_chart(&out, &echo, &servers, key, title, y, &subtitle)?;
            written.push(out);
        }
    }

    let floors = rows(&results, "floors");
    if !floors.is_empty() {
        let out = dir.join("echo-floors.png");
        floors_chart(&out, &floors, &subtitle)?;
        written.push(out);
    }

    let memory = rows(&results, "memory");
    if !memory.is_empty() {
        let mut groups: Vec<String> = Vec::new();
        let mut series: Vec<String> = servers.clone();
        let mut cells = Vec::new();
        for m in &memory {
            let mut server = str_of(m, "server");
            let group = if server == "kythera-2shards" {
                // kythera's bar, in a group of its own.
                server = "kythera".into();
                format!(
                    "kythera --shards 2: {} of {} reached",
                    thousands(num(m, "established")),
                    thousands(num(m, "connections"))
                )
            } else {
                format!("{} idle connections", thousands(num(m, "connections")))
            };
            if !groups.contains(&group) {
                groups.push(group.clone());
            }
            if !series.contains(&server) {
                series.push(server.clone());
            }
            cells.push((group, server, m["bytes_per_connection"].as_f64()));
        }
        let out = dir.join("memory.png");
        draw_memory(&out, &groups, &series, &cells, &subtitle)?;
        written.push(out);
    }

    let hs = rows(&results, "handshakes");
    if !hs.is_empty() {
        let series: Vec<String> = hs.iter().map(|h| str_of(h, "server")).collect();
        let groups = vec![format!(
            "{} connections per run",
            thousands(num(&hs[0], "connections"))
        )];
        let out = dir.join("handshakes.png");
        draw_handshakes(&out, &hs, &series, &groups, &subtitle)?;
        written.push(out);
    }
    Ok(written)
}

/// Memory per idle connection: groups of connection counts, a bar per server.
fn draw_memory(
    out: &Path,
    groups: &[String],
    series: &[String],
    cells: &[(String, String, Option<f64>)],
    subtitle: &str,
) -> Res<()> {
    let root = BitMapBackend::new(
        &out,
        (
            200 + 130 * groups.len() as u32 * series.len().max(2) as u32,
            560,
        ),
    )
    .into_drawing_area();
    root.fill(&WHITE)?;
    let area = titled(
        &root,
        "Server memory per idle connection (lower is better)",
        subtitle,
    )?;
    grouped_bars(
        &area,
        "",
        "bytes per idle connection (VmRSS growth / N)",
        groups,
        series,
        |g, s| {
            cells
                .iter()
                .find(|(cg, cs, _)| cg == &groups[g] && cs == &series[s])
                .and_then(|c| c.2)
        },
        true,
        None,
    )?;
    root.present()?;
    Ok(())
}

/// Handshakes per second, a bar per server.
fn draw_handshakes(
    out: &Path,
    hs: &[Value],
    series: &[String],
    groups: &[String],
    subtitle: &str,
) -> Res<()> {
    let root = BitMapBackend::new(&out, (300 + 160 * series.len() as u32, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let area = titled(&root, "Handshakes per second (higher is better)", subtitle)?;
    grouped_bars(
        &area,
        "",
        "handshakes/s",
        groups,
        series,
        |_, s| hs[s]["handshakes_per_sec"].as_f64(),
        true,
        None,
    )?;
    root.present()?;
    Ok(())
}

fn rows(results: &Value, key: &str) -> Vec<Value> {
    results[key].as_array().cloned().unwrap_or_default()
}

fn num(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or(0)
}

fn str_of(v: &Value, key: &str) -> String {
    v[key].as_str().unwrap_or("?").to_string()
}

/// The line under every chart's title: machine, commit, date.
fn subtitle(results: &Value) -> String {
    let m = &results["meta"];
    let s = |k: &str| m[k].as_str().unwrap_or("?").to_string();
    format!(
        "{}, {} CPUs, Linux {}; kythera {}{}; {}",
        s("cpu"),
        m["cpus"].as_u64().unwrap_or(0),
        s("kernel"),
        s("commit"),
        if m["dirty"].as_bool() == Some(true) {
            " (dirty)"
        } else {
            ""
        },
        s("date")
    )
}

fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn size_label(b: u64) -> String {
    if b >= 1024 && b.is_multiple_of(1024) {
        format!("{} KiB", b / 1024)
    } else {
        format!("{b} B")
    }
}

/// A compact value for a bar's top: 123k, 4.56, 1.2M.
fn short(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if v >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// Fills the title and subtitle in; returns the area under them.
fn titled<'a>(root: &Area<'a>, title: &str, subtitle: &str) -> Res<Area<'a>> {
    let (top, rest) = root.split_vertically(62);
    top.draw(&Text::new(
        title.to_string(),
        (16, 10),
        ("sans-serif", 24).into_font().color(&BLACK),
    ))?;
    top.draw(&Text::new(
        subtitle.to_string(),
        (16, 40),
        ("sans-serif", 14).into_font().color(&RGBColor(90, 90, 90)),
    ))?;
    Ok(rest)
}

/// The echo chart: a panel per (connections, in flight), size groups, server bars.
fn echo_chart(
    out: &Path,
    echo: &[Value],
    servers: &[String],
    key: &str,
    title: &str,
    y_desc: &str,
    subtitle: &str,
) -> Res<()> {
    let grid = Grid::of(echo);
    let mut series: Vec<String> = servers.to_vec();
    for e in echo {
        let s = str_of(e, "server");
        if !series.contains(&s) {
            series.push(s);
        }
    }
    series.retain(|s| echo.iter().any(|e| str_of(e, "server") == *s));
    grid.draw(
        out,
        series.len(),
        title,
        subtitle,
        |panel, c, p, caption, first| {
            grouped_bars(
                panel,
                caption,
                y_desc,
                &grid.groups(),
                &series,
                |g, s| {
                    let cell = echo.iter().filter(|e| str_of(e, "server") == series[s]);
                    grid.find(cell, c, p, g).and_then(|e| e[key].as_f64())
                },
                first,
                None,
            )
        },
    )
}

/// Server CPU per message over the floors' per cell: a panel per (connections, in
/// flight), size groups, a bar per ratio (paired where the run has it), the goal across.
fn floors_chart(out: &Path, floors: &[Value], subtitle: &str) -> Res<()> {
    let grid = Grid::of(floors);
    // (label, key, fallback key when the paired ratio is missing)
    let all = [
        (
            "kythera / uring-floor (paired)",
            "kythera_over_uring_floor_paired",
            "kythera_over_uring_floor",
        ),
        (
            "kythera-epoll / epoll-floor (paired)",
            "kythera_epoll_over_epoll_floor_paired",
            "kythera_epoll_over_epoll_floor",
        ),
        (
            "kythera / better floor (paired)",
            "kythera_over_best_floor_paired",
            "kythera_over_best_floor",
        ),
    ];
    let kinds: Vec<_> = all
        .iter()
        .filter(|(_, k, f)| floors.iter().any(|e| e[*k].is_f64() || e[*f].is_f64()))
        .collect();
    let series: Vec<String> = kinds.iter().map(|(l, _, _)| l.to_string()).collect();
    let title = "Echo: server CPU per message over the floor's (lower is better, 1 = the floor)";
    grid.draw(
        out,
        series.len(),
        title,
        subtitle,
        |panel, c, p, caption, first| {
            grouped_bars(
                panel,
                caption,
                "CPU per message / floor's",
                &grid.groups(),
                &series,
                |g, s| {
                    let (_, key, fallback) = kinds[s];
                    grid.find(floors, c, p, g)
                        .and_then(|e| e[*key].as_f64().or_else(|| e[*fallback].as_f64()))
                },
                first,
                Some((1.15, "goal: 1.15")),
            )
        },
    )
}

/// The cells of an echo matrix, in the order the run has them: a panel per
/// (connections, in flight), rows by connections, a group per payload size.
struct Grid {
    conns: Vec<u64>,
    inflight: Vec<u64>,
    sizes: Vec<u64>,
}

impl Grid {
    fn of(rows: &[Value]) -> Grid {
        let mut grid = Grid {
            conns: Vec::new(),
            inflight: Vec::new(),
            sizes: Vec::new(),
        };
        for e in rows {
            for (list, v) in [
                (&mut grid.conns, num(e, "connections")),
                (&mut grid.inflight, num(e, "in_flight")),
                (&mut grid.sizes, num(e, "bytes")),
            ] {
                if !list.contains(&v) {
                    list.push(v);
                }
            }
        }
        grid
    }

    fn groups(&self) -> Vec<String> {
        self.sizes.iter().map(|&b| size_label(b)).collect()
    }

    /// The row of `rows` for connections `c`, in flight `p` and the `g`th size.
    fn find<'a>(
        &self,
        rows: impl IntoIterator<Item = &'a Value>,
        c: u64,
        p: u64,
        g: usize,
    ) -> Option<&'a Value> {
        rows.into_iter().find(|e| {
            num(e, "connections") == c
                && num(e, "in_flight") == p
                && num(e, "bytes") == self.sizes[g]
        })
    }

    /// Draws the picture: the title, then `panel` for each cell with its caption
    /// (the first panel carries the legend); `bars`: bars per size group.
    fn draw(
        &self,
        out: &Path,
        bars: usize,
        title: &str,
        subtitle: &str,
        mut panel: impl FnMut(&Area<'_>, u64, u64, &str, bool) -> Res<()>,
    ) -> Res<()> {
        let min_w = if self.inflight.len() > 1 { 450 } else { 900 };
        let panel_w = (180 + 60 * (self.sizes.len() * bars) as u32).max(min_w);
        let panel_h = 380;
        let (cols, rows) = (self.inflight.len() as u32, self.conns.len() as u32);
        let root =
            BitMapBackend::new(out, (panel_w * cols, 62 + panel_h * rows)).into_drawing_area();
        root.fill(&WHITE)?;
        let area = titled(&root, title, subtitle)?;
        let panels = area.split_evenly((rows as usize, cols as usize));
        for (i, area) in panels.iter().enumerate() {
            let (c, p) = (
                self.conns[i / cols as usize],
                self.inflight[i % cols as usize],
            );
            let caption = format!("{} connections, {p} in flight", thousands(c));
            panel(area, c, p, &caption, i == 0)?;
        }
        root.present()?;
        Ok(())
    }
}

/// Bars: `groups` along x, one bar per series in each, the value on top.
// Every argument is a different part of the chart; a struct for them would only rename.
#[allow(clippy::too_many_arguments)]
fn grouped_bars(
    area: &Area<'_>,
    caption: &str,
    y_desc: &str,
    groups: &[String],
    series: &[String],
    value: impl Fn(usize, usize) -> Option<f64>,
    legend: bool,
    goal: Option<(f64, &str)>,
) -> Res<()> {
    // x in half-bar units: each bar is 2 wide, a group is the bars plus one bar of gap.
    let s_n = series.len() as i32;
    let width = 2 * (s_n + 1);
    let x_max = width * groups.len() as i32;
    let mut y_max: f64 = 0.0;
    for g in 0..groups.len() {
        for s in 0..series.len() {
            y_max = y_max.max(value(g, s).unwrap_or(0.0));
        }
    }
    // Headroom for the values on top of the bars, and the legend's box.
    let headroom = if legend { 1.4 } else { 1.18 };
    let y_max = goal.map_or(y_max, |(g, _)| y_max.max(g));
    let y_max = if y_max > 0.0 { y_max * headroom } else { 1.0 };
    // Ticks and labels only at the groups' centres.
    let centers: Vec<i32> = (0..groups.len() as i32)
        .map(|g| g * width + s_n + 1)
        .collect();
    let mut chart = ChartBuilder::on(area);
    chart.margin(12).x_label_area_size(36).y_label_area_size(80);
    if !caption.is_empty() {
        chart.caption(caption, ("sans-serif", 18));
    }
    let mut chart = chart.build_cartesian_2d((0..x_max).with_key_points(centers), 0f64..y_max)?;
    let label = |x: &i32| {
        let (g, off) = (x / width, x % width);
        if off == s_n + 1 && (g as usize) < groups.len() {
            groups[g as usize].clone()
        } else {
            String::new()
        }
    };
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_label_formatter(&label)
        .y_label_formatter(&|v| short(*v))
        .y_desc(y_desc)
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 14))
        .light_line_style(WHITE.mix(0.0))
        .bold_line_style(BLACK.mix(0.12))
        .draw()?;
    for (s, name) in series.iter().enumerate() {
        let color = COLORS[s % COLORS.len()];
        let bars: Vec<(i32, f64)> = (0..groups.len())
            .filter_map(|g| value(g, s).map(|v| (g as i32 * width + 1 + 2 * s as i32, v)))
            .collect();
        chart
            .draw_series(
                bars.iter()
                    .map(|&(x, v)| Rectangle::new([(x, 0.0), (x + 2, v)], color.filled())),
            )?
            .label(name.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.filled()));
        chart.draw_series(bars.iter().map(|&(x, v)| {
            Text::new(
                short(v),
                (x + 1, v + y_max * 0.01),
                ("sans-serif", 12)
                    .into_font()
                    .color(&BLACK)
                    .pos(Pos::new(HPos::Center, VPos::Bottom)),
            )
        }))?;
    }
    if let Some((g, label)) = goal {
        let red = RGBColor(200, 30, 30);
        chart.draw_series(std::iter::once(PathElement::new(
            vec![(0, g), (x_max, g)],
            red.stroke_width(2),
        )))?;
        chart.draw_series(std::iter::once(Text::new(
            label.to_string(),
            (1, g + y_max * 0.01),
            ("sans-serif", 12)
                .into_font()
                .color(&red)
                .pos(Pos::new(HPos::Left, VPos::Bottom)),
        )))?;
    }
    if legend {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK.mix(0.3))
            .label_font(("sans-serif", 14))
            .draw()?;
    }
    Ok(())
}
