//! The checks can fail: each planted bug (see `idem::mutants`) is reported as a violation
//! within a bounded number of seeds.

use idem::mutants::{self, Mutant};
use idem_sim::{run, Options, Profile};

/// Runs up to `seeds` seeds with `m` planted; returns the first seed that failed and its
/// checks.
fn first_failure(m: Mutant, profile: Profile, seeds: u64) -> Option<(u64, Vec<&'static str>)> {
    let opts = Options {
        regions: 3,
        clients_per_region: 4,
        duration_ms: 10_000,
        profile,
    };
    mutants::plant(Some(m));
    let found = (0..seeds).find_map(|seed| {
        let r = run(seed, &opts);
        (!r.passed()).then(|| (seed, r.violations.iter().map(|v| v.check).collect()))
    });
    mutants::plant(None);
    if let Some((seed, checks)) = &found {
        // Shown with `--nocapture`.
        eprintln!("{m:?}: caught at seed {seed} by {checks:?}");
    }
    found
}

#[test]
fn a_winner_chosen_by_the_largest_stamp_is_caught() {
    let (seed, checks) = first_failure(Mutant::WinnerLargestStamp, Profile::Swarm, 10)
        .expect("caught within 10 seeds");
    assert!(
        checks.contains(&"S1") || checks.contains(&"S3"),
        "seed {seed}: {checks:?}"
    );
}

#[test]
fn a_merge_that_keeps_only_the_winner_is_caught() {
    let (seed, checks) = first_failure(Mutant::MergeKeepsOnlyWinner, Profile::PartitionHeavy, 10)
        .expect("caught within 10 seeds");
    assert!(checks.contains(&"S3"), "seed {seed}: {checks:?}");
}

#[test]
fn acknowledging_before_the_sync_is_caught() {
    let (seed, checks) = first_failure(Mutant::AckBeforeSync, Profile::DiskChaos, 20)
        .expect("caught within 20 seeds");
    // A lost acknowledged claim shows first as its completion failing (E2), a lost
    // acknowledged completion as S5.
    assert!(
        checks.contains(&"S5") || checks.contains(&"E2"),
        "seed {seed}: {checks:?}"
    );
}

#[test]
fn a_late_completion_winning_back_its_key_is_caught() {
    // A slow execution outlives its lease, another claim takes the key over and completes;
    // then the slow one completes late and (planted bug) wins again.
    let (seed, checks) = first_failure(Mutant::LateCompletionWins, Profile::Swarm, 10)
        .expect("caught within 10 seeds");
    assert!(
        checks.contains(&"S1") || checks.contains(&"S3"),
        "seed {seed}: {checks:?}"
    );
}

#[test]
fn a_takeover_in_force_after_its_taker_was_released_is_caught() {
    // A slow execution is taken over; the taker fails and releases; the slow one completes
    // late and must win, since its takeover is void.
    let (seed, checks) = first_failure(Mutant::TakeoverOutlivesRelease, Profile::Swarm, 20)
        .expect("caught within 20 seeds");
    assert!(
        checks.iter().any(|c| ["S1", "S3", "S7", "S8"].contains(c)),
        "seed {seed}: {checks:?}"
    );
}

#[test]
fn no_item_for_a_crashed_loser_is_caught() {
    // A client dies after its side effect; its claim is taken over (or loses and its lease
    // runs out): a Verify item must cover it.
    let (seed, checks) = first_failure(Mutant::CrashedLoserNoItem, Profile::Swarm, 10)
        .expect("caught within 10 seeds");
    assert!(
        checks.contains(&"S3") && checks.contains(&"S8"),
        "seed {seed}: {checks:?}"
    );
}

#[test]
fn an_item_actionable_while_its_winner_is_in_flight_is_caught() {
    let (seed, checks) = first_failure(Mutant::ActionableWhileInFlight, Profile::Swarm, 10)
        .expect("caught within 10 seeds");
    assert!(checks.contains(&"S11"), "seed {seed}: {checks:?}");
}

#[test]
fn an_item_actionable_before_its_key_is_stable_is_caught() {
    // Partitions delay stability: an item shown at once names a winner that an earlier claim
    // from the other side later replaces.
    let (seed, checks) = first_failure(Mutant::ActionableBeforeStable, Profile::PartitionHeavy, 10)
        .expect("caught within 10 seeds");
    assert!(checks.contains(&"S11"), "seed {seed}: {checks:?}");
}

#[test]
fn pushing_before_the_sync_is_caught() {
    // A crash takes back mutations peers already hold; the restarted region numbers other
    // mutations the same, and the regions' records part ways. It needs a crash between the
    // push and the next flush that drops the pushed write: rarer (seed 30 when written).
    let (seed, checks) = first_failure(Mutant::PushBeforeSync, Profile::DiskChaos, 60)
        .expect("caught within 20 seeds");
    assert!(
        checks
            .iter()
            .any(|c| ["L1", "S1", "S3", "S5", "W3"].contains(c)),
        "seed {seed}: {checks:?}"
    );
}

#[test]
fn without_a_mutant_the_same_seeds_pass() {
    // The bounds above mean something only if these seeds pass unmutated.
    for (profile, n) in [
        (Profile::Swarm, 20),
        (Profile::PartitionHeavy, 10),
        (Profile::DiskChaos, 60),
    ] {
        let opts = Options {
            regions: 3,
            clients_per_region: 4,
            duration_ms: 10_000,
            profile,
        };
        for seed in 0..n {
            assert!(run(seed, &opts).passed(), "{profile} seed {seed}");
        }
    }
}
