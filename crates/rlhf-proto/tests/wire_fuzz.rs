//! Fuzzing of the wire decoding, as property tests with a fixed number of cases (cargo-fuzz
//! needs a nightly toolchain; this runs in every `cargo test`): arbitrary bytes given to the
//! tensor decoding ([`from_wire`], also behind prost's own decoding) and arbitrary weight chunk
//! streams given to [`WeightAssembler`] never panic and never make one allocation larger than
//! what the input carries or the assembler's limit allows; valid encodings round-trip bitwise.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use proptest::prelude::*;
use prost::Message;
use rlhf_proto::pb;
use rlhf_proto::wire::{chunks, from_wire, to_wire, WeightAssembler};
use tch::{Device, Kind, Tensor};

/// The system allocator, recording the largest single request made by the current thread, so a
/// test can assert that decoding never reserves what a message merely declares.
struct Tracking;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: forwards every call to `System` unchanged; the bookkeeping touches a const-initialised
// thread-local `Cell`, which neither allocates nor re-enters the allocator.
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        System.realloc(ptr, layout, new_size)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

fn note(size: usize) {
    // `try_with`: during thread teardown the slot may be gone; nothing to record then.
    let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
}

#[global_allocator]
static ALLOC: Tracking = Tracking;

/// Runs `f` and returns its result with the largest single allocation it made.
fn largest_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|l| l.set(0));
    let out = f();
    (out, LARGEST.with(Cell::get))
}

/// Slack for the bookkeeping around a decode (names and shapes in error messages).
const SLACK: usize = 64 << 10;

fn dtype() -> impl Strategy<Value = i32> {
    prop_oneof![0..=8i32, any::<i32>()]
}

fn dim() -> impl Strategy<Value = i64> {
    prop_oneof![
        0..8i64,
        any::<i64>(),
        Just(i64::MAX),
        Just(1 << 40),
        Just(-1)
    ]
}

fn wire_tensor() -> impl Strategy<Value = pb::Tensor> {
    (
        dtype(),
        prop::collection::vec(dim(), 0..5),
        prop::collection::vec(any::<u8>(), 0..256),
    )
        .prop_map(|(dtype, shape, data)| pb::Tensor { dtype, shape, data })
}

/// The bytes a shape and dtype make (saturating), as an honest sender would declare them.
fn declared(dtype: i32, shape: &[i64]) -> u64 {
    let elt = pb::Dtype::try_from(dtype)
        .ok()
        .and_then(rlhf_proto::wire::kind_of)
        .map_or(1, |k| k.elt_size_in_bytes() as u64);
    shape
        .iter()
        .fold(elt, |n, &d| n.saturating_mul(d.max(0) as u64))
}

fn chunk() -> impl Strategy<Value = pb::WeightChunk> {
    (
        prop_oneof![Just("a".to_string()), Just("b".to_string())],
        dtype(),
        prop::collection::vec(dim(), 0..4),
        prop_oneof![Just(0), 0..64u64, any::<u64>()],
        prop::collection::vec(any::<u8>(), 0..128),
        // Half the chunks declare exactly what their shape makes: huge shapes then pass the
        // shape check and reach the allocation, which only the limit stands in front of.
        prop_oneof![
            Just(None),
            (0..256u64).prop_map(Some),
            any::<u64>().prop_map(Some)
        ],
    )
        .prop_map(
            |(name, dtype, shape, offset, data, total)| pb::WeightChunk {
                role_id: "r".into(),
                name,
                dtype,
                total_bytes: total.unwrap_or_else(|| declared(dtype, &shape)),
                shape,
                offset,
                data,
            },
        )
}

fn kind() -> impl Strategy<Value = Kind> {
    prop::sample::select(vec![
        Kind::Float,
        Kind::Half,
        Kind::BFloat16,
        Kind::Double,
        Kind::Int64,
        Kind::Int,
        Kind::Uint8,
        Kind::Bool,
    ])
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_tensor_messages_decode_or_fail_cleanly(t in wire_tensor()) {
        let limit = t.data.len() + SLACK;
        let (_, largest) = largest_allocation(|| from_wire("t", &t).map(|t| t.size()));
        prop_assert!(largest <= limit, "allocated {largest} bytes for {} bytes of data", t.data.len());
    }

    #[test]
    fn arbitrary_bytes_never_panic_in_prost_and_from_wire(
        bytes in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        let limit = bytes.len() + SLACK;
        let (_, largest) = largest_allocation(|| {
            pb::Tensor::decode(bytes.as_slice()).map(|t| from_wire("t", &t).map(|t| t.size()))
        });
        prop_assert!(largest <= limit, "allocated {largest} bytes for {} input bytes", bytes.len());
    }

    #[test]
    fn arbitrary_chunk_streams_stay_within_the_limit(
        stream in prop::collection::vec(chunk(), 1..6),
    ) {
        let max = 1024u64;
        let sent: usize = stream.iter().map(|c| c.data.len()).sum();
        let (_, largest) = largest_allocation(|| {
            let mut asm = WeightAssembler::with_limit(max);
            stream.into_iter().try_for_each(|c| asm.push(c))?;
            asm.finish().map(|(ts, bytes)| (ts.len(), bytes))
        });
        prop_assert!(largest as u64 <= max + (sent + SLACK) as u64, "allocated {largest} bytes");
    }

    #[test]
    fn valid_tensors_round_trip_through_messages_and_chunks(
        k in kind(),
        shape in prop::collection::vec(0..6i64, 0..4),
        chunk_bytes in 1usize..64,
        seed in any::<i64>(),
    ) {
        tch::manual_seed(seed);
        let t = (Tensor::randn(shape.as_slice(), (Kind::Float, Device::Cpu)) * 100).to_kind(k);
        let msg = to_wire("t", &t).unwrap();
        let back = pb::Tensor::decode(msg.encode_to_vec().as_slice()).unwrap();
        let back = from_wire("t", &back).unwrap();
        prop_assert_eq!(back.kind(), k);
        prop_assert!(back.equal(&t));
        let mut asm = WeightAssembler::with_limit(msg.data.len() as u64);
        for c in chunks("t", &t, chunk_bytes).unwrap() {
            asm.push(pb::WeightChunk::decode(c.encode_to_vec().as_slice()).unwrap()).unwrap();
        }
        let (ts, bytes) = asm.finish().unwrap();
        prop_assert_eq!(bytes, msg.data.len() as u64);
        prop_assert!(ts[0].1.equal(&t));
    }
}
