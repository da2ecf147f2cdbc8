//! Progress display for long steps, without threading a callback through every function.
//!
//! A command line switches it on with [`enable`]; a step opens a bar with [`begin`] (kept until the returned
//! [`Step`] drops) and inner loops report finished work with [`advance`]. With no bar open, or when the library is
//! used without [`enable`], every call is a no-op, so library users see nothing. Bars draw on stderr and hide
//! themselves when stderr is not a terminal.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use indicatif::{ProgressBar, ProgressStyle};

static ENABLED: AtomicBool = AtomicBool::new(false);
static CURRENT: Mutex<Option<ProgressBar>> = Mutex::new(None);

/// Shows progress bars from now on (the CLI calls this unless `--format json`).
pub fn enable(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// An open progress step; the bar disappears when it drops.
#[derive(Debug)]
#[must_use = "the bar closes when the step is dropped"]
pub struct Step {
    open: bool,
}

impl Drop for Step {
    fn drop(&mut self) {
        if self.open {
            if let Ok(mut cur) = CURRENT.lock() {
                if let Some(bar) = cur.take() {
                    bar.finish_and_clear();
                }
            }
        }
    }
}

/// Opens a bar for `what`: a bar of `total` units when the amount of work is known, else a counter with a
/// spinner. A step opened while another is open only renames the open bar (inner steps are part of the outer one).
pub fn begin(what: &str, total: Option<u64>, unit: &str) -> Step {
    if !ENABLED.load(Ordering::Relaxed) {
        return Step { open: false };
    }
    let Ok(mut cur) = CURRENT.lock() else { return Step { open: false } };
    if let Some(bar) = cur.as_ref() {
        bar.set_message(what.to_string());
        return Step { open: false };
    }
    let bar = match total {
        Some(n) => ProgressBar::new(n).with_style(
            ProgressStyle::with_template(&format!(
                "{{msg}} {{bar:30}} {{pos}}/{{len}} {unit} [{{elapsed_precise}}<{{eta_precise}}]"
            ))
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        ),
        None => ProgressBar::new_spinner().with_style(
            ProgressStyle::with_template(&format!("{{spinner}} {{msg}} {{pos}} {unit} [{{elapsed_precise}}]"))
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        ),
    };
    bar.set_message(what.to_string());
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    *cur = Some(bar);
    Step { open: true }
}

/// Reports `n` finished units to the open bar, if any.
pub fn advance(n: u64) {
    if !ENABLED.load(Ordering::Relaxed) {
        return;
    }
    if let Ok(cur) = CURRENT.lock() {
        if let Some(bar) = cur.as_ref() {
            bar.inc(n);
        }
    }
}

/// Prints a line above the open bar (or to stderr when none is open).
pub fn println(line: &str) {
    if let Ok(cur) = CURRENT.lock() {
        if let Some(bar) = cur.as_ref() {
            bar.println(line);
            return;
        }
    }
    eprintln!("{line}");
}
