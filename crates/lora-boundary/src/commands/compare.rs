//! `lora-boundary compare`: probe curves of several runs on a normalised depth axis in one figure.
use std::path::PathBuf;

use clap::Args;

use crate::error::Result;
use crate::pipeline::PipelineReport;
use crate::plot::DepthComparisonPlot;

/// `compare` flags.
#[derive(Debug, Args)]
pub struct CompareArgs {
    /// Run directories or `report.json` files, one curve each.
    #[arg(required = true)]
    pub reports: Vec<PathBuf>,
    /// The SVG file to write.
    #[arg(long)]
    pub out: PathBuf,
    /// Which probe curve of each report (`all` = full LoRA, `none` = base, or an ablation mask such as `0-14`).
    #[arg(long, default_value = "all")]
    pub mask: String,
    /// Divide each curve by its own output-layer value, so that curve shapes compare across models.
    #[arg(long)]
    pub relative: bool,
}

/// `lora-boundary compare`.
pub fn run(a: &CompareArgs) -> Result<()> {
    let reports = a.reports.iter().map(|p| Ok((p.clone(), PipelineReport::load(p)?))).collect::<Result<Vec<_>>>()?;
    DepthComparisonPlot::from_reports(&reports, &a.mask, a.relative)?.write(&a.out)?;
    println!("wrote {}", a.out.display());
    Ok(())
}
