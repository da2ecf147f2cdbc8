//! lora-probe (work in progress).
