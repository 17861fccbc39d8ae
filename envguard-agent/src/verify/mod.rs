//! `envguard verify`: prove that the kernel does what the policy says, by
//! probing from inside each env (`plan`, `probe`, `listeners`), and find
//! drift between the policy file, the policy the agent loaded and the
//! kernel's policy maps (`drift`); `report` renders the answer and `marks`
//! is the agent's side of probe marking.
pub mod drift;
pub mod listeners;
pub mod marks;
pub mod plan;
pub mod probe;
pub mod report;
pub mod run;
