//! Known bugs that can be planted at run time, to prove that the simulator's checks catch them.
//!
//! Compiled in only with the `mutants` cargo feature (off by default; the simulator's tests turn
//! it on). Even then nothing changes unless `plant` is called, and only on the calling thread:
//! the simulator runs a seed on one thread, so tests running in parallel do not see each
//! other's mutants. Without the feature, [`active`] is a constant `false` and the checks below
//! compile away.

/// A planted bug.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mutant {
    /// A generation's winner is its *largest* eligible stamp instead of its smallest.
    WinnerLargestStamp,
    /// A record keeps a new claim only if it beats the current winner: losing claims (and so
    /// their compensation items) vanish.
    MergeKeepsOnlyWinner,
    /// The log reports its last chunk durable before syncing it.
    AckBeforeSync,
    /// A taken-over claim that completes late is eligible again: it wins back its generation
    /// from the claim that took it over.
    LateCompletionWins,
    /// A takeover stays in force after its taker was released (it should be void: the taker
    /// never ran, so the victim's late completion may still win).
    TakeoverOutlivesRelease,
    /// No `Verify` item for a taken-over claim that never reported back (its client crashed
    /// after the side effect).
    CrashedLoserNoItem,
    /// An item is actionable whatever its winner's state (it should wait for `Completed`).
    ActionableWhileInFlight,
    /// An item is actionable before its key is stable.
    ActionableBeforeStable,
    /// The replica pushes local mutations as soon as they are appended, before they are
    /// durable (a crash then takes back what peers already hold).
    PushBeforeSync,
}

impl Mutant {
    /// Every mutant.
    pub const ALL: [Mutant; 9] = [
        Mutant::WinnerLargestStamp,
        Mutant::MergeKeepsOnlyWinner,
        Mutant::AckBeforeSync,
        Mutant::LateCompletionWins,
        Mutant::TakeoverOutlivesRelease,
        Mutant::CrashedLoserNoItem,
        Mutant::ActionableWhileInFlight,
        Mutant::ActionableBeforeStable,
        Mutant::PushBeforeSync,
    ];
}

#[cfg(feature = "mutants")]
thread_local! {
    static ACTIVE: std::cell::Cell<Option<Mutant>> = const { std::cell::Cell::new(None) };
}

/// Plants `m` on the current thread (`None` removes it).
#[cfg(feature = "mutants")]
pub fn plant(m: Option<Mutant>) {
    ACTIVE.with(|a| a.set(m));
}

/// Whether `m` is planted on the current thread.
#[inline]
pub fn active(m: Mutant) -> bool {
    #[cfg(feature = "mutants")]
    {
        ACTIVE.with(|a| a.get()) == Some(m)
    }
    #[cfg(not(feature = "mutants"))]
    {
        let _ = m;
        false
    }
}
