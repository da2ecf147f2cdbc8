//! `lora-boundary compare`: probe curves of several runs on a normalised depth axis in one figure.
use std::path::PathBuf;

use clap::Args;

use crate::error::{Error, Result};
use crate::pipeline::PipelineReport;
use crate::plot::DepthComparisonPlot;
use crate::summary::{markdown_table, RunSummary};

/// `compare` flags.
#[derive(Debug, Args)]
pub struct CompareArgs {
    /// Run directories or `report.json` files, one curve each.
    #[arg(required = true)]
    pub reports: Vec<PathBuf>,
    /// The SVG file to write.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print a Markdown table of the runs (curve rules' boundaries and depths, searched boundary, the smallest
    /// boundary with no measurable test loss, test scores, the Fig. 2 ablation's output probabilities).
    #[arg(long)]
    pub table: bool,
    /// Which probe curve of each report (`all` = full LoRA, `none` = base, or an ablation mask such as `0-14`).
    #[arg(long, default_value = "all")]
    pub mask: String,
    /// Divide each curve by its own output-layer value, so that curve shapes compare across models.
    #[arg(long)]
    pub relative: bool,
}

/// `lora-boundary compare`.
pub fn run(a: &CompareArgs) -> Result<()> {
    if a.out.is_none() && !a.table {
        return Err(Error::Usage("compare needs `--out FILE.svg`, `--table` or both".into()));
    }
    let reports = a.reports.iter().map(|p| Ok((p.clone(), PipelineReport::load(p)?))).collect::<Result<Vec<_>>>()?;
    if let Some(out) = &a.out {
        DepthComparisonPlot::from_reports(&reports, &a.mask, a.relative)?.write(out)?;
        eprintln!("wrote {}", out.display());
    }
    if a.table {
        let runs: Vec<RunSummary> = reports.iter().map(|(_, r)| RunSummary::from_report(r)).collect();
        print!("{}", markdown_table(&runs));
    }
    Ok(())
}
