//! `lattice bench`: filled in below.
use clap::Args;

#[derive(Args, Debug)]
pub struct BenchArgs {}

pub async fn run(_args: BenchArgs) -> Result<(), crate::cli::Failure> {
    Ok(())
}
