//! The report page: one HTML file with inline CSS and inline SVG plots, so it
//! opens from disk or from the object store without any other file.

use std::fmt::Write;

use troupe_wire::{JobState, Stage};

use crate::plot::{stage_title, Plot};
use crate::progress::JobHistory;
use crate::text::{escape_xml, format_number};

/// A job with the file prefix of its plots and the plots drawn for it.
pub(crate) struct JobSection<'a> {
    pub job: &'a JobHistory,
    pub anchor: String,
    pub plots: Vec<Plot>,
}

const STYLE: &str = "
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 2em auto; max-width: 1500px; padding: 0 1.5em; color: #222; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.3em; margin-top: 2em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
code { font-family: ui-monospace, 'SFMono-Regular', Menlo, monospace; font-size: 0.95em; }
table { border-collapse: collapse; margin: 0.8em 0; }
th, td { border: 1px solid #ddd; padding: 0.35em 0.7em; text-align: left; vertical-align: top; }
th { background: #f5f5f5; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
.metric { display: inline-block; margin-right: 1.2em; white-space: nowrap; }
.metric b { font-weight: 600; }
.meta { color: #555; }
.failed { color: #b00020; font-weight: 600; }
.plots { display: grid; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr)); gap: 1em; }
.plots figure { margin: 0; border: 1px solid #e5e5e5; }
.plots svg { display: block; width: 100%; height: auto; }
";

/// Metrics shown in the overview table, per stage; the first name present
/// of each group is shown.
fn headline_metrics(stage: Stage) -> &'static [&'static [&'static str]] {
    match stage {
        Stage::Pretrain => &[
            &["train_loss", "loss"],
            &["heldout_loss"],
            &["unigram_entropy"],
        ],
        Stage::Sft => &[
            &["train_loss", "loss"],
            &["base_heldout_loss"],
            &["heldout_loss"],
            &["eos_rate"],
        ],
        Stage::RewardModel => &[
            &["train_loss", "loss"],
            &["heldout_loss"],
            &["heldout_accuracy"],
        ],
        Stage::Ppo => &[
            &["reward"],
            &["reward_raw"],
            &["kl"],
            &["kl_coef"],
            &["response_length"],
            &["eos_rate"],
        ],
    }
}

fn state_name(state: JobState) -> &'static str {
    match state {
        JobState::Queued => "queued",
        JobState::Running => "running",
        JobState::Succeeded => "succeeded",
        JobState::Failed => "failed",
    }
}

/// Builds the page for `run`. `message_count` is the number of progress
/// messages the page was rendered from.
pub(crate) fn render_page(run: &str, sections: &[JobSection<'_>], message_count: usize) -> String {
    let run = escape_xml(run);
    let mut page = String::new();
    let _ = write!(
        page,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>troupe report: {run}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n\
         <h1>troupe run <code>{run}</code></h1>\n\
         <p class=\"meta\">Rendered from {message_count} progress messages. Steps are as the trainers reported them.</p>\n"
    );

    page.push_str("<h2 id=\"final-numbers\">Final numbers</h2>\n");
    page.push_str(&overview_table(sections));

    for section in sections {
        page.push_str(&job_section(section));
    }
    page.push_str("</body>\n</html>\n");
    page
}

fn overview_table(sections: &[JobSection<'_>]) -> String {
    let mut table = String::from(
        "<table class=\"overview\">\n<tr><th>Stage</th><th>Job</th><th>State</th><th>Step</th><th>Final values</th></tr>\n",
    );
    for section in sections {
        let job = section.job;
        let mut values = String::new();
        for names in headline_metrics(job.stage) {
            let Some((name, value)) = names
                .iter()
                .find_map(|name| Some((*name, *job.finals.get(*name)?)))
            else {
                continue;
            };
            let _ = write!(
                values,
                "<span class=\"metric\"><b>{}</b> {}</span>",
                escape_xml(name),
                format_number(value)
            );
        }
        let _ = writeln!(
            table,
            "<tr><td><a href=\"#{anchor}\">{stage}</a></td><td><code>{job_id}</code></td><td>{state}</td>\
             <td class=\"number\">{step} / {total}</td><td>{values}</td></tr>",
            anchor = section.anchor,
            stage = stage_title(job.stage),
            job_id = escape_xml(&job.job_id),
            state = state_cell(job.state),
            step = job.step,
            total = job.total_steps,
        );
    }
    table.push_str("</table>\n");
    table
}

fn state_cell(state: JobState) -> String {
    match state {
        JobState::Failed => format!("<span class=\"failed\">{}</span>", state_name(state)),
        other => state_name(other).to_string(),
    }
}

fn job_section(section: &JobSection<'_>) -> String {
    let job = section.job;
    let mut html = String::new();
    let _ = writeln!(
        html,
        "<section id=\"{anchor}\">\n<h2>{stage}</h2>\n<p class=\"meta\">Job <code>{job_id}</code>, {state} at step {step} of {total}, {messages} progress messages.</p>",
        anchor = section.anchor,
        stage = stage_title(job.stage),
        job_id = escape_xml(&job.job_id),
        state = state_cell(job.state),
        step = job.step,
        total = job.total_steps,
        messages = job.messages,
    );
    if let Some(message) = &job.message {
        let _ = writeln!(html, "<p>Last message: {}</p>", escape_xml(message));
    }

    if section.plots.is_empty() {
        html.push_str(
            "<p>No metric of this job has two or more points, so there is nothing to plot.</p>\n",
        );
    } else {
        html.push_str("<div class=\"plots\">\n");
        for plot in &section.plots {
            let _ = writeln!(
                html,
                "<figure data-file=\"{}\">\n{}</figure>",
                escape_xml(&plot.file_name),
                plot.svg
            );
        }
        html.push_str("</div>\n");
    }

    let _ = writeln!(
        html,
        "<details>\n<summary>All final values ({} metrics)</summary>\n<table>\n<tr><th>Metric</th><th>Final value</th><th>Points</th></tr>",
        job.finals.len()
    );
    for (name, value) in &job.finals {
        let points = job.series.get(name).map_or(0, Vec::len);
        let _ = writeln!(
            html,
            "<tr><td><code>{}</code></td><td class=\"number\">{}</td><td class=\"number\">{points}</td></tr>",
            escape_xml(name),
            format_number(*value)
        );
    }
    html.push_str("</table>\n</details>\n</section>\n");
    html
}
