//! Models: the GPT-2 architecture with explicit forward and backward passes.
//!
//! The model is a fixed graph, so instead of a tape autograd each layer's backward is written
//! out next to its forward, as in llm.c. That keeps memory planning (which activations are saved,
//! which gradient buffers are shared) and precision (which format each tensor has) in our hands.

pub mod fp8;
mod gpt;
mod step_graph;
pub mod unit;

pub use fp8::Fp8State;
pub use gpt::{Activations, Gpt, GptConfig, ParamBufs, ParamSpec, ProbedTensor};
