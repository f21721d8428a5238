use proptest::collection::vec;
use proptest::prelude::*;

use super::frame::{self, FrameDecoder, PREFIX_BYTES};
use super::*;
use crate::arb::{deltas, keys, records, regions, u64s};
use crate::record::Delta;

fn region(name: &str) -> RegionId {
    RegionId::new(name).unwrap()
}

/// Strictly increasing sequence numbers from 1 up.
fn seqs(max: usize) -> impl Strategy<Value = Vec<u64>> {
    vec(1u64..1_000, 0..max).prop_map(|steps| {
        steps
            .iter()
            .scan(0u64, |acc, s| {
                *acc += s;
                Some(*acc)
            })
            .collect()
    })
}

/// A valid batch of `origin`'s mutations.
fn batch_of(origin: RegionId, max: usize) -> impl Strategy<Value = Vec<Mutation>> {
    seqs(max).prop_flat_map(move |seqs| {
        let n = seqs.len();
        (Just(seqs), vec((keys(), deltas()), n)).prop_map(move |(seqs, parts)| {
            seqs.into_iter()
                .zip(parts)
                .map(|(seq, (key, delta))| Mutation {
                    origin,
                    seq,
                    key,
                    delta,
                })
                .collect()
        })
    })
}

fn version_ranges() -> impl Strategy<Value = VersionRange> {
    (any::<u16>(), any::<u16>()).prop_map(|(a, b)| VersionRange {
        min: a.min(b),
        max: a.max(b),
    })
}

fn clusters() -> impl Strategy<Value = ClusterId> {
    "[a-z0-9._-]{1,64}".prop_map(|s| ClusterId::new(&s).unwrap())
}

/// Sorted, unique (origin, mark) pairs.
fn mark_lists() -> impl Strategy<Value = Vec<(RegionId, u64)>> {
    vec((regions(), u64s()), 0..5).prop_map(|mut v| {
        v.sort_by_key(|(r, _)| *r);
        v.dedup_by_key(|(r, _)| *r);
        v
    })
}

/// A valid digest entry: gaps built upwards from the mark with held numbers between them.
fn origin_digests() -> impl Strategy<Value = OriginDigest> {
    (
        regions(),
        0u64..1 << 40,
        vec((1u64..50, 0u64..50), 0..6),
        1u64..50,
    )
        .prop_map(|(origin, mark, steps, top)| {
            let mut gaps = Vec::new();
            let mut at = mark;
            for (held_before, len) in steps {
                // The first gap starts right above the mark; later ones after held numbers.
                let first = if gaps.is_empty() {
                    at + 1
                } else {
                    at + held_before
                };
                gaps.push(SeqRange {
                    first,
                    last: first + len,
                });
                at = first + len + 1;
            }
            let head = if gaps.is_empty() { mark } else { at + top };
            OriginDigest {
                origin,
                mark,
                gaps,
                head,
            }
        })
}

fn digests() -> impl Strategy<Value = Digest> {
    vec(origin_digests(), 0..4).prop_map(|mut origins| {
        origins.sort_by_key(|o| o.origin);
        origins.dedup_by_key(|o| o.origin);
        Digest { origins }
    })
}

fn snapshot_chunks() -> impl Strategy<Value = SnapshotChunk> {
    (
        u64s(),
        vec((keys(), records()), 0..4),
        any::<bool>(),
        mark_lists(),
    )
        .prop_map(|(request, mut records, more, marks)| {
            records.sort_by_key(|(k, _)| k.digest());
            records.dedup_by_key(|(k, _)| k.digest());
            let next = if more {
                records.last().map(|(k, _)| k.digest())
            } else {
                None
            };
            SnapshotChunk {
                request,
                records,
                next,
                marks,
            }
        })
}

/// Every kind of message, valid.
fn messages() -> impl Strategy<Value = Message> {
    prop_oneof![
        (clusters(), regions(), version_ranges(), any::<[u8; 32]>()).prop_map(
            |(cluster, region, versions, policy_digest)| Message::Hello(Hello {
                cluster,
                region,
                versions,
                policy_digest,
            })
        ),
        prop_oneof![
            clusters().prop_map(|ours| RejectReason::ClusterMismatch { ours }),
            version_ranges().prop_map(|ours| RejectReason::NoCommonVersion { ours }),
            Just(RejectReason::SameRegion),
            regions().prop_map(|expected| RejectReason::UnexpectedRegion { expected }),
        ]
        .prop_map(|reason| Message::Reject(Reject { reason })),
        regions().prop_flat_map(|origin| batch_of(origin, 4)
            .prop_map(move |mutations| Message::Push(Push { origin, mutations }))),
        digests().prop_map(Message::Digest),
        (
            u64s(),
            regions(),
            1u64..1 << 50,
            0u64..1000,
            0..=FRAME_BYTES_MAX as u32
        )
            .prop_map(
                |(request, origin, first, len, max_bytes)| Message::RangeRequest(RangeRequest {
                    request,
                    origin,
                    range: SeqRange {
                        first,
                        last: first + len,
                    },
                    max_bytes,
                })
            ),
        (u64s(), regions(), any::<bool>()).prop_flat_map(|(request, origin, more)| {
            batch_of(origin, 4).prop_map(move |mutations| {
                let next = more.then(|| mutations.last().map_or(1, |m| m.seq + 1));
                Message::Range(Range {
                    request,
                    origin,
                    mutations,
                    next,
                })
            })
        }),
        (u64s(), 0..=RETRY_AFTER_MS_MAX).prop_map(|(request, retry_after_ms)| {
            Message::Busy(Busy {
                request,
                retry_after_ms,
            })
        }),
        (u64s(), regions(), 1u64..=crate::store::SEQ_MAX).prop_map(
            |(request, origin, retained_from)| {
                Message::ResetRequired(ResetRequired {
                    request,
                    origin,
                    retained_from,
                })
            }
        ),
        (
            u64s(),
            proptest::option::of(any::<[u8; 16]>()),
            1..=SNAPSHOT_RECORDS_MAX as u32
        )
            .prop_map(|(request, after, max_records)| {
                Message::SnapshotRequest(SnapshotRequest {
                    request,
                    after: after.map(KeyDigest),
                    max_records,
                })
            }),
        snapshot_chunks().prop_map(Message::SnapshotChunk),
        (u64s(), u64s()).prop_map(|(nonce, sent_ms)| Message::Ping(Ping { nonce, sent_ms })),
        (u64s(), u64s(), 0u64..1 << 50, 0u64..1000).prop_map(
            |(nonce, ping_sent_ms, received_ms, held)| Message::Pong(Pong {
                nonce,
                ping_sent_ms,
                received_ms,
                sent_ms: received_ms + held,
            })
        ),
        mark_lists().prop_map(|marks| Message::Marks(Marks { marks })),
        (u64s(), keys()).prop_map(|(request, key)| Message::Lookup(Lookup { request, key })),
        (u64s(), keys(), proptest::option::of(records())).prop_map(|(request, key, record)| {
            Message::LookupReply(LookupReply {
                request,
                key,
                record,
            })
        }),
        (regions(), 0u64..=crate::store::SEQ_MAX)
            .prop_map(|(region, last_seq)| Message::Retired(Retired { region, last_seq })),
    ]
}

/// Feeds `bytes` to a decoder in pieces of the given sizes (cycled), collecting messages until
/// the bytes run out or an error.
fn feed(bytes: &[u8], pieces: &[usize]) -> Result<Vec<Message>, WireError> {
    let mut d = FrameDecoder::new();
    let mut out = Vec::new();
    let mut at = 0;
    let mut i = 0;
    while at < bytes.len() {
        let n = pieces[i % pieces.len()].clamp(1, bytes.len() - at);
        d.push(&bytes[at..at + n])?;
        at += n;
        i += 1;
        while let Some(m) = d.next()? {
            out.push(m);
        }
    }
    Ok(out)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn every_message_round_trips_through_a_frame(msg in messages()) {
        prop_assert_eq!(msg.validate(), Ok(()));
        let framed = frame::encode(&msg).unwrap();
        let body_len = u32::from_be_bytes(framed[..PREFIX_BYTES].try_into().unwrap()) as usize;
        prop_assert_eq!(body_len, framed.len() - PREFIX_BYTES);
        prop_assert_eq!(Message::decode(&framed[PREFIX_BYTES..]).unwrap(), msg);
    }

    #[test]
    fn a_stream_of_frames_decodes_in_any_split(
        msgs in vec(messages(), 1..6),
        pieces in vec(1usize..200, 1..8),
    ) {
        let mut bytes = Vec::new();
        for m in &msgs {
            bytes.extend(frame::encode(m).unwrap());
        }
        prop_assert_eq!(feed(&bytes, &pieces).unwrap(), msgs);
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_decoder(
        bytes in vec(any::<u8>(), 0..512),
        pieces in vec(1usize..64, 1..8),
    ) {
        // Either messages that pass validation, or a typed error: never a panic.
        if let Ok(msgs) = feed(&bytes, &pieces) {
            for m in msgs {
                prop_assert_eq!(m.validate(), Ok(()));
            }
        }
        let _ = Message::decode(&bytes);
    }

    #[test]
    fn corrupted_frames_decode_to_valid_messages_or_errors(
        msg in messages(),
        flips in vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        let mut body = msg.encode().unwrap();
        for (at, x) in flips {
            let i = at.index(body.len());
            body[i] ^= x | 1;
        }
        if let Ok(m) = Message::decode(&body) {
            prop_assert_eq!(m.validate(), Ok(()));
        }
    }
}

#[test]
fn variant_tags_are_fixed() {
    // The format: a variant's index is its first byte. Reordering or inserting variants breaks
    // every peer of an older build, so this list only ever grows at the end.
    let r = region("eu1");
    let key = RecordKey::new("ns", "p", "k");
    let cases: Vec<(u8, Message)> = vec![
        (
            0,
            Message::Hello(Hello {
                cluster: ClusterId::new("prod").unwrap(),
                region: r,
                versions: PROTOCOL_VERSIONS,
                policy_digest: [0; 32],
            }),
        ),
        (
            1,
            Message::Reject(Reject {
                reason: RejectReason::SameRegion,
            }),
        ),
        (
            2,
            Message::Push(Push {
                origin: r,
                mutations: vec![],
            }),
        ),
        (3, Message::Digest(Digest { origins: vec![] })),
        (
            4,
            Message::RangeRequest(RangeRequest {
                request: 1,
                origin: r,
                range: SeqRange { first: 1, last: 1 },
                max_bytes: 1,
            }),
        ),
        (
            5,
            Message::Range(Range {
                request: 1,
                origin: r,
                mutations: vec![],
                next: None,
            }),
        ),
        (
            6,
            Message::Busy(Busy {
                request: 1,
                retry_after_ms: 1,
            }),
        ),
        (
            7,
            Message::ResetRequired(ResetRequired {
                request: 1,
                origin: r,
                retained_from: 1,
            }),
        ),
        (
            8,
            Message::SnapshotRequest(SnapshotRequest {
                request: 1,
                after: None,
                max_records: 1,
            }),
        ),
        (
            9,
            Message::SnapshotChunk(SnapshotChunk {
                request: 1,
                records: vec![],
                next: None,
                marks: vec![],
            }),
        ),
        (
            10,
            Message::Ping(Ping {
                nonce: 1,
                sent_ms: 1,
            }),
        ),
        (
            11,
            Message::Pong(Pong {
                nonce: 1,
                ping_sent_ms: 1,
                received_ms: 1,
                sent_ms: 1,
            }),
        ),
        (12, Message::Marks(Marks { marks: vec![] })),
        (
            13,
            Message::Lookup(Lookup {
                request: 1,
                key: key.clone(),
            }),
        ),
        (
            14,
            Message::LookupReply(LookupReply {
                request: 1,
                key,
                record: None,
            }),
        ),
        (
            15,
            Message::Retired(Retired {
                region: r,
                last_seq: 1,
            }),
        ),
    ];
    for (tag, msg) in cases {
        assert_eq!(msg.encode().unwrap()[0], tag, "{}", msg.kind());
    }
}

#[test]
fn hello_bytes_are_stable() {
    // A golden encoding: a change here is a change of the protocol's format.
    let msg = Message::Hello(Hello {
        cluster: ClusterId::new("prod").unwrap(),
        region: region("eu1"),
        versions: VersionRange { min: 1, max: 300 },
        policy_digest: [7; 32],
    });
    let mut want = vec![
        0, 4, b'p', b'r', b'o', b'd', 3, b'e', b'u', b'1', 1, 251, 44, 1,
    ];
    want.extend([7; 32]);
    assert_eq!(msg.encode().unwrap(), want);
}

#[test]
fn an_oversized_length_prefix_is_refused_before_its_body_arrives() {
    let mut d = FrameDecoder::new();
    let len = (FRAME_BYTES_MAX as u32 + 1).to_be_bytes();
    d.push(&len[..2]).unwrap();
    assert_eq!(d.next(), Ok(None));
    let err = d.push(&len[2..]).unwrap_err();
    assert_eq!(
        err,
        WireError::FrameTooLarge {
            len: FRAME_BYTES_MAX as u64 + 1
        }
    );
    assert_eq!(d.buffered(), 0, "nothing of the oversized frame is kept");
    // The stream is out of step for good.
    assert_eq!(d.push(&[0, 0, 0, 0]), Err(err.clone()));
    assert_eq!(d.next(), Err(err));
}

#[test]
fn a_frame_at_the_cap_is_accepted_and_one_past_it_refused() {
    let mut d = FrameDecoder::new();
    d.push(&(FRAME_BYTES_MAX as u32).to_be_bytes()).unwrap();
    assert_eq!(d.next(), Ok(None), "waits for the body");
    assert_eq!(
        Message::decode(&vec![0; FRAME_BYTES_MAX + 1]),
        Err(WireError::FrameTooLarge {
            len: FRAME_BYTES_MAX as u64 + 1
        })
    );
}

#[test]
fn a_forged_inner_length_cannot_allocate_past_the_limit() {
    // A Push whose mutation count (a u64 varint: marker 253, then 8 bytes) claims 2^60
    // entries in a 14-byte body; a snapshot chunk that claims 2^40 records.
    let mut push = vec![2, 3, b'e', b'u', b'1', 253];
    push.extend((1u64 << 60).to_le_bytes());
    let mut chunk = vec![9, 1, 253];
    chunk.extend((1u64 << 40).to_le_bytes());
    for body in [push, chunk] {
        let err = Message::decode(&body).unwrap_err();
        // Had the decoder trusted the count, the allocation would have aborted the process.
        assert!(matches!(err, WireError::Decode(_)), "{err:?}");
    }
}

#[test]
fn a_bad_frame_ends_the_stream() {
    let good = frame::encode(&Message::Ping(Ping {
        nonce: 1,
        sent_ms: 2,
    }))
    .unwrap();
    let mut d = FrameDecoder::new();
    d.push(&good).unwrap();
    d.push(&[0, 0, 0, 1, 200]).unwrap();
    d.push(&good).unwrap();
    assert!(matches!(d.next(), Ok(Some(Message::Ping(_)))));
    let err = d.next().unwrap_err();
    assert!(matches!(err, WireError::Decode(_)), "{err:?}");
    assert_eq!(
        d.next(),
        Err(err.clone()),
        "the good frame after it is not read"
    );
    assert_eq!(d.push(&good), Err(err));
}

#[test]
fn trailing_bytes_after_a_message_are_refused() {
    let mut body = Message::Ping(Ping {
        nonce: 1,
        sent_ms: 2,
    })
    .encode()
    .unwrap();
    body.push(0);
    assert_eq!(Message::decode(&body), Err(WireError::TrailingBytes(1)));
}

#[test]
fn an_unknown_variant_is_a_decode_error() {
    let err = Message::decode(&[200]).unwrap_err();
    assert!(matches!(err, WireError::Decode(_)), "{err:?}");
}

#[test]
fn cluster_ids_are_checked_when_built_and_when_decoded() {
    assert!(ClusterId::new("prod-eu_1.a").is_ok());
    for bad in ["", "Prod", "a b", &"x".repeat(CLUSTER_ID_LEN_MAX + 1)] {
        assert!(
            matches!(ClusterId::new(bad), Err(WireError::Invalid(_))),
            "{bad:?}"
        );
    }
    let mut body = Message::Hello(Hello {
        cluster: ClusterId::new("prod").unwrap(),
        region: region("eu1"),
        versions: PROTOCOL_VERSIONS,
        policy_digest: [0; 32],
    })
    .encode()
    .unwrap();
    body[2] = b'P';
    assert!(matches!(Message::decode(&body), Err(WireError::Decode(_))));
}

#[test]
fn version_ranges_agree_on_the_newest_common_version() {
    let r = |min, max| VersionRange { min, max };
    assert_eq!(r(1, 3).highest_common(&r(2, 5)), Some(3));
    assert_eq!(r(2, 5).highest_common(&r(1, 3)), Some(3));
    assert_eq!(r(1, 1).highest_common(&r(1, 1)), Some(1));
    assert_eq!(r(1, 2).highest_common(&r(3, 4)), None);
}

fn invalid(msg: Message) -> String {
    let body = msg.encode().unwrap();
    match Message::decode(&body) {
        Err(WireError::Invalid(why)) => why,
        other => panic!("expected an invalid message, got {other:?}"),
    }
}

fn mutation(origin: RegionId, seq: u64) -> Mutation {
    Mutation {
        origin,
        seq,
        key: RecordKey::new("ns", "p", "k"),
        delta: Delta::Extend {
            stamp: crate::clock::Stamp::new(1, origin),
            lease_until_ms: 1,
        },
    }
}

#[test]
fn structural_rules_are_enforced_on_decode() {
    let (a, b) = (region("a"), region("b"));
    let hello = |min, max| {
        Message::Hello(Hello {
            cluster: ClusterId::new("c").unwrap(),
            region: a,
            versions: VersionRange { min, max },
            policy_digest: [0; 32],
        })
    };
    assert!(invalid(hello(2, 1)).contains("upside down"));

    let push = |mutations| {
        Message::Push(Push {
            origin: a,
            mutations,
        })
    };
    assert!(invalid(push(vec![mutation(b, 1)])).contains("another origin"));
    assert!(invalid(push(vec![mutation(a, 2), mutation(a, 2)])).contains("strictly"));
    assert!(invalid(push(vec![mutation(a, 0)])).contains("strictly"));
    assert!(invalid(push(
        (1..=BATCH_MUTATIONS_MAX as u64 + 1)
            .map(|s| mutation(a, s))
            .collect()
    ))
    .contains("more mutations"));

    let range = |mutations, next| {
        Message::Range(Range {
            request: 1,
            origin: a,
            mutations,
            next,
        })
    };
    assert!(invalid(range(vec![mutation(a, 5)], Some(5))).contains("resume point"));

    let od = |mark, gaps: Vec<(u64, u64)>, head| OriginDigest {
        origin: a,
        mark,
        gaps: gaps
            .into_iter()
            .map(|(first, last)| SeqRange { first, last })
            .collect(),
        head,
    };
    let digest = |origins| Message::Digest(Digest { origins });
    assert!(invalid(digest(vec![od(5, vec![], 4)])).contains("mark above head"));
    assert!(invalid(digest(vec![od(5, vec![(5, 6)], 9)])).contains("not above the mark"));
    assert!(invalid(digest(vec![od(5, vec![(6, 7), (8, 8)], 9)])).contains("touching"));
    assert!(invalid(digest(vec![od(5, vec![(6, 9)], 9)])).contains("reaches the head"));
    assert!(invalid(digest(vec![od(5, vec![(7, 6)], 9)])).contains("range empty"));
    let mut dup = od(5, vec![], 5);
    dup.origin = a;
    assert!(invalid(digest(vec![dup.clone(), dup])).contains("not sorted"));

    let rr = |first, last, max_bytes| {
        Message::RangeRequest(RangeRequest {
            request: 1,
            origin: a,
            range: SeqRange { first, last },
            max_bytes,
        })
    };
    assert!(invalid(rr(0, 1, 10)).contains("range empty"));
    assert!(invalid(rr(1, 1, FRAME_BYTES_MAX as u32 + 1)).contains("budget"));

    assert!(invalid(Message::Busy(Busy {
        request: 1,
        retry_after_ms: RETRY_AFTER_MS_MAX + 1
    }))
    .contains("retry-after"));
    assert!(invalid(Message::ResetRequired(ResetRequired {
        request: 1,
        origin: a,
        retained_from: 0
    }))
    .contains("start at 1"));
    assert!(invalid(Message::SnapshotRequest(SnapshotRequest {
        request: 1,
        after: None,
        max_records: 0
    }))
    .contains("record count"));
    assert!(invalid(Message::Pong(Pong {
        nonce: 1,
        ping_sent_ms: 1,
        received_ms: 5,
        sent_ms: 4
    }))
    .contains("pong"));
    assert!(invalid(Message::Marks(Marks {
        marks: vec![(b, 1), (a, 1)]
    }))
    .contains("not sorted"));

    let k1 = RecordKey::new("ns", "p", "1");
    let k2 = RecordKey::new("ns", "p", "2");
    let (lo, hi) = if k1.digest() < k2.digest() {
        (k1, k2)
    } else {
        (k2, k1)
    };
    let chunk = |records: Vec<(RecordKey, Record)>, next| {
        Message::SnapshotChunk(SnapshotChunk {
            request: 1,
            records,
            next,
            marks: vec![],
        })
    };
    assert!(invalid(chunk(
        vec![(hi.clone(), Record::new()), (lo.clone(), Record::new())],
        None
    ))
    .contains("digest order"));
    assert!(invalid(chunk(vec![(hi, Record::new())], Some(lo.digest()))).contains("resume point"));

    assert!(invalid(Message::Retired(Retired {
        region: b,
        last_seq: crate::store::SEQ_MAX + 1,
    }))
    .contains("retired"));
}

#[test]
fn many_frames_in_one_push_all_come_out() {
    let one = frame::encode(&Message::Ping(Ping {
        nonce: 7,
        sent_ms: 8,
    }))
    .unwrap();
    let n = 20_000;
    let bytes: Vec<u8> = one.iter().copied().cycle().take(one.len() * n).collect();
    let mut d = FrameDecoder::new();
    d.push(&bytes).unwrap();
    let mut got = 0;
    while let Some(m) = d.next().unwrap() {
        assert!(matches!(m, Message::Ping(Ping { nonce: 7, .. })));
        got += 1;
    }
    assert_eq!(got, n);
    assert_eq!(d.buffered(), 0);
    // A frame split across pushes after many consumed ones.
    d.push(&one[..3]).unwrap();
    assert_eq!(d.next(), Ok(None));
    d.push(&one[3..]).unwrap();
    assert!(matches!(d.next(), Ok(Some(Message::Ping(_)))));
}
