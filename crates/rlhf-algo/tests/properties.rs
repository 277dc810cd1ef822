//! Property tests of the algorithms' invariants on random small batches: GAE with
//! gamma = lambda = 1 is reward-to-go minus values, PPO at ratio 1 is the plain policy gradient
//! (value and gradient), k2 and k3 are non-negative, RLOO and GRPO advantages sum to zero per
//! group, minibatches partition the buffer, and controller state survives JSON exactly.

use proptest::prelude::*;
use rlhf_algo::*;
use tch::{Kind, Tensor};

/// A (b, t) batch: values in [-5, 5] and a 0/1 mask with at least one token per row.
#[derive(Debug, Clone)]
struct Batch {
    b: usize,
    t: usize,
    x: Vec<f64>,
    y: Vec<f64>,
    mask: Vec<f64>,
}

impl Batch {
    fn tensor(&self, v: &[f64]) -> Tensor {
        Tensor::from_slice(v).reshape([self.b as i64, self.t as i64])
    }
}

fn batch() -> impl Strategy<Value = Batch> {
    (1usize..5, 1usize..9).prop_flat_map(|(b, t)| {
        let n = b * t;
        (
            prop::collection::vec(-5.0f64..5.0, n),
            prop::collection::vec(-5.0f64..5.0, n),
            prop::collection::vec(any::<bool>(), n),
            prop::collection::vec(0..t, b),
        )
            .prop_map(move |(x, y, on, forced)| {
                let mut mask: Vec<f64> = on.iter().map(|&o| if o { 1.0 } else { 0.0 }).collect();
                for (row, col) in forced.iter().enumerate() {
                    mask[row * t + col] = 1.0;
                }
                Batch { b, t, x, y, mask }
            })
    })
}

fn host(x: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(x.to_kind(Kind::Double).reshape([-1])).unwrap()
}

fn aggs() -> impl Strategy<Value = LossAgg> {
    prop_oneof![
        Just(LossAgg::TokenMean),
        Just(LossAgg::SeqMeanTokenSum),
        Just(LossAgg::SeqMeanTokenMean)
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn gae_with_unit_gamma_and_lambda_is_reward_to_go_minus_values(bt in batch()) {
        let (r, v, m) = (bt.tensor(&bt.x), bt.tensor(&bt.y), bt.tensor(&bt.mask));
        let adv = host(&gae(&r, &v, &m, 1.0, 1.0).unwrap().advantages);
        for row in 0..bt.b {
            let mut to_go = 0.0;
            for col in (0..bt.t).rev() {
                let i = row * bt.t + col;
                if bt.mask[i] != 0.0 {
                    to_go += bt.x[i];
                    prop_assert!((adv[i] - (to_go - bt.y[i])).abs() < 1e-9, "row {row} col {col}");
                } else {
                    prop_assert_eq!(adv[i], 0.0);
                }
            }
        }
    }

    #[test]
    fn ppo_at_ratio_one_is_the_policy_gradient(
        bt in batch(),
        agg in aggs(),
        clip_eps in 0.01f64..0.5,
        dual in prop::option::of(1.5f64..5.0),
    ) {
        let adv = bt.tensor(&bt.y);
        let m = bt.tensor(&bt.mask);
        let old = bt.tensor(&bt.x.iter().map(|x| -x.abs() - 0.01).collect::<Vec<_>>());
        let run = |kind| {
            let lp = old.copy().set_requires_grad(true);
            let cfg = PolicyLossConfig { kind, clip_eps, dual_clip: dual, agg, ..Default::default() };
            let inputs = PolicyLossInputs {
                logprobs: &lp,
                old_logprobs: &old,
                advantages: &adv,
                response_mask: &m,
                entropy: None,
                ref_logprobs: None,
            };
            let out = policy_loss(&cfg, &inputs, None).unwrap();
            let grad = Tensor::run_backward(&[&out.loss], &[&lp], false, false);
            (out.metrics, host(&grad[0]))
        };
        let (ppo, g_ppo) = run(PolicyLossKind::Ppo);
        let (pg, g_pg) = run(PolicyLossKind::Pg);
        // The values differ by the constant sum A * old_logprob; compare -A * (ratio = 1).
        let neg_adv = aggregate(&(-&adv), &m, agg).unwrap().double_value(&[]);
        prop_assert!((ppo.pg_loss - neg_adv).abs() < 1e-9);
        prop_assert_eq!(ppo.clip_frac, 0.0);
        prop_assert!(ppo.approx_kl.abs() < 1e-12);
        for (a, b) in g_ppo.iter().zip(&g_pg) {
            prop_assert!((a - b).abs() < 1e-9, "ppo grad {a} vs pg grad {b}");
        }
        let old_pg = aggregate(&(-(&adv * &old)), &m, agg).unwrap().double_value(&[]);
        prop_assert!((pg.pg_loss - old_pg).abs() < 1e-9);
    }

    #[test]
    fn k2_and_k3_are_non_negative(bt in batch()) {
        let lp = bt.tensor(&bt.x.iter().map(|x| -x.abs() * 4.0).collect::<Vec<_>>());
        let rf = bt.tensor(&bt.y.iter().map(|y| -y.abs() * 4.0).collect::<Vec<_>>());
        for est in [KlEstimator::K2, KlEstimator::K3] {
            for k in host(&kl_estimate(&lp, &rf, est).unwrap()) {
                prop_assert!(k >= 0.0, "{est:?} gave {k}");
            }
            let m = bt.tensor(&bt.mask);
            for k in host(&kl_penalty(&lp.to_kind(Kind::Float), &rf.to_kind(Kind::Float), &m, est).unwrap()) {
                prop_assert!(k >= 0.0, "{est:?} in f32 gave {k}");
            }
        }
    }

    #[test]
    fn rloo_and_grpo_advantages_sum_to_zero_per_group(
        groups in 1usize..5,
        n in 2usize..6,
        seed in prop::collection::vec(-10.0f64..10.0, 30),
    ) {
        let scores: Vec<f64> = seed.iter().cycle().take(groups * n).enumerate().map(|(i, s)| s + i as f64 * 0.1).collect();
        let s = Tensor::from_slice(&scores);
        let rloo = host(&rloo_advantages(&s, n as i64).unwrap());
        let grpo = host(&grpo_advantages(&s, n as i64, true, 1e-6).unwrap());
        for g in 0..groups {
            let sum: f64 = rloo[g * n..(g + 1) * n].iter().sum();
            prop_assert!(sum.abs() < 1e-9, "rloo group {g} sums to {sum}");
            let sum: f64 = grpo[g * n..(g + 1) * n].iter().sum();
            prop_assert!(sum.abs() < 1e-6, "grpo group {g} sums to {sum}");
        }
    }

    #[test]
    fn shuffled_indices_are_a_permutation(n in 0usize..200, seed in any::<u64>(), epoch in 0u64..4) {
        let mut seen = shuffled_indices(n, seed, epoch);
        seen.sort();
        prop_assert_eq!(seen, (0..n as i64).collect::<Vec<_>>());
    }

    #[test]
    fn kl_controller_state_round_trips_bit_exactly(coef in 0.0f64..10.0, target in 0.01f64..100.0, horizon in 1u64..100_000, kls in prop::collection::vec(0.0f64..50.0, 0..6)) {
        let mut c = KlController::new(&KlConfig { coef, target: Some(target), horizon, ..Default::default() }).unwrap();
        for kl in &kls {
            c.update(*kl, 128).unwrap();
        }
        let json = serde_json::to_string(c.state()).unwrap();
        let back: KlControllerState = serde_json::from_str(&json).unwrap();
        prop_assert_eq!(back.coef.to_bits(), c.coef().to_bits());
        prop_assert_eq!(&back, c.state());
    }
}
