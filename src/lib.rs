//! halfling trains transformer language models in mixed and low precision.
//!
//! ARCHITECTURE.md at the repository root is the map; in short:
//! [`backend`] (the op set behind one trait, CPU reference implementation) ·
//! [`numerics`] (storage formats) · [`precision`] (recipes) · [`model`] (GPT-2 forward and
//! backward) · [`optim`] (AdamW, schedule, clipping) · [`data`] (tokenizers, shards, loaders) ·
//! [`checkpoint`] (safetensors in Hugging Face layout) · [`monitor`] (numerics statistics) · [`train`], [`generate`], [`bench`],
//! [`selftest`] (what the commands do) · [`cli`] (the command line).

pub mod backend;
pub mod bench;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod data;
pub mod generate;
pub mod metrics;
pub mod model;
pub mod monitor;
pub mod numerics;
pub mod optim;
pub mod precision;
pub mod runs;
pub mod selftest;
pub mod train;
