//! Unit and property tests of the record: merge laws, order-free delta application, winners,
//! takeovers and items.

use proptest::prelude::*;

use super::*;
use crate::clock::{hlc_floor_of_ms, RegionId};

const T0: u64 = 1_900_000_000_000;
const TTL: u64 = 100;

fn region(i: usize) -> RegionId {
    RegionId::new(["a", "b", "c"][i % 3]).unwrap()
}

fn stamp(ms: u64, logical: u64, r: usize) -> Stamp {
    Stamp::new(hlc_floor_of_ms(T0 + ms) + logical, region(r))
}

fn fp(i: u8) -> Fingerprint {
    Fingerprint([i; 32])
}

fn facts(fp_i: u8, takes_over: Option<Stamp>) -> ClaimFacts {
    let takes_over = takes_over.into_iter().collect();
    ClaimFacts {
        fingerprint: fp(fp_i),
        attempt: AttemptToken(fp_i as u128),
        ttl_ms: TTL,
        lease_ms: 30,
        origin_seq: 1,
        takes_over,
    }
}

fn key() -> RecordKey {
    RecordKey::new("pay", "alice", "k1")
}

fn ctx(retired: &Retirements) -> ItemContext<'_> {
    ItemContext {
        retired,
        stable: true,
        // Long after every stamp: leases have run out, every clock has moved past the claims.
        lapsed_before_ms: u64::MAX,
    }
}

fn claim(s: Stamp, f: ClaimFacts) -> Delta {
    Delta::Claim { stamp: s, facts: f }
}

fn done(s: Stamp, status: u16) -> Delta {
    Delta::Finish {
        stamp: s,
        terminal: Terminal::Completed(Outcome::new(status, format!("{s:?}"))),
    }
}

fn released(s: Stamp) -> Delta {
    Delta::Finish {
        stamp: s,
        terminal: Terminal::Released,
    }
}

fn build(deltas: &[Delta]) -> Record {
    let mut r = Record::new();
    for d in deltas {
        r.apply(d).unwrap();
    }
    r
}

#[test]
fn lowest_stamp_wins_and_the_loser_is_a_duplicate() {
    let a = stamp(0, 0, 0);
    let b = stamp(0, 0, 1); // same hlc, region "b" > "a"
    let r = build(&[
        claim(b, facts(1, None)),
        done(b, 200),
        claim(a, facts(1, None)),
        done(a, 200),
    ]);
    let gens = r.generations(&Retirements::none());
    assert_eq!(gens.len(), 1);
    assert_eq!(gens[0].winner, Some(a));
    let items = r.items(&key(), ctx(&Retirements::none()));
    assert_eq!(items.len(), 1);
    assert_eq!(items[0].claim, b);
    assert_eq!(items[0].kind, ItemKind::Duplicate);
    assert!(items[0].actionable);
    assert_eq!(items[0].id, ItemId::of(&key(), &b));
}

#[test]
fn different_fingerprints_are_key_reuse() {
    let a = stamp(0, 0, 0);
    let b = stamp(5, 0, 1);
    let r = build(&[
        claim(a, facts(1, None)),
        done(a, 200),
        claim(b, facts(2, None)),
        done(b, 201),
    ]);
    let items = r.items(&key(), ctx(&Retirements::none()));
    assert_eq!(items[0].kind, ItemKind::KeyReuse);
}

#[test]
fn nothing_is_actionable_until_the_winner_completed_and_the_key_is_stable() {
    let a = stamp(0, 0, 0);
    let b = stamp(5, 0, 1);
    let r = build(&[
        claim(a, facts(1, None)),
        claim(b, facts(1, None)),
        done(b, 200),
    ]);
    let none = Retirements::none();
    let items = r.items(&key(), ctx(&none));
    assert_eq!(items[0].kind, ItemKind::Duplicate);
    assert!(!items[0].actionable, "winner still in flight");
    let mut r2 = r.clone();
    r2.apply(&done(a, 200)).unwrap();
    let unstable = r2.items(
        &key(),
        ItemContext {
            retired: &none,
            stable: false,
            lapsed_before_ms: 0,
        },
    );
    assert!(!unstable[0].actionable, "key not stable");
}

#[test]
fn a_released_winner_hands_over_to_the_next_claim() {
    let a = stamp(0, 0, 0);
    let b = stamp(5, 0, 1);
    let r = build(&[
        claim(a, facts(1, None)),
        released(a),
        claim(b, facts(1, None)),
        done(b, 200),
    ]);
    assert_eq!(r.generations(&Retirements::none())[0].winner, Some(b));
    assert!(r.items(&key(), ctx(&Retirements::none())).is_empty());
}

#[test]
fn a_takeover_moves_the_winner_and_flags_the_silent_victim_for_verification() {
    let a = stamp(0, 0, 0);
    let b = stamp(40, 0, 1);
    let r = build(&[claim(a, facts(1, None)), claim(b, facts(1, Some(a)))]);
    let g = &r.generations(&Retirements::none())[0];
    assert_eq!(g.winner, Some(b));
    let items = r.items(&key(), ctx(&Retirements::none()));
    assert_eq!(items.len(), 1);
    assert_eq!((items[0].claim, items[0].kind), (a, ItemKind::Verify));
}

#[test]
fn a_late_completion_of_a_taken_over_claim_is_a_duplicate_not_a_winner() {
    let a = stamp(0, 0, 0);
    let b = stamp(40, 0, 1);
    let r = build(&[
        claim(a, facts(1, None)),
        claim(b, facts(1, Some(a))),
        done(b, 200),
        done(a, 200),
    ]);
    assert_eq!(r.generations(&Retirements::none())[0].winner, Some(b));
    let items = r.items(&key(), ctx(&Retirements::none()));
    assert_eq!((items[0].claim, items[0].kind), (a, ItemKind::Duplicate));
}

#[test]
fn a_takeover_is_void_once_its_taker_is_released() {
    let a = stamp(0, 0, 0);
    let b = stamp(40, 0, 1);
    let r = build(&[
        claim(a, facts(1, None)),
        claim(b, facts(1, Some(a))),
        released(b),
        done(a, 200),
    ]);
    assert_eq!(r.generations(&Retirements::none())[0].winner, Some(a));
    assert!(r.items(&key(), ctx(&Retirements::none())).is_empty());
}

#[test]
fn a_takeover_of_an_unknown_claim_makes_a_placeholder_that_never_wins() {
    let a = stamp(0, 0, 0);
    let b = stamp(40, 0, 1);
    let r = build(&[claim(b, facts(1, Some(a)))]);
    assert_eq!(r.claim(&a).unwrap().status(), ClaimStatus::Placeholder);
    let g = &r.generations(&Retirements::none())[0];
    assert_eq!(g.anchor, a, "the placeholder anchors with its taker's TTL");
    assert_eq!(g.winner, Some(b));
}

#[test]
fn a_takeover_must_be_later_than_its_victim() {
    let a = stamp(10, 0, 0);
    let b = stamp(0, 0, 1);
    let mut r = Record::new();
    assert!(matches!(
        r.apply(&claim(b, facts(1, Some(a)))),
        Err(InvalidDelta::TakeoverNotLater { .. })
    ));
    assert!(r.is_empty());
}

#[test]
fn a_claim_past_the_expiry_opens_a_new_generation() {
    let a = stamp(0, 0, 0);
    let b = stamp(TTL, 0, 1);
    let r = build(&[
        claim(a, facts(1, None)),
        done(a, 200),
        claim(b, facts(2, None)),
    ]);
    let gens = r.generations(&Retirements::none());
    assert_eq!(gens.len(), 2);
    assert_eq!(gens[1].anchor, b);
    assert_eq!(gens[0].expires_at_ms, T0 + TTL);
    assert!(r.items(&key(), ctx(&Retirements::none())).is_empty());
}

#[test]
fn orphans_of_a_retired_region_never_win() {
    let a = stamp(0, 0, 0);
    let b = stamp(5, 0, 1);
    let mut late = facts(1, None);
    late.origin_seq = 9;
    let r = build(&[
        claim(a, late),
        done(a, 200),
        claim(b, facts(1, None)),
        done(b, 200),
    ]);
    let mut retired = Retirements::none();
    retired.0.insert(region(0), 5);
    assert_eq!(r.generations(&retired)[0].winner, Some(b));
    let items = r.items(&key(), ctx(&retired));
    assert_eq!((items[0].claim, items[0].kind), (a, ItemKind::Orphan));
}

#[test]
fn a_placeholder_of_a_retired_region_shapes_no_generation() {
    // A region that had not heard of the retirement took over l's claim v (an orphan: numbered
    // past the retirement). Here the takeover arrived before v's facts: v is a placeholder, and
    // must not anchor a generation that v's facts, once they arrive, would take away again.
    let v = stamp(10, 0, 2); // l's claim, an orphan
    let w = stamp(30, 0, 1); // b's claim, completed
    let t = stamp(120, 0, 0); // a's takeover of v: outside what v would anchor, inside w's
    let mut retired = Retirements::none();
    retired.0.insert(region(2), 0);
    let mut deltas = vec![
        claim(w, facts(1, None)),
        done(w, 200),
        claim(t, facts(1, Some(v))),
        done(t, 200),
    ];
    let shape = |r: &Record| -> Vec<(Stamp, Option<Stamp>)> {
        r.generations(&retired)
            .iter()
            .filter(|g| g.stamps.iter().any(|s| *s == w || *s == t))
            .map(|g| (g.anchor, g.winner))
            .collect()
    };
    let before = shape(&build(&deltas));
    let mut v_facts = facts(1, None);
    v_facts.origin_seq = 5;
    deltas.push(claim(v, v_facts));
    let after = shape(&build(&deltas));
    assert_eq!(before, after);
    assert_eq!(
        before,
        vec![(w, Some(w))],
        "t falls in w's generation and loses to it"
    );
}

#[test]
fn an_indeterminate_winner_turns_losers_into_verify_items() {
    let a = stamp(0, 0, 0);
    let b = stamp(5, 0, 1);
    let r = build(&[
        claim(a, facts(1, None)),
        Delta::Finish {
            stamp: a,
            terminal: Terminal::Indeterminate(Outcome::new(503, "")),
        },
        claim(b, facts(1, None)),
        done(b, 200),
    ]);
    let items = r.items(&key(), ctx(&Retirements::none()));
    assert_eq!(items[0].kind, ItemKind::Verify);
    assert!(!items[0].actionable);
}

#[test]
fn a_resolved_claim_that_wins_anyway_is_a_reversed_alarm() {
    let a = stamp(0, 0, 0);
    let b = stamp(5, 0, 1);
    let mut r = build(&[
        claim(a, facts(1, None)),
        claim(b, facts(1, None)),
        done(b, 200),
    ]);
    let items = r.items(&key(), ctx(&Retirements::none()));
    assert_eq!((items[0].claim, items[0].kind), (b, ItemKind::Duplicate));
    assert!(!items[0].actionable, "winner a is still in flight");
    // Someone resolves b anyway (a refund), then a is released and b wins after all.
    r.apply(&Delta::Resolve(Resolution {
        item: ItemId::of(&key(), &b),
        at: stamp(50, 0, 1),
        by: "ops".into(),
        note: "refunded".into(),
        hook_result: None,
        provider_ref: Some("re_1".into()),
    }))
    .unwrap();
    r.apply(&released(a)).unwrap();
    let items = r.items(&key(), ctx(&Retirements::none()));
    assert_eq!(items.len(), 1);
    assert_eq!((items[0].claim, items[0].kind), (b, ItemKind::Reversed));
    assert!(items[0].resolved);
}

#[test]
fn two_resolutions_with_one_stamp_merge_alike_in_any_order() {
    let b = stamp(5, 0, 1);
    let r1 = Resolution {
        item: ItemId::of(&key(), &b),
        at: stamp(50, 0, 1),
        by: "ops".into(),
        note: "one".into(),
        hook_result: None,
        provider_ref: None,
    };
    let r2 = Resolution {
        note: "two".into(),
        ..r1.clone()
    };
    let x = build(&[Delta::Resolve(r1.clone()), Delta::Resolve(r2.clone())]);
    let y = build(&[Delta::Resolve(r2), Delta::Resolve(r1)]);
    assert_eq!(x, y);
}

// ---- property tests ----

/// The design's rules, computed straight from a list of deltas without the record code: the
/// generations (anchor, winner) the deltas imply.
fn oracle(deltas: &[Delta]) -> Vec<(Stamp, Option<Stamp>)> {
    use std::collections::{BTreeMap, BTreeSet};
    let mut facts: BTreeMap<Stamp, ClaimFacts> = BTreeMap::new();
    let mut released: BTreeSet<Stamp> = BTreeSet::new();
    let mut known: BTreeSet<Stamp> = BTreeSet::new();
    for d in deltas {
        match d {
            Delta::Claim { stamp, facts: f } => {
                facts.insert(*stamp, f.clone());
                known.insert(*stamp);
                known.extend(f.takes_over.iter().copied());
            }
            Delta::Finish {
                stamp,
                terminal: Terminal::Released,
            } => {
                released.insert(*stamp);
            }
            _ => {}
        }
    }
    // TTL of each stamp: its own, or the smallest of its takers'.
    let ttl = |s: &Stamp| -> Option<u64> {
        facts.get(s).map(|f| f.ttl_ms).or_else(|| {
            facts
                .values()
                .filter(|f| f.takes_over.contains(s))
                .map(|f| f.ttl_ms)
                .min()
        })
    };
    // Released wins over any completion of the same claim only when no completion exists:
    // precedence Indeterminate > Completed > Released.
    let finished_otherwise: BTreeSet<Stamp> = deltas
        .iter()
        .filter_map(|d| match d {
            Delta::Finish { stamp, terminal } if *terminal != Terminal::Released => Some(*stamp),
            _ => None,
        })
        .collect();
    let is_released = |s: &Stamp| released.contains(s) && !finished_otherwise.contains(s);
    let mut gens: Vec<(Stamp, u64, Vec<Stamp>)> = Vec::new();
    for s in &known {
        let Some(t) = ttl(s) else { continue };
        match gens.last_mut() {
            Some((_, expiry, members)) if s.physical_ms() < *expiry => members.push(*s),
            _ => gens.push((*s, s.physical_ms() + t, vec![*s])),
        }
    }
    gens.iter()
        .map(|(anchor, _, members)| {
            let taken_over = |v: &Stamp| {
                members.iter().any(|t| {
                    facts.get(t).is_some_and(|f| f.takes_over.contains(v)) && !is_released(t)
                })
            };
            let winner = members
                .iter()
                .find(|s| facts.contains_key(s) && !is_released(s) && !taken_over(s))
                .copied();
            (*anchor, winner)
        })
        .collect()
}

/// One generated claim: (ms offset, logical, region, fingerprint, takeover choice, terminal
/// choice, lease extension).
type ClaimSpec = (u64, u64, usize, u8, Option<u8>, u8, Option<u64>);

fn claim_spec() -> impl Strategy<Value = ClaimSpec> {
    (
        // Few distinct times, spread over several TTLs: equal hlc values across regions and
        // keys reused across TTL boundaries both happen often.
        prop_oneof![0u64..4, 0u64..350],
        0u64..2,
        0usize..3,
        1u8..3,
        prop::option::weighted(0.35, any::<u8>()),
        0u8..5,
        prop::option::of(0u64..200),
    )
}

/// Deltas of a history: claims executed in several regions, takeovers (some of unknown
/// victims), releases, completions, indeterminate outcomes, lease extensions, resolutions.
fn deltas_of(specs: &[ClaimSpec], ttl_varies: bool) -> Vec<Delta> {
    let mut stamps: Vec<(Stamp, &ClaimSpec)> =
        specs.iter().map(|s| (stamp(s.0, s.1, s.2), s)).collect();
    stamps.sort_by_key(|(s, _)| *s);
    stamps.dedup_by_key(|(s, _)| *s);
    let mut out = Vec::new();
    for (i, (s, spec)) in stamps.iter().enumerate() {
        let mut takes_over: Vec<Stamp> = Vec::new();
        if let Some(c) = spec.4 {
            if c % 5 == 0 {
                // A victim this history never shows: a placeholder.
                let v = Stamp::new(s.hlc.saturating_sub(1), region(2));
                if v < *s {
                    takes_over.push(v);
                }
            } else if i > 0 {
                takes_over.push(stamps[c as usize % i].0);
                if c % 3 == 0 {
                    // Several victims at once.
                    takes_over.push(stamps[(c as usize / 3) % i].0);
                }
            }
        }
        takes_over.sort();
        takes_over.dedup();
        let mut f = facts(spec.3, None);
        f.takes_over = takes_over;
        f.origin_seq = i as u64;
        if ttl_varies && spec.3 == 2 {
            f.ttl_ms = TTL * 2;
        }
        out.push(claim(*s, f));
        if let Some(ext) = spec.6 {
            out.push(Delta::Extend {
                stamp: *s,
                lease_until_ms: s.physical_ms() + ext,
            });
        }
        match spec.5 {
            0 => {}
            1 => out.push(released(*s)),
            2 | 3 => out.push(done(*s, 200)),
            _ => out.push(Delta::Finish {
                stamp: *s,
                terminal: Terminal::Indeterminate(Outcome::new(500, "")),
            }),
        }
        if i % 4 == 3 {
            out.push(Delta::Resolve(Resolution {
                item: ItemId::of(&key(), s),
                at: Stamp::new(s.hlc + 7, region(1)),
                by: "ops".into(),
                note: String::new(),
                hook_result: None,
                provider_ref: None,
            }));
        }
    }
    out
}

fn shuffled<T: Clone>(v: &[T], seed: u64, dup_every: usize) -> Vec<T> {
    let mut out: Vec<T> = v.to_vec();
    for (i, d) in v.iter().enumerate() {
        if dup_every > 0 && i % dup_every == 0 {
            out.push(d.clone());
        }
    }
    let mut x = seed | 1;
    for i in (1..out.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.swap(i, (x % (i as u64 + 1)) as usize);
    }
    out
}

fn derived(r: &Record) -> (Vec<Option<Stamp>>, Vec<Stamp>, Vec<Item>) {
    let none = Retirements::none();
    let gens = r.generations(&none);
    (
        gens.iter().map(|g| g.winner).collect(),
        gens.iter().map(|g| g.anchor).collect(),
        r.items(&key(), ctx(&none)),
    )
}

fn subset(deltas: &[Delta], mask: u64, salt: u32) -> Record {
    let mut r = Record::new();
    for (i, d) in deltas.iter().enumerate() {
        if (mask.rotate_left(salt) >> (i % 64)) & 1 == 1 {
            r.apply(d).unwrap();
        }
    }
    r
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn merge_is_commutative_associative_and_idempotent(
        specs in prop::collection::vec(claim_spec(), 1..12),
        mask in any::<u64>(),
    ) {
        let deltas = deltas_of(&specs, false);
        let (a, b, c) = (subset(&deltas, mask, 0), subset(&deltas, mask, 21), subset(&deltas, mask, 42));
        let mut ab = a.clone(); ab.merge(&b);
        let mut ba = b.clone(); ba.merge(&a);
        prop_assert_eq!(&ab, &ba);
        let mut ab_c = ab.clone(); ab_c.merge(&c);
        let mut bc = b.clone(); bc.merge(&c);
        let mut a_bc = a.clone(); a_bc.merge(&bc);
        prop_assert_eq!(&ab_c, &a_bc);
        let mut aa = a.clone();
        prop_assert!(!aa.merge(&a), "merging a record into itself changes nothing");
        prop_assert_eq!(&aa, &a);
    }

    #[test]
    fn deltas_in_any_order_with_duplicates_give_the_same_record(
        specs in prop::collection::vec(claim_spec(), 1..14),
        seed in any::<u64>(),
        dup_every in 0usize..4,
        ttl_varies in any::<bool>(),
    ) {
        let deltas = deltas_of(&specs, ttl_varies);
        let in_order = build(&deltas);
        let other = build(&shuffled(&deltas, seed, dup_every));
        prop_assert_eq!(&in_order, &other);
        prop_assert_eq!(derived(&in_order), derived(&other));
        prop_assert_eq!(
            in_order.newest_expiry_ms(),
            in_order.generations(&Retirements::none()).last().map(|g| g.expires_at_ms)
        );
        // A record rebuilt from its own deltas (a snapshot stream) is the same record.
        prop_assert_eq!(&build(&in_order.to_deltas()), &in_order);
    }

    #[test]
    fn takeovers_never_leave_a_taken_over_winner_or_an_executed_generation_without_one(
        specs in prop::collection::vec(claim_spec(), 1..14),
        seed in any::<u64>(),
    ) {
        let deltas = deltas_of(&specs, false);
        // Check every prefix of a random arrival order: takeovers race late completions.
        let order = shuffled(&deltas, seed, 0);
        let mut r = Record::new();
        for d in &order {
            r.apply(d).unwrap();
            for g in r.generations(&Retirements::none()) {
                let executed = g.stamps.iter().any(|s| {
                    let c = r.claim(s).unwrap();
                    c.facts.is_some() && c.executed() && !g.orphans.contains(s)
                });
                prop_assert!(!executed || g.winner.is_some(), "executed but no winner in {:?}", g);
                // The winner is never taken over by a claim that was not released (read from the
                // raw facts, not from the generation's own takeover map).
                if let Some(w) = g.winner {
                    let taken = g.stamps.iter().any(|t| {
                        let c = r.claim(t).unwrap();
                        !c.released() && c.facts.as_ref().is_some_and(|f| f.takes_over.contains(&w))
                    });
                    prop_assert!(!taken, "winner {:?} taken over in {:?}", w, g);
                }
            }
        }
    }

    #[test]
    fn winners_match_an_independent_oracle(
        specs in prop::collection::vec(claim_spec(), 1..14),
        seed in any::<u64>(),
    ) {
        let deltas = deltas_of(&specs, false);
        // Every prefix of a random arrival order: takeovers race late completions and releases.
        let order = shuffled(&deltas, seed, 0);
        let mut r = Record::new();
        for n in 1..=order.len() {
            r.apply(&order[n - 1]).unwrap();
            let got: Vec<(Stamp, Option<Stamp>)> = r
                .generations(&Retirements::none())
                .iter()
                .map(|g| (g.anchor, g.winner))
                .collect();
            prop_assert_eq!(got, oracle(&order[..n]));
        }
    }

    #[test]
    fn adding_claims_only_lowers_generation_anchors(
        specs in prop::collection::vec(claim_spec(), 1..14),
        extra in prop::collection::vec(claim_spec(), 1..4),
    ) {
        // Claims of one namespace policy (one TTL): the i-th anchor never rises and the number
        // of generations never falls as claims arrive.
        let base = deltas_of(&specs, false);
        let more: Vec<Delta> = deltas_of(&extra, false)
            .into_iter()
            .map(|d| match d {
                Delta::Claim { stamp, mut facts } => { facts.takes_over.clear(); Delta::Claim { stamp, facts } }
                other => other,
            })
            .collect();
        let small = build(&base);
        // New claims only: a second, different write of an existing claim's facts is an owner
        // breaking its contract (an alarm), not a claim arriving.
        let more: Vec<Delta> = more
            .into_iter()
            .filter(|d| small.claim(&d.stamp()).is_none_or(|c| c.facts.is_none()))
            .collect();
        let mut big = small.clone();
        for d in &more { big.apply(d).unwrap(); }
        let a_small: Vec<Stamp> = small.generations(&Retirements::none()).iter().map(|g| g.anchor).collect();
        let a_big: Vec<Stamp> = big.generations(&Retirements::none()).iter().map(|g| g.anchor).collect();
        prop_assert!(a_big.len() >= a_small.len());
        for (s, b) in a_small.iter().zip(&a_big) {
            prop_assert!(b <= s, "anchor rose from {:?} to {:?}", s, b);
        }
    }

    #[test]
    fn every_executed_loser_is_an_item_and_every_item_is_justified(
        specs in prop::collection::vec(claim_spec(), 1..14),
    ) {
        let r = build(&deltas_of(&specs, false));
        let none = Retirements::none();
        let items = r.items(&key(), ctx(&none));
        for g in r.generations(&none) {
            for s in &g.stamps {
                let c = r.claim(s).unwrap();
                let flagged = items.iter().any(|i| i.claim == *s);
                if c.facts.is_some() && c.executed() && Some(*s) != g.winner {
                    prop_assert!(flagged, "executed loser {:?} not flagged", s);
                }
                if flagged {
                    let i = items.iter().find(|i| i.claim == *s).unwrap();
                    let justified = (c.executed() && Some(*s) != g.winner)
                        || (i.kind == ItemKind::Verify && g.taken_over.contains_key(s))
                        // In flight past its lease (the context says every lease ran out).
                        || (i.kind == ItemKind::Verify
                            && !c.executed()
                            && !c.released()
                            && Some(*s) != g.winner)
                        || (i.kind == ItemKind::Reversed && i.resolved && Some(*s) == g.winner);
                    prop_assert!(justified, "unjustified item {:?}", i);
                }
            }
        }
    }
}

#[test]
fn a_losing_claim_silent_past_its_lease_is_a_verify_item() {
    let a = stamp(0, 0, 0);
    let b = stamp(5, 0, 1); // in flight until T0 + 35, then no word from its client
    let r = build(&[
        claim(a, facts(1, None)),
        done(a, 200),
        claim(b, facts(1, None)),
    ]);
    assert_eq!(r.claim(&b).unwrap().lease_until_ms, T0 + 35);
    let none = Retirements::none();
    let at = |lapsed_before_ms| ItemContext {
        retired: &none,
        stable: true,
        lapsed_before_ms,
    };
    assert!(r.items(&key(), at(0)).is_empty(), "no clock: not yet");
    assert!(r.items(&key(), at(T0 + 35)).is_empty(), "lease not over");
    let items = r.items(&key(), at(T0 + 36));
    assert_eq!(items.len(), 1);
    assert_eq!((items[0].claim, items[0].kind), (b, ItemKind::Verify));
    // Reporting back late turns it into what it is: a duplicate.
    let mut late = r.clone();
    late.apply(&done(b, 200)).unwrap();
    let items = late.items(&key(), at(T0 + 36));
    assert_eq!((items[0].claim, items[0].kind), (b, ItemKind::Duplicate));
    // The winner itself is never an item, however long it stays in flight.
    let alone = build(&[claim(b, facts(1, None))]);
    assert!(alone.items(&key(), at(u64::MAX)).is_empty());
}

#[test]
fn an_item_waits_while_a_taker_in_flight_could_still_be_released() {
    let y = stamp(0, 0, 0);
    let w = stamp(5, 0, 1);
    let t = stamp(40, 0, 2);
    let none = Retirements::none();
    // y ran out of lease; w (which never heard of y) completed; t took y over, not knowing w;
    // y completed late. w wins (y is taken over), y is a duplicate.
    let r = build(&[
        claim(y, facts(1, None)),
        claim(w, facts(1, None)),
        done(w, 200),
        claim(t, facts(1, Some(y))),
        done(y, 200),
    ]);
    // Just after t: its lease (until T0 + 70) still runs.
    let item_of = |r: &Record, s: Stamp| {
        let at = ItemContext {
            retired: &none,
            stable: true,
            lapsed_before_ms: T0 + 41,
        };
        r.items(&key(), at)
            .into_iter()
            .find(|i| i.claim == s)
            .unwrap()
    };
    let i = item_of(&r, y);
    assert_eq!((i.kind, i.winner), (ItemKind::Duplicate, Some(w)));
    assert!(
        !i.actionable,
        "t may still be released, and y would win again"
    );
    // Even long after t's lease: a release sent before it ran out may still be on its way.
    assert!(r
        .items(&key(), ctx(&none))
        .iter()
        .any(|i| i.claim == y && !i.actionable));
    // Released, t's takeover is void: y wins, w is the duplicate.
    let mut released_t = r.clone();
    released_t.apply(&released(t)).unwrap();
    assert_eq!(item_of(&released_t, w).winner, Some(y));
    // Completed, t can never be released: y's loss is settled.
    let mut done_t = r.clone();
    done_t.apply(&done(t, 200)).unwrap();
    assert!(item_of(&done_t, y).actionable);
}

#[test]
fn an_item_waits_until_the_newest_claim_is_older_than_the_max_drift() {
    let a = stamp(0, 0, 0);
    let b = stamp(5, 0, 1);
    let r = build(&[
        claim(a, facts(1, None)),
        done(a, 200),
        claim(b, facts(1, None)),
        done(b, 200),
    ]);
    let none = Retirements::none();
    let at = |lapsed_before_ms| {
        r.items(
            &key(),
            ItemContext {
                retired: &none,
                stable: true,
                lapsed_before_ms,
            },
        )[0]
        .actionable
    };
    assert!(
        !at(T0 + 4),
        "a region whose clock has not reached b could still claim below it"
    );
    assert!(at(T0 + 5));
}
