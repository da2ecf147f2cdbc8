//! `lora-boundary plot`: re-render a run's figures from its saved `report.json`.
use std::path::{Path, PathBuf};

use clap::Args;

use crate::error::{Error, Result};
use crate::pipeline::{write_plots, PipelineReport};

/// `plot` flags.
#[derive(Debug, Args)]
pub struct PlotArgs {
    /// A run directory (holding `report.json`) or a `report.json` file.
    pub report: PathBuf,
    /// Directory the figures go into (created when missing); default: the report's own directory.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Re-renders `probe.svg`, `search.svg`, `proxy.svg` and `sweep.svg` (those the report has data for) from the
/// report at `report` into `out` (default: beside the report). Returns the files written.
pub fn replot(report: &Path, out: Option<&Path>) -> Result<Vec<PathBuf>> {
    let r = PipelineReport::load(report)?;
    let dir = match out {
        Some(d) => d.to_path_buf(),
        None if report.is_dir() => report.to_path_buf(),
        None => report.parent().map_or_else(|| PathBuf::from("."), Path::to_path_buf),
    };
    let dir = if dir.as_os_str().is_empty() { PathBuf::from(".") } else { dir };
    std::fs::create_dir_all(&dir).map_err(|source| Error::Io { path: dir.clone(), source })?;
    write_plots(&r, &dir)
}

/// `lora-boundary plot`.
pub fn run(a: &PlotArgs) -> Result<()> {
    for path in replot(&a.report, a.out.as_deref())? {
        println!("wrote {}", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn results(task: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/results").join(task)
    }

    #[test]
    fn committed_reports_deserialize() {
        for task in ["e2e", "hotpotqa", "gsm8k", "scitldr"] {
            let r = PipelineReport::load(&results(task)).unwrap_or_else(|e| panic!("{task}: {e}"));
            assert_eq!(r.num_layers, 30);
            assert_eq!(r.config.task.to_string(), task);
            assert_eq!(r.probe.curves.len(), 4, "{task}: full, base and the two half-drop curves");
        }
    }

    #[test]
    fn plot_rerenders_all_four_figures_of_a_saved_report() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("figs");
        let written = replot(&results("e2e").join("report.json"), Some(&out)).unwrap();
        let names: Vec<String> =
            written.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
        assert_eq!(names, ["probe.svg", "search.svg", "proxy.svg", "sweep.svg"]);
        for p in &written {
            let svg = std::fs::read_to_string(p).unwrap();
            assert!(svg.starts_with("<svg") && svg.contains("searched boundary b = 29"), "{}", p.display());
        }
        let sweep = std::fs::read_to_string(out.join("sweep.svg")).unwrap();
        assert!(!sweep.contains("<polygon"), "the sweep's 8 boundaries are sparse: error bars, no band");
        assert_eq!(std::fs::read_dir(&out).unwrap().count(), 4, "nothing else left in the directory");
    }

    #[test]
    fn boundary_marks_name_the_rule_and_merge_when_they_coincide() {
        let gsm8k = PipelineReport::load(&results("gsm8k")).unwrap();
        let marks = crate::pipeline::boundary_marks(&gsm8k);
        assert_eq!(
            marks,
            [
                ("searched boundary b = 21 (LoRA on blocks 0–21; proxy-first)".to_string(), 21),
                ("curve rule (steepest rise) b = 29 (LoRA on blocks 0–29)".to_string(), 29)
            ]
        );
        let e2e = PipelineReport::load(&results("e2e")).unwrap();
        assert_eq!(
            crate::pipeline::boundary_marks(&e2e),
            [(
                "searched boundary b = 29 (LoRA on blocks 0–29; proxy-first) = curve rule (steepest rise)".to_string(),
                29
            )]
        );
    }

    #[test]
    fn a_corrupt_report_is_a_typed_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("report.json");
        std::fs::write(&path, "{\"config\": {\"model\": 3}").unwrap();
        match replot(dir.path(), None) {
            Err(e @ Error::Report { .. }) => {
                assert!(e.to_string().contains(&path.display().to_string()), "{e}");
                assert_eq!(e.exit_code(), 2);
            }
            other => panic!("expected Error::Report, got {other:?}"),
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no figure written");
    }

    #[test]
    fn compare_overlays_two_reports_on_normalised_depth() {
        use crate::plot::DepthComparisonPlot;
        let reports: Vec<(PathBuf, PipelineReport)> =
            ["e2e", "gsm8k"].iter().map(|t| (results(t), PipelineReport::load(&results(t)).unwrap())).collect();
        let plot = DepthComparisonPlot::from_reports(&reports, "all", true).unwrap();
        assert_eq!(plot.curves.len(), 2);
        for c in &plot.curves {
            let pts = c.points();
            assert_eq!((pts[0].0, pts[30].0, pts[30].1), (0.0, 1.0, 1.0), "relative: output layer is 1");
            assert_eq!(c.model, "SmolLM2-135M-Instruct.Q4_1");
        }
        let svg = plot.render().unwrap();
        assert!(svg.contains("SmolLM2-135M-Instruct.Q4_1 · e2e") && svg.contains("SmolLM2-135M-Instruct.Q4_1 · gsm8k"));
        let err = DepthComparisonPlot::from_reports(&reports, "3-7", false).unwrap_err();
        assert!(err.to_string().contains("no probe curve for mask `3-7`"), "{err}");
    }
}
