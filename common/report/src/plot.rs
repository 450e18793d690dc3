//! The plot list of each stage, and the drawing of one plot to an SVG string.
//!
//! Every SVG's root element carries `data-plot` (the file stem) and
//! `data-points` (`METRIC=COUNT;...`, the number of points drawn per
//! series), so tests and scripts can check a plot without parsing paths.

use plotters::prelude::*;
use troupe_wire::Stage;

use crate::error::ReportError;
use crate::progress::JobHistory;
use crate::text::{escape_xml, format_number};

/// Size of each plot in pixels.
const PLOT_SIZE: (u32, u32) = (720, 400);

/// Series with at most this many points get a marker at every point, so
/// sparse evaluations and single points stay visible.
const MAX_POINTS_WITH_MARKERS: usize = 25;

/// Line colors in drawing order (the "tab10" palette of matplotlib).
const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// One line of a plot: the first metric of `metrics` that the job reported.
struct SeriesSpec {
    metrics: &'static [&'static str],
    label: &'static str,
}

/// One plot of a stage.
struct PlotSpec {
    /// File stem, such as `loss`; the file is `<stage>-<stem>.svg`.
    stem: &'static str,
    title: &'static str,
    y_label: &'static str,
    series: &'static [SeriesSpec],
    /// Also draw every metric named `<prefix>NAME<suffix>`, labelled NAME.
    matching: Option<(&'static str, &'static str)>,
    /// Keep 0 and 1 in the y range, for rates and accuracies.
    unit_range: bool,
}

const fn series(metrics: &'static [&'static str], label: &'static str) -> SeriesSpec {
    SeriesSpec { metrics, label }
}

const fn plot(
    stem: &'static str,
    title: &'static str,
    y_label: &'static str,
    series: &'static [SeriesSpec],
) -> PlotSpec {
    PlotSpec {
        stem,
        title,
        y_label,
        series,
        matching: None,
        unit_range: false,
    }
}

// The trainers publish the step loss twice, as `loss` (from the shared step
// reporter) and as `train_loss`; either draws the training curve.
const TRAIN_LOSS: &[&str] = &["train_loss", "loss"];

const LANGUAGE_MODEL_PLOTS: &[PlotSpec] = &[
    plot(
        "loss",
        "training and held-out loss",
        "loss (nats/token)",
        &[
            series(TRAIN_LOSS, "train"),
            series(&["heldout_loss"], "held-out"),
        ],
    ),
    plot(
        "lr",
        "learning rate",
        "learning rate",
        &[series(&["lr"], "lr")],
    ),
    plot(
        "grad-norm",
        "gradient norm",
        "global gradient norm",
        &[series(&["grad_norm"], "grad_norm")],
    ),
    plot(
        "throughput",
        "throughput",
        "tokens/s",
        &[series(&["tokens_per_s"], "tokens_per_s")],
    ),
    PlotSpec {
        unit_range: true,
        ..plot(
            "eos-rate",
            "EOS rate on held-out prompts",
            "share ending in EOS",
            &[series(&["eos_rate"], "eos_rate")],
        )
    },
];

const REWARD_MODEL_PLOTS: &[PlotSpec] = &[
    plot(
        "loss",
        "training and held-out loss",
        "pairwise loss (nats)",
        &[
            series(TRAIN_LOSS, "train"),
            series(&["heldout_loss"], "held-out"),
        ],
    ),
    PlotSpec {
        matching: Some(("eval/", "/accuracy")),
        unit_range: true,
        ..plot(
            "accuracy",
            "held-out pairwise accuracy",
            "accuracy (chosen scored higher)",
            &[series(&["heldout_accuracy"], "held-out")],
        )
    },
    plot(
        "lr",
        "learning rate",
        "learning rate",
        &[series(&["lr"], "lr")],
    ),
    plot(
        "grad-norm",
        "gradient norm",
        "global gradient norm",
        &[series(&["grad_norm"], "grad_norm")],
    ),
];

const PPO_PLOTS: &[PlotSpec] = &[
    plot(
        "reward",
        "reward",
        "mean reward per rollout",
        &[
            series(&["reward"], "reward (normalized)"),
            series(&["reward_raw"], "reward_raw"),
        ],
    ),
    plot(
        "kl",
        "KL divergence to the reference",
        "KL per sequence (nats)",
        &[
            series(&["kl"], "kl (penalized)"),
            series(&["kl_k1"], "kl_k1"),
            series(&["kl_k3"], "kl_k3"),
        ],
    ),
    plot(
        "kl-coef",
        "KL coefficient",
        "KL coefficient",
        &[series(&["kl_coef"], "kl_coef")],
    ),
    plot(
        "response-length",
        "response length",
        "tokens per response",
        &[series(&["response_length"], "response_length")],
    ),
    PlotSpec {
        unit_range: true,
        ..plot(
            "eos-rate",
            "EOS rate",
            "share of responses ending in EOS",
            &[series(&["eos_rate"], "eos_rate")],
        )
    },
    plot(
        "policy-update",
        "clip fraction and approximate KL",
        "value",
        &[
            series(&["clip_fraction"], "clip_fraction"),
            series(&["approx_kl"], "approx_kl"),
        ],
    ),
    plot(
        "entropy",
        "policy entropy",
        "nats per response token",
        &[series(&["entropy"], "entropy")],
    ),
    plot(
        "value-loss",
        "value loss",
        "value loss",
        &[series(&["value_loss"], "value_loss")],
    ),
    plot(
        "explained-variance",
        "value explained variance",
        "explained variance",
        &[series(&["explained_variance"], "explained_variance")],
    ),
    plot(
        "grad-norm",
        "gradient norm",
        "global gradient norm",
        &[series(&["grad_norm"], "grad_norm")],
    ),
];

fn plot_specs(stage: Stage) -> &'static [PlotSpec] {
    match stage {
        Stage::Pretrain | Stage::Sft => LANGUAGE_MODEL_PLOTS,
        Stage::RewardModel => REWARD_MODEL_PLOTS,
        Stage::Ppo => PPO_PLOTS,
    }
}

/// Returns the display name of a stage.
pub(crate) fn stage_title(stage: Stage) -> &'static str {
    match stage {
        Stage::Pretrain => "Pretraining",
        Stage::Sft => "Supervised fine-tuning",
        Stage::RewardModel => "Reward model",
        Stage::Ppo => "PPO",
    }
}

/// A rendered plot.
#[derive(Clone, Debug)]
pub(crate) struct Plot {
    pub file_name: String,
    pub svg: String,
}

/// A line to draw, resolved from the job's metrics.
struct Line<'a> {
    metric: &'a str,
    label: String,
    points: &'a [(u64, f64)],
}

/// Draws every plot of the job that has data. A plot is drawn only when one
/// of its lines has at least two points, because a lone value reads better
/// in the table of final numbers than in a chart.
pub(crate) fn render_job_plots(
    job: &JobHistory,
    file_prefix: &str,
) -> Result<Vec<Plot>, ReportError> {
    let mut plots = Vec::new();
    for spec in plot_specs(job.stage) {
        let lines = resolve_lines(job, spec);
        if !lines.iter().any(|line| line.points.len() >= 2) {
            continue;
        }
        let file_name = format!("{file_prefix}-{}.svg", spec.stem);
        let title = format!("{}: {}", stage_title(job.stage), spec.title);
        let svg = draw_svg(&file_name, &title, spec, &lines)?;
        plots.push(Plot { file_name, svg });
    }
    Ok(plots)
}

fn resolve_lines<'a>(job: &'a JobHistory, spec: &PlotSpec) -> Vec<Line<'a>> {
    let mut lines: Vec<Line<'a>> = spec
        .series
        .iter()
        .filter_map(|series| {
            let (metric, points) = job.first_series(series.metrics)?;
            Some(Line {
                metric,
                label: series.label.to_string(),
                points,
            })
        })
        .collect();
    if let Some((prefix, suffix)) = spec.matching {
        for (metric, points) in &job.series {
            let Some(name) = metric
                .strip_prefix(prefix)
                .and_then(|rest| rest.strip_suffix(suffix))
            else {
                continue;
            };
            if !points.is_empty() {
                lines.push(Line {
                    metric,
                    label: name.to_string(),
                    points,
                });
            }
        }
    }
    lines
}

fn draw_svg(
    file_name: &str,
    title: &str,
    spec: &PlotSpec,
    lines: &[Line<'_>],
) -> Result<String, ReportError> {
    let draw_error = |error: &dyn std::fmt::Display| ReportError::Draw {
        plot: file_name.to_string(),
        reason: error.to_string(),
    };

    let (x_range, y_range) = axis_ranges(lines, spec.unit_range);
    // Tick values are computed in floating point, so the tick at zero can come
    // out as a residue such as -2.2e-16; anything that small reads as 0.
    let zero_below = (y_range.end - y_range.start) * 1e-9;
    let format_tick = |value: &f64| {
        format_number(if value.abs() < zero_below {
            0.0
        } else {
            *value
        })
    };
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, PLOT_SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(|e| draw_error(&e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(14)
            .x_label_area_size(44)
            .y_label_area_size(72)
            .build_cartesian_2d(x_range, y_range)
            .map_err(|e| draw_error(&e))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc(spec.y_label)
            .y_label_formatter(&format_tick)
            .label_style(("sans-serif", 13))
            .axis_desc_style(("sans-serif", 15))
            .light_line_style(RGBColor(238, 238, 238))
            .bold_line_style(RGBColor(215, 215, 215))
            .draw()
            .map_err(|e| draw_error(&e))?;

        for (index, line) in lines.iter().enumerate() {
            let color = PALETTE[index % PALETTE.len()];
            let marker_size = if line.points.len() <= MAX_POINTS_WITH_MARKERS {
                3
            } else {
                0
            };
            let style = ShapeStyle::from(color).stroke_width(2);
            chart
                .draw_series(
                    LineSeries::new(line.points.iter().copied(), style).point_size(marker_size),
                )
                .map_err(|e| draw_error(&e))?
                .label(line.label.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                });
        }

        chart
            .configure_series_labels()
            .position(legend_position(lines))
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(200, 200, 200))
            .label_font(("sans-serif", 13))
            .draw()
            .map_err(|e| draw_error(&e))?;
        root.present().map_err(|e| draw_error(&e))?;
    }
    Ok(annotate_svg(svg, file_name, title, lines))
}

/// Places the legend in the corner the first line moves away from: top
/// right for a falling curve such as a loss, bottom right for a rising one.
fn legend_position(lines: &[Line<'_>]) -> SeriesLabelPosition {
    let rising = lines
        .first()
        .and_then(|line| Some((line.points.first()?.1, line.points.last()?.1)))
        .is_some_and(|(first, last)| last > first);
    if rising {
        SeriesLabelPosition::LowerRight
    } else {
        SeriesLabelPosition::UpperRight
    }
}

/// Returns the x range (steps) and the padded y range covering every point.
fn axis_ranges(
    lines: &[Line<'_>],
    unit_range: bool,
) -> (std::ops::Range<u64>, std::ops::Range<f64>) {
    let points = lines.iter().flat_map(|line| line.points.iter());
    let (mut x_min, mut x_max) = (u64::MAX, u64::MIN);
    let (mut y_min, mut y_max) = (f64::INFINITY, f64::NEG_INFINITY);
    for &(step, value) in points {
        x_min = x_min.min(step);
        x_max = x_max.max(step);
        y_min = y_min.min(value);
        y_max = y_max.max(value);
    }
    if x_max <= x_min {
        x_max = x_min + 1;
    }
    if unit_range {
        y_min = y_min.min(0.0);
        y_max = y_max.max(1.0);
    }
    let span = y_max - y_min;
    let pad = match (span > 0.0, y_max != 0.0) {
        (true, _) => span * 0.05,
        // A constant series gets 10% of its value either side, so the tick
        // labels keep its scale.
        (false, true) => y_max.abs() * 0.1,
        (false, false) => 1.0,
    };
    (x_min..x_max, (y_min - pad)..(y_max + pad))
}

/// Adds `data-plot`, `data-points` and a `<title>` to the root element that
/// plotters wrote.
fn annotate_svg(svg: String, file_name: &str, title: &str, lines: &[Line<'_>]) -> String {
    let counts: Vec<String> = lines
        .iter()
        .map(|line| format!("{}={}", line.metric, line.points.len()))
        .collect();
    let stem = file_name.trim_end_matches(".svg");
    let attributes = format!(
        "<svg data-plot=\"{}\" data-points=\"{}\" ",
        escape_xml(stem),
        escape_xml(&counts.join(";"))
    );
    let Some(rest) = svg.strip_prefix("<svg ") else {
        // plotters-svg 0.3.7 opens every document with `<svg `. Anything else is left untouched.
        return svg;
    };
    let Some(tag_end) = rest.find('>') else {
        return svg;
    };
    let (open_tag, body) = rest.split_at(tag_end + 1);
    format!(
        "{attributes}{open_tag}\n<title>{}</title>{body}",
        escape_xml(title)
    )
}
