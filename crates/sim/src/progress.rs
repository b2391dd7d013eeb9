//! A text progress bar for long traces, drawn on one line with carriage returns.
//!
//! ```
//! let mut bar = lattice_sim::ProgressBar::new(Vec::new(), 20);
//! bar.update(50, 100);
//! bar.finish();
//! ```

use std::io::Write;

pub struct ProgressBar<W: Write> {
    out: W,
    width: usize,
    /// Last percentage drawn: redraw only when it changes, so a per-second
    /// callback costs nothing on long traces.
    drawn: Option<u64>,
}

impl<W: Write> ProgressBar<W> {
    pub fn new(out: W, width: usize) -> Self {
        ProgressBar {
            out,
            width: width.max(1),
            drawn: None,
        }
    }

    /// Draws `[#####.....]  50% 900/1800 s` if the percentage changed. Write
    /// errors are ignored: a broken terminal must not stop a simulation.
    pub fn update(&mut self, done: u64, total: u64) {
        let total = total.max(1);
        let done = done.min(total);
        let percent = done * 100 / total;
        if self.drawn == Some(percent) {
            return;
        }
        self.drawn = Some(percent);
        let filled = (done as usize * self.width) / total as usize;
        let bar = format!("{}{}", "#".repeat(filled), ".".repeat(self.width - filled));
        let _ = write!(self.out, "\r[{bar}] {percent:>3}% {done}/{total} s");
        let _ = self.out.flush();
    }

    /// Ends the line and returns the writer.
    pub fn finish(mut self) -> W {
        let _ = writeln!(self.out);
        let _ = self.out.flush();
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::ProgressBar;

    #[test]
    fn draws_only_when_the_percentage_changes() {
        let mut bar = ProgressBar::new(Vec::new(), 10);
        for done in 0..=200 {
            bar.update(done, 200);
        }
        let text = String::from_utf8(bar.finish()).unwrap_or_default();
        assert_eq!(text.matches('\r').count(), 101);
        assert!(text.ends_with("\r[##########] 100% 200/200 s\n"), "{text:?}");
    }
}
