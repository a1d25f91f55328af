//! Replayable random seeds. A test that draws randomness takes it from one [`TestSeed`]: the
//! seed comes from `METERD_TEST_SEED` when that is set, else it is drawn at random. It is
//! printed when drawn (libtest shows a failed test's output) and again, with the command that
//! replays it, if the test panics while the seed is alive.
//!
//! Replay: `METERD_TEST_SEED=<seed> cargo test -p meterd --test it -- <module::test> --exact`.
//! The seed fixes every random choice of the test (loads, kill moments); the daemon's own
//! timing still varies from run to run.

use rand::SeedableRng;
use rand::rngs::StdRng;

/// The one variable every seeded test reads.
pub const SEED_ENV: &str = "METERD_TEST_SEED";

/// A test's seed. Keep it alive for the whole test: dropped while panicking, it prints the
/// replay command.
pub struct TestSeed {
    seed: u64,
    test: &'static str,
}

impl TestSeed {
    /// `test` is the test's path in the `it` binary (`module::test_fn`), as libtest names it;
    /// the replay command filters on it.
    pub fn draw(test: &'static str) -> TestSeed {
        // libtest runs each test on a thread named after it: a wrong name would print a
        // replay command that runs nothing.
        if let Some(thread) = std::thread::current().name()
            && thread != "main"
        {
            assert_eq!(
                thread, test,
                "TestSeed::draw must be given the running test's name"
            );
        }
        let (seed, from) = match std::env::var(SEED_ENV) {
            Ok(v) => {
                let seed = v
                    .trim()
                    .parse()
                    .unwrap_or_else(|e| panic!("{SEED_ENV}={v:?} is not a u64 seed: {e}"));
                (seed, "from")
            }
            Err(std::env::VarError::NotPresent) => (rand::random(), "not from"),
            Err(e) => panic!("{SEED_ENV}: {e}"),
        };
        let s = TestSeed { seed, test };
        println!(
            "{test}: seed {seed} ({from} {SEED_ENV}); replay: {}",
            s.replay()
        );
        s
    }

    pub fn value(&self) -> u64 {
        self.seed
    }

    /// A generator seeded with the seed: the test's only source of randomness.
    pub fn rng(&self) -> StdRng {
        StdRng::seed_from_u64(self.seed)
    }

    /// The command that runs this test again with this seed.
    pub fn replay(&self) -> String {
        format!(
            "{SEED_ENV}={} cargo test -p meterd --test it -- {} --exact --nocapture",
            self.seed, self.test
        )
    }
}

/// `seed N (replay: …)`, for assertion messages.
impl std::fmt::Display for TestSeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "seed {} (replay: {})", self.seed, self.replay())
    }
}

impl Drop for TestSeed {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "\n{} failed with seed {}. Replay it with:\n    {}\n",
                self.test,
                self.seed,
                self.replay()
            );
        }
    }
}
