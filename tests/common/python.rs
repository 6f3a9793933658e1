//! Running the Python clients in `tests/*.py` (the official `openai`
//! package) from the end-to-end tests, with a time limit, killed when
//! dropped.

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Whether `python3` can import the `openai` package. CI installs it
/// (`.ci/run`); elsewhere the tests that need it say they were skipped.
pub fn has_openai(test: &str) -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import openai"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("SKIPPED {test}: the `openai` Python package is not installed (python3 -m pip install openai; .ci/run does)");
    }
    ok
}

/// `tests/NAME` as an absolute path.
pub fn script(name: &str) -> String {
    format!("{}/tests/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// A Python script running in the background.
pub struct Script {
    child: Child,
    stdout: Option<JoinHandle<String>>,
    stderr: Option<JoinHandle<String>>,
}

/// How a script ended.
pub struct Finished {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Finished {
    /// Both streams, for failure messages.
    pub fn report(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

fn drain(mut from: impl Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = from.read_to_string(&mut text);
        text
    })
}

impl Script {
    /// Starts `python3 -u tests/NAME ARGS`.
    pub fn start(name: &str, args: &[&str]) -> Script {
        let mut child = Command::new("python3")
            .arg("-u")
            .arg(script(name))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("python3 runs");
        let stdout = child.stdout.take().map(drain);
        let stderr = child.stderr.take().map(drain);
        Script {
            child,
            stdout,
            stderr,
        }
    }

    /// Runs a script to its end within `limit`.
    pub fn run(name: &str, args: &[&str], limit: Duration) -> Finished {
        Script::start(name, args).finish(limit)
    }

    /// Waits for the end within `limit`; past it the script is killed and
    /// the test fails with what it printed.
    pub fn finish(mut self, limit: Duration) -> Finished {
        let start = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("waits for python3") {
                break Some(status);
            }
            if start.elapsed() > limit {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let take = |h: &mut Option<JoinHandle<String>>| {
            h.take()
                .map(|h| h.join().unwrap_or_default())
                .unwrap_or_default()
        };
        let finished = Finished {
            success: status.is_some_and(|s| s.success()),
            stdout: take(&mut self.stdout),
            stderr: take(&mut self.stderr),
        };
        assert!(
            status.is_some(),
            "python script ran past {limit:?}; it printed:\n{}",
            finished.report()
        );
        finished
    }
}

impl Drop for Script {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
