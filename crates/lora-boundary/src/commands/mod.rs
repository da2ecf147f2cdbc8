//! One module per subcommand: its flags (clap `Args`) and its handler, a thin layer over the libraries.
pub mod compare;
pub mod eval;
pub mod generate;
pub mod merge;
pub mod plot;
pub mod probe;
pub mod prune;
pub mod run;
pub mod score;
pub mod search;
pub mod train;
