//! Workspace-level examples, benches and end-to-end tests; the library is `lora-boundary`.
